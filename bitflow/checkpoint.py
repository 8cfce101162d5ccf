"""Atomic checkpoint writes: a crash mid-save never leaves a truncated ``last.ckpt`` behind."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bitflow.io import atomic_output


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` onto ``path``."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes every checkpoint atomically (local filesystems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
