"""Learning-rate and quantization phase-in schedules as small pure functions of the step.

An LR schedule returns a multiplier of the peak LR; a phase-in schedule returns the quantization strength
lambda in [0, 1]. Being pure functions of the global step, both resume exactly from a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

LR_SCHEDULES = ("cosine", "constant", "wsd", "linear")
PHASE_IN_SCHEDULES = ("none", "linear", "tanh", "sigmoid", "exp", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """LR multiplier of the peak LR at a step.

    - ``cosine``: linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``.
    - ``linear``: linear warmup, then linear decay to ``min_lr_ratio``.
    - ``constant``: linear warmup, then 1.
    - ``wsd`` (warmup-stable-decay, arXiv 2404.06395): warmup, constant, then a linear decay to ``min_lr_ratio``
      over the last ``decay_fraction`` of training.
    Warmup goes (t + 1) / warmup_steps so the very first step already trains.

    Spectra's TriLM tricks (Kaushal et al., arXiv 2407.12327), off by default: ``lr_drop_at`` (a fraction of
    ``total_steps`` in (0, 1)) multiplies the LR by ``lr_drop_factor`` (0.5: the peak LR halved) from step
    ``round(lr_drop_at * total_steps)`` on; ``weight_decay_off_at`` (a fraction) sets weight decay to 0 from step
    ``round(weight_decay_off_at * total_steps)`` on (:meth:`weight_decay_factor`, applied by the LightningModule
    to every param group before each optimizer step). Both are pure functions of the step, so resumes are exact.
    """

    name: str = "cosine"
    total_steps: int = 1000
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    lr_drop_at: float | None = None
    lr_drop_factor: float = 0.5
    weight_decay_off_at: float | None = None

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.name!r}; allowed: {', '.join(LR_SCHEDULES)}")
        if self.total_steps <= 0:
            raise ValueError(f"LR schedule total_steps must be > 0, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        for key in ("lr_drop_at", "weight_decay_off_at"):
            at = getattr(self, key)
            if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not 0.0 < at < 1.0):
                raise ValueError(f"{key}={at!r} must be null or a fraction of the run in (0, 1)")
        if not 0.0 < self.lr_drop_factor <= 1.0:
            raise ValueError(f"lr_drop_factor={self.lr_drop_factor} must be in (0, 1]")

    def _step_of(self, fraction: float | None) -> int | None:
        return None if fraction is None else round(fraction * self.total_steps)

    @property
    def lr_drop_step(self) -> int | None:
        """The first step with the dropped LR (``None``: no drop)."""
        return self._step_of(self.lr_drop_at)

    @property
    def weight_decay_off_step(self) -> int | None:
        """The first step without weight decay (``None``: weight decay throughout)."""
        return self._step_of(self.weight_decay_off_at)

    def weight_decay_factor(self, step: int) -> float:
        """Multiplier of each param group's configured weight decay at ``step``: 1, then 0 from
        :attr:`weight_decay_off_step` on."""
        off = self.weight_decay_off_step
        return 0.0 if off is not None and step >= off else 1.0

    def __call__(self, step: int) -> float:
        drop = self.lr_drop_step
        if drop is not None and step >= drop:
            return self.lr_drop_factor * self._base(step)
        return self._base(step)

    def _base(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        lo = self.min_lr_ratio
        if self.name == "wsd":
            decay_start = self.total_steps - int(self.decay_fraction * self.total_steps)
            if step < decay_start:
                return 1.0
            u = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
            return 1.0 - (1.0 - lo) * u
        u = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.name == "linear":
            return 1.0 - (1.0 - lo) * u
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * u))


def rewarmup(base: Callable[[int], float], start: int, steps: int) -> Callable[[int], float]:
    """The "bolt-on" re-warmup of Nielsen et al. (arXiv 2502.11895) after an optimizer reset at ``start``.

    lr(t) = base(t) for t < start; base(start + steps) * (t - start) / steps for start <= t < start + steps;
    base(t) afterwards. LR is 0 at the switch and meets the original schedule at start + steps.
    """
    if steps < 0:
        raise ValueError(f"re-warmup steps must be >= 0, got {steps}")

    def schedule(step: int) -> float:
        if steps == 0 or not start <= step < start + steps:
            return base(step)
        return base(start + steps) * (step - start) / steps

    return schedule


def phase_in(name: str, step: int, start: int, steps: int) -> float:
    """Quantization strength lambda at ``step`` for a phase-in that begins at ``start`` and lasts ``steps``.

    With u = (step - start) / steps: ``tanh`` is the paper's lambda = tanh(2.5 u) (arXiv 2502.11895; 0, 0.5546,
    0.8483, 0.9540 at u = 0, 1/4, 1/2, 3/4); ``linear`` u; ``cosine`` (1 - cos(pi u)) / 2; ``sigmoid`` a logistic
    curve 1 / (1 + exp(-10 (u - 1/2))) rescaled to run from 0 to 1; ``exp`` (1 - exp(-5 u)) / (1 - exp(-5)).
    Before ``start`` lambda is 0; from ``start + steps`` on it is exactly 1; ``none`` is 1 from ``start`` on.
    """
    if name not in PHASE_IN_SCHEDULES:
        raise ValueError(f"unknown phase-in schedule {name!r}; allowed: {', '.join(PHASE_IN_SCHEDULES)}")
    if step < start:
        return 0.0
    if name == "none" or steps <= 0 or step >= start + steps:
        return 1.0
    u = (step - start) / steps
    if name == "linear":
        return u
    if name == "tanh":
        return math.tanh(2.5 * u)
    if name == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    if name == "sigmoid":
        lo, hi = 1 / (1 + math.exp(5.0)), 1 / (1 + math.exp(-5.0))
        return (1 / (1 + math.exp(-10.0 * (u - 0.5))) - lo) / (hi - lo)
    return (1.0 - math.exp(-5.0 * u)) / (1.0 - math.exp(-5.0))


AT_HELP = (
    "allowed: an int step >= 0 (0 = quantized from the first step), a float fraction of trainer.max_steps in "
    "(0, 1), or null (never switch)"
)


def resolve_switch_step(at: int | float | None, max_steps: int | None, key: str = "transition.at") -> int | None:
    """The switch step t0 of a precision transition from its config value ``at`` (the one resolver that the
    :class:`~bitflow.callbacks.PrecisionTransition` callback and ``bitflow-report`` share).

    ``None`` = never; ``0`` (or ``0.0``) = from the first step; an int = that step, which must be < ``max_steps``;
    a float in (0, 1) = ``round(at * max_steps)``, which must fall inside the run (1 .. max_steps - 1).
    ``max_steps`` may be None (or <= 0) when unknown: then only the type and range of ``at`` are checked and a
    fraction resolves to None. Raises ``ValueError`` naming ``key``, the value and what is allowed.
    """
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise ValueError(f"{key}={at!r} is not allowed; {AT_HELP}")
    known = max_steps is not None and max_steps > 0
    if isinstance(at, float) and at != 0.0:
        if not 0.0 < at < 1.0:
            raise ValueError(f"{key}={at!r} is outside (0, 1); {AT_HELP}")
        if not known:
            return None
        step = round(at * max_steps)
        if not 0 < step < max_steps:
            raise ValueError(
                f"{key}={at} of trainer.max_steps={max_steps} is step {step}, which is not inside the run "
                f"(1..{max_steps - 1}); use {key}=0 to quantize from the first step, or a larger trainer.max_steps"
            )
        return step
    step = int(at)
    if step < 0:
        raise ValueError(f"{key}={at!r} is negative; {AT_HELP}")
    if known and step >= max_steps:
        raise ValueError(
            f"{key}={at} is past the end of training (trainer.max_steps={max_steps}); the switch step must be "
            f"< trainer.max_steps"
        )
    return step
