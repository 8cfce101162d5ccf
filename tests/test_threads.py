"""Thread count of a bitflow process: its share of the usable cores (affinity, cgroup quota, concurrent jobs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitflow.config import ConfigError
from bitflow.threads import cgroup_cpu_limit, plan_threads, usable_cpus
from tests.helpers import TINY, bitflow_env, compose


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "250000 100000\n"}, 2.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_in_cores(tmp_path: Path, files: dict[str, str], cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == cores


def test_threads_are_the_share_of_the_usable_cores():
    assert plan_threads("auto", 8, 1) == (8, "8 usable core(s) / 1 concurrent process(es)")
    assert plan_threads("auto", 8, 4)[0] == 2
    assert plan_threads("auto", 2, 4)[0] == 1  # never 0
    assert plan_threads("auto", 8, 1, env="3") == (3, "OMP_NUM_THREADS=3")
    assert plan_threads(5, 2, 4, env="3")[0] == 5  # the config key wins over everything
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["many", 0, 1.5])
def test_a_bad_threads_value_names_the_key(tiny_overrides, value):
    from bitflow.cli import prepare_config

    with pytest.raises(ConfigError, match=r"threads=.* is not allowed; allowed: auto"):
        prepare_config(compose([*tiny_overrides, f"threads={value}"]))


@pytest.mark.slow
def test_a_parallel_joblib_multirun_gives_each_job_its_share(tmp_path: Path, cache_dir: Path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = bitflow_env(cache_dir)
    env.pop("OMP_NUM_THREADS", None)
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    proc = subprocess.run(
        [sys.executable, "-m", "bitflow.cli", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, "trainer.max_steps=2", "seed=1,2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    share = max(1, usable_cpus() // 2)
    for job in ("0", "1"):
        log = (tmp_path / "sweep" / job / "cli.log").read_text()
        # bitflow's share, or joblib's own: loky sets OMP_NUM_THREADS = cores // n_jobs in its workers, which wins
        assert (f"torch threads: {share} ({usable_cpus()} usable core(s) / 2 concurrent process(es))" in log
                or f"torch threads: {share} (OMP_NUM_THREADS={share})" in log), log
