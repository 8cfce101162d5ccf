"""PrecisionTransition: when a run's quantization recipe converts the model (16-bit, then quantized).

The LightningModule owns *what* the model is quantized to (its recipe, ``quant`` config group,
:mod:`bitflow.quant.recipes`); this callback owns *when* (``transition`` config group) and drives any recipe.
Continual quantization-aware pre-training (Nielsen, Galke, Schneider-Kamp, arXiv 2502.11895): at step t0 the
recipe converts the targeted layers (BitLinear reuses the very same Parameters as latent weights; DQT replaces them
by int8 codes). Around that switch:

* optimizer state: ``keep`` the AdamW moments of the converted weights, or ``reset`` them (the recipe's
  ``adopt_optimizer``);
* LR re-warmup ("bolt-on" warmup of the authors' code, with ``reset``): LR 0 at t0, rising linearly over t_w steps
  to the schedule's value at t0 + t_w (:func:`bitflow.schedules.rewarmup`);
* phase-in of the quantization strength (recipes that have one, e.g. BitLinear),
  ``q_lambda(x) = x + lambda (Q(x) - x)`` with e.g. lambda(t) = tanh(2.5 (t - t0) / T_w) for 0 <= t - t0 < T_w
  and exactly 1 afterwards (:func:`bitflow.schedules.phase_in`);
* ``transition/spike`` and ``transition/recovery_steps`` of the training loss, and ``quant/switch_step`` (value =
  t0, logged once, at step t0: what ``bitflow-report`` reads).

When: the conversion happens at the start of the training batch whose ``trainer.global_step == t0``, so step t0's
forward is already quantized (t0 = 0: at ``setup``, before the optimizer is built). A checkpoint records the
conversion (the recipe's state, ``LanguageModel.quant_state``); resuming from it rebuilds the layers before the
weights load and this callback sees that the switch is done. LR and lambda are pure functions of the global step,
so a resumed run continues exactly as the uninterrupted one.

Between training steps the model is in the state of ``trainer.global_step``: its lambda is
``lambda(global_step)`` (what validation and checkpoints see).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from bitflow.callbacks.spike import SpikeTracker
from bitflow.config import NEEDS_QUANT, check_int, quant_and_transition
from bitflow.models import model_root
from bitflow.quant.recipe import OPTIMIZER_MODES, QuantRecipe, check_mode
from bitflow.quant.recipes import recipe_from_config
from bitflow.schedules import PHASE_IN_SCHEDULES, phase_in, resolve_switch_step, rewarmup

__all__ = ["OPTIMIZER_STATES", "PrecisionTransition", "build_transition", "log_scalars", "model_root"]

log = logging.getLogger(__name__)

OPTIMIZER_STATES = OPTIMIZER_MODES


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Write scalars straight to every logger at ``step`` (loggers write on rank 0 only).

    ``LightningModule.log`` would drop values logged between ``log_every_n_steps`` intervals; these are one-off or
    already sparse values, written at exactly the step they describe.
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


class PrecisionTransition(Callback):
    """Convert the model with its quantization recipe at step t0; see the module docstring.

    Args:
        at: the switch step t0: an int step (``0`` = quantized from the first step), a float in (0, 1) = that
            fraction of ``trainer.max_steps`` (rounded to the nearest step), or ``None`` = never switch (the 16-bit
            baseline through the same code). :func:`bitflow.schedules.resolve_switch_step` resolves it.
        optimizer_state: ``"keep"`` the AdamW state of the converted weights, or ``"reset"`` it (AdamW creates
            fresh state for them at the next step; other Parameters are untouched).
        lr_rewarmup_steps: t_w of the bolt-on LR re-warmup after a ``reset`` (0 = none). Ignored with ``keep`` (so
            one config can sweep keep/reset). Needs a module with ``lr_wrappers`` (bitflow's LanguageModel).
        phase_in: the lambda schedule, one of ``none, linear, tanh, sigmoid, exp, cosine`` (``none``: 1 at once);
            anything but ``none`` needs a recipe with a phase-in strength (``bitlinear``; not ``dqt``).
        phase_in_steps: T_w, the phase-in length in steps (> 0 unless ``phase_in`` is ``none``).
        quant: a ``quant`` config (``recipe`` plus its options; ``recipe`` defaults to ``bitlinear``) for a
            LightningModule that has no recipe of its own. bitflow's LanguageModel owns its recipe (the ``quant``
            config group): leave this ``None`` then.
        spike_window: K: ``transition/spike`` = the highest training loss in the K steps from t0 minus the mean
            over the K steps before t0; logged once, at step t0 + K - 1 (or at the end of a shorter run).
        recovery_smoothing: beta of the exponential moving average of the training loss used by
            ``transition/recovery_steps``: the number of steps from t0 until the smoothed loss is back at or below
            the pre-switch level (the mean of the K steps before t0); 0 = it never rose above it. Logged at the step
            where that happens; not logged if it does not happen within the run.

    Both spike metrics use rank 0's training loss (as ``train/loss`` is logged); they need t0 > 0. At the logging
    steps the recipe's own metrics (e.g. DQT's ``quant/flip_rate``, ``dqt/level_share/*``) are logged too.
    Bad values raise ``ValueError`` naming ``transition.<key>`` here or, for checks that need ``max_steps`` or the
    recipe, in :meth:`check` (called by :func:`build_transition` before training and again in ``setup``).
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
        resolve_switch_step(at, None)  # type and range; the step itself needs max_steps
        check_mode(optimizer_state)
        if phase_in not in PHASE_IN_SCHEDULES:
            raise ValueError(
                f"transition.phase_in={phase_in!r} is not allowed; allowed: {', '.join(PHASE_IN_SCHEDULES)}"
            )
        check_int("transition.lr_rewarmup_steps", lr_rewarmup_steps, 0)
        check_int("transition.phase_in_steps", phase_in_steps, 0)
        if phase_in != "none" and phase_in_steps == 0:
            raise ValueError(
                f"transition.phase_in={phase_in!r} needs transition.phase_in_steps > 0 (got 0); or use "
                "transition.phase_in=none"
            )
        check_int("transition.spike_window", spike_window, 1)
        if isinstance(recovery_smoothing, bool) or not isinstance(recovery_smoothing, (int, float)) or not (
            0.0 <= recovery_smoothing < 1.0
        ):
            raise ValueError(
                f"transition.recovery_smoothing={recovery_smoothing!r} is not allowed; allowed: a float in [0, 1)"
            )
        self.at = at
        self.optimizer_state = optimizer_state
        self.lr_rewarmup_steps = lr_rewarmup_steps
        self.phase_in = phase_in
        self.phase_in_steps = phase_in_steps
        self.quant = recipe_from_config({"recipe": "bitlinear", **quant}) if quant is not None else None
        if quant is not None and self.quant is None:
            raise ValueError("PrecisionTransition(quant=...) needs a quantization to switch to; quant.recipe=none is 16-bit")
        if self.quant is not None:
            self._check_phase_in(self.quant)
        self.spike_window = spike_window
        self.recovery_smoothing = float(recovery_smoothing)

        self.switch_step: int | None = None  # t0, resolved in setup()
        self.recipe: QuantRecipe | None = None  # the recipe this callback drives, found in setup()
        self._lambda: float | None = None  # the strength last written into the model
        self._step_at_start = -1
        self._lambda_logged_step = -1
        self._switch_logged = False
        # whether the model is converted: read off the model at setup and after a checkpoint restores it (not per
        # step: that walks every module), then set by the switch
        self._converted = False
        self._lr_wrap: Callable[[Callable[[int], float]], Callable[[int], float]] | None = None
        self._tracker: SpikeTracker | None = None

    # ------------------------------------------------------------------------------------------ checks
    def _check_phase_in(self, recipe: QuantRecipe) -> None:
        if self.phase_in != "none" and not recipe.supports_phase_in:
            raise ValueError(
                f"transition.phase_in={self.phase_in!r} needs a recipe with a quantization strength, but "
                f"quant.recipe={recipe.name!r} has none; use transition.phase_in=none"
            )

    def check(self, recipe: QuantRecipe | None, max_steps: int | None) -> int | None:
        """Check this transition against the recipe it drives and the run length; returns the switch step t0."""
        if recipe is None:
            raise ValueError(NEEDS_QUANT)
        self._check_phase_in(recipe)
        return resolve_switch_step(self.at, max_steps)

    def strength(self, step: int) -> float:
        """lambda at ``step``: 0 before the switch (and when it never happens), then the phase-in schedule."""
        if self.switch_step is None:
            return 0.0
        return phase_in(self.phase_in, step, self.switch_step, self.phase_in_steps)

    def _find_recipe(self, pl_module: L.LightningModule) -> QuantRecipe:
        """The module's own recipe (``quant_recipe``), or this callback's ``quant``, which a module with an empty
        ``quant_recipe`` slot adopts (so its optimizer and checkpoints use it)."""
        owned = getattr(pl_module, "quant_recipe", None)
        if self.quant is None:
            if owned is None:
                raise ValueError(
                    f"{type(pl_module).__name__} has no quantization recipe (quant=none) for PrecisionTransition to "
                    "apply; pick a quant option (e.g. quant=ternary) or pass PrecisionTransition(quant=...)"
                )
            return owned
        if owned is not None and owned != self.quant:
            raise ValueError(f"PrecisionTransition(quant=...) {self.quant} differs from the module's recipe {owned}")
        if hasattr(pl_module, "quant_recipe"):
            pl_module.quant_recipe = self.quant
        return self.quant

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve t0, plan the layers (pure: the model is not touched), register the LR re-warmup; at t0 = 0
        convert now, before the optimizer is built."""
        if stage != "fit":
            return
        self.recipe = recipe = self._find_recipe(pl_module)
        self.switch_step = t0 = self.check(recipe, trainer.max_steps)
        self._lambda, self._switch_logged = None, False
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
                    "transition.lr_rewarmup_steps needs a LightningModule with an `lr_wrappers` list whose LR "
                    f"schedule applies them (bitflow.lm.LanguageModel); {type(pl_module).__name__} has none"
                )
            self._lr_wrap = _RewarmupWrap(t0, self.lr_rewarmup_steps)
            if self._lr_wrap not in pl_module.lr_wrappers:
                pl_module.lr_wrappers.append(self._lr_wrap)
        if t0 > 0:
            self._tracker = SpikeTracker(t0, self.spike_window, self.recovery_smoothing)
            _check_ddp(trainer, recipe)
        root = model_root(pl_module)
        self._converted = bool(recipe.converted(root))
        if self._converted:
            return  # fitting again a module that already switched
        if t0 == 0:
            self._switch(trainer, pl_module, 0)
        else:
            names = recipe.plan(root)
            log.info("precision transition at step %d: %d layers will be converted by %s", t0, len(names), recipe.name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recipe is not None:  # a resumed checkpoint may have converted the model after setup()
            self._converted = bool(self.recipe.converted(model_root(pl_module)))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wrappers = getattr(pl_module, "lr_wrappers", None)
        if self._lr_wrap is not None and isinstance(wrappers, list) and self._lr_wrap in wrappers:
            wrappers.remove(self._lr_wrap)

    # ------------------------------------------------------------------------------------------ the switch
    def _switch(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        recipe, root = self.recipe, model_root(pl_module)
        conversion = recipe.convert(root)
        self._converted = True
        for optimizer in trainer.optimizers:  # none yet when t0 = 0 (the recipe builds it for the converted model)
            recipe.adopt_optimizer(optimizer, root, conversion, self.optimizer_state)
        self._lambda = None
        self._set_strength(pl_module, step)
        if step != self.switch_step:
            log.warning("precision transition planned at step %s happens at step %d", self.switch_step, step)
        log.info(
            "precision transition at step %d: %d layers converted by %s (optimizer state %s, phase-in %s)",
            step, len(conversion.names), recipe.name, self.optimizer_state, self.phase_in,
        )

    def _set_strength(self, pl_module: L.LightningModule, step: int) -> None:
        if not self.recipe.supports_phase_in:
            return
        lam = self.strength(step)
        if lam != self._lambda:
            self.recipe.set_strength(model_root(pl_module), lam)  # in place: a compiled model is not recompiled
            self._lambda = lam

    # ------------------------------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._step_at_start = step
        t0 = self.switch_step
        if t0 is not None and step >= t0:
            if not self._converted:
                self._switch(trainer, pl_module, step)
            self._set_strength(pl_module, step)
        if step == t0 and not self._switch_logged:
            log_scalars(trainer, {"quant/switch_step": float(t0)}, t0)
            self._switch_logged = True
        # lambda of this batch's forward, at the step Lightning logs this batch's train/loss (and at the switch)
        n = trainer.log_every_n_steps
        if self.recipe.supports_phase_in and step != self._lambda_logged_step and (
            (n > 0 and (step + 1) % n == 0) or step == t0
        ):
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
        n = trainer.log_every_n_steps
        log_step = n > 0 and (step + 1) % n == 0
        if self._tracker is not None:
            self._tracker.end_step(step)
            if self._tracker.due(step) or log_step:
                self._report(trainer, self._tracker.flush())
        if self.switch_step is None or not self._converted:
            return
        # the model between steps is the model of trainer.global_step (validation and checkpoints see it)
        self._set_strength(pl_module, trainer.global_step)
        if log_step and trainer.is_global_zero:
            self._log_recipe_metrics(trainer, pl_module, step)

    def _log_recipe_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        metrics = self.recipe.metrics(model_root(pl_module), trainer.optimizers[0] if trainer.optimizers else None)
        if metrics:  # one host transfer for all of them
            values = torch.stack([v.detach().double().reshape(()).cpu() for v in metrics.values()]).tolist()
            log_scalars(trainer, dict(zip(metrics, values, strict=True)), step)

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


def _check_ddp(trainer: L.Trainer, recipe: QuantRecipe) -> None:
    """A mid-run switch that removes Parameters (DQT) needs DDP to tolerate Parameters without gradients."""
    if recipe.keeps_parameters or trainer.world_size == 1 or not isinstance(trainer.strategy, DDPStrategy):
        return
    if not getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
        raise ValueError(
            f"a mid-run switch to quant.recipe={recipe.name!r} under DDP removes the float weights that DDP "
            "synchronises; use trainer.strategy=ddp_find_unused_parameters_true (or transition.at=0)"
        )


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


def build_transition(cfg: DictConfig) -> PrecisionTransition | None:
    """The run's PrecisionTransition from its ``quant`` (what) and ``transition`` (when) configs, checked up front.

    ``quant=none`` without a transition: ``None`` (16-bit). ``quant=<option>`` alone: quantized from the first
    step (``at=0``). ``transition=default``: the switch at ``transition.at``. Refused with one ``ValueError``
    naming the key: what :func:`bitflow.config.quant_and_transition` refuses, a phase-in for a recipe without
    one, a switch step outside the run.
    """
    recipe, trans = quant_and_transition(cfg)
    if trans is None:
        return PrecisionTransition(at=0) if recipe is not None else None
    transition = PrecisionTransition(**trans)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    transition.check(transition.quant or recipe, max_steps)
    return transition
