"""Every conf/experiment/*.yaml: it composes, builds its callbacks, sweeps what it says, and runs as a multirun."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from bitflow.callbacks import PrecisionTransition
from bitflow.cli import CONFIG_DIR, build_callbacks
from tests.helpers import TINY, bitflow_env, compose, read_scalars

# the decoder's experiments (the other model families' when158_* experiments: tests/test_tasks.py)
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if not p.stem.startswith("when158_"))
# the 16-bit -> 1.58-bit study: experiment -> number of runs of `bitflow +experiment=X -m`
STUDY = {
    "study": 1,
    "fp16_baseline": 1,
    "ternary_scratch": 1,
    "transition_20pct": 4,
    "transition_50pct": 4,
    "transition_80pct": 4,
    "transition_sweep": 11,
    "phase_in_sweep": 6,
}


def _compose_with_hydra(overrides: list[str]):
    """The composed config including its ``hydra`` node (where the sweeper params live)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _sweep(cfg) -> dict[str, list]:
    """The experiment's ``hydra.sweeper.params`` as key -> list of values, parsed by Hydra's own parser."""
    params = cfg.hydra.sweeper.get("params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in parsed}


def test_the_study_is_complete_and_runs_on_one_budget():
    assert set(STUDY) <= set(EXPERIMENTS)
    assert {compose([f"+experiment={name}", "paths.output_dir=."]).trainer.max_steps for name in STUDY} == {350}
    # and so does the DQT study (experiments/dqt_vs_ste), on the same budget
    assert compose(["+experiment=dqt_vs_ste", "paths.output_dir=."]).trainer.max_steps == 350
    # one base file holds the budget; the study experiments inherit it
    sets_budget = re.compile(r"^\s*max_steps:", re.M)  # a key, not a comment that mentions it
    assert [p.name for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if sets_budget.search(p.read_text())] == [
        "study.yaml"
    ]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name: str, tiny_overrides: list[str]):
    sweep = _sweep(_compose_with_hydra([f"+experiment={name}", *tiny_overrides]))
    cfg = compose([f"+experiment={name}", *tiny_overrides])
    assert cfg.task_name == name
    transitions = [c for c in build_callbacks(cfg) if isinstance(c, PrecisionTransition)]
    if name == "dqt_vs_ste":  # a one-axis sweep over what the model is quantized to
        assert sweep == {"quant": ["none", "ternary", "dqt_ternary", "dqt_int8"]}
    elif name not in STUDY:
        return  # another study's experiment: it composes and builds its callbacks
    else:
        assert math.prod(len(v) for v in sweep.values()) == STUDY[name]
    if name == "fp16_baseline":
        assert transitions == [] and cfg.quant.recipe == "none"
        return
    if name == "ternary_scratch":
        (transition,) = transitions
        assert transition.at == 0 and cfg.quant.recipe == "bitlinear"  # quant=ternary alone: from step 0
    elif name.endswith("pct"):
        (transition,) = transitions
        assert transition.at == int(name.split("_")[1][:-3]) / 100
        assert sweep == {"transition.optimizer_state": ["keep", "reset"], "transition.phase_in": ["none", "tanh"]}
        assert transition.lr_rewarmup_steps == cfg.scheduler.warmup_steps
    elif name == "transition_sweep":
        assert sweep == {"transition.at": [None, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    elif name == "phase_in_sweep":
        assert sweep == {"transition.phase_in": ["none", "linear", "tanh", "sigmoid", "exp", "cosine"]}
    # every swept combination is a valid run: its quant and transition build (and are checked) as bitflow does
    for combo in itertools.product(*sweep.values()):
        overrides = [f"{k}={'null' if v is None else v}" for k, v in zip(sweep, combo, strict=True)]
        run = compose([f"+experiment={name}", *tiny_overrides, *overrides])
        built = [c for c in build_callbacks(run) if isinstance(c, PrecisionTransition)]
        assert len(built) == (0 if run.quant.recipe == "none" else 1), combo


def _multirun(name: str, tmp_path: Path, cache_dir: Path, extra: list[str]) -> list[Path]:
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    proc = subprocess.run(
        ["bitflow", f"+experiment={name}", *overrides, *extra, f"hydra.sweep.dir={tmp_path / 'sweep'}", "-m"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted((p.parent for p in (tmp_path / "sweep").glob("*/.hydra")), key=lambda p: int(p.name.split("_")[0]))


SMALL = ["trainer.max_steps=6", "trainer.val_check_interval=3", "transition.phase_in_steps=2", "transition.spike_window=2"]


def _overrides(run: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))


def _check_runs(name: str, runs: list[Path], max_steps: int, expected_runs: int) -> None:
    assert len(runs) == expected_runs
    for run in runs:
        scalars = read_scalars(run / "tb")
        assert len(scalars["train/loss"]) == max_steps, run
        assert "val/loss" in scalars
        assert (run / "checkpoints" / "last.ckpt").is_file()
        if name not in STUDY:
            continue
        at = _overrides(run).get("transition.at")
        if name in ("study", "fp16_baseline") or at == "null":
            assert "quant/zero_fraction" not in scalars
            continue
        assert sorted(dict(scalars["quant/lambda"])) == list(range(max_steps))
        assert "quant/zero_fraction" in scalars and "quant/weight_scale" in scalars
        assert len(scalars["quant/switch_step"]) == 1  # what bitflow-report reads
        if name != "ternary_scratch" and at != "0":  # a spike needs 16-bit steps before the switch
            assert "transition/spike" in scalars


def test_transition_50pct_multirun(tmp_path: Path, cache_dir: Path):
    runs = _multirun("transition_50pct", tmp_path, cache_dir, SMALL)
    _check_runs("transition_50pct", runs, 6, 4)
    combos = {(o["transition.optimizer_state"], o["transition.phase_in"]): run for run in runs if (o := _overrides(run))}
    assert sorted(combos) == [("keep", "none"), ("keep", "tanh"), ("reset", "none"), ("reset", "tanh")]
    scalars = read_scalars(combos["reset", "tanh"] / "tb")  # switch at step 3, tanh over 2 steps, re-warmup 2
    lam = dict(scalars["quant/lambda"])
    assert [lam[s] for s in range(6)] == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.8483, 1.0], abs=1e-4)
    lr = dict(scalars["train/lr"])
    assert lr[3] == 0.0 and 0.0 < lr[4] < lr[5]
    assert "quant/flip_rate" in scalars
    assert dict(read_scalars(combos["keep", "none"] / "tb")["quant/lambda"])[3] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e != "transition_50pct"])
def test_experiment_multirun(name: str, tmp_path: Path, cache_dir: Path, tiny_overrides: list[str]):
    cfg = compose([f"+experiment={name}", *tiny_overrides])
    extra = SMALL if "_target_" in (cfg.get("transition") or {}) else SMALL[:2]
    max_steps = 6
    if name == "transition_sweep":  # 10 steps, so that the switch points 10% ... 90% are distinct steps
        max_steps = 10
        extra = [*extra, "trainer.max_steps=10", "trainer.val_check_interval=5"]
    expected = math.prod(len(v) for v in _sweep(_compose_with_hydra([f"+experiment={name}"])).values())
    runs = _multirun(name, tmp_path, cache_dir, extra)
    _check_runs(name, runs, max_steps, expected)
