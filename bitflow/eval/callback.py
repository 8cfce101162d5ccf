"""In-training downstream evaluation, as OLMo does it: every N steps run lm-eval tasks on the model in memory
and log ``eval/<task>/<metric>`` next to the loss curves.

    bitflow +callbacks.lm_eval._target_=bitflow.eval.LMEvalCallback +callbacks.lm_eval.every_n_steps=200

No checkpoint round trip: the LightningModule's model and tokenizer are wrapped by
:class:`~bitflow.eval.harness.BitflowLM` as they are, quantization state included, so a ternary phase is
scored ternary. Only global rank zero evaluates (the others wait at a barrier); the model goes into eval mode
and back, gradients are off, and the random number generators are restored afterwards so training continues
exactly as without the callback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng

from bitflow.eval.suites import resolve_tasks

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Raise lm-eval's log level for the duration (it logs every task it builds at INFO)."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


class LMEvalCallback(Callback):
    """Run lm-eval tasks every ``every_n_steps`` optimizer steps (and once at the end of training) on rank
    zero and log their metrics as ``<prefix>/<task>/<metric>`` to every logger of the trainer.

    Args:
        tasks: group(s) or lm-eval task names, as for ``bitflow-eval`` (default ``local``: offline, seconds).
        every_n_steps: evaluate when ``global_step`` is a positive multiple of this.
        limit: examples per task (int) or fraction (< 1); None = all. Keep it small for frequent evaluation.
        num_fewshot: None = each task's default.
        batch_size: sequences per forward pass.
        precision: "auto" (bf16 autocast on a GPU, fp32 on the CPU), "32", "bf16" or "16".
        at_train_end: also evaluate after the last step (unless that step was just evaluated).
        prefix: first part of the logged names.
    """

    def __init__(
        self,
        tasks: str | list[str] = "local",
        every_n_steps: int = 500,
        limit: float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 16,
        precision: str = "auto",
        at_train_end: bool = True,
        prefix: str = "eval",
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"LMEvalCallback.every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        if limit is not None and not limit > 0:
            raise ValueError(
                f"LMEvalCallback.limit must be positive (an int, or a fraction < 1), got {limit!r}"
            )
        self.tasks = resolve_tasks(tasks)  # bad group syntax fails at construction
        self.every_n_steps, self.limit, self.num_fewshot = every_n_steps, limit, num_fewshot
        self.batch_size, self.precision, self.at_train_end, self.prefix = (
            batch_size,
            precision,
            at_train_end,
            prefix,
        )
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self._manager: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the task names before training starts (unknown names raise ValueError listing the groups)."""
        if trainer.is_global_zero and self._manager is None:
            from bitflow.eval.suites import task_manager_for

            self._manager = task_manager_for(self.tasks)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate now (rank zero), log, and return ``{"<prefix>/<task>/<metric>": value}`` ({} on other
        ranks)."""
        step = trainer.global_step
        self.last_step = step
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = self._evaluate_here(pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            for name, value in metrics.items():  # visible to other callbacks (e.g. checkpointing on eval/...)
                trainer.callback_metrics[name] = torch.tensor(value)
            self.last_metrics = metrics
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        trainer.strategy.barrier("lm_eval_callback")
        return metrics

    def _evaluate_here(self, pl_module: L.LightningModule) -> dict[str, float]:
        from bitflow.eval.harness import BitflowLM
        from bitflow.eval.run import flatten_results, run_tasks, tensorboard_scalars

        tokenizer = getattr(pl_module, "tokenizer_json", None)
        if tokenizer is None:
            raise ValueError("LMEvalCallback needs the LanguageModel's tokenizer (tokenizer_json is None)")
        lm = BitflowLM(
            model=pl_module,
            tokenizer=tokenizer,
            batch_size=self.batch_size,
            device=pl_module.device,
            precision=self.precision,
        )
        lm.progress = False
        with isolate_rng(include_cuda=True), quiet_lm_eval():  # lm-eval reseeds python, numpy and torch
            results = run_tasks(
                lm, self.tasks, self.limit, self.num_fewshot, bootstrap_iters=0, manager=self._manager
            )
        return tensorboard_scalars(flatten_results(results), self.prefix)
