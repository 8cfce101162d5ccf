"""Memory of a long CPU run: a micro model for 20,000 steps, resident memory (RSS) sampled along the way.

A leak (a tensor kept per step, a growing list of metrics, an allocator that never returns memory) shows as a
steady rise; a healthy run is flat after its first validation. One real ``bitflow`` process; the callback
:class:`RSSRecorder` writes ``bench/rss_mb`` to the run's TensorBoard file every ``every`` steps.

    python -m bitflow.bench.memory [--quick] [--steps 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from bitflow.bench.common import print_table
from bitflow.bench.concurrency import MICRO


def rss_mb() -> float:
    """This process's resident set size in MB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSRecorder(Callback):
    """Logs ``bench/rss_mb`` every ``every`` training steps."""

    def __init__(self, every: int = 100) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            for logger in trainer.loggers:
                logger.log_metrics({"bench/rss_mb": rss_mb()}, step=trainer.global_step)


def run(quick: bool = False, steps: int | None = None) -> list[dict]:
    """Train ``steps`` steps (20,000; quick: 300) and report RSS after warm-up, at the middle and at the end."""
    from bitflow.events import read_scalars

    steps = steps or (300 if quick else 20_000)
    every = max(1, steps // 100)
    with tempfile.TemporaryDirectory(prefix="bitflow-memory-") as tmp:
        cmd = [sys.executable, "-m", "bitflow.cli", *MICRO, "callbacks=default", f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={max(1, steps // 10)}", f"trainer.log_every_n_steps={every}",
               "+callbacks.rss._target_=bitflow.bench.memory.RSSRecorder", f"+callbacks.rss.every={every}",
               f"hydra.run.dir={tmp}/run"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rss = read_scalars(Path(tmp) / "run" / "tb")["bench/rss_mb"]
    warm = next(v for s, v in rss if s >= steps // 10)  # after the first validation and checkpoint
    middle = next(v for s, v in rss if s >= steps // 2)
    last = rss[-1][1]
    rows = [{"steps": steps, "RSS at 10% (MB)": warm, "RSS at 50% (MB)": middle, "RSS at end (MB)": last,
             "growth 10%->end (MB)": last - warm, "MB per 1000 steps": 1000 * (last - warm) / (0.9 * steps),
             "max RSS (MB)": max(v for _, v in rss)}]
    print_table("Memory of a long micro-model run (RSS)", rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps")
    parser.add_argument("--steps", type=int, help="training steps (default 20000)")
    args = parser.parse_args()
    run(args.quick, args.steps)


if __name__ == "__main__":
    main()
