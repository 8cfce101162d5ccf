"""The n-bit weight grid of post-training quantization, and round-to-nearest (RTN) on it.

An affine (min-max) grid per output row or per group of ``group_size`` consecutive input columns, as in GPTQ's
reference code (Frantar et al., arXiv 2210.17323) and the GPTQ checkpoint formats built on it. With
``maxq = 2^b - 1`` unsigned codes per weight:

* asymmetric: ``x_min = min(min W, 0)``, ``x_max = max(max W, 0)``, ``scale = (x_max - x_min) / maxq``,
  ``zero = round(-x_min / scale)``;
* symmetric: ``a = max |W|``, ``scale = 2 a / maxq``, ``zero = (maxq + 1) / 2 = 2^(b-1)``;
* a row (group) that is all zeros gets ``x_min = -1, x_max = 1`` (any positive scale would do: its codes are
  ``zero`` and dequantize to exactly 0);
* ``code = clamp(round(W / scale) + zero, 0, maxq)``, ``W_q = scale (code - zero)``. Rounding is ties-to-even.

So the symmetric grid has ``2^b`` levels ``scale * {-2^(b-1), ..., 2^(b-1) - 1}`` (one more below zero than above, the
largest positive weight is clipped by half a step); the asymmetric grid always contains 0 exactly.

This is not BitLinear's n-bit grid (:func:`bitflow.quant.functional.quantize_weight`: signed codes, no zero point,
``max |W|`` mapped onto ``2^(b-1) - 1``), which trains through the straight-through estimator; PTQ uses the grid
that GPTQ checkpoints and kernels expect. Ternary PTQ is BitLinear's own quantizer (absmean/absmedian), not this.

Shapes: ``w`` is ``[out, in]``; scales and zeros are ``[out, n_groups]`` float32 with ``n_groups = in / group_size``
(1 for per-channel); codes are ``[out, in]`` integers in ``[0, maxq]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BITS", "Grid", "QuantizedWeight", "check_grid", "dequantize", "find_grid", "quantize_codes", "rtn"]

BITS = (2, 3, 4, 6, 8)  # the supported bit widths of rtn and gptq


def check_grid(bits: object, group_size: object, in_features: int | None = None) -> None:
    """Raise ``ValueError`` (message starting with the option's name) for bits outside :data:`BITS`, or a
    ``group_size`` that is not a positive int dividing ``in_features``."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not allowed; allowed: {', '.join(map(str, BITS))}")
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} is not allowed; allowed: null (per channel) or a positive int")
    if in_features is not None and in_features % group_size:
        raise ValueError(
            f"group_size={group_size} is not allowed: it does not divide the layer width in_features={in_features}; "
            "allowed: a divisor of every targeted layer's input width, or null (per channel)"
        )


@dataclass(frozen=True)
class Grid:
    """Scales and zero points of one weight matrix: ``[out, n_groups]`` float32 each."""

    bits: int
    group_size: int | None
    scales: Tensor
    zeros: Tensor

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def columns(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero)`` of columns ``start..stop-1``, ``[out, stop - start]`` each (a group's column)."""
        if self.group_size is None:
            n = stop - start
            return self.scales.expand(-1, n), self.zeros.expand(-1, n)
        idx = torch.arange(start, stop, device=self.scales.device) // self.group_size
        return self.scales[:, idx], self.zeros[:, idx]


@dataclass(frozen=True)
class QuantizedWeight:
    """The result of quantizing one weight: integer ``codes`` ``[out, in]`` (uint8), the ``grid``, and the
    dequantized weight ``weight = scale (codes - zero)`` (float32)."""

    codes: Tensor
    grid: Grid
    weight: Tensor


def find_grid(w: Tensor, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """``(scale, zero)`` of the rows of ``w`` (``[rows, cols]``, any float dtype): ``[rows, 1]`` float32 each.

    Formulas in the module docstring; group-wise grids call this on ``w[:, g*G:(g+1)*G]``.
    """
    maxq = 2**bits - 1
    wf = w.detach().float()
    zero_t = torch.zeros((), dtype=torch.float32, device=w.device)
    if symmetric:
        amax = wf.abs().amax(dim=1, keepdim=True)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    xmin = torch.minimum(wf.amin(dim=1, keepdim=True), zero_t)
    xmax = torch.maximum(wf.amax(dim=1, keepdim=True), zero_t)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def grid_of(w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> Grid:
    """The :class:`Grid` of a whole ``[out, in]`` weight: per row, or per group of ``group_size`` columns."""
    check_grid(bits, group_size, w.shape[1])
    if group_size is None:
        scale, zero = find_grid(w, bits, symmetric)
        return Grid(bits, None, scale, zero)
    out, n = w.shape
    scale, zero = find_grid(w.reshape(out * (n // group_size), group_size), bits, symmetric)
    return Grid(bits, group_size, scale.reshape(out, -1), zero.reshape(out, -1))


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` (float32 integers), broadcasting ``scale``/``zero``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize(codes: Tensor, grid: Grid) -> Tensor:
    """``scale (codes - zero)`` of a whole ``[out, in]`` code matrix (float32)."""
    scale, zero = grid.columns(0, codes.shape[1])
    return scale * (codes.float() - zero)


@torch.no_grad()
def rtn(w: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest: every weight onto the nearest level of its row's (group's) grid, independently."""
    grid = grid_of(w, bits, group_size, symmetric)
    scale, zero = grid.columns(0, w.shape[1])
    codes = quantize_codes(w, scale, zero, grid.maxq)
    return QuantizedWeight(codes.to(torch.uint8), grid, scale * (codes - zero))
