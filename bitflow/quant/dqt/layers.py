"""DQT layers (arXiv 2412.04787): int8 ``codes`` and a float32 ``scale`` per weight, no latent float copy.

See :mod:`bitflow.quant.dqt` for the method. The forward builds one float leaf tensor per weight and optimizer
step that collects the gradient; :class:`~bitflow.quant.dqt.DQTAdamW` reads it, writes new codes and drops it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import bitflow.quant.functional as QF
from bitflow.quant.bitlinear import BitLinear
from bitflow.quant.dqt.grid import dqt_qrange, init_codes, validate_layer_options

__all__ = ["DQTEmbedding", "DQTLinear", "DQTWeight"]


class _LeafSlot:
    """The float leaf of one DQT weight between forward and optimizer step (shared by tied modules)."""

    __slots__ = ("leaf", "sink")

    def __init__(self) -> None:
        self.leaf: Tensor | None = None
        self.sink: list[Tensor] | None = None  # the optimizer's "dqt" param group, where a new leaf is appended


class DQTWeight(nn.Module):
    """What DQT layers share (the base class of :class:`DQTLinear` and :class:`DQTEmbedding`): int8 ``codes``,
    the float32 ``scale`` (W = codes * scale) and the leaf logic."""

    codes: Tensor
    scale: Tensor

    def _setup_dqt(
        self,
        shape: tuple[int, int],
        bits: int | None,
        act_bits: int | None,
        act_qmax: float | None,
        scale_update: str,
        eps: float,
        device: torch.device | str | None,
    ) -> None:
        validate_layer_options(bits, act_bits, act_qmax, scale_update, eps)
        self.bits, self.act_bits, self.act_qmax = bits, act_bits, act_qmax
        self.scale_update, self.eps = scale_update, float(eps)
        self.qn, self.qp = dqt_qrange(bits)
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
        self._slot = _LeafSlot()
        self._float_dtype = torch.float32  # what .to(dtype)/.half()/.bfloat16() made the module's float tensors

    def options(self) -> dict[str, Any]:
        """The keyword options of this layer (they define the grid and the forward)."""
        return {
            "bits": self.bits, "act_bits": self.act_bits, "act_qmax": self.act_qmax,
            "scale_update": self.scale_update, "eps": self.eps,
        }

    def _share_with(self, owner: DQTWeight) -> None:
        """Tie this layer to ``owner`` (an nn.Embedding/nn.Linear pair that shared one weight): it reads
        ``owner``'s codes, scale and leaf and holds no buffers itself, so the state dict stores the weight once and
        ``.to(device)`` cannot untie it."""
        del self._buffers["codes"], self._buffers["scale"]
        self.__dict__["_dqt_owner"] = (owner,)  # a tuple: not registered as a submodule
        self._slot = owner._slot

    def __getattr__(self, name: str) -> Any:
        owner = self.__dict__.get("_dqt_owner")
        if owner is not None and name in ("codes", "scale"):
            return getattr(owner[0], name)
        return super().__getattr__(name)

    @property
    def weight(self) -> Tensor:
        """The weight as stored, ``codes * scale`` (a fresh float32 tensor without gradient, for inspection)."""
        return self.dequantized_weight()

    @torch.no_grad()
    def dequantized_weight(self) -> Tensor:
        """``codes * scale`` as a fresh float32 tensor."""
        return self.codes.float() * self.scale

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # .to(bfloat16)/.half() would round the scale; it stays float32 (codes are integers and are never cast)
        old = self._buffers.get("scale")
        probe = fn(torch.zeros((), dtype=self._float_dtype))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self._float_dtype = probe.dtype  # e.g. bfloat16 under Lightning's "bf16-true"
        out = super()._apply(fn, recurse)
        new = self._buffers.get("scale")
        if old is not None and new is not None and new.dtype != torch.float32:
            self._buffers["scale"] = old.to(device=new.device)
        self._slot.leaf = None  # a leaf on the old device/dtype is stale
        return out

    @torch.compiler.disable
    def _forward_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight for this forward: with grad enabled the step's float leaf (created once per optimizer step,
        reused by gradient-accumulation micro-batches and tied modules), else a plain dequantized tensor."""
        if not torch.is_grad_enabled():
            return (self.codes.float() * self.scale).to(dtype)
        slot = self._slot
        if slot.leaf is None:
            leaf = (self.codes.float() * self.scale).to(dtype).requires_grad_()
            slot.leaf = leaf
            if slot.sink is not None:
                slot.sink.append(leaf)
        return slot.leaf

    def release(self) -> None:
        """Drop the float leaf (and its gradient) without an optimizer step, e.g. after a gradient-only pass."""
        slot = self._slot
        if slot.leaf is not None and slot.sink is not None:
            slot.sink[:] = [t for t in slot.sink if t is not slot.leaf]
        slot.leaf = None


class _ActQuantSTE(torch.autograd.Function):
    """Per-token absmax fake quantization of activations (BitNet), identity backward (STE); output in ``dtype``."""

    @staticmethod
    def forward(ctx, x, bits, qmax, eps, dtype):  # type: ignore[override]
        ctx.in_dtype = x.dtype
        return QF.fake_quantize_activation(x, bits, qmax, eps).to(dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(ctx.in_dtype), None, None, None, None


def _leaf_dtype(device_type: str, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a DQT layer's weight leaf: bfloat16 under bf16 autocast (the matmul runs in bf16 anyway and
    its weight gradient is a bf16 result, so a bf16 leaf loses nothing but halves the per-step copy), float32 under
    fp16 autocast (``GradScaler.unscale_`` refuses fp16 gradients), else the module's float dtype (float32, or
    bfloat16 for a model cast to bf16)."""
    if torch.is_autocast_enabled(device_type):
        return torch.bfloat16 if torch.get_autocast_dtype(device_type) == torch.bfloat16 else torch.float32
    return float_dtype


class DQTLinear(DQTWeight):
    """A linear layer trained by DQT (arXiv 2412.04787): ``y = Q_a(x) (codes * scale)^T + bias``.

    ``Q_a`` is per-token absmax fake quantization with the STE (8 bits by default, ``act_bits=None`` disables it);
    the weight is used as stored, without STE. ``codes`` (int8, ``[out_features, in_features]``) and ``scale``
    (float32 0-dim) are persistent buffers; the bias, if any, is an ordinary float Parameter trained by AdamW.

    Args:
        bits: ``None`` = ternary ``{-1, 0, 1}``, or an int in [2, 8] for codes in ``[-2^(b-1), 2^(b-1)-1]``.
        act_bits / act_qmax: as in :class:`~bitflow.quant.BitLinear`.
        scale_update: ``"max"`` (the authors' ``s = Qp / max(W_prev)`` each step) or ``"fixed"``; see the module
            docstring.
        eps: floor of the weight statistic and of the activation absmax.

    A new layer has all-zero codes and scale 1; use :meth:`from_linear` (or :func:`to_dqt`) to start from weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int | None = None,
        act_bits: int | None = 8,
        act_qmax: float | None = None,
        scale_update: str = "max",
        eps: float = QF.DEFAULT_EPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup_dqt((out_features, in_features), bits, act_bits, act_qmax, scale_update, eps, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, init_scale: str = "absmean", **options: Any) -> DQTLinear:
        """A DQTLinear whose codes/scale are :func:`init_codes` of ``linear.weight``; it reuses ``linear.bias``
        (the same Parameter object). ``options`` are the keyword options of :class:`DQTLinear`."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, BitLinear):
            raise ValueError(f"DQTLinear.from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, device=w.device, **options)
        codes, scale = init_codes(w, layer.bits, init_scale, layer.eps)
        layer.codes.copy_(codes)
        layer.scale.copy_(scale)
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        dtype = _leaf_dtype(x.device.type, self._float_dtype)
        if self.act_bits is not None:
            x = _ActQuantSTE.apply(x, self.act_bits, self.act_qmax, self.eps, dtype if x.is_floating_point() else x.dtype)
        w = self._forward_weight(dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        bits = "ternary" if self.bits is None else f"{self.bits}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={bits}, act_bits={self.act_bits}, scale_update={self.scale_update!r}"
        )


class DQTEmbedding(DQTWeight):
    """A token embedding trained by DQT: ``codes[idx] * scale``, returned in the module's float dtype (float32
    unless the model was cast), as an nn.Embedding returns its weight's dtype.

    Options as :class:`DQTLinear` (``act_bits``/``act_qmax`` do not apply to a lookup and are kept only so that a
    tied head and embedding share one option set).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        bits: int | None = None,
        act_bits: int | None = 8,
        act_qmax: float | None = None,
        scale_update: str = "max",
        eps: float = QF.DEFAULT_EPS,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._setup_dqt((num_embeddings, embedding_dim), bits, act_bits, act_qmax, scale_update, eps, device)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, init_scale: str = "absmean", **options: Any) -> DQTEmbedding:
        """A DQTEmbedding initialised from ``emb.weight`` by :func:`init_codes`."""
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"DQTEmbedding.from_embedding needs an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise ValueError("DQTEmbedding supports neither max_norm, sparse nor scale_grad_by_freq embeddings")
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=emb.weight.device, **options)
        codes, scale = init_codes(emb.weight, layer.bits, init_scale, layer.eps)
        layer.codes.copy_(codes)
        layer.scale.copy_(scale)
        layer.train(emb.training)
        return layer

    def forward(self, idx: Tensor) -> Tensor:
        w = self._forward_weight(_leaf_dtype(idx.device.type, self._float_dtype))
        return F.embedding(idx, w, self.padding_idx).to(self._float_dtype)

    def extra_repr(self) -> str:
        bits = "ternary" if self.bits is None else f"{self.bits}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={bits}, scale_update={self.scale_update!r}"
