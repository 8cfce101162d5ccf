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


# ----------------------------------------------------------------------------- what the compiled quantizers become
def _aot_graphs(fn, *args) -> list[torch.fx.GraphModule]:
    """The forward and backward ATen graphs AOTAutograd traces for ``fn(*args).backward()`` (fullgraph)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(*args).backward()
    return graphs


@pytest.mark.parametrize("weight_scale", ["absmean", "absmedian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizers_neither_sync_nor_sort(weight_scale, dtype):
    # fullgraph: no graph break; in the traced graphs no op reads a value back to the host (.item(), bool(t)) and the
    # median is a selection (numpy's introselect for float32 CPU weights, torch.kthvalue otherwise), never a sort
    layer = BitLinear(32, 16, weight_scale=weight_scale, input_norm="rmsnorm").to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    graphs = _aot_graphs(fn, x)
    assert len(graphs) == 2  # one forward, one backward
    ops = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert not {op for op in ops if "_local_scalar_dense" in op or op.startswith("aten.item")}, ops
    sorting = ("sort", "argsort", "msort", "median", "nanmedian", "quantile", "topk")
    assert not {op for op in ops if op.startswith("aten.") and op.split(".")[1] in sorting}, ops
    if weight_scale == "absmedian":
        selection = "bitflow.lower_median" if dtype == torch.float32 else "aten.kthvalue"
        assert any(selection in op for op in ops), ops


@pytest.mark.slow
@pytest.mark.parametrize("weight_scale", ["absmean", "absmedian"])
def test_inductor_fuses_each_quantizer_into_one_pass_per_read(weight_scale):
    # The bound: the forward reads W twice (its statistic, then quantize-dequantize into bf16) and x twice (per-token
    # max|x|, then quantize-dequantize into bf16): Inductor's CPU backend emits these as loop nests of ONE fused C++
    # kernel (absmedian: the abs before the opaque median selection is a second kernel), at most 5 loop nests with
    # the scale reductions; the matmuls are extern (mkldnn/BLAS) calls. The straight-through backward only casts
    # the two incoming gradients: 2 loop nests in one kernel.
    import torch._inductor.metrics as metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    layer = BitLinear(64, 32, bias=False, weight_scale=weight_scale)
    x = torch.randn(4, 8, 64, requires_grad=True)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    metrics.reset()
    y, (forward_code,) = run_and_get_code(torch.compile(fn, fullgraph=True), x)
    forward_loops = metrics.generated_kernel_count
    metrics.reset()
    _, (backward_code,) = run_and_get_code(lambda: y.backward(torch.ones_like(y)))
    kernels = [code.count("async_compile.cpp_pybinding(") for code in (forward_code, backward_code)]
    assert kernels == [1 if weight_scale == "absmean" else 2, 1]
    assert forward_loops <= 5 and metrics.generated_kernel_count <= 2
    assert forward_code.count("extern_kernels.mm(") == 1 and backward_code.count("extern_kernels.mm(") == 2
