"""The `task` group end to end: each family trains from `task=... model=...` on the offline data and beats the
majority baseline, switches mid-run through PrecisionTransition (Parameters kept, optimizer state keep/reset),
resumes exactly, logs its metrics under val/; bad input fails before training with a clear message."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from bitflow.callbacks import PrecisionTransition
from bitflow.cli import instantiate, prepare_config, run_training
from bitflow.config import ConfigError, to_plain
from bitflow.tasks import build_module
from tests.callbacks.test_transition import Probe
from tests.helpers import compose, read_scalars

pytest.importorskip("torch_geometric")

COMMON = ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.precision=32-true",
          "scheduler.warmup_steps=0"]
# a BPE of 2048 tokens on 200 stdlib files (quick to train; with 320 tokens the bags of tokens do not separate the
# packages)
SMALL_SETS = ["data.tokenizer_max_files=200", "data.vocab_size=2048", "data.min_files=20", "data.max_per_class=12"]
TASKS = {
    "text_classification": [*SMALL_SETS, "model.d_hidden=64", "optimizer.lr=1e-2", "optimizer.weight_decay=0"],
    "node_classification": [*SMALL_SETS, "optimizer.lr=5e-2", "optimizer.weight_decay=0"],
    "node_classification/gcn": [*SMALL_SETS, "model=gcn", "model.d_hidden=16", "optimizer.lr=2e-2",
                                "optimizer.weight_decay=0"],
    "mlm": ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=8",
            "data.source.max_files=60", "data.vocab_size=320", "data.val_windows=8"],
    "span_corruption": ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=64", "data.seq_len=32",
                        "data.batch_size=8", "data.source.max_files=60", "data.vocab_size=320", "data.val_windows=8"],
}


def overrides(task: str, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"task={task.split('/')[0]}", *TASKS[task], *COMMON, f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={out}", *extra]


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("task", ["text_classification", "node_classification",
                                  pytest.param("node_classification/gcn", marks=pytest.mark.slow)])
def test_classifiers_train_and_beat_the_majority_baseline(task: str, cache_dir: Path, tmp_path: Path):
    cfg = compose(overrides(task, cache_dir, tmp_path, "trainer.max_steps=40", "trainer.val_check_interval=20"))
    dm = instantiate(cfg.data)
    dm.prepare_data()
    if task.startswith("node"):
        baseline = dm.majority_baseline
        assert dm.graph["edge_index"].shape[1] > 0
    else:
        baseline = dm.data.majority_baseline
    assert dm.n_classes >= 5 and baseline < 0.5
    run_training(cfg)
    scalars = read_scalars(tmp_path / "tb")
    assert len(scalars["val/acc"]) == 2  # two validations
    assert scalars["val/acc"][-1][1] > baseline + 0.1
    assert 0 < scalars["val/macro_f1"][-1][1] <= 1 and "val/loss" in scalars and "train/loss" in scalars
    # bitflow-report reads the run: val/loss and the task's metrics in its table
    from bitflow.report import make_report

    report = make_report([tmp_path], tmp_path / "report")
    (row,) = report["rows"]
    assert row["final_val_loss"] == pytest.approx(scalars["val/loss"][-1][1])
    assert row["val/acc"] == pytest.approx(scalars["val/acc"][-1][1])
    assert "| val/acc | val/macro_f1 |" in report["markdown"].read_text()


@pytest.mark.slow
def test_mlm_beats_the_most_frequent_token(cache_dir: Path, tmp_path: Path):
    cfg = compose(overrides("mlm", cache_dir, tmp_path, "trainer.max_steps=80", "trainer.val_check_interval=40"))
    run_training(cfg)
    scalars = read_scalars(tmp_path / "tb")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    counts = Counter(dm.val_dataset.tokens.tolist())
    majority = max(counts.values()) / sum(counts.values())
    assert scalars["val/masked_acc"][-1][1] > majority
    assert scalars["val/loss"][-1][1] < scalars["val/loss"][0][1]


@pytest.mark.slow
def test_span_corruption_beats_the_unigram_baseline(cache_dir: Path, tmp_path: Path):
    cfg = compose(overrides("span_corruption", cache_dir, tmp_path, "trainer.max_steps=80",
                            "trainer.val_check_interval=40"))
    run_training(cfg)
    scalars = read_scalars(tmp_path / "tb")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    counts = Counter(dm.val_dataset.tokens.tolist())
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())  # the best constant predictor
    assert scalars["val/loss"][-1][1] < entropy


# ------------------------------------------------------------------------------------------------ switch, resume
def fit_with_probe(cfg, transition: PrecisionTransition, tmp_path: Path):
    dm = instantiate(cfg.data)
    dm.prepare_data()
    module = build_module(cfg, dm)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, precision="32-true", log_every_n_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[transition, probe],
    )
    trainer.fit(module, datamodule=dm)
    return probe, module


SWITCHED = {
    "text_classification": ["hidden", "out"],
    "node_classification": ["convs.0.lin"],
    "mlm": [f"layers.{i}.{n}" for i in range(2) for n in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.fc1",
                                                          "mlp.fc2")] + ["mlm_head.dense"],
    "span_corruption": None,  # every projection but lm_head
}


@pytest.mark.parametrize("task, mode", [("text_classification", "keep"), ("node_classification", "reset"),
                                        ("mlm", "keep"), ("span_corruption", "keep")])
def test_mid_run_switch_keeps_the_parameters(task: str, mode: str, cache_dir: Path, tmp_path: Path):
    cfg = compose(overrides(task, cache_dir, tmp_path, "trainer.max_steps=4", "quant=ternary_median"))
    transition = PrecisionTransition(at=2, optimizer_state=mode, quant=to_plain(cfg.quant), spike_window=1)
    probe, module = fit_with_probe(cfg, transition, tmp_path)
    ids = probe.start[0]["param_ids"]
    assert all(probe.start[s]["param_ids"] == ids for s in range(4))  # the same Parameters throughout
    assert probe.start[2]["opt_param_ids"] == sorted(ids.values())
    assert "BitLinear" not in probe.start[1]["types"].values()
    converted = [n for n, t in probe.start[2]["types"].items() if t == "BitLinear"]
    expected = SWITCHED[task]
    if expected is None:
        assert "lm_head" not in converted and "decoder.1.cross.wq" in converted and len(converted) == 2 * 7 + 2 * 11
    else:
        assert converted == expected
    state = module.quant_state
    assert state["layers"] == converted and state["options"]["weight_scale"] == "absmedian"
    before, after = probe.end[1]["state"], probe.start[2]["state"]
    for name in before:
        if mode == "keep":
            assert torch.equal(before[name]["exp_avg"], after[name]["exp_avg"]), name
        elif name.rsplit(".", 1)[0] in converted:  # reset: the converted layers' moments start afresh
            assert name not in after or float(after[name]["step"]) == 0, name


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("task", ["node_classification", pytest.param("text_classification", marks=pytest.mark.slow)])
def test_resume_matches_the_uninterrupted_run(task: str, cache_dir: Path, tmp_path: Path):
    common = overrides(task, cache_dir, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=3",
                       "+callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=-1",
                       "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.filename='step{step}'",
                       "quant=ternary", "transition=default", "transition.at=3", "transition.spike_window=1")
    full_dir = tmp_path / "full"
    run_training(compose([*common, f"paths.output_dir={full_dir}"]))
    full = _ckpt(full_dir / "checkpoints" / "step6.ckpt")
    assert full["bitflow"]["task"] == task and full["bitflow"]["quant"]["layers"]
    for k in (2, 4):
        out = tmp_path / f"resumed{k}"
        run_training(compose([*common, f"paths.output_dir={out}", f"ckpt_path={full_dir / 'checkpoints' / f'step{k}.ckpt'}"]))
        resumed = _ckpt(out / "checkpoints" / "step6.ckpt")
        assert resumed["bitflow"]["quant"] == full["bitflow"]["quant"]
        for name, value in full["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][name]), (k, name)
        a, b = full["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
        assert set(a) == set(b) and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    # a checkpoint of one task does not resume another
    with pytest.raises(ConfigError, match=r"the checkpoint was trained with task=\w+, this run has task="):
        other = "node_classification" if task == "text_classification" else "text_classification"
        run_training(compose([*overrides(other, cache_dir, tmp_path / "x", "trainer.max_steps=6", "quant=ternary",
                                         "transition=default", "transition.at=3"),
                              f"ckpt_path={full_dir / 'checkpoints' / 'step4.ckpt'}"]))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, match", [
    (["task=node_classification", "model=tiny"],
     r"task=node_classification trains a gnn model, but model.family='decoder' \(a Llama decoder preset\); pick a "
     r"gnn preset \(model=gcn, model=sgc\)"),
    (["task=mlm", "model=sgc"], r"task=mlm trains an encoder model, but model.family='gnn'.*task=node_classification"),
    (["model=encoder_tiny"], r"task=causal_lm trains a decoder model, but model.family='encoder'.*task=mlm"),
    (["task=mlm", "task.mask_prob=1.5"], r"task.mask_prob=1.5 is not allowed; allowed: a number in \(0, 1\)"),
    (["task=span_corruption", "task.n_sentinels=2"], r"task.n_sentinels=2 is too few: data.seq_len=128 gives 6"),
    (["task=text_classification", "model.d_hidden=0"], r"model.d_hidden must be a positive integer"),
    (["task=node_classification", "model.arch=gat"], r"model.arch='gat' is not allowed; allowed: sgc, gcn"),
    (["task=text_classification", "data=stdlib"], r"data._target_='bitflow.data.TokenDataModule' is not allowed for "
     r"task=text_classification"),
    (["task=summarize"], r"task"),
])
def test_bad_task_configs_fail_before_training(args: list[str], match: str):
    with pytest.raises((ConfigError, Exception), match=match):
        prepare_config(compose(args))


def test_missing_torch_geometric_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    with pytest.raises(ConfigError, match=r"install the `graph` extra: pip install -e '.\[graph\]'"):
        prepare_config(compose(["task=node_classification"]))


def test_graphs_without_training_labels_or_with_one_class_are_refused():
    from bitflow.data.graph import NodeClassificationDataModule

    dm = NodeClassificationDataModule()
    g = {"x": torch.randn(4, 3), "edge_index": torch.tensor([[0, 1], [1, 0]]), "y": torch.tensor([0, 1, -1, 1]),
         "train_mask": torch.tensor([True, True, True, False]), "val_mask": torch.tensor([False, False, False, True])}
    with pytest.raises(ValueError, match=r"1 training example\(s\) have no label"):
        dm.set_graph(g, ["a", "b"], "a test graph")
    g["y"] = torch.tensor([0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"a test graph has 1 class\(es\); classification needs at least 2"):
        dm.set_graph(g, ["a"], "a test graph")
    g["train_mask"] = torch.tensor([True, True, False, False])
    with pytest.raises(ValueError, match=r"the training split holds 1 class"):
        dm.set_graph(g, ["a", "b"], "a test graph")


def test_hf_dataset_without_the_label_column_or_offline_is_a_clear_error(tmp_path: Path):
    pytest.importorskip("datasets")
    from bitflow.data.classification import TextClassificationDataModule

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"doc {i}", "stars": i % 2}) + "\n" for i in range(6)))
    dm = TextClassificationDataModule("json", data_files=str(rows), val_split="train", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.label_column='label' is not allowed: .* no such column; available "
                                         r"columns: \['stars', 'text'\]"):
        dm.prepare_data()
    dm = TextClassificationDataModule("no-such-dataset-xyz", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.dataset='no-such-dataset-xyz'.* could not be loaded .*network"):
        dm.prepare_data()


@pytest.mark.parametrize("name, runs", [("when158_mlp", 9), ("when158_gnn", 18), ("when158_encoder", 27),
                                        ("when158_encdec", 27)])
def test_when158_experiments_sweep_every_combination_and_each_passes_the_checks(name: str, runs: int):
    from tests.test_experiments import _compose_with_hydra, _sweep

    sweep = _sweep(_compose_with_hydra([f"+experiment={name}"]))
    assert math.prod(len(v) for v in sweep.values()) == runs
    assert sweep["quant"] == ["none", "ternary", "ternary_median"] and sweep["seed"] == [1, 2, 3]
    if name in ("when158_encoder", "when158_encdec"):
        assert sweep["model.d_model"] == [32, 64, 128]  # hidden size x1, x2, x4
    combos = list(itertools.product(*sweep.values()))
    for combo in [combos[0], combos[-1]]:  # every combination: experiments/when_158_enough/run.sh runs them
        cfg = compose([f"+experiment={name}", *(f"{k}={v}" for k, v in zip(sweep, combo, strict=True))])
        prepare_config(cfg, explicit=set())
        assert cfg.task_name == name
