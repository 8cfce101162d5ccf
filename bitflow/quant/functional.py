"""Quantizer maths as pure tensor functions.

Every function here traces under ``torch.compile(fullgraph=True)`` without host syncs (no ``.item()``, no Python
branching on tensor values); Python branching on *options* (strings, ints), shapes and dtypes is fine. The one
exception is deliberate and eager-only: the strength blend used by BitLinear reads a strength that lives on the
CPU (free: no device to sync with) to skip work at strength 0 and 1; on accelerators and under ``torch.compile``
it stays a tensor operation.

Formulas (eps = 1e-5 unless given):

* Ternary weights, BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764) and its median variant (Nielsen et al.,
  arXiv 2411.05882): ``s_w = 1 / max(stat(|W|), eps)``, ``W_q = clamp(round(W s_w), -1, 1)``, with
  ``stat`` = mean (absmean) or median (absmedian) of ``|W|``.
* b-bit weights: ``Qp = 2^(b-1) - 1``, ``Qn = -2^(b-1)``, ``s_w = Qp / max(stat(|W|), eps)``,
  ``W_q = clamp(round(W s_w), Qn, Qp)`` (the statistic is mapped onto the largest positive code ``Qp``: with absmax
  nothing is clipped; with absmean, as in DQT's init (Zhao et al., arXiv 2412.04787), the tails are clipped).
* Activations, b-bit absmax per token (BitNet): ``s_x = Qp / max(max_features |x|, eps)``,
  ``x_q = clamp(round(x s_x), Qn, Qp)``; ``Qp`` may be overridden by ``qmax`` (the seed authors' code uses 128 for
  8 bits; BitNet's training tips use 127).
* Straight-through estimator with strength lambda (Nielsen et al., arXiv 2502.11895):
  ``q_lambda(x) = x + lambda * (Q(x) - x)`` where ``(Q(x) - x)`` carries no gradient, so ``d q_lambda / dx = 1``.

Codes are returned as floating point tensors holding integers (so that they trace and broadcast like any other
tensor); scales are float32 and shaped to broadcast as documented per granularity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "WEIGHT_STATS",
    "absmax",
    "absmean",
    "absmedian",
    "activation_qrange",
    "dequantize_weight",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "layer_norm",
    "quantize_activation",
    "quantize_weight",
    "rms_norm",
    "round_nearest",
    "ste",
    "ste_blend",
    "stochastic_round",
    "weight_qrange",
    "weight_scale",
    "weight_stat",
]

WEIGHT_STATS = ("absmean", "absmedian", "absmax")
GRANULARITIES = ("tensor", "channel", "group")
DEFAULT_EPS = 1e-5


# --------------------------------------------------------------------------------------------------------------
# validation helpers (pure Python, run on options and shapes only)
# --------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}"
        )


def _check_bits(name: str, bits: object, low: int, high: int, allow_none: bool) -> None:
    ok = (bits is None and allow_none) or (
        isinstance(bits, int) and not isinstance(bits, bool) and low <= bits <= high
    )
    if not ok:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name}={bits!r} is not supported; allowed values: {none}an int in [{low}, {high}]")


def _check_grouping(w: Tensor, granularity: str, group_size: int | None) -> None:
    _check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "tensor":
        return
    if w.dim() != 2:
        raise ValueError(
            f"granularity={granularity!r} needs a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}"
        )
    if granularity == "group":
        _check_group_size(group_size, w.shape[1])


def _check_group_size(group_size: object, in_features: int | None) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(
            f"group_size={group_size!r} is not allowed with granularity='group'; allowed: a positive int"
        )
    if in_features is not None and in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            "choose a group_size that divides the number of input features"
        )


# --------------------------------------------------------------------------------------------------------------
# weight statistics
# --------------------------------------------------------------------------------------------------------------


def _grouped_abs(w: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """``|w|`` viewed so that the statistic is a reduction over the last dim (keepdim)."""
    _check_grouping(w, granularity, group_size)
    a = w.abs()
    if granularity == "tensor":
        return a.reshape(1, -1)
    if granularity == "channel":
        return a
    return a.reshape(a.shape[0], a.shape[1] // group_size, group_size)


def _finish_stat(stat: Tensor, granularity: str) -> Tensor:
    # tensor -> 0-dim; channel -> [out, 1]; group -> [out, in // G]
    if granularity == "tensor":
        return stat.reshape(())
    if granularity == "group":
        return stat.squeeze(-1)
    return stat


def absmean(w: Tensor, granularity: str = "tensor", group_size: int | None = None) -> Tensor:
    """Mean of ``|w|`` (float32), BitNet b1.58's weight statistic (arXiv 2402.17764).

    Shapes: ``granularity="tensor"`` -> 0-dim; ``"channel"`` (per output row of a 2-D weight) -> ``[out, 1]``;
    ``"group"`` (per ``group_size`` consecutive input elements of a row) -> ``[out, in // group_size]``.
    """
    a = _grouped_abs(w, granularity, group_size)
    return _finish_stat(a.mean(dim=-1, keepdim=True, dtype=torch.float32), granularity)


def absmedian(w: Tensor, granularity: str = "tensor", group_size: int | None = None) -> Tensor:
    """Median of ``|w|`` (float32), the median variant of BitLinear (arXiv 2411.05882).

    For an even count this is the LOWER of the two middle values (``torch.median`` semantics), which is what the
    seed authors' code computes (``input.abs().median()`` in schneiderkamplab/bitlinear, ``measures.py``); for
    weight matrices of realistic size the difference to the average of the two middle values is negligible.
    Shapes as in :func:`absmean`.
    """
    a = _grouped_abs(w, granularity, group_size)
    return _finish_stat(_lower_median(a).float(), granularity)


@torch.library.custom_op("bitflow::lower_median", mutates_args=())
def _lower_median_numpy(a: Tensor) -> Tensor:
    """Lower median over the last dim (keepdim) of a CPU float tensor via numpy's introselect.

    A selection, not a sort, and no host sync: the tensor already lives in host memory and ``a.numpy()`` shares it.
    torch's CPU selections (``torch.median``, ``torch.kthvalue``) carry an index per element through the selection;
    ``torch.median`` was measured several times slower for weight-sized tensors; as a custom op (with a fake kernel) this stays one opaque call, without a graph
    break, inside ``torch.compile``-d graphs.
    """
    k = (a.shape[-1] - 1) // 2  # 0-based index of the lower middle value in sorted order
    part = np.partition(a.numpy(), k, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(part[..., k : k + 1]))


@_lower_median_numpy.register_fake
def _(a: Tensor) -> Tensor:
    return a.new_empty((*a.shape[:-1], 1))


def _lower_median(a: Tensor) -> Tensor:
    """``a.median(dim=-1, keepdim=True).values`` (the lower middle value for an even count) by selection.

    CPU float32/float64: numpy's introselect (:func:`_lower_median_numpy`); elsewhere (GPUs, bf16): the device's own
    selection, ``torch.kthvalue`` (a radix select on CUDA), which never sorts the row and never syncs with the host.
    Both return the same element as ``torch.median``.
    """
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and not a.requires_grad:
        return _lower_median_numpy(a)
    return a.kthvalue((a.shape[-1] + 1) // 2, dim=-1, keepdim=True).values


def absmax(w: Tensor, granularity: str = "tensor", group_size: int | None = None) -> Tensor:
    """Maximum of ``|w|`` (float32), the natural statistic for b-bit weights. Shapes as in :func:`absmean`."""
    a = _grouped_abs(w, granularity, group_size)
    return _finish_stat(a.amax(dim=-1, keepdim=True).float(), granularity)


_STAT_FNS = {"absmean": absmean, "absmedian": absmedian, "absmax": absmax}


def weight_stat(
    w: Tensor, stat: str = "absmean", granularity: str = "tensor", group_size: int | None = None
) -> Tensor:
    """Dispatch to :func:`absmean`, :func:`absmedian` or :func:`absmax` by name."""
    _check_choice("weight_scale", stat, WEIGHT_STATS)
    return _STAT_FNS[stat](w, granularity, group_size)


# --------------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------------


def weight_qrange(bits: int | None = None) -> tuple[int, int]:
    """``(Qn, Qp)`` of the weight grid: ternary ``(-1, 1)`` for ``bits=None``, else ``(-2^(b-1), 2^(b-1)-1)``."""
    _check_bits("weight_bits", bits, 2, 8, allow_none=True)
    if bits is None:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_scale(
    w: Tensor,
    stat: str = "absmean",
    granularity: str = "tensor",
    group_size: int | None = None,
    bits: int | None = None,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Weight scale ``s_w = Qp / max(stat(|W|), eps)`` (float32, no gradient).

    Ternary (``bits=None``): ``Qp = 1``, so ``s_w = 1 / max(mean|W|, eps)`` for absmean (arXiv 2402.17764).
    Shapes as in :func:`absmean`.
    """
    _, qp = weight_qrange(bits)
    return qp / weight_stat(w.detach(), stat, granularity, group_size).clamp_min(eps)


def _scale_for(w: Tensor, scale: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """``(w_view, scale_view)`` that broadcast elementwise; undo with ``.reshape(w.shape)``."""
    if granularity == "group":
        return w.reshape(scale.shape[0], scale.shape[1], -1), scale.unsqueeze(-1)
    return w, scale


def _weight_codes(
    w: Tensor, stat: str, granularity: str, group_size: int | None, bits: int | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, s_w, 1 / s_w)``; codes is a fresh float32 tensor in the grouped view of :func:`_scale_for`."""
    qn, qp = weight_qrange(bits)
    m = weight_stat(w.detach(), stat, granularity, group_size).clamp_min(eps)
    s = qp / m
    wv, sv = _scale_for(w.detach(), s, granularity)
    codes = wv.float() * sv  # a fresh float32 tensor, so the rest is done in place
    codes.round_().clamp_(qn, qp)
    return codes, s, m / qp


def quantize_weight(
    w: Tensor,
    stat: str = "absmean",
    granularity: str = "tensor",
    group_size: int | None = None,
    bits: int | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Integer weight codes and their scale: ``(clamp(round(W s_w), Qn, Qp), s_w)``.

    Codes are float32 tensors of ``w``'s shape holding integers in ``[Qn, Qp]`` (``{-1, 0, 1}`` when ternary);
    ``W ~= codes / s_w``. No gradient flows (use :func:`fake_quantize_weight` with :func:`ste_blend` to train).
    """
    codes, s, _ = _weight_codes(w, stat, granularity, group_size, bits, eps)
    return codes.reshape(w.shape), s


def dequantize_weight(codes: Tensor, scale: Tensor, granularity: str = "tensor") -> Tensor:
    """``codes / s_w`` (float32), broadcasting the scale as :func:`quantize_weight` shaped it."""
    _check_choice("granularity", granularity, GRANULARITIES)
    cv, sv = _scale_for(codes, scale, granularity)
    return (cv / sv).reshape(codes.shape)


def fake_quantize_weight(
    w: Tensor,
    stat: str = "absmean",
    granularity: str = "tensor",
    group_size: int | None = None,
    bits: int | None = None,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Dequantized weight ``clamp(round(W s_w), Qn, Qp) / s_w`` in ``w``'s dtype (computed in float32).

    ``1 / s_w = stat / Qp`` is applied as a product, so ternary values are exactly ``{-stat, 0, stat}``.
    """
    return _fake_quantize_weight(w, stat, granularity, group_size, bits, eps)


def _cpu_strength(strength: Tensor | None) -> float | None:
    """The strength as a Python float where reading it is free (a CPU tensor, eager mode), else None.

    ``None`` strength means full strength (1.0). On an accelerator, or while ``torch.compile`` traces, reading the
    value would be a device sync / graph break, so the blend then stays a tensor operation.
    """
    if strength is None:
        return 1.0
    if strength.device.type == "cpu" and not torch.compiler.is_compiling():
        return float(strength)
    return None


def _dequantize_blend(
    start: Tensor,
    codes: Tensor,
    inv: Tensor,
    strength: Tensor | None,
    value: float | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``start + strength (codes * inv - start)`` as ``out_dtype`` and ``start``'s shape (``codes`` may be a grouped
    view); ``value`` is :func:`_cpu_strength`'s read-out. ``codes`` is consumed (overwritten).

    ``torch.lerp`` is exact at both ends (``start`` at 0, ``end`` at 1), so the shortcut at 1 changes no bit.
    """
    # (eager: an in-place float32 product, then the cast, measured faster than one mixed-dtype mul(out=bf16) on CPU)
    q = codes.mul_(inv).reshape(start.shape)
    if value == 1.0:
        return q.to(out_dtype)
    start = start.detach().to(q.dtype)
    weight = value if value is not None else strength.to(q.dtype)
    return torch.lerp(start, q, weight).to(out_dtype)


def _fake_quantize_weight(
    w: Tensor,
    stat: str,
    granularity: str,
    group_size: int | None,
    bits: int | None,
    eps: float,
    strength: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``w + strength (Q_w(w) - w)`` as ``out_dtype`` (default ``w.dtype``), computed in float32, no autograd."""
    out_dtype = out_dtype or w.dtype
    value = _cpu_strength(strength)
    if value == 0.0:  # exactly w (what lerp gives at 0), without quantizing
        return w.detach().to(out_dtype)
    codes, _, inv = _weight_codes(w, stat, granularity, group_size, bits, eps)
    _, iv = _scale_for(codes, inv, granularity)
    return _dequantize_blend(w, codes, iv, strength, value, out_dtype)


# --------------------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------------------


def activation_qrange(bits: int = 8, qmax: float | None = None) -> tuple[int, int, float]:
    """``(Qn, Qp, qmax)`` for b-bit activations: the clamp range and the number max|x| is mapped to.

    ``qmax`` defaults to ``Qp = 2^(b-1) - 1`` (127 for 8 bits); it must lie in ``(0, 2^(b-1)]`` (128 reproduces the
    seed authors' code, whose largest value is then clamped to 127).
    """
    _check_bits("act_bits", bits, 2, 16, allow_none=False)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if qmax is None:
        return qn, qp, float(qp)
    if isinstance(qmax, bool) or not isinstance(qmax, (int, float)) or not 0 < qmax <= 2 ** (bits - 1):
        raise ValueError(
            f"act_qmax={qmax!r} is not supported for act_bits={bits}; allowed: None (= {qp}) or a number in "
            f"(0, {2 ** (bits - 1)}]"
        )
    return qn, qp, float(qmax)


def _activation_codes(xf: Tensor, bits: int, qmax: float | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, s_x, 1 / s_x)`` of a float32 ``xf``; codes is a fresh float32 tensor."""
    qn, qp, qm = activation_qrange(bits, qmax)
    # max|x| = max(max x, -min x): two reads, no |x| temporary (torch.linalg.vector_norm(inf) is far slower on
    # CPU); xf is float32 because float32 reductions are several times faster than bf16 ones on CPU
    amax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_()).clamp_min_(eps)
    s = qm / amax
    codes = xf * s
    codes.round_()
    if qm > qp:  # |x s| <= qm, so only a qmax above Qp (the seed authors' 128) can leave the grid
        codes.clamp_(qn, qp)
    return codes, s, amax / qm


def quantize_activation(
    x: Tensor, bits: int = 8, qmax: float | None = None, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor]:
    """Per-token absmax quantization (BitNet, arXiv 2310.11453 / 2402.17764): ``(x_q, s_x)``.

    ``s_x = qmax / max(max_features |x|, eps)`` with shape ``[..., 1]`` (float32) and
    ``x_q = clamp(round(x s_x), Qn, Qp)`` (float32 integers) over the last dim of ``x``.
    """
    codes, s, _ = _activation_codes(x.detach().float(), bits, qmax, eps)
    return codes, s


def fake_quantize_activation(
    x: Tensor, bits: int = 8, qmax: float | None = None, eps: float = DEFAULT_EPS
) -> Tensor:
    """Dequantized activation ``x_q / s_x`` in ``x``'s dtype (computed in float32 as ``x_q * max|x| / qmax``)."""
    return _fake_quantize_activation(x, bits, qmax, eps)


def _fake_quantize_activation(
    x: Tensor,
    bits: int,
    qmax: float | None,
    eps: float,
    strength: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``x + strength (Q_a(x) - x)`` as ``out_dtype`` (default ``x.dtype``), computed in float32, no autograd."""
    out_dtype = out_dtype or x.dtype
    value = _cpu_strength(strength)
    if value == 0.0:  # exactly x (what lerp gives at 0), without quantizing
        return x.detach().to(out_dtype)
    xf = x.detach().float()
    codes, _, inv = _activation_codes(xf, bits, qmax, eps)
    return _dequantize_blend(xf, codes, inv, strength, value, out_dtype)


# --------------------------------------------------------------------------------------------------------------
# straight-through estimator, rounding, norms
# --------------------------------------------------------------------------------------------------------------


def ste(x: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator: forward value ``q``, gradient of the identity wrt ``x`` (``x + (q - x).detach()``)."""
    return x + (q - x).detach()


def ste_blend(x: Tensor, q: Tensor, strength: Tensor | float) -> Tensor:
    """Strength-lambda blend with STE (arXiv 2502.11895): ``x + lambda * (q - x).detach()``.

    ``lambda = 0`` returns ``x`` exactly (``0 * finite = 0``), ``lambda = 1`` returns ``q`` (up to float rounding);
    the gradient wrt ``x`` is the identity for every lambda.
    """
    return x + strength * (q - x).detach()


def round_nearest(x: Tensor) -> Tensor:
    """Deterministic round to nearest, ties to even (``torch.round``; e.g. 0.5 -> 0, 1.5 -> 2, -2.5 -> -2)."""
    return torch.round(x)


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased stochastic rounding (DQT, arXiv 2412.04787): ``floor(x) + (U < x - floor(x))``, ``U ~ U[0, 1)``.

    ``E[stochastic_round(x)] = x``; integers are left unchanged. Pass a seeded ``generator`` for reproducibility.
    """
    fl = torch.floor(x)
    # draw U in at least float32 so that the comparison keeps 24 bits of resolution for bf16/fp16 inputs
    udtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=udtype)
    return fl + (u < (x - fl).to(udtype)).to(x.dtype)


def layer_norm(x: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Parameter-free LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps)`` (biased variance)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def rms_norm(x: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Parameter-free RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps)``."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)
