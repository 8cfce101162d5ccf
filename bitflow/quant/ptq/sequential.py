"""Sequential, block-by-block GPTQ of a decoder (Frantar et al., arXiv 2210.17323, section 5): each block's layers
are calibrated on the outputs of the blocks below it *after* those were quantized, so later layers correct for the
error of earlier ones.

1. The inputs of the first block are captured once for all calibration windows (a forward pre-hook that stops the
   model there).
2. For each block in order: run it on the stored inputs with forward hooks on its targeted layers that accumulate
   each layer's Hessian ``2 X^T X / n`` (layers reading the same tensor, such as ``wq``/``wk``/``wv``, share one
   Gram matrix per batch); quantize those layers; run the block again, now quantized, to get the next block's
   inputs.
3. Targeted layers outside the blocks (e.g. ``lm_head`` when a user includes it) are calibrated last on a forward
   pass of the whole, already quantized model.

The blocks are the children of the first ``nn.ModuleList`` of the model that holds a targeted layer
(``layers`` in :class:`~bitflow.models.llama.Llama`); a block is called with the positional and keyword arguments
the model passed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from bitflow.quant.ptq.gptq import HessianAccumulator, gram

__all__ = ["calibrate_sequential"]

log = logging.getLogger("bitflow.ptq")

# called once per targeted layer with (name, layer, Hessian); sets the layer's weight to its quantized value
QuantizeFn = Callable[[str, nn.Linear, Tensor], None]


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def _blocks(model: nn.Module, names: list[str]) -> tuple[str, list[nn.Module]]:
    """``(prefix, blocks)``: the first ModuleList holding a targeted layer, or ``("", [])`` when there is none."""
    for prefix, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and any(n.startswith(prefix + ".") for n in names):
            return prefix, list(m)
    return "", []


class _Capture:
    """Forward hooks on some Linear layers that add each input to the layer's :class:`HessianAccumulator`."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in layers.items()}
        self._last: tuple[Tensor, Tensor] | None = None  # (input, its Gram): wq/wk/wv read the same tensor
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if self._last is None or self._last[0] is not x:
                self._last = (x, gram(x))
            self.acc[name].add_gram(self._last[1], x.numel() // x.shape[-1])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


@torch.no_grad()
def calibrate_sequential(
    model: nn.Module, names: list[str], windows: Tensor, quantize: QuantizeFn, batch_size: int = 8
) -> None:
    """Quantize the layers ``names`` of ``model`` (a decoder taking token ids ``[B, T]``) block by block, calling
    ``quantize(name, layer, H)`` with each layer's Hessian from ``windows`` (``[N, T]`` token ids).

    ``quantize`` must leave the layer's weight quantized (the next blocks are calibrated on its output).
    """
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    try:
        prefix, blocks = _blocks(model, names)
        batches = list(windows.split(batch_size))
        done: set[str] = set()
        if blocks:
            inputs = _block_inputs(model, blocks[0], batches)
            for i, block in enumerate(blocks):
                here = [n for n in names if n.startswith(f"{prefix}.{i}.")]
                if here:
                    _quantize_group(here, modules, quantize, partial(_run_block, block, inputs))
                    done.update(here)
                if i + 1 < len(blocks):
                    inputs = [((block(*a, **k), *a[1:]), k) for a, k in inputs]
        rest = [n for n in names if n not in done]
        if rest:
            _quantize_group(rest, modules, quantize, partial(_run_model, model, batches))
    finally:
        model.train(was_training)


def _block_inputs(
    model: nn.Module, first: nn.Module, batches: list[Tensor]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The ``(args, kwargs)`` the model passes its first block, for every batch."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(b)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _quantize_group(
    names: list[str], modules: dict[str, nn.Module], quantize: QuantizeFn, run: Callable[[], Any]
) -> None:
    """Accumulate the Hessians of ``names`` over one pass of ``run`` (batch by batch), then quantize each."""
    layers = {n: modules[n] for n in names}
    capture = _Capture(layers)
    try:
        run()
    finally:
        capture.remove()
    for n in names:
        quantize(n, layers[n], capture.acc[n].hessian())
        capture.acc[n] = None  # free the Hessian before the next layer's



def _run_block(block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    for args, kwargs in inputs:
        block(*args, **kwargs)


def _run_model(model: nn.Module, batches: list[Tensor]) -> None:
    for b in batches:
        model(b)
