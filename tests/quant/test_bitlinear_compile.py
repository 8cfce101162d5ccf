"""BitLinear under torch.compile(fullgraph=True): no graph breaks, eager numerics, no recompiles on strength."""

import pytest
import torch
import torch._dynamo

from bitflow.quant import BitLinear, set_strength


def _check_compiled_matches_eager(backend: str, autocast: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BitLinear(16, 8, weight_scale="absmedian", input_norm="rmsnorm")
    x = torch.randn(3, 16, requires_grad=True)
    g = torch.randn(3, 8)

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return (layer(x).float() * g).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    with torch._dynamo.config.patch(error_on_recompile=True):
        for strength in (1.0, 0.5, 0.0):  # strengths are buffers filled in place: no recompilation
            set_strength(layer, weight=strength, act=strength)
            x.grad, layer.weight.grad, layer.bias.grad = None, None, None
            loss = compiled(x)
            loss.backward()
            grads = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
            x.grad, layer.weight.grad, layer.bias.grad = None, None, None
            ref = loss_fn(x)
            ref.backward()
            tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {}
            torch.testing.assert_close(loss, ref, **tol)
            for a, b in zip(grads, (x.grad, layer.weight.grad, layer.bias.grad), strict=True):
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("autocast", [False, True])
def test_fullgraph_forward_backward_aot_eager(autocast):
    _check_compiled_matches_eager("aot_eager", autocast)


def test_no_graph_breaks_explain():
    torch._dynamo.reset()
    layer = BitLinear(8, 4, granularity="group", group_size=4)
    explanation = torch._dynamo.explain(lambda x: layer(x).sum())(torch.randn(2, 8))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_fullgraph_forward_backward_inductor():
    _check_compiled_matches_eager("inductor", autocast=True)


def test_compiled_strength_zero_is_exactly_nn_linear():
    # under torch.compile the blend is a tensor lerp (no CPU shortcut): still exact at strength 0
    torch._dynamo.reset()
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = BitLinear.from_linear(linear)
    set_strength(layer, weight=0.0, act=0.0)
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), linear(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(x), linear(x))


def test_compiled_model_with_shared_inputs_matches_eager():
    # several BitLinear layers reading one tensor (the eager path memoizes its quantization; compiled code must not
    # touch the memo: a traced side effect on it failed dynamo's guards)
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k, v, o = BitLinear(8, 8), BitLinear(8, 8), BitLinear(8, 8), BitLinear(8, 2)
    params = [p for m in (q, k, v, o) for p in m.parameters()]

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.nn.functional.rms_norm(x, (8,))
            return o(q(h) * torch.sigmoid(k(h)) + v(h)).float().square().sum()

    x = torch.randn(2, 3, 8)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (
        compiled,
        compiled,
        loss_fn,
        loss_fn,
        compiled,
    ):  # eager runs in between change the memo's state
        for p in params:
            p.grad = None
        fn(x).backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    for i, j in ((0, 1), (2, 3), (0, 4)):
        for a, b in zip(grads[i], grads[j], strict=True):
            assert torch.equal(a, b)
