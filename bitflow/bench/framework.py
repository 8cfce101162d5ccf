"""Framework overhead: tokens/s of a real ``bitflow`` run against the bare training loop on the same model and data.

The ``bitflow`` side is :func:`bitflow.cli.run_training` on the default config (Lightning Trainer, TensorBoard
logger, checkpoints, the default callbacks, the progress bar as configured); the bare side is a ``for`` loop over
the same DataModule's train loader with the same LanguageModel loss, AdamW, LR schedule, gradient clipping and
precision. Both time the steps after the first two (start-up and warm-up excluded; the end-of-run validation
comes after the last timed step). Runs alternate, bare and bitflow, for the repeats; reported: median tokens/s
with the spread and bitflow / bare (goal >= 0.95).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from bitflow.bench.common import interleaved, median, print_table, spread

# a small model and corpus for --quick (the shape of the tests' TINY config)
QUICK_OVERRIDES = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "data.source.max_files=60", "data.vocab_size=320", "data.val_windows=8",
]
STEP_TIMES: list[float] = []  # StepTimer's record of the current run


class StepTimer(Callback):
    """Appends ``time.perf_counter()`` at the end of every training batch to :data:`STEP_TIMES`."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        STEP_TIMES.append(time.perf_counter())


def compose_config(overrides: list[str]):
    """conf/train.yaml composed with ``overrides`` (as ``bitflow`` would, without Hydra's job machinery)."""
    from hydra import compose, initialize_config_dir

    from bitflow.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _per_step(times: list[float], skip: int = 2) -> float:
    return (times[-1] - times[skip - 1]) / (len(times) - skip)


def bitflow_run(overrides: list[str], out: Path) -> float:
    """Seconds per step of a real run (steps after the first two)."""
    import bitflow.bench.framework as timer_module  # the module Hydra instantiates StepTimer from (not __main__)
    from bitflow.cli import run_training

    timer_module.STEP_TIMES.clear()
    cfg = compose_config([*overrides, f"paths.output_dir={out}",
                          "+callbacks.step_timer._target_=bitflow.bench.framework.StepTimer"])
    run_training(cfg)
    return _per_step(timer_module.STEP_TIMES)


def bare_loop(overrides: list[str]) -> float:
    """Seconds per step of the bare loop on the same model, data, optimizer, schedule, clipping and precision."""
    import lightning as L
    import torch

    from bitflow.cli import instantiate, prepare_config
    from bitflow.config import to_plain
    from bitflow.lm import LanguageModel

    cfg = compose_config(overrides)
    prepare_config(cfg, explicit=set())
    L.seed_everything(cfg.seed, verbose=False)
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    lm = LanguageModel(model={**to_plain(cfg.model), "vocab_size": data.vocab_size},
                       optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler))
    # a Trainer that is never run: the LR schedule reads its length from lm.trainer.max_steps
    lm.trainer = L.Trainer(max_steps=cfg.trainer.max_steps, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    setup = lm.configure_optimizers()
    opt, sched = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    bf16 = cfg.trainer.precision == "bf16-mixed"
    clip = cfg.trainer.gradient_clip_val
    times = []
    for step, batch in enumerate(data.train_dataloader()):
        if step == cfg.trainer.max_steps:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return _per_step(times)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Alternating bare and bitflow runs; one row, printed and returned."""
    steps, repeats = (8, 3) if quick else (40, 5)
    overrides = [*(QUICK_OVERRIDES if quick else []), f"trainer.max_steps={steps}",
                 f"trainer.val_check_interval={steps}"]
    cfg = compose_config(overrides)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    samples: dict[str, list[float]] = {"bare": [], "bitflow": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "bare": lambda: samples["bare"].append(bare_loop(overrides)),
            "bitflow": lambda: samples["bitflow"].append(bitflow_run(overrides, Path(tmp) / str(time.time_ns()))),
        }
        interleaved(runs, repeats=repeats)
    bare, ours = ([tokens / s for s in samples[k]] for k in ("bare", "bitflow"))
    row = {
        "model": "quick" if quick else "tiny (default config)", "tokens/step": tokens, "steps timed": steps - 2,
        "bare loop tok/s": median(bare), "spread": spread(bare), "bitflow run tok/s": median(ours),
        "spread ": spread(ours), "bitflow / bare": median(ours) / median(bare),
    }
    print_table(f"Framework overhead: a `bitflow` run vs the bare loop (same model, data, optimizer, precision), "
                f"median of {repeats} alternating runs (goal >= 0.95)", [row])
    return [row]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus")
    run(quick=parser.parse_args().quick)
