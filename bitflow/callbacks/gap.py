"""The online ternary gap: what switching to the quantized model *now* would cost, measured during 16-bit training.

Every ``transition.gap_every`` steps :class:`~bitflow.callbacks.PrecisionTransition` evaluates the model on a fixed
small set of validation windows twice: as it is (16-bit), and with the targeted layers quantized on the fly by
round-to-nearest (RTN, no training): the run's recipe by default (BitNet b1.58 ternary absmean weights with 8-bit
per-token absmax activations, i.e. exactly the forward of the switched model at lambda = 1). The gap

    quant/gap = L(Q(W)) - L(W)

is the quantization-induced degradation (QiD) of switching at this step. Nothing is copied or written: the quantized
weights go into the forward through :func:`torch.func.functional_call` and the activation quantizer through forward
pre-hooks that are removed afterwards, so the training trajectory is unchanged bit for bit. Per-layer sensitivity
(``quant/gap_layer/<name>``: the gap when only that layer is quantized) is measured every ``gap_layers_every``-th
measurement.

Quantizers (``transition.gap_quant``): ``recipe`` (the run's recipe, see :func:`gap_quantizer`), ``absmean`` /
``absmedian`` (ternary weights only, one scale per tensor), ``int2`` ... ``int8`` (n-bit RTN weights only, absmax
per output channel: nothing clipped; the maths is :mod:`bitflow.quant.functional`'s), ``rtn2`` ... ``rtn8`` (the
n-bit RTN of ``bitflow-ptq``, :func:`bitflow.quant.ptq.rtn.rtn`: the GPTQ-style symmetric grid per output row,
weights only; bits 2, 3, 4, 6, 8). GPTQ is not offered: it needs calibration per measurement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bitflow.quant.functional as QF
from bitflow.quant.recipe import QuantRecipe

__all__ = ["GAP_QUANT_OPTIONS", "GapQuantizer", "QuantGap", "gap_quantizer"]

PTQ_BITS = (2, 3, 4, 6, 8)  # bitflow.quant.ptq.rtn.BITS (imported lazily: the PTQ package is heavier)
GAP_QUANT_OPTIONS = (
    "recipe", "absmean", "absmedian", *(f"int{b}" for b in range(2, 9)), *(f"rtn{b}" for b in PTQ_BITS)
)


@dataclass(frozen=True)
class GapQuantizer:
    """An RTN quantizer of a layer's weight (and optionally its input), with :mod:`bitflow.quant.functional`'s
    options: ``bits=None`` = ternary; ``act_bits=None`` = 16-bit activations."""

    weight_scale: str = "absmean"
    granularity: str = "tensor"
    group_size: int | None = None
    bits: int | None = None
    act_bits: int | None = None
    act_qmax: float | None = None
    input_norm: str | None = None
    eps: float = QF.DEFAULT_EPS
    ptq_bits: int | None = None  # PTQ's RTN on its GPTQ-style grid instead (bitflow.quant.ptq.rtn), weights only

    def weight(self, w: Tensor) -> Tensor:
        """The dequantized weight ``Q(W)`` in ``w``'s dtype (:func:`bitflow.quant.functional.fake_quantize_weight`,
        or with ``ptq_bits`` :func:`bitflow.quant.ptq.rtn.rtn`: symmetric, per output row)."""
        if self.ptq_bits is not None:
            from bitflow.quant.ptq.rtn import rtn

            return rtn(w, self.ptq_bits).weight.to(w.dtype)
        return QF.fake_quantize_weight(w, self.weight_scale, self.granularity, self.group_size, self.bits, self.eps)

    def input(self, x: Tensor) -> Tensor:
        """The layer's input as the quantized layer sees it: parameter-free norm, then b-bit absmax per token."""
        if self.input_norm == "layernorm":
            x = QF.layer_norm(x, self.eps)
        elif self.input_norm == "rmsnorm":
            x = QF.rms_norm(x, self.eps)
        if self.act_bits is not None:
            x = QF.fake_quantize_activation(x, self.act_bits, self.act_qmax, self.eps)
        return x

    @property
    def touches_input(self) -> bool:
        return self.act_bits is not None or self.input_norm is not None


def gap_quantizer(option: str, recipe: QuantRecipe | None) -> GapQuantizer:
    """The quantizer of ``transition.gap_quant``: ``recipe`` = the run's recipe (``bitlinear``: its weight and
    activation options; ``dqt``: its grid with the init scale, per tensor, and its activations), ``absmean`` /
    ``absmedian`` ternary, ``int<b>`` b-bit absmax per channel, ``rtn<b>`` PTQ's RTN. Raises ``ValueError``
    naming the key."""
    if option not in GAP_QUANT_OPTIONS:
        raise ValueError(f"transition.gap_quant={option!r} is not allowed; allowed: {', '.join(GAP_QUANT_OPTIONS)}")
    if option in ("absmean", "absmedian"):
        return GapQuantizer(weight_scale=option)
    if option.startswith("int"):
        return GapQuantizer(weight_scale="absmax", granularity="channel", bits=int(option[3:]))
    if option.startswith("rtn"):
        return GapQuantizer(ptq_bits=int(option[3:]))
    if recipe is None:
        raise ValueError("transition.gap_quant=recipe needs a quant recipe (e.g. quant=ternary)")
    o = recipe.options
    if recipe.name == "bitlinear":
        return GapQuantizer(
            o.weight_scale, o.granularity, o.group_size, o.weight_bits, o.act_bits, o.act_qmax, o.input_norm, o.eps
        )
    if recipe.name == "dqt":
        return GapQuantizer(o.init_scale, "tensor", None, o.bits, o.act_bits, o.act_qmax, None, o.eps)
    raise ValueError(
        f"transition.gap_quant=recipe: no RTN quantizer is known for quant.recipe={recipe.name!r}; use "
        f"transition.gap_quant=absmean (or another of {', '.join(GAP_QUANT_OPTIONS[1:])})"
    )


def _block_of(name: str) -> str:
    """The transformer block a layer belongs to (``layers.3.attn.wq`` -> ``layers.3``), else the layer itself."""
    m = re.match(r"^(.*?layers\.\d+)\.", name)
    return m.group(1) if m else name


class QuantGap:
    """Measures the gap on ``windows`` (token ids [W, T+1], on the model's device) for the ``layers`` of a model.

    Call :meth:`measure` between training steps; it returns ``{tag: value}`` (one host transfer).
    """

    def __init__(self, quantizer: GapQuantizer, layers: list[str], windows: Tensor) -> None:
        if not layers:
            raise ValueError("the quantization gap needs at least one layer to quantize")
        self.quantizer, self.layers, self.windows = quantizer, list(layers), windows

    @torch.no_grad()
    def losses(self, model: nn.Module, variants: Iterable[list[str]]) -> Tensor:
        """Mean next-token loss on the windows of ``model`` as it is (row 0) and with each variant's layers
        quantized (one row each), as a float64 device tensor. The model's train/eval mode is restored."""
        was_training = model.training
        model.eval()
        x, y = self.windows[:, :-1], self.windows[:, 1:]
        modules = dict(model.named_modules())

        def loss(params: Mapping[str, Tensor]) -> Tensor:
            logits = torch.func.functional_call(model, dict(params), (x,)) if params else model(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).double()

        try:
            out = [loss({})]
            for names in variants:
                hooks = []
                if self.quantizer.touches_input:
                    hooks = [
                        modules[n].register_forward_pre_hook(lambda _m, args: (self.quantizer.input(args[0]),))
                        for n in names
                    ]
                try:
                    out.append(loss({f"{n}.weight": self.quantizer.weight(modules[n].weight) for n in names}))
                finally:
                    for h in hooks:
                        h.remove()
        finally:
            model.train(was_training)
        return torch.stack(out)

    def measure(self, model: nn.Module, per_layer: bool = False) -> dict[str, float]:
        """``quant/gap``, ``quant/gap_loss_16bit``, ``quant/gap_loss_quantized`` and, with ``per_layer``,
        ``quant/gap_layer/<name>`` for every layer (only that layer quantized)."""
        variants = [self.layers] + ([[n] for n in self.layers] if per_layer else [])
        values = self.losses(model, variants).tolist()  # the one host transfer
        base, quantized = values[0], values[1]
        out = {"quant/gap": quantized - base, "quant/gap_loss_16bit": base, "quant/gap_loss_quantized": quantized}
        for name, v in zip(self.layers, values[2:], strict=False):
            out[f"quant/gap_layer/{name}"] = v - base
        return out


def blocks_of(layers: list[str]) -> dict[str, list[str]]:
    """The layers grouped by transformer block, in model order (``layers.<i>``; others are their own group)."""
    out: dict[str, list[str]] = {}
    for name in layers:
        out.setdefault(_block_of(name), []).append(name)
    return out


AUTO_RULES = ("plateau", "threshold")


@dataclass
class AutoSwitchRule:
    """When ``transition.at: auto`` switches: a rule on the gap, smoothed over the last ``smoothing`` measurements.

    * ``plateau``: the smoothed gap stops falling: it has not reached a new minimum (lower by more than
      ``min_delta``) for ``patience`` measurements;
    * ``threshold``: the smoothed gap rises to ``threshold`` nats or above.

    Measurements before ``min_at`` count for the smoothing but do not fire; the caller switches at ``max_at`` if the
    rule has not fired by then. The rule is a pure function of the measurements (:attr:`history`), which is its
    checkpoint state: a resumed run decides as the uninterrupted one.
    """

    rule: str = "plateau"
    smoothing: int = 3
    patience: int = 3
    min_delta: float = 0.0
    threshold: float = 0.1
    history: list[tuple[int, float]] | None = None

    def __post_init__(self) -> None:
        from bitflow.config import check_int, fail

        if self.rule not in AUTO_RULES:
            fail("transition.auto_rule", self.rule, ", ".join(AUTO_RULES))
        check_int("transition.auto_smoothing", self.smoothing, 1)
        check_int("transition.auto_patience", self.patience, 1)
        for key, value in (("auto_min_delta", self.min_delta), ("auto_threshold", self.threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                fail(f"transition.{key}", value, "a number >= 0")
        self.history = list(self.history or [])

    def smoothed(self) -> list[float]:
        """The moving average of the gap over the last ``smoothing`` measurements, one value per measurement."""
        gaps = [g for _, g in self.history]
        return [sum(gaps[max(0, i + 1 - self.smoothing) : i + 1]) / len(gaps[max(0, i + 1 - self.smoothing) : i + 1])
                for i in range(len(gaps))]

    def add(self, step: int, gap: float, min_step: int) -> bool:
        """Record the gap measured at ``step``; whether the rule fires now (never before ``min_step``)."""
        self.history.append((int(step), float(gap)))
        smooth = self.smoothed()
        if step < min_step:
            return False
        if self.rule == "threshold":
            return smooth[-1] >= self.threshold
        best, since = float("inf"), 0
        for value in smooth:
            if value < best - self.min_delta:
                best, since = value, 0
            else:
                since += 1
        return since >= self.patience
