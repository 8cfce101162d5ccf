"""Swap ``nn.Linear`` <-> :class:`~bitflow.quant.BitLinear` in any model, in place, keeping the Parameters.

Continual quantization-aware pre-training (Nielsen et al., arXiv 2502.11895) turns a 16-bit model into a BitNet
at step t0: the same weight/bias tensors continue as the latent weights of BitLinear. Both functions here reuse the
very same ``Parameter`` objects (same ``id()``), so an optimizer built on the 16-bit model keeps its state, and a
weight tied between ``lm_head`` and the token embedding stays tied.

Name filters are fnmatch globs (``fnmatch.fnmatchcase``: ``*`` also matches dots) on the fully qualified module
name, as ``model.named_modules()`` spells it. A pattern matches a name if it matches the whole name or a
dot-separated suffix of it: ``"lm_head"`` matches ``"lm_head"`` and ``"model.lm_head"``; ``"mlp.*"`` matches
``"layers.0.mlp.w1"``; ``"layers.*.attn.wq"`` matches ``"layers.3.attn.wq"``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch.nn as nn

from bitflow.quant.bitlinear import _DEFAULT_OPTIONS, _OPTION_NAMES, BitLinear, _validate_options

__all__ = ["match_name", "to_bitlinear", "to_linear"]

# nn.MultiheadAttention reads its out_proj's weight directly, so swapping that module would change nothing
_SKIPPED_LINEAR_TYPES = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def _patterns(name: str, patterns: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"{name} must be a list of non-empty name patterns (fnmatch globs), got {bad!r}")
    return out


def match_name(name: str, patterns: Sequence[str]) -> bool:
    """Whether the qualified module ``name`` matches any fnmatch glob, as the whole name or a ``.``-suffix of it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def _replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put ``new[id(old)]`` in every slot that holds ``old`` (a module may be registered under several names)."""
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _first_names(model: nn.Module, kind: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(first qualified name, module) of every module of ``kind``, in module order, each module once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and name]


def to_bitlinear(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    **options,
) -> list[str]:
    """Convert, in place, every ``nn.Linear`` of ``model`` whose name passes the filters into a ``BitLinear``.

    A layer is converted if it matches ``include`` (``None`` = every ``nn.Linear``) and no ``exclude`` pattern
    (default: ``lm_head``, as BitNet keeps the output head in 16 bits). Patterns are fnmatch globs on the qualified
    name (see the module docstring). ``options`` are :class:`BitLinear`'s keyword options (``weight_scale``,
    ``granularity``, ``act_bits``, ...). Each BitLinear reuses the very same weight/bias ``Parameter`` objects and
    starts at full strength 1.0 (see :func:`~bitflow.quant.set_strength`). Layers that are already BitLinear are left
    as they are.

    Returns the qualified names converted, in module order. Raises ``ValueError`` for invalid options or when the
    filters select no layer (the message lists the patterns and some available Linear names); nothing is changed
    then.
    """
    inc = _patterns("include", include)
    exc = _patterns("exclude", exclude) or ()
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ValueError(f"unknown BitLinear option(s) {sorted(unknown)}; allowed: {sorted(_OPTION_NAMES)}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            "to_bitlinear converts the Linear layers inside a model; for one layer use BitLinear.from_linear"
        )

    linears = [
        (name, m)
        for name, m in _first_names(model, nn.Linear)
        if not isinstance(m, BitLinear) and not isinstance(m, _SKIPPED_LINEAR_TYPES)
    ]
    targets = [
        (name, m)
        for name, m in linears
        if (inc is None or match_name(name, inc)) and not match_name(name, exc)
    ]
    if not targets:
        available = [name for name, _ in linears][:8]
        already = len(_first_names(model, BitLinear))
        raise ValueError(
            f"to_bitlinear: include={list(inc) if inc is not None else None} exclude={list(exc)} match no nn.Linear "
            f"layer of {type(model).__name__}; available Linear layers (first {len(available)}): {available}"
            + (f"; {already} layer(s) are already BitLinear" if already else "")
        )
    full = {**_DEFAULT_OPTIONS, **options}
    for _, m in targets:  # validate every layer before touching any
        _validate_options(m.in_features, **full)
    _replace_modules(model, {id(m): BitLinear.from_linear(m, **options) for _, m in targets})
    return [name for name, _ in targets]


def to_linear(model: nn.Module) -> list[str]:
    """Turn every ``BitLinear`` of ``model`` back into a plain ``nn.Linear``, in place, reusing its Parameters.

    Returns the qualified names converted, in module order; raises ``ValueError`` if there is no BitLinear.
    """
    if isinstance(model, BitLinear):
        raise ValueError("to_linear converts the BitLinear layers inside a model, not a bare BitLinear")
    found = _first_names(model, BitLinear)
    if not found:
        raise ValueError(f"to_linear: {type(model).__name__} contains no BitLinear layer")
    new = {}
    for _, m in found:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = m.in_features, m.out_features
        linear.weight = m.weight
        linear.bias = m.bias
        linear.train(m.training)
        new[id(m)] = linear
    _replace_modules(model, new)
    return [name for name, _ in found]
