"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv 2210.17323): one linear layer at a time, quantize the weight column by column and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

For a layer ``y = x W^T`` with calibration inputs ``X`` (``n`` rows = tokens, ``in`` columns):

* ``H = 2 X^T X / n`` (accumulated in float64 by :class:`HessianAccumulator`);
* dead inputs (``H_ii = 0``: the feature is always 0) get ``H_ii = 1`` and ``W[:, i] = 0``;
* dampening: ``H += lambda I`` with ``lambda = percdamp * mean(diag H)``. If ``H`` is still not positive definite
  (Cholesky fails), ``percdamp`` is multiplied by 10 and the factorisation retried (logged), up to
  :data:`MAX_RETRIES` times; a layer whose Hessian stays singular falls back to round-to-nearest (logged), so no
  NaN ever reaches a weight;
* ``U`` = upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
* for each column ``i``: ``q = quant(W[:, i])``, ``err = (W[:, i] - q) / U_ii``, ``W[:, i+1:] -= err U[i, i+1:]``.
  Lazy batches: the update runs inside a block of ``block_size`` columns; the columns after the block get the
  block's errors at once (``W[:, i2:] -= Err U[i1:i2, i2:]``): the same result in exact arithmetic (except for
  dynamic groups, below), fewer memory passes;
* groups (``group_size``): a new scale/zero every ``group_size`` columns, computed when the group's first column
  is reached, from the weights as they stood at the start of the current lazy block (with the error feedback of
  every earlier block, not yet that of the earlier columns of the same block). This is the reference
  implementation's semantics (IST-DASLab/gptq, and gptqmodel's); it makes the result depend on ``block_size``
  when ``group_size < block_size``. On correlated inputs it is slightly better at 2 bits and slightly worse at 4
  bits than a grid from the fully updated weights (measured: ~0.65x vs ~0.74x RTN's error at 2 bits, ~0.53x vs
  ~0.52x at 4 bits, group 32); bitflow keeps the reference semantics so its checkpoints match gptqmodel's;
* act-order (``act_order=True``): columns are processed in order of decreasing ``H_ii`` (the most active inputs
  first), and the order undone at the end. With groups, act-order uses *static groups*: every group's scale/zero
  is computed up front from the original weights, and each column keeps the group of its original position
  (``column // group_size``), so the stored layout is the same as without act-order (no group index needed).

The grid itself (scales, zero points, codes) is :mod:`bitflow.quant.ptq.rtn`'s: GPTQ with ``H = I`` is RTN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from bitflow.quant.ptq.rtn import Grid, QuantizedWeight, check_grid, find_grid, grid_of, quantize_codes, rtn

__all__ = ["MAX_RETRIES", "GPTQInfo", "HessianAccumulator", "gptq"]

log = logging.getLogger("bitflow.ptq")

MAX_RETRIES = 6  # dampening percdamp, 10 percdamp, ..., 10^6 percdamp; then round-to-nearest


class HessianAccumulator:
    """``H = 2 X^T X / n`` of a layer's inputs, summed over batches in float64.

    ``add(x)`` takes any ``[..., in_features]`` tensor (each row a token). Batches are multiplied in float32 (fast)
    and summed in float64; the result does not depend on how the rows are batched beyond float rounding.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` (``[..., in_features]``)."""
        self.add_gram(gram(x), x.numel() // self.in_features)

    def add_gram(self, g: Tensor, rows: int) -> None:
        """Add a precomputed ``X^T X`` of ``rows`` rows (layers that read the same input share it)."""
        self.sum += g.to(torch.float64)
        self.rows += rows

    def hessian(self) -> Tensor:
        """``2 X^T X / n`` (float64). Raises ``ValueError`` before any row was added."""
        if self.rows == 0:
            raise ValueError("no calibration rows were added: the layer never ran on the calibration data")
        return 2.0 * self.sum / self.rows


def gram(x: Tensor) -> Tensor:
    """``X^T X`` (float32) of the rows of ``x`` (``[..., in]``)."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    return x2.T @ x2


@dataclass(frozen=True)
class GPTQInfo:
    """What happened while quantizing one layer: the dampening used (``percdamp`` after retries and the absolute
    ``damp`` added to the diagonal), how many retries, how many dead input columns, and whether the layer fell back
    to round-to-nearest (a Hessian that stayed singular)."""

    percdamp: float
    damp: float
    retries: int
    dead: int
    fallback_rtn: bool = False


def _inverse_cholesky(h: Tensor, percdamp: float, name: str) -> tuple[Tensor | None, float, float, int]:
    """``(U, percdamp, damp, retries)``: ``U`` upper Cholesky factor of ``(H + damp I)^-1`` (float64), raising
    the dampening tenfold while the factorisation fails; ``U`` is None when it never succeeds."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for retry in range(MAX_RETRIES + 1):
        damp = percdamp * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, percdamp, damp, retry
        if retry < MAX_RETRIES:
            log.warning(
                "GPTQ %s: the Hessian is not positive definite with percdamp=%g; retrying with percdamp=%g",
                name or "layer", percdamp, percdamp * 10,
            )
            percdamp *= 10
    return None, percdamp, damp, MAX_RETRIES


@torch.no_grad()
def gptq(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    name: str = "",
) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ of one weight ``w`` (``[out, in]``) given the Hessian ``H = 2 X^T X / n`` (``[in, in]``).

    Returns the :class:`~bitflow.quant.ptq.rtn.QuantizedWeight` (codes, grid, dequantized weight, in the original
    column order) and a :class:`GPTQInfo`. ``hessian`` is not modified. The column loop runs in float32, the
    Hessian's factorisation in float64. ``name`` labels log messages. Algorithm in the module docstring.
    """
    check_grid(bits, group_size, w.shape[1])
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"the Hessian of {name or 'the layer'} is {tuple(hessian.shape)}, expected {w.shape[1]}^2")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"the Hessian of {name or 'the layer'} has NaN/inf entries: the calibration inputs are not finite")
    h = hessian.detach().to(torch.float64).clone()
    W = w.detach().float().clone()
    n = W.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_dead = int(dead.sum())

    # act-order: the most active inputs (largest H_ii) first; H, W and so U in that order
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=W.device)
    u, percdamp_used, damp, retries = _inverse_cholesky(h[perm][:, perm] if act_order else h, percdamp, name)
    if u is None:
        log.warning("GPTQ %s: the Hessian stayed singular after %d retries; round-to-nearest instead", name, retries)
        return rtn(W, bits, group_size, symmetric), GPTQInfo(percdamp_used, damp, retries, n_dead, True)

    static = group_size is None or act_order  # grid fixed up front (per channel, or static groups)
    grid = grid_of(W, bits, group_size, symmetric) if static else None
    scales = grid.scales.clone() if grid else torch.zeros(W.shape[0], n // group_size, device=W.device)
    zeros = grid.zeros.clone() if grid else torch.zeros_like(scales)
    W = W[:, perm]
    u = u.float()
    maxq = 2**bits - 1
    col_group = ((perm // group_size) if group_size is not None else torch.zeros_like(perm)).tolist()
    codes = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % group_size == 0:  # a group starts: its grid from W as of this block's start
                s, z = find_grid(W[:, j : j + group_size], bits, symmetric)
                scales[:, j // group_size], zeros[:, j // group_size] = s[:, 0], z[:, 0]
            g = col_group[j]
            s, z = scales[:, g], zeros[:, g]
            col = w1[:, i]
            c = quantize_codes(col, s, z, maxq)
            q = s * (c - z)
            codes[:, j] = c
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    grid = Grid(bits, group_size, scales, zeros)
    s_full, z_full = grid.columns(0, n)
    weight = s_full * (codes - z_full)
    if not bool(torch.isfinite(weight).all()):  # cannot happen with a finite U; never let a NaN through
        log.warning("GPTQ %s: non-finite result; round-to-nearest instead", name)
        return rtn(w.detach().float(), bits, group_size, symmetric), GPTQInfo(percdamp_used, damp, retries, n_dead, True)
    return QuantizedWeight(codes.to(torch.uint8), grid, weight), GPTQInfo(percdamp_used, damp, retries, n_dead)
