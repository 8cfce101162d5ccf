"""The ``ptq`` recipe: post-training quantization of a trained model to an n-bit grid, once, by round-to-nearest
or GPTQ (the maths: :mod:`bitflow.quant.ptq`). ``bitflow-ptq`` applies it to a checkpoint; training does not.

Each targeted ``nn.Linear`` becomes a :class:`~bitflow.quant.ptq.PTQLinear` that keeps the very same weight and
bias Parameters, the weight now holding its dequantized n-bit values (and frozen), plus the ``codes``/``scales``/
``zeros`` buffers. The checkpoint state::

    {"kind": "ptq",
     "layers": ["layers.0.attn.wq", ...],                 # qualified names of the quantized nn.Linear layers
     "options": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": true, "act_order": false,
                 "percdamp": 0.01, "block_size": 128}}

Ternary post-training quantization (absmean, absmedian) is the ``bitlinear`` recipe's own conversion: the same
checkpoint a switch to ``quant=ternary`` writes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bitflow.quant.ptq.gptq import GPTQInfo, gptq
from bitflow.quant.ptq.layer import PTQLinear
from bitflow.quant.ptq.rtn import QuantizedWeight, check_grid, rtn
from bitflow.quant.recipe import Conversion, QuantOptions, QuantRecipe, check_state, named_layers
from bitflow.quant.select import first_names, replace_modules, select_layers

__all__ = ["METHODS", "PTQQuant", "PTQRecipe"]

METHODS = ("rtn", "gptq")  # the n-bit methods of this recipe (ternary PTQ is the bitlinear recipe)


@dataclass(frozen=True)
class PTQQuant(QuantOptions):
    """The ``ptq`` recipe's options (``quant.<key>`` in a checkpoint's hyperparameters; conf/ptq.yaml documents
    the same keys for ``bitflow-ptq``)."""

    LAYER_KEYS: ClassVar[tuple[str, ...]] = ("bits", "group_size")

    method: str = "gptq"  # rtn | gptq
    bits: int = 4  # 2, 3, 4, 6 or 8
    group_size: int | None = None  # None = one scale/zero per output channel; else per group_size input columns
    symmetric: bool = True  # symmetric grid (zero point 2^(b-1)) or asymmetric (min-max, integer zero point)
    act_order: bool = False  # GPTQ: columns in order of decreasing Hessian diagonal (static groups)
    percdamp: float = 0.01  # GPTQ: dampening, a fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128  # GPTQ: lazy-batch width (speed only; the result is the same)

    def __post_init__(self) -> None:
        QuantOptions.__post_init__(self)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; allowed: {', '.join(METHODS)}")
        check_grid(self.bits, self.group_size)
        for key in ("symmetric", "act_order"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} is not allowed; allowed: true or false")
        p = self.percdamp
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
            raise ValueError(f"percdamp={p!r} is not allowed; allowed: a positive number (default 0.01)")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"block_size={b!r} is not allowed; allowed: a positive int (default 128)")


class PTQRecipe(QuantRecipe):
    """Post-training quantization to ``bits``-bit grids (RTN or GPTQ); applied once, from a checkpoint."""

    name = "ptq"
    Options = PTQQuant
    trains = False  # bitflow-ptq applies it once, to a trained checkpoint
    options: PTQQuant

    def __init__(self, options: PTQQuant | None = None) -> None:
        super().__init__(options)
        self.info: dict[str, GPTQInfo] = {}  # per layer, after a GPTQ convert: dampening used, retries, ...

    def plan(self, model: nn.Module) -> list[str]:
        o = self.options
        targets = select_layers(model, nn.Linear, o.include, o.exclude, skip=PTQLinear, tied_together=True)
        for name, m in targets:
            try:
                check_grid(o.bits, o.group_size, m.in_features)
            except ValueError as e:
                raise ValueError(f"quant.{e} (layer {name})") from None
        return [name for name, _ in targets]

    def convert(self, model: nn.Module, calibration: Tensor | None = None, batch_size: int = 8) -> Conversion:
        """Quantize the planned layers of ``model`` in place. RTN needs no data; GPTQ needs ``calibration``, token
        windows ``[N, T]`` run through ``model`` (a decoder) block by block
        (:func:`~bitflow.quant.ptq.sequential.calibrate_sequential`, ``batch_size`` windows per forward)."""
        o = self.options
        names = self.plan(model)
        modules = dict(model.named_modules())
        done: dict[str, QuantizedWeight] = {}
        if o.method == "rtn":
            for n in names:
                done[n] = rtn(modules[n].weight, o.bits, o.group_size, o.symmetric)
        else:
            if calibration is None:
                raise ValueError(
                    "quant.method='gptq' needs calibration data: PTQRecipe.convert(model, calibration=token windows), "
                    "as bitflow-ptq does; use method=rtn to quantize without data"
                )
            from bitflow.quant.ptq.sequential import calibrate_sequential

            def quantize(name: str, layer: nn.Linear, hessian: Tensor) -> None:
                q, info = gptq(layer.weight, hessian, o.bits, o.group_size, o.symmetric, o.act_order, o.percdamp,
                               o.block_size, name=name)
                with torch.no_grad():
                    layer.weight.copy_(q.weight.to(layer.weight.dtype))  # the next blocks see the quantized layer
                done[name], self.info[name] = q, info

            calibrate_sequential(model, names, calibration, quantize, batch_size)
        replace_modules(model, {id(modules[n]): PTQLinear.from_linear(modules[n], done[n]) for n in names})
        return Conversion(names)

    def converted(self, model: nn.Module) -> list[str]:
        return [name for name, _ in first_names(model, PTQLinear)]

    # ------------------------------------------------------------------------------------------ checkpoints
    def state(self, model: nn.Module) -> dict[str, Any] | None:
        names = self.converted(model)
        if not names:
            return None
        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in ("include", "exclude")}
        return {"kind": self.name, "layers": names, "options": options}

    def restore(self, model: nn.Module, state: Mapping[str, Any]) -> list[str]:
        check_state(state, self.name, ("layers", "options"))
        layers = list(state["layers"])
        theirs = {k: state["options"].get(k) for k in self.Options.LAYER_KEYS}
        if theirs != self.options.layer_options():
            raise ValueError(f"the checkpoint's PTQ grid {theirs} differs from this quant config's "
                             f"{self.options.layer_options()}")
        modules = named_layers(model, layers)
        wrong = [n for n in layers if not isinstance(modules[n], nn.Linear)]
        if wrong:
            raise ValueError(f"the quant state names layers that are not nn.Linear: {wrong[:8]}")
        o = self.options
        new = {id(modules[n]): PTQLinear.empty_like(modules[n], o.bits, o.group_size)
               for n in layers if not isinstance(modules[n], PTQLinear)}
        replace_modules(model, new)
        return layers
