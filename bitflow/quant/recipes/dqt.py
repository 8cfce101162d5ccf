"""The ``dqt`` recipe: Direct Quantized Training (Zhao et al., arXiv 2412.04787; the maths is in
:mod:`bitflow.quant.dqt`). The targeted layers keep only int8 codes and a scale; :class:`~bitflow.quant.dqt.DQTAdamW`
rounds AdamW's update back onto the grid stochastically. No latent weights, hence no phase-in strength.

At a mid-run switch the float weight Parameters leave the model and the optimizer: their AdamW moments become the
DQT moments (``keep``, the same step count) or are dropped (``reset``). The checkpoint state::

    {"kind": "dqt", "layers": ["layers.0.attn.wq", ...], "options": {"bits": None, "act_bits": 8, ...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

import bitflow.quant.functional as QF
from bitflow.quant.dqt import (
    INIT_SCALES,
    MOMENT_DTYPES,
    DQTAdamW,
    DQTWeight,
    dqt_modules,
    dqt_targets,
    to_dqt,
    unique_dqt_weights,
)
from bitflow.quant.dqt.grid import validate_layer_options
from bitflow.quant.recipe import (
    Conversion,
    QuantOptions,
    QuantRecipe,
    check_mode,
    check_state,
    named_layers,
    unwrap_optimizer,
)

__all__ = ["DQTQuant", "DQTRecipe"]


@dataclass(frozen=True)
class DQTQuant(QuantOptions):
    """The ``dqt`` recipe's options (``quant.<key>``; conf/quant/dqt_ternary.yaml documents each)."""

    LAYER_KEYS: ClassVar[tuple[str, ...]] = ("bits", "act_bits", "act_qmax", "scale_update", "eps")

    bits: int | None = None  # None = ternary {-1, 0, 1}; an int 2..8: codes in [-2^(b-1), 2^(b-1)-1]
    act_bits: int | None = 8  # per-token absmax activation quantization with the STE (None = off)
    act_qmax: float | None = None  # None = 2^(act_bits-1) - 1
    embeddings: bool = False  # also convert nn.Embedding (a tied LM head must then be included: exclude=[])
    init_scale: str = "absmean"  # absmean: s = Qp / mean|W| (the paper) | absmax: nothing clipped
    scale_update: str = "max"  # max: s = Qp / max(W_prev) each step (the authors' code) | fixed
    eps: float = QF.DEFAULT_EPS
    moment_dtype: str = "float32"  # AdamW moments of the DQT layers: float32 | bfloat16 (stochastically rounded)
    seed: int | None = None  # rounding-noise seed; None = torch.initial_seed() (the run's seed)

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_layer_options(self.bits, self.act_bits, self.act_qmax, self.scale_update, self.eps)
        QF._check_choice("init_scale", self.init_scale, INIT_SCALES)
        QF._check_choice("moment_dtype", self.moment_dtype, tuple(MOMENT_DTYPES))
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings={self.embeddings!r} is not allowed; allowed: true or false")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} is not allowed; allowed: null or an int")


class DQTRecipe(QuantRecipe):
    """Direct Quantized Training: int8 codes trained by stochastic rounding, no full-precision copy."""

    name = "dqt"
    Options = DQTQuant
    keeps_parameters = False
    options: DQTQuant

    def plan(self, model: nn.Module) -> list[str]:
        o = self.options
        return [name for name, _ in dqt_targets(model, o.include, o.exclude, o.embeddings, key="quant")]

    def convert(self, model: nn.Module) -> Conversion:
        o = self.options
        replaced = {name: m.weight for name, m in dqt_targets(model, o.include, o.exclude, o.embeddings, key="quant")}
        names = to_dqt(model, o.include, o.exclude, embeddings=o.embeddings, init_scale=o.init_scale,
                       **o.layer_options())
        return Conversion(names, replaced)

    def converted(self, model: nn.Module) -> list[str]:
        return [name for name, _ in dqt_modules(model)]

    # ------------------------------------------------------------------------------------------ checkpoints
    def state(self, model: nn.Module) -> dict[str, Any] | None:
        found = dqt_modules(model)
        if not found:
            return None
        return {"kind": self.name, "layers": [name for name, _ in found], "options": found[0][1].options()}

    def restore(self, model: nn.Module, state: Mapping[str, Any]) -> list[str]:
        check_state(state, self.name, ("layers", "options"))
        layers = list(state["layers"])
        theirs = {**self.options.layer_options(), **dict(state["options"])}
        if theirs != self.options.layer_options():
            raise ValueError(
                f"the checkpoint's DQT options {dict(state['options'])} differ from this run's quant config "
                f"{self.options.layer_options()}"
            )
        modules = named_layers(model, layers)
        todo = [name for name in layers if not isinstance(modules[name], DQTWeight)]
        if todo:
            embeddings = any(isinstance(modules[name], nn.Embedding) for name in todo)
            to_dqt(model, include=todo, exclude=None, embeddings=embeddings, **self.options.layer_options())
        return layers


    # ------------------------------------------------------------------------------------------ optimizer
    def build_optimizer(
        self, model: nn.Module, groups: list[dict[str, Any]], **adamw_kwargs: Any
    ) -> torch.optim.Optimizer:
        """A :class:`~bitflow.quant.dqt.DQTAdamW` over ``groups`` and the model's DQT layers (none yet before a
        mid-run switch; :meth:`adopt_optimizer` hands them over then)."""
        return DQTAdamW.for_model(
            model, groups, moment_dtype=self.options.moment_dtype, seed=self.options.seed, **adamw_kwargs
        )

    def adopt_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, conversion: Conversion, mode: str = "keep"
    ) -> None:
        check_mode(mode)
        opt = _dqt_optimizer(optimizer)
        opt.add_dqt_modules(unique_dqt_weights(model), replaced=conversion.replaced, keep_state=mode == "keep")

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Average the DQT gradients over data-parallel ranks before gradient clipping (DDP reduces registered
        Parameters only)."""
        opt = unwrap_optimizer(optimizer)
        if isinstance(opt, DQTAdamW):
            opt.sync_dqt_grads()

    # ------------------------------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """``dqt/level_share/<code>`` (element-weighted share of the weights at each grid level; for more than 16
        levels only ``Qn``, 0 and ``Qp``), ``dqt/scale`` (mean dequantization step) and ``quant/flip_rate`` (mean
        share of codes changed per optimizer step since the previous call), as 0-dim device tensors."""
        weights = unique_dqt_weights(model)
        if not weights:
            return {}
        qn, qp = weights[0][1].qn, weights[0][1].qp
        counts = sum(torch.bincount(m.codes.flatten().long() - qn, minlength=qp - qn + 1) for _, m in weights)
        numel = sum(m.codes.numel() for _, m in weights)
        levels = list(range(qn, qp + 1)) if qp - qn < 16 else [qn, 0, qp]
        out = {f"dqt/level_share/{c}": counts[c - qn].double() / numel for c in levels}
        out["dqt/scale"] = torch.stack([m.scale.float() for _, m in weights]).mean()
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        flip = opt.take_flip_rate() if isinstance(opt, DQTAdamW) else None
        if flip is not None:
            out["quant/flip_rate"] = flip
        return out


def _dqt_optimizer(optimizer: Any) -> DQTAdamW:
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, DQTAdamW):
        raise ValueError(
            f"switching to DQT needs the optimizer the dqt recipe builds (bitflow.quant.dqt.DQTAdamW), got "
            f"{type(opt).__name__}; build it in configure_optimizers with recipe.build_optimizer"
        )
    return opt
