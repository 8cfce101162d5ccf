"""bitflow-report: one row per run, the swept overrides, losses, transition metrics, downstream accuracies,
plots.

The fast tests write run directories with TensorBoard's own writer; the slow one reports on a real multirun of
the `bitflow` Hydra app."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from bitflow.report import find_runs, main, make_report, resolve_switch_step

MAX_STEPS = 100


def _write_run(
    path: Path, at, phase_in: str, state: str, val: list[float], spike: float | None, lam_from=None
):
    """A run directory as bitflow writes it: .hydra/{overrides,config}.yaml and TensorBoard events in tb/."""
    (path / ".hydra").mkdir(parents=True)
    overrides = [
        f"transition.at={'null' if at is None else at}",
        f"transition.phase_in={phase_in}",
        f"transition.optimizer_state={state}",
        f"trainer.max_steps={MAX_STEPS}",
        "hydra.sweep.dir=/x",
    ]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    transition = {
        "_target_": "bitflow.callbacks.PrecisionTransition",
        "at": at,
        "phase_in": phase_in,
        "optimizer_state": state,
        "phase_in_steps": 60 if phase_in == "tanh" else 0,
    }
    config = {"trainer": {"max_steps": MAX_STEPS}, "transition": transition if lam_from is None else {}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(path / "tb"))
    for i, v in enumerate(val):
        writer.add_scalar("val/loss", v, (i + 1) * 25 - 1)
    for step in range(0, MAX_STEPS, 10):
        writer.add_scalar("train/tokens_per_sec", 1000.0 + step, step)
        if lam_from is not None:
            writer.add_scalar("quant/lambda", 1.0 if step >= lam_from else 0.0, step)
    if spike is not None:
        writer.add_scalar("transition/spike", spike, 60)
        writer.add_scalar("transition/recovery_steps", 12.0, 70)
    writer.close()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    _write_run(root / "0", None, "none", "keep", [3.0, 2.5, 2.2, 2.0], None)  # 16-bit baseline
    _write_run(root / "1", 0, "none", "keep", [3.5, 3.0, 2.8, 2.7], None)  # ternary from scratch
    _write_run(root / "2", 0.5, "none", "keep", [3.0, 2.5, 2.9, 2.3], 0.6)
    _write_run(root / "3", 0.5, "tanh", "reset", [3.0, 2.5, 2.7, 2.25], 0.2)
    _write_run(root / "10", 0.2, "none", "keep", [3.0, 2.9, 2.5, 2.4], 0.9, lam_from=20)  # switch from lambda
    results = {"results": {"piqa": {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": 0.62}}, "global_step": 99}
    (root / "2" / "checkpoints").mkdir()
    (root / "2" / "checkpoints" / "eval_results.json").write_text(json.dumps(results))
    return root


def test_report_has_one_row_per_run_with_the_swept_settings(sweep: Path):
    result = make_report([sweep])
    rows = {Path(r["run"]).name: r for r in result["rows"]}
    assert list(rows) == ["0", "1", "2", "3", "10"]  # job order, not string order
    # the overrides that differ are columns; trainer.max_steps (the same everywhere) and hydra.* are not
    assert (
        "transition.at" in rows["0"]
        and "trainer.max_steps" not in rows["0"]
        and "hydra.sweep.dir" not in rows["0"]
    )
    assert [rows[k]["switch_step"] for k in rows] == [None, 0, 50, 50, 20]
    # a config value that differs without being on the command line is shown too
    assert [rows[k]["transition.phase_in_steps"] for k in rows] == ["0", "0", "0", "60", ""]
    assert rows["2"]["final_val_loss"] == pytest.approx(2.3) and rows["2"]["best_val_loss"] == pytest.approx(
        2.3
    )
    assert rows["3"]["best_val_loss"] == pytest.approx(2.25) and rows["2"]["final_val_ppl"] == pytest.approx(
        math.exp(2.3)
    )
    assert (
        rows["2"]["transition/spike"] == pytest.approx(0.6) and rows["2"]["transition/recovery_steps"] == 12
    )
    assert rows["2"]["tokens_per_sec"] == pytest.approx(1045.0)  # the median of 1000, 1010, ..., 1090
    assert rows["2"]["eval/piqa/acc"] == pytest.approx(0.61) and "eval/piqa/acc_stderr" not in rows["2"]
    assert rows["0"]["wall_time_s"] >= 0

    with open(result["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and float(table[2]["final_val_loss"]) == pytest.approx(2.3)
    md = result["markdown"].read_text()
    assert md.count("\n| ") == 6  # header + 5 runs
    assert "| transition.at |" in md.replace("| run | transition.at |", "| transition.at |")
    names = sorted(p.name for p in result["plots"])
    assert names == ["final_loss_vs_switch.png", "spike_by_phase_in.png", "val_loss.png"]
    for p in result["plots"]:
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.size[0] > 400 and img.size[1] > 300 and len(set(img.convert("L").getdata())) > 20
        assert f"]({p.name})" in md


def test_switch_step_resolution():
    assert resolve_switch_step(None, 100) is None
    assert resolve_switch_step(0, 100) == 0 and resolve_switch_step(0.0, 100) == 0
    assert resolve_switch_step(0.25, 1000) == 250 and resolve_switch_step(300, 1000) == 300


def test_bad_report_input_is_a_clear_error(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run directories"):
        find_runs([tmp_path / "empty"])
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_a_real_tiny_multirun(tmp_path: Path, cache_dir: Path):
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BITFLOW_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [
            "bitflow",
            "-m",
            "transition=default",
            "transition.at=null,0.5",
            "optimizer.lr=1e-3,2e-3",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.log_every_n_steps=1",
            "scheduler.warmup_steps=2",
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.d_ff=64",
            "model.max_seq_len=32",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.source.max_files=40",
            "data.vocab_size=300",
            "data.val_windows=8",
            "trainer=cpu",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(r["transition.at"], r["optimizer.lr"]) for r in rows} == {
        ("null", "0.001"),
        ("null", "0.002"),
        ("0.5", "0.001"),
        ("0.5", "0.002"),
    }
    for r in rows:
        assert 0 < float(r["final_val_loss"]) < 10 and float(r["tokens_per_sec"]) > 0
        assert (r["switch_step"] == "3") == (r["transition.at"] == "0.5")
        assert (r["transition/spike"] != "") == (r["transition.at"] == "0.5")
    for name in ("val_loss.png", "final_loss_vs_switch.png", "spike_by_phase_in.png"):
        with Image.open(tmp_path / "report" / name) as img:
            img.verify()
