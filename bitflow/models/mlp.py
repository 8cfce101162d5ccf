"""A wide MLP over bag-of-tokens features for text classification, as a plain ``nn.Module``.

One wide hidden layer (Galke & Scherp 2022, "Bag-of-Words Baselines for Text Classification Are Still Strong";
the MLP of the "When are 1.58 bits enough?" study, arXiv 2411.05882): ``out(relu(hidden(x)))``. Both layers are
``nn.Linear``, so a quantization recipe converts both (the default ``exclude: [lm_head]`` matches neither).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.layers import ConfigMixin

__all__ = ["WideMLP", "WideMLPConfig"]


@dataclass
class WideMLPConfig(ConfigMixin):
    """Shape of the MLP. ``in_features`` and ``n_classes`` come from the data (set by the CLI)."""

    in_features: int = 8192  # bag-of-tokens features (the tokenizer's vocabulary)
    n_classes: int = 2  # classes of the dataset
    d_hidden: int = 1024  # the one wide hidden layer
    dropout: float = 0.0  # on the hidden layer (0: a resumed run matches an uninterrupted one exactly)

    def __post_init__(self) -> None:
        self._positive("in_features", "n_classes", "d_hidden")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"WideMLPConfig.dropout={self.dropout!r} is not allowed; allowed: a number in [0, 1)")


class WideMLP(nn.Module):
    """Features [B, in_features] -> class logits [B, n_classes]."""

    def __init__(self, config: WideMLPConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden = nn.Linear(config.in_features, config.d_hidden)
        self.out = nn.Linear(config.d_hidden, config.n_classes)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count (an MLP has no embedding: ``non_embedding`` changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.hidden(x)), self.config.dropout, self.training)
        return self.out(h)
