"""Fault tolerance of a training run: a graceful stop on SIGTERM/SIGINT, and the non-finite (NaN/Inf) guard.

Both are Lightning callbacks on top of Lightning's own machinery:

* :class:`GracefulStop`: Lightning's signal connector turns SIGTERM into ``trainer.received_sigterm``, lets the
  current step finish and raises ``SIGTERMException`` at its end. This callback routes SIGINT (Ctrl-C) the same way
  (a second Ctrl-C stops at once), writes ``<checkpoints>/last.ckpt`` (atomically, through bitflow's CheckpointIO:
  weights, optimizer, LR schedule, loop position and so the data position, the transition's state) at the end of
  that step, and leaves the exception to :func:`bitflow.cli.run_training`, which turns it into
  :class:`RunInterrupted` (exit code 128 + signal number, a message that says how to resume). On SLURM, Lightning's
  ``SLURMEnvironment(auto_requeue=True)`` saves ``hpc_ckpt_<n>.ckpt`` and requeues the job on the requeue signal;
  the SIGTERM SLURM sends when it requeues ends the run here.
* :class:`NonFiniteGuard`: before each optimizer step, whether the loss and every gradient are finite (one host
  sync per step: a ``bool`` of one on-device flag). On a non-finite step, by ``fault.on_nonfinite``: ``stop``
  (raise :class:`NonFiniteError` naming the step and the first parameter with a non-finite gradient; no checkpoint
  is written, so the last good one stays the newest), ``skip`` (drop the step's gradients so the optimizer leaves
  every parameter and its state alone; more than ``fault.max_consecutive_skips`` in a row stop the run), or
  ``rollback`` (raise :class:`RollbackRequested`; ``run_training`` resumes from the newest checkpoint with the LR
  times ``fault.rollback_lr_factor``, at most ``fault.max_rollbacks`` times). Counters ``fault/nonfinite_steps``,
  ``fault/skipped_steps``, ``fault/rollbacks`` go to TensorBoard when they change.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from bitflow.config import NONFINITE_POLICIES  # re-exported
from bitflow.models import grad_norm
from bitflow.quant.recipe import unwrap_optimizer

__all__ = [
    "NONFINITE_POLICIES", "GracefulStop", "NonFiniteError", "NonFiniteGuard", "RollbackRequested", "RunInterrupted",
    "last_checkpoint_path",
]

log = logging.getLogger("bitflow")


class RunInterrupted(RuntimeError):
    """A run stopped by a signal after a complete step, with ``last.ckpt`` written. ``exit_code``: 128 + the
    signal number (130 for SIGINT, 143 for SIGTERM), so a scheduler never takes the run for done."""

    def __init__(self, message: str, signal_name: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient at ``step`` (policy ``stop``, or too many skips/rollbacks)."""

    exit_code = 3

    def __init__(self, message: str, step: int, parameter: str | None) -> None:
        super().__init__(message)
        self.step, self.parameter = step, parameter


class RollbackRequested(RuntimeError):
    """Policy ``rollback``: resume from the newest checkpoint with the LR scaled by ``lr_scale``."""

    def __init__(self, message: str, step: int, rollbacks: int, lr_scale: float) -> None:
        super().__init__(message)
        self.step, self.rollbacks, self.lr_scale = step, rollbacks, lr_scale


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the directory of the trainer's ``ModelCheckpoint``, else
    ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        directory = Path(callback.dirpath)
    else:
        directory = Path(trainer.default_root_dir) / "checkpoints"
    return directory / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class GracefulStop(Callback):
    """SIGTERM or SIGINT: end the current step, write ``last.ckpt``, stop (see the module docstring)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.checkpoint: Path | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self.signal_name, self.checkpoint, self.saved_step = None, None, None
        # installed before Lightning registers its own SIGTERM handler, which then calls this one too
        for signum, handler in ((signal.SIGINT, self._on_sigint), (signal.SIGTERM, self._on_sigterm)):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def restore(self) -> None:
        """Put back the SIGINT/SIGTERM handlers of before the fit. Call it after ``trainer.fit`` returns or raises:
        Lightning's signal connector re-installs the handlers it found (these) when it tears down."""
        for signum, handler in self._previous.items():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.signal_name = self.signal_name or "SIGTERM"

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: stop now, without waiting for the step
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = "SIGINT"
        log.warning("SIGINT: finishing the current step and writing last.ckpt (Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's signal connector takes it from here

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step == trainer.global_step:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank calls it (a collective for sharded strategies)
        self.checkpoint, self.saved_step = path, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # the same moment as ModelCheckpoint(every_n_train_steps): the state a resume continues from exactly
        if trainer.received_sigterm:
            self.signal_name = self.signal_name or "SIGTERM"
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.saved_step is None and trainer.global_step > 0:
            self._save(trainer)  # a signal during validation: the step before it is complete


def _stepped(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors with a gradient that ``optimizer``'s next step would update (its param groups' entries)."""
    return [p for g in unwrap_optimizer(optimizer).param_groups for p in g["params"] if p.grad is not None]


class NonFiniteGuard(Callback):
    """Never train on a non-finite loss or gradient (see the module docstring).

    Args:
        on_nonfinite: ``stop``, ``skip`` or ``rollback``.
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row.
        max_rollbacks: with ``rollback``, stop at the non-finite step after this many rollbacks.
        rollback_lr_factor: with ``rollback``, the LR is multiplied by this at each rollback (in (0, 1]).
    """

    def __init__(
        self,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
    ) -> None:
        from bitflow.config import check_fault

        check_fault({"on_nonfinite": on_nonfinite, "max_consecutive_skips": max_consecutive_skips,
                     "max_rollbacks": max_rollbacks, "rollback_lr_factor": rollback_lr_factor})
        self.policy = on_nonfinite
        self.max_consecutive_skips, self.max_rollbacks = max_consecutive_skips, max_rollbacks
        self.rollback_lr_factor = float(rollback_lr_factor)
        self.nonfinite_steps = self.skipped_steps = self.consecutive = self.rollbacks = 0
        self._wrapped: Any = None

    # ---------------------------------------------------------------- state (survives a resume and a rollback)
    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # max: a rollback resumes a checkpoint written before it, whose counters are older than this run's
        for key in ("nonfinite_steps", "skipped_steps", "rollbacks"):
            setattr(self, key, max(int(state_dict.get(key, 0)), getattr(self, key)))

    @property
    def lr_scale(self) -> float:
        """The factor the LR schedule is multiplied by: ``rollback_lr_factor ** rollbacks``."""
        return self.rollback_lr_factor ** self.rollbacks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the checkpoint's optimizer and scheduler state are restored
        wrappers = getattr(pl_module, "lr_wrappers", None)
        if self.rollbacks and wrappers is not None and self._wrapped is None:
            def scaled(fn: Any) -> Any:
                return lambda step: self.lr_scale * fn(step)

            self._wrapped = scaled
            wrappers.append(scaled)
            for scheduler in trainer.lr_scheduler_configs:  # LambdaLR applies the factor from the next step on
                group_lrs = [base * scheduler.scheduler.lr_lambdas[i](trainer.global_step)
                             for i, base in enumerate(scheduler.scheduler.base_lrs)]
                for group, lr in zip(scheduler.scheduler.optimizer.param_groups, group_lrs):
                    group["lr"] = lr

    # ---------------------------------------------------------------- the check
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if str(trainer.precision).startswith("16"):
            return  # 16-mixed: the GradScaler skips inf/NaN steps itself and lowers its scale
        # every tensor the optimizer is about to step: the Parameters, and DQT's per-step weight leaves (which are
        # no Parameters; under trainer=fsdp plain tensors beside the sharded ones: grad_norm takes both)
        grads = [p.grad for p in _stepped(optimizer)]
        flags = [torch.isfinite(grad_norm(grads))] if grads else []
        loss = getattr(pl_module, "last_loss", None)
        if isinstance(loss, torch.Tensor):
            flags.append(torch.isfinite(loss).all())
        if not flags or bool(torch.stack(flags).all()):  # the one host sync per step
            self.consecutive = 0
            return
        self._nonfinite(trainer, pl_module, optimizer, loss)

    def _nonfinite(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer, loss: Any
    ) -> None:
        step = trainer.global_step
        names = {id(p): n for n, p in pl_module.named_parameters()}
        names.update({id(leaf): f"{n} (DQT weight)" for n, leaf in getattr(unwrap_optimizer(optimizer), "named_leaves",
                                                                         lambda: [])()})
        parameter = next((names.get(id(p), "?") for p in _stepped(optimizer) if not torch.isfinite(p.grad).all()), None)
        loss_value = float(loss) if isinstance(loss, torch.Tensor) else float("nan")
        what = (f"non-finite training step {step}: loss {loss_value:g}, first parameter with a non-finite gradient: "
                f"{parameter or 'none (all gradients finite)'}")
        self.nonfinite_steps += 1
        self.consecutive += 1
        counters = {"fault/nonfinite_steps": float(self.nonfinite_steps)}
        if self.policy == "skip" and self.consecutive <= self.max_consecutive_skips:
            for p in _stepped(optimizer):
                p.grad = None  # AdamW (and DQT's step) leave a tensor without a gradient, and its moments, untouched
            self.skipped_steps += 1
            counters["fault/skipped_steps"] = float(self.skipped_steps)
            self._log(trainer, counters, step)
            log.warning("%s; skipped (%d in a row, fault.max_consecutive_skips=%d)", what, self.consecutive,
                        self.max_consecutive_skips)
            return
        self._log(trainer, counters, step)
        if self.policy == "rollback" and self.rollbacks < self.max_rollbacks:
            self.rollbacks += 1
            self._log(trainer, {"fault/rollbacks": float(self.rollbacks)}, step)
            raise RollbackRequested(
                f"{what}; rolling back to the newest checkpoint with the LR x{self.lr_scale:g} "
                f"(rollback {self.rollbacks} of fault.max_rollbacks={self.max_rollbacks})",
                step, self.rollbacks, self.lr_scale,
            )
        why = {"stop": "fault.on_nonfinite=stop",
               "skip": f"{self.consecutive} non-finite steps in a row (fault.max_consecutive_skips="
                       f"{self.max_consecutive_skips})",
               "rollback": f"still non-finite after fault.max_rollbacks={self.max_rollbacks} rollbacks"}[self.policy]
        raise NonFiniteError(
            f"{what}. Stopped ({why}) without training on it and without writing a checkpoint: the newest "
            "checkpoint under the run's checkpoints/ is the last good one. Lower optimizer.lr, or set "
            "fault.on_nonfinite=skip or rollback",
            step, parameter,
        )

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
