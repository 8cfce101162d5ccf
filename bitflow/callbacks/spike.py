"""Loss spike and recovery around a precision switch, from per-step training losses with few host syncs."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SpikeTracker"]


class SpikeTracker:
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
        """Close ``step``: its summed micro-batch losses become one pending value."""
        if self._acc is not None:
            self.pending.append((step, self._acc))
            self._acc = None

    def due(self, step: int) -> bool:
        """Whether ``step`` ends the spike window (flush then, so the spike is logged at that step)."""
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
        """The tracker as plain data (for the callback's checkpoint state)."""
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
        """Continue from :meth:`state_dict`'s output."""
        self.pending = [(int(s), float(v)) for s, v in state["pending"]]
        self.pre, self.post = list(state["pre"]), list(state["post"])
        self.ema, self.spike_logged, self.recovery = state["ema"], state["spike_logged"], state["recovery"]
        if self.ema is not None and not math.isfinite(self.ema):
            self.ema = None
