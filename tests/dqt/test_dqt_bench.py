"""The DQT memory benchmark's accounting: the byte ratios follow from the storage formats."""

from __future__ import annotations

import pytest
import torch

from bitflow.bench.dqt import STE, memory_rows
from bitflow.models.llama import LlamaConfig


def test_memory_accounting_matches_the_storage_formats():
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    rows = {r["mode"]: r for r in memory_rows(cfg, torch.randint(0, 64, (2, 9)))}
    targeted = 2 * (4 * 32 * 32 + 3 * 32 * 64)  # weights of the converted Linear layers
    mb = 2**20
    ste = rows[STE]
    assert ste["weights MB"] * mb == 4 * targeted and ste["opt state MB"] * mb == 2 * 4 * targeted + 14 * 4
    for mode, row in rows.items():
        if mode.startswith("DQT"):
            # int8 codes (+ a 4-byte scale per layer); AdamW moments: 2 x 4 bytes (fp32) or 2 x 2 bytes (bf16)
            per_moment = 4 if "fp32" in mode else 2
            assert row["weights MB"] * mb == targeted + 14 * 4
            assert row["opt state MB"] * mb == 2 * per_moment * targeted + 14 * 4  # + a step counter per layer
            assert row["weights / STE"] == pytest.approx(0.25, abs=1e-3)
            assert row["targeted / STE"] == pytest.approx(0.75 if per_moment == 4 else 5 / 12, abs=1e-3)
