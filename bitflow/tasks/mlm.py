"""Masked language modelling (BERT) with the :class:`~bitflow.models.encoder.Encoder` on token windows.

The batches are the decoder's token windows (:class:`~bitflow.data.TokenDataModule`); each is corrupted by
:func:`~bitflow.data.mlm.mask_tokens` with a generator seeded by ``(task.seed, step)`` (validation: by batch index,
the same masks at every validation), so a resumed run is exact. ``[MASK]`` is one id past the tokenizer's vocabulary.
Metrics: ``val/loss`` (cross-entropy over the masked positions), ``val/masked_acc``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.data.mlm import IGNORE, mask_tokens, step_generator
from bitflow.models.encoder import Encoder, EncoderConfig
from bitflow.tasks.module import TaskModule

__all__ = ["MLMModule"]


class MLMModule(TaskModule):
    """BERT-style MLM. ``task`` options: ``mask_prob`` (0.15), ``seed``."""

    task_name = "mlm"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        return Encoder(EncoderConfig.from_dict(config))

    @classmethod
    def data_sizes(cls, datamodule: Any, options: dict[str, Any]) -> dict[str, int]:
        return {"vocab_size": datamodule.vocab_size + 1}  # + [MASK]

    @property
    def mask_id(self) -> int:
        return self.model.config.vocab_size - 1

    def corrupt(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch[:, :-1]
        return mask_tokens(tokens, self.mask_id, self.mask_id, generator, self.task_options.get("mask_prob", 0.15))

    def masked_loss(self, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple:
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction=reduction)
        return loss, logits

    def train_loss(self, batch: torch.Tensor) -> torch.Tensor:
        g = step_generator(self.task_options.get("seed", 0), self.global_step)
        return self.masked_loss(*self.corrupt(batch, g))[0]

    def validate(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, labels = self.corrupt(batch, step_generator(self.task_options.get("seed", 0), batch_idx, salt=1))
        loss, logits = self.masked_loss(inputs, labels, reduction="sum")
        masked = labels != IGNORE
        n = masked.sum()
        self.add("loss", loss, n)
        self.add("masked_acc", (logits.argmax(-1)[masked] == labels[masked]).sum(), n)
