"""Span corruption (T5) with the :class:`~bitflow.models.encdec.EncoderDecoder` on token windows.

Each window is corrupted by :func:`~bitflow.data.span.span_corrupt` (generator seeded by ``(task.seed, step)``;
validation: by batch index). Ids past the tokenizer's vocabulary: ``n_sentinels`` sentinels, then the decoder's
start token. Metric: ``val/loss`` (cross-entropy per target token, end-of-sequence included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitflow.data.mlm import step_generator
from bitflow.data.span import span_corrupt
from bitflow.models.encdec import EncoderDecoder, EncoderDecoderConfig
from bitflow.tasks.module import TaskModule

__all__ = ["SpanCorruptionModule"]


class SpanCorruptionModule(TaskModule):
    """T5 span corruption. ``task`` options: ``noise_density`` (0.15), ``mean_span`` (3), ``n_sentinels``,
    ``eos_id`` (set from the tokenizer), ``seed``."""

    task_name = "span_corruption"

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        return EncoderDecoder(EncoderDecoderConfig.from_dict(config))

    @classmethod
    def data_sizes(cls, datamodule: Any, options: dict[str, Any]) -> dict[str, int]:
        options["eos_id"] = datamodule.eos_id  # into the module's task options (and so its hyperparameters)
        return {"vocab_size": datamodule.vocab_size + options["n_sentinels"] + 1}

    @property
    def start_id(self) -> int:
        return self.model.config.vocab_size - 1

    def loss_of(self, batch: torch.Tensor, generator: torch.Generator, reduction: str = "mean") -> tuple:
        o = self.task_options
        first_sentinel = self.start_id - o["n_sentinels"]
        src, tgt = span_corrupt(batch[:, :-1], first_sentinel, o["eos_id"], generator, o.get("noise_density", 0.15),
                                o.get("mean_span", 3.0))
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], self.start_id), tgt[:, :-1]], dim=1)
        logits = self(src, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction=reduction), tgt.numel()

    def train_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_of(batch, step_generator(self.task_options.get("seed", 0), self.global_step))[0]

    def validate(self, batch: torch.Tensor, batch_idx: int) -> None:
        g = step_generator(self.task_options.get("seed", 0), batch_idx, salt=1)
        loss, n = self.loss_of(batch, g, reduction="sum")
        self.add("loss", loss, n)
