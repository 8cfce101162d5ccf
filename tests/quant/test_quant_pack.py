"""Ternary packing against bytes worked out by hand."""

import pytest
import torch

from bitflow.quant import BitLinear
from bitflow.quant.pack import pack_ternary, unpack_ternary


def test_base3_by_hand():
    # codes [1, -1, 0, 1, 0] -> digits (code + 1) [2, 0, 1, 2, 1] -> 2 + 0*3 + 1*9 + 2*27 + 1*81 = 146
    # codes [-1, 1] + padding -> digits [0, 2, 1, 1, 1] -> 0 + 6 + 9 + 27 + 81 = 123
    codes = torch.tensor([[1, -1, 0, 1, 0, -1, 1]], dtype=torch.int8)
    packed = pack_ternary(codes, "base3")
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [146, 123]
    assert torch.equal(unpack_ternary(packed, codes.shape, "base3"), codes)


def test_2bit_by_hand():
    # codes [0, 1, -1, -1] -> digits [1, 2, 0, 0] -> 1 + 2*4 = 9; [1] + padding -> [2, 1, 1, 1] -> 2 + 4 + 16 + 64 = 86
    codes = torch.tensor([0, 1, -1, -1, 1], dtype=torch.int8)
    packed = pack_ternary(codes, "2bit")
    assert packed.tolist() == [9, 86]
    assert torch.equal(unpack_ternary(packed, (5,), "2bit"), codes)


def test_round_trip_of_a_layer_and_sizes():
    torch.manual_seed(0)
    codes, _ = BitLinear(30, 7).quantized_weight()
    for layout, per_byte in (("base3", 5), ("2bit", 4)):
        packed = pack_ternary(codes, layout)
        assert packed.numel() == -(-210 // per_byte)
        assert torch.equal(unpack_ternary(packed, codes.shape, layout), codes)
    assert torch.equal(unpack_ternary(pack_ternary(codes.float()), codes.shape), codes)  # float codes too


def test_invalid_input_raises():
    with pytest.raises(ValueError, match=r"codes in \{-1, 0, 1\}, got e.g. \[2\]"):
        pack_ternary(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"got e.g. \[0.5\]"):
        pack_ternary(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="layout='3bit'.*'2bit', 'base3'"):
        pack_ternary(torch.tensor([0, 1]), "3bit")
    with pytest.raises(ValueError, match=r"ceil\(6 / 5\) bytes"):
        unpack_ternary(torch.zeros(3, dtype=torch.uint8), (2, 3))
