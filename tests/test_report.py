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
import torch
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from bitflow.report import find_runs, main, make_report, read_run, spike_cells, switch_points
from tests.helpers import compose

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


def test_bad_report_input_is_a_clear_error(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run directories"):
        find_runs([tmp_path / "empty"])
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


# ------------------------------------------------------------- runs of every kind, as bitflow writes them
def _hydra_run(
    path: Path, overrides: list[str], scalars: dict[str, list[tuple[int, float]]], config=None
) -> Path:
    """A run directory as the `bitflow` Hydra app writes it: ``.hydra/config.yaml`` (the composed config,
    unresolved, saved by OmegaConf as Hydra does), ``.hydra/overrides.yaml`` (the command line) and a real
    TensorBoard event file in ``tb/``. ``config`` defaults to conf/train.yaml composed with ``overrides``."""
    from omegaconf import OmegaConf

    (path / ".hydra").mkdir(parents=True)
    cfg = config if config is not None else compose(overrides)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    writer = SummaryWriter(str(path / "tb"))
    for tag, series in scalars.items():
        for step, value in series:
            writer.add_scalar(tag, value, step)
    writer.close()
    return path


def _composed(overrides: list[str]):
    """conf/train.yaml composed with ``overrides``, as a plain (non-struct) config keys can be added to."""
    from omegaconf import OmegaConf

    return OmegaConf.create(OmegaConf.to_container(compose(overrides), resolve=False))


def _legacy_dqt(at, bits=None, max_steps: int = MAX_STEPS):
    """The config of a DQT run of bitflow before the quantization recipes (`bitflow +dqt=ternary`): a 16-bit
    config plus the `dqt` callback node (conf/dqt/ternary.yaml on main) that callbacks.dqt interpolates."""
    from omegaconf import OmegaConf

    cfg = _composed([f"trainer.max_steps={max_steps}"])
    dqt = {
        "_target_": "bitflow.callbacks.dqt.DirectQuantizedTraining",
        "_convert_": "all",
        "at": at,
        "bits": bits,
        "act_bits": 8,
        "include": None,
        "exclude": ["lm_head"],
        "init_scale": "absmean",
        "scale_update": "max",
        "moment_dtype": "float32",
        "optimizer_state": "keep",
        "every_n_steps": None,
    }
    return OmegaConf.merge(cfg, {"dqt": dqt, "callbacks": {"dqt": "${dqt}"}})


def _val(final: float) -> dict[str, list[tuple[int, float]]]:
    return {
        "val/loss": [(49, final + 0.5), (99, final)],
        "train/tokens_per_sec": [(10, 1000.0), (20, 1200.0)],
    }


@pytest.fixture
def kinds(tmp_path: Path) -> Path:
    """One run of every kind: 16-bit (two seeds), BitLinear ternary from scratch and switched at 50%, DQT from
    scratch and switched at 30% (legacy `dqt` node, no quant/switch_step scalar), a run that logs
    quant/switch_step itself (the new PrecisionTransition driving DQT int8), one without val/loss, and one
    whose spike is negative."""
    root = tmp_path / "kinds"
    ms = f"trainer.max_steps={MAX_STEPS}"
    _hydra_run(root / "fp16_a", [ms, "seed=1"], _val(2.0))
    _hydra_run(root / "fp16_b", [ms, "seed=2"], _val(2.2))
    _hydra_run(
        root / "ste_scratch", [ms, "quant=ternary", "transition=default", "transition.at=0"], _val(2.9)
    )
    _hydra_run(
        root / "ste_switch",
        [ms, "quant=ternary", "transition=default", "transition.at=0.5"],
        {**_val(2.4), "transition/spike": [(60, 0.3)], "quant/lambda": [(40, 0.0), (50, 1.0)]},
    )
    _hydra_run(root / "dqt_scratch", [ms, "+dqt=ternary"], _val(3.1), config=_legacy_dqt(0))
    _hydra_run(root / "dqt_switch", [ms, "+dqt=ternary", "dqt.at=0.3"], _val(2.6), config=_legacy_dqt(0.3))

    new_dqt = _composed([ms, "quant=dqt_int8", "transition=default", "transition.at=0.5"])
    _hydra_run(
        root / "dqt_int8_logged",
        [ms, "quant=dqt_int8", "transition=default", "transition.at=0.5"],
        {**_val(2.5), "quant/switch_step": [(40, 40.0)], "transition/spike": [(45, -0.05)]},
        config=new_dqt,
    )
    _hydra_run(
        root / "no_val",
        [ms, "quant=ternary", "transition=default", "transition.at=0.5"],
        {"train/loss": [(0, 5.0), (10, 4.0)]},
    )
    return root


def test_report_labels_and_baselines_every_kind_of_run(kinds: Path):
    result = make_report([kinds], out=kinds / "report")
    rows = {Path(r["run"]).name: r for r in result["rows"]}
    assert len(rows) == 8  # every run is in the table, the one without val/loss too
    expected = {
        "fp16_a": (None, "16-bit"),
        "fp16_b": (None, "16-bit"),
        "ste_scratch": (0, "ternary from scratch"),
        "ste_switch": (50, "16-bit -> ternary at step 50"),
        "dqt_scratch": (0, "DQT ternary from scratch"),
        "dqt_switch": (30, "16-bit -> DQT ternary at step 30"),
        "dqt_int8_logged": (40, "16-bit -> DQT int8 at step 40"),  # the logged scalar wins over transition.at
        "no_val": (50, "16-bit -> ternary at step 50"),
    }
    assert {k: (r["switch_step"], r["quantization"]) for k, r in rows.items()} == expected

    runs = [read_run(Path(r["run"])) for r in result["rows"]]
    data = switch_points(runs, [])
    # the 16-bit baseline averages the two 16-bit runs only; each method has its own from-scratch baseline
    assert data.fp16 == pytest.approx(2.1)
    assert data.scratch == pytest.approx({"DQT ternary from scratch": 3.1, "ternary from scratch": 2.9})
    points = {x: y for pts in data.series.values() for x, y in pts}
    assert points == pytest.approx({50.0: 2.4, 30.0: 2.6, 40.0: 2.5})
    assert set(data.series) == {"ternary", "DQT ternary", "DQT int8"}  # methods differ: one series each

    # the legend of val_loss.png names the quantization; the 16-bit runs are the only "(16-bit)" ones
    md = result["markdown"].read_text().split("## Seeds")[0]  # the run table (the two 16-bit seeds form a group below)
    assert md.count("| 16-bit |") == 2 and "| DQT ternary from scratch |" in md


def test_missing_metrics_and_negative_spikes_are_shown_as_such(kinds: Path):
    result = make_report([kinds], out=kinds / "report")
    md = result["markdown"].read_text()
    no_val = next(line for line in md.splitlines() if line.startswith("| no_val |"))
    assert "| – | – |" in no_val  # final and best val loss missing, shown as –
    assert "no val/loss logged (metrics shown as –, not in the loss plots): no_val" in md
    with open(result["csv"]) as f:
        table = {Path(r["run"]).name: r for r in csv.DictReader(f)}
    assert table["no_val"]["final_val_loss"] == "" and table["no_val"]["switch_step"] == "50"
    # the table keeps the negative spike; the plot draws it as 0, and both say so
    assert float(table["dqt_int8_logged"]["transition/spike"]) == pytest.approx(-0.05)
    assert "transition/spike < 0" in md and "dqt_int8_logged (-0.0500)" in md
    runs = [read_run(Path(r["run"])) for r in result["rows"]]
    for r, row in zip(runs, result["rows"], strict=True):
        r.display = Path(row["run"]).name
    cells, negative = spike_cells(runs)
    assert negative == ["dqt_int8_logged (-0.0500)"]
    assert sorted(v for vs in cells.values() for v in vs) == pytest.approx([0.0, 0.3])
    assert {p.name for p in result["plots"]} == {
        "val_loss.png",
        "final_loss_vs_switch.png",
        "spike_by_phase_in.png",
    }


def test_markdown_table_holds_the_differing_settings_and_key_metrics(tmp_path: Path):
    """A dqt_vs_ste-like sweep (`+dqt=none,ternary,int8,ste_ternary`): the DQT callback's 15 options differ
    between the runs only by being there; the markdown table sums them up as the quantization column."""
    root = tmp_path / "dqt_vs_ste"
    ms = f"trainer.max_steps={MAX_STEPS}"
    _hydra_run(root / "0", ["+dqt=none", ms], _val(2.0), config=compose([ms]))
    _hydra_run(root / "1", ["+dqt=ternary", ms], _val(2.3), config=_legacy_dqt(0))
    _hydra_run(root / "2", ["+dqt=int8", ms], _val(2.1), config=_legacy_dqt(0, bits=8))
    _hydra_run(
        root / "3",
        ["+dqt=ste_ternary", ms],
        _val(2.2),
        config=compose([ms, "quant=ternary", "transition=default", "transition.at=0"]),
    )
    result = make_report([root])
    with open(result["csv"]) as f:
        header = next(csv.reader(f))
    assert len(header) > 30  # the full table: every differing setting (dqt.*, callbacks.dqt.*, transition.*)
    md = result["markdown"].read_text()
    columns = [c.strip() for c in md.splitlines()[4].strip("|").split("|")]
    assert columns == [
        "run",
        "quantization",
        "dqt",
        "switch_step",
        "final_val_loss",
        "final_val_ppl",
        "best_val_loss",
        "tokens_per_sec",
        "wall_time_s",
        "size_mbit",
    ]
    # the others are counted: every setting column of the CSV but the one shown
    from bitflow.report.table import KEY_METRICS

    not_settings = ("run", "quantization", "best_val_ppl", "last_step", "size_mbit_storage", *KEY_METRICS)
    settings = [h for h in header if h not in not_settings]
    assert len(settings) > 20 and f"({len(settings) - 1} more differ: see report.csv)" in md
    rows = [line.split(" | ")[1] for line in md.splitlines()[6:10]]
    assert rows == ["16-bit", "DQT ternary from scratch", "DQT int8 from scratch", "ternary from scratch"]
    sizes = [r["size_mbit"] for r in result["rows"]]  # bitflow.quant.size: ternary weights at log2(3) bits
    assert 0 < sizes[3] < sizes[0]


def test_relative_and_absolute_paths_mix(kinds: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = make_report(["kinds/fp16_a", str(kinds / "ste_switch"), "./kinds/fp16_a"], out="rep")
    assert [Path(r["run"]).name for r in result["rows"]] == [
        "fp16_a",
        "ste_switch",
    ]  # the same run counts once
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| fp16_a |" in md and "| ste_switch |" in md
    assert (tmp_path / "rep" / "val_loss.png").is_file()
    # and through the console script, as a user types it
    proc = subprocess.run(
        ["bitflow-report", "kinds/dqt_scratch", str(kinds / "dqt_switch"), "--out", "rep2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "DQT ternary from scratch" in (tmp_path / "rep2" / "report.md").read_text()


def test_a_failure_writes_nothing(kinds: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the previous report\n")
    (kinds / "fp16_a" / "eval_results.json").write_text("{not json")
    assert main([str(kinds), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert (out / "report.md").read_text() == "the previous report\n"


def test_bad_input_names_the_path_before_writing(kinds: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for bad, message in (
        ("missing", f"no such directory: missing (= {tmp_path / 'missing'})"),
        ("empty", f"no run directories (with tb/ or .hydra/) under empty (= {tmp_path / 'empty'})"),
        ("afile", "not a directory: afile"),
    ):
        assert main([str(kinds / "fp16_a"), bad, "--out", "out"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.lower()
    for needle in (
        "dir",
        "--out",
        "report.md",
        "report.csv",
        "val_loss.png",
        "examples:",
        "absolute paths can be mixed",
    ):
        assert needle in text


def test_event_reader_keeps_the_last_value_of_a_step_logged_twice(tmp_path: Path):
    """A resumed run writes a second event file into the same tb/ that logs some steps again: one value per
    step, the later one; the wall time sums each file's span (the pause before the resume does not count) and
    leaves out eval/ scalars appended afterwards."""
    from bitflow.events import read_events, read_scalars

    first = SummaryWriter(str(tmp_path / "tb"), filename_suffix=".a")
    for step in range(4):
        first.add_scalar("train/loss", 5.0 - step, step, walltime=1000.0 + step)
    first.add_histogram("w", torch.arange(10.0), 3, walltime=1003.0)
    first.close()
    second = SummaryWriter(str(tmp_path / "tb"), filename_suffix=".b")
    for step in range(2, 6):
        second.add_scalar("train/loss", 10.0 + step, step, walltime=2000.0 + step)
    second.add_scalar("eval/piqa/acc", 0.5, 5, walltime=9000.0)
    second.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    events = read_events(tmp_path, histograms=True)
    assert events.scalars["train/loss"] == [(0, 5.0), (1, 4.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    # 1000 .. 1003 (3 s; the histogram is not a scalar) + 2002 .. 2005 (3 s): not the pause, not the evaluation
    assert events.wall_time_span() == pytest.approx(6.0)
    assert [(step, h.num) for step, h in events.histograms["w"]] == [(3, 10)]
    assert read_scalars(tmp_path / "tb") == events.scalars
    assert read_scalars(tmp_path / "missing") == {}


@pytest.mark.slow
def test_report_on_a_real_tiny_multirun(tmp_path: Path, cache_dir: Path):
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BITFLOW_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [
            "bitflow",
            "-m",
            "quant=ternary",
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


def test_a_group_chosen_by_an_experiment_shows_its_option(tmp_path: Path):
    """`+experiment=transition_50pct` picks quant=ternary inside the experiment file (`override /quant: ternary`):
    not on the command line, so the report reads Hydra's record of the choice (.hydra/hydra.yaml)."""
    from omegaconf import OmegaConf

    ms = "trainer.max_steps=10"
    typed = _hydra_run(tmp_path / "0", [ms, "quant=ternary", "transition=default"], _val(2.0))
    chosen = _hydra_run(tmp_path / "1", [ms, "+experiment=transition_50pct"], _val(2.1))
    for run_dir, quant in ((typed, "ternary"), (chosen, "ternary")):
        choices = {"quant": quant, "transition": "default", "hydra/launcher": "basic"}
        OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), run_dir / ".hydra" / "hydra.yaml")
    runs = [read_run(typed), read_run(chosen)]
    assert [r.setting("quant") for r in runs] == ["ternary", "ternary"]
    assert [r.setting("transition") for r in runs] == ["default", "default"]
    assert "hydra/launcher" not in runs[1].choices
