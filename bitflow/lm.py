"""The LightningModule: next-token cross-entropy, AdamW groups, LR schedule, metrics, checkpoint contents."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from bitflow.models.llama import Llama, LlamaConfig
from bitflow.schedules import LRSchedule

CHECKPOINT_KEY = "bitflow"
FORMAT_VERSION = 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay only on tensors with 2+ dims (matrices, embeddings), not on norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class LanguageModel(L.LightningModule):
    """Trains a :class:`~bitflow.models.llama.Llama` on batches of token ids [B, T+1].

    Args:
        model: ``LlamaConfig`` fields.
        optimizer: AdamW settings: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``fused``.
        scheduler: ``LRSchedule`` fields except ``total_steps`` (taken from the trainer's ``max_steps``).
        compile: run the model's forward through ``torch.compile``.
        tokenizer_json: the tokenizer, serialised; stored in every checkpoint so a checkpoint is self-contained.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        tokenizer_json: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])
        self.model = Llama(LlamaConfig.from_dict(dict(model)))
        self.optimizer_cfg = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
        self.optimizer_cfg.update(optimizer or {})
        self.scheduler_cfg = dict(scheduler or {})
        self.tokenizer_json = tokenizer_json
        # what the quantization callbacks did to the model; restored from checkpoints (bitflow.quant.state)
        self.quant_state: dict[str, Any] | None = None
        # a callback may wrap the LR schedule (e.g. the re-warmup after an optimizer reset); pure in the step
        self.lr_wrappers: list[Callable[[Callable[[int], float]], Callable[[int], float]]] = []
        self._forward = torch.compile(self.model) if compile else self.model
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None
        self._last_time: float | None = None

    # ---------------------------------------------------------------- forward and loss
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)

    def loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of a batch [B, T+1]."""
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction=reduction)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen = getattr(self, "tokens_seen", 0) + tokens * world
        self.log("train/tokens_seen", float(self.tokens_seen))
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("train/tokens_per_sec", tokens * world / max(now - self._last_time, 1e-9))
        self._last_time = now
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # every run validates (and so checkpoints) at its last step, whatever trainer.val_check_interval is:
        # Lightning's training loop runs the validation of a batch after which the trainer should stop
        if self._trainer is not None and 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def on_train_epoch_start(self) -> None:
        self._last_time = None

    def on_validation_start(self) -> None:
        self._last_time = None  # do not count validation time as training time

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._val_sum += self.loss(batch, reduction="sum").double()
        self._val_count += batch.shape[0] * (batch.shape[1] - 1)

    def on_validation_epoch_end(self) -> None:
        # exact token-weighted mean over all ranks (shards may be uneven, so no mean of means)
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(count) == 0:
            return
        val_loss = (total / count).float()
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val/ppl", torch.exp(val_loss.clamp(max=30)))

    # ---------------------------------------------------------------- optimizer and schedule
    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR at ``step``: the configured schedule, wrapped by any callback's change."""
        fn: Callable[[int], float] = self.lr_schedule
        for wrap in self.lr_wrappers:
            fn = wrap(fn)
        return fn(step)

    @property
    def lr_schedule(self) -> LRSchedule:
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 1
        return LRSchedule(total_steps=total, **self.scheduler_cfg)

    def configure_optimizers(self) -> dict[str, Any]:
        from bitflow.quant.dqt import build_adamw

        cfg = dict(self.optimizer_cfg)
        fused = cfg.pop("fused", None)
        # torch.optim.AdamW, or DQTAdamW when the model has DQT layers or the DQT callback asks for it
        opt = build_adamw(
            self.model,
            param_groups(self.model, cfg.pop("weight_decay")),
            dqt=getattr(self, "dqt_optimizer", None),
            lr=cfg.pop("lr"),
            betas=tuple(cfg.pop("betas")),
            fused=fused,
            **cfg,
        )
        self.lr_schedule  # validate the schedule before the first step  # noqa: B018
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "version": FORMAT_VERSION,
            "model_config": self.model.config.to_dict(),
            "tokenizer": self.tokenizer_json,
            "quant": self.quant_state,
            "tokens_seen": getattr(self, "tokens_seen", 0),
            # the LR schedule's length: a resume with another trainer.max_steps would reshape it
            "max_steps": self.trainer.max_steps if self._trainer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError("this checkpoint was not written by bitflow (it has no 'bitflow' section)")
        check_same_model(self.model.config.to_dict(), meta["model_config"])
        if self.tokenizer_json is None:
            self.tokenizer_json = meta.get("tokenizer")
        self.tokens_seen = meta.get("tokens_seen", 0)
        if meta.get("quant"):
            from bitflow.quant.state import apply_quant_state

            apply_quant_state(self.model, meta["quant"])
            self.quant_state = meta["quant"]


def check_same_model(config: dict[str, Any], checkpoint_config: dict[str, Any]) -> None:
    """Raise a ValueError naming every field where a checkpoint's model config differs from ``config``."""
    diff = {k: (checkpoint_config.get(k), v) for k, v in config.items() if checkpoint_config.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the checkpoint is from another model ({details})")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a bitflow checkpoint file as a dict, with clear errors for a missing or foreign file.

    ``mmap=True`` maps tensors lazily from disk: cheap when only the ``bitflow`` section is needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # pickle errors, truncated files, text files...
        raise ValueError(f"{path} is not a bitflow checkpoint (torch.load failed: {e})") from e
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a bitflow checkpoint (no '{CHECKPOINT_KEY}' section)")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LanguageModel:
    """Rebuild the LanguageModel from a checkpoint: config, weights, tokenizer and quantization state."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters", {}))
    hp["model"] = ckpt[CHECKPOINT_KEY]["model_config"]
    hp["compile"] = False
    lm = LanguageModel(**{k: v for k, v in hp.items() if k in ("model", "optimizer", "scheduler", "compile")})
    lm.on_load_checkpoint(ckpt)
    lm.load_state_dict(ckpt["state_dict"])
    return lm.to(map_location).eval()

