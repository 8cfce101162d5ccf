"""format=gguf: the file read back with gguf's own reader (types, bits per weight, values, metadata)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitflow.config import ConfigError
from bitflow.export.run import export_checkpoint
from bitflow.export.source import load_source
from tests.export.conftest import write_checkpoint

gguf = pytest.importorskip("gguf")

WIDE = dict(d_model=256, d_ff=512, n_heads=4, n_kv_heads=2)  # rows of 256 and 512 weights: TQ blocks fit


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory, tokenizer) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("gguf") / "wide.ckpt", tokenizer, quant={"recipe": "bitlinear"}, seed=2, **WIDE
    )


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_rope_permute_moves_rotate_half_pairs_next_to_each_other():
    from bitflow.export.gguf_file import rope_permute

    rows = torch.arange(8).reshape(8, 1)  # 2 heads of head_dim 4: pairs (0, 2), (1, 3) per head
    assert rope_permute(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize(("weights", "bpw"), [("tq2_0", 2.0625), ("tq1_0", 1.6875)])
def test_ternary_layers_are_tq_blocks_holding_exactly_bitflows_values(wide_ckpt, tmp_path, weights, bpw):
    from bitflow.export.gguf_file import gguf_name, rope_permute

    out = tmp_path / f"m-{weights}.gguf"
    export_checkpoint({"ckpt": str(wide_ckpt), "format": "gguf", "weights": weights, "out": str(out)})
    source = load_source(wide_ckpt)
    cfg = source.decoder.config
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    ternary = source.ternary()
    assert len(ternary) == 14
    for name, tw in ternary.items():
        t = tensors[gguf_name(f"{name}.weight")]
        assert t.tensor_type.name == weights.upper()
        assert t.n_bytes * 8 / t.n_elements == bpw
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        # the block scale is bitflow's 1 / s_w rounded to fp16 first: values are exactly fp16(1/s_w) x codes
        expected = tw.codes.float() * (1 / tw.scale).to(torch.float16).float()
        heads = cfg.n_heads if name.endswith("wq") else cfg.n_kv_heads if name.endswith("wk") else 0
        if heads:
            expected = rope_permute(expected, heads)
        assert torch.equal(values, expected)
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (2, 4, 2)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    vocab = source.tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) == len(vocab) - 257  # 256 bytes + <|endoftext|>, the rest merges
    assert meta["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]


def test_f32_export_holds_bitflows_dense_weights_exactly(wide_ckpt, tmp_path):
    from bitflow.export.gguf_file import gguf_name, rope_permute

    out = tmp_path / "m.gguf"
    export_checkpoint({"ckpt": str(wide_ckpt), "format": "gguf", "weights": "f32", "out": str(out)})
    source = load_source(wide_ckpt)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, w in source.dense_weights().items():
        if name == "lm_head.weight":
            continue
        t = tensors[gguf_name(name)]
        assert t.tensor_type.name == "F32"
        values = torch.from_numpy(np.asarray(t.data).copy()).reshape(w.shape)
        heads = 4 if ".wq." in name else 2 if ".wk." in name else 0
        assert torch.equal(values, rope_permute(w, heads) if heads else w)


def test_rows_tq_cannot_hold_are_refused_naming_a_preset_or_stored_densely_on_request(
    ternary_ckpt, tmp_path, caplog
):
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match=r"wq: 32.*nearest preset: model=spectra_99m.*tq_fallback=f16"):
        export_checkpoint({"ckpt": str(ternary_ckpt), "format": "gguf", "weights": "tq2_0", "out": str(out)})
    assert not out.exists()
    export_checkpoint(
        {"ckpt": str(ternary_ckpt), "format": "gguf", "weights": "tq2_0", "tq_fallback": "f16", "out": str(out)}
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "F16"


def test_a_16_bit_checkpoint_exports_dense_and_refuses_tq(dense_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match="16-bit: run PTQ or a transition first"):
        export_checkpoint({"ckpt": str(dense_ckpt), "format": "gguf", "weights": "tq1_0", "out": str(out)})
    export_checkpoint({"ckpt": str(dense_ckpt), "format": "gguf", "out": str(out)})  # default for 16-bit: f16
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types == {"F16", "F32"}


def test_a_mid_phase_in_checkpoint_is_refused(tokenizer, tmp_path):
    from bitflow.lm import load_checkpoint
    from bitflow.quant import set_strength

    ckpt = write_checkpoint(tmp_path / "half.ckpt", tokenizer, quant={"recipe": "bitlinear"}, **WIDE)
    lm = load_checkpoint(ckpt)
    set_strength(lm.model, weight=0.5, act=0.5)
    data = torch.load(ckpt, weights_only=False)
    lm.on_save_checkpoint(data)
    torch.save(data, ckpt)
    with pytest.raises(ConfigError, match="mid phase-in"):
        export_checkpoint({"ckpt": str(ckpt), "format": "gguf", "out": str(tmp_path / "m.gguf")})
