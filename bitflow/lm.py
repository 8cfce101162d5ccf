"""The LightningModule: next-token cross-entropy, AdamW groups, LR schedule, metrics, the quantization recipe.

The module owns its quantization recipe (``quant`` config group, :mod:`bitflow.quant.recipes`): the recipe builds
the optimizer, runs its hook before each optimizer step and writes/restores the quantization state in
checkpoints. *When* the recipe converts the model is decided by :class:`~bitflow.callbacks.PrecisionTransition`.
The checkpoint format and file IO live in :mod:`bitflow.checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from bitflow.checkpoint import (  # read_checkpoint: re-exported, its home is bitflow.checkpoint
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    check_same_model,
    read_checkpoint,
)
from bitflow.models import (  # model_root: re-exported, its home is bitflow.models
    clip_grad_norm,
    is_sharded,
    model_root,
)
from bitflow.models.compile import compile_model
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.models.loss import next_token_loss
from bitflow.quant.recipe import QuantRecipe, adamw, unwrap_optimizer
from bitflow.quant.recipes import recipe_for_state, recipe_from_config
from bitflow.schedules import LRSchedule

__all__ = [
    "CHECKPOINT_KEY", "LanguageModel", "apply_weight_decay_factor", "default_optimizer_config", "load_checkpoint",
    "model_root", "param_groups", "read_checkpoint", "recipe_config_of",
]


def default_optimizer_config() -> dict[str, Any]:
    """conf/optimizer/adamw.yaml as a dict: the AdamW defaults (peak LR, betas, ...) of the CLI and of a
    LanguageModel built in Python alike."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(str(files("bitflow.conf") / "optimizer" / "adamw.yaml")))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


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


def apply_weight_decay_factor(optimizer: torch.optim.Optimizer, schedule: LRSchedule, step: int) -> None:
    """Set every param group's weight decay for the optimizer step ``step``: its configured value (kept in the
    group as ``initial_weight_decay``, which the optimizer's state dict carries into checkpoints) times
    ``schedule.weight_decay_factor(step)`` (Spectra's weight decay removal at ~2/3 of training)."""
    factor = schedule.weight_decay_factor(step)
    for group in optimizer.param_groups:
        group["weight_decay"] = group.setdefault("initial_weight_decay", group["weight_decay"]) * factor


class LanguageModel(L.LightningModule):
    """Trains a :class:`~bitflow.models.llama.Llama` on batches of token ids [B, T+1].

    Args:
        model: ``LlamaConfig`` fields.
        optimizer: AdamW settings: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``fused``; missing ones take
            conf/optimizer/adamw.yaml's values (:func:`default_optimizer_config`, the one home of the defaults).
        scheduler: ``LRSchedule`` fields except ``total_steps`` (taken from the trainer's ``max_steps``).
        compile: ``torch.compile`` mode: ``False``, ``True`` (the whole decoder) or ``"regional"`` (each block;
            :mod:`bitflow.models.compile`).
        tokenizer_json: the tokenizer, serialised; stored in every checkpoint so a checkpoint is self-contained.
        quant: the ``quant`` config: ``recipe`` (``none``, ``bitlinear``, ``dqt``) and its options; ``None`` =
            16-bit. The recipe is ``self.quant_recipe``.
        attention: the decoder's causal attention kernel, ``auto``, ``sdpa`` or ``matmul``
            (:func:`bitflow.models.llama.causal_attention`).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool | str = False,
        tokenizer_json: str | None = None,
        quant: Mapping[str, Any] | None = None,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_json"])
        self.model = self.build_model(dict(model))
        if hasattr(self.model, "set_attention"):  # (the decoders; other families have their own attention)
            self.model.set_attention(attention)
        self.optimizer_cfg = dict(optimizer or {})
        self.scheduler_cfg = dict(scheduler or {})
        self.tokenizer_json = tokenizer_json
        self.data_config: dict[str, Any] | None = None  # the run's data config, set by run_training; in checkpoints
        self.quant_recipe: QuantRecipe | None = recipe_from_config(quant)
        # a callback may wrap the LR schedule (e.g. the re-warmup after an optimizer reset); pure in the step
        self.lr_wrappers: list[Callable[[Callable[[int], float]], Callable[[int], float]]] = []
        self._forward, self._hidden_states = compile_model(self.model, compile)
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None
        self._last_time: float | None = None
        self._span = (0, 0.0)  # (tokens, seconds) of training steps since tokens/s was last logged
        # (global step, tokens/s) as last logged: read by RunSummary without touching a device tensor
        self.throughput: tuple[int, float] | None = None

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy, which sets ``device_mesh``): shard each decoder
        block, then the rest (embedding, final norm, tied head), with FSDP2's ``fully_shard``. A block's forward sees
        its all-gathered weights, so a BitLinear scale is over the whole matrix, as on one device."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in self.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True

    def build_model(self, config: dict[str, Any]) -> nn.Module:
        """The plain ``nn.Module`` this LightningModule trains, from the ``model`` config (the tasks of
        :mod:`bitflow.tasks` build their own families)."""
        return Llama(LlamaConfig.from_dict(config))

    # ---------------------------------------------------------------- forward and loss
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)

    def loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of a batch [B, T+1], chunked over tokens (:mod:`bitflow.models.loss`)."""
        return next_token_loss(self.model, batch, reduction, self._hidden_states)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.last_loss = loss.detach()  # NonFiniteGuard checks it before the optimizer step, on the device
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        self.log("train/loss", loss, prog_bar=True)  # a device tensor: read (synced) at logging steps only
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen = getattr(self, "tokens_seen", 0) + tokens * world
        now = time.perf_counter()
        if self._last_time is not None:  # the time since the previous step (validation excluded)
            self._span = (self._span[0] + tokens * world, self._span[1] + now - self._last_time)
        self._last_time = now
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            # a logged Python number becomes a device tensor (a blocking host-to-device copy): logging steps only
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
            self.log("train/tokens_seen", float(self.tokens_seen))
            if self._span[1] > 0:  # mean throughput over the steps since the previous logging step
                self.throughput = (self.trainer.global_step, self._span[0] / self._span[1])
                self.log("train/tokens_per_sec", self.throughput[1])
                self._span = (0, 0.0)
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
        cfg = {**default_optimizer_config(), **self.optimizer_cfg}
        if cfg.get("betas") is not None:
            cfg["betas"] = tuple(cfg["betas"])
        groups = param_groups(self.model, cfg.pop("weight_decay"))
        if cfg.get("fused") is None:
            cfg.pop("fused", None)
        build = self.quant_recipe.build_optimizer if self.quant_recipe is not None else adamw
        opt = build(self.model, groups, **cfg)
        self.lr_schedule  # validate the schedule before the first step  # noqa: B018
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except when FSDP2-sharded and plain gradients meet in one optimizer (DQT's leaves
        under ``trainer=fsdp``), which ``torch.nn.utils.clip_grad_norm_`` refuses: then the same norm clipping over
        both (:func:`bitflow.models.clip_grad_norm`)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        mixed = len({is_sharded(g) for g in grads}) == 2
        if not (mixed and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_grad_norm(grads, float(gradient_clip_val))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scheduler_cfg.get("weight_decay_off_at") is not None and self._trainer is not None:
            apply_weight_decay_factor(unwrap_optimizer(optimizer), self.lr_schedule, self.trainer.global_step)
        if self.quant_recipe is not None:  # e.g. DQT averages its gradients over ranks before clipping
            self.quant_recipe.before_optimizer_step(self.model, unwrap_optimizer(optimizer))

    # ---------------------------------------------------------------- checkpoints
    @property
    def quant_state(self) -> dict[str, Any] | None:
        """The quantization state of the model as plain data (``None`` while it is 16-bit); a host sync."""
        return self.quant_recipe.state(self.model) if self.quant_recipe is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "version": FORMAT_VERSION,
            "model_config": self.model.config.to_dict(),
            "tokenizer": self.tokenizer_json,
            "quant": self.quant_state,
            "tokens_seen": getattr(self, "tokens_seen", 0),
            # the LR schedule's length: a resume with another trainer.max_steps would reshape it
            "max_steps": self.trainer.max_steps if self._trainer is not None else None,
            # the run's data config (plain data): bitflow-ptq calibrates on the run's own training split
            "data": getattr(self, "data_config", None),
        }

        # optimizer state that is not per Parameter (DQTAdamW's moments and rounding generators): under FSDP2 the
        # strategy's torch.distributed.checkpoint conversion drops it from the collected state dict; put it back
        # where a single-process or DDP checkpoint has it (rank 0 writes the file; the other ranks hold {})
        if self._trainer is not None:
            for sd, opt in zip(checkpoint.get("optimizer_states", []), self.trainer.optimizers):
                opt = unwrap_optimizer(opt)
                key = getattr(opt, "EXTRA_STATE_KEY", None)
                if key is not None and sd and key not in sd:
                    sd[key] = opt.extra_state()

    def on_train_start(self) -> None:
        """Restore the optimizer state that an FSDP2 resume could not hand to the optimizer (see
        :meth:`on_save_checkpoint`): once all states are loaded, an optimizer still without it takes the
        checkpoint's."""
        pending, self._optimizer_extra = getattr(self, "_optimizer_extra", []), []
        for extra, opt in zip(pending, self.trainer.optimizers):
            if extra is not None:  # (after a DDP or single-process resume: loaded again, the same values)
                unwrap_optimizer(opt).load_extra_state(extra)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the model, take the tokenizer and rebuild the quantized layers before the weights load."""
        optimizers = [unwrap_optimizer(o) for o in self.trainer.optimizers] if self._trainer is not None else []
        self._optimizer_extra = [  # restored by on_train_start (see there)
            sd.get(o.EXTRA_STATE_KEY) if hasattr(o, "load_extra_state") else None
            for sd, o in zip(checkpoint.get("optimizer_states", []), optimizers)
        ]
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError("this checkpoint was not written by bitflow (it has no 'bitflow' section)")
        check_same_model(self.model.config.to_dict(), meta["model_config"])
        if self.tokenizer_json is None:
            self.tokenizer_json = meta.get("tokenizer")
        self.tokens_seen = meta.get("tokens_seen", 0)
        if self.data_config is None:  # a resumed run keeps its own (run_training sets it)
            self.data_config = meta.get("data")
        state = meta.get("quant")
        if not state:
            return
        kind = state.get("kind")
        if self.quant_recipe is None:
            raise ValueError(
                f"the checkpoint's model is quantized ({kind}: {len(state.get('layers', []))} layers), but this "
                f"run's quant=none; resume with the quant option it was trained with (e.g. quant=ternary or "
                f"quant=dqt_ternary)"
            )
        if kind != self.quant_recipe.name:
            raise ValueError(
                f"the checkpoint's model is quantized by the {kind!r} recipe, but this run's quant.recipe="
                f"{self.quant_recipe.name!r}"
            )
        self.quant_recipe.restore(self.model, state)


def recipe_config_of(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quant`` config a checkpoint was trained with: its hyperparameters', or (checkpoints written before
    the recipes existed) the one its quant state implies; ``None`` for a 16-bit checkpoint."""
    hp = checkpoint.get("hyper_parameters", {})
    if hp.get("quant") is not None:
        return dict(hp["quant"])
    state = checkpoint[CHECKPOINT_KEY].get("quant")
    return recipe_for_state(state).config() if state else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LanguageModel:
    """Rebuild the LanguageModel from a checkpoint: config, weights, tokenizer and quantization state (also for
    checkpoints written before the quantization recipes existed)."""
    ckpt = read_checkpoint(path)
    hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in ("optimizer", "scheduler")}
    lm = LanguageModel(model=ckpt[CHECKPOINT_KEY]["model_config"], quant=recipe_config_of(ckpt), **hp)
    lm.on_load_checkpoint(ckpt)
    lm.load_state_dict(ckpt["state_dict"])
    return lm.to(map_location).eval()
