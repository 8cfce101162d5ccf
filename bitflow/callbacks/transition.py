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

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from bitflow.callbacks.gap import AutoSwitchRule, QuantGap, blocks_of, gap_quantizer
from bitflow.callbacks.spike import SpikeTracker
from bitflow.config import NEEDS_QUANT, check_int, fail, quant_and_transition
from bitflow.models import gathered, is_sharded, model_root
from bitflow.quant.recipe import OPTIMIZER_MODES, Conversion, QuantRecipe, check_mode
from bitflow.quant.recipes import recipe_from_config
from bitflow.schedules import PHASE_IN_SCHEDULES, phase_in, resolve_switch_step, rewarmup

__all__ = [
    "OPTIMIZER_STATES", "PROGRESSIVE_ORDERS", "SCHEDULES", "PrecisionTransition", "build_transition", "log_scalars",
    "model_root",
]

log = logging.getLogger(__name__)

OPTIMIZER_STATES = OPTIMIZER_MODES
SCHEDULES = ("all", "progressive")
PROGRESSIVE_ORDERS = ("bottom_up", "top_down", "sensitivity")
AUTO = "auto"
_UNDECIDED = 1 << 62  # the spike tracker's t0 while at: auto has not decided


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

        gap_every: measure the online quantization gap every this many steps of 16-bit training (0 = off; see
            :mod:`bitflow.callbacks.gap`): ``quant/gap``, ``quant/gap_loss_16bit``, ``quant/gap_loss_quantized``.
        gap_windows: how many validation windows (evenly spaced over the validation set) the gap is measured on.
        gap_quant: the gap's quantizer: ``recipe`` (the run's), ``absmean``, ``absmedian``, ``int2`` .. ``int8``.
        gap_layers_every: per-layer sensitivity ``quant/gap_layer/<name>`` every this many gap measurements (0 = off).
        min_at, max_at: with ``at: auto``, the earliest and latest switch step (int step or fraction, as ``at``;
            defaults 0.1 and 0.9 of the run).
        auto_rule, auto_smoothing, auto_patience, auto_min_delta, auto_threshold: the ``at: auto`` rule
            (:class:`~bitflow.callbacks.gap.AutoSwitchRule`).
        schedule: ``all`` (every layer switches at t0) or ``progressive``: transformer blocks switch in turn, the
            first at t0 and the last ``progressive_steps`` later (evenly spaced), each with its own phase-in
            (``quant/lambda/<block>``; ``quant/layers_switched`` = the fraction of layers with lambda > 0). Needs a
            recipe with a strength: all layers are converted at t0, the waiting blocks at lambda 0 (exactly 16-bit).
        progressive_order: ``bottom_up``, ``top_down`` or ``sensitivity`` (least fragile block first: the summed
            per-layer gap, measured at t0).
        progressive_steps: the window of the progressive schedule in steps (> 0 with ``schedule: progressive``).

    ``at: auto`` (needs ``gap_every``): the switch happens at the first gap measurement at or after ``min_at`` where
    the rule fires (or at ``max_at``); the step is logged as ``quant/switch_step`` and written into the run's
    ``.hydra/config.yaml`` as ``transition.chosen_at``. The rule's measurements are in the checkpoint.

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
        gap_every: int = 0,
        gap_windows: int = 8,
        gap_quant: str = "recipe",
        gap_layers_every: int = 10,
        min_at: int | float | None = None,
        max_at: int | float | None = None,
        auto_rule: str = "plateau",
        auto_smoothing: int = 3,
        auto_patience: int = 3,
        auto_min_delta: float = 0.0,
        auto_threshold: float = 0.1,
        schedule: str = "all",
        progressive_order: str = "bottom_up",
        progressive_steps: int = 0,
    ) -> None:
        check_int("transition.gap_every", gap_every, 0)
        check_int("transition.gap_windows", gap_windows, 1)
        check_int("transition.gap_layers_every", gap_layers_every, 0)
        self.auto = at == AUTO
        if self.auto and gap_every == 0:
            fail("transition.at", at, "auto only with transition.gap_every > 0 (the rule reads the gap)")
        if not self.auto:
            resolve_switch_step(at, None)  # type and range; the step itself needs max_steps
        for key, value in (("transition.min_at", min_at), ("transition.max_at", max_at)):
            resolve_switch_step(value, None, key=key)
        if schedule not in SCHEDULES:
            fail("transition.schedule", schedule, ", ".join(SCHEDULES))
        if progressive_order not in PROGRESSIVE_ORDERS:
            fail("transition.progressive_order", progressive_order, ", ".join(PROGRESSIVE_ORDERS))
        check_int("transition.progressive_steps", progressive_steps, 0)
        if schedule == "progressive" and progressive_steps == 0:
            fail("transition.progressive_steps", 0, "an integer > 0 with transition.schedule=progressive")
        self.gap_every, self.gap_windows, self.gap_layers_every = gap_every, gap_windows, gap_layers_every
        self.gap_quant = gap_quant
        if gap_quant != "recipe":
            gap_quantizer(gap_quant, None)  # the option, checked now (recipe: in check, which knows the recipe)
        self.min_at, self.max_at = min_at, max_at
        self.rule = AutoSwitchRule(auto_rule, auto_smoothing, auto_patience, auto_min_delta, auto_threshold)
        self.schedule, self.progressive_order, self.progressive_steps = schedule, progressive_order, progressive_steps
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
        self._gap: QuantGap | None = None  # built at train start (needs the model on its device and the data)
        self._gap_count = 0  # gap measurements so far (the per-layer ones are every gap_layers_every-th)
        self._auto_bounds: tuple[int, int] | None = None  # (min_at, max_at) as steps, with at: auto
        self._blocks: list[list[str]] = []  # progressive: the layer names of each block, in switching order
        self._block_lambda: tuple[float, ...] | None = None
        self.results: dict[str, float] = {}  # the last value of each spike/recovery/gap metric (for dashboards)
        self._restored_choice = False  # at: auto resumed after its choice: set the switch up at train start

    # ------------------------------------------------------------------------------------------ checks
    def _check_phase_in(self, recipe: QuantRecipe) -> None:
        if self.phase_in != "none" and not recipe.supports_phase_in:
            raise ValueError(
                f"transition.phase_in={self.phase_in!r} needs a recipe with a quantization strength, but "
                f"quant.recipe={recipe.name!r} has none; use transition.phase_in=none"
            )

    def check(self, recipe: QuantRecipe | None, max_steps: int | None) -> int | None:
        """Check this transition against the recipe it drives and the run length; returns the switch step t0
        (None with ``at: auto``: the run decides it)."""
        if recipe is None:
            raise ValueError(NEEDS_QUANT)
        self._check_phase_in(recipe)
        if self.schedule == "progressive" and not recipe.supports_phase_in:
            fail("transition.schedule", self.schedule, f"all with quant.recipe={recipe.name} (it has no strength)")
        if self.gap_every or self.progressive_order == "sensitivity":
            gap_quantizer(self.gap_quant, recipe)
        if not self.auto:
            return resolve_switch_step(self.at, max_steps)
        lo = resolve_switch_step(0.1 if self.min_at is None else self.min_at, max_steps, key="transition.min_at")
        hi = resolve_switch_step(0.9 if self.max_at is None else self.max_at, max_steps, key="transition.max_at")
        if lo is not None and hi is not None:
            if hi < lo:
                fail("transition.max_at", self.max_at, f"a step >= transition.min_at (step {lo})")
            self._auto_bounds = (lo, hi)
        return None

    def block_starts(self) -> list[int]:
        """Progressive: the switch step of each block, in switching order (the first at t0)."""
        n, t0 = len(self._blocks), self.switch_step
        if n <= 1:
            return [t0] * n
        return [t0 + round(k * self.progressive_steps / (n - 1)) for k in range(n)]

    def block_strengths(self, step: int) -> tuple[float, ...]:
        """Progressive: lambda of each block at ``step``."""
        return tuple(phase_in(self.phase_in, step, t, self.phase_in_steps) for t in self.block_starts())

    def strength(self, step: int) -> float:
        """lambda at ``step``: 0 before the switch (and when it never happens), then the phase-in schedule
        (progressive: the mean over the converted layers)."""
        if self.switch_step is None:
            return 0.0
        if self.schedule == "progressive" and self._blocks:
            sizes = [len(b) for b in self._blocks]
            lams = self.block_strengths(step)
            return sum(n * lam for n, lam in zip(sizes, lams, strict=True)) / sum(sizes)
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
        self._lambda, self._switch_logged, self._block_lambda = None, False, None
        if self.auto:
            if self._auto_bounds is None:
                fail("transition.at", self.at, "auto only with trainer.max_steps > 0 (min_at/max_at need the run length)")
            self._tracker = SpikeTracker(_UNDECIDED, self.spike_window, self.recovery_smoothing)
            self._tracker.first = 0  # keep the losses before the (not yet known) switch
            self._converted = bool(recipe.converted(model_root(pl_module)))
            log.info("precision transition at: auto, between steps %d and %d (%s rule on the gap)",
                     *self._auto_bounds, self.rule.rule)
            return
        if t0 is None:
            log.info("precision transition: at=None, the run stays 16-bit")
            return
        self._prepare_switch(trainer, pl_module, t0)
        root = model_root(pl_module)
        self._converted = bool(recipe.converted(root))
        if self._converted:
            return  # fitting again a module that already switched
        if t0 == 0:
            self._switch(trainer, pl_module, 0)
        else:
            names = recipe.plan(root)
            log.info("precision transition at step %d: %d layers will be converted by %s", t0, len(names), recipe.name)

    def _prepare_switch(self, trainer: L.Trainer, pl_module: L.LightningModule, t0: int) -> None:
        """What the switch step t0 sets up: the phase-in warning, the LR re-warmup, the spike tracker."""
        recipe = self.recipe
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
            if self._tracker is not None and self._tracker.t0 == _UNDECIDED:  # at: auto, decided now
                self._tracker.t0 = t0
            else:
                self._tracker = SpikeTracker(t0, self.spike_window, self.recovery_smoothing)
            _check_ddp(trainer, recipe)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recipe is None:
            return
        root = model_root(pl_module)
        self._converted = bool(self.recipe.converted(root))  # a resumed checkpoint may have converted the model
        if self._restored_choice:
            self._restored_choice = False
            self._prepare_switch(trainer, pl_module, self.switch_step)
        if (self.gap_every or self.progressive_order == "sensitivity") and self._gap is None:
            layers = [n for n in self.recipe.plan(root)] if not self._converted else []
            if layers:
                self._gap = QuantGap(gap_quantizer(self.gap_quant, self.recipe), layers, self._windows(trainer, pl_module))

    def _windows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """``gap_windows`` validation windows, evenly spaced over the validation set, stacked on the model's device."""
        dm = getattr(trainer, "datamodule", None)
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None or len(dataset) == 0:
            raise ValueError("transition.gap_every needs validation windows (a datamodule with a val_dataset)")
        n = min(self.gap_windows, len(dataset))
        idx = sorted({round(i * (len(dataset) - 1) / max(1, n - 1)) for i in range(n)})
        return torch.stack([torch.as_tensor(dataset[i]) for i in idx]).to(pl_module.device)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wrappers = getattr(pl_module, "lr_wrappers", None)
        if self._lr_wrap is not None and isinstance(wrappers, list) and self._lr_wrap in wrappers:
            wrappers.remove(self._lr_wrap)

    # ------------------------------------------------------------------------------------------ the switch
    def _switch(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        recipe, root = self.recipe, model_root(pl_module)
        if self.schedule == "progressive" and not self._blocks:
            self._blocks = self._block_order(pl_module, recipe.plan(root))
        conversion = recipe.convert(root)
        self._converted = True
        if self.schedule == "progressive":  # the waiting blocks are handed over when their turn comes
            conversion = Conversion(list(self._blocks[0]))
        for optimizer in trainer.optimizers:  # none yet when t0 = 0 (the recipe builds it for the converted model)
            recipe.adopt_optimizer(optimizer, root, conversion, self.optimizer_state)
        self._lambda, self._block_lambda = None, None
        self._set_strength(pl_module, step)
        if step != self.switch_step:
            log.warning("precision transition planned at step %s happens at step %d", self.switch_step, step)
        log.info(
            "precision transition at step %d: %d layers converted by %s (optimizer state %s, phase-in %s%s)",
            step, len(recipe.converted(root)), recipe.name, self.optimizer_state, self.phase_in,
            f", {len(self._blocks)} blocks over {self.progressive_steps} steps" if self._blocks else "",
        )

    def _block_order(self, pl_module: L.LightningModule, layers: list[str]) -> list[list[str]]:
        """Progressive: the blocks' layer names in switching order (sensitivity: measured now, least fragile first)."""
        blocks = list(blocks_of(layers).values())
        if self.progressive_order == "top_down":
            return blocks[::-1]
        if self.progressive_order == "sensitivity":
            if self._gap is None:
                log.warning("progressive_order=sensitivity: no validation windows to measure on; bottom_up instead")
                return blocks
            with self._forward_context(pl_module):
                gaps = self._gap.measure(model_root(pl_module), per_layer=True)
            score = {tuple(b): sum(gaps[f"quant/gap_layer/{n}"] for n in b) for b in blocks}
            blocks = sorted(blocks, key=lambda b: score[tuple(b)])  # stable: ties keep the model order
            log.info("progressive order by sensitivity: %s", ", ".join(f"{b[0]} ({score[tuple(b)]:+.4f})" for b in blocks))
        return blocks

    def _set_strength(self, pl_module: L.LightningModule, step: int) -> None:
        if not self.recipe.supports_phase_in:
            return
        root = model_root(pl_module)
        if self.schedule == "progressive" and self._blocks:
            lams = self.block_strengths(step)
            old = self._block_lambda or (None,) * len(lams)
            for block, lam, was in zip(self._blocks, lams, old, strict=True):
                if lam != was:
                    for name in block:
                        self.recipe.set_strength(root.get_submodule(name), lam)
            self._block_lambda = lams
            return
        lam = self.strength(step)
        if lam != self._lambda:
            self.recipe.set_strength(root, lam)  # in place: a compiled model is not recompiled
            self._lambda = lam

    def _forward_context(self, pl_module: L.LightningModule) -> Any:
        trainer = pl_module._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ per batch
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._step_at_start = step
        if self.auto and self.switch_step is None and step >= self._auto_bounds[1]:
            self._decide(trainer, pl_module, step, "max_at")  # max_at <= 1: no batch end came before it
        t0 = self.switch_step
        if t0 is not None and step >= t0:
            if not self._converted:
                self._switch(trainer, pl_module, step)
            elif self._blocks and step in self.block_starts()[1:]:
                for k in [k for k, t in enumerate(self.block_starts()) if t == step and k > 0]:
                    for optimizer in trainer.optimizers:  # this block's turn: keep or reset its AdamW state
                        self.recipe.adopt_optimizer(
                            optimizer, model_root(pl_module), Conversion(list(self._blocks[k])), self.optimizer_state
                        )
            self._set_strength(pl_module, step)
        if step == t0 and not self._switch_logged:
            log_scalars(trainer, {"quant/switch_step": float(t0)}, t0)
            self._switch_logged = True
        # lambda of this batch's forward, at the step Lightning logs this batch's train/loss (and at the switch)
        n = trainer.log_every_n_steps
        if self.recipe.supports_phase_in and step != self._lambda_logged_step and (
            (n > 0 and (step + 1) % n == 0) or step == t0
        ):
            metrics = {"quant/lambda": self.strength(step)}
            if self._blocks:
                lams = self.block_strengths(step)
                switched = sum(len(b) for b, lam in zip(self._blocks, lams, strict=True) if lam > 0)
                metrics["quant/layers_switched"] = switched / sum(len(b) for b in self._blocks)
                metrics.update({f"quant/lambda/{b[0].rsplit('.', 2)[0] if len(b) > 1 else b[0]}": lam
                                for b, lam in zip(self._blocks, lams, strict=True)})
            log_scalars(trainer, metrics, step)
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
        self._between_steps(trainer, pl_module)
        if self.switch_step is None or not self._converted:
            return
        # the model between steps is the model of trainer.global_step (validation and checkpoints see it)
        self._set_strength(pl_module, trainer.global_step)
        if log_step and (trainer.is_global_zero or is_sharded(pl_module)):  # sharded: collectives, every rank
            self._log_recipe_metrics(trainer, pl_module, step)

    def _between_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After an optimizer step, the model of ``trainer.global_step``: the gap, and the ``at: auto`` decision."""
        g = trainer.global_step
        if self._gap is not None and self.gap_every and not self._converted and g % self.gap_every == 0:
            self._gap_count += 1
            per_layer = self.gap_layers_every > 0 and self._gap_count % self.gap_layers_every == 0
            with self._forward_context(pl_module):
                metrics = self._gap.measure(model_root(pl_module), per_layer=per_layer)
            log_scalars(trainer, metrics, g)
            self.results["quant/gap"] = metrics["quant/gap"]
            if self.auto and self.switch_step is None and self.rule.add(g, metrics["quant/gap"], self._auto_bounds[0]):
                self._decide(trainer, pl_module, g + 1, f"{self.rule.rule} rule")
        if self.auto and self.switch_step is None and g + 1 >= self._auto_bounds[1]:
            self._decide(trainer, pl_module, self._auto_bounds[1], "max_at")

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, why: str) -> None:
        """``at: auto`` chooses ``step`` (the next batch's, so its LR re-warmup applies from its first step)."""
        self.switch_step = step
        self._prepare_switch(trainer, pl_module, step)
        log.info("precision transition at: auto chose step %d (%s)", step, why)
        if trainer.is_global_zero:
            from bitflow.cli import record_choice

            record_choice("transition.chosen_at", step)

    def _log_recipe_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        metrics = self.recipe.metrics(model_root(pl_module), trainer.optimizers[0] if trainer.optimizers else None)
        if metrics:  # one host transfer for all of them
            values = torch.stack([gathered(v.detach()).double().reshape(()).cpu() for v in metrics.values()]).tolist()
            log_scalars(trainer, dict(zip(metrics, values, strict=True)), step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._tracker is not None:
            self._report(trainer, self._tracker.flush(final=True))
            if self._tracker.recovery is None and self._tracker.post:
                log.info("transition: the smoothed training loss did not recover to its pre-switch level")

    def _report(self, trainer: L.Trainer, events: list[tuple[str, float, int]]) -> None:
        for name, value, step in events:
            log.info("%s = %g (step %d)", name, value, step)
            self.results[name] = value
            log_scalars(trainer, {name: value}, step)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "switch_step": self.switch_step,
            "tracker": self._tracker.state_dict() if self._tracker else None,
            "auto": {"history": list(self.rule.history)} if self.auto else None,
            "gap_count": self._gap_count,
            "blocks": [list(b) for b in self._blocks],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("switch_step")
        self._gap_count = int(state_dict.get("gap_count") or 0)
        self._blocks = [list(b) for b in state_dict.get("blocks") or []]
        if self.auto:
            self.rule.history = [(int(s), float(g)) for s, g in (state_dict.get("auto") or {}).get("history", [])]
            if saved is not None and self.switch_step is None:
                self.switch_step = saved  # the LR re-warmup and the tracker follow at train start
                self._restored_choice = True
        elif saved != self.switch_step:
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
