"""DirectQuantizedTraining: train the linear layers by DQT from the first step, or switch a 16-bit run to DQT.

Direct Quantized Training (Zhao et al., arXiv 2412.04787; the maths is in :mod:`bitflow.quant.dqt`): the targeted
layers keep only int8 codes and a scale, the optimizer step rounds AdamW's update back onto the grid
stochastically. This callback

* converts the model with :func:`~bitflow.quant.dqt.to_dqt` at ``setup`` (``at=0``, DQT from scratch, the paper's
  setting) or at the start of the training batch whose ``global_step`` is the switch step (``at`` > 0: 16-bit, then
  DQT, going beyond the paper the way arXiv 2502.11895 switches 16-bit to BitNet); at a switch, the AdamW moments
  of the replaced weights are kept (``optimizer_state="keep"``) or reset;
* records the conversion in ``pl_module.quant_state`` (kind ``"dqt"``), so checkpoints rebuild it;
* tells bitflow's ``LanguageModel.configure_optimizers`` to build a :class:`~bitflow.quant.dqt.DQTAdamW`
  (``pl_module.dqt_optimizer`` holds its DQT options);
* averages DQT gradients over DDP ranks before gradient clipping (DDP reduces registered Parameters only);
* logs, at the steps Lightning logs ``train/loss``: ``quant/flip_rate`` (share of weight codes changed by one
  optimizer step, averaged over the steps since the previous log; note that :class:`~bitflow.callbacks.QuantMonitor`
  reports BitLinear's flip rate between its measurements, i.e. over ``log_every_n_steps`` steps: the two agree
  when that is 1), ``dqt/level_share/<code>`` (share of weights at each grid level; for more than 16 levels only
  ``Qn``, 0 and ``Qp``) and ``dqt/scale`` (mean dequantization step).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bitflow.callbacks.transition import OPTIMIZER_STATES, log_scalars, model_root
from bitflow.quant.dqt import (
    INIT_SCALES,
    MOMENT_DTYPES,
    DQTAdamW,
    _unique_weights,
    _validate,
    dqt_state,
    dqt_targets,
    to_dqt,
)

__all__ = ["DirectQuantizedTraining", "dqt_metrics", "resolve_switch_step", "step_flip_rate", "switch_to_dqt"]

log = logging.getLogger(__name__)

_AT_HELP = "allowed: an int step >= 0, a float fraction of trainer.max_steps in (0, 1), or null (never)"


def resolve_switch_step(at: int | float | None, max_steps: int | None) -> int | None:
    """The step where DQT starts: ``at`` itself for an int, ``round(at * max_steps)`` for a float in (0, 1),
    ``None`` for ``None``. Raises ``ValueError`` for a step outside ``[0, max_steps)``; with ``max_steps=None``
    (not known yet) only the type and sign of ``at`` are checked."""
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise ValueError(f"at={at!r} is not allowed; {_AT_HELP}")
    if isinstance(at, float) and at != 0.0:
        if not 0.0 < at < 1.0:
            raise ValueError(f"at={at!r} is outside (0, 1); {_AT_HELP}")
        if max_steps is None:
            return None
        if max_steps <= 0:
            raise ValueError(f"at={at} is a fraction of trainer.max_steps, but max_steps={max_steps}")
        step = round(at * max_steps)
    else:
        step = int(at)
    if step < 0:
        raise ValueError(f"at={at!r} is negative; {_AT_HELP}")
    if max_steps is not None and 0 < max_steps <= step:
        raise ValueError(f"at={at!r} is step {step}, outside the run (0..{max_steps - 1}); {_AT_HELP}")
    return step


def _find_dqt_optimizer(trainer: L.Trainer) -> DQTAdamW | None:
    for opt in trainer.optimizers:
        opt = getattr(opt, "_optimizer", opt)  # LightningOptimizer wraps the real one
        if isinstance(opt, DQTAdamW):
            return opt
    return None


def switch_to_dqt(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    include: Any,
    exclude: Any,
    options: dict[str, Any],
    keep_state: bool,
) -> list[str]:
    """Convert a model that is already training to DQT and hand the new layers to its :class:`DQTAdamW`.

    ``options`` are :func:`~bitflow.quant.dqt.to_dqt`'s keyword options. The replaced float weights leave the
    optimizer; with ``keep_state`` their AdamW moments continue as the DQT moments. Sets ``pl_module.quant_state``.
    Raises ``ValueError`` if the trainer's optimizer is not a DQTAdamW (build it with
    :func:`bitflow.quant.dqt.build_adamw`, as bitflow's LanguageModel does when ``pl_module.dqt_optimizer`` is set).
    """
    opt = _find_dqt_optimizer(trainer)
    if opt is None:
        raise ValueError(
            "switching to DQT needs a bitflow.quant.dqt.DQTAdamW optimizer (got "
            f"{[type(getattr(o, '_optimizer', o)).__name__ for o in trainer.optimizers]}); build it in "
            "configure_optimizers with bitflow.quant.dqt.build_adamw"
        )
    root = model_root(pl_module)
    replaced = {name: m.weight for name, m in dqt_targets(root, include, exclude, options.get("embeddings", False))}
    names = to_dqt(root, include, exclude, **options)
    opt.add_dqt_modules(_unique_weights(root), replaced=replaced, keep_state=keep_state)
    pl_module.quant_state = dqt_state(names, root.get_submodule(names[0]).options())
    return names


def step_flip_rate(root: torch.nn.Module, flips: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Share of the weight codes one optimizer step changed (a 0-dim device tensor; no host sync), from the
    per-layer counts ``flips`` (``DQTAdamW.last_flips``); ``None`` if no layer stepped."""
    sizes = {name: m.codes.numel() for name, m in _unique_weights(root) if name in flips}
    if not sizes:
        return None
    return sum(flips[name].float() for name in sizes) / sum(sizes.values())


@torch.no_grad()
def dqt_metrics(root: torch.nn.Module, flip_rate: torch.Tensor | None = None) -> dict[str, float]:
    """``dqt/level_share/<code>`` and ``dqt/scale`` of the DQT layers of ``root``, plus ``quant/flip_rate`` when a
    ``flip_rate`` tensor is given, in one host transfer. Level shares are element-weighted over all DQT weights;
    for more than 16 levels only ``Qn``, 0 and ``Qp`` are reported."""
    weights = _unique_weights(root)
    if not weights:
        return {}
    qn, qp = weights[0][1].qn, weights[0][1].qp
    counts = sum(torch.bincount(m.codes.flatten().long() - qn, minlength=qp - qn + 1) for _, m in weights)
    numel = sum(m.codes.numel() for _, m in weights)
    scale = torch.stack([m.scale.float() for _, m in weights]).mean()
    levels = list(range(qn, qp + 1)) if qp - qn < 16 else [qn, 0, qp]
    flip = flip_rate if flip_rate is not None else torch.full((), float("nan"), device=counts.device)
    row = torch.cat([counts[[c - qn for c in levels]].double(), scale.double().reshape(1),
                     flip.double().reshape(1).to(counts.device)])
    values = row.cpu().tolist()
    out = {f"dqt/level_share/{c}": v / numel for c, v in zip(levels, values)}
    out["dqt/scale"] = values[len(levels)]
    if flip_rate is not None:
        out["quant/flip_rate"] = values[-1]
    return out


class DirectQuantizedTraining(Callback):
    """Train the linear layers by DQT (arXiv 2412.04787), from the start or from a switch step.

    Args:
        at: the step DQT starts: ``0`` (default, the paper), an int step, a float fraction of
            ``trainer.max_steps`` in (0, 1), or ``None`` (never: a 16-bit run through the same code).
        bits: ``None`` = ternary, or an int in [2, 8] (``Qp = 2^(b-1) - 1``, ``Qn = -2^(b-1)``).
        act_bits, act_qmax: per-token absmax activation quantization (with STE) of the DQT linear layers.
        include, exclude: fnmatch globs on layer names (default: every Linear but ``lm_head``).
        embeddings: convert ``nn.Embedding`` layers too (a tied LM head must then be included as well).
        init_scale: ``"absmean"`` (the paper's ``s = Qp / mean|W|``) or ``"absmax"`` (no clipping; gentler for a
            mid-run switch of trained weights to b-bit).
        scale_update: ``"max"`` (the authors' ``s = Qp / max(W_prev)``) or ``"fixed"``.
        moment_dtype: AdamW moments of the DQT layers: ``"float32"`` or ``"bfloat16"``.
        seed: seed of the stochastic-rounding generator; ``None`` = ``torch.initial_seed()`` (the run's seed).
        optimizer_state: at a mid-run switch, ``"keep"`` the AdamW moments of the replaced weights or ``"reset"``.
        every_n_steps: logging interval; ``None`` = ``trainer.log_every_n_steps``; 0 = off.
    """

    def __init__(
        self,
        at: int | float | None = 0,
        bits: int | None = None,
        act_bits: int | None = 8,
        act_qmax: float | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = ("lm_head",),
        embeddings: bool = False,
        init_scale: str = "absmean",
        scale_update: str = "max",
        moment_dtype: str = "float32",
        seed: int | None = None,
        optimizer_state: str = "keep",
        every_n_steps: int | None = None,
    ) -> None:
        resolve_switch_step(at, None)  # type and sign checks; the range needs max_steps (setup)
        _validate(bits, act_bits, act_qmax, scale_update, 1e-5)
        if init_scale not in INIT_SCALES:
            raise ValueError(f"init_scale={init_scale!r} is not allowed; allowed: {', '.join(INIT_SCALES)}")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype={moment_dtype!r} is not allowed; allowed: {', '.join(MOMENT_DTYPES)}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state={optimizer_state!r} is not allowed; allowed: {', '.join(OPTIMIZER_STATES)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; allowed: null or an int")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 0):
            raise ValueError(f"every_n_steps={every_n_steps!r} is not allowed; allowed: null or an int >= 0")
        if not isinstance(embeddings, bool):
            raise ValueError(f"embeddings={embeddings!r} is not allowed; allowed: true or false")
        self.at = at
        self.include, self.exclude, self.embeddings = include, exclude, embeddings
        self.options = dict(
            bits=bits, act_bits=act_bits, act_qmax=act_qmax, embeddings=embeddings, init_scale=init_scale,
            scale_update=scale_update,
        )
        self.moment_dtype, self.seed = moment_dtype, seed
        self.optimizer_state = optimizer_state
        self.every_n_steps = every_n_steps
        self.switch_step: int | None = None
        self._step_at_start = -1
        self._flips: tuple[torch.Tensor, int] | None = None  # (sum of per-step flip rates, steps) since the last log

    # ------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _switched(pl_module: L.LightningModule) -> bool:
        state = getattr(pl_module, "quant_state", None)
        return isinstance(state, dict) and state.get("kind") == "dqt"

    def _layer_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k not in ("embeddings", "init_scale")}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the switch step, ask for a DQTAdamW, convert now (``at=0``) or dry-run the layer filter."""
        if stage != "fit":
            return
        self.switch_step = t0 = resolve_switch_step(self.at, trainer.max_steps)
        if t0 is None:
            log.info("DQT: at=None, the run stays 16-bit")
            return
        pl_module.dqt_optimizer = {"moment_dtype": self.moment_dtype, "seed": self.seed}
        if self._switched(pl_module):
            return  # fitting again a module that already switched
        root = model_root(pl_module)
        if t0 == 0:
            names = to_dqt(root, self.include, self.exclude, **self.options)
            pl_module.quant_state = dqt_state(names, root.get_submodule(names[0]).options())
            log.info("DQT from the first step: %d layers (%s)", len(names), self._describe())
        else:
            names = [name for name, _ in dqt_targets(root, self.include, self.exclude, self.embeddings)]
            log.info("DQT from step %d: %d layers will switch (%s)", t0, len(names), self._describe())

    def _describe(self) -> str:
        bits = self.options["bits"]
        return f"{'ternary' if bits is None else f'{bits}-bit'} codes, {self.moment_dtype} moments"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.switch_step is None:
            return
        if _find_dqt_optimizer(trainer) is None:
            raise ValueError(
                "DirectQuantizedTraining needs the optimizer to be a bitflow.quant.dqt.DQTAdamW (got "
                f"{[type(getattr(o, '_optimizer', o)).__name__ for o in trainer.optimizers]}); bitflow's "
                "LanguageModel builds one; other modules can use bitflow.quant.dqt.build_adamw"
            )
        state = getattr(pl_module, "quant_state", None)
        if self._switched(pl_module):
            mine = self._layer_options()
            theirs = {k: v for k, v in state.get("options", {}).items() if k in mine}
            if theirs != mine:
                raise ValueError(f"the checkpoint's DQT options {theirs} differ from this run's {mine}")

    # ------------------------------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = self._step_at_start = trainer.global_step
        t0 = self.switch_step
        if t0 is not None and step >= t0 and not self._switched(pl_module):
            names = switch_to_dqt(
                trainer, pl_module, self.include, self.exclude, self.options, self.optimizer_state == "keep"
            )
            log.info(
                "DQT switch at step %d: %d layers (%s, optimizer state %s)",
                step, len(names), self._describe(), self.optimizer_state,
            )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        opt = getattr(optimizer, "_optimizer", optimizer)
        if isinstance(opt, DQTAdamW):
            opt.sync_dqt_grads()  # before Lightning clips the gradients

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._step_at_start
        if trainer.global_step == step or not self._switched(pl_module) or not trainer.is_global_zero:
            return  # no optimizer step yet (accumulating), no DQT layers yet, or not the logging rank
        every = trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps
        if every <= 0:
            return
        root = model_root(pl_module)
        opt = _find_dqt_optimizer(trainer)
        rate = step_flip_rate(root, opt.last_flips) if opt is not None and opt.last_flips else None
        if rate is not None:  # summed on the device; averaged over the steps of the logging interval
            self._flips = (self._flips[0] + rate, self._flips[1] + 1) if self._flips else (rate, 1)
        if (step + 1) % every != 0:
            return
        mean = self._flips[0] / self._flips[1] if self._flips else None
        self._flips = None
        log_scalars(trainer, dqt_metrics(root, mean), step)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("switch_step")
        if saved != self.switch_step:
            raise ValueError(
                f"the checkpoint's DQT switch step {saved} differs from this run's ({self.switch_step}); "
                "resume with the same dqt.at and trainer.max_steps"
            )
