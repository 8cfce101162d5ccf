"""The online quantization gap, transition.at=auto, the progressive schedule and the TensorBoard dashboards."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from bitflow.callbacks import PrecisionTransition, QuantMonitor
from bitflow.callbacks.gap import AutoSwitchRule, GapQuantizer, QuantGap, blocks_of, gap_quantizer
from bitflow.cli import run_training
from bitflow.config import ConfigError
from bitflow.data import StdlibSource, TokenDataModule
from bitflow.lm import LanguageModel
from bitflow.quant.recipes import recipe_from_config
from tests.callbacks.test_transition import CONVERTED, _ckpt, fit
from tests.helpers import TINY_MODEL, compose, read_scalars, tiny_llama


def _windows(n: int = 3, t: int = 17) -> torch.Tensor:
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ the quantizers
def test_ternary_absmean_and_int4_weights_by_hand():
    w = torch.tensor([[0.4, -0.05, 0.2], [-0.6, 0.1, 0.0]])
    # absmean: gamma = mean|W| = 1.35 / 6 = 0.225; W_q = clamp(round(W / gamma), -1, 1) * gamma
    g = 0.225
    expect = torch.tensor([[g, 0.0, g], [-g, 0.0, 0.0]])
    assert torch.allclose(gap_quantizer("absmean", None).weight(w), expect, atol=1e-7)
    # int4, absmax per output channel: s = 7 / max|row|; row 0: 0.4/7 steps -> round(0.2 * 17.5) = 4 (3.5 rounds to 4)
    q = gap_quantizer("int4", None).weight(w)
    s0, s1 = 7 / 0.4, 7 / 0.6
    assert torch.allclose(q[0], torch.round(w[0] * s0) / s0, atol=1e-6)
    assert torch.allclose(q[1], torch.round(w[1] * s1) / s1, atol=1e-6)
    with pytest.raises(ValueError, match="transition.gap_quant='int9' is not allowed; allowed: recipe, absmean"):
        gap_quantizer("int9", None)


def test_ptq_rtn_option_is_bitflow_ptqs_rtn():
    from bitflow.callbacks.gap import PTQ_BITS
    from bitflow.quant.ptq.rtn import BITS, rtn

    assert PTQ_BITS == BITS
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gap_quantizer("rtn4", None).weight(w), rtn(w, 4).weight)
    # symmetric 4-bit grid per row: scale = 2 max|row| / 15, levels scale * {-8, ..., 7}
    row = w[0]
    scale = 2 * row.abs().max() / 15
    expect = scale * (torch.clamp(torch.round(row / scale) + 8, 0, 15) - 8)
    assert torch.allclose(gap_quantizer("rtn4", None).weight(w)[0], expect)


def test_recipe_gap_is_the_loss_of_the_switched_model_and_leaves_the_weights_alone():
    model = tiny_llama()
    recipe = recipe_from_config({"recipe": "bitlinear"})
    layers = recipe.plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gap = QuantGap(gap_quantizer("recipe", recipe), layers, _windows())
    measured = gap.measure(model, per_layer=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # exactly restored (never touched)
    assert model.training  # the mode is restored too
    x, y = _windows()[:, :-1], _windows()[:, 1:]
    with torch.no_grad():
        model.eval()
        base = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        recipe.convert(model)  # the switch itself: BitLinear at lambda 1 (ternary absmean weights, int8 activations)
        quantized = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert measured["quant/gap_loss_16bit"] == pytest.approx(base, abs=1e-5)
    assert measured["quant/gap_loss_quantized"] == pytest.approx(quantized, abs=1e-4)
    assert measured["quant/gap"] == pytest.approx(quantized - base, abs=1e-4)
    assert sorted(k.removeprefix("quant/gap_layer/") for k in measured if k.startswith("quant/gap_layer/")) == sorted(CONVERTED)


def test_weight_only_quantizer_needs_no_hooks_and_blocks_group_by_layer_index():
    assert not GapQuantizer(bits=4).touches_input
    assert gap_quantizer("recipe", recipe_from_config({"recipe": "dqt", "bits": 8})).bits == 8
    assert list(blocks_of(CONVERTED)) == ["layers.0", "layers.1"]
    assert blocks_of(["layers.0.attn.wq", "lm_head"]) == {"layers.0": ["layers.0.attn.wq"], "lm_head": ["lm_head"]}


# ------------------------------------------------------------------------------------------------ the auto rule
def test_plateau_and_threshold_rules_on_hand_made_gaps():
    rule = AutoSwitchRule("plateau", smoothing=1, patience=2)
    fired = [rule.add(s, g, min_step=0) for s, g in enumerate([0.5, 0.4, 0.3, 0.35, 0.32, 0.2])]
    assert fired == [False, False, False, False, True, False]  # 2 measurements after the minimum 0.3; 0.2 is a new one
    smooth = AutoSwitchRule("plateau", smoothing=2, patience=1)
    for s, g in enumerate([0.4, 0.2, 0.3]):
        smooth.add(s, g, min_step=0)
    assert smooth.smoothed() == pytest.approx([0.4, 0.3, 0.25])
    early = AutoSwitchRule("threshold", smoothing=1, threshold=0.1)
    assert [early.add(s, g, min_step=2) for s, g in enumerate([0.2, 0.2, 0.05, 0.12])] == [False, False, False, True]
    with pytest.raises(ConfigError, match="transition.auto_rule='sometime' is not allowed; allowed: plateau, threshold"):
        AutoSwitchRule("sometime")


def test_auto_needs_the_gap_with_the_one_error_format(tiny_overrides: list[str]):
    with pytest.raises(ConfigError, match=r"transition.at='auto' is not allowed; allowed: auto only with "
                                          r"transition.gap_every > 0"):
        run_training(compose([*tiny_overrides, "quant=ternary", "transition=default", "transition.at=auto"]))
    with pytest.raises(ValueError, match="transition.at='auto' is not allowed"):
        PrecisionTransition(at="auto")
    with pytest.raises(ValueError, match="transition.progressive_steps=0 is not allowed"):
        PrecisionTransition(schedule="progressive")
    with pytest.raises(ValueError, match="transition.min_at=2.0 is outside"):
        PrecisionTransition(at="auto", gap_every=5, min_at=2.0)


# ------------------------------------------------------------------------------------------------ in training
def test_the_gap_changes_nothing_in_training(tmp_path: Path, cache_dir: Path):
    L.seed_everything(0, verbose=False)
    _, plain = fit(tmp_path / "plain", cache_dir, PrecisionTransition(at=6), max_steps=8)
    L.seed_everything(0, verbose=False)
    _, gapped = fit(tmp_path / "gap", cache_dir, PrecisionTransition(at=6, gap_every=2, gap_layers_every=2), max_steps=8)
    for (name, a), b in zip(plain.state_dict().items(), gapped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # bit for bit
    scalars = read_scalars(tmp_path / "gap" / "tb")
    assert [s for s, _ in scalars["quant/gap"]] == [2, 4, 6]  # 16-bit steps only: the model of step 6 is 16-bit
    for s, gap in scalars["quant/gap"]:
        assert gap == pytest.approx(dict(scalars["quant/gap_loss_quantized"])[s] - dict(scalars["quant/gap_loss_16bit"])[s], abs=1e-5)
    assert [s for s, _ in scalars["quant/gap_layer/layers.0.attn.wq"]] == [4]  # every 2nd measurement
    assert "quant/gap" not in read_scalars(tmp_path / "plain" / "tb")


@pytest.mark.slow
def test_auto_switch_is_logged_recorded_and_resumes_exactly(tiny_overrides: list[str], tmp_path: Path):
    common = [*tiny_overrides, "quant=ternary", "transition=default", "transition.at=auto", "transition.gap_every=2",
              "transition.min_at=2", "transition.max_at=9", "transition.auto_patience=1", "transition.auto_smoothing=1",
              "trainer.max_steps=12", "+callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
              "callbacks.model_checkpoint.filename='step{step}'"]
    full_dir = tmp_path / "full"
    run_training(compose([*common, f"paths.output_dir={full_dir}"]))
    scalars = read_scalars(full_dir / "tb")
    gaps = [g for _, g in scalars["quant/gap"]]
    t0 = int(scalars["quant/switch_step"][0][1])
    # the rule on the logged gaps: the first measurement at step >= 2 without a new minimum, switch one step later
    rule = AutoSwitchRule("plateau", smoothing=1, patience=1)
    fired = next((s for s, g in scalars["quant/gap"] if rule.add(s, g, 2)), None)
    assert t0 == (fired + 1 if fired is not None else 9), gaps
    full = _ckpt(full_dir / "checkpoints" / "step12.ckpt")
    assert full["callbacks"]["PrecisionTransition"]["switch_step"] == t0
    for k in (3, t0 + 1):  # before and after the choice
        out = tmp_path / f"resumed{k}"
        run_training(compose([*common, f"paths.output_dir={out}", f"ckpt_path={full_dir / 'checkpoints' / f'step{k}.ckpt'}"]))
        resumed = _ckpt(out / "checkpoints" / "step12.ckpt")
        for name, value in full["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][name]), (k, name)
        assert resumed["callbacks"]["PrecisionTransition"] == full["callbacks"]["PrecisionTransition"]


@pytest.mark.slow
def test_progressive_switches_blocks_in_turn_and_resumes_mid_window(tiny_overrides: list[str], tmp_path: Path):
    common = [*tiny_overrides, "quant=ternary", "transition=default", "transition.at=3", "transition.schedule=progressive",
              "transition.progressive_steps=4", "transition.progressive_order=top_down", "transition.phase_in=linear",
              "transition.phase_in_steps=2", "trainer.max_steps=10", "+callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
              "callbacks.model_checkpoint.filename='step{step}'"]
    full_dir = tmp_path / "full"
    run_training(compose([*common, f"paths.output_dir={full_dir}"]))
    s = read_scalars(full_dir / "tb")
    # top_down: layers.1 from step 3 (lambda 0, 0.5, 1), layers.0 from step 7
    assert dict(s["quant/lambda/layers.1"])[4] == 0.5 and dict(s["quant/lambda/layers.1"])[5] == 1.0
    assert dict(s["quant/lambda/layers.0"])[6] == 0.0 and dict(s["quant/lambda/layers.0"])[8] == 0.5
    assert dict(s["quant/layers_switched"])[5] == 0.5 and dict(s["quant/layers_switched"])[8] == 1.0
    mid = _ckpt(full_dir / "checkpoints" / "step5.ckpt")["bitflow"]["quant"]["strength"]["layers"]
    assert mid["layers.1.attn.wq"] == {"weight": 1.0, "act": 1.0} and mid["layers.0.attn.wq"] == {"weight": 0.0, "act": 0.0}
    full = _ckpt(full_dir / "checkpoints" / "step10.ckpt")
    out = tmp_path / "resumed"
    run_training(compose([*common, f"paths.output_dir={out}", f"ckpt_path={full_dir / 'checkpoints' / 'step5.ckpt'}"]))
    resumed = _ckpt(out / "checkpoints" / "step10.ckpt")
    for name, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name


# ------------------------------------------------------------------------------------------------ dashboards
def test_dashboards_in_the_event_files(tmp_path: Path, cache_dir: Path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    from bitflow.callbacks import TensorBoardDashboards

    dash = TensorBoardDashboards(overrides=["transition.at=0.5", "+seed=7", "hydra.run.dir=x"])
    transition = PrecisionTransition(at=4, gap_every=2, spike_window=2)
    dm = TokenDataModule(StdlibSource(max_files=60), seq_len=32, batch_size=4, vocab_size=320, cache_dir=str(cache_dir),
                         val_windows=4)
    dm.prepare_data()
    lm = LanguageModel(model={**TINY_MODEL, "vocab_size": dm.vocab_size}, tokenizer_json=dm.tokenizer_json,
                       quant={"recipe": "bitlinear"})
    trainer = L.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=1, val_check_interval=4,
                        logger=TensorBoardLogger(str(tmp_path), name="tb", version="", default_hp_metric=False),
                        enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[transition, QuantMonitor(), dash])
    trainer.fit(lm, datamodule=dm)

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    layout = layout_pb2.Layout()
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")  # the plugin's tag
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    scalars = set(acc.Tags()["scalars"])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert [c.title for c in layout.category] == ["transition", "quantization health", "throughput"]
    for title in ("loss", "quantization gap (quantized - 16-bit loss)", "switch step", "zero fraction", "tokens per second"):
        assert any(re.fullmatch(tag, t) or re.match(tag, t) for tag in charts[title] for t in scalars), title
    hp = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert dict(start.hparams)["transition.at"].number_value == 0.5 and dict(start.hparams)["seed"].number_value == 7
    assert "hydra.run.dir" not in start.hparams
    exp = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == {f"hparams/{n}" for n in
                                                       ("val_loss", "switch_step", "spike", "recovery_steps", "gap")}
    values = {t: acc.Scalars(t)[-1].value for t in scalars if t.startswith("hparams/")}
    assert values["hparams/switch_step"] == 4.0
    assert values["hparams/val_loss"] == pytest.approx(acc.Scalars("val/loss")[-1].value)
    assert values["hparams/gap"] == pytest.approx(acc.Scalars("quant/gap")[-1].value)


def test_swept_keys_come_from_the_sweeps_multirun_yaml(tmp_path: Path):
    from omegaconf import OmegaConf

    from bitflow.callbacks.dashboards import hparam_value, swept_keys

    cfg = {"hydra": {"sweeper": {"params": {"transition.phase_in": "none,tanh"}},
                     "overrides": {"task": ["quant=ternary", "seed=1,2,3", "+transition.at=range(0.1,0.5,0.1)",
                                            "quant.include=[a,b]", "trainer.max_steps=300"]}}}
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "multirun.yaml")
    assert swept_keys(tmp_path / "multirun.yaml") == ["transition.phase_in", "seed", "transition.at"]
    assert swept_keys(tmp_path / "absent.yaml") == [] and swept_keys() == []  # not in a multirun
    assert [hparam_value(v) for v in ("0.2", "3", "true", "null", "tanh")] == [0.2, 3, True, "null", "tanh"]
