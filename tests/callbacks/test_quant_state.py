"""bitflow.quant.state: capturing and re-applying the quantization state that checkpoints carry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant import BitLinear, set_strength, to_bitlinear
from bitflow.quant import state as qstate
from bitflow.quant.state import apply_quant_state, bitlinear_state, capture_quant_state, register_quant_kind

CONFIG = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**CONFIG))


def test_capture_then_apply_rebuilds_the_model():
    src = _model(0)
    names = to_bitlinear(src, include=["mlp.*"], weight_scale="absmedian", act_bits=None)
    set_strength(src, weight=0.25, act=0.75)
    state = capture_quant_state(src)
    assert state == {
        "kind": "bitlinear",
        "layers": ["layers.0.mlp.w1", "layers.0.mlp.w3", "layers.0.mlp.w2", "layers.1.mlp.w1", "layers.1.mlp.w3", "layers.1.mlp.w2"],
        "options": {
            "weight_scale": "absmedian", "granularity": "tensor", "group_size": None, "weight_bits": None,
            "act_bits": None, "act_qmax": None, "input_norm": None, "eps": 1e-5,
        },
        "strength": {"weight": 0.25, "act": 0.75},
    }
    assert state["layers"] == names

    dst = _model(1)  # a fresh 16-bit model of the same architecture
    assert apply_quant_state(dst, state) == names
    assert [n for n, m in dst.named_modules() if isinstance(m, BitLinear)] == names
    assert isinstance(dst.layers[0].attn.wq, nn.Linear) and not isinstance(dst.layers[0].attn.wq, BitLinear)
    dst.load_state_dict(src.state_dict())  # the state dict of the switched model loads unchanged
    assert dst.layers[1].mlp.w2.weight_scale == "absmedian"
    assert float(dst.layers[1].mlp.w2.weight_strength) == 0.25 and float(dst.layers[1].mlp.w2.act_strength) == 0.75
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(src(idx), dst(idx))

    params = [id(p) for p in dst.parameters()]
    assert apply_quant_state(dst, state) == names  # idempotent
    assert [id(p) for p in dst.parameters()] == params
    assert capture_quant_state(dst) == state
    assert capture_quant_state(_model()) is None  # nothing quantized


def test_bitlinear_state_is_plain_data():
    options = {"weight_scale": "absmean"}
    state = bitlinear_state(["a"], options, 1, 0)
    options["weight_scale"] = "changed"
    assert state == {"kind": "bitlinear", "layers": ["a"], "options": {"weight_scale": "absmean"},
                     "strength": {"weight": 1.0, "act": 0.0}}


@pytest.mark.parametrize(
    "state, match",
    [
        ({"kind": "gptq"}, "unknown quant state kind 'gptq'; known kinds: bitlinear"),
        ("bitlinear", "must be a dict with a 'kind' key"),
        ({"kind": "bitlinear", "layers": ["layers.0.mlp.w1"]}, r"lacks \['options', 'strength'\]"),
        (bitlinear_state(["layers.9.mlp.w1"], {}, 1, 1), r"does not have: \['layers.9.mlp.w1'\]"),
        (bitlinear_state(["layers.0.mlp_norm"], {}, 1, 1), "not nn.Linear"),
        (bitlinear_state([], {}, 1, 1), "names no layers"),
        (bitlinear_state(["layers.0.mlp.w1"], {"weight_scale": "mode"}, 1, 1), "mode"),
    ],
)
def test_bad_states_raise(state, match: str):
    with pytest.raises(ValueError, match=match):
        apply_quant_state(_model(), state)


def test_a_layer_already_quantized_differently_is_refused():
    model = _model()
    to_bitlinear(model, include=["layers.0.mlp.w1"])
    with pytest.raises(ValueError, match="already BitLinear with options"):
        apply_quant_state(model, bitlinear_state(["layers.0.mlp.w1"], {"weight_scale": "absmax"}, 1, 1))


def test_other_kinds_plug_in():
    calls = []
    register_quant_kind("probe", lambda model, state: calls.append(state) or ["x"], lambda model: None)
    try:
        assert "probe" in qstate.QUANT_KINDS
        assert apply_quant_state(_model(), {"kind": "probe", "n": 1}) == ["x"]
        assert calls == [{"kind": "probe", "n": 1}]
    finally:
        del qstate._APPLIERS["probe"], qstate._CAPTURERS["probe"]
        qstate.QUANT_KINDS = tuple(qstate._APPLIERS)
