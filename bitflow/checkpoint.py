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
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bitflow.io import atomic_output, manifest_path, verify_manifest, write_manifest

__all__ = [
    "CHECKPOINT_KEY", "FORMAT_VERSION", "AtomicCheckpointIO", "atomic_torch_save", "check_same_model",
    "UnsafeCheckpointError", "newest_checkpoint", "read_checkpoint", "safe_load",
]

CHECKPOINT_KEY = "bitflow"
FORMAT_VERSION = 1


def check_same_model(config: dict[str, Any], checkpoint_config: dict[str, Any]) -> None:
    """Raise a ValueError naming every field where a checkpoint's model config differs from ``config``."""
    diff = {k: (checkpoint_config.get(k), v) for k, v in config.items() if checkpoint_config.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"the checkpoint is from another model ({details})")


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain data: refused, nothing in it was run."""


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a file whose manifest (if any) matches: tensors and plain Python data
    only (bitflow's checkpoints hold nothing else), so a file crafted to run code when unpickled is refused
    before any of it runs. Raises :class:`UnsafeCheckpointError` for such a file, ``ValueError`` for a truncated
    or corrupted one, both naming the path."""
    problem = verify_manifest(path)
    if problem is not None:
        raise ValueError(f"corrupted checkpoint: {problem}; use another checkpoint of the run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data (not a bitflow "
            f"checkpoint, or one crafted to run code when loaded); nothing in it was run. torch.load(weights_only="
            f"True) says: {str(e).splitlines()[0]}"
        ) from None


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a bitflow checkpoint file as a dict (:func:`safe_load`), with clear errors for a missing, foreign,
    unsafe, truncated or corrupted file.

    ``mmap=True`` maps tensors lazily from disk: cheap when only the ``bitflow`` section is needed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_load(path, mmap=mmap)
    except ValueError:
        raise
    except Exception as e:  # truncated files, text files...
        raise ValueError(f"{path} is not a bitflow checkpoint (torch.load failed: {e})") from e
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a bitflow checkpoint (no '{CHECKPOINT_KEY}' section)")
    return ckpt


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run directory: ``<run>/checkpoints/*.ckpt`` (ModelCheckpoint's, ``last.ckpt`` of a
    graceful stop) and ``<run>/hpc_ckpt_<n>.ckpt`` (Lightning's SLURM requeue checkpoints)."""
    run_dir = Path(run_dir)
    return [p for p in [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run directory (by modification time; ``last.ckpt`` wins a tie), or None."""
    found = run_checkpoints(run_dir)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt")) if found else None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace`` onto ``path``, then
    its manifest (size, sha256). A failed write (full disk, unwritable directory) raises an ``OSError`` naming
    ``path`` and leaves the previous file intact."""
    try:
        with atomic_output(path) as tmp:
            torch.save(obj, tmp)
        write_manifest(path)
    except OSError as e:
        previous = "the previous file is intact" if Path(path).is_file() else "no previous file"
        raise OSError(e.errno, f"could not write checkpoint {path}: {e.strerror or e}; {previous}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO of bitflow: every checkpoint written atomically with a manifest (local
    filesystems; a failed write leaves the previous file, e.g. ``last.ckpt``, intact), and read back only with
    :func:`safe_load` (``weights_only=True``), on every resume path of Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return safe_load(path)  # weights_only=True whatever Lightning asks for; map_location: CPU, moved later

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        manifest_path(path).unlink(missing_ok=True)
