"""bitflow-qid end to end: checkpoints of a real tiny run, real RTN post-training quantization, the table, the
cache (a rerun measures nothing new), the plots, and the errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bitflow.cli import run_training
from bitflow.qid import main, run_qid
from bitflow.qid.measure import CACHE_NAME, PTQSettings, find_checkpoints
from tests.helpers import compose


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, request) -> Path:
    cache_dir = request.getfixturevalue("cache_dir")
    from omegaconf import OmegaConf

    from tests.helpers import TINY

    out = tmp_path_factory.mktemp("qid") / "run"
    cfg = compose([*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
                   "+experiment=qid_checkpoints", "callbacks.model_checkpoint.every_n_train_steps=6"])
    run_training(cfg)
    (out / ".hydra").mkdir()  # what the bitflow app writes: bitflow-ptq reads the run's data config there
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return out


def test_checkpoints_are_found_by_step_and_last_is_not_counted_twice(run_dir: Path):
    found = find_checkpoints([run_dir])
    assert [(c.path.name, c.step, c.tokens_seen) for c in found] == [
        ("step000006.ckpt", 6, 6 * 4 * 32), ("step000012.ckpt", 12, 12 * 4 * 32)
    ]


def test_the_table_and_the_cache(run_dir: Path, tmp_path: Path):
    out = tmp_path / "qid"
    settings = PTQSettings(val_windows=4)
    first = run_qid([run_dir], ["rtn"], [2, 8], settings, out)
    assert first["measured"] == 4
    rows = list(csv.DictReader((out / "qid.csv").open()))
    assert [(r["step"], r["P"], r["D"]) for r in rows] == [
        ("6", "2", "768"), ("6", "8", "768"), ("12", "2", "1536"), ("12", "8", "1536")
    ]
    n = {r["N"] for r in rows}
    assert len(n) == 1 and int(n.pop()) > 0
    for r in rows:
        assert float(r["qid"]) == pytest.approx(float(r["val_loss_quantized"]) - float(r["val_loss_16bit"]), abs=1e-6)
    two, eight = (max(float(r["qid"]) for r in rows if r["P"] == p) for p in ("2", "8"))
    assert two > eight  # 2-bit RTN hurts more than 8-bit
    md = (out / "qid.md").read_text()
    assert "| run | checkpoint | step | N | D | P | method |" in md
    # one size, two token counts and two bit widths cannot fit 4 parameters: a note saying why, not a crash
    assert "rtn: no law fit: the fit" in md and ("singular: N takes the single value" in md or "usable point(s)" in md)
    assert (out / "qid_vs_D.png").stat().st_size > 1000 and len(list((out / CACHE_NAME).glob("*.json"))) == 4
    # a rerun measures nothing; a new bit width only its new points
    again = run_qid([run_dir], ["rtn"], [2, 8, 4], settings, out)
    assert again["measured"] == 2 and len(again["rows"]) == 6
    assert [r["qid"] for r in again["rows"] if r["P"] != 4] == [r["qid"] for r in first["rows"]]


def test_errors(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert f"{empty} holds no checkpoints (*.ckpt)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([str(empty), "--bits", "5"]) == 2
    assert "bits=5 is not allowed" in capsys.readouterr().err
    assert main([str(empty), "--methods", "awq"]) == 2
    assert "method='awq' is not allowed" in capsys.readouterr().err
