"""The cost of the online quantization gap (``transition.gap_every``) against training, on the default model.

Measured in one process: a training step of the default ``tiny`` model (batch 16 x 256, bf16 autocast, AdamW, as
bench/train.py), one gap measurement (the 16-bit and the quantized loss on ``gap_windows`` = 8 validation windows,
ternary absmean weights + int8 activations through :class:`bitflow.callbacks.gap.QuantGap`) and one with the
per-layer sensitivity (every layer alone, every ``gap_layers_every`` = 10th measurement). The overhead at an
interval N is (t_gap + t_per_layer / 10) / (N t_step); the issue's budget is <= 5% at the documented interval.

    python -m bitflow.bench --only gap
"""

from __future__ import annotations

from typing import Any

import torch

from bitflow.bench.common import print_table, time_per_call
from bitflow.bench.train import SHAPES, VOCAB, train_step_fn
from bitflow.callbacks.gap import QuantGap, gap_quantizer
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant.recipes import recipe_from_config

GAP_WINDOWS = 8  # conf/transition/default.yaml: gap_windows
GAP_LAYERS_EVERY = 10  # conf/transition/default.yaml: gap_layers_every
INTERVALS = (25, 50, 100)  # gap_every; 50 is the interval the README uses


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time a training step and the gap measurements; print and return the overhead at each interval."""
    name, fields, seq_len, batch_size = SHAPES[0]
    if quick:
        fields, seq_len, batch_size = dict(fields, n_layers=2, d_model=64, n_heads=2, d_ff=128), 64, 4
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, **fields))
    batch = torch.randint(0, VOCAB, (batch_size, seq_len + 1))
    windows = torch.randint(0, VOCAB, (GAP_WINDOWS, seq_len + 1))
    iters = 2 if quick else 10
    t_step = time_per_call(train_step_fn(model, batch, bf16=True, hf=False), warmup=1, iters=iters, repeats=2)
    recipe = recipe_from_config({"recipe": "bitlinear"})
    gap = QuantGap(gap_quantizer("recipe", recipe), recipe.plan(model), windows)

    def measure(per_layer: bool):
        def call() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                gap.measure(model, per_layer=per_layer)
        return call

    t_gap = time_per_call(measure(False), warmup=1, iters=iters, repeats=2)
    t_layers = time_per_call(measure(True), warmup=1, iters=max(1, iters // 5), repeats=1)
    per_measurement = t_gap + (t_layers - t_gap) / GAP_LAYERS_EVERY
    rows = [
        {
            "model": name if not quick else "quick",
            "gap_every": n,
            "step ms": 1e3 * t_step,
            "gap ms": 1e3 * t_gap,
            "gap + per-layer ms": 1e3 * t_layers,
            "overhead %": 100.0 * per_measurement / (n * t_step),
        }
        for n in INTERVALS
    ]
    print_table(
        f"Online quantization gap: {GAP_WINDOWS} windows of {seq_len} tokens, per-layer every "
        f"{GAP_LAYERS_EVERY}th measurement ({len(gap.layers)} layers), against training steps of batch {batch_size}",
        rows,
    )
    return rows
