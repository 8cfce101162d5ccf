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
