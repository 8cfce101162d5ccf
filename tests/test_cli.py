"""The first hour with the `bitflow` command: precision auto, short runs, -m anywhere, clean config errors, resume."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bitflow.cli import hydra_argv
from bitflow.config import ConfigError, check_optimizer, fit_short_run, native_bf16_cpu, resolve_precision
from tests.helpers import TINY, bitflow_env, read_scalars

# the tiny run without the step-valued settings that a short run should scale by itself
TINY_NO_STEPS = [
    o for o in TINY
    if not o.startswith(("trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
                         "scheduler.warmup_steps"))
]


def run_bitflow(args: list[str], cwd: Path, cache_dir: Path, full_error: bool = False, timeout: int = 300):
    env = bitflow_env(cache_dir)
    if not full_error:
        env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(["bitflow", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ unit tier
def test_hydra_argv_moves_multirun_to_the_front():
    assert hydra_argv(["+experiment=x", "-m", "seed=1,2"]) == ["-m", "+experiment=x", "seed=1,2"]
    assert hydra_argv(["a=1", "--multirun"]) == ["--multirun", "a=1"]
    assert hydra_argv(["a=1", "b=2"]) == ["a=1", "b=2"]


def test_precision_auto_follows_the_hardware_not_an_assumption():
    precision, why = resolve_precision("auto", accelerator="cpu")
    # whichever CPU this is: bf16 only where it is native, with the reason naming the CPU capability
    assert precision == ("bf16-mixed" if native_bf16_cpu() else "32-true")
    assert torch.backends.cpu.get_cpu_capability() in why
    assert resolve_precision("32-true") == ("32-true", "set in the config")
    assert resolve_precision("bf16-mixed", accelerator="cpu")[0] == "bf16-mixed"


def test_short_run_scales_step_defaults_but_keeps_explicit_values():
    cfg = OmegaConf.create({
        "trainer": {"max_steps": 20, "val_check_interval": 100, "log_every_n_steps": 10},
        "scheduler": {"name": "cosine", "warmup_steps": 50},
    })
    changes = fit_short_run(cfg)
    assert (cfg.scheduler.warmup_steps, cfg.trainer.val_check_interval, cfg.trainer.log_every_n_steps) == (2, 20, 10)
    assert changes == ["scheduler.warmup_steps 50 -> 2", "trainer.val_check_interval 100 -> 20"]
    one = OmegaConf.create({"trainer": {"max_steps": 1, "val_check_interval": 100, "log_every_n_steps": 10},
                            "scheduler": {"warmup_steps": 50}})
    fit_short_run(one)
    assert (one.scheduler.warmup_steps, one.trainer.val_check_interval, one.trainer.log_every_n_steps) == (0, 1, 1)
    explicit = OmegaConf.create({"trainer": {"max_steps": 20, "val_check_interval": 100},
                                 "scheduler": {"warmup_steps": 50}})
    assert fit_short_run(explicit, {"scheduler.warmup_steps"}) == ["trainer.val_check_interval 100 -> 20"]
    assert explicit.scheduler.warmup_steps == 50
    # a long run is left alone: the studies' 350 steps keep warmup 50
    long = OmegaConf.create({"trainer": {"max_steps": 350, "val_check_interval": 100}, "scheduler": {"warmup_steps": 50}})
    assert fit_short_run(long) == [] and long.scheduler.warmup_steps == 50


@pytest.mark.parametrize(
    "optimizer, match",
    [
        ({"lr": 0.0}, r"optimizer\.lr=0\.0 is not allowed; allowed: a number > 0"),
        ({"lr": 1e-3, "eps": -1.0}, r"optimizer\.eps=-1\.0"),
        ({"lr": 1e-3, "weight_decay": -0.1}, r"optimizer\.weight_decay=-0\.1 is not allowed; allowed: a number >= 0"),
        ({"lr": 1e-3, "betas": [0.9]}, r"optimizer\.betas=\[0\.9\] is not allowed; allowed: a pair"),
        ({"lr": 1e-3, "fused": "yes"}, r"optimizer\.fused='yes'"),
    ],
)
def test_optimizer_values_are_checked_before_torch_sees_them(optimizer, match):
    with pytest.raises(ConfigError, match=match):
        check_optimizer(optimizer)


# ------------------------------------------------------------------------------------------------ the CLI
def test_config_error_is_one_clean_message_within_seconds(tmp_path: Path, cache_dir: Path):
    start = time.monotonic()
    proc = run_bitflow([*TINY, "optimizer.lr=-1"], tmp_path, cache_dir)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "config error: optimizer.lr=-1 is not allowed; allowed: a number > 0" in out
    assert "Traceback" not in out
    assert not list(tmp_path.rglob("events.out.tfevents.*")) and not list(tmp_path.rglob("*.ckpt"))
    print(f"config error after {seconds:.1f} s")  # informative only: timings are not asserted
    full = run_bitflow([*TINY, "optimizer.lr=-1"], tmp_path, cache_dir, full_error=True)
    assert full.returncode != 0 and "Traceback" in full.stderr and "optimizer.lr=-1" in full.stderr


def test_short_run_validates_and_checkpoints_at_its_last_step(tmp_path: Path, cache_dir: Path):
    proc = run_bitflow([*TINY_NO_STEPS, "trainer.max_steps=7"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (run,) = list((tmp_path / "outputs" / "train").iterdir())
    scalars = read_scalars(run / "tb")
    assert [s for s, _ in scalars["val/loss"]] == [6]  # validated once, at the last step (0-based step 6)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    log = (run / "cli.log").read_text()
    assert "short run (trainer.max_steps=7): scheduler.warmup_steps 50 -> 0" in log
    assert "trainer.val_check_interval 100 -> 7" in log
    assert "trainer.precision=auto -> " in log
    # the run's record holds what it used, not "auto" and the unscaled defaults
    recorded = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert recorded.trainer.precision in ("bf16-mixed", "32-true") and recorded.scheduler.warmup_steps == 0


def test_multirun_flag_anywhere_among_the_overrides(tmp_path: Path, cache_dir: Path):
    proc = run_bitflow([*TINY, "trainer.max_steps=2", "-m", "seed=1,2", "task_name=anywhere"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (sweep,) = list((tmp_path / "multirun" / "anywhere").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")[-2:] == [f"seed={int(job) + 1}",
                                                                                  "task_name=anywhere"]
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()


def test_resume_continues_in_the_run_directory_and_refuses_a_reshaped_schedule(tmp_path: Path, cache_dir: Path):
    base = [*TINY, "trainer.max_steps=8", "trainer.val_check_interval=4"]
    first = run_bitflow(base, tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "train").iterdir())
    ckpt = run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "at8.ckpt").write_bytes(ckpt.read_bytes())

    longer = run_bitflow([*TINY, "trainer.max_steps=12", "trainer.val_check_interval=4", f"ckpt_path={ckpt}"],
                         tmp_path, cache_dir)
    out = longer.stdout + longer.stderr
    assert longer.returncode == 2, out[-2000:]
    assert "trainer.max_steps=12 (checkpoint: 8)" in out and "allow_schedule_change=true" in out
    assert "Traceback" not in out

    again = run_bitflow([*TINY, "trainer.max_steps=12", "trainer.val_check_interval=4", f"ckpt_path={ckpt}",
                         "allow_schedule_change=true"], tmp_path, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == [run.name]  # no new run directory
    steps = sorted(s for s, _ in read_scalars(run / "tb")["train/loss"])
    assert steps == list(range(12))  # one TensorBoard curve, continued
    assert torch.load(ckpt, weights_only=False)["global_step"] == 12
    # the original run's configs are kept; the resumed run's sit beside them
    assert "trainer.max_steps=8" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert any(p.name.startswith("resume_") for p in (run / ".hydra").iterdir())
    assert os.path.getsize(run / "cli.log") > 0


def test_a_resumed_run_keeps_the_original_hydra_record_but_a_multirun_job_writes_its_own(tmp_path: Path):
    from bitflow.config import _hydra_subdir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert _hydra_subdir(ckpt, "2026-01-01_00-00-00", "RUN") == ".hydra/resume_2026-01-01_00-00-00"
    assert _hydra_subdir(ckpt, "2026-01-01_00-00-00", "RunMode.MULTIRUN") == ".hydra"  # a new job directory
    assert _hydra_subdir(None, "2026-01-01_00-00-00", "RUN") == ".hydra"
    assert _hydra_subdir(tmp_path / "loose.ckpt", "t", "RUN") == ".hydra"  # not inside a run directory
