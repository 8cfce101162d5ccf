"""``compile``: how a decoder runs under ``torch.compile`` (the ``compile`` key of conf/train.yaml).

* ``false``: eager.
* ``true``: the decoder's hidden-state computation compiled as one graph (the LM head and the loss stay eager: the
  chunked loss of :mod:`bitflow.models.loss` keeps its memory bound).
* ``regional``: each transformer block compiled in place (``nn.Module.compile``). The blocks share their code, so
  one compilation serves them all (their weights are graph inputs, not constants): start-up costs one block's
  compilation instead of the whole model's, and quantized layers fuse within each block as in ``true``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["COMPILE_MODES", "check_compile", "compile_model"]

COMPILE_MODES = (False, True, "regional")


def check_compile(value: object) -> bool | str:
    """``value`` if it is a compile mode (``false``, ``true``, ``"regional"``), else ``ValueError`` naming the key."""
    if isinstance(value, bool) or value == "regional":
        return value
    raise ValueError(f"compile={value!r} is not allowed; allowed: false, true, regional")


def compile_model(model: nn.Module, mode: bool | str = False) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """``(logits module, hidden-states function)`` of a decoder with ``hidden_states``, ``lm_head`` and ``layers``
    (a :class:`~bitflow.models.llama.Llama`) for compile ``mode``; ``regional`` compiles ``model.layers`` in place.

    Each is compiled on its first call: training calls only the hidden states (the loss applies the head).
    """
    mode = check_compile(mode)
    # through the module call (model(x, hidden_only=True)), not model.hidden_states: FSDP2 gathers a sharded
    # model's weights around its forward; the other families (bitflow.tasks) compute their own losses
    decoder = hasattr(model, "hidden_states")
    if mode is True:
        compiled = torch.compile(model)
        return compiled, (functools.partial(compiled, hidden_only=True) if decoder else None)
    if mode == "regional":
        for block in getattr(model, "layers", ()):
            block.compile()
    return model, (functools.partial(model, hidden_only=True) if decoder else None)
