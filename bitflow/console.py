"""What a ``bitflow`` run prints: allocator tuning, quiet warnings, log lines above the progress bar, a summary.

- :func:`tune_allocator` (first thing in ``bitflow``): glibc malloc thresholds that keep CPU training ~20% faster.
- :func:`setup_console` (start of the Hydra task): narrow filters for warnings and Lightning lines that are not the
  user's business; remaining warnings go through logging (so they reach ``cli.log``).
- :class:`TqdmHandler`: the console handler of conf/hydra/job_logging/bitflow.yaml; it writes via ``tqdm.write`` so
  log lines never land on the progress bar.
- :class:`RunSummary` (conf/callbacks/default.yaml): tokens/s on the progress bar, one log line per validation and
  an end-of-run summary (losses, ppl, tokens/s, wall time, checkpoints, the TensorBoard command).
- :class:`QuietModelSummary`: stands in for Lightning's model summary table (``run_training`` logs the parameter
  count).

Importing this module does not import torch or Lightning (4 s): ``bitflow --help`` and config errors stay fast and
``tune_allocator`` runs before torch allocates. The two callbacks are built on first access (module ``__getattr__``).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

log = logging.getLogger("bitflow")

# ---------------------------------------------------------------------------------------------------- allocator
# glibc's dynamic mmap threshold makes every mid-size temporary tensor an mmap/munmap pair (page faults on each
# step) and trims the heap after frees; fixed 1 GiB thresholds keep that memory in the heap: +20% CPU tokens/s.
# The same values as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824.
MALLOC_THRESHOLD = 1 << 30
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3  # <malloc.h>
OPT_OUT_ENV = "BITFLOW_MALLOC_TUNING"


def tune_allocator(environ: Mapping[str, str] | None = None) -> str:
    """Set glibc's malloc mmap and trim thresholds to 1 GiB in this process (``mallopt``), before torch allocates.

    Returns what happened, one of ``"tuned"``, ``"opted out"`` (env ``BITFLOW_MALLOC_TUNING=0``), ``"user
    GLIBC_TUNABLES"`` (the user's own malloc tunables win), ``"not glibc"`` or ``"mallopt failed"``. Processes
    started later (DataLoader workers fork and inherit it; DDP ranks run ``bitflow`` again) get the same setting.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return "opted out"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "user GLIBC_TUNABLES"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD) == 1
    return "tuned" if ok else "mallopt failed"


# ------------------------------------------------------------------------------------------------------ console
# Warnings that say nothing the user can act on (by message; each names where it comes from).
QUIET_WARNINGS = (
    # lightning.pytorch.utilities.model_summary: bf16 size estimate (bitflow shows no size estimate)
    r"Precision .* is not supported by the model summary",
    # lightning.pytorch.utilities._pytree on torch >= 2.10: Lightning's own use of a deprecated torch API
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # lightning: bitflow's DataModule loaders use the worker count data.num_workers asks for
    r"The '\w+_dataloader' does not have many workers",
)
# Lightning's rank-zero info lines that are adverts or restate the config (matched with re.search).
QUIET_LIGHTNING_LINES = (
    r"litlogger|LitLogger",  # the cloud-logging advert
    r"was configured so 100% of the batches",  # limit_val_batches=1.0 restated
    r"already configured with model summary callbacks",  # bitflow's QuietModelSummary
    r"^(GPU|TPU|HPU) available: False",  # accelerators the machine does not have
    r"^Using \S+ Automatic Mixed Precision",  # the `trainer.precision=auto -> ...` line says it (and why)
    r"`Trainer.fit` stopped: `max_steps=\d+` reached",  # the run summary says it
)


class _DropLines(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: the progress bar is cleared, the line printed, the bar
    redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 (logging's contract: report, never raise)
            self.handleError(record)


def setup_console() -> None:
    """Quiet the console for a run: narrow warning filters, Lightning's adverts dropped, warnings into logging.

    Call at the start of the Hydra task (after Hydra configured logging). Idempotent.
    """
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    import lightning  # noqa: F401  (it installs its own console handlers on import; undo them below)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # log once, through Hydra's handlers
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines(QUIET_LIGHTNING_LINES))
    logging.captureWarnings(True)  # the warnings left reach cli.log and print above the progress bar


# ---------------------------------------------------------------------------------------------------- callbacks
def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


class _RunSummary:
    """Progress and summary of a run, through logging (so the console and ``cli.log`` both get them).

    - tokens/s on the progress bar (``ktok/s``, thousands; not sent to the loggers);
    - after each validation: ``step N: train loss, val loss, tokens/s`` (median since the previous validation);
    - at the end: final train/val loss, val ppl, median tokens/s, wall time, last and best checkpoints, the resume
      and ``tensorboard --logdir`` commands.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._tokens_per_sec: list[float] = []
        self._since_val = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()
        self._tokens_per_sec, self._since_val = [], 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        value = _metric(trainer.callback_metrics, "train/tokens_per_sec")
        # lm.py logs tokens/s from the second step after each (re)start; a value only counts once
        if value is None or (self._tokens_per_sec and value == self._tokens_per_sec[-1]):
            return
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
            f" (median of {len(self._tokens_per_sec)} steps, {min(self._tokens_per_sec):,.0f}-"
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
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                lines.append(f"  curves: tensorboard --logdir {os.path.normpath(logger.log_dir)}")
        return lines

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # after the progress bar has closed
        if trainer.is_global_zero:
            for line in self.summary_lines(trainer):
                log.info("%s", line)


class _QuietModelSummary:
    """Lightning's model summary without the table (its FLOPs column reads 0 for bitflow's models): the parameter
    count is one log line of ``run_training``; this logs the trainable/frozen split at DEBUG level."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            params = list(pl_module.parameters())
            trainable = sum(p.numel() for p in params if p.requires_grad)
            log.debug("parameters: %d trainable, %d frozen", trainable, sum(p.numel() for p in params) - trainable)


# The callbacks subclass Lightning's classes, built on first access so that importing this module stays light.
_LIGHTNING_BASES = {"RunSummary": (_RunSummary, "Callback"), "QuietModelSummary": (_QuietModelSummary, "ModelSummary")}
_built: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name not in _LIGHTNING_BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        import lightning.pytorch.callbacks as callbacks

        hooks, base = _LIGHTNING_BASES[name]
        _built[name] = type(name, (hooks, getattr(callbacks, base)), {"__doc__": hooks.__doc__, "__module__": __name__})
    return _built[name]
