"""Per-step time of 1, 2 and 4 concurrent `bitflow` runs on one machine (a Hydra joblib multirun).

Each case is one real multirun, ``bitflow -m hydra/launcher=joblib hydra.launcher.n_jobs=K seed=1,...,K``, of a
micro model; the per-step time of a run is the median gap between its ``train/loss`` events in TensorBoard. Two
thread settings per K: ``threads=auto`` (each job takes its share of the usable cores, bitflow.threads) and
``threads=<all usable cores>`` (every job as if alone: the oversubscription the share avoids).

    python -m bitflow.bench.concurrency [--quick] [--jobs 1 2 4] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bitflow.bench.common import print_table

# the micro model of the tests: seconds per run on a 2-core CPU
MICRO = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "data.source.max_files=60", "data.vocab_size=320",
    "data.val_windows=8", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "trainer.precision=32-true", "callbacks=none",
]


def step_times(run_dir: Path) -> list[float]:
    """Gaps (seconds) between consecutive ``train/loss`` events of a run."""
    from bitflow.events import read_events

    times = sorted(read_events(run_dir).wall_times.get("train/loss", []))
    return [b - a for a, b in zip(times, times[1:])]


def multirun(jobs: int, steps: int, threads: str, root: Path) -> dict[str, Any]:
    """One joblib multirun of ``jobs`` parallel runs; the median per-step time over its runs."""
    from bitflow.threads import usable_cpus

    sweep = root / f"jobs{jobs}-threads{threads}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    seeds = ",".join(str(i + 1) for i in range(jobs))
    cmd = [sys.executable, "-m", "bitflow.cli", "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
           f"hydra.sweep.dir={sweep}", *MICRO, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           f"threads={threads}", f"seed={seeds}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    per_run = [statistics.median(step_times(sweep / str(i))[1:]) for i in range(jobs)]
    per_thread = max(1, usable_cpus() // jobs) if threads == "auto" else int(threads)
    return {"concurrent runs": jobs, "threads": threads, "threads/run": per_thread,
            "ms/step (median of runs)": 1000 * statistics.median(per_run),
            "ms/step (slowest run)": 1000 * max(per_run)}


def run(quick: bool = False, jobs: tuple[int, ...] | None = None, steps: int | None = None) -> list[dict]:
    """The table: per-step times for each number of concurrent runs, with and without the thread share."""
    jobs = jobs or ((1, 2) if quick else (1, 2, 4))
    steps = steps or (6 if quick else 60)
    from bitflow.threads import usable_cpus

    rows = []
    with tempfile.TemporaryDirectory(prefix="bitflow-concurrency-") as tmp:
        for k in jobs:
            rows.append(multirun(k, steps, "auto", Path(tmp)))
            if k > 1 and usable_cpus() > 1:
                rows.append(multirun(k, steps, str(usable_cpus()), Path(tmp)))
    print_table(f"Concurrent runs on {usable_cpus()} usable core(s) (micro model, {steps} steps)", rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 2 runs of 6 steps")
    parser.add_argument("--jobs", type=int, nargs="*", help="numbers of concurrent runs (default 1 2 4)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 60)")
    args = parser.parse_args()
    run(args.quick, tuple(args.jobs) if args.jobs else None, args.steps)


if __name__ == "__main__":
    main()
