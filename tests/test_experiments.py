"""Every conf/experiment/*.yaml: it composes, builds its callbacks, sweeps what it says, and runs as a multirun."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY, bitflow_env, compose, read_scalars
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bitflow.callbacks import PrecisionTransition
from bitflow.cli import CONFIG_DIR, build_callbacks

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# experiment -> number of runs of `bitflow +experiment=X -m`
RUNS = {
    "fp16_baseline": 1,
    "ternary_scratch": 1,
    "transition_20pct": 4,
    "transition_50pct": 4,
    "transition_80pct": 4,
    "transition_sweep": 11,
    "phase_in_sweep": 6,
}


def _sweep(cfg) -> dict[str, list]:
    """The experiment's ``hydra.sweeper.params`` as key -> list of values, parsed by Hydra's own parser."""
    params = cfg.hydra.sweeper.get("params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()] for o in parsed}


def test_every_experiment_is_listed():
    assert EXPERIMENTS == sorted(RUNS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name: str, tiny_overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"+experiment={name}", *tiny_overrides],
                            return_hydra_config=True)
    assert cfg.task_name == name
    sweep = _sweep(cfg)
    assert math.prod(len(v) for v in sweep.values()) == RUNS[name]
    cfg = compose([f"+experiment={name}", *tiny_overrides])
    transitions = [c for c in build_callbacks(cfg) if isinstance(c, PrecisionTransition)]
    if name == "fp16_baseline":
        assert transitions == []
        return
    (transition,) = transitions
    if name == "ternary_scratch":
        assert transition.at == 0
    elif name.endswith("pct"):
        assert transition.at == int(name.split("_")[1][:-3]) / 100
        assert sweep == {"transition.optimizer_state": ["keep", "reset"], "transition.phase_in": ["none", "tanh"]}
        assert transition.lr_rewarmup_steps == cfg.scheduler.warmup_steps
    elif name == "transition_sweep":
        assert sweep == {"transition.at": [None, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    elif name == "phase_in_sweep":
        assert sweep == {"transition.phase_in": ["none", "linear", "tanh", "sigmoid", "exp", "cosine"]}
    # every swept combination is a valid transition
    for key, values in sweep.items():
        for value in values:
            kwargs = OmegaConf.to_container(cfg.transition, resolve=True)
            kwargs.pop("_target_")
            kwargs[key.split(".", 1)[1]] = value
            PrecisionTransition(**kwargs)


def _multirun(name: str, tmp_path: Path, cache_dir: Path, extra: list[str]) -> list[Path]:
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    proc = subprocess.run(
        ["bitflow", f"+experiment={name}", "-m", *overrides, *extra, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted((p for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


SMALL = ["trainer.max_steps=6", "trainer.val_check_interval=3", "transition.phase_in_steps=2", "transition.spike_window=2"]


def _overrides(run: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))


def _check_runs(name: str, runs: list[Path], max_steps: int) -> None:
    assert len(runs) == RUNS[name]
    for run in runs:
        scalars = read_scalars(run / "tb")
        assert len(scalars["train/loss"]) == max_steps, run
        assert "val/loss" in scalars
        assert (run / "checkpoints" / "last.ckpt").is_file()
        at = _overrides(run).get("transition.at")
        if name == "fp16_baseline" or at == "null":
            assert "quant/zero_fraction" not in scalars
            continue
        assert sorted(dict(scalars["quant/lambda"])) == list(range(max_steps))
        assert "quant/zero_fraction" in scalars and "quant/weight_scale" in scalars
        if name != "ternary_scratch" and at != "0":  # a spike needs 16-bit steps before the switch
            assert "transition/spike" in scalars


def test_transition_50pct_multirun(tmp_path: Path, cache_dir: Path):
    runs = _multirun("transition_50pct", tmp_path, cache_dir, SMALL)
    _check_runs("transition_50pct", runs, 6)
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
@pytest.mark.parametrize("name", ["fp16_baseline", "ternary_scratch", "transition_20pct", "transition_80pct",
                                  "phase_in_sweep", "transition_sweep"])
def test_experiment_multirun(name: str, tmp_path: Path, cache_dir: Path):
    extra = SMALL if name != "fp16_baseline" else SMALL[:2]
    if name == "transition_sweep":
        extra = [*extra, "trainer.max_steps=10", "trainer.val_check_interval=5"]
    runs = _multirun(name, tmp_path, cache_dir, extra)
    _check_runs(name, runs, 10 if name == "transition_sweep" else 6)
