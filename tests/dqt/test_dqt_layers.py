"""DQT layers and conversion (Zhao et al., arXiv 2412.04787): init values by hand, int8 storage, filters, ties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant import to_bitlinear
from bitflow.quant.dqt import (
    DQTEmbedding,
    DQTLinear,
    dqt_modules,
    dqt_qrange,
    init_codes,
    to_dqt,
)
from bitflow.quant.recipes import recipe_from_config

LINEARS = [f"layers.{i}.{m}" for i in range(2) for m in
           ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")]


def tiny(tie: bool = True) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                             tie_embeddings=tie))


@pytest.mark.parametrize("bits, qrange", [(None, (-1, 1)), (2, (-2, 1)), (3, (-4, 3)), (8, (-128, 127))])
def test_grid_range(bits, qrange):
    assert dqt_qrange(bits) == qrange


def test_init_codes_by_hand():
    w = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    # mean|W| = 1.75 / 4 = 0.4375; ternary s = 1 / 0.4375: W s = [1.142, -2.285, 0.571, 0] -> round, clamp to [-1, 1]
    codes, scale = init_codes(w, bits=None)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.dim() == 0
    assert codes.tolist() == [[1, -1], [1, 0]]
    assert float(scale) == pytest.approx(0.4375)
    # 4 bits: Qp = 7, scale = 0.4375 / 7 = 0.0625: W / scale = [8, -16, 4, 0] -> clamp to [-8, 7]
    codes, scale = init_codes(w, bits=4)
    assert codes.tolist() == [[7, -8], [4, 0]]
    assert float(scale) == pytest.approx(0.0625)
    # absmax: scale = 1 / 7; W / scale = [3.5, -7, 1.75, 0] -> [4 (ties to even), -7, 2, 0]: nothing clipped
    codes, scale = init_codes(w, bits=4, stat="absmax")
    assert codes.tolist() == [[4, -7], [2, 0]]
    assert float(scale) == pytest.approx(1 / 7)


def test_conversion_targets_every_linear_but_the_head_and_stores_int8():
    model = tiny()
    names = to_dqt(model, bits=8)
    assert names == LINEARS
    assert [n for n, _ in dqt_modules(model)] == LINEARS
    sd = model.state_dict()
    for name in LINEARS:
        assert sd[f"{name}.codes"].dtype == torch.int8
        assert sd[f"{name}.scale"].dtype == torch.float32 and sd[f"{name}.scale"].dim() == 0
        assert f"{name}.weight" not in sd
        assert list(model.get_submodule(name).parameters()) == []  # no float copy of the weight (no bias here)
    # embeddings, norms and the (tied) head stay full precision Parameters
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight
    params = dict(model.named_parameters())
    assert set(params) == {"tok_emb.weight", "layers.0.attn_norm.weight", "layers.0.mlp_norm.weight",
                           "layers.1.attn_norm.weight", "layers.1.mlp_norm.weight", "norm.weight"}
    assert all(p.dtype == torch.float32 for p in params.values())


def test_conversion_keeps_the_initial_weights_on_the_paper_grid():
    lin = nn.Linear(8, 4, bias=True)
    layer = DQTLinear.from_linear(lin, bits=None)
    codes, scale = init_codes(lin.weight, None)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.scale, scale)
    assert layer.bias is lin.bias  # the bias Parameter continues
    assert torch.equal(layer.weight, layer.codes.float() * layer.scale)


def test_forward_uses_the_stored_weight_and_quantizes_activations():
    torch.manual_seed(0)
    layer = DQTLinear(4, 3, bias=False, bits=None, act_bits=None)
    layer.codes.copy_(torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [-1, 1, 0, 0]], dtype=torch.int8))
    layer.scale.fill_(0.5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert layer(x).tolist() == [[0.5 * (1 - 3 + 4), 0.5 * (3 - 4), 0.5 * (-1 + 2)]]
    # 8-bit per-token activations: s_x = 127 / 4, so 3 -> round(95.25) / s_x = 95 * 4 / 127
    layer8 = DQTLinear(4, 1, bias=False, act_bits=8)
    layer8.codes.copy_(torch.tensor([[0, 0, 1, 0]], dtype=torch.int8))
    assert layer8(x).item() == pytest.approx(95 * 4 / 127)


def test_forward_under_bf16_autocast_gives_the_gradient_to_one_leaf():
    model = tiny()
    to_dqt(model)
    x = torch.randint(0, 48, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    for _, m in dqt_modules(model):
        leaf = m._slot.leaf
        assert leaf is not None and leaf.is_leaf and leaf.dtype == torch.bfloat16
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    # a second micro-batch (gradient accumulation) reuses the same leaves
    leaves = [m._slot.leaf for _, m in dqt_modules(model)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:, :-1]).sum().backward()
    assert all(m._slot.leaf is leaf for (_, m), leaf in zip(dqt_modules(model), leaves))
    with torch.no_grad():  # evaluation builds no leaf
        to_dqt_free = tiny()
        to_dqt(to_dqt_free)
        to_dqt_free(x)
        assert all(m._slot.leaf is None for _, m in dqt_modules(to_dqt_free))


def test_tied_head_and_embedding_share_one_stored_weight():
    model = tiny(tie=True)
    with pytest.raises(ValueError, match="tied to .*tok_emb"):
        to_dqt(model, exclude=[])  # the head alone: its weight is the embedding's
    with pytest.raises(ValueError, match="tied to .*lm_head"):
        to_dqt(model, embeddings=True)  # the embedding alone: the head keeps the tied weight
    names = to_dqt(model, exclude=[], embeddings=True, bits=4)
    assert names[0] == "tok_emb" and names[-1] == "lm_head"
    assert isinstance(model.tok_emb, DQTEmbedding) and isinstance(model.lm_head, DQTLinear)
    assert model.lm_head.codes is model.tok_emb.codes and model.lm_head.scale is model.tok_emb.scale
    sd = model.state_dict()
    assert "tok_emb.codes" in sd and "lm_head.codes" not in sd  # stored once
    x = torch.randint(0, 48, (2, 8))
    model(x).sum().backward()
    assert model.lm_head._slot.leaf is model.tok_emb._slot.leaf  # both uses add into one gradient


def test_untied_embedding_option():
    model = tiny(tie=False)
    names = to_dqt(model, embeddings=True)
    assert names == ["tok_emb", *LINEARS]
    assert isinstance(model.lm_head, nn.Linear)
    out = model.tok_emb(torch.tensor([[3, 5]]))
    assert out.dtype == torch.float32
    assert torch.equal(out[0, 0], model.tok_emb.codes[3].float() * model.tok_emb.scale)


def test_quant_state_rebuilds_the_layers_on_a_fresh_model():
    model = tiny()
    recipe = recipe_from_config({"recipe": "dqt", "include": ["*.mlp.*"], "bits": 3, "act_bits": None,
                                 "scale_update": "fixed"})
    assert recipe.state(model) is None
    recipe.convert(model)
    state = recipe.state(model)
    assert state == {"kind": "dqt", "layers": [n for n in LINEARS if ".mlp." in n],
                     "options": {"bits": 3, "act_bits": None, "act_qmax": None, "scale_update": "fixed",
                                 "eps": 1e-5}}
    fresh = tiny()
    with pytest.raises(ValueError, match="the checkpoint's DQT options .* differ from this run's quant config"):
        recipe_from_config({"recipe": "dqt", "bits": 4}).restore(fresh, state)
    assert not dqt_modules(fresh)
    assert recipe.restore(fresh, state) == state["layers"]
    fresh.load_state_dict(model.state_dict())
    for name in state["layers"]:
        assert torch.equal(fresh.get_submodule(name).codes, model.get_submodule(name).codes)
        assert fresh.get_submodule(name).options() == model.get_submodule(name).options()
    assert recipe.restore(fresh, state) == state["layers"]  # idempotent


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits=1 is not supported; allowed: null .ternary. or an int in \\[2, 8\\]"),
        (dict(bits=9), "bits=9"),
        (dict(scale_update="mean"), "scale_update='mean'"),
        (dict(init_scale="median"), "init_scale='median'"),
        (dict(act_bits=None, act_qmax=128), "act_qmax=128 needs activation quantization"),
        (dict(include=["nothing.*"]), "match no nn.Linear layer"),
    ],
)
def test_bad_options_raise_before_anything_changes(kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        to_dqt(model, **kwargs)
    assert not dqt_modules(model)


def test_dqt_does_not_stack_on_bitlinear():
    model = tiny()
    to_bitlinear(model)
    with pytest.raises(ValueError, match="BitLinear"):
        to_dqt(model)


def test_a_model_cast_to_bf16_runs_in_bf16_and_keeps_the_scale_float32():
    model = tiny(tie=False)
    to_dqt(model, embeddings=True)
    model = model.to(torch.bfloat16)  # Lightning's "bf16-true"
    assert model.tok_emb.scale.dtype == torch.float32 and model.tok_emb.codes.dtype == torch.int8
    logits = model(torch.randint(0, 48, (2, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(m._slot.leaf.dtype == torch.bfloat16 and m._slot.leaf.grad is not None for _, m in dqt_modules(model))


@pytest.mark.slow
def test_torch_compile_trains_dqt_layers():
    from bitflow.lm import param_groups
    from bitflow.quant.dqt import DQTAdamW

    model = tiny()
    to_dqt(model)
    opt = DQTAdamW.for_model(model, param_groups(model, 0.1), lr=1e-2, **{"seed": 0})
    compiled = torch.compile(model)
    x = torch.randint(0, 48, (2, 9))
    before = model.layers[0].mlp.w1.codes.clone()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        assert all(m._slot.leaf.grad is not None for _, m in dqt_modules(model))
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.layers[0].mlp.w1.codes)
