"""``bitflow-eval``: the results table, eval_results.json next to the checkpoint, TensorBoard scalars in the
run's tb/ at the checkpoint's step, perplexity of text files, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bitflow.data.sources import TextSource
from bitflow.eval.harness import BitflowLM
from bitflow.eval.perplexity import perplexity_of_split, perplexity_of_tokens
from bitflow.eval.run import lm_eval_cli, main, parse_args

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint


def _tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_eval_writes_results_json_and_tensorboard(tiny_run_checkpoint: Path, tmp_path: Path, capsys):
    text = tmp_path / "sample.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 8)
    rc = main(
        [
            f"ckpt={tiny_run_checkpoint}",
            "tasks=bitflow_next_line",
            "limit=6",
            "device=cpu",
            f"perplexity={text}",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "bitflow_next_line" in out and "acc_norm" in out and "ppl_files" in out
    record = json.loads((tiny_run_checkpoint.parent / "eval_results.json").read_text())
    assert record["checkpoint"] == "last.ckpt" and record["global_step"] == 7
    acc = record["results"]["bitflow_next_line"]["acc"]
    assert acc in {k / 6 for k in range(7)}
    # the file perplexity equals a direct sliding-window computation with the same model
    adapter = BitflowLM(ckpt=str(tiny_run_checkpoint), device="cpu")
    ids = adapter.tokenizer.encode(text.read_text()).ids
    want = perplexity_of_tokens(adapter.model, ids, prefix=adapter.eot_token_id)
    assert record["perplexity"]["ppl_files"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert record["perplexity"]["ppl_files"]["ppl"] == pytest.approx(math.exp(want["loss"]), rel=1e-6)
    scalars = _tb_scalars(tiny_run_checkpoint.parent.parent / "tb")
    assert scalars["eval/bitflow_next_line/acc"] == [(7, pytest.approx(acc))]
    assert "eval/ppl_files/ppl" in scalars and "eval/ppl_files/tokens" not in scalars

    # a second evaluation of the same checkpoint adds its tasks to the file
    assert (
        main([f"ckpt={tiny_run_checkpoint}", "tasks=bitflow_docstring_names", "limit=3", "device=cpu"]) == 0
    )
    record = json.loads((tiny_run_checkpoint.parent / "eval_results.json").read_text())
    assert set(record["results"]) == {"bitflow_next_line", "bitflow_docstring_names"}
    assert "ppl_files" in record["perplexity"]


def test_arguments_are_parsed_and_checked():
    args = parse_args(
        ["ckpt=x.ckpt", "tasks=[piqa, sciq]", "limit=50", "batch_size=auto", "tensorboard=false"]
    )
    assert (args.tasks, args.limit, args.batch_size, args.tensorboard) == ("piqa,sciq", 50, "auto", False)
    assert parse_args(["ckpt=x", "limit=0.25"]).limit == 0.25
    with pytest.raises(ValueError, match="unknown argument 'task'; allowed: ckpt, tasks"):
        parse_args(["ckpt=x", "task=piqa"])
    with pytest.raises(ValueError, match="ckpt=PATH is required"):
        parse_args(["tasks=local"])
    with pytest.raises(ValueError, match="limit='many' is not a valid float"):
        parse_args(["ckpt=x", "limit=many"])
    with pytest.raises(ValueError, match="key=value"):
        parse_args(["x.ckpt"])


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda tmp: f"ckpt={tmp / 'missing.ckpt'}", "checkpoint not found"),
        (
            lambda tmp: (tmp / "a.ckpt").write_text("hello") and f"ckpt={tmp / 'a.ckpt'}",
            "not a bitflow checkpoint",
        ),
    ],
)
def test_bad_checkpoints_are_clear_errors(tmp_path: Path, capsys, make, message):
    assert main([make(tmp_path), "tasks=bitflow_next_line"]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_task_fails_before_loading_and_lists_the_groups(tmp_path: Path, capsys):
    # the checkpoint does not even exist: the task names are checked first
    assert main([f"ckpt={tmp_path / 'missing.ckpt'}", "tasks=bitflow_nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['bitflow_nonexistent']" in err and "Known groups: local, paper11, spectra" in err


def test_validation_perplexity_uses_the_runs_corpus(tiny_run_checkpoint: Path, tmp_path: Path):
    (tmp_path / "train.txt").write_text("x = 1\n" * 40)
    (tmp_path / "val.txt").write_text("def g(y):\n    return y + 1\n" * 6)
    source = {
        "_target_": "bitflow.data.sources.TextSource",
        "paths": str(tmp_path / "train.txt"),
        "val_paths": str(tmp_path / "val.txt"),
    }
    config = {"data": {"source": source, "cache_dir": str(tmp_path / "cache")}}
    run = tiny_run_checkpoint.parent.parent
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([f"ckpt={tiny_run_checkpoint}", "tasks=none", "perplexity=val", "device=cpu"]) == 0
    record = json.loads((tiny_run_checkpoint.parent / "eval_results.json").read_text())
    adapter = BitflowLM(ckpt=str(tiny_run_checkpoint), device="cpu")
    src = TextSource(str(tmp_path / "train.txt"), val_paths=str(tmp_path / "val.txt"))
    want = perplexity_of_split(adapter.model, adapter.tokenizer, src, "val", cache_dir=tmp_path / "cache")
    assert record["perplexity"]["ppl_val"] == pytest.approx(want)
    assert record["results"] == {}
    assert _tb_scalars(run / "tb")["eval/ppl_val/loss"] == [(7, pytest.approx(want["loss"]))]


def test_bitflow_lm_eval_is_lm_evals_cli_with_bitflow(tiny_run_checkpoint: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bitflow-lm-eval"])
    args = [
        "--model",
        "bitflow",
        "--model_args",
        f"ckpt={tiny_run_checkpoint}",
        "--tasks",
        "bitflow_next_line",
    ]
    lm_eval_cli([*args, "--limit", "3", "--device", "cpu", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert "bitflow_next_line" in out and "acc_norm" in out
