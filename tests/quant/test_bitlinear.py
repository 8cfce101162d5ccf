"""BitLinear against hand-computed outputs, the STE gradients, nn.Linear equivalence at strength 0."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitflow.quant.bitlinear as BL
import bitflow.quant.functional as QF
from bitflow.quant import BitLinear, get_strength, set_strength


def _layer(weight, bias=None, **options) -> BitLinear:
    weight = torch.tensor(weight)
    layer = BitLinear(weight.shape[1], weight.shape[0], bias=bias is not None, **options)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


X = [[1.1, -2.0, 0.5], [0.25, 0.1, -0.6]]
WT = [[0.4, -0.8, 0.1], [1.2, 0.0, -0.3]]


def test_full_output_by_hand_2x3():
    # W: mean|W| = 2.8 / 6 -> s_w = 15 / 7; W s_w = [0.86, -1.71, 0.21, 2.57, 0, -0.64]
    #    -> round [1, -2, 0, 3, 0, -1] -> clamp W_q = [[1, -1, 0], [1, 0, -1]]
    # x: token 0 max 2.0, s_x = 63.5: x_q = [70, -127, 32]; token 1 max 0.6, s_x = 635 / 3: x_q = [53, 21, -127]
    # x_q W_q^T = [[70 + 127, 70 - 32], [53 - 21, 53 + 127]] = [[197, 38], [32, 180]]
    # y = (x_q W_q^T) / (s_w s_x) + b
    layer = _layer(WT, bias=[0.1, -0.2])
    y = layer(torch.tensor(X))
    sw, sx0, sx1 = 15 / 7, 127 / 2, 635 / 3
    expected = torch.tensor(
        [
            [197 / (sw * sx0) + 0.1, 38 / (sw * sx0) - 0.2],
            [32 / (sw * sx1) + 0.1, 180 / (sw * sx1) - 0.2],
        ]
    )
    torch.testing.assert_close(y, expected)
    codes, scale = layer.quantized_weight()
    assert codes.dtype == torch.int8
    assert torch.equal(codes, torch.tensor([[1, -1, 0], [1, 0, -1]], dtype=torch.int8))
    assert scale.item() == pytest.approx(15 / 7)


def test_quantized_weight_takes_three_values_times_scale():
    torch.manual_seed(0)
    layer = BitLinear(32, 16, bias=False, act_bits=None)
    codes, scale = layer.quantized_weight()
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(1 / scale, layer.weight.abs().mean())
    # the weight the forward pass uses, read out exactly through the identity: I @ W_b^T = W_b^T
    w_used = layer(torch.eye(32)).T
    values = w_used.unique()
    assert values.numel() == 3
    torch.testing.assert_close(values, torch.tensor([-1.0, 0.0, 1.0]) / scale)
    torch.testing.assert_close(w_used, codes.float() / scale)


def test_ste_gradients_equal_dense_product_of_quantized_operands():
    torch.manual_seed(0)
    layer = BitLinear(12, 6, weight_scale="absmedian")
    x = torch.randn(3, 4, 12, requires_grad=True)
    g = torch.randn(3, 4, 6)
    (layer(x) * g).sum().backward()

    xq = QF.fake_quantize_activation(x.detach()).requires_grad_()
    wq = QF.fake_quantize_weight(layer.weight.detach(), "absmedian").requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    y_ref = F.linear(xq, wq, b)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(x.grad, xq.grad)
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


def _pair(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=bias, dtype=dtype)
    bit = BitLinear(16, 8, bias=bias, dtype=dtype)
    bit.load_state_dict(lin.state_dict())
    set_strength(bit, weight=0.0, act=0.0)
    return lin, bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_zero_is_exactly_nn_linear(dtype):
    lin, bit = _pair(dtype)
    x1 = torch.randn(4, 5, 16, dtype=dtype, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = lin(x1), bit(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(lin.weight.grad, bit.weight.grad)
    assert torch.equal(lin.bias.grad, bit.bias.grad)


def test_strength_zero_is_exactly_nn_linear_under_bf16_autocast():
    lin, bit = _pair()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = lin(x), bit(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    assert torch.equal(y1, y2)


def test_half_strength_by_hand():
    # W = [[0.6, -1.4]]: mean|W| = 1.0 -> s_w = 1, W_q = [1, -1]; lambda_w = 0.5: W_b = W + 0.5 (W_q - W) = [0.8, -1.2]
    # x = [[1.1, -2.0]]: s_x = 63.5, x_q / s_x = [70 / 63.5, -2.0]; lambda_a = 0.5:
    # x_b = [1.1 + 0.5 (70 / 63.5 - 1.1), -2.0]; y = x_b W_b^T
    layer = _layer([[0.6, -1.4]])
    set_strength(layer, weight=0.5, act=0.5)
    x = torch.tensor([[1.1, -2.0]], requires_grad=True)
    y = layer(x)
    xb0 = 1.1 + 0.5 * (70 / 63.5 - 1.1)
    torch.testing.assert_close(y, torch.tensor([[0.8 * xb0 + 1.2 * 2.0]]))
    y.sum().backward()
    # STE: dy/dx = W_b, dy/dW = x_b
    torch.testing.assert_close(x.grad, torch.tensor([[0.8, -1.2]]))
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[xb0, -2.0]]))
    # weights only (activations in full precision): y = 0.8 * 1.1 + 1.2 * 2.0
    set_strength(layer, act=0.0)
    torch.testing.assert_close(layer(x), torch.tensor([[0.8 * 1.1 + 2.4]]))


def test_act_bits_none_and_qmax():
    layer = _layer(WT, act_bits=None)
    x = torch.tensor(X)
    torch.testing.assert_close(layer(x), x @ (torch.tensor([[1.0, -1, 0], [1, 0, -1]]) * 2.8 / 6).T)
    # act_qmax 128, 4-bit weights with absmax: just check it runs the formula through the functional quantizers
    layer = _layer(WT, act_qmax=128, weight_bits=4, weight_scale="absmax")
    ref = F.linear(
        QF.fake_quantize_activation(x, qmax=128), QF.fake_quantize_weight(layer.weight, "absmax", bits=4)
    )
    torch.testing.assert_close(layer(x), ref)


def test_input_norm_options():
    x = torch.tensor(X)
    for norm, fn in (("layernorm", QF.layer_norm), ("rmsnorm", QF.rms_norm)):
        layer = _layer(WT, input_norm=norm)
        torch.testing.assert_close(
            layer(x), F.linear(QF.fake_quantize_activation(fn(x)), QF.fake_quantize_weight(layer.weight))
        )
        set_strength(layer, weight=0.0, act=0.0)  # the norm stays at strength 0
        torch.testing.assert_close(layer(x), F.linear(fn(x), layer.weight))


def test_channel_and_group_granularity_in_layer():
    x = torch.tensor(X)
    w = torch.tensor([[0.1, -0.7, 3.0, 0.6], [0.4, 0.4, -0.2, -0.1]])
    layer = BitLinear(4, 2, bias=False, granularity="group", group_size=2, act_bits=None)
    with torch.no_grad():
        layer.weight.copy_(w)
    xx = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # fake-quant weight from the hand-worked group example: [[0, -0.4, 1.8, 0], [0.4, 0.4, -0.15, -0.15]]
    torch.testing.assert_close(layer(xx), torch.tensor([[-0.8 + 5.4, 0.4 + 0.8 - 0.45 - 0.6]]))
    layer = _layer(WT, granularity="channel", act_bits=None)
    # row 0: mean 1.3 / 3, s = 3 / 1.3: [0.92, -1.85, 0.23] -> [1, -1, 0]; row 1: mean 0.5, s 2: [2.4, 0, -0.6] -> [1, 0, -1]
    w_eff = torch.tensor([[1.3 / 3, -1.3 / 3, 0.0], [0.5, 0.0, -0.5]])
    torch.testing.assert_close(layer(x), x @ w_eff.T)


def test_state_dict_matches_nn_linear_and_16bit_state_dict_loads():
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    bit = BitLinear(16, 8)
    assert list(bit.state_dict().keys()) == list(nn.Linear(16, 8).state_dict().keys()) == ["weight", "bias"]
    bit.load_state_dict(lin.state_dict())  # strict: no missing/unexpected keys
    assert bit.weight.dtype == torch.float32
    assert torch.equal(bit.weight, lin.weight.float())
    assert list(BitLinear(4, 2, bias=False).state_dict().keys()) == ["weight"]
    assert {name for name, _ in bit.named_buffers()} == {"weight_strength", "act_strength"}


def test_strength_buffers_default_set_get_and_dtype():
    layer = BitLinear(4, 2)
    assert layer.weight_strength.dtype == torch.float32 and layer.weight_strength.dim() == 0
    assert get_strength(layer) == {"weight": 1.0, "act": 1.0}
    model = nn.Sequential(BitLinear(4, 4), nn.ReLU(), BitLinear(4, 2))
    assert set_strength(model, weight=0.25) == 2
    assert get_strength(model) == {"weight": 0.25, "act": 1.0}
    set_strength(model, act=0.5)
    assert get_strength(model) == {"weight": 0.25, "act": 0.5}
    model.to(torch.bfloat16)  # weights go to bf16, strengths stay float32 and keep their value
    assert model[0].weight.dtype == torch.bfloat16
    assert model[0].weight_strength.dtype == torch.float32
    model[0].weight_strength.fill_(0.3)
    assert get_strength(model[0])["weight"] == pytest.approx(0.3, abs=1e-7)
    with pytest.raises(ValueError, match="different strengths"):
        get_strength(model)
    with pytest.raises(ValueError, match=r"weight strength 1.5 .*\[0, 1\]"):
        set_strength(model, weight=1.5)
    with pytest.raises(ValueError, match=r"act strength -0.1"):
        set_strength(model, act=-0.1)
    with pytest.raises(ValueError, match="no BitLinear"):
        set_strength(nn.Linear(2, 2), weight=1.0)


def test_from_linear_reuses_parameters():
    lin = nn.Linear(8, 4)
    bit = BitLinear.from_linear(lin, weight_scale="absmedian", act_bits=None)
    assert bit.weight is lin.weight and bit.bias is lin.bias
    assert bit.weight_scale == "absmedian" and bit.act_bits is None
    assert get_strength(bit) == {"weight": 1.0, "act": 1.0}
    nobias = BitLinear.from_linear(nn.Linear(8, 4, bias=False))
    assert nobias.bias is None and list(nobias.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="nn.Linear"):
        BitLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="unknown BitLinear option"):
        BitLinear.from_linear(lin, weight_sclae="absmean")
    assert "weight_scale='absmedian'" in repr(bit) and "act_bits=None" in repr(bit)


def test_bf16_autocast_forward_backward_finite():
    torch.manual_seed(0)
    model = nn.Sequential(
        BitLinear(32, 64, input_norm="rmsnorm"), nn.GELU(), BitLinear(64, 8, weight_scale="absmedian")
    )
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    # close to the float32 computation
    with torch.no_grad():
        torch.testing.assert_close(model(x).to(torch.bfloat16), y, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"weight_scale": "mean"}, r"weight_scale='mean'.*'absmean', 'absmedian', 'absmax'"),
        ({"granularity": "row"}, r"granularity='row'.*'tensor', 'channel', 'group'"),
        ({"granularity": "group"}, r"group_size=None"),
        ({"granularity": "group", "group_size": 5}, r"group_size=5 does not divide in_features=8"),
        ({"group_size": 4}, r"group_size=4 is only used with granularity='group'"),
        ({"weight_bits": 1}, r"weight_bits=1.*None or an int in \[2, 8\]"),
        ({"weight_bits": 16}, r"weight_bits=16"),
        ({"act_bits": 1}, r"act_bits=1.*\[2, 16\]"),
        ({"act_bits": 8.0}, r"act_bits=8.0"),
        ({"act_qmax": 200}, r"act_qmax=200.*\(0, 128\]"),
        ({"act_bits": None, "act_qmax": 127}, r"act_qmax=127 needs activation quantization"),
        ({"input_norm": "batchnorm"}, r"input_norm='batchnorm'.*None, 'layernorm', 'rmsnorm'"),
        ({"eps": 0.0}, r"eps=0.0"),
    ],
)
def test_invalid_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        BitLinear(8, 4, **options)


class _Shared(nn.Module):
    """Three projections of one input (like wq/wk/wv), then one of another tensor."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (BitLinear(16, 16) for _ in range(3))
        self.o = BitLinear(16, 4, weight_scale="absmedian")

    def forward(self, x):
        return self.o(self.q(x) * torch.sigmoid(self.k(x)) + self.v(x))


def _count_quantizations(monkeypatch):
    calls = []
    original = BL._ActFakeQuantSTE.apply

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(BL._ActFakeQuantSTE, "apply", counting)
    return calls


def test_shared_input_is_quantized_once_with_identical_results(monkeypatch):
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(2, 3, 16, requires_grad=True)
    # reference: every projection gets its own copy of the input, so nothing can be shared
    xs = [x.detach().clone().requires_grad_() for _ in range(3)]
    ref = model.o(model.q(xs[0]) * torch.sigmoid(model.k(xs[1])) + model.v(xs[2]))
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    calls = _count_quantizations(monkeypatch)
    y = model(x)
    assert len(calls) == 2  # q/k/v share one quantization of x, o quantizes its own input
    assert torch.equal(y, ref)
    y.sum().backward()
    assert BL._last_input.result is None  # backward released the memo
    torch.testing.assert_close(x.grad, xs[0].grad + xs[1].grad + xs[2].grad)
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():
        calls.clear()
        assert torch.equal(model(x), ref)
        assert len(calls) == 2


def test_memo_is_not_reused_after_changes(monkeypatch):
    torch.manual_seed(0)
    a, b = BitLinear(8, 4), BitLinear(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    calls = _count_quantizations(monkeypatch)
    with torch.no_grad():
        a(x)
        x.mul_(2.0)  # in place: new version counter
        yb = b(x)
        assert len(calls) == 2
        set_strength(b, act=0.5)
        b(x)
        assert len(calls) == 3  # another strength: recomputed
        BitLinear(8, 4, act_bits=4)(x)
        assert len(calls) == 4  # other options: recomputed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a(x)
        assert len(calls) == 5  # another output dtype: recomputed
        with torch.inference_mode():
            a(x), a(x)
        assert len(calls) == 7  # inference tensors have no version counter: never memoized
        assert torch.equal(yb, a(x.clone()))  # b at full strength gave a fresh result for the changed x
