"""Size in bits of a model's weights: how Spectra (Kaushal et al., arXiv 2407.12327) compares models.

A FloatLM, a TriLM and a QuantLM (a FloatLM after post-training quantization) of the same architecture differ
in the bits their weights need, not in their parameter count. Per quantized weight matrix of ``rows x cols``:

- the weights: ``rows * cols * b`` with b = log2(3) = 1.585 for ternary weights (the information content,
  Spectra's "1.58 bits"), or b = 2 at the 2-bit packing bitflow stores them in (:mod:`bitflow.quant.pack`,
  layout ``"2bit"``); b = n for n-bit integer weights (GPTQ/RTN pack n-bit codes densely);
- the scales, ``scale_bits`` (16) each: one per tensor, one per output row (``channel``) or one per group of
  ``group_size`` input columns per row (``rows * ceil(cols / group_size)``);
- zero points of asymmetric quantization, one per scale, stored at n bits like the codes.

Every other parameter (embeddings, an untied LM head, norms, biases, layers left 16-bit) counts ``float_bits``
(16) bits. A tied embedding/head counts once. :func:`model_size` is the pure arithmetic over a model and a map of
layer name -> :class:`WeightFormat`; :func:`quant_formats` and :func:`ptq_formats` build that map from a
training ``quant`` config or from PTQ settings; :func:`config_size` sizes a run from its config alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "LOG2_3", "TERNARY_STORAGE_BITS", "ModelSize", "WeightFormat", "config_size", "matrix_bits", "model_size",
    "ptq_formats", "quant_formats",
]

LOG2_3 = math.log2(3)  # bits of information in one ternary weight
TERNARY_STORAGE_BITS = 2  # bitflow's "2bit" packing: 4 ternary codes per byte
GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class WeightFormat:
    """How one quantized weight matrix is stored.

    Args:
        bits: ``None`` = ternary {-1, 0, 1}; an int = n-bit integer codes.
        granularity: ``tensor`` (one scale), ``channel`` (one per output row) or ``group`` (one per
            ``group_size`` input columns of each row).
        group_size: columns per group (``granularity="group"`` only).
        zero_point: asymmetric quantization: one n-bit zero point per scale.
        scale_bits: bits of each scale (16: fp16/bf16).
    """

    bits: int | None = None
    granularity: str = "tensor"
    group_size: int | None = None
    zero_point: bool = False
    scale_bits: int = 16

    def __post_init__(self) -> None:
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits < 1):
            raise ValueError(f"bits={self.bits!r} is not allowed; allowed: null (ternary) or an int >= 1")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(
                f"group_size={self.group_size!r} with granularity={self.granularity!r}: a group size is needed "
                "with granularity=group and only there"
            )
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} is not allowed; allowed: an int >= 1")
        if self.zero_point and self.bits is None:
            raise ValueError("zero_point=True needs n-bit weights (bits); ternary weights are symmetric")

    def n_scales(self, rows: int, cols: int) -> int:
        """How many scales a ``rows x cols`` matrix stores."""
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return rows
        return rows * math.ceil(cols / self.group_size)  # type: ignore[operator]


def matrix_bits(rows: int, cols: int, fmt: WeightFormat, packed: bool = False) -> float:
    """Bits of one quantized ``rows x cols`` weight matrix: codes + scales (+ zero points).

    Ternary codes count log2(3) bits each, or :data:`TERNARY_STORAGE_BITS` with ``packed``; n-bit codes n bits.
    """
    per_weight = (TERNARY_STORAGE_BITS if packed else LOG2_3) if fmt.bits is None else fmt.bits
    scales = fmt.n_scales(rows, cols)
    zeros = scales * fmt.bits if fmt.zero_point and fmt.bits is not None else 0
    return rows * cols * per_weight + scales * fmt.scale_bits + zeros


@dataclass(frozen=True)
class ModelSize:
    """A model's weights in bits: ``bits`` counts ternary codes at log2(3), ``storage_bits`` at the 2-bit packing
    (equal for models without ternary layers); ``quantized_params`` weights are quantized, ``float_params``
    parameters stay at the float width."""

    bits: float
    storage_bits: float
    quantized_params: int
    float_params: int

    @property
    def megabytes(self) -> float:
        """``bits`` in MB (10^6 bytes)."""
        return self.bits / 8e6


def model_size(model: nn.Module, formats: Mapping[str, WeightFormat], float_bits: int = 16) -> ModelSize:
    """Size in bits of ``model``'s parameters when the weight of each layer named in ``formats`` is stored in its
    :class:`WeightFormat` (a 2-D ``weight``: rows = out features) and every other parameter in ``float_bits``.

    A Parameter shared between modules (tied embedding and head) counts once, quantized if any holder is."""
    quantized: dict[int, tuple[nn.Parameter, WeightFormat]] = {}
    for name, fmt in formats.items():
        w = model.get_submodule(name).weight
        if w.dim() != 2:
            raise ValueError(f"{name}.weight has shape {tuple(w.shape)}; a quantized weight must be a matrix")
        quantized[id(w)] = (w, fmt)
    bits = storage = 0.0
    n_quant = n_float = 0
    for p in model.parameters():  # each Parameter once
        if id(p) in quantized:
            rows, cols = p.shape
            fmt = quantized[id(p)][1]
            bits += matrix_bits(rows, cols, fmt)
            storage += matrix_bits(rows, cols, fmt, packed=True)
            n_quant += p.numel()
        else:
            bits += p.numel() * float_bits
            storage += p.numel() * float_bits
            n_float += p.numel()
    return ModelSize(bits=bits, storage_bits=storage, quantized_params=n_quant, float_params=n_float)


def quant_formats(model: nn.Module, quant: Mapping[str, Any] | None) -> dict[str, WeightFormat]:
    """The :class:`WeightFormat` of each layer a ``quant`` config quantizes (recipes ``bitlinear``, ``dqt`` and
    ``ptq``: a training run's or a bitflow-ptq checkpoint's), by the recipe's own layer plan; ``{}`` for ``None``
    / ``recipe: none``."""
    from bitflow.quant.recipes import recipe_from_config

    recipe = recipe_from_config(quant)
    if recipe is None:
        return {}
    opts = recipe.options
    if recipe.name == "bitlinear":
        fmt = WeightFormat(
            bits=opts.weight_bits,  # type: ignore[attr-defined]
            granularity=opts.granularity,  # type: ignore[attr-defined]
            group_size=opts.group_size if opts.granularity == "group" else None,  # type: ignore[attr-defined]
        )
    elif recipe.name == "ptq":  # a bitflow-ptq checkpoint: n-bit codes per channel or group
        fmt = WeightFormat(
            bits=opts.bits,  # type: ignore[attr-defined]
            granularity="channel" if opts.group_size is None else "group",  # type: ignore[attr-defined]
            group_size=opts.group_size,  # type: ignore[attr-defined]
            zero_point=not opts.symmetric,  # type: ignore[attr-defined]
        )
    else:  # dqt: n-bit or ternary codes with one scale per tensor
        fmt = WeightFormat(bits=getattr(opts, "bits", None))
    return dict.fromkeys(recipe.plan(model), fmt)


def ptq_formats(
    model: nn.Module,
    bits: int | None,
    group_size: int | None = None,
    symmetric: bool = True,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
) -> dict[str, WeightFormat]:
    """The :class:`WeightFormat` of each ``nn.Linear`` that post-training quantization (RTN, GPTQ) turns into
    ``bits``-bit codes (``None``: ternary) with one scale per output row, or per ``group_size`` columns, and an
    n-bit zero point per scale when not ``symmetric``. Layers: the include/exclude globs of training."""
    from bitflow.quant.select import select_layers

    fmt = WeightFormat(
        bits=bits,
        granularity="channel" if group_size is None else "group",
        group_size=group_size,
        zero_point=not symmetric and bits is not None,
    )
    return {name: fmt for name, _ in select_layers(model, nn.Linear, include, exclude, key="")}


def meta_model(model_config: Mapping[str, Any], vocab_size: int) -> nn.Module:
    """bitflow's Llama of this config on the meta device (shapes only, no memory)."""
    import torch

    from bitflow.models.llama import Llama, LlamaConfig

    with torch.device("meta"):
        return Llama(LlamaConfig.from_dict({**dict(model_config), "vocab_size": vocab_size}))


def config_size(model_config: Mapping[str, Any], vocab_size: int, quant: Mapping[str, Any] | None) -> ModelSize:
    """Size in bits of the model a run's config trains: its ``model`` shape and ``quant`` config."""
    model = meta_model(model_config, vocab_size)
    return model_size(model, quant_formats(model, quant))
