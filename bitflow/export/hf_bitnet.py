"""``format=hf_bitnet``: transformers' packed BitNet layout (``quantization_config.quant_method: bitnet``).

Which of transformers' BitNet variants computes what bitflow's BitLinear computes (checked in
``transformers.integrations.bitnet``): ``linear_class: bitlinear`` with ``quantization_mode: offline`` holds the
packed codes and one weight scale per matrix and computes

    y = F.linear(round_clamp(x * 127 / max(max|x|, 1e-5)), codes) / (s_x * weight_scale)   (per token, 8 bits)

so ``weight_scale`` is bitflow's ``s_w`` (the ``autobitlinear`` class multiplies by its scale instead, and its
online mode recomputes an absmean scale from dense weights). Packing: uint8 [out / 4, in], the 2-bit digit
``code + 1`` of row ``i * out / 4 + j`` in bits ``2i, 2i + 1`` of byte row ``j``.

What it cannot express, refused here: per-channel or per-group scales (one scale per matrix), n-bit weights,
activation bits other than 8 or a qmax other than 127, an eps other than 1e-5 (transformers' activation floor),
the parameter-free LayerNorm input norm (its option is an RMSNorm, written with gain 1 and bitflow's eps), a
quantized LM head (transformers keeps ``lm_head`` dense) and a checkpoint mid phase-in. The weight statistic
itself (absmean or absmedian) is not stored, only the scale it gave, so both export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bitflow.export.hf import hf_name, write_hf
from bitflow.export.source import ExportSource
from bitflow.quant.bitlinear import BitLinear
from bitflow.quant.pack import pack_ternary

__all__ = ["export_hf_bitnet", "pack_bitnet"]


def pack_bitnet(codes: Tensor) -> Tensor:
    """transformers' packed BitNet weight of ternary ``codes`` [out, in] (out a multiple of 4): uint8
    [out / 4, in], byte ``[j, k]`` = ``sum_i (codes[i * out / 4 + j, k] + 1) << 2i`` (:func:`pack_ternary`'s
    ``2bit`` layout over the four row blocks)."""
    out, inp = codes.shape
    blocks = codes.reshape(4, out // 4, inp).permute(1, 2, 0)  # [j, k, i]: four codes per byte, i the bit pair
    return pack_ternary(blocks, "2bit").reshape(out // 4, inp)


def _check(source: ExportSource) -> dict[str, Any]:
    """The options transformers' BitNet can hold, or ValueError naming the one it cannot."""
    ternary = source.ternary()
    if not ternary:
        raise ValueError("format=hf_bitnet needs a ternary checkpoint (quant=ternary, after its transition)")
    options = next(iter(ternary.values())).options
    problems = []
    if options["granularity"] != "tensor":
        problems.append(f"quant.granularity={options['granularity']} (transformers' BitLinear holds one scale per matrix)")
    if options["act_bits"] != 8 or options["act_qmax"] not in (None, 127):
        problems.append(f"quant.act_bits={options['act_bits']}, quant.act_qmax={options['act_qmax']} (8 bits, 127)")
    if options["eps"] != 1e-5:
        problems.append(f"quant.eps={options['eps']} (transformers floors max|x| at 1e-5)")
    if options["input_norm"] == "layernorm":
        problems.append("quant.input_norm=layernorm (transformers' option is an RMSNorm)")
    if "lm_head" in ternary:
        problems.append("a ternary lm_head (transformers keeps lm_head dense)")
    layers = [m for m in source.decoder.modules() if isinstance(m, BitLinear)]
    if any(float(m.act_strength) != 1.0 for m in layers):
        problems.append("an activation strength below 1 (mid phase-in)")
    odd = [n for n, tw in ternary.items() if tw.codes.shape[0] % 4]
    if odd:
        problems.append(f"layers whose output width is not a multiple of 4 ({odd[:3]})")
    if problems:
        raise ValueError("transformers' BitNet layout cannot express " + "; ".join(problems))
    return options


def export_hf_bitnet(source: ExportSource, out: Path, overwrite: bool = False) -> Path:
    """Write ``source`` as a ``LlamaForCausalLM`` with ``quant_method: bitnet`` (offline ``bitlinear``): packed
    ternary weights and ``weight_scale`` = ``s_w`` per matrix; the layers bitflow left 16-bit listed in
    ``modules_to_not_convert``."""
    from bitflow.io import atomic_directory

    options = _check(source)
    ternary = source.ternary()
    dense = {k: v for k, v in source.dense_weights().items()}
    raw: dict[str, Tensor] = {}
    for name, tw in ternary.items():
        dense.pop(f"{name}.weight")
        base = hf_name(f"{name}.weight").removesuffix(".weight")
        raw[f"{base}.weight"] = pack_bitnet(tw.codes)
        raw[f"{base}.weight_scale"] = tw.scale.reshape(1).float()
        if options["input_norm"] == "rmsnorm":
            raw[f"{base}.rms_norm.weight"] = torch.ones(tw.codes.shape[1])
    linear = [n for n, m in source.decoder.named_modules() if isinstance(m, torch.nn.Linear)]
    keep = [hf_name(f"{n}.weight").removesuffix(".weight") for n in linear if n not in ternary]
    quant = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "use_rms_norm": options["input_norm"] == "rmsnorm",
        "rms_norm_eps": options["eps"],
        "modules_to_not_convert": keep,
    }
    with atomic_directory(out, overwrite) as tmp:
        write_hf(tmp, source.decoder.config, dense, source.tokenizer, extra_config={"quantization_config": quant}, raw=raw)
    return out
