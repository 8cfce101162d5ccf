"""What a run shows while it trains and when it ends (conf/callbacks/default.yaml).

- :class:`RunSummary`: tokens/s on the progress bar, one log line per validation and an end-of-run summary
  (losses, ppl, tokens/s, wall time, checkpoints, the resume and TensorBoard commands), all through logging so the
  console and ``cli.log`` both get them.
- :class:`QuietModelSummary`: stands in for Lightning's model summary table (its FLOPs column reads 0 for bitflow's
  models; ``run_training`` logs the parameter count).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelSummary, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

log = logging.getLogger("bitflow")

__all__ = ["QuietModelSummary", "RunSummary"]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


class RunSummary(Callback):
    """Progress and summary of a run, through logging (so the console and ``cli.log`` both get them).

    - tokens/s on the progress bar (``ktok/s``, thousands; not sent to the loggers), updated at logging steps; on an
      accelerator the bar refreshes every ``log_every_n_steps`` steps (each refresh is a host sync);
    - after each validation: ``step N: train loss, val loss, tokens/s`` (median since the previous validation);
    - at the end: final train/val loss, val ppl, median tokens/s, wall time, last and best checkpoints, the resume
      and ``tensorboard --logdir`` commands.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0
        self._tokens_per_sec: list[float] = []
        self._since_val = 0
        self._seen: tuple[int, float] | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()
        self._tokens_per_sec, self._since_val, self._seen = [], 0, None
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 1 and pl_module.device.type != "cpu":
            # each refresh reads every progress-bar metric (the loss) off the device: a host sync per step on an
            # accelerator unless the bar refreshes at the logging interval (on a CPU a read costs nothing)
            bar._refresh_rate = max(1, trainer.log_every_n_steps)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # lm.py measures tokens/s over the steps between logging steps, as Python numbers: nothing to sync here
        throughput = getattr(pl_module, "throughput", None)
        if throughput is None or throughput == self._seen:
            return
        self._seen = throughput
        value = throughput[1]
        self._tokens_per_sec.append(value)
        if trainer.progress_bar_callback is not None:
            pl_module.log("ktok/s", value / 1000, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def _median_since(self, start: int) -> float | None:
        recent = self._tokens_per_sec[start:]
        return statistics.median(recent) if recent else None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        log.info(
            "step %d: train loss %s, val loss %s, %s tokens/s",
            trainer.global_step, _fmt(_metric(m, "train/loss")), _fmt(_metric(m, "val/loss")),
            _fmt(self._median_since(self._since_val), ",.0f"),
        )
        self._since_val = len(self._tokens_per_sec)

    def summary_lines(self, trainer: Any) -> list[str]:
        """The end-of-run summary, one string per line."""
        m = trainer.callback_metrics
        wall = timedelta(seconds=round(time.perf_counter() - self._start))
        tps = self._median_since(0)
        spread = (
            f" (median of {len(self._tokens_per_sec)} logged intervals, {min(self._tokens_per_sec):,.0f}-"
            f"{max(self._tokens_per_sec):,.0f})" if self._tokens_per_sec else ""
        )
        lines = [
            f"run finished at step {trainer.global_step} in {wall} (wall time)",
            f"  train loss {_fmt(_metric(m, 'train/loss'))} | val loss {_fmt(_metric(m, 'val/loss'))} | "
            f"val ppl {_fmt(_metric(m, 'val/ppl'), '.2f')}",
            f"  tokens/s {_fmt(tps, ',.0f')}{spread}",
        ]
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and (ckpt.last_model_path or ckpt.best_model_path):
            if ckpt.last_model_path:
                lines.append(f"  last checkpoint: {ckpt.last_model_path}")
            if ckpt.best_model_path:
                score = "" if ckpt.best_model_score is None else f", {ckpt.monitor} {float(ckpt.best_model_score):.4f}"
                lines.append(f"  best checkpoint: {ckpt.best_model_path}{score}")
            lines.append(f"  resume: bitflow ckpt_path={ckpt.last_model_path or ckpt.best_model_path}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                lines.append(f"  curves: tensorboard --logdir {os.path.normpath(logger.log_dir)}")
        return lines

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # after the progress bar has closed
        if trainer.is_global_zero:
            for line in self.summary_lines(trainer):
                log.info("%s", line)


class QuietModelSummary(ModelSummary):
    """Lightning's model summary without the table (its FLOPs column reads 0 for bitflow's models): the parameter
    count is one log line of ``run_training``; this logs the trainable/frozen split at DEBUG level."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            params = list(pl_module.parameters())
            trainable = sum(p.numel() for p in params if p.requires_grad)
            log.debug("parameters: %d trainable, %d frozen", trainable, sum(p.numel() for p in params) - trainable)
