"""Size in bits (Spectra, arXiv 2407.12327): the arithmetic, checked by hand on the tiny Llama."""

from __future__ import annotations

import math

import pytest

from bitflow.quant.size import (
    LOG2_3,
    WeightFormat,
    config_size,
    matrix_bits,
    model_size,
    ptq_formats,
    quant_formats,
)
from tests.helpers import TINY_LINEARS, TINY_MODEL, tiny_llama

# the tiny Llama (vocab 320, d 32, 2 layers, d_ff 64, tied head): 10240 embedding, per layer 4 x 32x32 attention +
# 2 x 64x32 + 32x64 MLP = 10240 linear weights and 2 x 32 norm gains, plus the final norm's 32
EMB, LINEAR, NORMS = 320 * 32, 2 * 10240, 2 * 64 + 32
TOTAL = EMB + LINEAR + NORMS


def test_matrix_bits_by_hand():
    # 3 x 10, groups of 4 columns: ceil(10 / 4) = 3 groups per row, 9 scales of 16 bits, 9 zero points of 4 bits
    assert matrix_bits(3, 10, WeightFormat(bits=4, granularity="group", group_size=4, zero_point=True)) == 120 + 144 + 36
    assert matrix_bits(3, 10, WeightFormat(bits=8, granularity="channel")) == 240 + 3 * 16
    assert matrix_bits(3, 10, WeightFormat()) == pytest.approx(30 * math.log2(3) + 16)  # ternary, one scale
    assert matrix_bits(3, 10, WeightFormat(), packed=True) == 30 * 2 + 16
    assert LOG2_3 == pytest.approx(1.5849625)


def test_sixteen_bit_model_is_sixteen_bits_per_parameter_with_the_tied_head_once():
    model = tiny_llama()
    assert sum(p.numel() for p in model.parameters()) == TOTAL == 30880
    size = model_size(model, {})
    assert size.bits == size.storage_bits == TOTAL * 16 and size.quantized_params == 0
    assert config_size(TINY_MODEL, 320, None).bits == TOTAL * 16


def test_ternary_model_by_hand():
    model = tiny_llama()
    formats = quant_formats(model, {"recipe": "bitlinear"})  # absmean per tensor, LM head excluded
    assert sorted(formats) == sorted(TINY_LINEARS) and set(formats.values()) == {WeightFormat()}
    size = model_size(model, formats)
    rest = (EMB + NORMS) * 16
    assert size.bits == pytest.approx(LINEAR * math.log2(3) + 14 * 16 + rest)
    assert size.storage_bits == LINEAR * 2 + 14 * 16 + rest == 207584
    assert (size.quantized_params, size.float_params) == (LINEAR, EMB + NORMS)
    assert config_size(TINY_MODEL, 320, {"recipe": "bitlinear"}) == size


def test_ptq_models_by_hand():
    model = tiny_llama()
    rest = (EMB + NORMS) * 16
    # 4-bit, groups of 16, asymmetric: 20480 / 16 = 1280 groups, each a 16-bit scale and a 4-bit zero point
    grouped = model_size(model, ptq_formats(model, 4, group_size=16, symmetric=False))
    assert grouped.bits == grouped.storage_bits == LINEAR * 4 + 1280 * (16 + 4) + rest == 273920
    # 8-bit per channel, symmetric: one scale per output row: per layer 4 x 32 + 2 x 64 + 32 = 288 rows
    channel = model_size(model, ptq_formats(model, 8))
    assert channel.bits == LINEAR * 8 + 2 * 288 * 16 + rest == 339456
    # a bitflow-ptq checkpoint's quant config gives the same formats
    cfg = {"recipe": "ptq", "method": "gptq", "bits": 4, "group_size": 16, "symmetric": False}
    assert quant_formats(model, cfg) == ptq_formats(model, 4, group_size=16, symmetric=False)
    # ternary < 4-bit < 8-bit < 16-bit
    assert model_size(model, quant_formats(model, {"recipe": "bitlinear"})).bits < grouped.bits < channel.bits < TOTAL * 16


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(bits=0), "bits=0 is not allowed"),
        (dict(granularity="row"), "granularity='row' is not allowed"),
        (dict(granularity="group"), "a group size is needed"),
        (dict(zero_point=True), "zero_point=True needs n-bit weights"),
    ],
)
def test_bad_formats(fields, match):
    with pytest.raises(ValueError, match=match):
        WeightFormat(**fields)
