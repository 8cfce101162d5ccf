"""QuantMonitor: statistics against hand-computed values, and TensorBoard files of a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bitflow.callbacks import QuantMonitor
from bitflow.cli import run_training
from bitflow.events import read_events
from bitflow.quant import BitLinear
from tests.helpers import compose, read_scalars


def _layer(rows: list[list[float]]) -> BitLinear:
    linear = nn.Linear(len(rows[0]), len(rows), bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows))
    return BitLinear.from_linear(linear)


def test_measure_matches_hand_computed_statistics():
    # a: mean|W| = (0.1 + 0.5 + 0.02 + 0.9) / 4 = 0.38; W / 0.38 = 0.26, -1.32, 0.05, 2.37 -> codes 0, -1, 0, 1
    a = _layer([[0.1, -0.5, 0.02, 0.9]])
    # b: mean|W| = (0.1 + 0.3 + 0.3 + 0.5 + 0.7 + 0.1 + 0.2 + 0.2) / 8 = 0.3;
    #    W / 0.3 = 0.33, -1, 1, 1.67, 2.33, -0.33, 0.67, 0.67 -> codes 0, -1, 1, 1, 1, 0, 1, 1: 2 zeros of 8
    b = _layer([[0.1, -0.3, 0.3, 0.5], [0.7, -0.1, 0.2, 0.2]])
    monitor = QuantMonitor()
    first = monitor.measure([("a", a), ("b", b)], per_layer=True)
    assert first["quant/zero_fraction"] == pytest.approx((2 + 2) / (4 + 8))
    assert first["quant/weight_scale"] == pytest.approx((0.38 + 0.3) / 2)
    assert first["quant/zero_fraction/a"] == pytest.approx(0.5)
    assert first["quant/zero_fraction/b"] == pytest.approx(2 / 8)
    assert first["quant/weight_scale/a"] == pytest.approx(0.38)
    assert "quant/flip_rate" not in first  # nothing to compare with yet

    with torch.no_grad():
        a.weight[0, 0] = -0.9  # mean|W| = (0.9 + 0.5 + 0.02 + 0.9) / 4 = 0.58: codes -2 -> -1, -1, 0, 2 -> 1
    second = monitor.measure([("a", a), ("b", b)], per_layer=True)
    assert second["quant/flip_rate/a"] == pytest.approx(1 / 4)  # only the first code changed (0 -> -1)
    assert second["quant/flip_rate/b"] == 0.0
    assert second["quant/flip_rate"] == pytest.approx(1 / 12)
    assert second["quant/zero_fraction/a"] == pytest.approx(1 / 4)
    assert second["quant/weight_scale/a"] == pytest.approx(0.58)

    aggregate_only = monitor.measure([("a", a)])
    assert sorted(aggregate_only) == ["quant/flip_rate", "quant/weight_scale", "quant/zero_fraction"]
    assert aggregate_only["quant/flip_rate"] == 0.0


@pytest.mark.parametrize("kwargs", [dict(every_n_steps=-1), dict(per_layer_every_n_steps=1.5), dict(histogram_every_n_steps=True)])
def test_bad_intervals_raise(kwargs: dict):
    with pytest.raises(ValueError, match="allowed: null"):
        QuantMonitor(**kwargs)


def test_monitor_logs_scalars_and_histograms_of_a_ternary_run(tiny_overrides: list[str], tmp_path: Path):
    run_training(compose([
        *tiny_overrides,
        "trainer.max_steps=8",
        "quant=ternary",
        "transition=default",
        "transition.at=3",
        "callbacks.quant_monitor.per_layer_every_n_steps=4",
        "callbacks.quant_monitor.histogram_every_n_steps=8",
    ]))
    tb = tmp_path / "run" / "tb"
    scalars = read_scalars(tb)
    # measured at every logged step (log_every_n_steps=1) once the layers are ternary (from step 3)
    assert [s for s, _ in scalars["quant/zero_fraction"]] == [3, 4, 5, 6, 7]
    assert [s for s, _ in scalars["quant/weight_scale"]] == [3, 4, 5, 6, 7]
    assert [s for s, _ in scalars["quant/flip_rate"]] == [4, 5, 6, 7]  # needs a previous measurement
    assert all(0.0 < v < 1.0 for _, v in scalars["quant/zero_fraction"])
    assert all(0.0 <= v < 0.5 for _, v in scalars["quant/flip_rate"])
    assert all(v > 0.0 for _, v in scalars["quant/weight_scale"])
    # per layer where (step + 1) % 4 == 0, histograms where (step + 1) % 8 == 0
    assert [s for s, _ in scalars["quant/zero_fraction/layers.1.mlp.w2"]] == [3, 7]
    assert [s for s, _ in scalars["quant/flip_rate/layers.0.attn.wq"]] == [7]
    assert not any(tag.endswith("lm_head") for tag in scalars)
    histograms = read_events(tb, histograms=True).histograms
    assert "quant/latent_weight/layers.0.attn.wq" in histograms
    assert [step for step, _ in histograms["quant/latent_weight/layers.1.mlp.w3"]] == [7]
    assert "quant/lambda" in scalars and "train/loss" in scalars
