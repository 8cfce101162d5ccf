"""The quantization state of a model as plain data, so checkpoints can rebuild it before the weights load.

A checkpoint of a run that switched precision (Nielsen et al., arXiv 2502.11895) holds a model whose layers are
partly ``BitLinear``; the state dict alone cannot say which. The quant state records it::

    {"kind": "bitlinear",
     "layers": ["layers.0.attn.wq", ...],              # qualified names of the converted nn.Linear layers
     "options": {"weight_scale": "absmean", ...},      # BitLinear's keyword options
     "strength": {"weight": 1.0, "act": 1.0}}          # lambda of weights and activations

:func:`capture_quant_state` reads it off a model, :func:`apply_quant_state` rebuilds it on a fresh 16-bit model of
the same architecture (``LanguageModel.on_load_checkpoint`` does this before the state dict loads). Other kinds
(e.g. a later ``"dqt"``) plug in through :func:`register_quant_kind`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from bitflow.quant.bitlinear import _DEFAULT_OPTIONS, BitLinear, get_strength, set_strength
from bitflow.quant.convert import to_bitlinear

__all__ = ["QUANT_KINDS", "apply_quant_state", "bitlinear_state", "capture_quant_state", "register_quant_kind"]

QuantState = dict[str, Any]
_APPLIERS: dict[str, Callable[[nn.Module, QuantState], list[str]]] = {}
_CAPTURERS: dict[str, Callable[[nn.Module], QuantState | None]] = {}
QUANT_KINDS: tuple[str, ...] = ()


def register_quant_kind(
    kind: str,
    apply: Callable[[nn.Module, QuantState], list[str]],
    capture: Callable[[nn.Module], QuantState | None],
) -> None:
    """Make :func:`apply_quant_state` / :func:`capture_quant_state` handle states of ``kind``.

    ``apply(model, state)`` rebuilds the state in place (idempotent: applying it to a model that already has it
    changes nothing) and returns the affected layer names; ``capture(model)`` returns the state or ``None``.
    """
    global QUANT_KINDS
    _APPLIERS[kind] = apply
    _CAPTURERS[kind] = capture
    QUANT_KINDS = tuple(_APPLIERS)


def bitlinear_state(layers: list[str], options: dict[str, Any], weight: float, act: float) -> QuantState:
    """A ``"bitlinear"`` quant state (plain Python data: it goes into checkpoints and YAML as it is)."""
    return {
        "kind": "bitlinear",
        "layers": list(layers),
        "options": copy.deepcopy(dict(options)),
        "strength": {"weight": float(weight), "act": float(act)},
    }


def apply_quant_state(model: nn.Module, state: QuantState) -> list[str]:
    """Rebuild the quantization ``state`` on ``model`` in place; returns the layer names it covers.

    For ``"bitlinear"``: the named ``nn.Linear`` layers become ``BitLinear`` with the recorded options (the same
    Parameters continue, so a state dict saved after the conversion loads unchanged) and both strengths are set.
    Layers that are already BitLinear are kept. Raises ``ValueError`` for an unknown kind, a malformed state or a
    layer name the model does not have.
    """
    if not isinstance(state, dict) or "kind" not in state:
        raise ValueError(f"a quant state must be a dict with a 'kind' key, got {state!r}")
    kind = state["kind"]
    if kind not in _APPLIERS:
        raise ValueError(f"unknown quant state kind {kind!r}; known kinds: {', '.join(QUANT_KINDS)}")
    return _APPLIERS[kind](model, state)


def capture_quant_state(model: nn.Module) -> QuantState | None:
    """The quant state of ``model`` (the first registered kind that finds something), or ``None`` for a model
    without quantized layers. Reads the strength buffers (a host sync: call it at checkpoint time, not per step)."""
    for capture in _CAPTURERS.values():
        state = capture(model)
        if state is not None:
            return state
    return None


def _apply_bitlinear(model: nn.Module, state: QuantState) -> list[str]:
    missing = {"layers", "options", "strength"} - set(state)
    if missing:
        raise ValueError(f"bitlinear quant state lacks {sorted(missing)}; it has {sorted(state)}")
    layers, options, strength = list(state["layers"]), dict(state["options"]), dict(state["strength"])
    if not layers:
        raise ValueError("bitlinear quant state names no layers")
    modules = dict(model.named_modules())
    absent = [name for name in layers if name not in modules]
    if absent:
        raise ValueError(
            f"the quant state names layers that {type(model).__name__} does not have: {absent[:8]} "
            "(is the checkpoint from another architecture?)"
        )
    wrong = [name for name in layers if not isinstance(modules[name], nn.Linear)]
    if wrong:
        raise ValueError(f"the quant state names layers that are not nn.Linear: {wrong[:8]}")
    full = {**_DEFAULT_OPTIONS, **options}
    clash = [name for name in layers if isinstance(modules[name], BitLinear) and modules[name].options() != full]
    if clash:
        raise ValueError(
            f"layers {clash[:4]} are already BitLinear with options {modules[clash[0]].options()}, "
            f"not the quant state's {full}"
        )
    todo = [name for name in layers if not isinstance(modules[name], BitLinear)]
    if todo:
        # exact names: a glob without wildcards matches only that name (or a dotted suffix, absent here)
        converted = to_bitlinear(model, include=todo, exclude=None, **options)
        extra = sorted(set(converted) - set(todo))
        if extra:  # only possible if a name is also a dotted suffix of another module's name
            raise ValueError(f"apply_quant_state converted layers it was not asked to: {extra}")
    set_strength(model, weight=strength.get("weight"), act=strength.get("act"))
    return layers


def _capture_bitlinear(model: nn.Module) -> QuantState | None:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    if not found:
        return None
    options = found[0][1].options()
    differ = [name for name, m in found if m.options() != options]
    if differ:
        raise ValueError(
            f"the BitLinear layers of {type(model).__name__} have different options ({differ[:4]} differ from "
            f"{found[0][0]}); a bitlinear quant state holds one set of options"
        )
    strength = get_strength(model)  # raises if the layers disagree
    return bitlinear_state([name for name, _ in found], options, strength["weight"], strength["act"])


register_quant_kind("bitlinear", _apply_bitlinear, _capture_bitlinear)

# the "dqt" kind (Direct Quantized Training, arXiv 2412.04787) registers itself when bitflow.quant.dqt is imported;
# importing it here makes every checkpoint load know it
import bitflow.quant.dqt  # noqa: E402, F401
