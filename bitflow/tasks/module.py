"""The base of the task LightningModules: :class:`~bitflow.lm.LanguageModel`'s optimizer groups, LR schedule,
quantization recipe and checkpoint format, with the model, the loss and the validation metrics of a task.

A task module implements ``build_model`` (its family), ``train_loss(batch)``, ``validate(batch, batch_idx)``
(which adds to the metric sums with :meth:`TaskModule.add`) and ``data_sizes`` (the model sizes the data decides).
Every metric is logged as ``val/<name>`` = the sum over all validation batches and ranks / the count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from bitflow.checkpoint import CHECKPOINT_KEY
from bitflow.lm import LanguageModel

__all__ = ["TaskModule"]


class TaskModule(LanguageModel):
    """A LanguageModel whose model, loss and validation metrics belong to a task (``task`` = its options)."""

    task_name: ClassVar[str] = ""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        tokenizer_json: str | None = None,
        quant: dict[str, Any] | None = None,
        task: dict[str, Any] | None = None,
    ) -> None:
        self.task_options = dict(task or {})
        super().__init__(model, optimizer, scheduler, compile, tokenizer_json, quant)
        self._sums: dict[str, torch.Tensor] = {}

    @classmethod
    def data_sizes(cls, datamodule: Any, options: dict[str, Any]) -> dict[str, int]:
        """The model fields the prepared data decides (vocabulary, features, classes)."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward(*args, **kwargs)

    def train_loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, batch: Any, batch_idx: int) -> None:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.train_loss(batch)
        self.last_loss = loss.detach()  # NonFiniteGuard checks it before the optimizer step, on the device
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    # ---------------------------------------------------------------- validation
    def add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        """Add ``total`` (a sum over examples, any shape) and ``count`` to the metric ``name``."""
        total = total.detach().double()
        count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        if name in self._sums:
            self._sums[name] = self._sums[name] + total
            self._sums[name + "#n"] = self._sums[name + "#n"] + count
        else:
            self._sums[name], self._sums[name + "#n"] = total, count

    def on_validation_epoch_start(self) -> None:
        self._sums = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validate(batch, batch_idx)

    def reduced(self) -> dict[str, torch.Tensor]:
        """The metric sums over all ranks, divided by their counts."""
        out = {}
        for name in [n for n in self._sums if not n.endswith("#n")]:
            total = self.trainer.strategy.reduce(self._sums[name], reduce_op="sum")
            count = self.trainer.strategy.reduce(self._sums[name + "#n"], reduce_op="sum")
            out[name] = total / count.clamp(min=1)
        return out

    def metrics(self, reduced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The scalars to log from the reduced sums (default: every scalar sum)."""
        return {k: v for k, v in reduced.items() if v.numel() == 1}

    def on_validation_epoch_end(self) -> None:
        if not self._sums:
            return
        for name, value in self.metrics(self.reduced()).items():
            self.log(f"val/{name}", value.float(), prog_bar=name == "loss", sync_dist=False, rank_zero_only=False)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["task"] = self.task_name

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get("task", "causal_lm")
        if saved != self.task_name:
            raise ValueError(f"the checkpoint was trained with task={saved}, this run has task={self.task_name}")
        super().on_load_checkpoint(checkpoint)
