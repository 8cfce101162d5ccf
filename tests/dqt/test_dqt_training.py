"""DQT through the real Hydra configs, Lightning Trainer, checkpoints and TensorBoard files (quant=dqt_*)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from bitflow.callbacks import PrecisionTransition
from bitflow.cli import build_callbacks, run_training
from bitflow.lm import load_checkpoint
from bitflow.quant.dqt import DQTLinear
from bitflow.quant.recipes import recipe_from_config
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
    dqt = ["quant=dqt_ternary", "transition=default", "transition.at=3", "quant.moment_dtype=bfloat16", *CKPT_EVERY_6]
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
    assert scalars["quant/switch_step"] == [(3, 3.0)]
    assert "transition/spike" in scalars  # a mid-run DQT switch is tracked like BitLinear's
    flips = dict(scalars["quant/flip_rate"])
    assert min(flips) == 3 and max(flips) == 11  # logged from the switch on (log_every_n_steps=1)
    assert all(0 <= v <= 1 for v in flips.values())
    shares = [dict(scalars[f"dqt/level_share/{c}"])[11] for c in (-1, 0, 1)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5) and min(shares) > 0.1


def test_reset_starts_fresh_dqt_moments(tiny_overrides: list[str], tmp_path: Path):
    run_training(compose([*tiny_overrides, "quant=dqt_int8", "transition=default", "transition.at=0.5",
                          "transition.optimizer_state=reset", "trainer.max_steps=4", "trainer.val_check_interval=4"]))
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


def test_logged_statistics_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(6, 1))
    recipe = recipe_from_config({"recipe": "dqt", "exclude": None})
    assert recipe.convert(model).names == ["0", "1"]
    model[0].codes.copy_(torch.tensor([[1, 0], [-1, 0]]))
    model[1].codes.copy_(torch.tensor([[1, 1, 1, 0, 0, -1]]))
    model[0].scale.fill_(0.5)
    model[1].scale.fill_(1.5)
    # 10 weights: two at -1, four at 0, four at 1
    metrics = recipe.metrics(model)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())  # device-side, no sync
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx(
        {"dqt/level_share/-1": 0.2, "dqt/level_share/0": 0.4, "dqt/level_share/1": 0.4, "dqt/scale": 1.0})


def test_quant_alone_trains_dqt_from_the_first_step(tiny_overrides: list[str], tmp_path: Path):
    cfg = compose([*tiny_overrides, "quant=dqt_int8", "quant.bits=4", "trainer.max_steps=3",
                   "trainer.val_check_interval=3"])
    (cb,) = [c for c in build_callbacks(cfg) if isinstance(c, PrecisionTransition)]
    assert cb.at == 0
    run_training(cfg)
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["bitflow"]["quant"]["options"]["bits"] == 4
    assert ckpt["hyper_parameters"]["quant"]["recipe"] == "dqt"
    assert read_scalars(tmp_path / "run" / "tb")["quant/switch_step"] == [(0, 0.0)]


def test_dqt_with_gradient_accumulation_in_a_real_trainer(tiny_overrides: list[str], tmp_path: Path):
    # two micro-batches per optimizer step: the leaf of a step collects both gradients, then one DQT step
    run_training(compose([*tiny_overrides, "quant=dqt_ternary", "trainer.max_steps=3", "trainer.val_check_interval=3",
                          "trainer.accumulate_grad_batches=2", "transition=default", "transition.at=1",
                          "transition.spike_window=1"]))
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    dqt = ckpt["optimizer_states"][0]["dqt"]["state"]
    assert len(dqt) == 14 and {float(s["step"]) for s in dqt.values()} == {3.0}  # kept: 1 AdamW + 2 DQT steps
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["quant/switch_step"] == [(1, 1.0)]  # once, although two micro-batches start step 1
    assert sorted(dict(scalars["quant/flip_rate"])) == [1, 2]


def test_dqt_under_fp16_mixed_precision(tiny_overrides: list[str], tmp_path: Path):
    # fp16 autocast + GradScaler: the DQT leaves are float32 so that the scaler can unscale their gradients
    run_training(compose([*tiny_overrides, "quant=dqt_ternary", "trainer.precision=16-mixed", "trainer.max_steps=4",
                          "trainer.val_check_interval=4"]))
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    codes = ckpt["state_dict"]["model.layers.0.mlp.w1.codes"]
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert all(float(s["step"]) == 4 for s in ckpt["optimizer_states"][0]["dqt"]["state"].values())
    loss = [v for _, v in sorted(read_scalars(tmp_path / "run" / "tb")["train/loss"])]
    assert len(loss) == 4 and all(torch.isfinite(torch.tensor(loss)))


@pytest.mark.slow
def test_dqt_under_two_process_ddp(tmp_path: Path, cache_dir: Path):
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    command = ["bitflow", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.precision=32-true", "trainer.max_steps=6", "quant=dqt_ternary", "transition=default",
               "transition.at=2"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True,
                              text=True, timeout=600)

    # the switch removes the float weights DDP synchronises: refused before the first step, with the fix
    proc = run(f"hydra.run.dir={tmp_path / 'refused'}")
    assert proc.returncode != 0
    assert "use trainer.strategy=ddp_find_unused_parameters_true" in proc.stderr
    assert not (tmp_path / "refused" / "checkpoints").exists()

    proc = run("trainer.strategy=ddp_find_unused_parameters_true", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    msg = "precision transition at step 2: 14 layers converted by dqt"
    assert proc.stderr.count(msg) + proc.stdout.count(msg) == 2, proc.stderr[-4000:]  # both ranks switch
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["bitflow"]["quant"]["kind"] == "dqt"
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["dqt"]["state"].values()} == {6.0}
    scalars = read_scalars(tmp_path / "run" / "tb")
    assert scalars["quant/switch_step"] == [(2, 2.0)]
    assert "transition/spike" in scalars
    assert all(torch.isfinite(torch.tensor([v for _, v in scalars["val/loss"]])))


@pytest.mark.slow
def test_dqt_vs_ste_multirun(tmp_path: Path, cache_dir: Path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        ["bitflow", "+experiment=dqt_vs_ste", *TINY, f"hydra.sweep.dir={sweep}", "-m"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert runs == ["0_none", "1_ternary", "2_dqt_ternary", "3_dqt_int8"]
    val = {}
    for run in runs:
        scalars = read_scalars(sweep / run / "tb")
        val[run] = dict(scalars["val/loss"])[11]
        train = [v for _, v in sorted(scalars["train/loss"])]
        assert len(train) == 12 and train[-1] < train[0], run
        quant = _load(sweep / run / "checkpoints" / "last.ckpt")["bitflow"]["quant"]
        if "dqt" in run:
            assert quant["kind"] == "dqt" and "quant/flip_rate" in scalars
            levels = [-1, 0, 1] if run == "2_dqt_ternary" else [-128, 0, 127]
            assert all(f"dqt/level_share/{c}" in scalars for c in levels)
            assert quant["options"]["bits"] == (None if run == "2_dqt_ternary" else 8)
        elif run == "1_ternary":
            assert quant["kind"] == "bitlinear" and "quant/zero_fraction" in scalars
        else:
            assert quant is None and "quant/flip_rate" not in scalars
        # every quantized run says where it switched (step 0): the report labels it from this
        assert scalars.get("quant/switch_step") == (None if run == "0_none" else [(0, 0.0)])
    assert all(3.0 < v < 7.0 for v in val.values()), val  # ln(320) = 5.77 at the start: all four trained
