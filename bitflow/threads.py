"""How many CPU threads a ``bitflow`` process uses: its share of the cores it may use.

Several torch processes whose OpenMP threads together outnumber the cores run far slower than their share (threads
wait at barriers for a descheduled sibling: three processes of 2 threads on 2 cores measured ~50x slower per step).
So with ``threads: auto`` a run takes ``usable cores / concurrent processes`` threads, where

* usable cores: the CPUs of this process's affinity mask (``os.sched_getaffinity``: taskset, SLURM's cpuset), capped
  by the cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``: docker ``--cpus``,
  Kubernetes limits), rounded down, at least 1;
* concurrent processes: the parallel jobs of a Hydra joblib multirun (``hydra/launcher=joblib``,
  ``hydra.launcher.n_jobs``; -1 = one per core) times the CPU processes of one run (``trainer.devices`` of CPU DDP).

``OMP_NUM_THREADS`` set in the environment wins over ``auto``; ``threads: N`` sets N.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["apply_threads", "cgroup_cpu_limit", "concurrent_processes", "plan_threads", "usable_cpus"]

log = logging.getLogger("bitflow")


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (``2.5`` for ``cpu.max = 250000 100000``), or None when
    unlimited or unknown. Reads cgroup v2 ``cpu.max`` first, then v1's ``cpu.cfs_quota_us``/``cpu.cfs_period_us``."""
    root = Path(root)
    for directory in _cgroup_dirs(root):
        v2 = directory / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota != "max" and period:
                return int(quota) / int(period)
            return None
        quota_file, period_file = directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota, period = int(quota_file.read_text()), int(period_file.read_text())
            return quota / period if quota > 0 and period > 0 else None
    return None


def _cgroup_dirs(root: Path) -> list[Path]:
    """This process's own cgroup directory (from /proc/self/cgroup) and the root, v2 then v1 ``cpu`` controller."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                sub = root / path.lstrip("/") if controllers == "" else root / "cpu" / path.lstrip("/")
                dirs.append(sub)
    except (OSError, ValueError):
        pass
    return [*dirs, root, root / "cpu"]


def usable_cpus() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota (rounded down), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def concurrent_processes(cfg: Any = None) -> int:
    """bitflow processes sharing these cores: the joblib launcher's parallel jobs times the CPU DDP processes."""
    jobs = 1
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            launcher = HydraConfig.get().launcher
            if "joblib" in str(launcher.get("_target_", "")).lower():
                n_jobs = int(launcher.get("n_jobs", -1) or -1)
                jobs = n_jobs if n_jobs > 0 else usable_cpus()
    except (ValueError, TypeError):
        pass
    devices = 1
    if cfg is not None:
        trainer = cfg.get("trainer") or {}
        accelerator, n = str(trainer.get("accelerator", "auto")), trainer.get("devices", 1)
        if accelerator == "cpu" and isinstance(n, int) and not isinstance(n, bool) and n > 1:
            devices = n
    return max(1, jobs * devices)


def plan_threads(setting: Any, cpus: int, processes: int, env: str | None = None) -> tuple[int, str]:
    """``(threads, why)`` for ``threads: setting`` on ``cpus`` usable cores shared by ``processes`` processes;
    ``env``: ``OMP_NUM_THREADS`` if set (wins over ``auto``)."""
    if setting != "auto":
        return int(setting), "threads set in the config"
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    n = max(1, cpus // processes)
    return n, f"{cpus} usable core(s) / {processes} concurrent process(es)"


def apply_threads(cfg: Any) -> int:
    """Set torch's intra-op thread count from ``threads`` (``auto`` or an int >= 1); returns it."""
    import torch

    n, why = plan_threads(cfg.get("threads", "auto"), usable_cpus(), concurrent_processes(cfg),
                          os.environ.get("OMP_NUM_THREADS"))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("torch threads: %d (%s)", n, why)
    return n
