"""What every export format reads from a bitflow checkpoint: the decoder, its tokenizer and its ternary layers.

A ternary layer is a :class:`~bitflow.quant.BitLinear` at full weight strength with ternary weights
(``weight_bits=None``): its weight is exactly ``codes / s_w`` with codes in {-1, 0, 1} (:class:`TernaryWeight`).
Formats that store weights densely write ``codes / s_w``; formats that pack them write the codes and the scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from bitflow.models.llama import Llama
from bitflow.quant import functional as QF
from bitflow.quant.bitlinear import BitLinear

__all__ = ["ExportSource", "TernaryWeight", "load_source"]


@dataclass
class TernaryWeight:
    """A ternary weight: ``W = codes / scale`` (``scale`` = BitLinear's ``s_w``, shaped as
    :func:`bitflow.quant.functional.quantize_weight` shapes it for ``granularity``)."""

    codes: Tensor  # int8 in {-1, 0, 1}, the weight's shape [out, in]
    scale: Tensor  # float32 s_w: [] (tensor), [out, 1] (channel) or [out, in / group_size] (group)
    granularity: str
    group_size: int | None
    options: dict[str, Any]  # the BitLinear's options (activation quantization, input norm, ...)

    def dense(self) -> Tensor:
        """``codes / s_w`` in float32: exactly ``(1 / s_w) x {-1, 0, 1}``."""
        return QF.dequantize_weight(self.codes.float(), self.scale, self.granularity)

    def step(self) -> Tensor:
        """``1 / s_w`` per weight element, float32, the weight's shape (the value a code of 1 stands for)."""
        return QF.dequantize_weight(torch.ones_like(self.codes, dtype=torch.float32), self.scale, self.granularity)


@dataclass
class ExportSource:
    """A checkpoint read for export: the float32 decoder in eval mode, its tokenizer, the quant state."""

    decoder: Llama
    tokenizer: Tokenizer
    quant: dict[str, Any] | None
    path: Path | None = None

    @property
    def quant_kind(self) -> str | None:
        return self.quant.get("kind") if self.quant else None

    def ternary(self) -> dict[str, TernaryWeight]:
        """The ternary layers by qualified name (``layers.0.attn.wq``), or ValueError for a quantized model whose
        weights are not ternary values yet (n-bit weights, a weight strength below 1, another recipe)."""
        if not self.quant:
            return {}
        if self.quant_kind != "bitlinear":
            raise ValueError(
                f"the checkpoint is quantized by the {self.quant_kind!r} recipe; export reads bitlinear (BitNet) "
                "checkpoints only"
            )
        out = {}
        for name, m in self.decoder.named_modules():
            if not isinstance(m, BitLinear):
                continue
            if m.weight_bits is not None:
                raise ValueError(
                    f"layer {name} has {m.weight_bits}-bit weights (quant.weight_bits={m.weight_bits}); "
                    "only ternary weights (quant.weight_bits=null) export as ternary"
                )
            strength = float(m.weight_strength)
            if strength != 1.0:
                raise ValueError(
                    f"layer {name} is mid phase-in (weight strength {strength}): its weights are not ternary "
                    "values yet; export a checkpoint taken after the phase-in ends"
                )
            codes, scale = m.quantized_weight()
            out[name] = TernaryWeight(codes, scale.float(), m.granularity, m.group_size, m.options())
        return out

    def dense_weights(self) -> dict[str, Tensor]:
        """The decoder's state dict in float32 with every ternary weight replaced by ``codes / s_w``: the weights
        of a plain ``nn.Linear`` model that computes what the checkpoint computes without activation
        quantization."""
        sd = {k: v.detach().float().clone() for k, v in self.decoder.state_dict().items()}
        for name, tw in self.ternary().items():
            sd[f"{name}.weight"] = tw.dense()
        return sd


def load_source(ckpt: str | Path) -> ExportSource:
    """Read a bitflow checkpoint (``FileNotFoundError`` / ``ValueError`` for a missing or foreign file)."""
    from bitflow.lm import load_checkpoint

    lm = load_checkpoint(ckpt)
    if lm.tokenizer_json is None:
        raise ValueError(f"{ckpt} holds no tokenizer (checkpoint['bitflow']['tokenizer'] is empty)")
    decoder = lm.model.float().eval()
    return ExportSource(decoder, Tokenizer.from_str(lm.tokenizer_json), lm.quant_state, Path(ckpt))


def source_from_model(model: nn.Module, tokenizer: Tokenizer | str) -> ExportSource:
    """An :class:`ExportSource` of a model in memory (a LanguageModel or Llama) and its tokenizer."""
    from bitflow.models import model_root

    decoder = model_root(model)
    recipe = getattr(model, "quant_recipe", None)
    quant = recipe.state(decoder) if recipe is not None else None
    if quant is None and any(isinstance(m, BitLinear) for m in decoder.modules()):
        from bitflow.quant.recipes.bitlinear import BitLinearRecipe

        quant = BitLinearRecipe.from_config({}).state(decoder)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_str(tokenizer)
    return ExportSource(decoder.float().eval(), tok, quant)
