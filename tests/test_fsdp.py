"""``trainer=fsdp`` (FSDP2 through Lightning's ModelParallelStrategy) on CPU with 2 gloo processes: the same losses
as DDP with the same global batch, an exact resume, and a checkpoint that loads into one process; for 16-bit, a
mid-run switch to BitLinear, absmedian BitLinear from step 0, and DQT from step 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitflow.config import ConfigError
from tests.helpers import TINY, bitflow_env, compose, read_scalars

RUN = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))] + [
    "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=8", "trainer.val_check_interval=4",
]


def _bitflow(args: list[str], cwd: Path, cache_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bitflow.cli", *args], cwd=cwd, env=bitflow_env(cache_dir),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [v for _, v in read_scalars(run / "tb")["train/loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("quant", [["quant=ternary", "transition=default", "transition.at=4"], ["quant=ternary_median"]],
                         ids=["switch-at-4", "absmedian-from-step-0"])
def test_fsdp_matches_ddp_resumes_exactly_and_loads_in_one_process(quant: list[str], tmp_path: Path, cache_dir: Path):
    """16-bit steps, the mid-run switch and BitLinear steps under FSDP2 give DDP's losses and DDP's whole-matrix
    weight scales (each converted layer is the same module object FSDP2 gathers: BitLinear.become)."""
    keep = ["+callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.filename='step{step}'"]
    run = [*RUN, *quant, "trainer.log_every_n_steps=1"]
    _bitflow([*run, *keep, "trainer=fsdp", f"hydra.run.dir={tmp_path / 'fsdp'}"], tmp_path, cache_dir)
    _bitflow([*run, "trainer=ddp", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path, cache_dir)
    fsdp = _losses(tmp_path / "fsdp")
    assert len(fsdp) == 8
    assert fsdp == pytest.approx(_losses(tmp_path / "ddp"), rel=1e-5)
    scales = {r: [v for _, v in read_scalars(tmp_path / r / "tb")["quant/weight_scale"]] for r in ("fsdp", "ddp")}
    assert len(scales["fsdp"]) >= 4 and scales["fsdp"] == pytest.approx(scales["ddp"], rel=1e-5)

    at4 = tmp_path / "fsdp" / "checkpoints" / "step4.ckpt"
    _bitflow([*run, "trainer=fsdp", f"ckpt_path={at4}", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path,
             cache_dir)
    assert _losses(tmp_path / "resumed")[-4:] == pytest.approx(fsdp[4:], rel=1e-5)

    from bitflow.lm import load_checkpoint
    from bitflow.quant import BitLinear

    model = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")  # full weights, one process
    assert all(not type(p).__name__.startswith("DTensor") for p in model.parameters())
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 14  # 2 blocks x 7 projections
    batch = torch.randint(0, model.model.config.vocab_size, (2, 17))
    assert torch.isfinite(model.loss(batch))


@pytest.mark.slow
def test_fsdp_dqt_matches_ddp_resumes_with_its_moments_and_loads_in_one_process(tmp_path: Path, cache_dir: Path):
    """DQT under FSDP2: the int8 codes (buffers) and the DQT moments stay replicated, every other Parameter is
    sharded; the same losses and code flip rates as DDP, and a resume from step 4 continues exactly, which needs the
    DQT moments and rounding generators that torch.distributed.checkpoint drops from the optimizer state."""
    keep = ["+callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.filename='step{step}'"]
    run = [*RUN, "quant=dqt_ternary", "trainer.log_every_n_steps=1"]
    _bitflow([*run, *keep, "trainer=fsdp", f"hydra.run.dir={tmp_path / 'fsdp'}"], tmp_path, cache_dir)
    _bitflow([*run, "trainer=ddp", f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path, cache_dir)
    runs = {r: read_scalars(tmp_path / r / "tb") for r in ("fsdp", "ddp")}
    fsdp = _losses(tmp_path / "fsdp")
    assert len(fsdp) == 8 and fsdp == pytest.approx(_losses(tmp_path / "ddp"), rel=1e-5)
    flips = {r: [v for _, v in s["quant/flip_rate"]] for r, s in runs.items()}
    assert len(flips["fsdp"]) == 8 and flips["fsdp"] == pytest.approx(flips["ddp"], rel=1e-5)

    at4 = tmp_path / "fsdp" / "checkpoints" / "step4.ckpt"
    saved = torch.load(at4, map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert len(saved["dqt"]["state"]) == 14 and saved["dqt"]["state"]["layers.0.attn.wq"]["step"] == 4
    _bitflow([*run, "trainer=fsdp", f"ckpt_path={at4}", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path,
             cache_dir)
    resumed = read_scalars(tmp_path / "resumed" / "tb")
    assert [v for _, v in resumed["train/loss"]][-4:] == pytest.approx(fsdp[4:], rel=1e-6)
    assert [v for _, v in resumed["quant/flip_rate"]][-4:] == pytest.approx(flips["fsdp"][4:], rel=1e-6)

    from bitflow.lm import load_checkpoint
    from bitflow.quant.dqt import DQTLinear

    model = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    layers = [m for m in model.modules() if isinstance(m, DQTLinear)]
    assert len(layers) == 14 and all(set(m.codes.unique().tolist()) <= {-1, 0, 1} for m in layers)
    batch = torch.randint(0, model.model.config.vocab_size, (2, 17))
    assert torch.isfinite(model.loss(batch))


def test_fsdp_refuses_what_it_cannot_shard_before_training(tiny_overrides):
    from bitflow.cli import prepare_config

    with pytest.raises(ConfigError, match="trainer=fsdp with a transition to quant.recipe='dqt' is not supported.*"
                                          "transition=none.*trainer=ddp"):
        prepare_config(compose([*tiny_overrides, "trainer=fsdp", "quant=dqt_ternary", "transition=default"]))
    prepare_config(compose([*tiny_overrides, "trainer=fsdp", "quant=dqt_ternary"]))  # DQT from step 0: accepted
    with pytest.raises(ConfigError, match="transition.gap_every=10 is not allowed; allowed: 0 with trainer=fsdp"):
        prepare_config(compose([*tiny_overrides, "trainer=fsdp", "quant=ternary", "transition=default",
                                "transition.gap_every=10"]))
    prepare_config(compose([*tiny_overrides, "trainer=fsdp", "quant=ternary", "transition=default"]))  # accepted
