"""DQT's weight grid (arXiv 2412.04787): the code range, option checks and the initial quantization."""

from __future__ import annotations

import torch
from torch import Tensor

import bitflow.quant.functional as QF

__all__ = ["INIT_SCALES", "MOMENT_DTYPES", "SCALE_UPDATES", "dqt_qrange", "init_codes", "validate_layer_options"]

SCALE_UPDATES = ("max", "fixed")
INIT_SCALES = ("absmean", "absmax")
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dqt_qrange(bits: int | None) -> tuple[int, int]:
    """``(Qn, Qp)`` of DQT's weight grid (arXiv 2412.04787): ternary ``(-1, 1)`` for ``bits=None``, else
    ``(-2^(b-1), 2^(b-1) - 1)`` for an int ``b`` in [2, 8] (codes are stored in int8)."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not supported; allowed: null (ternary) or an int in [2, 8]")
    return QF.weight_qrange(bits)



def validate_layer_options(
    bits: int | None, act_bits: int | None, act_qmax: float | None, scale_update: str, eps: float
) -> None:
    """Check a DQT layer's options; raises ``ValueError`` whose message starts with the option's name."""
    dqt_qrange(bits)
    if act_bits is not None:
        QF.activation_qrange(act_bits, act_qmax)
    elif act_qmax is not None:
        raise ValueError(f"act_qmax={act_qmax!r} needs activation quantization, but act_bits=None")
    QF._check_choice("scale_update", scale_update, SCALE_UPDATES)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} is not supported; allowed: a positive float (default 1e-5)")



@torch.no_grad()
def init_codes(w: Tensor, bits: int | None = None, stat: str = "absmean", eps: float = QF.DEFAULT_EPS) -> tuple[
    Tensor, Tensor
]:
    """DQT's initial quantization (arXiv 2412.04787): ``codes = clamp(round(W s), Qn, Qp)``, ``s = Qp / stat|W|``.

    Returns ``(codes, scale)``: int8 codes of ``w``'s shape and the float32 0-dim dequantization step
    ``scale = max(stat|W|, eps) / Qp`` (= ``1 / s``), so the initial weight is ``codes * scale``. ``stat`` is
    ``"absmean"`` (the paper; with b bits the tails beyond mean|W| are clipped onto ``Qn``/``Qp``) or ``"absmax"``
    (nothing clipped). Rounding to nearest is ties-to-even.
    """
    qn, qp = dqt_qrange(bits)
    QF._check_choice("init_scale", stat, INIT_SCALES)
    m = QF.weight_stat(w.detach(), stat).clamp_min(eps)
    codes = (w.detach().float() * (qp / m)).round_().clamp_(qn, qp)
    return codes.to(torch.int8), (m / qp).to(torch.float32)

