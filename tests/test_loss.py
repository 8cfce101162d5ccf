"""The chunked LM loss (bitflow.models.loss) and the compile modes (bitflow.models.compile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bitflow.config import ConfigError, check_config
from bitflow.lm import LanguageModel
from bitflow.models.compile import check_compile, compile_model
from bitflow.models.loss import head_cross_entropy, linear_cross_entropy
from bitflow.quant import BitLinear
from tests.helpers import TINY, TINY_MODEL, compose, tiny_llama


def _reference(h, w, b, y, reduction):
    return F.cross_entropy(F.linear(h, w, b).float(), y, reduction=reduction)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    (loss * 3).backward()  # a non-unit incoming gradient: backward scales the precomputed gradients
    return loss.detach(), [t.grad / 3 for t in tensors]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_the_unchunked_loss_and_gradients(reduction, autocast):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[[3, 30]] = -100  # ignored targets count in neither the sum nor the mean
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref, ref_grads = _grads(lambda: _reference(h, w, b, y, reduction), (h, w, b))
        # 8 tokens per chunk: 5 chunks, the last one ragged
        out, grads = _grads(lambda: linear_cross_entropy(h, w, y, b, reduction, chunk_logits=8 * 50), (h, w, b))
        with torch.no_grad():  # validation: the loss alone
            no_grad = linear_cross_entropy(h, w, y, b, reduction, chunk_logits=8 * 50)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(no_grad, ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        # bf16 matmuls: errors at bf16's resolution of the largest entry (both sides round differently)
        scale = want.abs().max() if autocast else 1.0
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements any op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_cross_entropy_never_holds_the_whole_batch_of_logits():
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(100, 8, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    with _LargestOutput() as mode:
        linear_cross_entropy(h, w, y, chunk_logits=16 * 100).backward()
    assert mode.largest == 16 * 100  # one chunk's logits, never 64 x 100
    with _LargestOutput() as mode:
        F.cross_entropy(F.linear(h, w), y).backward()
    assert mode.largest == 64 * 100


def test_language_model_loss_matches_logits_cross_entropy_with_tied_embeddings():
    torch.manual_seed(0)
    lm = LanguageModel(TINY_MODEL)
    assert lm.model.lm_head.weight is lm.model.tok_emb.weight
    batch = torch.randint(0, TINY_MODEL["vocab_size"], (3, 17))
    params = list(lm.parameters())
    for autocast, tol in ((False, dict(rtol=1e-4, atol=1e-5)), (True, dict(rtol=3e-2, atol=3e-2))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, got_grads = _grads(lambda: lm.loss(batch), params)
            want, want_grads = _grads(
                lambda: F.cross_entropy(lm(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten()), params
            )
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * (b.abs().max() if autocast else 1))
    with torch.no_grad():
        total = lm.loss(batch, reduction="sum")
    torch.testing.assert_close(total, want.float() * 3 * 16, rtol=1e-5, atol=1e-4)


def test_a_quantized_head_is_called_as_a_module():
    torch.manual_seed(0)
    head = BitLinear(16, 40, bias=False)
    h, y = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
    want = F.cross_entropy(head(h).flatten(0, 1).float(), y.flatten())
    assert torch.equal(head_cross_entropy(head, h, y), want)


# --------------------------------------------------------------------------------------------------- compile modes
def test_compile_modes_and_a_bad_value_named_by_its_key():
    assert [check_compile(v) for v in (False, True, "regional")] == [False, True, "regional"]
    for bad in ("yes", 1, "full"):
        with pytest.raises(ValueError, match=r"compile=.* is not allowed; allowed: false, true, regional"):
            check_compile(bad)
    with pytest.raises(ConfigError, match=r"compile='fast' is not allowed"):
        check_config(compose([*TINY, "compile=fast"]))
    check_config(compose([*TINY, "compile=regional"]))


def test_regional_compile_compiles_each_block_in_place():
    model = tiny_llama()
    keys = set(model.state_dict())
    forward, hidden = compile_model(model, "regional")
    # the hidden states through the module call (model(x, hidden_only=True)): what FSDP2 and hooks act around
    assert forward is model and hidden.func is model and hidden.keywords == {"hidden_only": True}
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert model.lm_head._compiled_call_impl is None and model._compiled_call_impl is None
    assert set(model.state_dict()) == keys  # in place: a regional run's checkpoint has the eager keys


@pytest.mark.slow
def test_regional_compile_gives_the_eager_loss_and_gradients_with_one_compiled_block():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = LanguageModel(TINY_MODEL)
    compiled = LanguageModel(TINY_MODEL, compile="regional")
    compiled.load_state_dict(eager.state_dict())
    batch = torch.randint(0, TINY_MODEL["vocab_size"], (2, 17))
    params_e, params_c = list(eager.parameters()), list(compiled.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _grads(lambda: eager.loss(batch), params_e)
        # the second block reuses the first one's compiled code: any recompilation is an error
        with torch._dynamo.config.patch(error_on_recompile=True):
            got, got_grads = _grads(lambda: compiled.loss(batch), params_c)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max())
