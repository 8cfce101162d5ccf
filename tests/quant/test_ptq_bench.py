"""The PTQ benchmark builds the presets it names (no timing is asserted)."""

from __future__ import annotations

from bitflow.bench.__main__ import BENCHES
from bitflow.bench.ptq import preset


def test_the_benchmark_uses_the_real_presets_and_is_listed():
    spectra = preset("spectra_99m")
    assert (spectra.d_model, spectra.d_ff, spectra.n_layers, spectra.n_heads) == (512, 1280, 16, 8)
    assert preset("tiny").d_model == 192
    assert "ptq" in BENCHES
