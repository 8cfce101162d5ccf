"""bitflow's checkpoint format and file IO, in one place.

A bitflow checkpoint is a Lightning checkpoint with one more section, ``checkpoint["bitflow"]``::

    {"version": 1,
     "model_config": {...},     # LlamaConfig fields: rebuilds the architecture
     "tokenizer": "...",        # the tokenizer's JSON: the checkpoint is self-contained
     "quant": {...} | None,     # the quantization recipe's state (bitflow.quant.recipe), None for 16-bit
     "tokens_seen": int,
     "max_steps": int | None,  # the LR schedule's length
     "data": {...} | None}     # the run's data config (corpus, seq_len, ...; None in older checkpoints)

``LanguageModel.on_save_checkpoint`` writes the section and ``on_load_checkpoint`` checks and applies it;
:func:`read_checkpoint` reads a file with clear errors, :func:`check_same_model` compares architectures, and
:class:`AtomicCheckpointIO` writes every checkpoint atomically. Rebuilding a model from a checkpoint is
:func:`bitflow.lm.load_checkpoint` (it needs the LightningModule, which imports this module, never the reverse).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bitflow.io import atomic_output

__all__ = [
    "CHECKPOINT_KEY", "FORMAT_VERSION", "AtomicCheckpointIO", "atomic_torch_save", "check_same_model",
    "read_checkpoint",
]

CHECKPOINT_KEY = "bitflow"
FORMAT_VERSION = 1


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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` onto ``path``."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes every checkpoint atomically (local filesystems): a failed write leaves
    the previous file (e.g. ``last.ckpt``) intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
