"""GPTQ (bitflow.quant.ptq.gptq, arXiv 2210.17323) on cases with a known answer: inputs that make RTN optimal, the
direct least-squares compensation it must reproduce, a brute force over the grid, correlated inputs where it must beat
RTN by far, act-order, dead inputs, a Hessian that is singular or not positive definite, and (when gptqmodel is
installed) gptqmodel's own per-layer GPTQ on the same layer and calibration data."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from bitflow.quant.ptq.gptq import HessianAccumulator, gptq
from bitflow.quant.ptq.rtn import BITS, find_grid, grid_of, quantize_codes, rtn


def hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X W^T - X Q^T||_F^2``, the layer-output error GPTQ minimises."""
    return float(((x.double() @ (w - q).double().T) ** 2).sum())


def correlated(n: int, d: int, generator: torch.Generator, samples: int = 1) -> torch.Tensor:
    """``samples`` draws of ``n`` inputs from one distribution with strongly correlated features (a rank-16 signal
    plus unit noise): ``[samples, n, d]``, or ``[n, d]`` for one."""
    a = torch.randn(16, d, generator=generator)
    x = torch.randn(samples, n, 16, generator=generator) @ a + torch.randn(samples, n, d, generator=generator)
    return x[0] if samples == 1 else x


def test_hessian_is_two_x_transpose_x_over_n_in_float64():
    x = torch.randn(3, 5, 4)
    acc = HessianAccumulator(4)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 4).double()
    assert acc.hessian().dtype == torch.float64 and acc.rows == 15
    assert torch.allclose(acc.hessian(), 2 * flat.T @ flat / 15)
    with pytest.raises(ValueError, match="no calibration rows"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_orthogonal_inputs_make_gptq_equal_to_rtn(bits, group_size):
    # X^T X = c I: the layer's output error is a sum over columns, so rounding each weight to nearest is optimal
    # and GPTQ has no error to feed forward (U is diagonal)
    g = torch.Generator().manual_seed(bits)
    q_mat, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    x = (3.0 * q_mat).float()
    w = torch.randn(16, 32, generator=g)
    got, info = gptq(w, hessian(x), bits, group_size)
    want = rtn(w, bits, group_size)
    assert torch.equal(got.codes, want.codes) and torch.allclose(got.weight, want.weight)
    assert info.retries == 0 and not info.fallback_rtn


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_column_is_rounded_after_the_least_squares_compensation(bits):
    """GPTQ's recursion, checked against a direct solution: once columns ``:i`` are fixed to ``q``, the remaining
    weights ``v`` that minimise ``||X[:, :i] (w[:i] - q) + X[:, i:] (w[i:] - v)||^2`` solve a least-squares problem;
    GPTQ must round column ``i`` of exactly that ``v`` (per-channel grid, fixed from the original weights)."""
    g = torch.Generator().manual_seed(bits)
    n, d = 64, 6
    x = correlated(n, d, g).double()
    w = torch.randn(3, d, generator=g).double()
    got, _ = gptq(w, hessian(x), bits, percdamp=1e-12)
    scale, zero = find_grid(w, bits, symmetric=True)
    maxq = 2**bits - 1
    codes = torch.zeros(3, d, dtype=torch.float64)
    for row in range(3):
        q = []
        for i in range(d):
            done = torch.tensor(q, dtype=torch.float64)
            residual = x[:, :i] @ (w[row, :i] - done) if i else torch.zeros(n, dtype=torch.float64)
            # v = w[i:] + argmin_delta ||residual - X[:, i:] delta||
            delta = torch.linalg.lstsq(x[:, i:], residual[:, None]).solution[:, 0]
            v = w[row, i:] + delta
            c = quantize_codes(v[:1], scale[row].double(), zero[row].double(), maxq)
            codes[row, i] = c[0]
            q.append(float(scale[row] * (c[0] - zero[row])))
    assert torch.equal(got.codes.double(), codes)


def test_gptq_against_a_brute_force_over_the_grid():
    """Four weights on a 2-bit grid (256 combinations): no combination beats the exhaustive optimum, and GPTQ, a
    greedy method, lands closer to it than RTN on average (it is not optimal, and not always below RTN: a
    compensated weight beyond the grid's range is clipped)."""
    g = torch.Generator().manual_seed(0)
    to_opt, rtn_to_opt = [], []
    for _ in range(20):
        x = correlated(48, 4, g)
        w = torch.randn(1, 4, generator=g)
        got, _ = gptq(w, hessian(x), 2, percdamp=1e-9)
        scale, zero = find_grid(w, 2, symmetric=True)
        levels = [float(scale[0, 0] * (c - zero[0, 0])) for c in range(4)]
        opt = min(output_error(x, w, torch.tensor([q])) for q in itertools.product(levels, repeat=4))
        e_gptq, e_rtn = output_error(x, w, got.weight), output_error(x, w, rtn(w, 2).weight)
        assert opt <= e_gptq * (1 + 1e-9) and opt <= e_rtn * (1 + 1e-9)
        to_opt.append(e_gptq / opt)
        rtn_to_opt.append(e_rtn / opt)
    mean, mean_rtn = sum(to_opt) / len(to_opt), sum(rtn_to_opt) / len(rtn_to_opt)
    # measured: GPTQ 1.13x the optimum's error, RTN 1.29x
    assert mean < 1.2 and mean - 1 < 0.6 * (mean_rtn - 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 16])
def test_on_correlated_inputs_gptq_error_is_far_below_rtn(bits, group_size):
    g = torch.Generator().manual_seed(10 + bits)
    calib, held_out = correlated(2048, 64, g, samples=2)
    w = torch.randn(32, 64, generator=g)
    got, _ = gptq(w, hessian(calib), bits, group_size, symmetric=group_size is None)
    want = rtn(w, bits, group_size, symmetric=group_size is None)
    ratio = output_error(held_out, w, got.weight) / output_error(held_out, w, want.weight)
    # measured 0.22-0.31 here (papers.md: about 0.4x on LLM activations); i.i.d. inputs give 1.0
    assert ratio < 0.45


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_static_groups(bits):
    g = torch.Generator().manual_seed(bits)
    d = 64
    scales_of_features = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # very unequal activity
    calib, held_out = correlated(2048, d, g, samples=2) * scales_of_features
    w = torch.randn(32, d, generator=g)
    h = hessian(calib)
    plain, _ = gptq(w, h, bits, 16)
    ordered, _ = gptq(w, h, bits, 16, act_order=True)
    assert output_error(held_out, w, ordered.weight) < output_error(held_out, w, plain.weight)
    # static groups: every group's grid is the one of the original weights, in the original column layout
    static = grid_of(w, bits, 16)
    assert torch.equal(ordered.grid.scales, static.scales) and torch.equal(ordered.grid.zeros, static.zeros)
    s, z = static.columns(0, d)
    assert torch.equal(ordered.weight, s * (ordered.codes.float() - z))


def test_lazy_block_size_does_not_change_a_per_channel_result():
    g = torch.Generator().manual_seed(1)
    x = correlated(512, 96, g)
    w = torch.randn(8, 96, generator=g)
    h = hessian(x)
    a, _ = gptq(w, h, 4, block_size=128)
    b, _ = gptq(w, h, 4, block_size=7)
    assert (a.codes.int() - b.codes.int()).abs().max() <= 1  # float rounding may flip a tie
    assert (a.codes != b.codes).float().mean() < 0.01


def test_dead_inputs_get_zero_weights():
    g = torch.Generator().manual_seed(2)
    x = correlated(256, 16, g)
    x[:, [3, 7]] = 0.0
    w = torch.randn(4, 16, generator=g)
    got, info = gptq(w, hessian(x), 4)
    assert info.dead == 2 and torch.equal(got.weight[:, [3, 7]], torch.zeros(4, 2))


def test_a_singular_hessian_is_dampened_and_never_nan(caplog):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 32, generator=g)
    # 4 rows for 32 inputs: rank 4; the default dampening makes it positive definite
    got, info = gptq(w, hessian(torch.randn(4, 32, generator=g)), 4)
    assert bool(torch.isfinite(got.weight).all()) and info.retries == 0
    # not positive definite even after 1% dampening: retried with 10x the dampening, and logged
    h = torch.eye(32, dtype=torch.float64)
    h[0, 0] = -0.05  # mean diagonal ~0.97: +0.0097 leaves it negative, +0.097 does not
    with caplog.at_level(logging.WARNING, logger="bitflow.ptq"):
        got, info = gptq(w, h, 4, name="layers.0.mlp.w1")
    assert info.retries == 1 and info.percdamp == pytest.approx(0.1) and not info.fallback_rtn
    assert "layers.0.mlp.w1" in caplog.text and "not positive definite" in caplog.text
    assert bool(torch.isfinite(got.weight).all())
    # hopeless (negative definite): round-to-nearest after the retries, still no NaN
    got, info = gptq(w, -torch.eye(32, dtype=torch.float64), 4)
    assert info.fallback_rtn and torch.equal(got.codes, rtn(w, 4).codes)
    with pytest.raises(ValueError, match="NaN"):
        gptq(w, torch.full((32, 32), float("nan"), dtype=torch.float64), 4)


CROSS_CHECK = [  # (bits, group_size, symmetric, act_order)
    (4, None, True, False), (3, 32, False, False), (2, 32, True, False), (8, None, False, False),
    (4, None, True, True), (4, 32, True, True),
]


@pytest.mark.slow  # importing gptqmodel takes ~20 s
@pytest.mark.parametrize(("bits", "group_size", "symmetric", "act_order"), CROSS_CHECK)
def test_matches_gptqmodel_per_layer_gptq(bits, group_size, symmetric, act_order):
    """bitflow's GPTQ against gptqmodel's per-layer GPTQ (``GPTQ.add_batch`` + ``hf_quantize``) on the same layer and
    calibration data: held-out layer-output error within 2% (measured: identical weights)."""
    pytest.importorskip("gptqmodel", reason="gptqmodel not installed (pip install gptqmodel==7.6.0)")
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    g = torch.Generator().manual_seed(0)
    d = 128
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    calib, held_out = torch.randn(4096, d, generator=g) @ mix, torch.randn(4096, d, generator=g) @ mix
    layer = nn.Linear(d, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, d, generator=g))
    w = layer.weight.detach().clone()
    cfg = QuantizeConfig(bits=bits, group_size=group_size or -1, sym=symmetric, desc_act=act_order,
                         act_group_aware=False)
    theirs = GPTQ(layer, cfg)
    theirs.quantizer.configure(perchannel=True)
    theirs.add_batch(calib.unsqueeze(0), None)
    theirs.hf_quantize(blocksize=128, percdamp=0.01, group_size=group_size or -1, actorder=act_order,
                       static_groups=act_order and group_size is not None, act_group_aware=False)
    ours, _ = gptq(w, hessian(calib), bits, group_size, symmetric, act_order)
    e_ours, e_theirs = output_error(held_out, w, ours.weight), output_error(held_out, w, layer.weight.detach())
    assert abs(e_ours - e_theirs) <= 0.02 * e_theirs
