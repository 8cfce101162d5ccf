"""Measuring quantization-induced degradation over checkpoints (arXiv 2411.17691): for every 16-bit checkpoint of
every run under some directories and every requested PTQ method and bit width, the 16-bit and the quantized
validation loss on the same fixed windows (:func:`bitflow.quant.ptq.ptq_checkpoint`), with N (non-embedding
parameters), D (training tokens seen, the checkpoint's own counter) and P (bits).

Results are cached, one small JSON file per point in ``<out>/qid_cache/`` (or any ``cache`` directory), keyed
by (checkpoint path, size and mtime, method, bits, PTQ settings): a rerun measures only the points that are new,
an interrupted run keeps every point it finished, and several processes can measure into one cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bitflow.io import atomic_write_text

__all__ = ["CACHE_NAME", "Checkpoint", "PTQSettings", "find_checkpoints", "measure"]

CACHE_NAME = "qid_cache"
COLUMNS = ("run", "checkpoint", "step", "N", "D", "P", "method", "val_loss_16bit", "val_loss_quantized", "qid")


@dataclass(frozen=True)
class Checkpoint:
    """A 16-bit checkpoint of a run: its file, the run it belongs to, its step and training tokens."""

    path: Path
    run: Path
    step: int
    tokens_seen: int


@dataclass(frozen=True)
class PTQSettings:
    """The settings of :func:`bitflow.quant.ptq.ptq_checkpoint` besides the method and bit width; part of the
    cache key."""

    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    calib_windows: int = 128
    seed: int = 0
    val_windows: int | None = None


def _meta(path: Path) -> dict[str, Any]:
    from bitflow.checkpoint import CHECKPOINT_KEY, read_checkpoint

    ckpt = read_checkpoint(path, mmap=True)
    meta = ckpt[CHECKPOINT_KEY]
    return {
        "step": int(ckpt.get("global_step", 0)),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
        "quantized": bool(meta.get("quant")),
    }


def find_checkpoints(dirs: Iterable[str | Path], notes: list[str] | None = None) -> list[Checkpoint]:
    """The 16-bit checkpoints (``*.ckpt``) under each directory, by run (the folder holding ``checkpoints/``)
    and step. ``last.ckpt`` is left out where another checkpoint of its run has its step; quantized checkpoints
    (a quantized run's, or ``bitflow-ptq`` outputs) are left out with a note. Raises ``FileNotFoundError`` for a
    missing directory and ``ValueError`` naming a directory without 16-bit checkpoints."""
    notes = notes if notes is not None else []
    found: dict[Path, Checkpoint] = {}
    for d in map(Path, dirs):
        shown = str(d) if d.is_absolute() else f"{d} (= {d.resolve()})"
        if not d.is_dir():
            raise FileNotFoundError(f"no such directory: {shown}")
        files = sorted(d.rglob("*.ckpt"))
        mine: list[Checkpoint] = []
        skipped = 0
        for f in files:
            meta = _meta(f)
            if meta["quantized"]:
                skipped += 1
                continue
            run = f.parent.parent if f.parent.name == "checkpoints" else f.parent
            mine.append(Checkpoint(f.resolve(), run.resolve(), meta["step"], meta["tokens_seen"]))
        if skipped:
            notes.append(f"{d}: {skipped} quantized checkpoint(s) left out (QiD starts from 16-bit checkpoints)")
        if not mine:
            what = f"only {skipped} quantized checkpoint(s)" if skipped else "no checkpoints (*.ckpt)"
            raise ValueError(f"{shown} holds {what}; give run directories whose checkpoints/ hold 16-bit checkpoints")
        steps = {(c.run, c.step) for c in mine if c.path.name != "last.ckpt"}
        for c in mine:
            if c.path.name == "last.ckpt" and (c.run, c.step) in steps:
                continue
            found.setdefault(c.path, c)
    return sorted(found.values(), key=lambda c: (str(c.run), c.step, c.path.name))


def cache_key(ckpt: Path, method: str, bits: int, settings: PTQSettings) -> str:
    """The cache key of one point: the checkpoint's path, size and mtime, the method, bits and settings."""
    st = ckpt.stat()
    payload = {"path": str(ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "method": method, "bits": bits,
               **asdict(settings)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cached(cache: Path, key: str) -> dict[str, Any] | None:
    path = cache / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot read the QiD cache file {path}: {err}; delete it to measure that point again") from err


def measure(
    checkpoints: list[Checkpoint],
    methods: list[str],
    bits: list[int],
    settings: PTQSettings,
    cache: Path,
    names: dict[Path, str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], int]:
    """One row per (checkpoint, method, bits) (columns ``COLUMNS``), measuring only the points missing from the
    ``cache`` directory; returns the rows and how many were measured now."""
    from bitflow.quant.ptq import ptq_checkpoint

    rows: list[dict[str, Any]] = []
    new = 0
    total = len(checkpoints) * len(methods) * len(bits)
    for ckpt in checkpoints:
        for method in methods:
            for b in bits:
                key = cache_key(ckpt.path, method, b, settings)
                record = _cached(cache, key)
                if record is None:
                    log(f"[{len(rows) + 1}/{total}] {ckpt.path} {method} {b}-bit")
                    full = ptq_checkpoint(ckpt.path, method, b, **asdict(settings))
                    record = {k: full[k] for k in ("method", "bits", "val_loss_16bit", "val_loss_quantized", "qid",
                                                   "n_params", "tokens_seen", "global_step", "seconds")}
                    record["checkpoint"] = str(ckpt.path)
                    new += 1
                    atomic_write_text(cache / f"{key}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
                rows.append({
                    "run": (names or {}).get(ckpt.run, ckpt.run.name),
                    "checkpoint": ckpt.path.name,
                    "step": record["global_step"],
                    "N": record["n_params"],
                    "D": record["tokens_seen"],
                    "P": b,
                    "method": method,
                    "val_loss_16bit": record["val_loss_16bit"],
                    "val_loss_quantized": record["val_loss_quantized"],
                    "qid": record["qid"],
                })
    return rows, new


def run_names(checkpoints: list[Checkpoint]) -> dict[Path, str]:
    """Each run's path below the directory all runs share (its folder name when there is one run)."""
    runs = sorted({c.run for c in checkpoints})
    if len(runs) == 1:
        return {runs[0]: runs[0].name}
    common = Path(os.path.commonpath([str(r) for r in runs]))
    return {r: str(r.relative_to(common)) for r in runs}
