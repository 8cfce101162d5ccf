"""PrecisionTransition: train in 16-bit, then switch the linear layers to ternary BitLinear and keep training.

Continual quantization-aware pre-training (Nielsen, Galke, Schneider-Kamp, arXiv 2502.11895): at step t0 every
targeted ``nn.Linear`` becomes a :class:`~bitflow.quant.BitLinear` that reuses the very same weight/bias Parameters
(the 16-bit weights continue as BitLinear's latent weights). Around that switch:

* optimizer state: ``keep`` the AdamW moments, or ``reset`` them for the converted Parameters only;
* LR re-warmup ("bolt-on" warmup of the authors' code, with ``reset``): LR 0 at t0, rising linearly over t_w steps
  to the schedule's value at t0 + t_w (:func:`bitflow.schedules.rewarmup`);
* phase-in of the quantization strength for weights and activations, ``q_lambda(x) = x + lambda (Q(x) - x)``, with
  e.g. lambda(t) = tanh(2.5 (t - t0) / T_w) for 0 <= t - t0 < T_w and exactly 1 afterwards
  (:func:`bitflow.schedules.phase_in`).

When: the conversion happens at the start of the training batch whose ``trainer.global_step == t0``, so step t0's
forward is already ternary. A checkpoint records the conversion (``LanguageModel.quant_state``, see
:mod:`bitflow.quant.state`); resuming from it rebuilds the BitLinear layers before the weights load and this callback
sees that the switch is done. LR and lambda are pure functions of the global step, so a resumed run continues
exactly as the uninterrupted one.

Between training steps the model is in the state of ``trainer.global_step``: its lambda is
``lambda(global_step)`` (what validation and checkpoints see).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from bitflow.quant import BitLinear, set_strength, to_bitlinear, to_linear
from bitflow.quant.state import bitlinear_state
from bitflow.schedules import PHASE_IN_SCHEDULES, phase_in, rewarmup

__all__ = ["OPTIMIZER_STATES", "PrecisionTransition", "model_root"]

log = logging.getLogger(__name__)

OPTIMIZER_STATES = ("keep", "reset")
QUANT_KINDS = ("bitlinear",)
_QUANT_FILTER_KEYS = ("kind", "include", "exclude")
# BitLinear's keyword options and their defaults, read off its signature
_BITLINEAR_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(BitLinear.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("device", "dtype")
}
_BITLINEAR_OPTIONS = tuple(_BITLINEAR_DEFAULTS)


def model_root(pl_module: L.LightningModule) -> nn.Module:
    """The module whose layer names the quant state uses: ``pl_module.model`` (bitflow's LanguageModel holds the
    Llama there) or, for any other LightningModule without a ``model`` submodule, the module itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write scalars straight to every logger at ``step`` (loggers write on rank 0 only).

    ``LightningModule.log`` would drop values logged between ``log_every_n_steps`` intervals; these are one-off or
    already sparse values, written at exactly the step they describe.
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= {minimum}")
    return value


def _split_quant(quant: Mapping[str, Any] | None) -> tuple[Any, Any, dict[str, Any]]:
    """``(include, exclude, BitLinear options)`` of a ``quant`` config, validated without a model."""
    quant = dict(quant or {})
    kind = quant.pop("kind", "bitlinear")
    if kind not in QUANT_KINDS:
        hint = " (quant=none is 16-bit: pick e.g. quant=ternary, or transition=none)" if kind == "none" else ""
        raise ValueError(f"PrecisionTransition: quant.kind={kind!r} is not supported{hint}; allowed: {QUANT_KINDS}")
    include, exclude = quant.pop("include", None), quant.pop("exclude", ("lm_head",))
    for key, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and not isinstance(patterns, (str, Sequence)):
            raise ValueError(f"quant.{key}={patterns!r} must be null, a name pattern or a list of them")
    unknown = sorted(set(quant) - set(_BITLINEAR_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown quant option(s) {unknown}; allowed: {list(_QUANT_FILTER_KEYS) + list(_BITLINEAR_OPTIONS)}"
        )
    # a throwaway layer validates the option values now (group_size divisibility is checked per layer at setup)
    BitLinear(quant.get("group_size") or 1, 1, bias=False, **quant)
    return include, exclude, quant


class PrecisionTransition(Callback):
    """Switch from 16-bit to BitLinear (1.58-bit by default) at a step; see the module docstring.

    Args:
        at: the switch step t0: an int step (``0`` = ternary from the first step: the 1.58-bit baseline through the
            same code), a float in (0, 1) = that fraction of ``trainer.max_steps`` (rounded to the nearest step),
            or ``None`` = never switch (the 16-bit baseline through the same code).
        optimizer_state: ``"keep"`` the AdamW state of the converted Parameters, or ``"reset"`` it (the entries of
            the converted Parameters are removed; AdamW creates fresh ones at the next step; others are untouched).
        lr_rewarmup_steps: t_w of the bolt-on LR re-warmup after a ``reset`` (0 = none). Ignored with ``keep`` (so
            one config can sweep keep/reset). Needs a module with ``lr_wrappers`` (bitflow's LanguageModel).
        phase_in: the lambda schedule, one of ``none, linear, tanh, sigmoid, exp, cosine`` (``none``: 1 at once).
        phase_in_steps: T_w, the phase-in length in steps (> 0 unless ``phase_in`` is ``none``, where it is
            ignored).
        quant: BitLinear's keyword options (``weight_scale``, ``granularity``, ``weight_bits``, ``act_bits``, ...)
            plus the layer filter ``include``/``exclude`` (fnmatch globs on layer names; default: every Linear but
            ``lm_head``) and ``kind`` (``bitlinear``). The Hydra config passes ``quant: ${quant}``.
        spike_window: K: ``transition/spike`` = the highest training loss in the K steps from t0 minus the mean
            over the K steps before t0; logged once, at step t0 + K - 1 (or at the end of a shorter run).
        recovery_smoothing: beta of the exponential moving average of the training loss used by
            ``transition/recovery_steps``: the number of steps from t0 until the smoothed loss is back at or below
            the pre-switch level (the mean of the K steps before t0); 0 = it never rose above it. Logged at the step
            where that happens; not logged if it does not happen within the run.

    Both spike metrics use rank 0's training loss (as ``train/loss`` is logged); they need t0 > 0.
    Bad values raise ``ValueError`` here or, for checks that need ``max_steps`` or the model, in ``setup``.
    """

    def __init__(
        self,
        at: int | float | None = 0.5,
        optimizer_state: str = "keep",
        lr_rewarmup_steps: int = 0,
        phase_in: str = "none",
        phase_in_steps: int = 0,
        quant: Mapping[str, Any] | None = None,
        spike_window: int = 20,
        recovery_smoothing: float = 0.9,
    ) -> None:
        if at is not None:
            if isinstance(at, bool) or not isinstance(at, (int, float)):
                raise ValueError(f"at={at!r} is not allowed; {self._AT_HELP}")
            if isinstance(at, float) and at != 0.0 and not 0.0 < at < 1.0:
                raise ValueError(f"at={at!r} is outside (0, 1); {self._AT_HELP}")
            if isinstance(at, int) and at < 0:
                raise ValueError(f"at={at!r} is negative; {self._AT_HELP}")
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state={optimizer_state!r} is not allowed; allowed: {', '.join(OPTIMIZER_STATES)}")
        if phase_in not in PHASE_IN_SCHEDULES:
            raise ValueError(f"phase_in={phase_in!r} is not allowed; allowed: {', '.join(PHASE_IN_SCHEDULES)}")
        _check_int("lr_rewarmup_steps", lr_rewarmup_steps)
        _check_int("phase_in_steps", phase_in_steps)
        if phase_in != "none" and phase_in_steps == 0:
            raise ValueError(f"phase_in={phase_in!r} needs phase_in_steps > 0 (got 0); or use phase_in='none'")
        _check_int("spike_window", spike_window, minimum=1)
        if isinstance(recovery_smoothing, bool) or not isinstance(recovery_smoothing, (int, float)) or not (
            0.0 <= recovery_smoothing < 1.0
        ):
            raise ValueError(f"recovery_smoothing={recovery_smoothing!r} is not allowed; allowed: a float in [0, 1)")
        self.at = at
        self.optimizer_state = optimizer_state
        self.lr_rewarmup_steps = lr_rewarmup_steps
        self.phase_in = phase_in
        self.phase_in_steps = phase_in_steps
        self.include, self.exclude, self.options = _split_quant(quant)
        self.spike_window = spike_window
        self.recovery_smoothing = float(recovery_smoothing)

        self.switch_step: int | None = None  # t0, resolved in setup()
        self._lambda: float | None = None  # the strength last written into the model
        self._step_at_start = -1
        self._lambda_logged_step = -1
        self._lr_wrap: Callable[[Callable[[int], float]], Callable[[int], float]] | None = None
        self._tracker: _SpikeTracker | None = None

    _AT_HELP = (
        "allowed: an int step >= 0 (0 = ternary from the start), a float fraction of trainer.max_steps in (0, 1), "
        "or null (never switch)"
    )

    # ------------------------------------------------------------------------------------------ schedule
    def strength(self, step: int) -> float:
        """lambda at ``step``: 0 before the switch (and when it never happens), then the phase-in schedule."""
        if self.switch_step is None:
            return 0.0
        return phase_in(self.phase_in, step, self.switch_step, self.phase_in_steps)

    def _resolve_switch_step(self, max_steps: int) -> int | None:
        if self.at is None:
            return None
        if isinstance(self.at, float) and self.at != 0.0:
            if max_steps <= 0:
                raise ValueError(f"at={self.at} is a fraction of trainer.max_steps, but max_steps={max_steps}")
            step = round(self.at * max_steps)
            if not 0 < step < max_steps:
                raise ValueError(
                    f"at={self.at} of max_steps={max_steps} is step {step}, which is not inside the run "
                    f"(1..{max_steps - 1}); use at=0 to train ternary from the start"
                )
            return step
        step = int(self.at)
        if max_steps > 0 and step >= max_steps:
            raise ValueError(
                f"at={self.at} is past the end of training (trainer.max_steps={max_steps}); "
                f"the switch step must be < max_steps"
            )
        return step

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve t0, dry-run the layer filter on the model, register the LR re-warmup; at t0 = 0 convert now."""
        if stage != "fit":
            return
        self.switch_step = t0 = self._resolve_switch_step(trainer.max_steps)
        self._lambda = None
        if t0 is None:
            log.info("precision transition: at=None, the run stays 16-bit")
            return
        if self.phase_in != "none" and trainer.max_steps > 0 and t0 + self.phase_in_steps > trainer.max_steps:
            log.warning(
                "phase-in %s from step %d over %d steps ends after max_steps=%d: lambda stays below 1",
                self.phase_in, t0, self.phase_in_steps, trainer.max_steps,
            )
        if self.optimizer_state == "reset" and self.lr_rewarmup_steps > 0:
            if not isinstance(getattr(pl_module, "lr_wrappers", None), list):
                raise ValueError(
                    "lr_rewarmup_steps needs a LightningModule with an `lr_wrappers` list whose LR schedule applies "
                    f"them (bitflow.lm.LanguageModel); {type(pl_module).__name__} has none"
                )
            self._lr_wrap = _RewarmupWrap(t0, self.lr_rewarmup_steps)
            if self._lr_wrap not in pl_module.lr_wrappers:
                pl_module.lr_wrappers.append(self._lr_wrap)
        if self._switched(pl_module):
            return  # fitting again a module that already switched
        root = model_root(pl_module)
        present = [name for name, m in root.named_modules() if isinstance(m, BitLinear)]
        if present:
            raise ValueError(
                f"the model already has BitLinear layers before the precision transition: {present[:4]}; "
                "PrecisionTransition converts a 16-bit model"
            )
        if t0 == 0:
            self._switch(trainer, pl_module, 0)
        else:  # dry run: to_bitlinear validates the filter and the options on the real layers, then undo it
            names = to_bitlinear(root, include=self.include, exclude=self.exclude, **self.options)
            to_linear(root)
            log.info("precision transition at step %d: %d layers will become BitLinear", t0, len(names))
        if t0 > 0:
            self._tracker = _SpikeTracker(t0, self.spike_window, self.recovery_smoothing)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume: check that a restored quant state is the one this callback would have produced."""
        state = getattr(pl_module, "quant_state", None)
        if not self._switched(pl_module) or self.switch_step is None:
            return
        mine = {**_BITLINEAR_DEFAULTS, **self.options}
        if state.get("options") != mine:
            raise ValueError(
                f"the checkpoint's quant options {state.get('options')} differ from this run's quant config {mine}"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wrappers = getattr(pl_module, "lr_wrappers", None)
        if self._lr_wrap is not None and isinstance(wrappers, list) and self._lr_wrap in wrappers:
            wrappers.remove(self._lr_wrap)

    # ------------------------------------------------------------------------------------------ the switch
    @staticmethod
    def _switched(pl_module: L.LightningModule) -> bool:
        state = getattr(pl_module, "quant_state", None)
        return isinstance(state, dict) and state.get("kind") == "bitlinear"

    @staticmethod
    def _converted_options(root: nn.Module, names: list[str]) -> dict[str, Any]:
        return dict(root.get_submodule(names[0]).options())

    def _switch(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        root = model_root(pl_module)
        names = to_bitlinear(root, include=self.include, exclude=self.exclude, **self.options)
        if self.optimizer_state == "reset":
            params = {id(p) for name in names for p in root.get_submodule(name).parameters(recurse=False)}
            for optimizer in trainer.optimizers:
                for p in [p for p in optimizer.state if id(p) in params]:
                    del optimizer.state[p]  # AdamW builds a fresh state (step 0, zero moments) at the next step
        lam = self.strength(step)
        pl_module.quant_state = bitlinear_state(names, self._converted_options(root, names), lam, lam)
        set_strength(root, weight=lam, act=lam)
        self._lambda = lam
        if step != self.switch_step:
            log.warning("precision transition planned at step %s happens at step %d", self.switch_step, step)
        log.info(
            "precision transition at step %d: %d layers -> BitLinear (optimizer state %s, phase-in %s)",
            step, len(names), self.optimizer_state, self.phase_in,
        )

    def _set_strength(self, pl_module: L.LightningModule, step: int) -> None:
        lam = self.strength(step)
        if lam == self._lambda:
            return
        set_strength(model_root(pl_module), weight=lam, act=lam)  # fills buffers in place: no recompilation
        pl_module.quant_state["strength"] = {"weight": lam, "act": lam}
        self._lambda = lam

    # ------------------------------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._step_at_start = step
        t0 = self.switch_step
        if t0 is not None and step >= t0:
            if not self._switched(pl_module):
                self._switch(trainer, pl_module, step)
            self._set_strength(pl_module, step)
        # lambda of this batch's forward, at the step Lightning logs this batch's train/loss (and at the switch)
        n = trainer.log_every_n_steps
        if step != self._lambda_logged_step and ((n > 0 and (step + 1) % n == 0) or step == t0):
            log_scalars(trainer, {"quant/lambda": self.strength(step)}, step)
            self._lambda_logged_step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._step_at_start
        if self._tracker is not None:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor):
                self._tracker.add(step, loss.detach())
        if trainer.global_step == step:
            return  # accumulating gradients: the optimizer step has not happened yet
        if self._tracker is not None:
            self._tracker.end_step(step)
            n = trainer.log_every_n_steps
            if self._tracker.due(step) or (n > 0 and (step + 1) % n == 0):
                self._report(trainer, self._tracker.flush())
        if self.switch_step is not None and self._switched(pl_module):
            # the model between steps is the model of trainer.global_step (validation and checkpoints see it)
            self._set_strength(pl_module, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._tracker is not None:
            self._report(trainer, self._tracker.flush(final=True))
            if self._tracker.recovery is None and self._tracker.post:
                log.info("transition: the smoothed training loss did not recover to its pre-switch level")

    def _report(self, trainer: L.Trainer, events: list[tuple[str, float, int]]) -> None:
        for name, value, step in events:
            log.info("%s = %g (step %d)", name, value, step)
            log_scalars(trainer, {name: value}, step)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "tracker": self._tracker.state_dict() if self._tracker else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("switch_step")
        if saved != self.switch_step:
            raise ValueError(
                f"the checkpoint's transition step {saved} differs from this run's ({self.switch_step}); "
                "resume with the same transition.at and trainer.max_steps"
            )
        if self._tracker is not None and state_dict.get("tracker") is not None:
            self._tracker.load_state_dict(state_dict["tracker"])


class _RewarmupWrap:
    """An LR-schedule wrapper (for ``LanguageModel.lr_wrappers``): the bolt-on re-warmup after the switch."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps

    def __call__(self, base: Callable[[int], float]) -> Callable[[int], float]:
        return rewarmup(base, self.start, self.steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RewarmupWrap) and (other.start, other.steps) == (self.start, self.steps)

    def __hash__(self) -> int:
        return hash((self.start, self.steps))


class _SpikeTracker:
    """Loss spike and recovery around the switch from per-step training losses, with few host syncs.

    Losses stay on the device until :meth:`flush` (every logging interval and at the end of the spike window) turns
    the pending ones into floats in one transfer. Tracks steps t0 - K .. t0 + K - 1 for the spike and goes on until
    the smoothed loss has recovered.
    """

    def __init__(self, t0: int, window: int, beta: float) -> None:
        self.t0, self.window, self.beta = t0, window, beta
        self.first = max(0, t0 - window)
        self.pending: list[tuple[int, torch.Tensor | float]] = []
        self.pre: list[float] = []
        self.post: list[float] = []
        self.ema: float | None = None
        self.spike_logged = False
        self.recovery: int | None = None
        self._acc: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return not (self.spike_logged and self.recovery is not None)

    def add(self, step: int, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (Lightning divides it by the accumulation count, so the sum is the mean)."""
        if step >= self.first and self.active:
            self._acc = loss if self._acc is None else self._acc + loss

    def end_step(self, step: int) -> None:
        if self._acc is not None:
            self.pending.append((step, self._acc))
            self._acc = None

    def due(self, step: int) -> bool:
        return step == self.t0 + self.window - 1 and not self.spike_logged

    def flush(self, final: bool = False) -> list[tuple[str, float, int]]:
        """Process the pending losses in step order; returns the metrics that became known as (name, value, step)."""
        if not self.pending and not final:
            return []
        tensors = [v for _, v in self.pending if isinstance(v, torch.Tensor)]
        host = iter(torch.stack(tensors).float().tolist()) if tensors else iter(())
        values = [(s, next(host) if isinstance(v, torch.Tensor) else v) for s, v in self.pending]
        self.pending = []
        events = []
        for step, value in values:
            if step < self.t0:
                self.pre = (self.pre + [value])[-self.window:]
            elif len(self.post) < self.window:
                self.post.append(value)
            self.ema = value if self.ema is None else self.beta * self.ema + (1 - self.beta) * value
            if step < self.t0 or not self.pre:
                continue
            level = sum(self.pre) / len(self.pre)
            if len(self.post) == self.window and not self.spike_logged and step == self.t0 + self.window - 1:
                events.append(("transition/spike", max(self.post) - level, step))
                self.spike_logged = True
            if self.recovery is None and self.ema <= level:
                self.recovery = step - self.t0
                events.append(("transition/recovery_steps", float(self.recovery), step))
        if final and not self.spike_logged and self.post and self.pre:
            level = sum(self.pre) / len(self.pre)
            events.append(("transition/spike", max(self.post) - level, self.t0 + len(self.post) - 1))
            self.spike_logged = True
        return events

    def state_dict(self) -> dict[str, Any]:
        self.pending = [(s, float(v)) for s, v in self.pending]  # a host sync, at checkpoint time only
        return {
            "pending": list(self.pending),
            "pre": list(self.pre),
            "post": list(self.post),
            "ema": self.ema,
            "spike_logged": self.spike_logged,
            "recovery": self.recovery,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [(int(s), float(v)) for s, v in state["pending"]]
        self.pre, self.post = list(state["pre"]), list(state["post"])
        self.ema, self.spike_logged, self.recovery = state["ema"], state["spike_logged"], state["recovery"]
        if self.ema is not None and not math.isfinite(self.ema):
            self.ema = None
