"""Building blocks shared by the encoder and the encoder-decoder: multi-head attention from ``nn.Linear``
projections (so quantization converts every projection), T5's relative position buckets, config plumbing.

``nn.MultiheadAttention`` is not used on purpose: it computes attention from its raw weight tensors and bypasses
``Linear.forward``, so a BitLinear swap would change nothing there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.llama import apply_rope

__all__ = ["Attention", "ConfigMixin", "attention_mask", "relative_position_bucket"]


class ConfigMixin:
    """``to_dict``/``from_dict`` and positive-integer checks for the model config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        d = {k: v for k, v in d.items() if k != "family"}  # the family key selects the class, it is no field
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def _choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"{type(self).__name__}.{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def attention_mask(
    key_padding: torch.Tensor | None, t_q: int, t_k: int, causal: bool = False, bias: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The ``attn_mask`` of ``F.scaled_dot_product_attention``: ``bias`` [1|B, H, Tq, Tk] (added to the scores),
    ``-inf`` where a key is padding (``key_padding`` [B, Tk], True = a real token) or in the future (``causal``).
    ``None`` when nothing is masked or added."""
    allowed = None
    if key_padding is not None:
        allowed = key_padding[:, None, None, :].bool()
    if causal:
        if device is None:
            device = bias.device if bias is not None else key_padding.device if key_padding is not None else None
        tri = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()
        allowed = tri if allowed is None else allowed & tri
    if bias is None:
        return allowed
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    """Multi-head attention with ``nn.Linear`` projections ``wq, wk, wv, wo``: self-attention (``kv=None``) or
    cross-attention (``kv`` = the encoder's output), optional rotary positions and an additive mask/bias."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq = nn.Linear(d_model, d_model, bias=bias)
        self.wk = nn.Linear(d_model, d_model, bias=bias)
        self.wv = nn.Linear(d_model, d_model, bias=bias)
        self.wo = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, Tq, d], kv [B, Tk, d] (default x), mask: :func:`attention_mask`, rope: (cos, sin) [T, head_dim]."""
        kv = x if kv is None else kv
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(kv)), self._heads(self.wv(kv))
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos[: q.shape[2]], sin[: q.shape[2]]).to(v.dtype)
            k = apply_rope(k, cos[: k.shape[2]], sin[: k.shape[2]]).to(v.dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of ``key position - query position`` (Raffel et al. 2020, arXiv 1910.10683): exact buckets for
    small distances, logarithmic ones up to ``max_distance``; a bidirectional encoder spends half the buckets on
    keys after the query, a causal decoder only looks back."""
    ret = torch.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)
