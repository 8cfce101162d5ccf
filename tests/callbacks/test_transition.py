"""PrecisionTransition with the real Lightning Trainer, LanguageModel, TokenDataModule and TensorBoard files."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from bitflow.callbacks import PrecisionTransition
from bitflow.cli import CONFIG_DIR, build_callbacks, run_training
from bitflow.data import StdlibSource, TokenDataModule
from bitflow.lm import LanguageModel, load_checkpoint
from bitflow.quant import BitLinear
from bitflow.quant.recipes import recipe_from_config
from tests.helpers import TINY, TINY_LINEARS, TINY_MODEL, bitflow_env, compose, read_scalars, tiny_llama

CONVERTED = TINY_LINEARS
LR = 1e-3


class Probe(Callback):
    """Records, at the start and end of every training batch, what the tests check (after the transition ran)."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, Any]] = {}
        self.end: dict[int, dict[str, Any]] = {}
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.start[self._step] = self.snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end[self._step] = self.snapshot(trainer, pl_module)

    @staticmethod
    def snapshot(trainer, lm) -> dict[str, Any]:
        (opt,) = trainer.optimizers
        names = {id(p): n for n, p in lm.model.named_parameters()}
        bitlinears = [m for m in lm.model.modules() if isinstance(m, BitLinear)]
        return {
            "types": {n: type(m).__name__ for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)},
            "param_ids": {n: id(p) for n, p in lm.model.named_parameters()},
            "opt_param_ids": sorted(id(p) for g in opt.param_groups for p in g["params"]),
            "state": {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
            "lambda": [(float(m.weight_strength), float(m.act_strength)) for m in bitlinears],
            "lr": opt.param_groups[0]["lr"],
            "quant_state": copy.deepcopy(lm.quant_state),
        }


def fit(
    tmp_path: Path,
    cache_dir: Path,
    transition: PrecisionTransition,
    max_steps: int = 10,
    scheduler: dict | None = None,
    quant: dict | None = None,
    prepare: Callable[[LanguageModel], None] | None = None,
    **trainer_kwargs,
) -> tuple[Probe, LanguageModel]:
    """Train the tiny LanguageModel (recipe ``quant``, default BitLinear ternary) with ``transition`` and a probe
    after it; TensorBoard events in tmp_path/tb."""
    dm = TokenDataModule(StdlibSource(max_files=60), seq_len=32, batch_size=4, vocab_size=320, cache_dir=str(cache_dir))
    dm.prepare_data()
    lm = LanguageModel(
        model={**TINY_MODEL, "vocab_size": dm.vocab_size},
        optimizer={"lr": LR},
        scheduler=scheduler or {"name": "constant", "warmup_steps": 0},
        tokenizer_json=dm.tokenizer_json,
        quant=quant or {"recipe": "bitlinear"},
    )
    if prepare is not None:
        prepare(lm)
    probe = Probe()
    kwargs = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, precision="32-true", log_every_n_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[transition, probe], **kwargs)
    trainer.fit(lm, datamodule=dm)
    return probe, lm


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(at=1.5), r"transition.at=1.5 is outside \(0, 1\)"),
        (dict(at=-3), "at=-3 is negative"),
        (dict(at="half"), "at='half' is not allowed"),
        (dict(at=True), "at=True is not allowed"),
        (dict(optimizer_state="drop"), "transition.optimizer_state='drop' is not allowed; allowed: keep, reset"),
        (dict(phase_in="quadratic"), "phase_in='quadratic' is not allowed; allowed: none, linear, tanh"),
        (dict(phase_in="tanh"), "transition.phase_in='tanh' needs transition.phase_in_steps > 0"),
        (dict(phase_in_steps=-1), "phase_in_steps=-1"),
        (dict(lr_rewarmup_steps=2.5), "lr_rewarmup_steps=2.5"),
        (dict(spike_window=0), "spike_window=0"),
        (dict(recovery_smoothing=1.0), r"recovery_smoothing=1.0 .* \[0, 1\)"),
        (dict(quant={"weight_scale": "absmode"}), "absmode"),
        (dict(quant={"bits": 4}), "quant.bits is not an option of the 'bitlinear' recipe; allowed: include"),
        (dict(quant={"recipe": "none"}), "needs a quantization to switch to; quant.recipe=none is 16-bit"),
        (dict(quant={"recipe": "dqt"}, phase_in="tanh", phase_in_steps=4),
         "transition.phase_in='tanh' needs a recipe with a quantization strength, but quant.recipe='dqt' has none"),
        (dict(quant={"include": 3}), "quant.include=3"),
    ],
)
def test_bad_arguments_raise_on_construction(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PrecisionTransition(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(at=10), r"at=10 is past the end of training \(trainer.max_steps=10\)"),
        (dict(at=0.01), r"transition.at=0.01 of trainer.max_steps=10 is step 0, which is not inside the run"),
        (dict(quant={"include": ["layers.*.ffn.*"]}), r"quant.include=\['layers.\*.ffn.\*'\] .* match no nn.Linear"),
        (dict(quant={"granularity": "group", "group_size": 5}), "group_size=5 does not divide in_features=32"),
        (dict(at=0, quant={"exclude": ["*"]}), "match no nn.Linear"),
    ],
)
def test_bad_setup_raises_before_the_first_step(tmp_path: Path, cache_dir: Path, kwargs: dict, match: str):
    probe = Probe()
    with pytest.raises(ValueError, match=match):
        dm = TokenDataModule(StdlibSource(max_files=60), seq_len=32, batch_size=4, vocab_size=320, cache_dir=str(cache_dir))
        lm = LanguageModel(model={**TINY_MODEL, "vocab_size": dm.vocab_size})
        trainer = L.Trainer(
            accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, callbacks=[PrecisionTransition(**{"quant": {}, **kwargs}), probe],
        )
        trainer.fit(lm, datamodule=dm)
    assert probe.start == {}  # no training batch ran
    assert not any(isinstance(m, BitLinear) for m in lm.modules())  # and the model is untouched


def test_bad_transition_config_fails_before_training(tiny_overrides: list[str], tmp_path: Path):
    bad = {
        ("quant=ternary", "transition=default", "transition.at=1.5"): r"transition.at=1.5 is outside \(0, 1\)",
        ("transition=default",): "a precision transition needs a quantization to switch to, but quant=none",
        # Hydra's own hint when the transition group is not selected: refused, not silently 16-bit
        ("quant=ternary", "+transition.at=0.5"): "transition.at=0.5 is set, but no transition is selected; add "
                                                 "transition=default",
        ("+quant.include=[mlp.*]",): "quant.include is set, but quant.recipe=none quantizes nothing",
        ("quant=dqt_ternary", "transition=default", "transition.phase_in=tanh", "transition.phase_in_steps=5"):
            "transition.phase_in='tanh' needs a recipe with a quantization strength, but quant.recipe='dqt'",
        ("quant=ternary", "quant.weight_scale=mode"): "quant.weight_scale='mode' is not supported",
        ("quant=dqt_ternary", "quant.bits=12"): "quant.bits=12 is not supported",
        ("quant=ternary", "transition=default", "transition.at=20"): "transition.at=20 is past the end",
    }
    for overrides, match in bad.items():
        with pytest.raises(ValueError, match=match):
            run_training(compose([*tiny_overrides, *overrides]))
    assert not (tmp_path / "run").exists()  # refused before the data, a logger or a checkpoint directory
    # a filter that matches nothing needs the model: refused in setup, before the first step
    with pytest.raises(ValueError, match=r"quant.include=\['ffn.\*'\] quant.exclude=\['lm_head'\] match no nn.Linear"):
        run_training(compose([*tiny_overrides, "quant=ternary", "quant.include=[ffn.*]"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


QUANT_OPTIONS = sorted(p.stem for p in (Path(CONFIG_DIR) / "quant").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("quant", QUANT_OPTIONS)
def test_every_quant_option_converts_the_model(quant: str, tiny_overrides: list[str]):
    cfg = compose([*tiny_overrides, f"quant={quant}"])
    (transition,) = [c for c in build_callbacks(cfg) if isinstance(c, PrecisionTransition)]
    assert transition.at == 0  # quant alone: quantized from the first step
    recipe = recipe_from_config(cfg.quant)
    model = tiny_llama()
    assert recipe.plan(model) == CONVERTED
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # plan is pure
    assert recipe.convert(model).names == CONVERTED == recipe.converted(model)
    assert torch.isfinite(model(torch.randint(0, 320, (2, 8)))).all()


def test_quant_none_builds_no_transition(tiny_overrides: list[str]):
    assert not [c for c in build_callbacks(compose(tiny_overrides)) if isinstance(c, PrecisionTransition)]


def test_ternary_yaml_spells_out_the_bitlinear_defaults():
    from dataclasses import asdict

    from bitflow.quant import BitLinearOptions

    cfg = compose(["quant=ternary", "paths.output_dir=."]).quant
    assert {k: cfg[k] for k in asdict(BitLinearOptions())} == asdict(BitLinearOptions())


# ------------------------------------------------------------------------------------------------ semantics
def test_keep_switches_in_place_and_keeps_the_optimizer_state(tmp_path: Path, cache_dir: Path):
    probe, lm = fit(tmp_path, cache_dir, PrecisionTransition(at=0.4, optimizer_state="keep", spike_window=3, recovery_smoothing=0.5))
    t0 = 4  # 0.4 of max_steps=10
    for step in range(t0):
        assert set(probe.start[step]["types"].values()) == {"Linear"}
        assert probe.start[step]["lambda"] == []
        assert probe.start[step]["quant_state"] is None
    for step in range(t0, 10):  # step t0's forward is already ternary
        types = probe.start[step]["types"]
        assert [n for n, t in types.items() if t == "BitLinear"] == CONVERTED
        assert types["lm_head"] == "Linear"
        assert probe.start[step]["lambda"] == [(1.0, 1.0)] * len(CONVERTED)
    # the same Parameters throughout, and they are the ones the optimizer updates
    ids = probe.start[0]["param_ids"]
    assert all(probe.start[s]["param_ids"] == ids for s in range(10))
    assert probe.start[t0]["opt_param_ids"] == sorted(ids.values())
    # keep: the AdamW state right after the switch is exactly the state after step t0 - 1
    before, after = probe.end[t0 - 1]["state"], probe.start[t0]["state"]
    assert set(after) == set(before) == set(ids)
    for name in before:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(before[name][key], after[name][key]), (name, key)
        assert float(after[name]["step"]) == t0
    assert all(float(s["step"]) == 10 for s in probe.end[9]["state"].values())
    state = lm.quant_state
    assert state["kind"] == "bitlinear" and state["layers"] == CONVERTED
    assert state["strength"] == {"weight": 1.0, "act": 1.0}
    assert state["options"]["weight_scale"] == "absmean" and state["options"]["weight_bits"] is None
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["quant/lambda"] == [(s, 0.0) for s in range(t0)] + [(s, 1.0) for s in range(t0, 10)]
    # spike: max loss of steps t0..t0+K-1 minus the mean of t0-K..t0-1, logged at t0+K-1 (K=3)
    k, beta, loss = 3, 0.5, dict(scalars["train/loss"])
    level = sum(loss[s] for s in range(t0 - k, t0)) / k
    spike = max(loss[s] for s in range(t0, t0 + k)) - level
    assert scalars["transition/spike"] == [(t0 + k - 1, pytest.approx(spike, abs=1e-5))]
    # recovery: the first step from t0 on where the EMA of the loss (from t0-K on) is at or below that level
    ema, recovered = None, None
    for s in range(t0 - k, 10):
        ema = loss[s] if ema is None else beta * ema + (1 - beta) * loss[s]
        if s >= t0 and ema <= level:
            recovered = s
            break
    if recovered is None:
        assert "transition/recovery_steps" not in scalars
    else:
        assert scalars["transition/recovery_steps"] == [(recovered, float(recovered - t0))]


class HookedLinear(nn.Linear):
    """A user's nn.Linear subclass; the planning of a mid-run switch must leave it (and its hooks) alone."""


@pytest.mark.parametrize("quant", [{"recipe": "bitlinear"}, {"recipe": "dqt"}])
def test_planning_keeps_linear_subclasses_and_their_hooks(quant: dict, tmp_path: Path, cache_dir: Path):
    calls: list[int] = []

    def prepare(lm: LanguageModel) -> None:
        old = lm.model.layers[0].mlp.w1
        layer = HookedLinear(old.in_features, old.out_features, bias=False)
        layer.register_forward_hook(lambda m, i, o: calls.append(1))
        lm.model.layers[0].mlp.w1 = layer

    probe, lm = fit(tmp_path, cache_dir, PrecisionTransition(at=3), max_steps=5, quant=quant, prepare=prepare)
    # before the switch the very same HookedLinear runs, with its hook: setup only planned (no convert + revert)
    assert all(probe.start[s]["types"]["layers.0.mlp.w1"] == "HookedLinear" for s in range(3))
    assert len(calls) >= 3
    # from the switch on the layer is quantized, and its forward hook moved along: it fired on all 5 steps
    expected = {"bitlinear": "BitLinear", "dqt": "DQTLinear"}[quant["recipe"]]
    assert type(lm.model.layers[0].mlp.w1).__name__ == expected
    assert len(calls) == 5


def test_reset_rewarmup_and_tanh_phase_in(tmp_path: Path, cache_dir: Path):
    t0, tw = 4, 4
    transition = PrecisionTransition(
        at=t0, optimizer_state="reset", lr_rewarmup_steps=2, phase_in="tanh", phase_in_steps=tw, spike_window=3
    )
    probe, lm = fit(tmp_path, cache_dir, transition, max_steps=11)
    converted = {f"{n}.weight" for n in CONVERTED}
    before, after = probe.end[t0 - 1]["state"], probe.start[t0]["state"]
    assert set(after) == set(before) - converted  # reset: only the converted Parameters lose their state
    for name in after:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(before[name][key], after[name][key]), (name, key)
    # AdamW rebuilt the state of the converted Parameters at step t0: their step count restarted
    steps = {n: float(s["step"]) for n, s in probe.end[t0]["state"].items()}
    assert {steps[n] for n in converted} == {1.0}
    assert {steps[n] for n in set(steps) - converted} == {t0 + 1.0}
    # bolt-on re-warmup on the constant schedule: LR 0 at t0, LR/2 at t0 + 1, back to LR at t0 + 2
    lrs = [probe.start[s]["lr"] for s in range(11)]
    assert lrs == pytest.approx([LR] * t0 + [0.0, LR / 2] + [LR] * 5, abs=1e-12)
    # lambda = tanh(2.5 (t - t0) / T_w), the paper's check values, then exactly 1 (weights and activations)
    expected = [0.0, 0.5546, 0.8483, 0.9540, 1.0, 1.0, 1.0]
    for step, lam in zip(range(t0, 11), expected, strict=True):
        values = set(probe.start[step]["lambda"])
        assert len(values) == 1
        (w, a), = values
        assert w == pytest.approx(lam, abs=1e-4) and a == w
    assert probe.start[t0 + tw]["lambda"][0] == (1.0, 1.0)
    # between steps the model holds lambda(global_step): what validation and checkpoints see
    assert probe.end[t0]["lambda"][0][0] == pytest.approx(0.5546, abs=1e-4)
    assert probe.end[t0]["quant_state"]["strength"]["weight"] == pytest.approx(0.5546, abs=1e-4)
    scalars = read_scalars(tmp_path / "tb")
    lam = dict(scalars["quant/lambda"])
    assert [lam[s] for s in range(t0, 11)] == pytest.approx(expected, abs=1e-4)
    assert [lam[s] for s in range(t0)] == [0.0] * t0
    lr = dict(scalars["train/lr"])
    assert [lr[s] for s in (t0 - 1, t0, t0 + 1, t0 + 2)] == pytest.approx([LR, 0.0, LR / 2, LR])
    assert lm.lr_wrappers == []  # the re-warmup is unregistered when the fit ends


def test_spike_and_recovery_of_hand_made_losses():
    from bitflow.callbacks.spike import SpikeTracker

    # switch at t0=3, K=2, EMA beta 0.5. Pre-switch level = mean(loss[1], loss[2]) = (4 + 3) / 2 = 3.5.
    # spike = max(loss[3], loss[4]) - 3.5 = 6 - 3.5 = 2.5, known at step t0 + K - 1 = 4.
    # EMA from step 1: 4, 3.5, 4.75, 4.375, 3.6875, 2.84375 <= 3.5 at step 6: recovered 6 - 3 = 3 steps after t0.
    tracker = SpikeTracker(t0=3, window=2, beta=0.5)
    events = []
    for step, loss in enumerate([5.0, 4.0, 3.0, 6.0, 4.0, 3.0, 2.0, 9.0]):
        tracker.add(step, torch.tensor(loss / 2))  # two micro-batches, each loss / 2 (as Lightning scales them)
        tracker.add(step, torch.tensor(loss / 2))
        tracker.end_step(step)
        if step in (2, 4, 7):  # flushes at some logging steps only
            events += tracker.flush()
    assert events == [("transition/spike", 2.5, 4), ("transition/recovery_steps", 3.0, 6)]
    assert tracker.pre == [4.0, 3.0] and tracker.post == [6.0, 4.0]
    assert not tracker.active  # both measured: tracking stopped


def test_at_zero_is_ternary_from_the_first_step_and_none_never_switches(tmp_path: Path, cache_dir: Path):
    probe, lm = fit(tmp_path / "zero", cache_dir, PrecisionTransition(at=0), max_steps=3)
    assert [n for n, t in probe.start[0]["types"].items() if t == "BitLinear"] == CONVERTED
    assert lm.quant_state["layers"] == CONVERTED
    assert "transition/spike" not in read_scalars(tmp_path / "zero" / "tb")  # no 16-bit steps to compare with

    probe, lm = fit(tmp_path / "never", cache_dir, PrecisionTransition(at=None), max_steps=3)
    assert all(set(s["types"].values()) == {"Linear"} for s in probe.start.values())
    assert lm.quant_state is None
    assert read_scalars(tmp_path / "never" / "tb")["quant/lambda"] == [(0, 0.0), (1, 0.0), (2, 0.0)]


def test_lambda_is_logged_with_train_loss_and_at_the_switch(tmp_path: Path, cache_dir: Path):
    fit(tmp_path, cache_dir, PrecisionTransition(at=4, phase_in="linear", phase_in_steps=4), max_steps=9,
        log_every_n_steps=3)
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [2, 5, 8]
    # (step + 1) % 3 == 0 like train/loss, plus the switch step 4; linear: (t - 4) / 4
    assert scalars["quant/lambda"] == [(2, 0.0), (4, 0.0), (5, 0.25), (8, 1.0)]


# ------------------------------------------------------------------------------------------------ resume
def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


# what each recipe's switch looks like in the resume test: BitLinear phases in with tanh, DQT (no strength) at once
SWITCH = {
    "ternary": ["transition.phase_in=tanh", "transition.phase_in_steps=4"],
    "dqt_ternary": ["transition.phase_in=none"],
}
LAYER_TYPE = {"ternary": "BitLinear", "dqt_ternary": "DQTLinear"}


@pytest.mark.parametrize("quant", list(SWITCH))
def test_resume_at_any_point_matches_the_uninterrupted_run(quant: str, tiny_overrides: list[str], tmp_path: Path):
    # switch at 4 with reset + re-warmup (+ tanh phase-in over 4 steps for BitLinear); checkpoints after every step
    common = [
        *tiny_overrides,
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "+callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.filename='step{step}'",
        f"quant={quant}",
        "transition=default",
        "transition.at=4",
        "transition.optimizer_state=reset",
        "transition.lr_rewarmup_steps=2",
        "transition.spike_window=3",
        *SWITCH[quant],
    ]
    full_dir = tmp_path / "full"
    run_training(compose([*common, f"paths.output_dir={full_dir}"]))
    full = _ckpt(full_dir / "checkpoints" / "step10.ckpt")
    assert full["bitflow"]["quant"]["layers"] == CONVERTED
    # a checkpoint at global step k holds the model of step k: 16-bit up to the switch, lambda(k) after it
    assert _ckpt(full_dir / "checkpoints" / "step4.ckpt")["bitflow"]["quant"] is None
    model = load_checkpoint(full_dir / "checkpoints" / "step6.ckpt")
    assert [n for n, m in model.model.named_modules() if type(m).__name__ == LAYER_TYPE[quant]] == CONVERTED
    if quant == "ternary":
        assert full["bitflow"]["quant"]["strength"] == {"weight": 1.0, "act": 1.0}
        mid = _ckpt(full_dir / "checkpoints" / "step6.ckpt")["bitflow"]["quant"]
        assert mid["strength"]["weight"] == pytest.approx(0.8483, abs=1e-4)  # tanh(2.5 * 2/4)
        assert float(model.model.layers[0].attn.wq.weight_strength) == pytest.approx(0.8483, abs=1e-4)
    full_scalars = read_scalars(full_dir / "tb")
    assert full_scalars["quant/switch_step"] == [(4, 4.0)]
    full_spike = full_scalars["transition/spike"]
    assert dict(full_scalars["train/lr"])[4] == 0.0  # reset + re-warmup: LR 0 at the switch, for any recipe

    # before the switch, at it (the checkpoint of step 4 is still 16-bit), mid phase-in, after it
    for k in (3, 4, 6, 9):
        out = tmp_path / f"resumed{k}"
        run_training(compose([*common, f"paths.output_dir={out}", f"ckpt_path={full_dir / 'checkpoints' / f'step{k}.ckpt'}"]))
        resumed = _ckpt(out / "checkpoints" / "step10.ckpt")
        assert resumed["global_step"] == 10
        assert resumed["bitflow"]["quant"] == full["bitflow"]["quant"], k  # layer types, options, lambda
        for name, value in full["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][name]), (k, name)
        a, b = full["optimizer_states"][0], resumed["optimizer_states"][0]
        assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
        assert set(a["state"]) == set(b["state"])
        for i in a["state"]:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(a["state"][i][key], b["state"][i][key]), (k, i, key)
        if quant == "dqt_ternary":  # the DQT moments and the rounding generator continue exactly too
            assert set(a["dqt"]["state"]) == set(b["dqt"]["state"]) == set(CONVERTED)
            for name in a["dqt"]["state"]:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(a["dqt"]["state"][name][key], b["dqt"]["state"][name][key]), (k, name, key)
        assert full["lr_schedulers"] == resumed["lr_schedulers"]
        assert full["callbacks"]["PrecisionTransition"] == resumed["callbacks"]["PrecisionTransition"]
        scalars = read_scalars(out / "tb")
        # quant/switch_step: logged once, by the run that switched
        assert scalars.get("quant/switch_step", []) == ([(4, 4.0)] if k <= 4 else [])
        if k < 4 + 3 - 1:  # the spike window (steps 1..6) ends after the resume: the same spike is logged
            assert scalars["transition/spike"] == full_spike

    # resuming a switched run with other quantization options is refused before training goes on
    other = "quant=ternary_median" if quant == "ternary" else "quant=dqt_int8"
    with pytest.raises(ValueError, match=r"other quantization options \(quant\.(weight_scale: checkpoint 'absmean', this run 'absmedian'|bits: "
                       r"checkpoint None, this run 8)\)"):
        run_training(compose([*common, other, f"paths.output_dir={tmp_path / 'other'}",
                              f"ckpt_path={full_dir / 'checkpoints' / 'step6.ckpt'}"]))
    # and so is resuming it without its transition (quant alone means: quantized from step 0)
    with pytest.raises(ValueError, match=r"the checkpoint's run switches precision at step 4, this run at step 0"):
        run_training(compose([*[o for o in common if not o.startswith("transition")], f"quant={quant}",
                              f"paths.output_dir={tmp_path / 'no_transition'}",
                              f"ckpt_path={full_dir / 'checkpoints' / 'step6.ckpt'}"]))
    # and so is resuming it as a 16-bit run
    with pytest.raises(ValueError, match=r"trained with quant\.recipe=(bitlinear|dqt), this run has quant=none \(16-bit\)"):
        run_training(compose([*[o for o in common if not o.startswith("transition")], "quant=none",
                              f"paths.output_dir={tmp_path / 'fp16'}",
                              f"ckpt_path={full_dir / 'checkpoints' / 'step6.ckpt'}"]))


# ------------------------------------------------------------------------------------------------ DDP, compile
@pytest.mark.slow
def test_ddp_switches_every_rank_at_the_same_step(tmp_path: Path, cache_dir: Path):
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    proc = subprocess.run(
        ["bitflow", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
         "trainer.max_steps=6", "quant=ternary", "transition=default", "transition.at=3", "transition.optimizer_state=reset",
         "transition.phase_in=linear", "transition.phase_in_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # both ranks log the switch at step 3
    msg = "precision transition at step 3: 14 layers converted by bitlinear"
    assert proc.stderr.count(msg) + proc.stdout.count(msg) == 2, proc.stderr[-4000:]
    ckpt = _ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert ckpt["bitflow"]["quant"]["layers"] == CONVERTED
    assert ckpt["bitflow"]["quant"]["strength"] == {"weight": 1.0, "act": 1.0}
    lam = dict(read_scalars(tmp_path / "run" / "tb")["quant/lambda"])
    assert [lam[s] for s in range(6)] == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]


@pytest.mark.slow
def test_compiled_training_follows_lambda_without_recompiling_per_step(tiny_overrides: list[str], tmp_path: Path):
    import torch._dynamo

    common = [*tiny_overrides, "trainer.max_steps=7", "trainer.precision=32-true", "trainer.val_check_interval=7",
              "quant=ternary", "transition=default", "transition.at=2", "transition.phase_in=linear",
              "transition.phase_in_steps=4"]
    run_training(compose([*common, f"paths.output_dir={tmp_path / 'eager'}"]))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_training(compose([*common, "compile=true", f"paths.output_dir={tmp_path / 'compiled'}"]))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = dict(read_scalars(tmp_path / "eager" / "tb")["train/loss"])
    compiled = dict(read_scalars(tmp_path / "compiled" / "tb")["train/loss"])
    # lambda went 0, 0.25, 0.5, 0.75, 1 through buffers: the compiled losses track the eager ones step by step
    assert [compiled[s] for s in range(7)] == pytest.approx([eager[s] for s in range(7)], rel=1e-3)
    # 16-bit training, ternary training, validation: a few graphs, not one per lambda value
    assert graphs <= 4, graphs
