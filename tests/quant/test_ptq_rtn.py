"""The n-bit PTQ grid and round-to-nearest (bitflow.quant.ptq.rtn) against values computed by hand from the formulas:
asymmetric ``scale = (max(W,0) - min(W,0)) / (2^b - 1)``, ``zero = round(-min / scale)``; symmetric
``scale = 2 max|W| / (2^b - 1)``, ``zero = 2^(b-1)``; ``code = clamp(round(W / scale) + zero, 0, 2^b - 1)``."""

from __future__ import annotations

import pytest
import torch

from bitflow.quant.ptq.rtn import BITS, check_grid, dequantize, grid_of, rtn


def test_asymmetric_per_channel_by_hand():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.25, 0.5, 0.75, 1.5]])
    q = rtn(w, bits=2, symmetric=False)
    # row 0: min -1, max 2 -> scale 3/3 = 1, zero round(1) = 1; codes round(w) + 1 = [0, 1, 2 (0.5 -> 0, ties to even), 3]
    # row 1: min 0 (0 is always on the grid), max 1.5 -> scale 0.5, zero 0; codes round(w / 0.5) = [0, 1, 2, 3]
    assert q.grid.scales.tolist() == [[1.0], [0.5]] and q.grid.zeros.tolist() == [[1.0], [0.0]]
    assert q.codes.tolist() == [[0, 1, 1, 3], [0, 1, 2, 3]]
    assert q.weight.tolist() == [[-1.0, 0.0, 0.0, 2.0], [0.0, 0.5, 1.0, 1.5]]
    assert q.codes.dtype == torch.uint8


def test_symmetric_per_channel_by_hand():
    w = torch.tensor([[-1.5, -0.2, 0.4, 1.5]])
    q = rtn(w, bits=2, symmetric=True)
    # max|W| 1.5 -> scale 2 * 1.5 / 3 = 1, zero 2; codes clamp(round(w) + 2, 0, 3) = [0 (-1.5 -> -2), 2, 2, 3 (clamped)]
    assert q.grid.scales.tolist() == [[1.0]] and q.grid.zeros.tolist() == [[2.0]]
    assert q.codes.tolist() == [[0, 2, 2, 3]]
    assert q.weight.tolist() == [[-2.0, 0.0, 0.0, 1.0]]  # 2^b levels: one more below zero than above
    q4 = rtn(torch.tensor([[-7.5, 3.0, 7.5]]), bits=4, symmetric=True)
    # scale 2 * 7.5 / 15 = 1, zero 8: codes [0 (-7.5 -> -8, ties to even), 11, 15 (7.5 -> 8 -> clamped to 15)]
    assert q4.codes.tolist() == [[0, 11, 15]] and q4.weight.tolist() == [[-8.0, 3.0, 7.0]]


def test_groups_have_their_own_grid():
    w = torch.tensor([[3.5, -1.2, 7.0, -7.0]])
    q = rtn(w, bits=3, group_size=2, symmetric=True)
    # group 0: scale 2 * 3.5 / 7 = 1 ; group 1: scale 2 * 7 / 7 = 2 ; zero 4 for both
    assert q.grid.scales.tolist() == [[1.0, 2.0]] and q.grid.zeros.tolist() == [[4.0, 4.0]]
    # 3.5 -> 4 (ties to even) + 4 = 8 -> clamped to 7; -1.2 -> -1 + 4 = 3; 7 / 2 -> 7 (clamped); -7 / 2 -> -4 + 4 = 0
    assert q.codes.tolist() == [[7, 3, 7, 0]]
    assert q.weight.tolist() == [[3.0, -1.0, 6.0, -8.0]]
    assert torch.equal(dequantize(q.codes, q.grid), q.weight)


def test_an_all_zero_row_dequantizes_to_zero():
    w = torch.zeros(2, 4)
    for symmetric in (True, False):
        q = rtn(w, bits=4, symmetric=symmetric)
        assert torch.equal(q.weight, w) and bool((q.grid.scales > 0).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(8, 32)
    q = rtn(w, bits, group_size=8, symmetric=symmetric)
    scale, _ = q.grid.columns(0, 32)
    err = (w - q.weight).abs()
    inside = q.codes.float().gt(0) & q.codes.float().lt(2**bits - 1)
    assert bool((err[inside] <= scale.expand_as(w)[inside] / 2 + 1e-6).all())
    assert int(q.codes.max()) <= 2**bits - 1
    assert grid_of(w, bits, 8, symmetric).scales.shape == (8, 4)


def test_bad_grid_options_name_the_key():
    with pytest.raises(ValueError, match=r"bits=5 is not allowed; allowed: 2, 3, 4, 6, 8"):
        check_grid(5, None)
    with pytest.raises(ValueError, match=r"group_size=0 is not allowed"):
        check_grid(4, 0)
    with pytest.raises(ValueError, match=r"group_size=24 is not allowed: it does not divide .* in_features=64"):
        check_grid(4, 24, 64)
