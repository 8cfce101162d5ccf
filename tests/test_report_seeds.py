"""bitflow-report: recovery against the 16-bit run of the sweep, seed groups (mean, spread, within-spread marks),
and at: auto runs, on run directories as the `bitflow` Hydra app writes them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bitflow.report import make_report, read_run
from bitflow.report.seeds import area_between, recovery_vs, smoothed
from tests.test_report import _hydra_run

STEPS = 100


def _losses(level: float, jump: float = 0.0, t0: int | None = None, decay: float = 0.1) -> list[tuple[int, float]]:
    """A training loss every 10 steps: ``level`` + 1/(1 + step/10), plus ``jump`` at the switch that decays by
    ``decay`` per logged step."""
    out = []
    for step in range(0, STEPS, 10):
        extra = jump * max(0.0, 1 - decay * (step - t0) / 10) if t0 is not None and step >= t0 else 0.0
        out.append((step, level + 1 / (1 + step / 10) + extra))
    return out


def _run(root: Path, name: str, at, seed: int, level: float, jump: float = 0.0, final: float | None = None,
         extra: list[str] | None = None, decay: float = 0.1) -> Path:
    t0 = None if at is None else round(at * STEPS) if isinstance(at, float) else at
    overrides = [f"trainer.max_steps={STEPS}", "quant=ternary", "transition=default",
                 f"transition.at={'null' if at is None else at}", f"seed={seed}", *(extra or [])]
    scalars = {"train/loss": _losses(level, jump, t0, decay), "val/loss": [(49, level + 1.0), (99, final or level + 0.1)]}
    if t0:
        scalars["quant/switch_step"] = [(t0, float(t0))]
    return _hydra_run(root / name, overrides, scalars)


def test_smoothing_recovery_and_area_by_hand(tmp_path: Path):
    assert smoothed([(0, 1.0), (1, 2.0), (2, 2.0)], beta=0.5) == {0: 1.0, 1: 1.5, 2: 1.75}
    base = read_run(_run(tmp_path, "fp16", None, 1, 2.0))
    # the same curve plus 0.5 at step 50 and 0.25 at step 60; the smoothed difference (beta 0.6):
    # 0.2, 0.22, 0.132, 0.0792, 0.0475 at steps 50..90: within 0.1 from step 80 on, within 0.06 from step 90 on
    switched = read_run(_run(tmp_path, "sw", 0.5, 1, 2.0, jump=0.5, decay=0.5))
    assert recovery_vs(switched, base, tol=0.1) == 30
    assert recovery_vs(switched, base, tol=0.06) == 40
    mine, theirs = smoothed(switched.series("train/loss")), smoothed(base.series("train/loss"))
    assert recovery_vs(switched, base, tol=0.001) is None  # never within 0.001 by step 90
    diff = {s: mine[s] - theirs[s] for s in mine if s >= 50}
    expect = sum(10 * (diff[a] + diff[a + 10]) / 2 for a in range(50, 90, 10))
    assert area_between(switched, base) == pytest.approx(expect)


def test_report_groups_seeds_and_compares_with_the_16bit_run(tmp_path: Path):
    root = tmp_path / "sweep"
    for seed, shift in ((1, 0.0), (2, 0.02), (3, -0.02)):
        _run(root, f"fp16_{seed}", None, seed, 2.0 + shift)
        _run(root, f"early_{seed}", 0.2, seed, 2.0 + shift, jump=0.6, final=2.11 + shift, decay=0.5)
        _run(root, f"late_{seed}", 0.8, seed, 2.0 + shift, jump=1.0, final=2.6 + shift)
    result = make_report([root], tmp_path / "out")
    text = result["markdown"].read_text()
    rows = {Path(r["run"]).name: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    assert rows["fp16_1"]["recovery_vs_16bit"] == ""  # the baseline itself
    assert rows["late_1"]["recovery_vs_16bit"] == "never"  # a jump of 1.0 at step 80 is not gone by step 90
    # 0.6 at step 20, 0.3 at 30: smoothed 0.24, 0.264, 0.158, 0.095, 0.057, 0.034 (step 70): within 0.05 from 70
    assert int(rows["early_2"]["recovery_vs_16bit"]) == 50 and float(rows["early_2"]["area_vs_16bit"]) > 0
    seeds = list(csv.DictReader((tmp_path / "out" / "report_seeds.csv").open()))
    assert [(r["transition.at"], r["seeds"]) for r in seeds] == [("0.2", "3"), ("null", "3"), ("0.8", "3")]
    early, fp16, late = seeds  # in the order of the run directories
    assert float(fp16["final_val_loss_mean"]) == pytest.approx(2.1)
    assert float(fp16["final_val_loss_std"]) == pytest.approx(0.02)
    assert fp16["vs_best"] == "best"
    assert early["vs_best"] == "+0.0100 ≈ best"  # 0.01 apart, seed spread 0.02 each
    assert late["vs_best"] == "+0.5000"
    assert "## Seeds: mean ± standard deviation" in text and "2.1000 ± 0.0200" in text


def test_auto_runs_of_several_seeds_form_one_group(tmp_path: Path):
    root = tmp_path / "auto"
    extra = ["transition.gap_every=10"]
    for seed, at in ((1, 30), (2, 40)):  # each seed chose its own step (logged as quant/switch_step)
        path = _run(root, f"auto_{seed}", at, seed, 2.0, jump=0.2, extra=extra)
        overrides = (path / ".hydra" / "overrides.yaml").read_text().replace(f"transition.at={at}", "transition.at=auto")
        (path / ".hydra" / "overrides.yaml").write_text(overrides)
        cfg = (path / ".hydra" / "config.yaml").read_text().replace(f"at: {at}\n", "at: auto\n")
        (path / ".hydra" / "config.yaml").write_text(cfg + "")
    make_report([root], tmp_path / "out")
    (group,) = list(csv.DictReader((tmp_path / "out" / "report_seeds.csv").open()))
    assert group["quantization"] == "16-bit -> ternary (at: auto)" and group["seeds"] == "2"
    assert float(group["switch_step_mean"]) == 35.0
