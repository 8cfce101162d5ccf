"""Convert a model's Linear (and optionally Embedding) layers to DQT layers, in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

import bitflow.quant.functional as QF
from bitflow.quant.bitlinear import BitLinear
from bitflow.quant.convert import as_linear
from bitflow.quant.dqt.grid import INIT_SCALES, validate_layer_options
from bitflow.quant.dqt.layers import DQTEmbedding, DQTLinear, DQTWeight
from bitflow.quant.select import first_names, linear_kinds, replace_modules, select_layers

__all__ = ["dqt_modules", "dqt_targets", "to_dqt", "unique_dqt_weights"]


def dqt_modules(model: nn.Module) -> list[tuple[str, DQTWeight]]:
    """``(first qualified name, module)`` of every DQT layer of ``model`` (each module once, in module order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DQTWeight)]


def unique_dqt_weights(model: nn.Module) -> list[tuple[str, DQTWeight]]:
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
    *,
    key: str = "",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs :func:`to_dqt` would convert, validated, without changing anything.

    Candidates are the plain ``nn.Linear`` layers (and ``nn.Embedding`` ones with ``embeddings=True``) whose
    qualified name matches ``include`` (``None`` = all) and no ``exclude`` glob (see
    :func:`bitflow.quant.select.select_layers`; ``key`` prefixes the option names in errors). Raises ``ValueError`` when nothing matches, when the model has
    BitLinear layers (DQT replaces the latent-weight scheme, it does not stack on it) or when a weight tied between
    two modules would be converted on one side only.
    """
    if isinstance(model, (nn.Linear, nn.Embedding, DQTWeight)):
        raise ValueError("to_dqt converts the layers inside a model; for one layer use DQTLinear.from_linear")
    bitlinear = [name for name, _ in first_names(model, BitLinear)]
    if bitlinear:
        raise ValueError(
            f"the model has BitLinear layers {bitlinear[:4]}: DQT trains weights without a latent copy and cannot "
            "be combined with BitLinear (use either quant=ternary... or quant=dqt_...)"
        )
    kinds: tuple[type, ...] = (*linear_kinds(), nn.Embedding) if embeddings else linear_kinds()
    targets = select_layers(model, kinds, include, exclude, skip=DQTWeight, key=key)
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
    validate_layer_options(**options)
    QF._check_choice("init_scale", init_scale, INIT_SCALES)
    targets = dqt_targets(model, include, exclude, embeddings)
    new: dict[int, nn.Module] = {}
    by_weight: dict[int, DQTWeight] = {}
    for _, m in targets:
        if isinstance(m, nn.Embedding):
            layer: DQTWeight = DQTEmbedding.from_embedding(m, init_scale, **options)
        else:
            layer = DQTLinear.from_linear(as_linear(m), init_scale, **options)
        first = by_weight.setdefault(id(m.weight), layer)
        if first is not layer:
            layer._share_with(first)
        new[id(m)] = layer
    replace_modules(model, new)
    return [name for name, _ in targets]

