"""Classification tasks: the wide MLP on bag-of-tokens features (``text_classification``) and SGC/GCN on a graph
(``node_classification``). Metrics: ``val/loss`` (cross-entropy), ``val/acc``, ``val/macro_f1`` (the unweighted
mean over the classes of the validation split's F1; a class with no true and no predicted example is left out).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.tasks.module import TaskModule

__all__ = ["NodeClassificationModule", "TextClassificationModule", "macro_f1"]


def macro_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """Mean over classes of F1 = 2 tp / (2 tp + fp + fn), over the classes with 2 tp + fp + fn > 0."""
    denom = 2 * tp + fp + fn
    present = denom > 0
    return (2 * tp[present] / denom[present]).mean() if present.any() else torch.zeros((), dtype=tp.dtype)


class _Classifier(TaskModule):
    def add_predictions(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Loss, accuracy and the per-class counts of macro-F1 of one batch."""
        n = labels.numel()
        self.add("loss", F.cross_entropy(logits.float(), labels, reduction="sum"), n)
        pred = logits.argmax(-1)
        self.add("acc", (pred == labels).sum(), n)
        k = logits.shape[-1]
        hit = F.one_hot(pred, k).bool(), F.one_hot(labels, k).bool()
        self.add("#tp", (hit[0] & hit[1]).sum(0), 1)
        self.add("#fp", (hit[0] & ~hit[1]).sum(0), 1)
        self.add("#fn", (~hit[0] & hit[1]).sum(0), 1)

    def metrics(self, reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in reduced.items() if not k.startswith("#")}
        out["macro_f1"] = macro_f1(reduced["#tp"], reduced["#fp"], reduced["#fn"])
        return out


class TextClassificationModule(_Classifier):
    """The wide MLP on ``(features [B, F], labels [B])`` batches."""

    task_name = "text_classification"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from bitflow.models.mlp import WideMLP, WideMLPConfig

        return WideMLP(WideMLPConfig.from_dict(config))

    @classmethod
    def data_sizes(cls, datamodule: Any, options: dict[str, Any]) -> dict[str, int]:
        return {"in_features": datamodule.n_features, "n_classes": datamodule.n_classes}

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float(), y)

    def validate(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.add_predictions(self(x), y)


class NodeClassificationModule(_Classifier):
    """SGC/GCN on one graph, full batch: the loss over the training mask, metrics over the validation mask."""

    task_name = "node_classification"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        from bitflow.models.gnn import GNN, GNNConfig

        return GNN(GNNConfig.from_dict(config))

    @classmethod
    def data_sizes(cls, datamodule: Any, options: dict[str, Any]) -> dict[str, int]:
        return {"in_features": datamodule.n_features, "n_classes": datamodule.n_classes}

    def train_loss(self, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(graph["x"], graph["edge_index"])
        mask = graph["train_mask"]
        return F.cross_entropy(logits[mask].float(), graph["y"][mask])

    def validate(self, graph: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(graph["x"], graph["edge_index"])
        mask = graph["val_mask"]
        self.add_predictions(logits[mask], graph["y"][mask])
