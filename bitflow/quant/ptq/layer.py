"""PTQLinear: an ``nn.Linear`` whose weight lies on an n-bit grid after post-training quantization (RTN or GPTQ).

The ``weight`` Parameter holds the dequantized weight, ``scales * (codes - zeros)`` of its group, exactly (computed
in float32), so the forward pass is the plain ``nn.Linear`` product and every reader of a bitflow checkpoint
(evaluation, perplexity, bitflow-report) sees an ordinary model. The grid travels with it as buffers, for export
and inspection (GPTQ checkpoint layout, :mod:`bitflow.quant.ptq.rtn`)::

    codes   uint8    [out, in]        in [0, 2^bits - 1]
    scales  float32  [out, n_groups]  n_groups = in / group_size (1: per output channel)
    zeros   float32  [out, n_groups]  integer zero points in [0, 2^bits - 1]

The weight does not train (``requires_grad=False``): a gradient step would move it off the grid its codes record.
"""

from __future__ import annotations

import torch
from torch import nn

from bitflow.quant.ptq.rtn import Grid, QuantizedWeight, check_grid, dequantize

__all__ = ["PTQLinear"]


class PTQLinear(nn.Linear):
    """``nn.Linear`` with a weight on a ``bits``-bit grid (per channel, or per ``group_size`` input columns)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_grid(bits, group_size, in_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size if group_size else 1
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.weight.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, q: QuantizedWeight) -> PTQLinear:
        """A PTQLinear holding ``q`` in place of ``linear``: the very same weight Parameter (its values set to the
        dequantized weight) and bias Parameter."""
        if tuple(q.codes.shape) != tuple(linear.weight.shape):
            raise ValueError(f"codes of shape {tuple(q.codes.shape)} for a weight of shape {tuple(linear.weight.shape)}")
        w = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, q.grid.bits,
                        q.grid.group_size)
        layer.codes = q.codes.to(device=w.device, dtype=torch.uint8)
        layer.scales = q.grid.scales.to(device=w.device, dtype=torch.float32).contiguous()
        layer.zeros = q.grid.zeros.to(device=w.device, dtype=torch.float32).contiguous()
        with torch.no_grad():
            w.copy_(q.weight.to(w.dtype))
        w.requires_grad_(False)
        layer.weight = w
        layer.bias = linear.bias
        return layer

    @classmethod
    def empty_like(cls, linear: nn.Linear, bits: int, group_size: int | None) -> PTQLinear:
        """A PTQLinear of ``linear``'s shape with zero codes, reusing its Parameters: what a checkpoint's state dict
        then fills (:meth:`bitflow.quant.recipes.ptq.PTQRecipe.restore`)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                    device=linear.weight.device)
        linear.weight.requires_grad_(False)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def grid(self) -> Grid:
        """The layer's grid (scales and zero points)."""
        return Grid(self.bits, self.group_size, self.scales, self.zeros)

    def dequantized(self) -> torch.Tensor:
        """``scales * (codes - zeros)`` (float32): equal to ``weight`` (as float32) for a consistent layer."""
        return dequantize(self.codes, self.grid())

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per channel"
        return f"{super().extra_repr()}, bits={self.bits}, {group}"
