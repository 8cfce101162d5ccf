"""Faults simulated on this CPU: a signal mid-training (and mid-phase-in), SLURM's pre-timeout signal and requeue,
non-finite steps. Real Trainer runs, real signals, real TensorBoard files read back."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from bitflow.callbacks.fault import NonFiniteError, RunInterrupted
from bitflow.cli import run_training
from bitflow.config import ConfigError
from tests.helpers import TINY, bitflow_env, compose, read_scalars

# 12 steps, the switch to ternary at step 4 with a tanh phase-in over 6 steps: step 7 is mid-phase-in
TRANSITION = ["quant=ternary", "transition=default", "transition.at=4", "transition.phase_in=tanh",
              "transition.phase_in_steps=6"]
COMPARED = ("train/loss", "train/lr", "quant/lambda", "train/tokens_seen")


class SignalAt(Callback):
    """Sends ``signal`` to this very process at the start of training step ``step`` (a real signal, delivered
    while the step runs)."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


signal_module = signal


class NaNAt(Callback):
    """Makes the loss of step ``step`` NaN, once per run directory (a rollback replays the step: a transient
    fault): the module's loss is multiplied by NaN for that one step."""

    fired: set[str] = set()

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.default_root_dir not in self.fired:
            self.fired.add(trainer.default_root_dir)
            original = pl_module.loss

            def nan_loss(batch, reduction="mean"):
                pl_module.loss = original
                return original(batch, reduction) * float("nan")

            pl_module.loss = nan_loss


def _same_curves(a: Path, b: Path, tags=COMPARED) -> None:
    sa, sb = read_scalars(a), read_scalars(b)
    for tag in tags:
        assert tag in sa, f"{tag} missing from {sorted(sa)}"
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        assert [v for _, v in sb[tag]] == pytest.approx([v for _, v in sa[tag]], rel=1e-5, abs=1e-7), tag


def test_sigterm_mid_phase_in_stops_after_the_step_and_resumes_exactly(tiny_overrides, tmp_path: Path):
    base = [*tiny_overrides[:-1], *TRANSITION]
    run_training(compose([*base, f"paths.output_dir={tmp_path / 'full'}"]))

    run = tmp_path / "stopped"
    stop = ["+callbacks.stop._target_=tests.test_fault.SignalAt", "+callbacks.stop.step=7"]
    with pytest.raises(RunInterrupted) as info:
        run_training(compose([*base, *stop, f"paths.output_dir={run}"]))
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert info.value.step == 8  # the step during which the signal came was completed
    assert "ckpt_path=last" in str(info.value)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8
    transition = next(v for k, v in last["callbacks"].items() if k.startswith("PrecisionTransition"))
    assert transition["switch_step"] == 4 and last["bitflow"]["quant"] is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    cfg = compose([*base, f"paths.output_dir={run}", "ckpt_path=last"])
    run_training(cfg)
    assert cfg.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    _same_curves(tmp_path / "full" / "tb", run / "tb")


def test_ckpt_path_last_without_a_checkpoint_names_the_directory(tiny_overrides, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no checkpoint in the run directory .*empty"):
        run_training(compose([*tiny_overrides, f"paths.output_dir={tmp_path / 'empty'}", "ckpt_path=last"]))


# ------------------------------------------------------------------------------------------------ subprocesses
def _bitflow(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitflow.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_sigint_to_a_bitflow_process_then_ckpt_path_last(tmp_path: Path, cache_dir: Path):
    env = bitflow_env(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    base = [*TINY, *TRANSITION]
    full = _bitflow([*base, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path, env)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "outputs" / "train" / "stopped"
    stop = ["+callbacks.stop._target_=tests.test_fault.SignalAt", "+callbacks.stop.step=6",
            "+callbacks.stop.signal=SIGINT"]
    stopped = _bitflow([*base, *stop, f"hydra.run.dir={run}"], tmp_path, env)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT after step 7" in stopped.stderr + stopped.stdout
    assert "ckpt_path=last" in stopped.stderr + stopped.stdout
    # `bitflow ckpt_path=last` with no directory: the newest run of outputs/train, continued in place
    resumed = _bitflow([*base, "ckpt_path=last"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == ["stopped"]
    assert list((run / ".hydra").glob("resume_*/config.yaml"))  # its own record; the original one stays
    _same_curves(tmp_path / "full" / "tb", run / "tb")


def _fake_scontrol(bin_dir: Path, log: Path) -> None:
    """A stand-in ``scontrol`` that records its arguments and, as SLURM does when it requeues a job, sends the
    job's process SIGTERM."""
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nkill -TERM $PPID\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path: Path, cache_dir: Path):
    env = bitflow_env(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    calls = tmp_path / "scontrol.log"
    _fake_scontrol(tmp_path / "bin", calls)
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", SLURM_NTASKS="1", SLURM_JOB_NAME="train",
               SLURM_JOB_ID="4242", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0")
    base = [*TINY, *TRANSITION, f"hydra.run.dir={tmp_path / 'job'}"]
    full = _bitflow([*TINY, *TRANSITION, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path, bitflow_env(cache_dir))
    assert full.returncode == 0, full.stderr[-3000:]

    usr1 = ["+callbacks.stop._target_=tests.test_fault.SignalAt", "+callbacks.stop.step=5",
            "+callbacks.stop.signal=SIGUSR1"]
    first = _bitflow([*base, *usr1], tmp_path, env)
    assert first.returncode == 143, first.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "job" / "hpc_ckpt_1.ckpt").is_file()
    assert (tmp_path / "job" / "checkpoints" / "last.ckpt").is_file()
    # the requeued job: the same command in the same directory, no ckpt_path
    again = _bitflow(base, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "requeued SLURM job" in again.stderr + again.stdout
    _same_curves(tmp_path / "full" / "tb", tmp_path / "job" / "tb")


# ------------------------------------------------------------------------------------------------ NaN / Inf
def test_an_injected_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_overrides, tmp_path):
    nan = ["+callbacks.nan._target_=tests.test_fault.NaNAt", "+callbacks.nan.step=8"]
    with pytest.raises(NonFiniteError, match=r"non-finite training step 8: loss nan, first parameter with a "
                                             r"non-finite gradient: model\.") as info:
        run_training(compose([*tiny_overrides, *nan]))
    assert info.value.step == 8
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6, ckpts  # the validation checkpoint before the NaN; nothing written after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["fault/nonfinite_steps"] == [(8, 1.0)]


def test_skip_policy_drops_the_nan_step_and_leaves_the_weights_alone(tiny_overrides, tmp_path):
    nan = ["+callbacks.nan._target_=tests.test_fault.NaNAt", "+callbacks.nan.step=8"]
    run_training(compose([*tiny_overrides, *nan, "fault.on_nonfinite=skip"]))
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["fault/skipped_steps"] == [(8, 1.0)]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_skip_policy_also_drops_the_dqt_step(tiny_overrides, tmp_path):
    """DQT's weights are no Parameters (per-step leaves in the optimizer's "dqt" group): a skipped step must leave
    their codes and moments alone too. (Before the guard read the optimizer's groups, the NaN step rewrote 71% of
    the codes and left NaN moments that froze every code afterwards.)"""
    nan = ["+callbacks.nan._target_=tests.test_fault.NaNAt", "+callbacks.nan.step=8"]
    run_training(compose([*tiny_overrides, *nan, "fault.on_nonfinite=skip", "quant=dqt_ternary"]))
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["fault/skipped_steps"] == [(8, 1.0)]
    flips = dict(scalars["quant/flip_rate"])
    assert flips.get(8, 0.0) == 0.0 and all(flips[s] > 0 for s in (7, 9, 10, 11)), flips  # step 8 changed no code
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 12
    moments = last["optimizer_states"][0]["dqt"]["state"]
    assert len(moments) == 14 and all(float(m["step"]) == 11 for m in moments.values())  # 12 steps, one skipped
    assert all(torch.isfinite(m["exp_avg"]).all() and torch.isfinite(m["exp_avg_sq"]).all() for m in moments.values())


def test_rollback_policy_resumes_the_last_checkpoint_with_half_the_lr(tiny_overrides, tmp_path):
    nan = ["+callbacks.nan._target_=tests.test_fault.NaNAt", "+callbacks.nan.step=8"]
    run_training(compose([*tiny_overrides, *nan, "fault.on_nonfinite=rollback"]))
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["fault/rollbacks"] == [(8, 1.0)]
    lr = dict(scalars["train/lr"])
    full = tmp_path / "full"
    run_training(compose([*tiny_overrides[:-1], f"paths.output_dir={full}"]))
    full_lr = dict(read_scalars(full / "tb")["train/lr"])
    assert lr[5] == pytest.approx(full_lr[5])
    for step in range(6, 12):  # replayed from the checkpoint of step 6 with LR x 0.5
        assert lr[step] == pytest.approx(0.5 * full_lr[step]), step
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 12


@pytest.mark.slow
def test_a_huge_lr_exits_non_zero_instead_of_training_on_nan(tmp_path: Path, cache_dir: Path):
    proc = _bitflow([*TINY, "optimizer.lr=1e6", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                    bitflow_env(cache_dir))
    assert proc.returncode == NonFiniteError.exit_code, proc.stderr[-3000:]
    assert "non-finite training step" in proc.stderr + proc.stdout
    assert not list((tmp_path / "run").glob("checkpoints/*nan*"))


def test_bad_fault_options_name_the_key(tiny_overrides):
    for override, key in (("fault.on_nonfinite=ignore", "fault.on_nonfinite"),
                          ("fault.rollback_lr_factor=2", "fault.rollback_lr_factor"),
                          ("fault.requeue_signal=SIGFOO", "fault.requeue_signal"),
                          ("+fault.retries=2", "fault.retries")):
        with pytest.raises(ConfigError, match=key):
            from bitflow.cli import prepare_config

            prepare_config(compose([*tiny_overrides, override]))
