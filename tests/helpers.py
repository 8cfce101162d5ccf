"""Helpers shared by the tests: tiny config overrides, config composition, TensorBoard read-back."""

from __future__ import annotations

import os
from pathlib import Path

# A tiny model and corpus: every end-to-end run finishes in seconds on 2 CPU cores.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.source.max_files=60",
    "data.vocab_size=320",
    "data.val_windows=8",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "scheduler.warmup_steps=2",
]


# ----- the tiny model (quant helper): the model of TINY, for tests that build a Llama or LanguageModel in Python
TINY_MODEL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
# every nn.Linear of the tiny Llama but the (tied) LM head, in module order: what a recipe converts by default
TINY_LINEARS = [
    f"layers.{i}.{m}" for i in range(2) for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")
]


def tiny_llama(seed: int = 0, **fields):
    """A fresh tiny Llama (``TINY_MODEL``, with ``fields`` changed), its weights drawn after ``manual_seed(seed)``."""
    import torch

    from bitflow.models.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**TINY_MODEL, **fields}))
# ----- end of the tiny model


def compose(overrides: list[str]):
    """Compose conf/train.yaml as the `bitflow` app would (without running Hydra's job machinery)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bitflow.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``run_dir``, as tag -> [(step, value)] sorted by step
    (:func:`bitflow.events.read_scalars`, the reader bitflow-report uses)."""
    from bitflow.events import read_scalars as read

    return read(run_dir)


def bitflow_env(cache_dir: Path) -> dict[str, str]:
    """Environment for running the `bitflow` console script in a subprocess."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", BITFLOW_CACHE=str(cache_dir), HYDRA_FULL_ERROR="1")
    return env
