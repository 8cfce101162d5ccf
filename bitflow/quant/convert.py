"""Swap ``nn.Linear`` <-> :class:`~bitflow.quant.BitLinear` in any model, in place, keeping the Parameters.

Continual quantization-aware pre-training (Nielsen et al., arXiv 2502.11895) turns a 16-bit model into a BitNet
at step t0: the same weight/bias tensors continue as the latent weights of BitLinear. Both functions here reuse the
very same ``Parameter`` objects (same ``id()``), so an optimizer built on the 16-bit model keeps its state, and a
weight tied between ``lm_head`` and the token embedding stays tied.

Layer selection (include/exclude globs) is :func:`bitflow.quant.select.select_layers`, shared by every recipe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from bitflow.models import is_sharded
from bitflow.quant.bitlinear import _DEFAULT_OPTIONS, _OPTION_NAMES, BitLinear, _validate_options
from bitflow.quant.select import first_names, linear_kinds, match_name, replace_modules, select_layers

__all__ = ["as_linear", "bitlinear_targets", "match_name", "to_bitlinear", "to_linear"]


def _plain_linear(in_features: int, out_features: int, weight: nn.Parameter, bias: nn.Parameter | None,
                  training: bool) -> nn.Linear:
    """An ``nn.Linear`` holding the given Parameters (no copy, no new init)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = weight
    linear.bias = bias
    linear.train(training)
    return linear


def as_linear(module: nn.Module, name: str = "") -> nn.Linear:
    """``module`` as an ``nn.Linear`` over the very same Parameters: itself if it is one; a torch-geometric
    ``Linear`` (``y = x W^T + b``, weight [out, in], as in its convolutions) as an equivalent ``nn.Linear``.
    Raises ``ValueError`` naming the layer for anything else, or for a lazy layer not initialised yet."""
    if isinstance(module, nn.Linear):
        return module
    kinds = linear_kinds()
    if len(kinds) > 1 and isinstance(module, kinds[1]):
        if module.in_channels <= 0 or isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r}: a lazy torch-geometric Linear (in_channels=-1) cannot be quantized "
                             "before its first forward; give the convolution its input size")
        return _plain_linear(module.in_channels, module.out_channels, module.weight, module.bias, module.training)
    raise ValueError(f"layer {name!r} ({type(module).__name__}) is not a linear layer that can be quantized")


def bitlinear_targets(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    *,
    key: str = "quant",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, nn.Linear)`` pairs :func:`to_bitlinear` would convert; changes nothing (a recipe's ``plan``).

    Layers that are already BitLinear are not candidates. Raises ``ValueError`` when the filters select nothing.
    """
    if isinstance(model, nn.Linear):
        raise ValueError(
            "to_bitlinear converts the Linear layers inside a model; for one layer use BitLinear.from_linear"
        )
    try:
        return select_layers(model, linear_kinds(), include, exclude, skip=BitLinear, tied_together=False, key=key)
    except ValueError as e:
        already = len(first_names(model, BitLinear))
        if already and "match no" in str(e):
            raise ValueError(f"{e}; {already} layer(s) are already BitLinear") from None
        raise


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

    Returns the qualified names converted, in module order. Forward hooks of a converted layer move to its
    BitLinear. Raises ``ValueError`` for invalid options or when the filters select no layer (the message lists the
    patterns and some available Linear names); nothing is changed then.
    """
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ValueError(f"unknown BitLinear option(s) {sorted(unknown)}; allowed: {sorted(_OPTION_NAMES)}")
    targets = bitlinear_targets(model, include, exclude, key="")
    full = {**_DEFAULT_OPTIONS, **options}
    linears = {id(m): as_linear(m, n) for n, m in targets}  # torch-geometric Linear -> nn.Linear, same Parameters
    for m in linears.values():  # validate every layer before touching any
        _validate_options(m.in_features, **full)
    sharded = {key for key, m in linears.items() if is_sharded(m.weight)}
    for key in sharded:  # FSDP2 holds these modules by identity: they become BitLinear in place (same object)
        BitLinear.become(linears[key], **options)
    replace_modules(model, {key: BitLinear.from_linear(m, **options) for key, m in linears.items() if key not in sharded})
    return [name for name, _ in targets]



def to_linear(model: nn.Module) -> list[str]:
    """Turn every ``BitLinear`` of ``model`` back into a plain ``nn.Linear``, in place, reusing its Parameters.

    Returns the qualified names converted, in module order; raises ``ValueError`` if there is no BitLinear.
    """
    if isinstance(model, BitLinear):
        raise ValueError("to_linear converts the BitLinear layers inside a model, not a bare BitLinear")
    found = first_names(model, BitLinear)
    if not found:
        raise ValueError(f"to_linear: {type(model).__name__} contains no BitLinear layer")
    new = {id(m): _plain_linear(m.in_features, m.out_features, m.weight, m.bias, m.training) for _, m in found}
    replace_modules(model, new)
    return [name for name, _ in found]
