"""Atomic file writes, shared by checkpoints, token caches, reports and evaluation results; manifests and locks.

Readers see either the old file or the complete new one, never a truncated file: every writer writes a temporary
file in the target's directory, fsyncs it, then ``os.replace``s it onto the target (atomic on POSIX).

A file that is later read back for training (checkpoints, token caches, tokenizers) gets a manifest next to it,
``<file>.manifest.json`` with its size and sha256 (:func:`write_manifest`); :func:`verify_manifest` finds a
truncated or corrupted file before it is used (a flipped bit still loads with ``torch.load``). Hashing reads the
file once more: about a second per GB. :func:`build_lock` makes concurrent runs build a shared cache file once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_directory", "atomic_output", "atomic_write_bytes", "atomic_write_text", "build_lock", "manifest_path",
    "verify_manifest", "write_manifest",
]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, fsync it and rename it over ``path``;
    when it raises, delete it (the previous ``path``, if any, is left intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder next to ``path``; when the block succeeds, rename it to ``path``
    (replacing an existing ``path`` only with ``overwrite``); when it raises, delete it, leaving ``path`` as it
    was. FileExistsError before anything is written if ``path`` exists and ``overwrite`` is false."""
    import shutil

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ manifests
MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(path: str | os.PathLike) -> Path:
    """``<path>.manifest.json``: where the manifest of ``path`` lives."""
    return Path(f"{path}{MANIFEST_SUFFIX}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: str | os.PathLike) -> Path:
    """Write ``<path>.manifest.json`` (size and sha256 of ``path``) atomically; returns its path."""
    path = Path(path)
    _verified.discard(_identity(path))
    entry = {"file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}
    return atomic_write_text(manifest_path(path), json.dumps(entry, indent=1))


_verified: set[tuple] = set()  # (path, size, mtime) verified in this process: a file is hashed once per process


def _identity(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def verify_manifest(path: str | os.PathLike) -> str | None:
    """What is wrong with ``path`` against its manifest (a sentence naming the path), or None when it matches or
    has no manifest (files written before manifests existed)."""
    path = Path(path)
    manifest = manifest_path(path)
    if not manifest.is_file() or _identity(path) in _verified:
        return None
    try:
        entry = json.loads(manifest.read_text())
        size, sha = int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e}); cannot check {path}"
    if not path.is_file():
        return f"{path} is missing (its manifest {manifest} is there)"
    actual = path.stat().st_size
    if actual != size:
        return f"{path} is {actual} bytes, its manifest says {size}: truncated or overwritten"
    if file_sha256(path) != sha:
        return f"{path} does not match the sha256 in its manifest {manifest}: the file is corrupted"
    _verified.add(_identity(path))
    return None


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold ``<path>.lock`` (an OS file lock: released when the process dies) while building ``path``, so two runs
    that need the same cache file build it once; the second finds it built when it gets the lock."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=timeout):
        yield
