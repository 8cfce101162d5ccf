"""Direct Quantized Training (DQT): weights live only on a low-bit grid, updates are rounded back stochastically.

Zhao et al., "Direct Quantized Training of Language Models with Stochastic Rounding" (arXiv 2412.04787). BitNet-style
training (:class:`~bitflow.quant.BitLinear`) keeps a full-precision latent weight for the straight-through estimator;
DQT keeps none. With ``b`` bits, ``Qp = 2^(b-1) - 1`` and ``Qn = -2^(b-1)`` (ternary: ``Qp = 1, Qn = -1``):

* init: ``W <- clamp(round(W s), Qn, Qp) / s`` with ``s = Qp / mean|W|``;
* forward: the stored weight as it is (no STE for weights); activations 8-bit absmax per token with the STE;
* step: ``W' = W - lr * update`` with AdamW's update computed on the stored ``W``, then
  ``x = clip(W' s, Qn, Qp)`` and ``W <- SR(x) / s``, where ``SR(x)`` is ``ceil(x)`` with probability
  ``x - floor(x)``, else ``floor(x)`` (unbiased: ``E[SR(x)] = x``).

Storage: a targeted layer holds ``codes`` (int8 buffer, values in ``[Qn, Qp]``) and ``scale`` (float32 0-dim buffer,
the dequantization step ``1 / s``), so ``W = codes * scale`` exactly. No float copy of ``W`` outlives a step: the
forward builds one float leaf tensor per layer (in the autocast dtype under bf16 autocast, else float32) that
collects the gradient; :class:`DQTAdamW` reads its ``.grad``, writes new codes and drops it.

Scale: the paper's init uses ``s = Qp / mean|W|``; for the steps its authors' code takes ``s = Qp / max(W_prev)``
(the largest signed pre-update weight). On the grid that is ``scale' = scale * max(codes) / Qp``: unchanged while
some code sits at ``Qp`` (the usual case, since the absmean init clips the tails onto ``Qp``), finer otherwise.
``scale_update="max"`` (default) does this; ``"fixed"`` keeps the init scale. A fresh ``s = Qp / mean|W|`` every
step is not offered: on a ternary grid ``mean|W| = (share of non-zero codes) * scale``, so it would shrink the grid
every step.

The optimizer (:class:`DQTAdamW`) is ``torch.optim.AdamW`` for every ordinary Parameter plus the DQT step above for
the DQT layers. Its ``"dqt"`` param group holds the current float leaves from forward to step, so whatever treats
an optimizer's param groups (Lightning's gradient clipping, ``GradScaler.unscale_``, ``zero_grad``) treats the DQT
gradients too: with ``gradient_clip_val`` the global norm covers DQT and ordinary gradients alike, as it does for
BitNet's latent weights. The AdamW moments of a DQT layer (``exp_avg``, ``exp_avg_sq``) are float32 by default or,
with ``moment_dtype="bfloat16"``, bfloat16 written with stochastic rounding; the rounding noise comes from a seeded
``torch.Generator`` whose state is part of the optimizer's ``state_dict`` (so a resumed run continues exactly).

Norm gains stay in full precision (they are ``d``-sized vectors: nothing to save, and a ternary gain would switch
channels off). The LM head is a Linear (opt in with ``exclude=[]``); token embeddings opt in with
``embeddings=True``; a weight tied between the two must be converted on both sides or neither.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bitflow.quant import functional as QF
from bitflow.quant.bitlinear import BitLinear
from bitflow.quant.convert import _first_names, _patterns, _replace_modules, match_name

__all__ = [
    "INIT_SCALES",
    "MOMENT_DTYPES",
    "SCALE_UPDATES",
    "DQTAdamW",
    "DQTEmbedding",
    "DQTLinear",
    "build_adamw",
    "dqt_modules",
    "dqt_qrange",
    "dqt_state",
    "dqt_targets",
    "init_codes",
    "stochastic_round_bf16",
    "to_dqt",
]

SCALE_UPDATES = ("max", "fixed")
INIT_SCALES = ("absmean", "absmax")
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# grid and options
# --------------------------------------------------------------------------------------------------------------


def dqt_qrange(bits: int | None) -> tuple[int, int]:
    """``(Qn, Qp)`` of DQT's weight grid (arXiv 2412.04787): ternary ``(-1, 1)`` for ``bits=None``, else
    ``(-2^(b-1), 2^(b-1) - 1)`` for an int ``b`` in [2, 8] (codes are stored in int8)."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not supported; allowed: null (ternary) or an int in [2, 8]")
    return QF.weight_qrange(bits)


def _validate(
    bits: int | None, act_bits: int | None, act_qmax: float | None, scale_update: str, eps: float
) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------


class _LeafSlot:
    """The float leaf of one DQT weight between forward and optimizer step (shared by tied modules)."""

    __slots__ = ("leaf", "sink")

    def __init__(self) -> None:
        self.leaf: Tensor | None = None
        self.sink: list[Tensor] | None = None  # the optimizer's "dqt" param group, where a new leaf is appended


class _DQTWeight(nn.Module):
    """What DQT layers share: int8 ``codes``, the float32 ``scale`` (W = codes * scale) and the leaf logic."""

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
        _validate(bits, act_bits, act_qmax, scale_update, eps)
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

    def _share_with(self, owner: _DQTWeight) -> None:
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


class DQTLinear(_DQTWeight):
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


class DQTEmbedding(_DQTWeight):
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


# --------------------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------------------


def dqt_modules(model: nn.Module) -> list[tuple[str, _DQTWeight]]:
    """``(first qualified name, module)`` of every DQT layer of ``model`` (each module once, in module order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _DQTWeight)]


def _unique_weights(model: nn.Module) -> list[tuple[str, _DQTWeight]]:
    """One entry per stored DQT weight: tied modules share codes, the first name stands for them."""
    seen: set[int] = set()
    out = []
    for name, m in dqt_modules(model):
        if id(m.codes) not in seen:
            seen.add(id(m.codes))
            out.append((name, m))
    return out


def dqt_targets(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    embeddings: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs :func:`to_dqt` would convert, validated, without changing anything.

    Candidates are the plain ``nn.Linear`` layers (and ``nn.Embedding`` ones with ``embeddings=True``) whose
    qualified name matches ``include`` (``None`` = all) and no ``exclude`` glob (see
    :func:`bitflow.quant.convert.match_name`). Raises ``ValueError`` when nothing matches, when the model has
    BitLinear layers (DQT replaces the latent-weight scheme, it does not stack on it) or when a weight tied between
    two modules would be converted on one side only.
    """
    inc = _patterns("include", include)
    exc = _patterns("exclude", exclude) or ()
    if isinstance(model, (nn.Linear, nn.Embedding, _DQTWeight)):
        raise ValueError("to_dqt converts the layers inside a model; for one layer use DQTLinear.from_linear")
    bitlinear = [name for name, _ in _first_names(model, BitLinear)]
    if bitlinear:
        raise ValueError(
            f"the model has BitLinear layers {bitlinear[:4]}: DQT trains weights without a latent copy and cannot "
            "be combined with BitLinear (use either the precision transition or DQT)"
        )
    kinds: tuple[type, ...] = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    candidates = _first_names(model, kinds)
    targets = [
        (name, m) for name, m in candidates if (inc is None or match_name(name, inc)) and not match_name(name, exc)
    ]
    if not targets:
        available = [name for name, _ in candidates][:8]
        raise ValueError(
            f"to_dqt: include={list(inc) if inc is not None else None} exclude={list(exc)} match no "
            f"{'/'.join(k.__name__ for k in kinds)} layer of {type(model).__name__}; available (first "
            f"{len(available)}): {available}"
        )
    # tied weights: every module that holds a targeted weight must be targeted too
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight") if name else None
        if w is not None:
            holders.setdefault(id(w), []).append(name)
    chosen = {name for name, _ in targets}
    for name, m in targets:
        sharing = sorted(set(holders.get(id(m.weight), [])))
        left_out = [n for n in sharing if n not in chosen]
        if left_out:
            raise ValueError(
                f"{name}.weight is tied to {left_out} which would stay in full precision; convert both sides or "
                "neither (e.g. lm_head with tied embeddings needs exclude=[] and embeddings=true)"
            )
    return targets


def to_dqt(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    *,
    bits: int | None = None,
    act_bits: int | None = 8,
    act_qmax: float | None = None,
    embeddings: bool = False,
    init_scale: str = "absmean",
    scale_update: str = "max",
    eps: float = QF.DEFAULT_EPS,
) -> list[str]:
    """Convert, in place, the Linear (and, with ``embeddings=True``, Embedding) layers of ``model`` to DQT.

    Which layers: see :func:`dqt_targets` (default: every ``nn.Linear`` but ``lm_head``; embeddings and norms stay
    in full precision). Each targeted weight becomes int8 codes and a scale by :func:`init_codes`
    (``s = Qp / mean|W|``, arXiv 2412.04787, or absmax with ``init_scale="absmax"``); the float weight Parameter is
    gone afterwards (build the optimizer after converting, or hand the layers to :meth:`DQTAdamW.add_dqt_modules`).
    Biases are kept as they are. A weight tied between modules is converted once and shared.

    Returns the qualified names converted, in module order. Raises ``ValueError`` for invalid options or filters;
    nothing is changed then.
    """
    options = dict(bits=bits, act_bits=act_bits, act_qmax=act_qmax, scale_update=scale_update, eps=eps)
    _validate(**options)
    QF._check_choice("init_scale", init_scale, INIT_SCALES)
    targets = dqt_targets(model, include, exclude, embeddings)
    new: dict[int, nn.Module] = {}
    by_weight: dict[int, _DQTWeight] = {}
    for _, m in targets:
        if isinstance(m, nn.Embedding):
            layer: _DQTWeight = DQTEmbedding.from_embedding(m, init_scale, **options)
        else:
            layer = DQTLinear.from_linear(m, init_scale, **options)
        first = by_weight.setdefault(id(m.weight), layer)
        if first is not layer:
            layer._share_with(first)
        new[id(m)] = layer
    _replace_modules(model, new)
    return [name for name, _ in targets]


# --------------------------------------------------------------------------------------------------------------
# quant state (for checkpoints): kind "dqt"
# --------------------------------------------------------------------------------------------------------------


def dqt_state(layers: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """A ``"dqt"`` quant state (plain data for checkpoints): the converted module names and the DQT options."""
    return {"kind": "dqt", "layers": list(layers), "options": dict(options)}


def _apply_dqt_state(model: nn.Module, state: dict[str, Any]) -> list[str]:
    missing = {"layers", "options"} - set(state)
    if missing:
        raise ValueError(f"dqt quant state lacks {sorted(missing)}; it has {sorted(state)}")
    layers, options = list(state["layers"]), dict(state["options"])
    if not layers:
        raise ValueError("dqt quant state names no layers")
    modules = dict(model.named_modules(remove_duplicate=False))
    absent = [name for name in layers if name not in modules]
    if absent:
        raise ValueError(
            f"the quant state names layers that {type(model).__name__} does not have: {absent[:8]} "
            "(is the checkpoint from another architecture?)"
        )
    done = [name for name in layers if isinstance(modules[name], _DQTWeight)]
    clash = [name for name in done if modules[name].options() != {**modules[name].options(), **options}]
    if clash:
        raise ValueError(f"layers {clash[:4]} are already DQT with other options than the quant state's {options}")
    todo = [name for name in layers if name not in done]
    if todo:
        embeddings = any(isinstance(modules[name], nn.Embedding) for name in todo)
        to_dqt(model, include=todo, exclude=None, embeddings=embeddings, **options)
    return layers


def _capture_dqt_state(model: nn.Module) -> dict[str, Any] | None:
    found = dqt_modules(model)
    if not found:
        return None
    return dqt_state([name for name, _ in found], found[0][1].options())


# --------------------------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------------------------


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round a float32 tensor to bfloat16 stochastically (unbiased): add a uniform random integer in
    ``[0, 2^16)`` to the 16 low bits of the float32 bit pattern, then truncate them.

    A bfloat16 is a float32 without its 16 low mantissa bits, so the result is the next bfloat16 towards zero or
    away from it with probabilities proportional to the distances. Used for bfloat16 AdamW moments, where
    round-to-nearest would freeze slowly decaying moments (a change below half a bf16 ulp is lost every step).
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class DQTAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for ordinary Parameters plus DQT's stochastic-rounding step for DQT layers.

    Ordinary param groups are stepped by AdamW itself (same code path, ``fused``/``foreach`` included). One extra
    param group, ``name="dqt"``, is created for the DQT layers: its ``lr`` follows LR schedulers like any group,
    its ``weight_decay`` is ``dqt_weight_decay`` (default: ``weight_decay``) and its ``params`` are the current
    float leaves of the DQT layers (empty between steps). Per DQT weight ``W = codes * scale`` (arXiv 2412.04787),
    with AdamW's decoupled weight decay and bias correction exactly as ``torch.optim.AdamW``::

        W   = W (1 - lr wd)
        m   = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
        W'  = W - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
        scale' = scale * max(codes) / Qp       (scale_update="max"; "fixed": scale' = scale)
        codes  = SR(clip(W' / scale', Qn, Qp)) ;  scale = scale'

    Args:
        params: ordinary Parameters or param groups (may be empty).
        dqt_modules: ``(name, DQT layer)`` pairs to train; tied layers (shared codes) are stepped once. More can be
            added later with :meth:`add_dqt_modules` (a run that switches to DQT mid-run).
        moment_dtype: ``"float32"`` (AdamW's own precision) or ``"bfloat16"`` (half the optimizer memory of the DQT
            layers; stored with stochastic rounding).
        seed: seed of the rounding generator(s), one per device; ``None`` = ``torch.initial_seed()``.
        track_flips: count, per step and layer, the codes that changed (``last_flips``; one compare per weight).
        Other arguments as ``torch.optim.AdamW`` (``amsgrad`` is not supported).

    ``state_dict()`` adds ``"dqt"``: the moments per layer name and the generators' states.
    """

    def __init__(
        self,
        params: Iterable[Any],
        dqt_modules: Iterable[tuple[str, nn.Module]] = (),
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        dqt_weight_decay: float | None = None,
        moment_dtype: str = "float32",
        seed: int | None = None,
        track_flips: bool = True,
        **adamw_kwargs: Any,
    ) -> None:
        if adamw_kwargs.get("amsgrad"):
            raise ValueError("DQTAdamW does not support amsgrad=True")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype={moment_dtype!r} is not supported; allowed: {', '.join(MOMENT_DTYPES)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; allowed: null or an int")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._dqt_params: list[Tensor] = []  # the "dqt" group's params: the leaves of the current step
        wd = weight_decay if dqt_weight_decay is None else dqt_weight_decay
        groups.append({"params": self._dqt_params, "name": "dqt", "dqt": True, "weight_decay": wd})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        self._dqt_group["params"] = self._dqt_params  # Optimizer copied the list; the layers append to ours
        # GradScaler must unscale through the param groups (it would otherwise hand a fused step the scale and skip
        # unscaling the DQT leaves)
        self._step_supports_amp_scaling = False
        self.moment_dtype = moment_dtype
        self.seed = torch.initial_seed() if seed is None else seed
        self.track_flips = track_flips
        self.dqt_entries: list[tuple[str, _DQTWeight]] = []
        self.dqt_state: dict[str, dict[str, Tensor]] = {}
        self.last_flips: dict[str, Tensor] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending_rng: dict[str, Tensor] = {}
        self._synced = False
        self.add_dqt_modules(dqt_modules)

    @classmethod
    def for_model(cls, model: nn.Module, groups: list[dict[str, Any]], **kwargs: Any) -> DQTAdamW:
        """A DQTAdamW over ``groups`` and every DQT layer of ``model``; the DQT weight decay defaults to the
        ``weight_decay`` of the group named ``"decay"`` (bitflow's matrices group)."""
        decay = [g["weight_decay"] for g in groups if g.get("name") == "decay"]
        if decay and kwargs.get("dqt_weight_decay") is None:
            kwargs["dqt_weight_decay"] = decay[0]
        return cls(groups, _unique_weights(model), **kwargs)

    # ------------------------------------------------------------------------------------------ DQT layers
    @property
    def _dqt_group(self) -> dict[str, Any]:
        return next(g for g in self.param_groups if g.get("dqt"))

    def add_dqt_modules(
        self,
        modules: Iterable[tuple[str, nn.Module]],
        replaced: dict[str, nn.Parameter] | None = None,
        keep_state: bool = False,
    ) -> None:
        """Train these ``(name, DQT layer)`` pairs from now on.

        ``replaced`` maps a layer name to the float weight Parameter it replaced (a mid-run switch): that
        Parameter leaves the ordinary groups, and its AdamW state is dropped or, with ``keep_state``, becomes the
        layer's DQT moments (same step count; converted to ``moment_dtype``).
        """
        names = {name for name, _ in self.dqt_entries}
        codes = {id(m.codes) for _, m in self.dqt_entries}
        for name, m in modules:
            if not isinstance(m, _DQTWeight):
                raise ValueError(f"{name} is a {type(m).__name__}, not a DQT layer")
            if name in names or id(m.codes) in codes:
                continue
            m._slot.sink = self._dqt_params
            self.dqt_entries.append((name, m))
            names.add(name)
            codes.add(id(m.codes))
        for name, p in (replaced or {}).items():
            for g in self.param_groups:
                g["params"][:] = [q for q in g["params"] if q is not p]
            old = self.state.pop(p, None)
            if keep_state and old and name in names:
                dt = MOMENT_DTYPES[self.moment_dtype]
                self.dqt_state[name] = {
                    "step": torch.as_tensor(old["step"], dtype=torch.float32).clone().cpu(),
                    "exp_avg": old["exp_avg"].detach().to(dt).clone(),
                    "exp_avg_sq": old["exp_avg_sq"].detach().to(dt).clone(),
                }

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded rounding generator of ``device`` (created on first use; restored states apply)."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_rng:
                gen.set_state(self._pending_rng.pop(key))
            self._generators[key] = gen
        return gen

    @torch.no_grad()
    def sync_dqt_grads(self) -> None:
        """Average the DQT gradients over data-parallel ranks (DDP reduces only registered Parameters).

        Call it before gradient clipping (bitflow's DQT callback does, in ``on_before_optimizer_step``);
        :meth:`step` calls it too if nobody did. A no-op outside ``torch.distributed``.
        """
        if self._synced:
            return
        self._synced = True
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for leaf in self._dqt_params:
            if leaf.grad is not None:
                dist.all_reduce(leaf.grad, op=dist.ReduceOp.SUM)
                leaf.grad.div_(world)

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (if any), AdamW on the ordinary groups, then the DQT step; frees the DQT leaves."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_dqt_grads()
        leaves = list(self._dqt_params)
        self._dqt_params.clear()  # AdamW itself must not see the leaves
        try:
            super().step()
        finally:
            self._dqt_params.extend(leaves)
        try:
            self._dqt_step()
        finally:
            self._dqt_params.clear()
            for _, m in self.dqt_entries:
                m._slot.leaf = None
            self._synced = False
        return loss

    def _dqt_step(self) -> None:
        group = self._dqt_group
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        maximize = group.get("maximize", False)
        dt = MOMENT_DTYPES[self.moment_dtype]
        self.last_flips = {}
        for name, m in self.dqt_entries:
            leaf = m._slot.leaf
            if leaf is None or leaf.grad is None:
                continue  # the layer took no part in this step (as AdamW skips Parameters without gradient)
            grad = leaf.grad.float()
            if maximize:
                grad = -grad
            st = self.dqt_state.get(name)
            if st is None:
                st = self.dqt_state[name] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(grad, dtype=dt),
                    "exp_avg_sq": torch.zeros_like(grad, dtype=dt),
                }
            gen = self.generator(m.codes.device)
            st["step"] += 1
            t = float(st["step"])
            exp_avg, exp_avg_sq = st["exp_avg"].float(), st["exp_avg_sq"].float()
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if dt == torch.float32:
                st["exp_avg"], st["exp_avg_sq"] = exp_avg, exp_avg_sq
            else:
                st["exp_avg"].copy_(stochastic_round_bf16(exp_avg, gen))
                st["exp_avg_sq"].copy_(stochastic_round_bf16(exp_avg_sq, gen))
            # W' = W (1 - lr wd) - lr / bc1 * m / (sqrt(v / bc2) + eps), on the stored weight (torch's AdamW order)
            w = m.codes.float().mul_(m.scale)
            w.mul_(1 - lr * wd)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            w.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
            del exp_avg, exp_avg_sq, denom
            scale = m.scale
            if m.scale_update == "max":  # the authors' s = Qp / max(W_prev): scale * max(codes) / Qp
                scale = scale * (m.codes.max().float().clamp_min(1.0) / m.qp)
            x = w.div_(scale).clamp_(m.qn, m.qp)
            codes = QF.stochastic_round(x, gen).to(torch.int8)
            if self.track_flips:
                self.last_flips[name] = (codes != m.codes).sum()
            m.codes.copy_(codes)
            m.scale.copy_(scale)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        leaves = list(self._dqt_params)
        self._dqt_params.clear()  # a checkpoint holds no leaves (they are rebuilt by the next forward)
        try:
            sd = super().state_dict()
        finally:
            self._dqt_params.extend(leaves)
        rng = dict(self._pending_rng)
        rng.update({key: gen.get_state() for key, gen in self._generators.items()})
        sd["dqt"] = {
            "state": {name: dict(st) for name, st in self.dqt_state.items()},
            "rng": rng,
            "seed": self.seed,
            "moment_dtype": self.moment_dtype,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        dqt = sd.pop("dqt", None)
        leaves = list(self._dqt_params)
        self._dqt_params.clear()
        try:
            super().load_state_dict(sd)
        finally:
            self._dqt_params.extend(leaves)
            self._dqt_group["params"] = self._dqt_params  # load_state_dict rebuilt the group dicts
        if dqt is None:
            return
        known = {name: m for name, m in self.dqt_entries}
        unknown = sorted(set(dqt["state"]) - set(known))
        if unknown:
            raise ValueError(f"the optimizer state has DQT moments of layers this optimizer does not train: {unknown}")
        dt = MOMENT_DTYPES[self.moment_dtype]
        self.dqt_state = {
            name: {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).clone().cpu(),
                "exp_avg": st["exp_avg"].to(device=known[name].codes.device, dtype=dt).clone(),
                "exp_avg_sq": st["exp_avg_sq"].to(device=known[name].codes.device, dtype=dt).clone(),
            }
            for name, st in dqt["state"].items()
        }
        self.seed = dqt.get("seed", self.seed)
        self._generators = {}
        self._pending_rng = {key: state.cpu() for key, state in dqt.get("rng", {}).items()}


def build_adamw(
    model: nn.Module, groups: list[dict[str, Any]], dqt: dict[str, Any] | None = None, **adamw_kwargs: Any
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(groups, **adamw_kwargs)``, or a :class:`DQTAdamW` when ``model`` has DQT layers or
    ``dqt`` (DQTAdamW options such as ``moment_dtype``, ``seed``; set when DQT starts later in the run) is given."""
    if dqt is None and not dqt_modules(model):
        return torch.optim.AdamW(groups, **adamw_kwargs)
    return DQTAdamW.for_model(model, groups, **adamw_kwargs, **(dqt or {}))


def _register() -> None:
    from bitflow.quant.state import register_quant_kind

    register_quant_kind("dqt", _apply_dqt_state, _capture_dqt_state)


_register()
