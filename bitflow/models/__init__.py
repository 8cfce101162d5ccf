"""Plain nn.Module models (no Lightning in them), and :func:`model_root`, the one unwrap helper."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["clip_grad_norm", "gathered", "grad_norm", "is_sharded", "model_root"]


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


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as a plain 0-dim tensor (no host sync). FSDP2-sharded (DTensor) and
    plain gradients may be mixed, as under ``trainer=fsdp`` with DQT, whose per-step leaves are plain tensors that
    every rank holds whole; a collective when any is sharded, so every rank must call it."""
    sharded = [g for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    parts = [gathered(_total_norm(sharded))] if sharded else []
    if plain:
        parts.append(_total_norm(plain))
    if not parts:
        return torch.zeros(())
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([p.to(device, torch.float32) for p in parts]))


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` together, in float32 (per-tensor norms by one foreach kernel; torch >= 2.4)."""
    norms = torch._foreach_norm(tensors)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))


@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place so that their joint 2-norm (:func:`grad_norm`) is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does (same ``1e-6`` guard), for mixed sharded and plain gradients; returns
    the norm before clipping."""
    total = grad_norm(grads)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    local = [g.to_local() if is_sharded(g) else g for g in grads]  # a shard's local tensor is a view of its data
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in local:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))
    return total
