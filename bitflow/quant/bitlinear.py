"""BitLinear: an ``nn.Linear`` whose weights (and inputs) are fake-quantized in the forward pass.

BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764), its median variant (Nielsen et al., arXiv 2411.05882) and the
strength-lambda phase-in of continual quantization-aware pre-training (Nielsen et al., arXiv 2502.11895):

    x_n = norm(x)                                  (optional, parameter-free LayerNorm or RMSNorm)
    x_b = x_n + lambda_a * (Q_a(x_n) - x_n)        (Q_a: per-token absmax b-bit fake quantization)
    W_b = W   + lambda_w * (Q_w(W) - W)            (Q_w: ternary absmean/absmedian, or b-bit, fake quantization)
    y   = x_b W_b^T + bias

The bracketed terms carry no gradient (straight-through estimator), so ``dy/dx`` and ``dy/dW`` are the gradients of
the dense product evaluated at the quantized operands. At full strength (lambda = 1)
``y = (x_q W_q^T) / (s_w s_x) + bias``; at lambda = 0 (and no input norm) the layer computes exactly what
``nn.Linear`` computes.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import bitflow.quant.functional as QF

__all__ = ["BitLinear", "BitLinearOptions", "get_strength", "set_strength"]

INPUT_NORMS = (None, "layernorm", "rmsnorm")
_STRENGTH_BUFFERS = ("weight_strength", "act_strength")


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` will run in: autocast's when it is on for ``t``'s device (and ``t`` is a type autocast
    casts), else ``t``'s own."""
    device_type = t.device.type
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _WeightFakeQuantSTE(torch.autograd.Function):
    """``W + lambda (Q_w(W) - W)`` forward, identity backward (STE); saves nothing for backward."""

    @staticmethod
    def forward(ctx, w, strength, stat, granularity, group_size, bits, eps, out_dtype):  # type: ignore[override]
        ctx.in_dtype = w.dtype
        return QF._fake_quantize_weight(w, stat, granularity, group_size, bits, eps, strength, out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None


class _ActFakeQuantSTE(torch.autograd.Function):
    """``x + lambda (Q_a(x) - x)`` forward with per-token absmax codes, identity backward (STE)."""

    @staticmethod
    def forward(ctx, x, strength, bits, qmax, eps, out_dtype):  # type: ignore[override]
        ctx.in_dtype = x.dtype
        return QF._fake_quantize_activation(x, bits, qmax, eps, strength, out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if (
            not torch.compiler.is_compiling()
        ):  # the memo is eager-only; a traced side effect would break guards
            _last_input.clear()  # the forward pass is over: release the memo's tensor (and the graph behind it)
        return grad.to(ctx.in_dtype), None, None, None, None, None


class _LastInput(threading.local):
    """One-entry memo of the last fake-quantized BitLinear input (CPU, eager mode only).

    Projections that read the same tensor (``wq``/``wk``/``wv`` of attention, ``w1``/``w3`` of SwiGLU) then quantize
    it once instead of three or two times. An entry is reused only for the very same, unmodified input tensor (same
    object, storage and version counter) with identical quantizer options, strength value, output dtype and grad
    mode, so the result is the one a fresh computation would give. The memo holds one tensor; it is replaced on the
    next miss and dropped when a backward pass runs through a quantized input.
    """

    key: tuple | None = None
    source: weakref.ref | None = None
    result: Tensor | None = None
    result_version: int = -1

    def clear(self) -> None:
        self.key, self.source, self.result, self.result_version = None, None, None, -1


_last_input = _LastInput()


def _quantize_input(layer: BitLinear, x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``_ActFakeQuantSTE`` on ``x`` with ``layer``'s options, through the :class:`_LastInput` memo when safe."""
    args = (layer.act_strength, layer.act_bits, layer.act_qmax, layer.eps, out_dtype)
    value = QF._cpu_strength(layer.act_strength)  # None on accelerators and under torch.compile
    if value is None or x.device.type != "cpu" or x.is_inference() or torch.is_inference_mode_enabled():
        return _ActFakeQuantSTE.apply(x, *args)
    key = (
        x._version,
        x.data_ptr(),
        x.shape,
        x.dtype,
        x.requires_grad,
        torch.is_grad_enabled(),
        value,
        *args[1:],
    )
    memo = _last_input
    out = memo.result
    if memo.key == key and memo.source() is x and out is not None and out._version == memo.result_version:
        return out
    out = _ActFakeQuantSTE.apply(x, *args)
    memo.key, memo.source, memo.result, memo.result_version = key, weakref.ref(x), out, out._version
    return out


def _validate_options(
    in_features: int | None,
    weight_scale: str,
    granularity: str,
    group_size: int | None,
    weight_bits: int | None,
    act_bits: int | None,
    act_qmax: float | None,
    input_norm: str | None,
    eps: float,
) -> None:
    QF._check_choice("weight_scale", weight_scale, QF.WEIGHT_STATS)
    QF._check_choice("granularity", granularity, QF.GRANULARITIES)
    if granularity == "group":
        QF._check_group_size(group_size, in_features)
    elif group_size is not None:
        raise ValueError(
            f"group_size={group_size!r} is only used with granularity='group' (got {granularity!r})"
        )
    QF.weight_qrange(weight_bits)
    if act_bits is not None:
        QF.activation_qrange(act_bits, act_qmax)
    elif act_qmax is not None:
        raise ValueError(f"act_qmax={act_qmax!r} needs activation quantization, but act_bits=None")
    QF._check_choice("input_norm", input_norm, INPUT_NORMS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} is not supported; allowed: a positive float (default 1e-5)")


@dataclass(frozen=True)
class BitLinearOptions:
    """BitLinear's keyword options, validated on construction; the one place their defaults live.

    :class:`BitLinear`'s signature and the ``bitlinear`` recipe read their defaults from here (conf/quant/ternary.yaml
    spells the same values out so that they show in the composed config; a test keeps them equal). The meaning of
    each option is documented on :class:`BitLinear`.
    """

    weight_scale: str = "absmean"
    granularity: str = "tensor"
    group_size: int | None = None
    weight_bits: int | None = None
    act_bits: int | None = 8
    act_qmax: float | None = None
    input_norm: str | None = None
    eps: float = QF.DEFAULT_EPS

    def __post_init__(self) -> None:
        # group_size vs in_features is checked per layer
        _validate_options(None, **{f.name: getattr(self, f.name) for f in dataclasses.fields(BitLinearOptions)})


_D = BitLinearOptions()
_DEFAULT_OPTIONS = dataclasses.asdict(_D)
_OPTION_NAMES = frozenset(_DEFAULT_OPTIONS)


class BitLinear(nn.Linear):
    """Quantization-aware ``nn.Linear`` (BitNet b1.58, arXiv 2402.17764; median variant, arXiv 2411.05882).

    It keeps ``nn.Linear``'s ``weight``/``bias`` Parameters and state-dict keys (a 16-bit ``nn.Linear`` state dict
    loads unchanged); the latent weights stay in full precision and are fake-quantized on every forward.

    Args:
        weight_scale: weight statistic: ``"absmean"`` (BitNet b1.58), ``"absmedian"`` (lower median, as the seed
            authors' code) or ``"absmax"``. Ternary: ``s_w = 1 / max(stat|W|, eps)``; b-bit:
            ``s_w = (2^(b-1)-1) / max(stat|W|, eps)``.
        granularity: ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per
            ``group_size`` consecutive input elements of a row).
        weight_bits: ``None`` = ternary ``{-1, 0, 1}``, or an int in [2, 8] for ``[-2^(b-1), 2^(b-1)-1]``.
        act_bits: bits of per-token absmax activation quantization (int in [2, 16]); ``None`` disables it.
        act_qmax: what max|x| of a token maps to; default ``2^(act_bits-1) - 1`` (127 for 8 bits; the seed authors
            use 128, whose top value is clamped to 127).
        input_norm: ``None``, ``"layernorm"`` or ``"rmsnorm"``: a parameter-free norm of the input (eps ``eps``).
        eps: floor of the statistics (and the norm's epsilon).

    The strengths ``weight_strength`` and ``act_strength`` (lambda of arXiv 2502.11895) are non-persistent 0-dim
    float32 buffers, 1.0 for a new layer; change them with :func:`set_strength` (in place, so a compiled model is
    not recompiled).

    Speed: the quantizers compute in float32 and write their result straight in the dtype ``F.linear`` runs in
    (autocast's); the backward of both quantizers is the identity (STE) and saves no tensor. In eager mode on the CPU,
    strength 0 and 1 skip the blend, and layers that read the same input tensor (``wq``/``wk``/``wv``) quantize it
    once (see ``_LastInput``). Under ``torch.compile`` the elementwise work fuses into a few kernels.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_scale: str = _D.weight_scale,
        granularity: str = _D.granularity,
        group_size: int | None = _D.group_size,
        weight_bits: int | None = _D.weight_bits,
        act_bits: int | None = _D.act_bits,
        act_qmax: float | None = _D.act_qmax,
        input_norm: str | None = _D.input_norm,
        eps: float = _D.eps,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        options = dict(
            weight_scale=weight_scale,
            granularity=granularity,
            group_size=group_size,
            weight_bits=weight_bits,
            act_bits=act_bits,
            act_qmax=act_qmax,
            input_norm=input_norm,
            eps=eps,
        )
        _validate_options(in_features, **options)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(options, self.weight.device)

    def _setup(self, options: dict, device: torch.device) -> None:
        self.weight_scale: str = options["weight_scale"]
        self.granularity: str = options["granularity"]
        self.group_size: int | None = options["group_size"]
        self.weight_bits: int | None = options["weight_bits"]
        self.act_bits: int | None = options["act_bits"]
        self.act_qmax: float | None = options["act_qmax"]
        self.input_norm: str | None = options["input_norm"]
        self.eps: float = float(options["eps"])
        for name in _STRENGTH_BUFFERS:
            self.register_buffer(name, torch.ones((), dtype=torch.float32, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> BitLinear:
        """A BitLinear that reuses ``linear``'s very ``weight`` and ``bias`` Parameter objects (no copy).

        ``options`` are the keyword options of :class:`BitLinear`. Hooks are not carried over here (model
        conversion, :func:`~bitflow.quant.to_bitlinear`, carries forward hooks over). Raises ``ValueError`` for a non-``nn.Linear`` or invalid options.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ValueError(
                f"unknown BitLinear option(s) {sorted(unknown)}; allowed: {sorted(_OPTION_NAMES)}"
            )
        full = {**_DEFAULT_OPTIONS, **options}
        _validate_options(linear.in_features, **full)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias  # a Parameter or None; registered either way, as nn.Linear does
        layer.train(linear.training)
        layer._setup(full, linear.weight.device)
        return layer

    @classmethod
    def become(cls, linear: nn.Linear, **options) -> BitLinear:
        """Turn the plain ``nn.Linear`` object ``linear`` itself into a BitLinear (its class changes in place; the
        same module object, Parameters and hooks). For modules that something holds by identity, such as FSDP2's
        ``fully_shard`` units, which gather a sharded weight into the very module around each forward: the
        BitLinear then quantizes the whole gathered matrix, with the scale one device would compute."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"BitLinear.become needs a plain nn.Linear, got {type(linear).__name__}")
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ValueError(f"unknown BitLinear option(s) {sorted(unknown)}; allowed: {sorted(_OPTION_NAMES)}")
        full = {**_DEFAULT_OPTIONS, **options}
        _validate_options(linear.in_features, **full)
        device = linear.weight.device
        linear.__class__ = cls
        linear._setup(full, device)
        return linear

    def options(self) -> dict:
        """The keyword options this layer was built with (to build an equal one)."""
        return {name: getattr(self, name) for name in _DEFAULT_OPTIONS}

    def _apply(self, fn, recurse=True):  # nn.Module.to()/.cuda()/.half() all end here
        # keep the strengths float32 through .to(bfloat16)/.half(): only their device may change
        saved = {name: self._buffers[name] for name in _STRENGTH_BUFFERS}
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm == "layernorm":
            x = QF.layer_norm(x, self.eps)
        elif self.input_norm == "rmsnorm":
            x = QF.rms_norm(x, self.eps)
        if self.act_bits is not None:
            x = _quantize_input(self, x, _compute_dtype(x))
        w = _WeightFakeQuantSTE.apply(
            self.weight,
            self.weight_strength,
            self.weight_scale,
            self.granularity,
            self.group_size,
            self.weight_bits,
            self.eps,
            _compute_dtype(self.weight),
        )
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> tuple[Tensor, Tensor]:
        """``(codes, s_w)`` of the full-strength quantizer: int8 codes of the weight's shape and the float32 scale.

        ``W ~= codes / s_w`` (scale shapes: see :func:`bitflow.quant.functional.absmean`). An FSDP2-sharded weight
        is gathered first (a collective: every rank calls this), so the scale is the whole matrix's, as in forward.
        """
        from bitflow.models import gathered

        codes, scale = QF.quantize_weight(
            gathered(self.weight), self.weight_scale, self.granularity, self.group_size, self.weight_bits, self.eps
        )
        return codes.to(torch.int8), scale

    def extra_repr(self) -> str:
        parts = [
            super().extra_repr(),
            f"weight_scale={self.weight_scale!r}",
            f"granularity={self.granularity!r}",
        ]
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        parts.append(f"weight_bits={self.weight_bits if self.weight_bits is not None else 'ternary'}")
        parts.append(f"act_bits={self.act_bits}")
        if self.act_qmax is not None:
            parts.append(f"act_qmax={self.act_qmax}")
        if self.input_norm is not None:
            parts.append(f"input_norm={self.input_norm!r}")
        parts.append(f"eps={self.eps}")
        return ", ".join(parts)




def _bitlinears(module: nn.Module) -> list[BitLinear]:
    return [m for m in module.modules() if isinstance(m, BitLinear)]


def _check_strength(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} strength {value!r} is not allowed; allowed: a number in [0, 1] or None (unchanged)"
        )


def set_strength(module: nn.Module, weight: float | None = None, act: float | None = None) -> int:
    """Set the quantization strength lambda (arXiv 2502.11895) of every BitLinear in ``module`` (or of the layer).

    ``q_lambda(x) = x + lambda (Q(x) - x)``: 0 = full precision, 1 = fully quantized. ``None`` leaves that strength
    unchanged. The buffers are filled in place, so a ``torch.compile``-d model is not recompiled. Returns the number
    of layers set; raises ``ValueError`` for a value outside [0, 1] or a module without BitLinear layers.
    """
    _check_strength("weight", weight)
    _check_strength("act", act)
    layers = _bitlinears(module)
    if not layers:
        raise ValueError(f"set_strength: {type(module).__name__} contains no BitLinear layer")
    for layer in layers:
        if weight is not None:
            layer.weight_strength.fill_(float(weight))
        if act is not None:
            layer.act_strength.fill_(float(act))
    return len(layers)


def get_strength(module: nn.Module) -> dict[str, float]:
    """``{"weight": lambda_w, "act": lambda_a}`` shared by the BitLinear layers of ``module`` (host sync: not for
    forward code). Raises ``ValueError`` if there is no BitLinear or the layers disagree (read the per-layer
    ``weight_strength``/``act_strength`` buffers then)."""
    layers = _bitlinears(module)
    if not layers:
        raise ValueError(f"get_strength: {type(module).__name__} contains no BitLinear layer")
    values = {(float(layer.weight_strength), float(layer.act_strength)) for layer in layers}
    if len(values) > 1:
        raise ValueError(f"get_strength: the BitLinear layers have different strengths {sorted(values)}")
    ((w, a),) = values
    return {"weight": w, "act": a}
