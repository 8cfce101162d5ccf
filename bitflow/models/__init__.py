"""Plain nn.Module models (no Lightning in them), and :func:`model_root`, the one unwrap helper."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["gathered", "is_sharded", "model_root"]


def model_root(module: nn.Module) -> nn.Module:
    """The model inside a LightningModule (``module.model``, as bitflow's LanguageModel holds its Llama), or
    ``module`` itself when it has no ``model`` submodule: the module whose layer names quant states and recipes
    use, and the decoder that evaluation runs. The one unwrap helper of bitflow."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def is_sharded(tensor_or_module: torch.Tensor | nn.Module) -> bool:
    """Whether a weight is a DTensor (FSDP2's ``fully_shard`` shards it between forwards), or a module holds one.
    Statistics of such weights are collectives: every rank must compute them, not only the one that logs."""
    if isinstance(tensor_or_module, nn.Module):
        return any(is_sharded(p) for p in tensor_or_module.parameters())
    return type(tensor_or_module).__name__ == "DTensor"


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly FSDP2-sharded or replicated DTensor) tensor as a plain tensor; a collective
    when it is a DTensor, so every rank must call it."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
