"""Plain nn.Module models (no Lightning in them), and :func:`model_root`, the one unwrap helper."""

from __future__ import annotations

from torch import nn

__all__ = ["model_root"]


def model_root(module: nn.Module) -> nn.Module:
    """The model inside a LightningModule (``module.model``, as bitflow's LanguageModel holds its Llama), or
    ``module`` itself when it has no ``model`` submodule: the module whose layer names quant states and recipes
    use, and the decoder that evaluation runs. The one unwrap helper of bitflow."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module
