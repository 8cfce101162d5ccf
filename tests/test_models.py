import pytest
import torch

from bitflow.models.llama import Llama, LlamaConfig, apply_rope, rope_tables


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16, **kw})


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = Llama(tiny())
    idx = torch.randint(0, 50, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 50)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    out = model(changed)
    # positions before the change see the same prefix: same logits; later ones differ
    torch.testing.assert_close(out[:, :6], logits[:, :6])
    assert not torch.allclose(out[:, 6:], logits[:, 6:])


def test_tied_embeddings_share_one_parameter():
    tied, untied = Llama(tiny()), Llama(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 50 * 32
    assert tied.num_parameters(non_embedding=True) == untied.num_parameters(non_embedding=True)


def test_grouped_query_attention_shapes():
    cfg = tiny(n_kv_heads=2)
    model = Llama(cfg)
    assert model.layers[0].attn.wk.weight.shape == (2 * 8, 32)
    assert model.layers[0].attn.wq.weight.shape == (32, 32)
    assert model(torch.randint(0, 50, (1, 5))).shape == (1, 5, 50)


def test_default_ffn_width_and_all_linears_named():
    cfg = tiny()
    assert cfg.d_ff == 128  # 8/3 * 32 = 85.3 -> next multiple of 64
    names = {n for n, m in Llama(cfg).named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {f"layers.{i}.attn.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo")}
    expected |= {f"layers.{i}.mlp.{w}" for i in range(2) for w in ("w1", "w2", "w3")}
    assert names == expected | {"lm_head"}


def test_rope_rotates_pairs_by_position_angle():
    # head dim 4: frequencies theta^(0/4)=1 and theta^(-2/4)=1/100 for theta=1e4
    cos, sin = rope_tables(4, 3, 10000.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    y = apply_rope(x, cos, sin)[0, 0]
    # pair (x0, x2) rotated by angle p * 1 at position p: (cos p, 0, sin p, 0)
    for p in range(3):
        torch.testing.assert_close(y[p], torch.tensor([torch.cos(torch.tensor(p * 1.0)), 0.0,
                                                       torch.sin(torch.tensor(p * 1.0)), 0.0]))
    # rotation preserves the norm
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3))


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = Llama(tiny(d_model=256, n_heads=4, n_layers=8, init_std=0.02))
    assert abs(model.layers[0].mlp.w1.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.w2.weight.std().item() - 0.02 / 4) < 0.0005


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_model": 30}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads=3"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": -1}, "n_layers"),
    ],
)
def test_bad_config_is_rejected_with_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_longer_sequence_than_context_raises():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        Llama(tiny())(torch.zeros(1, 17, dtype=torch.long))


def _qkv(dtype, b=2, h=3, t=17, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def test_matmul_attention_is_the_causal_attention_formula():
    """softmax(q k^T / sqrt(d) + causal -inf) v, written out by hand, and torch's SDPA: the same outputs and
    gradients in float32."""
    import math

    import torch.nn.functional as F

    from bitflow.models.llama import causal_attention

    q, k, v = _qkv(torch.float32)
    t = q.shape[2]
    y = causal_attention(q, k, v, "matmul")
    by_hand = torch.empty_like(y)
    for i in range(t):  # query i sees keys 0..i
        w = torch.softmax((q[:, :, i : i + 1] @ k[:, :, : i + 1].transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
        by_hand[:, :, i : i + 1] = w @ v[:, :, : i + 1]
    torch.testing.assert_close(y, by_hand, rtol=1e-6, atol=1e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, sdpa, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(sdpa, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_attention_takes_the_matmul_form_on_cpu_only_below_the_score_budget(monkeypatch):
    import torch.nn.functional as F

    import bitflow.models.llama as llama

    q, k, v = _qkv(torch.bfloat16)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    matmul = llama.causal_attention(q, k, v, "matmul")
    assert torch.equal(llama.causal_attention(q, k, v, "auto"), matmul)  # 2 x 3 x 17 x 17 scores: under budget
    assert not torch.equal(matmul, sdpa)  # bf16 scores/probabilities: not the flash kernel's bits ...
    torch.testing.assert_close(matmul.float(), sdpa.float(), rtol=0, atol=3e-2)  # ... but bf16-close
    assert torch.equal(llama.causal_attention(q, k, v, "sdpa"), sdpa)
    monkeypatch.setattr(llama, "MATMUL_ATTENTION_SCORES", 2 * 3 * 17 * 17 - 1)
    assert torch.equal(llama.causal_attention(q, k, v, "auto"), sdpa)


def test_set_attention_reaches_every_block_and_bad_modes_are_refused():
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        auto = model(idx)
        model.set_attention("sdpa")
        assert [b.attn.mode for b in model.layers] == ["sdpa", "sdpa"]
        torch.testing.assert_close(model(idx), auto, rtol=1e-5, atol=1e-5)  # float32: the same logits
    with pytest.raises(ValueError, match="attention='flash' is not allowed; allowed: auto, sdpa, matmul"):
        model.set_attention("flash")


@pytest.mark.parametrize("mode", ["matmul", "sdpa"])
def test_a_ternary_block_compiles_without_graph_breaks_with_either_attention(mode):
    """What `compile: regional` compiles: one decoder block, BitLinear projections, the CPU matmul attention (its
    autocast-off region included) or SDPA, under bf16 autocast."""
    from bitflow.quant import to_bitlinear

    torch._dynamo.reset()
    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    to_bitlinear(model)
    model.set_attention(mode)
    block, x = model.layers[0], torch.randn(2, 16, 32)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(lambda x: block(x, cos, sin).sum())(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
