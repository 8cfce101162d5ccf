"""LMEvalCallback in a real Lightning fit: eval/<task>/<metric> in TensorBoard every N steps, the model back
in train mode, and training unchanged by the evaluations (same final weights as a fit without the
callback)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from bitflow.eval.callback import LMEvalCallback
from bitflow.events import read_scalars
from tests.eval.evalkit import make_lm

pytestmark = pytest.mark.integration  # real subprocesses, Trainer fits or lm-eval's task index

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint
STEPS = 6  # 4 batches per epoch: the second epoch is shuffled after evaluations


class _ModeSpy(L.Callback):
    """Records the model's mode at every training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(pl_module.model.training)


def _fit(tiny_tokenizer, tmp_path: Path, callbacks: list) -> tuple[L.LightningModule, Path]:
    L.seed_everything(3, verbose=False)
    model = make_lm(tiny_tokenizer, seed=3).train()
    batches = DataLoader(
        torch.randint(0, tiny_tokenizer.get_vocab_size(), (16, 17)), batch_size=4, shuffle=True
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=batches)
    return model, tmp_path / "tb"


def test_callback_logs_eval_metrics_and_leaves_training_unchanged(tiny_tokenizer, tmp_path: Path):
    spy = _ModeSpy()
    callback = LMEvalCallback(tasks="bitflow_next_line,bitflow_docstring_names", every_n_steps=2, limit=4)
    with_eval, tb = _fit(tiny_tokenizer, tmp_path / "a", [callback, spy])
    without_eval, _ = _fit(tiny_tokenizer, tmp_path / "b", [])

    scalars = read_scalars(tb)
    for tag in (
        "eval/bitflow_next_line/acc",
        "eval/bitflow_next_line/acc_norm",
        "eval/bitflow_docstring_names/acc",
    ):
        events = scalars[tag]
        # every 2 steps; the last step is not evaluated twice
        assert [step for step, _ in events] == [2, 4, 6]
        assert all(v in {k / 4 for k in range(5)} for _, v in events)
    assert set(callback.last_metrics) >= {"eval/bitflow_next_line/acc", "eval/bitflow_docstring_names/acc"}
    assert spy.modes == [True] * STEPS  # every training step ran in train mode
    for (name, a), (_, b) in zip(
        with_eval.state_dict().items(), without_eval.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs: the evaluation changed training"


def test_callback_evaluates_at_the_end_when_the_last_step_is_not_a_multiple(tiny_tokenizer, tmp_path: Path):
    callback = LMEvalCallback(tasks="bitflow_next_line", every_n_steps=4, limit=2)
    _, tb = _fit(tiny_tokenizer, tmp_path, [callback])
    assert [step for step, _ in read_scalars(tb)["eval/bitflow_next_line/acc"]] == [4, 6]


def test_bad_callback_settings_fail_before_training(tiny_tokenizer, tmp_path: Path):
    with pytest.raises(ValueError, match="every_n_steps"):
        LMEvalCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="limit"):
        LMEvalCallback(limit=0)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['bitflow_nope'\]"):
        _fit(tiny_tokenizer, tmp_path, [LMEvalCallback(tasks="bitflow_nope")])
