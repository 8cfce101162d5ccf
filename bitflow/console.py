"""What a ``bitflow`` run prints: allocator tuning, quiet warnings, log lines above the progress bar, a summary.

- :func:`tune_allocator` (first thing in ``bitflow``): glibc malloc thresholds that keep CPU training ~20% faster.
- :func:`setup_console` (start of the Hydra task): narrow filters for warnings and Lightning lines that are not the
  user's business; remaining warnings go through logging (so they reach ``cli.log``).
- :class:`TqdmHandler`: the console handler of conf/hydra/job_logging/bitflow.yaml; it writes via ``tqdm.write`` so
  log lines never land on the progress bar.

The progress and end-of-run summary callbacks are :mod:`bitflow.callbacks.summary`. Importing this module does not
import torch or Lightning (4 s): ``bitflow --help`` and config errors stay fast and ``tune_allocator`` runs before
torch allocates.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import sys
import warnings
from collections.abc import Mapping

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
