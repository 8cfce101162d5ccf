"""Bad configs, systematically: hypothesis draws overrides from the whole config space (out-of-range numbers, wrong
types, unknown keys, unknown group options, incompatible combinations); each config either trains or fails before
training with a ValueError/FileNotFoundError whose message names the key.

The default suite checks the "fails before training" half through ``prepare_config`` (cheap); the slow test runs
one real training step for drawn configs that pass it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import TINY, compose

# key -> values that are valid or not (numbers around and outside the allowed range, wrong types)
NUMERIC = {
    "trainer.max_steps": st.sampled_from([-1, 0, 1, 2, 1.5, "ten", True, None]),
    "trainer.val_check_interval": st.sampled_from([0, -3, 1, 0.5, 1.5, "x"]),
    "trainer.log_every_n_steps": st.sampled_from([0, 1, -1, "x"]),
    "trainer.accumulate_grad_batches": st.sampled_from([0, 1, 2, 0.5]),
    "trainer.gradient_clip_val": st.sampled_from([-1.0, 0.0, 1.0, "inf", "nan", "x"]),
    "trainer.precision": st.sampled_from(["16", "32-true", "fp8", 7, "auto"]),
    "data.batch_size": st.sampled_from([0, -2, 1, 2.5, "x"]),
    "data.seq_len": st.sampled_from([0, 16, 65, 1000, "x"]),
    "data.vocab_size": st.sampled_from([0, 256, 257, 300, "x"]),
    "data.num_workers": st.sampled_from([-1, 0, "x"]),
    "data.val_windows": st.sampled_from([0, 1, None, -4]),
    "optimizer.lr": st.sampled_from([0.0, -1e-3, 1e-3, "x", "inf", "nan"]),
    "optimizer.eps": st.sampled_from([0.0, 1e-8, -1.0]),
    "optimizer.weight_decay": st.sampled_from([-0.1, 0.0, 0.1]),
    "optimizer.betas": st.sampled_from(["[0.9]", "[0.9,1.0]", "[0.9,0.95]", "x", "[-0.1,0.9]"]),
    "scheduler.warmup_steps": st.sampled_from([-1, 0, 1, 100, "x"]),
    "scheduler.min_lr_ratio": st.sampled_from([-0.5, 0.0, 0.5, 2.0]),
    "model.d_model": st.sampled_from([0, 30, 32, -32, "x"]),
    "model.n_layers": st.sampled_from([0, 1, -1, "x"]),
    "model.n_heads": st.sampled_from([0, 2, 3, "x"]),
    "model.d_ff": st.sampled_from([0, 64, -1]),
    "model.max_seq_len": st.sampled_from([0, 8, 64]),
    "model.norm_eps": st.sampled_from([0.0, -1.0, 1e-5]),
    "fault.on_nonfinite": st.sampled_from(["stop", "skip", "rollback", "ignore", 1]),
    "fault.max_consecutive_skips": st.sampled_from([0, 1, "x"]),
    "fault.rollback_lr_factor": st.sampled_from([0.0, 0.5, 1.5, "x"]),
    "fault.requeue_signal": st.sampled_from(["SIGUSR1", "SIGFOO", "USR1", 10]),
    "threads": st.sampled_from(["auto", 0, 1, "many", 2.5]),
    "seed": st.sampled_from([0, 1]),
}
GROUPS = {"model": ["tiny", "nope"], "quant": ["none", "ternary", "dqt_ternary", "nope"],
          "scheduler": ["cosine", "wsd", "nope"], "transition": ["none", "default", "nope"],
          "optimizer": ["adamw", "nope"], "fault": ["default", "nope"]}
UNKNOWN_KEYS = ["+optimizer.momentum=0.9", "+model.n_experts=4", "+scheduler.cycles=2", "+fault.retries=3",
                "+data.shuffle_buffer=10", "+transition.delay=3", "+quant.blocksize=64"]


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@st.composite
def overrides(draw) -> list[str]:
    """1-3 overrides: numbers/types, group options (also incompatible ones), unknown keys."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["numeric", "group", "unknown"]))
        if kind == "numeric":
            key = draw(st.sampled_from(sorted(NUMERIC)))
            out.append(f"{key}={_value(draw(NUMERIC[key]))}")
        elif kind == "group":
            group = draw(st.sampled_from(sorted(GROUPS)))
            out.append(f"{group}={draw(st.sampled_from(GROUPS[group]))}")
        else:
            out.append(draw(st.sampled_from(UNKNOWN_KEYS)))
    keys = [o.split("=", 1)[0].lstrip("+") for o in out]
    return [o for i, o in enumerate(out) if keys[i] not in keys[:i]]  # one value per key


def _named(message: str, overrides: list[str]) -> bool:
    """Whether an error message names one of the keys (or group names) of the overrides."""
    keys = [o.split("=", 1)[0].lstrip("+") for o in overrides]
    return any(k in message for k in keys) or any(k.split(".")[0] + "." in message for k in keys)


def _prepare(overrides: list[str], tmp: Path, cache: Path | None = None):
    from bitflow.cli import prepare_config

    cfg = compose([*TINY, f"paths.output_dir={tmp / 'run'}", f"paths.cache_dir={cache or tmp / 'cache'}", *overrides])
    prepare_config(cfg, explicit={o.split("=", 1)[0].lstrip("+") for o in overrides})
    return cfg


def _check_failure(e: BaseException, ov: list[str]) -> None:
    assert isinstance(e, (ValueError, FileNotFoundError, HydraException)), f"{ov}: {type(e).__name__}: {e}"
    assert _named(str(e), ov), f"{ov}: the error does not name the key: {e}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ov=overrides())
def test_a_drawn_config_is_refused_before_training_naming_its_key_or_passes_the_checks(ov, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prop")
    try:
        _prepare(ov, tmp)
    except Exception as e:  # noqa: BLE001 - the assertion is on its type and message
        _check_failure(e, ov)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ov=overrides())
def test_a_drawn_config_that_passes_the_checks_trains_one_step(ov, tmp_path_factory, cache_dir):
    from bitflow.cli import run_training

    tmp = tmp_path_factory.mktemp("prop")
    ov = [o for o in ov if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=1"]
    try:
        cfg = _prepare(ov, tmp, cache_dir)
    except Exception as e:  # noqa: BLE001
        _check_failure(e, ov)
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITFLOW_CACHE", str(cache_dir))
        try:
            run_training(cfg, prepared=True)
        except Exception as e:  # noqa: BLE001 - a build-time refusal must still name the key
            _check_failure(e, ov)
