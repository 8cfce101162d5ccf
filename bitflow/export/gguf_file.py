"""``format=gguf``: a GGUF file for llama.cpp, written with the ``gguf`` package (llama.cpp's own writer).

Architecture ``llama``; the tokenizer embedded as a byte-level BPE (``tokenizer.ggml.model = gpt2``, GPT-2
pre-tokenizer, the merges); weights by ``weights=``:

* ``tq2_0`` / ``tq1_0``: every ternary linear layer as llama.cpp's TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875
  bits/weight) blocks; embeddings and a 16-bit LM head in f16, norms in f32. A block is 256 consecutive weights of
  a row with one fp16 scale: bitflow's ``1 / s_w`` rounded to fp16, so the file holds exactly
  ``fp16(1 / s_w) x {-1, 0, 1}``. Rows (``in_features``) must be a multiple of 256: another width is refused
  (naming the nearest model preset whose widths fit) unless ``tq_fallback=f16|f32`` stores those layers densely.
* ``f16`` / ``f32``: every weight dense (ternary layers dequantized), norms in f32.

llama.cpp's ``llama`` architecture rotates Q/K in adjacent pairs, bitflow (and transformers) in halves: the rows
of ``wq``/``wk`` are permuted per head so that llama.cpp computes the same attention.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitflow.data.tokenizer import eos_id
from bitflow.export.source import ExportSource, TernaryWeight

log = logging.getLogger("bitflow.export")

__all__ = ["BLOCK", "GGUF_NAMES", "export_gguf", "gguf_name", "pack_tq1_0", "pack_tq2_0", "rope_permute"]

BLOCK = 256  # QK_K: weights per TQ block
TQ_BLOCK_BYTES = {"tq2_0": 66, "tq1_0": 54}  # 64 (or 48 + 4) code bytes + the fp16 scale
GGUF_NAMES = {
    "attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "mlp_norm": "ffn_norm", "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up", "mlp.w2": "ffn_down",
}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name of bitflow's parameter ``name`` (``layers.0.attn.wq.weight`` ->
    ``blk.0.attn_q.weight``)."""
    top = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{leaf}"


def rope_permute(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a Q or K projection [n_heads * head_dim, ...] from rotate-half order (pairs ``i, i + d/2``) to
    llama.cpp's adjacent pairs (``2i, 2i + 1``): row ``h, 2i + t`` of the result is row ``h, i + t d/2`` of ``w``."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def _blocks(codes: Tensor) -> Tensor:
    """Digits ``code + 1`` in {0, 1, 2} as uint8 blocks [n_blocks, 256] (row-major: a row's blocks in order)."""
    return (codes.to(torch.int16) + 1).to(torch.uint8).reshape(-1, BLOCK)


def _with_scales(qs: Tensor, scales: Tensor) -> np.ndarray:
    """Append each block's fp16 scale (little-endian bytes) to its code bytes."""
    d = scales.reshape(-1, 1).to(torch.float16).numpy().view(np.uint8)
    return np.concatenate([qs.numpy(), d], axis=1)


def pack_tq2_0(codes: Tensor, scales: Tensor) -> np.ndarray:
    """TQ2_0 blocks of ternary ``codes`` [rows, cols] (cols a multiple of 256) and one scale per block
    [rows, cols / 256]: uint8 [rows, cols / 256 * 66].

    A block is 64 code bytes then the fp16 scale. Byte ``32 c + m`` holds the 2-bit digits (``code + 1``) of
    weights ``128 c + 32 n + m`` for n = 0..3 in bits ``2n, 2n + 1``."""
    rows = codes.shape[0]
    digits = _blocks(codes).reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qs = (digits << shifts).sum(dim=2, dtype=torch.uint8).reshape(-1, 64)
    return _with_scales(qs, scales).reshape(rows, -1)


def _base3_bytes(digits: Tensor, n_trits: int) -> Tensor:
    """Digits [n_blocks, n_trits, width] -> bytes [n_blocks, width]: ``sum_k digit_k 3^(4 - k)`` (the first trit
    most significant, 5 trits per byte), stored as ``ceil(value * 256 / 243)`` so that llama.cpp reads trit k back
    as the top bits of ``byte * 3^k`` (mod 256) times 3."""
    powers = torch.tensor([81, 27, 9, 3, 1][:n_trits], dtype=torch.int32).reshape(1, n_trits, 1)
    value = (digits.to(torch.int32) * powers).sum(dim=1)
    return ((value * 256 + 242) // 243).to(torch.uint8)


def pack_tq1_0(codes: Tensor, scales: Tensor) -> np.ndarray:
    """TQ1_0 blocks (base-3, 1.6875 bits/weight) of ternary ``codes`` [rows, cols] and one scale per block:
    uint8 [rows, cols / 256 * 54].

    A block is 48 ``qs`` bytes, 4 ``qh`` bytes, then the fp16 scale: byte m < 32 holds weights ``32 k + m``
    (k = 0..4), byte 32 + m (m < 16) weights ``160 + 16 k + m``, and ``qh`` byte j weights ``240 + 4 k + j``
    (k = 0..3, the fifth trit 0)."""
    rows = codes.shape[0]
    digits = _blocks(codes)
    n = digits.shape[0]
    qs0 = _base3_bytes(digits[:, :160].reshape(n, 5, 32), 5)
    qs1 = _base3_bytes(digits[:, 160:240].reshape(n, 5, 16), 5)
    qh = _base3_bytes(digits[:, 240:].reshape(n, 4, 4), 4)
    return _with_scales(torch.cat([qs0, qs1, qh], dim=1), scales).reshape(rows, -1)


def block_scales(tw: TernaryWeight) -> Tensor:
    """The fp16 scale of every 256-weight block [rows, cols / 256]: ``fp16(1 / s_w)``; ValueError when a block
    would span two scales (``granularity=group`` with a group size that is not a multiple of 256)."""
    step = tw.step()
    blocks = step.reshape(step.shape[0], -1, BLOCK)
    if not bool((blocks == blocks[..., :1]).all()):
        raise ValueError(
            f"quant.group_size={tw.group_size}: a TQ block of 256 weights holds one scale, so groups must be a "
            "multiple of 256 weights"
        )
    return blocks[..., 0].to(torch.float16)


def _nearest_tq_preset(d_model: int) -> str:
    """The conf/model preset whose widths (d_model, d_ff) are multiples of 256, nearest to ``d_model``."""
    from omegaconf import OmegaConf

    from bitflow.cli import CONFIG_DIR

    found = []
    for f in sorted(Path(CONFIG_DIR, "model").glob("*.yaml")):
        cfg = OmegaConf.load(f)
        dm, ff = cfg.get("d_model"), cfg.get("d_ff")
        if isinstance(dm, int) and isinstance(ff, int) and dm % BLOCK == 0 and ff % BLOCK == 0:
            found.append((abs(math.log(dm / d_model)), f.stem))
    return f"model={min(found)[1]}" if found else f"d_model and d_ff multiples of {BLOCK}"


def _tokenizer_metadata(writer: Any, tokenizer: Any) -> None:
    """The byte-level BPE: tokens in id order (byte-level strings, as the GPT-2 vocabulary), merges, types."""
    import gguf

    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    eos = eos_id(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # bitflow's ByteLevel(use_regex=True) splits with GPT-2's pattern
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # bitflow adds no special tokens on encode


def export_gguf(
    source: ExportSource, out: Path, weights: str, tq_fallback: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``source`` as a GGUF file ``out`` (atomically) with ``weights`` tq2_0 | tq1_0 | f16 | f32; raises
    ValueError before writing for what GGUF cannot hold (a 16-bit model as TQ, rows not a multiple of 256 without
    ``tq_fallback``, biases)."""
    import gguf

    from bitflow.io import atomic_output

    cfg = source.decoder.config
    if cfg.bias:
        raise ValueError("model.bias=true: llama.cpp's llama architecture has no biases on every linear layer")
    ternary = source.ternary()  # raises for weights that are not ternary yet
    tq = weights in TQ_BLOCK_BYTES
    if tq and not ternary:
        raise ValueError(
            f"weights={weights} needs ternary weights, but the checkpoint is 16-bit: run PTQ or a transition first "
            "(e.g. bitflow ... quant=ternary transition=default), or export weights=f16|f32"
        )
    if tq:
        narrow = {n: tw.codes.shape[1] for n, tw in ternary.items() if tw.codes.shape[1] % BLOCK}
        if narrow and tq_fallback is None:
            raise ValueError(
                f"weights={weights} packs rows of {BLOCK} weights, but layers have rows of other widths "
                f"({', '.join(f'{n}: {w}' for n, w in list(narrow.items())[:3])}); train with widths that are "
                f"multiples of {BLOCK} (the nearest preset: {_nearest_tq_preset(cfg.d_model)}), or add "
                f"tq_fallback=f16 to store those layers densely"
            )
        for n in narrow:
            log.warning("%s: rows of %d weights are not a multiple of %d: stored as %s", n, narrow[n], BLOCK, tq_fallback)
    qtype = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}.get(weights)
    dense_dtype = np.float32 if weights == "f32" else np.float16
    fallback_dtype = np.float32 if tq_fallback == "f32" else np.float16

    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(Path(out).stem)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(
            {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}[weights]
        )
        _tokenizer_metadata(writer, source.tokenizer)
        for name, w in source.decoder.state_dict().items():
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue  # llama.cpp reuses token_embd when there is no output tensor
            module = name.rsplit(".", 1)[0]
            heads = cfg.n_heads if module.endswith("attn.wq") else cfg.n_kv_heads if module.endswith("attn.wk") else 0
            tw = ternary.get(module)
            if tw is not None and qtype is not None and tw.codes.shape[1] % BLOCK == 0:
                codes, scales = tw.codes, block_scales(tw)
                if heads:
                    codes, scales = rope_permute(codes, heads), rope_permute(scales, heads)
                packed = (pack_tq2_0 if weights == "tq2_0" else pack_tq1_0)(codes, scales)
                writer.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
                continue
            dense = tw.dense() if tw is not None else w.detach().float()
            if heads:
                dense = rope_permute(dense, heads)
            dtype = np.float32 if dense.dim() == 1 else fallback_dtype if tw is not None and qtype else dense_dtype
            writer.add_tensor(gguf_name(name), dense.numpy().astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
