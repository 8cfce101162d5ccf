"""PackedTernaryLinear: a BitLinear for inference that holds its weight as 2-bit codes plus the scale.

The ternary codes of a full-strength :class:`~bitflow.quant.BitLinear` are packed four to a byte
(:func:`bitflow.quant.pack.pack_ternary`, layout ``2bit``): 2 bits per weight, 8x less memory than a bf16 weight
(the scale and the bias are a few bytes more). Each forward unpacks the codes into the compute dtype and computes
what BitLinear computes at strength 1 (the same input norm and per-token activation quantization), so logits
agree with the fake-quantized model up to float rounding (``codes / s_w`` here, ``codes * stat`` there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bitflow.quant.functional as QF
from bitflow.quant.bitlinear import BitLinear
from bitflow.quant.pack import pack_ternary, unpack_ternary

__all__ = ["PackedTernaryLinear", "pack_model"]


class PackedTernaryLinear(nn.Module):
    """Inference-only ternary linear layer: ``packed`` (uint8, 4 codes a byte), ``scale`` (s_w), ``bias``."""

    def __init__(self, layer: BitLinear) -> None:
        super().__init__()
        if layer.weight_bits is not None:
            raise ValueError(f"PackedTernaryLinear holds ternary weights, got weight_bits={layer.weight_bits}")
        strengths = (float(layer.weight_strength), float(layer.act_strength))
        if strengths != (1.0, 1.0):
            raise ValueError(f"PackedTernaryLinear computes a BitLinear at full strength, got {strengths}")
        codes, scale = layer.quantized_weight()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.granularity = layer.granularity
        self.act_bits, self.act_qmax, self.input_norm, self.eps = (
            layer.act_bits, layer.act_qmax, layer.input_norm, layer.eps,
        )
        self.dtype = layer.weight.dtype
        self.register_buffer("packed", pack_ternary(codes, "2bit"))
        self.register_buffer("scale", scale.float())
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)

    def _apply(self, fn, recurse=True):  # .to(bfloat16) casts the bias, never the scale: s_w stays float32
        scale = self._buffers["scale"]
        out = super()._apply(fn, recurse)
        self._buffers["scale"] = scale.to(device=self._buffers["scale"].device)
        return out

    def weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight ``codes / s_w`` [out, in] in ``dtype`` (default: the original weight's)."""
        codes = unpack_ternary(self.packed, (self.out_features, self.in_features), "2bit")
        return QF.dequantize_weight(codes.float(), self.scale, self.granularity).to(dtype or self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm == "layernorm":
            x = QF.layer_norm(x, self.eps)
        elif self.input_norm == "rmsnorm":
            x = QF.rms_norm(x, self.eps)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self.act_bits is not None:
            x = QF.fake_quantize_activation(x, self.act_bits, self.act_qmax, self.eps).to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), self.weight(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2bit"


def pack_model(model: nn.Module) -> list[str]:
    """Replace every full-strength ternary BitLinear in ``model`` by a :class:`PackedTernaryLinear` (in place; the
    latent float weights are dropped). Returns the replaced layers' names; ValueError if there is none."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no BitLinear layer to pack (is the checkpoint ternary?)")
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, PackedTernaryLinear(layer))
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
    return [name for name, _ in targets]
