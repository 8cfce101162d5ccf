"""Graph neural networks for node classification through torch-geometric: SGC (Wu et al. 2019, arXiv 1902.07153)
with K propagation steps, and the two-layer GCN (Kipf & Welling 2017, arXiv 1609.02907).

Their convolutions hold a torch-geometric ``Linear`` (not an ``nn.Linear``); the quantization conversion
(:func:`bitflow.quant.to_bitlinear`) converts those too, keeping their Parameters. torch-geometric is the ``graph``
extra: ``pip install -e '.[graph]'`` (``make install`` installs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.layers import ConfigMixin

__all__ = ["GNN", "GNNConfig", "require_pyg"]

ARCHS = ("sgc", "gcn")
MISSING_PYG = (
    "graph models and node classification need torch-geometric, which is not installed; install the `graph` extra: "
    "pip install -e '.[graph]' (make install does), or pip install torch_geometric"
)


def require_pyg() -> ModuleType:
    """``torch_geometric``, or ImportError naming the ``graph`` extra."""
    try:
        import torch_geometric
    except ImportError as e:
        raise ImportError(MISSING_PYG) from e
    return torch_geometric


@dataclass
class GNNConfig(ConfigMixin):
    """Shape of the GNN. ``in_features`` and ``n_classes`` come from the graph (set by the CLI)."""

    arch: str = "sgc"  # sgc (one linear layer after K propagation steps) | gcn (two GCNConv layers)
    in_features: int = 8192  # node features
    n_classes: int = 2  # classes of the nodes
    K: int = 2  # SGC's propagation steps
    d_hidden: int = 64  # GCN's hidden width
    dropout: float = 0.0  # GCN's dropout (0: a resumed run matches an uninterrupted one exactly)

    def __post_init__(self) -> None:
        self._choice("arch", ARCHS)
        self._positive("in_features", "n_classes", "K", "d_hidden")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GNNConfig.dropout={self.dropout!r} is not allowed; allowed: a number in [0, 1)")


class GNN(nn.Module):
    """``(x [N, F], edge_index [2, E])`` -> node logits [N, n_classes]. Propagation uses the symmetric
    normalisation with self-loops, D^-1/2 (A + I) D^-1/2 (torch-geometric's ``gcn_norm``)."""

    def __init__(self, config: GNNConfig) -> None:
        super().__init__()
        require_pyg()
        from torch_geometric.nn import GCNConv, SGConv

        self.config = config
        if config.arch == "sgc":
            # cached: S^K X is computed at the first forward and reused (one fixed graph per run: transductive)
            self.convs = nn.ModuleList([SGConv(config.in_features, config.n_classes, K=config.K, cached=True)])
        else:
            self.convs = nn.ModuleList(
                [GCNConv(config.in_features, config.d_hidden), GCNConv(config.d_hidden, config.n_classes)]
            )

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count (no embedding: ``non_embedding`` changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.dropout(F.relu(x), self.config.dropout, self.training)
        return x
