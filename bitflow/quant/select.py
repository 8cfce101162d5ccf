"""Which layers a quantization recipe converts: include/exclude globs, tied weights, one clear error.

Every recipe (:mod:`bitflow.quant.recipes`) selects its layers here. Name filters are fnmatch globs
(``fnmatch.fnmatchcase``: ``*`` also matches dots) on the fully qualified module name, as ``model.named_modules()``
spells it. A pattern matches a name if it matches the whole name or a dot-separated suffix of it: ``"lm_head"``
matches ``"lm_head"`` and ``"model.lm_head"``; ``"mlp.*"`` matches ``"layers.0.mlp.w1"``; ``"layers.*.attn.wq"``
matches ``"layers.3.attn.wq"``.

Selection never changes the model: :func:`select_layers` is what a recipe's pure ``plan`` returns, and its
``convert`` replaces exactly those modules (:func:`replace_modules`).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable, Sequence

import torch.nn as nn

__all__ = ["UNCONVERTIBLE", "as_patterns", "linear_kinds", "match_name", "replace_modules", "select_layers"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")

# nn.MultiheadAttention reads its out_proj's weight directly, so swapping that module would change nothing
SKIPPED_TYPES: tuple[type, ...] = (nn.modules.linear.NonDynamicallyQuantizableLinear,)
# modules with linear maps that a recipe cannot convert: they compute from raw weight tensors (nn.MultiheadAttention,
# and so nn.TransformerEncoderLayer/DecoderLayer, read in_proj_weight and out_proj.weight directly) or are no
# y = x W^T + b at all. Selecting one is an error, not a layer silently left in 16-bit.
UNCONVERTIBLE: tuple[type, ...] = (nn.MultiheadAttention, nn.Bilinear, nn.RNNBase)


def linear_kinds() -> tuple[type, ...]:
    """The layer types a linear-layer recipe converts: ``nn.Linear``, and torch-geometric's ``Linear`` (what its
    convolutions hold) when torch-geometric is loaded (a model that has one has loaded it)."""
    if "torch_geometric" in sys.modules:
        from torch_geometric.nn.dense.linear import Linear as PyGLinear

        return (nn.Linear, PyGLinear)
    return (nn.Linear,)


def as_patterns(key: str, patterns: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``patterns`` as a tuple of non-empty globs (``None`` stays ``None``); ``key`` names it in errors."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Iterable):
        raise ValueError(f"{key}={patterns!r} is not allowed; allowed: null, a name glob or a list of them")
    out = tuple(patterns)
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"{key} must be a list of non-empty name patterns (fnmatch globs), got {bad!r}")
    return out


def match_name(name: str, patterns: Sequence[str]) -> bool:
    """Whether the qualified module ``name`` matches any fnmatch glob, as the whole name or a ``.``-suffix of it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def first_names(model: nn.Module, kind: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(first qualified name, module) of every submodule of ``kind``, in module order, each module once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and name]


def select_layers(
    model: nn.Module,
    kinds: type | tuple[type, ...],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    *,
    skip: type | tuple[type, ...] = (),
    tied_together: bool = True,
    key: str = "quant",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that a recipe converts, in module order; changes nothing.

    Candidates are the submodules of type ``kinds`` (not of type ``skip``) whose qualified name matches ``include``
    (``None`` = all) and no ``exclude`` glob. With ``tied_together`` (for recipes that replace the weight
    Parameter), a weight tied between modules must be selected on every side or on none. Raises ``ValueError``
    naming ``<key>.include`` / ``<key>.exclude`` (plain ``include``/``exclude`` for ``key=""``) when nothing
    matches (with some available names) or when a tied weight would be converted on one side only.
    """
    pre = f"{key}." if key else ""
    inc = as_patterns(f"{pre}include", include)
    exc = as_patterns(f"{pre}exclude", exclude) or ()
    candidates = [(n, m) for n, m in first_names(model, kinds) if not isinstance(m, SKIPPED_TYPES + _tuple(skip))]
    targets = [(n, m) for n, m in candidates if (inc is None or match_name(n, inc)) and not match_name(n, exc)]
    if nn.Linear in _tuple(kinds):
        stuck = [(n, m) for n, m in first_names(model, UNCONVERTIBLE)
                 if (inc is None or match_name(n, inc)) and not match_name(n, exc)]
        if stuck:
            name, m = stuck[0]
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) cannot be quantized: it computes from its raw weight tensors, "
                f"not through Linear.forward, so converting it would leave it 16-bit; build the model with nn.Linear "
                f"projections (e.g. bitflow.models.layers.Attention) or exclude it ({pre}exclude=[..., {name!r}])"
                + (f"; {len(stuck)} such layers: {[n for n, _ in stuck][:6]}" if len(stuck) > 1 else "")
            )
    if not targets:
        available = [n for n, _ in candidates][:8]
        # name the kinds the model holds (nn.Linear, and torch_geometric's Linear only in a model that has one)
        held = [k for k in _tuple(kinds) if any(isinstance(m, k) for m in model.modules())] or list(_tuple(kinds))[:1]
        kind_names = " or ".join(
            ("nn." if k.__module__.startswith("torch.nn") else f"{k.__module__.split('.')[0]}.nn.") + k.__name__
            for k in held
        )
        raise ValueError(
            f"{pre}include={list(inc) if inc is not None else None} {pre}exclude={list(exc)} match no "
            f"{kind_names} layer of {type(model).__name__}; available (first {len(available)}): {available}"
        )
    if not tied_together:
        return targets
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight") if name else None
        if w is not None:
            holders.setdefault(id(w), []).append(name)
    chosen = {name for name, _ in targets}
    for name, m in targets:
        w = m._parameters.get("weight")
        left_out = sorted({n for n in holders.get(id(w), []) if n not in chosen}) if w is not None else []
        if left_out and not all(model.get_submodule(n) is m for n in left_out):
            raise ValueError(
                f"{name}.weight is tied to {left_out}, which {pre}include/{pre}exclude leave out; select both "
                f"sides or neither (e.g. a tied lm_head needs {pre}exclude=[] and the embedding converted too)"
            )
    return targets


def replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put ``new[id(old)]`` in every slot that holds ``old`` (a module may be registered under several names).

    The forward hooks and pre-hooks registered on ``old`` move to its replacement (same handles: removing a handle
    removes the hook from the new module too).
    """
    olds = {id(m): m for _, m in model.named_modules() if id(m) in new}
    for key, old in olds.items():
        for attr in _HOOK_DICTS:
            if hasattr(old, attr) and hasattr(new[key], attr):
                setattr(new[key], attr, getattr(old, attr))
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)
