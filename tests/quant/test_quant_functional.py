"""Quantizer maths against values worked out by hand from the papers' formulas (see each comment)."""

import math

import pytest
import torch

import bitflow.quant.functional as QF

W = torch.tensor([[0.5, -1.0], [0.1, 2.0]])


def test_absmean_ternary_per_tensor():
    # mean|W| = (0.5 + 1.0 + 0.1 + 2.0) / 4 = 0.9; s_w = 1 / 0.9
    # W s_w = [0.556, -1.111, 0.111, 2.222] -> round [1, -1, 0, 2] -> clamp(-1, 1) [1, -1, 0, 1]
    assert QF.absmean(W).shape == ()
    assert QF.absmean(W).item() == pytest.approx(0.9)
    codes, scale = QF.quantize_weight(W, "absmean")
    assert scale.item() == pytest.approx(1 / 0.9)
    assert torch.equal(codes, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    fq = QF.fake_quantize_weight(W, "absmean")
    torch.testing.assert_close(fq, torch.tensor([[0.9, -0.9], [0.0, 0.9]]))


def test_absmedian_is_lower_median_like_seed_authors():
    # |W| sorted = [0.1, 0.5, 1.0, 2.0]: an even count; torch.median (and the seed authors' code) takes the lower
    # middle value 0.5 (the average of the two middle values would be 0.75). s_w = 1 / 0.5 = 2
    # W s_w = [1.0, -2.0, 0.2, 4.0] -> round [1, -2, 0, 4] -> clamp [1, -1, 0, 1]
    assert QF.absmedian(W).item() == pytest.approx(0.5)
    codes, scale = QF.quantize_weight(W, "absmedian")
    assert scale.item() == pytest.approx(2.0)
    assert torch.equal(codes, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    # odd count: the median is the middle value: |[0.3, -0.05, 0.9]| sorted [0.05, 0.3, 0.9] -> 0.3
    assert QF.absmedian(torch.tensor([[0.3, -0.05, 0.9]])).item() == pytest.approx(0.3)


def test_absmedian_agrees_with_torch_median_semantics():
    # the numpy-backed median must pick the same (lower) middle element as torch.median for every granularity
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    assert torch.equal(QF.absmedian(w), w.abs().flatten().median())
    assert torch.equal(QF.absmedian(w, "channel"), w.abs().median(dim=1, keepdim=True).values)
    assert torch.equal(QF.absmedian(w, "group", group_size=4), w.abs().reshape(6, 2, 4).median(dim=-1).values)
    wt = torch.randn(8, 6).t()  # not contiguous
    assert torch.equal(QF.absmedian(wt, "channel"), wt.abs().median(dim=1, keepdim=True).values)
    assert QF.absmedian(w.bfloat16()).dtype == torch.float32


def test_absmax_stat():
    assert QF.absmax(W).item() == pytest.approx(2.0)
    torch.testing.assert_close(QF.absmax(W, "channel"), torch.tensor([[1.0], [2.0]]))


def test_per_channel_absmean():
    # row 0: mean(0.5, 1.0) = 0.75 -> s = 4/3: [0.667, -1.333] -> [1, -1]
    # row 1: mean(0.1, 2.0) = 1.05 -> s = 0.952: [0.095, 1.905] -> round [0, 2] -> clamp [0, 1]
    stat = QF.absmean(W, "channel")
    torch.testing.assert_close(stat, torch.tensor([[0.75], [1.05]]))
    codes, scale = QF.quantize_weight(W, "absmean", "channel")
    torch.testing.assert_close(scale, torch.tensor([[1 / 0.75], [1 / 1.05]]))
    assert torch.equal(codes, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    torch.testing.assert_close(
        QF.fake_quantize_weight(W, "absmean", "channel"), torch.tensor([[0.75, -0.75], [0.0, 1.05]])
    )


def test_per_group_absmean():
    w = torch.tensor([[0.1, -0.7, 3.0, 0.6], [0.4, 0.4, -0.2, -0.1]])
    # groups of 2 consecutive inputs per row:
    # (0,0) [0.1, -0.7]: mean 0.4, s 2.5 -> [0.25, -1.75] -> [0, -2] -> clamp [0, -1]
    # (0,1) [3.0, 0.6]: mean 1.8, s 0.556 -> [1.667, 0.333] -> [2, 0] -> clamp [1, 0]
    # (1,0) [0.4, 0.4]: mean 0.4, s 2.5 -> [1, 1]
    # (1,1) [-0.2, -0.1]: mean 0.15, s 6.667 -> [-1.333, -0.667] -> [-1, -1]
    stat = QF.absmean(w, "group", group_size=2)
    torch.testing.assert_close(stat, torch.tensor([[0.4, 1.8], [0.4, 0.15]]))
    codes, scale = QF.quantize_weight(w, "absmean", "group", group_size=2)
    assert scale.shape == (2, 2)
    torch.testing.assert_close(scale, torch.tensor([[2.5, 1 / 1.8], [2.5, 1 / 0.15]]))
    assert torch.equal(codes, torch.tensor([[0.0, -1.0, 1.0, 0.0], [1.0, 1.0, -1.0, -1.0]]))
    torch.testing.assert_close(
        QF.fake_quantize_weight(w, "absmean", "group", group_size=2),
        torch.tensor([[0.0, -0.4, 1.8, 0.0], [0.4, 0.4, -0.15, -0.15]]),
    )
    torch.testing.assert_close(
        QF.dequantize_weight(codes, scale, "group"),
        torch.tensor([[0.0, -0.4, 1.8, 0.0], [0.4, 0.4, -0.15, -0.15]]),
    )


def test_nbit_weights():
    w = torch.tensor([[0.5, -1.2], [0.1, 2.0]])
    # 4 bits: Qp = 7, Qn = -8. absmax 2.0 -> s = 3.5: [1.75, -4.2, 0.35, 7.0] -> [2, -4, 0, 7]
    codes, scale = QF.quantize_weight(w, "absmax", bits=4)
    assert scale.item() == pytest.approx(3.5)
    assert torch.equal(codes, torch.tensor([[2.0, -4.0], [0.0, 7.0]]))
    torch.testing.assert_close(
        QF.fake_quantize_weight(w, "absmax", bits=4), torch.tensor([[2 / 3.5, -4 / 3.5], [0.0, 2.0]])
    )
    # absmean 4 bits: mean|w| = 3.8 / 4 = 0.95, s = 7 / 0.95 = 7.368: [3.68, -8.84, 0.74, 14.74]
    # -> round [4, -9, 1, 15] -> clamp(-8, 7) [4, -8, 1, 7]
    codes, scale = QF.quantize_weight(w, "absmean", bits=4)
    assert scale.item() == pytest.approx(7 / 0.95)
    assert torch.equal(codes, torch.tensor([[4.0, -8.0], [1.0, 7.0]]))
    # 2 bits: Qp = 1, Qn = -2, absmax: s = 0.5: [0.25, -0.6, 0.05, 1.0] -> [0, -1, 0, 1]
    codes, _ = QF.quantize_weight(w, "absmax", bits=2)
    assert torch.equal(codes, torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
    assert QF.weight_qrange(None) == (-1, 1)
    assert QF.weight_qrange(8) == (-128, 127)


def test_eps_floors_the_statistic():
    codes, scale = QF.quantize_weight(torch.zeros(2, 3))
    assert scale.item() == pytest.approx(1e5)  # 1 / max(0, 1e-5)
    assert torch.equal(codes, torch.zeros(2, 3))


def test_per_token_absmax_activation():
    x = torch.tensor([[1.1, -2.0, 0.5], [0.25, 0.1, -0.6]])
    # token 0: max|x| = 2.0, s = 127 / 2 = 63.5: [69.85, -127, 31.75] -> [70, -127, 32]
    # token 1: max|x| = 0.6, s = 127 / 0.6 = 211.67: [52.92, 21.17, -127] -> [53, 21, -127]
    codes, scale = QF.quantize_activation(x)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.tensor([[63.5], [127 / 0.6]]))
    assert torch.equal(codes, torch.tensor([[70.0, -127.0, 32.0], [53.0, 21.0, -127.0]]))
    torch.testing.assert_close(
        QF.fake_quantize_activation(x),
        torch.tensor([[70 / 63.5, -2.0, 32 / 63.5], [53 * 0.6 / 127, 21 * 0.6 / 127, -0.6]]),
    )
    # 4 bits: Qp = 7, token 0: s = 3.5: [3.85, -7, 1.75] -> [4, -7, 2]
    codes4, _ = QF.quantize_activation(x[:1], bits=4)
    assert torch.equal(codes4, torch.tensor([[4.0, -7.0, 2.0]]))


def test_activation_qmax_128_clamps_to_127():
    # seed authors' convention: s = 128 / max|x| = 64: [2.0, -1.0] -> [128, -64] -> clamp(-128, 127) [127, -64]
    codes, scale = QF.quantize_activation(torch.tensor([[2.0, -1.0]]), qmax=128)
    assert scale.item() == pytest.approx(64.0)
    assert torch.equal(codes, torch.tensor([[127.0, -64.0]]))
    codes, _ = QF.quantize_activation(torch.tensor([[-2.0, 1.0]]), qmax=128)
    assert torch.equal(codes, torch.tensor([[-128.0, 64.0]]))


def test_activation_batched_shapes_and_bf16():
    x = torch.tensor([[[1.1, -2.0, 0.5]], [[0.25, 0.1, -0.6]]], dtype=torch.bfloat16)  # [2, 1, 3]
    codes, scale = QF.quantize_activation(x)
    assert codes.shape == (2, 1, 3) and scale.shape == (2, 1, 1)
    assert scale.dtype == torch.float32
    # bf16(1.1) = 1.1015625 -> 69.95 -> 70; bf16(0.25) exact, bf16(0.1) = 0.10009765625, bf16(0.6) = 0.6015625
    assert torch.equal(codes.flatten(1), torch.tensor([[70.0, -127.0, 32.0], [53.0, 21.0, -127.0]]))
    assert QF.fake_quantize_activation(x).dtype == torch.bfloat16


def test_ste_forward_value_and_identity_gradient():
    x = torch.tensor([0.3, -1.7], requires_grad=True)
    q = torch.round(x)
    y = QF.ste(x, q)
    assert torch.equal(y, torch.tensor([0.0, -2.0]))
    (y * torch.tensor([2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0, 3.0]))


def test_ste_blend_half_strength_by_hand():
    x = torch.tensor([1.1, -2.0, 0.4], requires_grad=True)
    q = torch.tensor([1.0, -2.0, 0.0])
    # x + 0.5 (q - x) = [1.05, -2.0, 0.2]
    y = QF.ste_blend(x, q, torch.tensor(0.5))
    torch.testing.assert_close(y, torch.tensor([1.05, -2.0, 0.2]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    assert torch.equal(QF.ste_blend(x, q, 0.0), x)  # exactly x at strength 0
    torch.testing.assert_close(QF.ste_blend(x, q, 1.0), q)


def test_round_nearest_ties_to_even():
    assert torch.equal(
        QF.round_nearest(torch.tensor([0.5, 1.5, -2.5, 0.51, -0.49])),
        torch.tensor([0.0, 2.0, -2.0, 1.0, -0.0]),
    )


def test_stochastic_round_unbiased_within_five_standard_errors():
    n = 200_000
    g = torch.Generator().manual_seed(0)
    for value in (0.3, -1.25, 2.9):
        x = torch.full((n,), value)
        r = QF.stochastic_round(x, generator=g)
        lo = math.floor(value)
        assert set(r.unique().tolist()) <= {float(lo), float(lo + 1)}
        p = value - lo
        se = math.sqrt(p * (1 - p) / n)  # standard error of the mean of n Bernoulli(p) draws
        assert abs(r.mean().item() - value) < 5 * se


def test_stochastic_round_reproducible_and_keeps_integers():
    x = torch.linspace(-3, 3, 1000)
    a = QF.stochastic_round(x, generator=torch.Generator().manual_seed(123))
    b = QF.stochastic_round(x, generator=torch.Generator().manual_seed(123))
    c = QF.stochastic_round(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.floor(x) <= a, torch.ones(1000, dtype=torch.bool))
    assert torch.all(a - torch.floor(x) <= 1)
    ints = torch.tensor([-2.0, 0.0, 5.0])
    assert torch.equal(QF.stochastic_round(ints, generator=torch.Generator().manual_seed(1)), ints)
    assert QF.stochastic_round(x.bfloat16()).dtype == torch.bfloat16


def test_parameter_free_norms():
    # layernorm [1, 2, 3, 4]: mean 2.5, biased var 1.25
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(QF.layer_norm(x), (x - 2.5) / math.sqrt(1.25 + 1e-5))
    # rmsnorm [3, 4]: mean square 12.5
    torch.testing.assert_close(
        QF.rms_norm(torch.tensor([3.0, 4.0])), torch.tensor([3.0, 4.0]) / math.sqrt(12.5 + 1e-5)
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: QF.weight_stat(W, "absmode"), r"weight_scale='absmode'.*'absmean', 'absmedian', 'absmax'"),
        (lambda: QF.absmean(W, "row"), r"granularity='row'.*'tensor', 'channel', 'group'"),
        (lambda: QF.absmean(W, "group"), r"group_size=None"),
        (lambda: QF.absmean(W, "group", group_size=3), r"group_size=3 does not divide in_features=2"),
        (lambda: QF.absmean(torch.ones(2, 2, 2), "channel"), r"2-D weight"),
        (lambda: QF.weight_qrange(1), r"weight_bits=1.*\[2, 8\]"),
        (lambda: QF.quantize_activation(W, bits=17), r"act_bits=17.*\[2, 16\]"),
        (lambda: QF.quantize_activation(W, qmax=0), r"act_qmax=0.*\(0, 128\]"),
        (lambda: QF.quantize_activation(W, qmax=129), r"act_qmax=129"),
    ],
)
def test_invalid_options_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
