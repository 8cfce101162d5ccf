"""DQT through the real Hydra configs, Lightning Trainer, checkpoints and TensorBoard files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from bitflow.callbacks.dqt import DirectQuantizedTraining, dqt_metrics, resolve_switch_step, step_flip_rate

from bitflow.cli import build_callbacks, run_training
from bitflow.lm import load_checkpoint
from bitflow.quant.dqt import DQTLinear, to_dqt
from tests.helpers import TINY, bitflow_env, compose, read_scalars

CKPT_EVERY_6 = [
    "+callbacks.model_checkpoint.every_n_train_steps=6",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.filename='step{step}'",
]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_switch_to_dqt_mid_run_and_resume_gives_the_same_weights(tiny_overrides: list[str], tmp_path: Path):
    # 16-bit for 3 steps, then ternary DQT keeping the AdamW moments, bf16 moments (stochastically rounded)
    dqt = ["+dqt=ternary", "dqt.at=3", "dqt.moment_dtype=bfloat16", *CKPT_EVERY_6]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_training(compose([*tiny_overrides, *dqt, f"paths.output_dir={full_dir}"]))
    at6 = full_dir / "checkpoints" / "step6.ckpt"
    run_training(compose([*tiny_overrides, *dqt, f"paths.output_dir={resumed_dir}", f"ckpt_path={at6}"]))
    full, resumed = _load(full_dir / "checkpoints" / "step12.ckpt"), _load(resumed_dir / "checkpoints" / "step12.ckpt")

    assert full["bitflow"]["quant"]["kind"] == "dqt"
    assert full["bitflow"]["quant"]["layers"][0] == "layers.0.attn.wq"
    assert full["state_dict"]["model.layers.0.attn.wq.codes"].dtype == torch.int8
    assert "model.layers.0.attn.wq.weight" not in full["state_dict"]
    assert set(full["state_dict"]["model.layers.1.mlp.w2.codes"].unique().tolist()) <= {-1, 0, 1}
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    a, b = full["optimizer_states"][0]["dqt"], resumed["optimizer_states"][0]["dqt"]
    assert set(a["state"]) == set(b["state"]) and len(a["state"]) == 14  # 2 blocks x (4 attention + 3 MLP)
    for name in a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][name][k], b["state"][name][k]), (name, k)
        # kept moments: 3 AdamW steps before the switch + 9 DQT steps
        assert float(a["state"][name]["step"]) == 12
        assert a["state"][name]["exp_avg"].dtype == torch.bfloat16
    assert all(torch.equal(a["rng"][d], b["rng"][d]) for d in a["rng"])

    scalars = read_scalars(full_dir / "tb")
    flips = dict(scalars["quant/flip_rate"])
    assert min(flips) == 3 and max(flips) == 11  # logged from the switch on (log_every_n_steps=1)
    assert all(0 <= v <= 1 for v in flips.values())
    shares = [dict(scalars[f"dqt/level_share/{c}"])[11] for c in (-1, 0, 1)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5) and min(shares) > 0.1


def test_reset_starts_fresh_dqt_moments(tiny_overrides: list[str], tmp_path: Path):
    run_training(compose([*tiny_overrides, "+dqt=int8", "dqt.at=0.5", "dqt.optimizer_state=reset",
                          "trainer.max_steps=4", "trainer.val_check_interval=4"]))
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    state = ckpt["optimizer_states"][0]
    assert {float(s["step"]) for s in state["dqt"]["state"].values()} == {2.0}  # steps 2 and 3 only
    codes = ckpt["state_dict"]["model.layers.0.mlp.w1.codes"]
    assert codes.dtype == torch.int8 and -128 <= int(codes.min()) and int(codes.max()) <= 127
    # the replaced float weights left the optimizer: only embeddings and norms remain there
    assert sum(len(g["params"]) for g in state["param_groups"]) == 1 + 5
    # a checkpoint alone rebuilds the DQT model (as `bitflow-eval` loads it)
    lm = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    layer = lm.model.get_submodule("layers.0.mlp.w1")
    assert isinstance(layer, DQTLinear) and layer.bits == 8 and torch.equal(layer.codes, codes)
    with torch.no_grad():
        assert torch.isfinite(lm(torch.randint(0, 320, (1, 8)))).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=9), "bits=9"),
        (dict(at=1.5), "at=1.5 is outside \\(0, 1\\)"),
        (dict(at=-2), "at=-2 is negative"),
        (dict(moment_dtype="float16"), "moment_dtype='float16'"),
        (dict(optimizer_state="drop"), "optimizer_state='drop'"),
        (dict(init_scale="median"), "init_scale='median'"),
        (dict(every_n_steps=-1), "every_n_steps=-1"),
    ],
)
def test_bad_dqt_options_fail_when_the_callback_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectQuantizedTraining(**kwargs)


def test_logged_statistics_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(6, 1))
    assert to_dqt(model) == ["0", "1"]
    model[0].codes.copy_(torch.tensor([[1, 0], [-1, 0]]))
    model[1].codes.copy_(torch.tensor([[1, 1, 1, 0, 0, -1]]))
    model[0].scale.fill_(0.5)
    model[1].scale.fill_(1.5)
    # 10 weights: two at -1, four at 0, four at 1; one flip in layer 0 and three in layer 1: 4 / 10
    rate = step_flip_rate(model, {"0": torch.tensor(1), "1": torch.tensor(3)})
    assert float(rate) == pytest.approx(0.4)
    metrics = dqt_metrics(model, rate)
    assert metrics == pytest.approx({"dqt/level_share/-1": 0.2, "dqt/level_share/0": 0.4, "dqt/level_share/1": 0.4,
                                     "dqt/scale": 1.0, "quant/flip_rate": 0.4})
    assert "quant/flip_rate" not in dqt_metrics(model)


def test_switch_step_resolution():
    assert resolve_switch_step(0, 100) == 0 and resolve_switch_step(None, 100) is None
    assert resolve_switch_step(0.25, 100) == 25 and resolve_switch_step(40, 100) == 40
    with pytest.raises(ValueError, match="at=100 is step 100, outside the run"):
        resolve_switch_step(100, 100)


def test_experiments_compose_with_any_width(cache_dir: Path, tmp_path: Path):
    cfg = compose([*TINY, "+experiment=dqt_int8", "dqt.bits=4", f"paths.output_dir={tmp_path}"])
    assert cfg.task_name == "dqt_int4"
    (cb,) = [c for c in build_callbacks(cfg) if isinstance(c, DirectQuantizedTraining)]
    assert cb.options["bits"] == 4 and cb.at == 0 and cb.exclude == ["lm_head"]
    cfg = compose([*TINY, "+experiment=dqt_ternary", f"paths.output_dir={tmp_path}"])
    assert cfg.task_name == "dqt_ternary" and cfg.dqt.bits is None and "_target_" not in cfg.transition


@pytest.mark.slow
def test_dqt_vs_ste_multirun(tmp_path: Path, cache_dir: Path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        ["bitflow", "+experiment=dqt_vs_ste", *TINY, f"hydra.sweep.dir={sweep}", "-m"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert runs == ["0_none", "1_ste_ternary", "2_ternary", "3_int8"]
    val = {}
    for run in runs:
        scalars = read_scalars(sweep / run / "tb")
        val[run] = dict(scalars["val/loss"])[11]
        train = [v for _, v in sorted(scalars["train/loss"])]
        assert len(train) == 12 and train[-1] < train[0], run
        quant = _load(sweep / run / "checkpoints" / "last.ckpt")["bitflow"]["quant"]
        if run.endswith(("_ternary", "_int8")) and run != "1_ste_ternary":
            assert quant["kind"] == "dqt" and "quant/flip_rate" in scalars
            levels = [-1, 0, 1] if run == "2_ternary" else [-128, 0, 127]
            assert all(f"dqt/level_share/{c}" in scalars for c in levels)
            assert quant["options"]["bits"] == (None if run == "2_ternary" else 8)
        elif run == "1_ste_ternary":
            assert quant["kind"] == "bitlinear" and "quant/zero_fraction" in scalars
        else:
            assert quant is None and "quant/flip_rate" not in scalars
    assert all(3.0 < v < 7.0 for v in val.values()), val  # ln(320) = 5.77 at the start: all four trained
