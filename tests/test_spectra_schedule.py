"""Spectra's TriLM schedule (arXiv 2407.12327): the peak LR halved at 50%, weight decay removed at 2/3, as pure
functions of the step, exact across a resume; and the spectra experiments compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitflow.cli import run_training
from bitflow.lm import apply_weight_decay_factor
from bitflow.schedules import LRSchedule
from tests.helpers import compose, read_scalars

SPECTRA = dict(lr_drop_at=0.5, lr_drop_factor=0.5, weight_decay_off_at=0.6667)


def test_lr_is_halved_from_half_of_training_on():
    sched = LRSchedule(name="cosine", total_steps=300, warmup_steps=10, **SPECTRA)
    base = LRSchedule(name="cosine", total_steps=300, warmup_steps=10)
    assert sched.lr_drop_step == 150
    assert sched(149) == base(149)  # just before: the plain cosine
    assert sched(150) == pytest.approx(0.5 * base(150))  # at: halved
    assert sched(151) == pytest.approx(0.5 * base(151))
    assert sched(299) == pytest.approx(0.5 * base(299))
    assert sched(0) == base(0) == pytest.approx(1 / 10)  # warmup untouched
    # hand values: cosine from 1 to 0.1 over steps 10..300
    u = (150 - 10) / 290
    assert sched(150) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * u)).item())))


def test_weight_decay_is_removed_from_two_thirds_on():
    sched = LRSchedule(name="cosine", total_steps=300, **SPECTRA)
    assert sched.weight_decay_off_step == 200
    assert [sched.weight_decay_factor(s) for s in (0, 199, 200, 201, 299)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    plain = LRSchedule(total_steps=300)
    assert plain.weight_decay_off_step is None and plain.lr_drop_step is None
    assert {plain.weight_decay_factor(s) for s in range(300)} == {1.0}
    assert [plain(s) for s in range(300)] == [LRSchedule(total_steps=300, lr_drop_factor=0.5)(s) for s in range(300)]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(lr_drop_at=1.5), r"lr_drop_at=1\.5 must be null or a fraction"),
        (dict(weight_decay_off_at=0), r"weight_decay_off_at=0 must be null or a fraction"),
        (dict(lr_drop_factor=0.0), r"lr_drop_factor=0\.0 must be in \(0, 1\]"),
    ],
)
def test_bad_fractions_are_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(total_steps=300, **fields)


def test_weight_decay_factor_is_set_per_group_and_survives_a_state_dict_round_trip():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    sched = LRSchedule(total_steps=30, weight_decay_off_at=0.5)
    apply_weight_decay_factor(opt, sched, 14)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    apply_weight_decay_factor(opt, sched, 15)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    # a fresh optimizer loading this state (a resume) gets the configured value back before step 15
    fresh = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["initial_weight_decay"] == 0.1
    apply_weight_decay_factor(fresh, sched, 3)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.0]


def test_the_trilm_recipe_composes():
    cfg = compose(["+experiment=spectra_trilm", "paths.output_dir=."])
    assert cfg.quant.recipe == "bitlinear" and cfg.quant.weight_scale == "absmean" and cfg.quant.act_bits is None
    assert list(cfg.quant.exclude) == ["lm_head"] and cfg.quant.granularity == "tensor"
    assert (cfg.scheduler.lr_drop_at, cfg.scheduler.lr_drop_factor, cfg.scheduler.weight_decay_off_at) == (0.5, 0.5, 0.6667)
    assert cfg.transition.get("_target_") is None
    float_cfg = compose(["+experiment=spectra_floatlm", "paths.output_dir=."])
    assert float_cfg.quant.recipe == "none" and "lr_drop_at" not in float_cfg.scheduler
    qid = compose(["+experiment=[qid_checkpoints,spectra_floatlm]", "paths.output_dir=."])
    assert qid.task_name == "spectra_floatlm" and qid.quant.recipe == "none"
    mc = qid.callbacks.model_checkpoint
    assert (mc.every_n_train_steps, mc.save_top_k, mc.monitor, mc.filename) == (50, -1, None, "step{step:06d}")


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_trilm_schedule_resumes_exactly(tiny_overrides: list[str], tmp_path: Path):
    """12 steps, LR halved from step 6, weight decay off from step 8; resumed from step 4 = uninterrupted."""
    common = [
        *tiny_overrides, "+experiment=[qid_checkpoints,spectra_trilm]", "trainer.max_steps=12",
        "callbacks.model_checkpoint.every_n_train_steps=4", "trainer.val_check_interval=12",
    ]
    full = tmp_path / "full"
    run_training(compose([*common, f"paths.output_dir={full}"]))
    names = sorted(p.name for p in (full / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step000004.ckpt", "step000008.ckpt", "step000012.ckpt"]
    groups = {s: _ckpt(full / "checkpoints" / f"step{s:06d}.ckpt")["optimizer_states"][0]["param_groups"]
              for s in (4, 8, 12)}
    decay = {s: [g for g in gs if g.get("name") == "decay"][0] for s, gs in groups.items()}
    assert decay[4]["weight_decay"] == 0.1 and decay[4]["initial_weight_decay"] == 0.1
    # the step-8 checkpoint holds optimizer steps 0..7: decay still on; step 8 is the first without
    assert decay[8]["weight_decay"] == 0.1 and decay[12]["weight_decay"] == 0.0
    lr = dict(read_scalars(full)["train/lr"])
    sched = LRSchedule(total_steps=12, warmup_steps=2, **SPECTRA)
    for step, value in lr.items():  # train/lr at global step s is the LR of optimizer step s
        assert value == pytest.approx(2e-3 * sched(step), rel=1e-6), step
    assert lr[6] == pytest.approx(0.5 * 2e-3 * LRSchedule(total_steps=12, warmup_steps=2)(6), rel=1e-6)

    resumed = tmp_path / "resumed"
    run_training(compose([*common, f"paths.output_dir={resumed}", f"ckpt_path={full / 'checkpoints' / 'step000004.ckpt'}"]))
    a, b = _ckpt(full / "checkpoints" / "step000012.ckpt"), _ckpt(resumed / "checkpoints" / "step000012.ckpt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.0
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == [
        g["lr"] for g in b["optimizer_states"][0]["param_groups"]
    ]
