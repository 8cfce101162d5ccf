"""End-to-end training through the real Hydra app, Lightning Trainer and TensorBoard files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from bitflow.cli import run_training
from bitflow.config import ConfigError
from tests.helpers import TINY, bitflow_env, compose, read_scalars


def test_bitflow_runs_from_a_directory_outside_the_repo(tmp_path: Path, cache_dir: Path):
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    proc = subprocess.run(
        ["bitflow", *overrides, "trainer.max_steps=40", "trainer.val_check_interval=20", "optimizer.lr=5e-3"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "train").iterdir())
    scalars = read_scalars(run / "tb")
    for tag in ("train/loss", "train/lr", "train/tokens_seen", "train/tokens_per_sec", "val/loss", "val/ppl"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    train = [v for _, v in sorted(scalars["train/loss"])]
    assert len(train) == 40
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.5  # the loss falls
    val = [v for _, v in sorted(scalars["val/loss"])]
    assert [s for s, _ in sorted(scalars["val/loss"])] == [19, 39]
    assert val[1] < val[0]
    ppl = dict(scalars["val/ppl"])
    assert ppl[39] == pytest.approx(torch.tensor(val[1]).exp().item(), rel=1e-4)
    tokens = dict(scalars["train/tokens_seen"])
    assert tokens[39] == 40 * 4 * 32  # steps x batch x seq_len
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_overrides: list[str], tmp_path: Path):
    ckpt_every = [
        "trainer.max_steps=40",
        "+callbacks.model_checkpoint.every_n_train_steps=20",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.filename='step{step}'",
        "trainer.val_check_interval=10",
    ]
    first = tmp_path / "full"
    run_training(compose([*tiny_overrides, *ckpt_every, f"paths.output_dir={first}"]))
    at20 = first / "checkpoints" / "step20.ckpt"
    full = _state(first / "checkpoints" / "step40.ckpt")
    assert _state(at20)["global_step"] == 20

    resumed_dir = tmp_path / "resumed"
    run_training(compose([*tiny_overrides, *ckpt_every, f"paths.output_dir={resumed_dir}", f"ckpt_path={at20}"]))
    resumed = _state(resumed_dir / "checkpoints" / "step40.ckpt")
    assert resumed["global_step"] == full["global_step"] == 40
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    a, b = full["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for i in a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[i][k], b[i][k]), (i, k)
    assert full["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"] == 40
    assert full["bitflow"]["tokens_seen"] == resumed["bitflow"]["tokens_seen"] == 40 * 4 * 32


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data=text", "data.source.paths=[/no/such/corpus/*.txt]"], "/no/such/corpus"),
        (["data.vocab_size=10"], r"data\.vocab_size=10 is not allowed; allowed: an integer >= 257"),
        (["trainer.max_steps=0"], r"trainer\.max_steps=0 is not allowed; allowed: an integer >= 1"),
        (["data.seq_len=128"], r"data\.seq_len=128 is longer than the model's context model\.max_seq_len=64"),
        (["scheduler.warmup_steps=500"], r"scheduler\.warmup_steps=500 must be in \[0, trainer\.max_steps=12\]"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt' does not exist"),
        (["optimizer.lr=-1"], r"optimizer\.lr=-1 is not allowed; allowed: a number > 0"),
        (["optimizer.betas=[0.9,1.5]"], r"optimizer\.betas\[1\]=1\.5 is not allowed; allowed: a number in \[0, 1\)"),
        (["+optimizer.momentum=0.9"], r"unknown optimizer key\(s\) \['momentum'\]; allowed: lr, betas"),
        (["model.n_heads=3"], r"model\.d_model=32 must be divisible by model\.n_heads=3"),
        (["trainer.precision=16"], r"trainer\.precision=16 is not allowed; allowed: auto, 32-true, bf16-mixed"),
        (["data.batch_size=0"], r"data\.batch_size=0 is not allowed; allowed: an integer >= 1"),
        (["transition=default"], r"a precision transition needs a quantization to switch to, but quant=none"),
        (["+transition.at=0.5"], r"transition\.at=0\.5 is set, but no transition is selected; add transition=default"),
        (["quant=dqt_ternary", "transition=default", "trainer.strategy=ddp"],
         r"trainer\.strategy='ddp' with a mid-run switch \(step 6\) to quant\.recipe='dqt'"),
        (["quant=ternary", "transition=default", "transition.at=0.01"], r"transition\.at=0\.01 of trainer\.max_steps=12 is step 0"),
    ],
)
def test_bad_input_fails_before_training(tiny_overrides, tmp_path, overrides, match):
    out = tmp_path / "run"
    if overrides[0].startswith("data="):  # another corpus: the stdlib subset option does not apply
        tiny_overrides = [o for o in tiny_overrides if not o.startswith("data.source.max_files")]
    explicit = {o.split("=")[0].lstrip("+") for o in overrides}  # as if typed on the command line
    with pytest.raises(ConfigError, match=match):
        run_training(compose([*tiny_overrides, *overrides]), explicit=explicit)
    assert not (out / "checkpoints").exists()
    assert not list(out.rglob("events.out.tfevents.*"))


def test_unknown_model_preset_lists_the_known_ones(tmp_path: Path, cache_dir: Path):
    proc = subprocess.run(
        ["bitflow", "model=gpt5"], cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Could not find 'model/gpt5'" in proc.stderr
    assert "tiny" in proc.stderr and "spectra_99m" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_checkpoint_from_another_model_is_rejected(tiny_overrides: list[str], tmp_path: Path):
    run_training(compose([*tiny_overrides, "trainer.max_steps=6"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="another model .*d_model: checkpoint 32 vs config 64"):
        run_training(compose([*tiny_overrides, "model.d_model=64", f"ckpt_path={ckpt}",
                              f"paths.output_dir={tmp_path / 'other'}"]))
    assert not (tmp_path / "other").exists()  # rejected before a logger or checkpoint directory is made


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path, cache_dir: Path):
    proc = subprocess.run(
        ["bitflow", *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "train").iterdir())
    scalars = read_scalars(run / "tb")
    assert len(scalars["train/loss"]) == 12
    # both ranks' tokens count: 2 x batch x seq_len per step
    assert dict(scalars["train/tokens_seen"])[11] == 12 * 2 * 4 * 32
    assert "val/loss" in scalars
    assert (run / "checkpoints" / "last.ckpt").is_file()


class FailSavesFrom(Callback):
    """Puts an unpicklable value into every checkpoint from global step ``step`` on: ``torch.save`` then fails
    mid-write, as a full disk or a killed job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step >= self.step:
            checkpoint["unpicklable"] = lambda: None


def test_a_failed_checkpoint_write_leaves_the_previous_last_ckpt_intact(tiny_overrides: list[str], tmp_path: Path):
    cfg = compose([*tiny_overrides, "trainer.max_steps=6", "trainer.val_check_interval=3",
                   "+callbacks.model_checkpoint.every_n_train_steps=3",
                   "+callbacks.fail._target_=tests.test_train.FailSavesFrom", "+callbacks.fail.step=6"])
    with pytest.raises(Exception, match="(?i)pickle"):
        run_training(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3  # the checkpoint of step 3, whole
    assert "unpicklable" not in last
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers


def test_the_adamw_defaults_live_in_the_optimizer_config():
    from bitflow.lm import LanguageModel

    lm = LanguageModel(model={"vocab_size": 64, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
                              "max_seq_len": 16})
    opt = lm.configure_optimizers()["optimizer"]
    cfg = compose(["paths.output_dir=."]).optimizer
    assert opt.defaults["lr"] == cfg.lr == 2e-3 and opt.defaults["betas"] == tuple(cfg.betas)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]


def test_a_layer_filter_matching_nothing_fails_before_any_data_is_tokenized(tiny_overrides, tmp_path: Path):
    fresh = tmp_path / "fresh-cache"
    overrides = [*tiny_overrides, f"paths.cache_dir={fresh}", "quant=ternary", "quant.include=[nope.*]"]
    with pytest.raises(ConfigError, match=r"quant\.include=\['nope\.\*'\] .*match no nn\.Linear layer of Llama"):
        run_training(compose(overrides))
    assert not fresh.exists() or not any(fresh.rglob("*")), "the tokenizer or token cache was built first"


def test_resuming_with_another_quantization_or_switch_step_is_refused_before_training(tiny_overrides, tmp_path):
    run_training(compose([*tiny_overrides, "trainer.max_steps=4", "quant=ternary"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    other = [*tiny_overrides, "trainer.max_steps=4", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'other'}"]
    with pytest.raises(ConfigError, match=r"trained with quant\.recipe=bitlinear, this run has quant=none \(16-bit\)"):
        run_training(compose(other))  # the default quant=none
    with pytest.raises(ConfigError, match=r"other quantization options \(quant\.weight_scale: checkpoint 'absmean', this run 'absmedian'\)"):
        run_training(compose([*other, "quant=ternary_median"]))
    with pytest.raises(ConfigError, match=r"switches precision at step 0, this run at step 2"):
        run_training(compose([*other, "quant=ternary", "transition=default", "transition.at=2"]))
    assert not (tmp_path / "other").exists()  # refused before a logger or checkpoint directory is made
