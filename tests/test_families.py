"""The four model families beyond the decoder, against references: attention masks (encoder padding, decoder
causality, cross-attention), T5's relative position buckets, the GNN propagation against a dense normalised
adjacency, the MLM and span corruptions, macro-F1, and the conversion of torch-geometric and unconvertible layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitflow.data.mlm import IGNORE, mask_tokens, step_generator
from bitflow.data.span import span_corrupt, span_lengths
from bitflow.models.encdec import EncoderDecoder, EncoderDecoderConfig
from bitflow.models.encoder import Encoder, EncoderConfig
from bitflow.models.layers import Attention, attention_mask, relative_position_bucket
from bitflow.models.mlp import WideMLP, WideMLPConfig
from bitflow.quant import BitLinear, to_bitlinear
from bitflow.quant.recipes import recipe_from_config
from bitflow.tasks.classify import macro_f1


def reference_attention(attn: Attention, x, kv, allowed=None, bias=None):
    """softmax(q k^T / sqrt(d) + bias, masked) v, head by head, from the projections' weights."""
    b, tq, d = x.shape
    h, hd = attn.n_heads, attn.head_dim
    q = (x @ attn.wq.weight.T + attn.wq.bias).view(b, tq, h, hd).transpose(1, 2)
    k = (kv @ attn.wk.weight.T + attn.wk.bias).view(b, -1, h, hd).transpose(1, 2)
    v = (kv @ attn.wv.weight.T + attn.wv.bias).view(b, -1, h, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)
    return y @ attn.wo.weight.T + attn.wo.bias


def test_attention_with_padding_causal_mask_and_bias_matches_the_reference():
    torch.manual_seed(0)
    attn = Attention(16, 4, bias=True)
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = reference_attention(attn, x, kv, allowed=pad[:, None, None, :])
    torch.testing.assert_close(attn(x, kv=kv, mask=attention_mask(pad, 5, 7)), ref)
    bias = torch.randn(1, 4, 5, 5)
    tri = torch.ones(5, 5, dtype=torch.bool).tril()
    ref = reference_attention(attn, x, x, allowed=tri, bias=bias)
    torch.testing.assert_close(attn(x, mask=attention_mask(None, 5, 5, causal=True, bias=bias)), ref)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_encoder_ignores_padded_keys(positions: str):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, positions=positions))
    idx = torch.randint(0, 50, (2, 10))
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, 6:] = False
    other = idx.clone()
    other[0, 6:] = torch.randint(0, 50, (4,))  # change only padded tokens
    a, b = enc(idx, pad), enc(other, pad)
    assert a.shape == (2, 10, 50)
    torch.testing.assert_close(a[0, :6], b[0, :6])  # real positions do not see the padding
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(enc(other)[0, :6], a[0, :6])  # without the mask they would
    # bidirectional: a later token changes an earlier position's output
    later = idx.clone()
    later[1, 9] = (later[1, 9] + 1) % 50
    assert not torch.allclose(enc(later, pad)[1, 0], a[1, 0])


@pytest.mark.parametrize("positions", ["relative", "rotary"])
def test_encoder_decoder_is_causal_and_cross_attends_to_unpadded_source(positions: str):
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                                positions=positions))
    src, tgt = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 6))
    src_mask = torch.ones(2, 8, dtype=torch.bool)
    src_mask[1, 5:] = False
    out = model(src, tgt, src_mask)
    assert out.shape == (2, 6, 40)
    future = tgt.clone()
    future[:, 4:] = (future[:, 4:] + 1) % 40
    torch.testing.assert_close(model(src, future, src_mask)[:, :4], out[:, :4])  # causal
    assert not torch.allclose(model(src, future, src_mask)[:, 4:], out[:, 4:])
    padded = src.clone()
    padded[1, 5:] = (padded[1, 5:] + 1) % 40
    torch.testing.assert_close(model(padded, tgt, src_mask)[1], out[1])  # padded source ignored
    real = src.clone()
    real[0, 0] = (real[0, 0] + 1) % 40
    assert not torch.allclose(model(real, tgt, src_mask)[0, 0], out[0, 0])  # the first target sees the source
    # a decoder step equals a full decode of the prefix (no leak through cross-attention or positions)
    memory = model.encode(src, src_mask)
    torch.testing.assert_close(model.decode(tgt[:, :3], memory, src_mask), out[:, :3])


def test_relative_position_buckets_by_hand():
    rel = torch.tensor([0, 1, -1, 7, -7, 8, -8, 200, -200])
    # bidirectional, 32 buckets: keys after the query (rel > 0) take buckets 16..31; 8 exact buckets per side
    got = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert got.tolist() == [0, 17, 1, 23, 7, 24, 8, 31, 15]
    # causal: the future collapses to bucket 0; 16 exact buckets back
    got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert got.tolist() == [0, 0, 1, 0, 7, 0, 8, 0, 31]


def test_relative_position_buckets_match_transformers_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        ref = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(relative_position_bucket(rel, bidirectional, 32, 128), ref)


def dense_propagation(x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 as a dense matrix (Kipf & Welling's renormalisation trick)."""
    n = x.shape[0]
    a = torch.zeros(n, n)
    a[edge_index[0], edge_index[1]] = 1.0
    a = a + torch.eye(n)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


@pytest.fixture
def graph():
    pytest.importorskip("torch_geometric")
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    e = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    return x, e


def test_sgc_is_linear_after_k_dense_propagations(graph):
    from bitflow.models.gnn import GNN, GNNConfig

    x, e = graph
    model = GNN(GNNConfig(arch="sgc", in_features=5, n_classes=3, K=2))
    a = dense_propagation(x, e)
    lin = model.convs[0].lin
    torch.testing.assert_close(model(x, e), (a @ a @ x) @ lin.weight.T + lin.bias, rtol=1e-5, atol=1e-5)


def test_gcn_matches_the_dense_two_layer_formula(graph):
    from bitflow.models.gnn import GNN, GNNConfig

    x, e = graph
    model = GNN(GNNConfig(arch="gcn", in_features=5, n_classes=3, d_hidden=4))
    a = dense_propagation(x, e)
    c1, c2 = model.convs
    h = F.relu(a @ (x @ c1.lin.weight.T) + c1.bias)
    torch.testing.assert_close(model(x, e), a @ (h @ c2.lin.weight.T) + c2.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["bitlinear", "dqt"])
def test_conversion_quantizes_torch_geometric_linear_for_real(graph, recipe: str):
    from torch_geometric.nn.dense.linear import Linear as PyGLinear

    from bitflow.models.gnn import GNN, GNNConfig

    x, e = graph
    model = GNN(GNNConfig(arch="gcn", in_features=5, n_classes=3, d_hidden=4))
    assert isinstance(model.convs[0].lin, PyGLinear) and not isinstance(model.convs[0].lin, nn.Linear)
    weights = [c.lin.weight for c in model.convs]
    q = recipe_from_config({"recipe": recipe})
    assert q.plan(model) == ["convs.0.lin", "convs.1.lin"]
    before = model(x, e)
    assert q.convert(model).names == ["convs.0.lin", "convs.1.lin"]
    assert q.converted(model) == ["convs.0.lin", "convs.1.lin"]
    if recipe == "bitlinear":
        assert all(isinstance(c.lin, BitLinear) for c in model.convs)
        assert [c.lin.weight for c in model.convs] == weights and all(
            c.lin.weight is w for c, w in zip(model.convs, weights, strict=True))  # the same Parameters
        a = dense_propagation(x, e)
        c1, c2 = model.convs
        h = F.relu(a @ c1.lin(x) + c1.bias)
        torch.testing.assert_close(model(x, e), a @ c2.lin(h) + c2.bias, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x, e), before)  # the forward is quantized now


def test_unconvertible_layers_raise_naming_the_layer():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"layer '0.self_attn' \(MultiheadAttention\) cannot be quantized"):
        to_bitlinear(model)
    with pytest.raises(ValueError, match=r"'0.self_attn' \(MultiheadAttention\) cannot be quantized.*quant.exclude"):
        recipe_from_config({"recipe": "bitlinear", "exclude": ["lm_head"]}).plan(model)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        recipe_from_config({"recipe": "dqt"}).plan(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == 16
               and m.out_features == 4)  # nothing was changed
    # excluded explicitly: the other layers convert
    assert to_bitlinear(model, exclude=["self_attn"]) == ["0.linear1", "0.linear2", "1"]


def test_every_projection_of_the_new_models_is_converted():
    enc = Encoder(EncoderConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    assert to_bitlinear(enc) == ["layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv", "layers.0.attn.wo",
                                 "layers.0.mlp.fc1", "layers.0.mlp.fc2", "mlm_head.dense"]
    encdec = EncoderDecoder(EncoderDecoderConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    names = to_bitlinear(encdec)
    assert len(names) == 4 + 3 + 4 + 4 + 3 and "decoder.0.cross.wk" in names and "lm_head" not in names
    mlp = WideMLP(WideMLPConfig(in_features=10, n_classes=3, d_hidden=8))
    assert to_bitlinear(mlp) == ["hidden", "out"]


def test_mlm_masking_follows_bert_and_is_a_function_of_the_seed():
    tokens = torch.randint(0, 100, (8, 200))
    inputs, labels = mask_tokens(tokens, mask_id=100, vocab_size=100, generator=step_generator(1, 5))
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen positions are untouched
    assert 0.10 < chosen.float().mean() < 0.20
    share_mask = (inputs[chosen] == 100).float().mean()
    assert 0.7 < share_mask < 0.9
    again = mask_tokens(tokens, 100, 100, step_generator(1, 5))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(mask_tokens(tokens, 100, 100, step_generator(1, 6))[1], labels)


def test_span_corruption_round_trips_to_the_original():
    tokens = torch.randint(0, 50, (4, 64))
    src, tgt = span_corrupt(tokens, first_sentinel=50, eos_id=7, generator=step_generator(0, 0))
    noise, spans = span_lengths(64)
    assert (noise, spans) == (10, 3)
    assert src.shape == (4, 64 - noise + spans) and tgt.shape == (4, noise + spans + 1)
    assert (tgt[:, -1] == 7).all()
    for s, t, orig in zip(src.tolist(), tgt.tolist(), tokens.tolist(), strict=True):
        fills, current = {}, None  # sentinel -> the tokens it replaced
        for tok in t[:-1]:
            if tok >= 50:
                current = tok
                fills[current] = []
            else:
                fills[current].append(tok)
        assert sorted(fills) == [50, 51, 52]
        rebuilt = [x for tok in s for x in (fills[tok] if tok >= 50 else [tok])]
        assert rebuilt == orig


def test_macro_f1_by_hand():
    # 3 classes: tp/fp/fn per class; class 2 absent from both truth and prediction is left out
    tp, fp, fn = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert float(macro_f1(tp, fp, fn)) == pytest.approx((4 / 5 + 2 / 3) / 2)
