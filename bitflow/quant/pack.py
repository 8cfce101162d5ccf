"""Pack ternary weight codes ({-1, 0, 1}, e.g. from ``BitLinear.quantized_weight()``) into bytes for export.

Two layouts, both storing the digit ``d = code + 1`` in {0, 1, 2}:

* ``"2bit"``: 4 codes per byte, code ``i`` of a group in bits ``2i..2i+1``: ``byte = sum_i d_i 4^i`` (2 bits/weight);
* ``"base3"``: 5 codes per byte (3^5 = 243 <= 256), ``byte = sum_i d_i 3^i`` (1.6 bits/weight, close to the
  log2(3) = 1.58 bits that give "1.58-bit" its name).

The codes are flattened in row-major order and padded with zeros (digit 1) to a whole number of bytes; unpacking
needs the original shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "pack_ternary", "unpack_ternary"]

LAYOUTS = {"2bit": (4, 4), "base3": (5, 3)}  # layout -> (codes per byte, radix)


def _layout(layout: str) -> tuple[int, int]:
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout={layout!r} is not supported; allowed values: {', '.join(map(repr, LAYOUTS))}"
        )
    return LAYOUTS[layout]


def pack_ternary(codes: Tensor, layout: str = "base3") -> Tensor:
    """Pack a tensor of ternary codes into a 1-D uint8 tensor of ``ceil(numel / per_byte)`` bytes.

    Raises ``ValueError`` if a code is not -1, 0 or 1 (an export-time check: it reads the tensor on the host).
    """
    per_byte, radix = _layout(layout)
    flat = codes.detach().reshape(-1).to(torch.int16)
    bad = (flat < -1) | (flat > 1) | (codes.detach().reshape(-1) != flat.to(codes.dtype))
    if bool(bad.any()):
        raise ValueError(
            f"pack_ternary needs codes in {{-1, 0, 1}}, got e.g. {codes.reshape(-1)[bad][:4].tolist()}"
        )
    n_bytes = math.ceil(flat.numel() / per_byte)
    digits = torch.ones(n_bytes * per_byte, dtype=torch.int16, device=flat.device)  # padding: code 0
    digits[: flat.numel()] = flat + 1
    weights = radix ** torch.arange(per_byte, dtype=torch.int16, device=flat.device)
    return (digits.view(n_bytes, per_byte) * weights).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: Tensor, shape: tuple[int, ...] | torch.Size, layout: str = "base3") -> Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes of ``shape`` from the packed bytes."""
    per_byte, radix = _layout(layout)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / per_byte):
        raise ValueError(
            f"unpack_ternary needs a 1-D uint8 tensor of ceil({numel} / {per_byte}) bytes for shape {tuple(shape)}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if radix == 4:  # 2 bits a code: shifts and a mask, no integer division (the packed linear's hot path)
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
        digits = (packed.unsqueeze(1) >> shifts) & 3
    else:
        weights = radix ** torch.arange(per_byte, dtype=torch.int16, device=packed.device)
        digits = (packed.to(torch.int16).unsqueeze(1) // weights) % radix
    return (digits.reshape(-1)[:numel].to(torch.int8) - 1).reshape(shape)
