"""Corpus sources: where the text comes from and how it splits into train and validation.

A source yields documents (one string each) for a split, ``"train"`` or ``"val"``, and a fingerprint: a stable
hash of everything that decides the content, so the tokenizer and the token caches built from it can be reused
safely. Three kinds exist:

- ``stdlib``: the ``.py`` files of the running Python's standard library (about 30 MB, always offline);
- ``text``: local text files, directories or glob patterns;
- ``hf``: any Hugging Face dataset, through ``datasets.load_dataset``.

The train/validation split is decided by a hash of a machine-independent key (a file's relative path, a
document's index), so two machines that see the same data get the same split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "val")
# directories of third-party packages that live inside the stdlib tree; they are not part of the corpus
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"val"``, else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def hash_fraction(key: str) -> float:
    """Map a string to a number in [0, 1) through sha1: the same key gives the same number on every machine."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val(key: str, val_fraction: float) -> bool:
    """Whether the item with this key belongs to the validation split: ``hash_fraction(key) < val_fraction``."""
    return hash_fraction(key) < val_fraction


def stable_hash(obj: Any) -> str:
    """sha1 (hex) of a JSON-serialisable object, with sorted keys so dict order does not matter."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _plain(obj: Any) -> Any:
    """Turn Hydra's DictConfig/ListConfig (or any mapping/sequence) into plain dicts and lists."""
    if isinstance(obj, (str, bytes, os.PathLike)) or obj is None:
        return os.fspath(obj) if isinstance(obj, os.PathLike) else obj
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [_plain(v) for v in obj]
    return obj


def _check_fraction(val_fraction: float) -> float:
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return float(val_fraction)


def _check_positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class Source(ABC):
    """A corpus: documents per split and a fingerprint of its content."""

    kind: str = "abstract"

    @abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """Yield the documents (one string each) of ``split`` ("train" or "val") in a deterministic order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hash (hex) of everything that determines the documents: kind, files or dataset, options."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fingerprint={self.fingerprint()[:12]})"


class _FileSource(Source):
    """Shared logic of sources made of files: ``files`` is a sorted list of (split key, path) pairs."""

    files: list[tuple[str, Path]]
    val_keys: set[str]
    encoding = "utf-8"

    def split_files(self, split: str) -> list[tuple[str, Path]]:
        """The (key, path) pairs of ``split``, sorted by key."""
        want_val = check_split(split) == "val"
        return [(k, p) for k, p in self.files if (k in self.val_keys) == want_val]

    def documents(self, split: str) -> Iterator[str]:
        for _, path in self.split_files(split):
            # errors="replace": a stray byte must not stop a training run; U+FFFD is still valid text
            yield path.read_text(encoding=self.encoding, errors="replace")


class StdlibSource(_FileSource):
    """The ``.py`` files of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``).

    Third-party packages (``site-packages``, ``dist-packages``) are left out. A file is in the validation split
    when ``sha1(relative posix path)`` mapped to [0, 1) is below ``val_fraction``, so the split is the same on
    every machine with the same Python version.

    Args:
        val_fraction: expected fraction of files in the validation split.
        max_files: keep only this many files (for tiny test corpora). The subset is deterministic (files ordered
            by a second hash of their path) and keeps the validation share, with at least one validation file.
        root: the directory to scan; defaults to the running Python's stdlib.
    """

    kind = "stdlib"

    def __init__(self, val_fraction: float = 0.05, max_files: int | None = None, root: str | None = None):
        self.val_fraction = _check_fraction(val_fraction)
        self.max_files = _check_positive_or_none("max_files", max_files)
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"stdlib directory not found: {self.root}")
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            # prune third-party trees (and bytecode caches) instead of walking them: site-packages is large
            dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS and d != "__pycache__"]
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".py") and path.is_file():
                    files.append((path.relative_to(self.root).as_posix(), path))
        files.sort()
        val_keys = {k for k, _ in files if is_val(k, self.val_fraction)}
        if self.max_files is not None and self.max_files < len(files):
            files, val_keys = self._subset(files, val_keys, self.max_files)
        self.files, self.val_keys = files, val_keys

    def _subset(self, files, val_keys, n):
        """A deterministic, spread-out subset of ``n`` files that keeps the validation share (at least 1)."""
        order = sorted(files, key=lambda kp: hash_fraction("subset:" + kp[0]))
        val = [kp for kp in order if kp[0] in val_keys]
        train = [kp for kp in order if kp[0] not in val_keys]
        n_val = min(len(val), max(1, round(n * self.val_fraction))) if self.val_fraction > 0 else 0
        chosen = sorted(val[:n_val] + train[: n - n_val])
        return chosen, {k for k, _ in chosen if k in val_keys}

    def fingerprint(self) -> str:
        return stable_hash(
            {
                "kind": self.kind,
                "python": sys.version,
                "root": str(self.root),
                "val_fraction": self.val_fraction,
                "max_files": self.max_files,
                "files": stable_hash([[k, _file_stat(p), k in self.val_keys] for k, p in self.files]),
            }
        )


def _expand(pattern: str) -> list[tuple[str, Path]]:
    """Expand a file, directory or glob pattern into sorted (key, path) pairs; the key is the path relative to
    the pattern's fixed base directory (so it does not depend on where the data lives on this machine)."""
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
        parts = Path(pattern).parts
        fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
        base = Path(*fixed) if fixed else Path(".")
        paths = [Path(p) for p in glob.glob(pattern, recursive=True)]
    elif os.path.isdir(pattern):
        base = Path(pattern)
        paths = [p for p in base.rglob("*")]
    elif os.path.isfile(pattern):
        base = Path(pattern).parent
        paths = [Path(pattern)]
    else:
        raise FileNotFoundError(f"text source: no such file or directory: {pattern!r}")
    pairs = sorted((p.relative_to(base).as_posix(), p) for p in paths if p.is_file())
    if not pairs:
        raise FileNotFoundError(f"text source: {pattern!r} matches no files")
    return pairs


def _dedupe(pairs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Drop files matched by more than one pattern (first match wins), so no file counts twice."""
    seen: set[Path] = set()
    out = []
    for key, path in pairs:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            out.append((key, path))
    return out


class TextSource(_FileSource):
    """Local text files: each file is one document.

    Args:
        paths: a path or a list of paths; each is a file, a directory (all files under it) or a glob pattern
            (``**`` allowed). A missing path or a pattern that matches nothing raises FileNotFoundError here.
        val_fraction: expected fraction of files in the validation split (by a hash of the file's path relative
            to its pattern's base directory). Ignored when ``val_paths`` is given.
        val_paths: files for the validation split, given like ``paths``; then ``paths`` are all train.
        encoding: text encoding; undecodable bytes become U+FFFD.
    """

    kind = "text"

    def __init__(
        self,
        paths: str | Sequence[str],
        val_fraction: float = 0.05,
        val_paths: str | Sequence[str] | None = None,
        encoding: str = "utf-8",
    ):
        self.paths = [_plain(paths)] if isinstance(paths, (str, os.PathLike)) else _plain(paths)
        if not self.paths:
            raise ValueError("text source: paths is empty; give at least one file, directory or glob")
        if val_paths is not None:
            val_paths = [_plain(val_paths)] if isinstance(val_paths, (str, os.PathLike)) else _plain(val_paths)
        self.val_paths = val_paths
        self.val_fraction = _check_fraction(val_fraction)
        self.encoding = encoding
        train = _dedupe([kp for pattern in self.paths for kp in _expand(pattern)])
        if self.val_paths is None:
            files = train
            self.val_keys = {k for k, _ in files if is_val(k, self.val_fraction)}
        else:
            # keys get a prefix so a train and a val file with the same relative name stay distinct
            val = _dedupe([("val:" + k, p) for pattern in self.val_paths for k, p in _expand(pattern)])
            both = {p.resolve() for _, p in train} & {p.resolve() for _, p in val}
            if both:
                raise ValueError(f"text source: files in both paths and val_paths: {sorted(map(str, both))[:5]}")
            files = [("train:" + k, p) for k, p in train] + val
            self.val_keys = {k for k, _ in val}
        files.sort()
        self.files = files

    def fingerprint(self) -> str:
        return stable_hash(
            {
                "kind": self.kind,
                "val_fraction": None if self.val_paths is not None else self.val_fraction,
                "encoding": self.encoding,
                "files": [[k, str(p.resolve()), _file_stat(p), k in self.val_keys] for k, p in self.files],
            }
        )


class HFSource(Source):
    """Any Hugging Face dataset through ``datasets.load_dataset(path, name, split=..., streaming=...,
    data_files=...)``; each row's ``text_column`` is one document.

    Args:
        path: dataset name on the Hub or a builder such as ``"json"``, ``"text"``, ``"parquet"``.
        name: dataset configuration name.
        split: the split to read the training documents from.
        val_split: the split to read validation documents from; if None, the documents of ``split`` are divided
            by a hash of their index: ``hash_fraction(str(index)) < val_fraction`` goes to validation.
        text_column: the column holding the text; a missing column raises ValueError listing the columns.
        streaming: stream instead of downloading and preparing the whole dataset.
        data_files: passed to ``load_dataset`` (local files: their sizes and mtimes enter the fingerprint).
        val_fraction: used when ``val_split`` is None.
        max_documents: read at most this many documents from each loaded split (before the hash split).
        revision: dataset revision on the Hub (enters the fingerprint).
        load_kwargs: more keyword arguments for ``load_dataset`` (e.g. ``cache_dir``).
    """

    kind = "hf"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        text_column: str = "text",
        streaming: bool = False,
        data_files: Any = None,
        val_fraction: float = 0.01,
        max_documents: int | None = None,
        revision: str | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
    ):
        self.path, self.name, self.split, self.val_split = path, name, split, val_split
        self.text_column, self.streaming = text_column, bool(streaming)
        self.data_files = _plain(data_files)
        self.val_fraction = _check_fraction(val_fraction)
        self.max_documents = _check_positive_or_none("max_documents", max_documents)
        self.revision = revision
        self.load_kwargs = _plain(load_kwargs) or {}
        self._loaded: dict[str, Any] = {}
        # fail now, not in the middle of training: load the split(s) and check the text column
        for hf_split in [self.split] + ([self.val_split] if self.val_split is not None else []):
            self._check_column(self._load(hf_split), hf_split)

    def _load(self, hf_split: str):
        if hf_split not in self._loaded:
            import datasets  # heavy import, only when this source is used

            kwargs = dict(self.load_kwargs)
            if self.data_files is not None:
                kwargs["data_files"] = self.data_files
            if self.revision is not None:
                kwargs["revision"] = self.revision
            self._loaded[hf_split] = datasets.load_dataset(
                self.path, self.name, split=hf_split, streaming=self.streaming, **kwargs
            )
        return self._loaded[hf_split]

    def _check_column(self, ds, hf_split: str) -> None:
        columns = getattr(ds, "column_names", None)
        if columns is None:  # streaming datasets with unknown features: look at the first row
            first = next(iter(ds), None)
            columns = list(first.keys()) if first is not None else []
        if self.text_column not in columns:
            raise ValueError(
                f"hf source {self.path!r} split {hf_split!r}: text_column {self.text_column!r} not found; "
                f"available columns: {sorted(columns)}"
            )

    def _texts(self, hf_split: str) -> Iterator[str]:
        ds = self._load(hf_split)
        if self.max_documents is not None:
            ds = ds.take(self.max_documents) if self.streaming else ds.select(range(min(self.max_documents, len(ds))))
        # read only the text column, a block of rows at a time (much faster than row by row)
        for block in ds.select_columns([self.text_column]).iter(batch_size=1024):
            for text in block[self.text_column]:
                yield "" if text is None else str(text)

    def documents(self, split: str) -> Iterator[str]:
        want_val = check_split(split) == "val"
        if self.val_split is not None:
            yield from self._texts(self.val_split if want_val else self.split)
            return
        for i, text in enumerate(self._texts(self.split)):
            if is_val(str(i), self.val_fraction) == want_val:
                yield text

    def _local_files(self) -> list:
        """Sizes and mtimes of local ``data_files`` (glob patterns expanded); remote entries are kept as names."""
        entries = self.data_files
        if entries is None:
            return []
        if isinstance(entries, dict):
            return [[k, self._stat_entries(v)] for k, v in sorted(entries.items())]
        return self._stat_entries(entries)

    @staticmethod
    def _stat_entries(entries) -> list:
        out = []
        for entry in [entries] if isinstance(entries, str) else entries:
            matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
            if matches:
                out.extend([str(Path(m).resolve()), _file_stat(Path(m))] for m in matches)
            else:
                out.append([entry, None])
        return out

    def fingerprint(self) -> str:
        # `streaming` is left out on purpose: it changes how the rows are read, not which rows there are
        return stable_hash(
            {
                "kind": self.kind,
                "path": self.path,
                "name": self.name,
                "split": self.split,
                "val_split": self.val_split,
                "text_column": self.text_column,
                "val_fraction": None if self.val_split is not None else self.val_fraction,
                "max_documents": self.max_documents,
                "revision": self.revision,
                "data_files": self._local_files(),
                "load_kwargs": {k: v for k, v in self.load_kwargs.items() if k != "cache_dir"},
            }
        )


SOURCES: dict[str, type[Source]] = {"stdlib": StdlibSource, "text": TextSource, "hf": HFSource}


def build_source(kind: str, **kwargs: Any) -> Source:
    """Build a source by kind: ``"stdlib"`` (:class:`StdlibSource`), ``"text"`` (:class:`TextSource`) or
    ``"hf"`` (:class:`HFSource`); ``kwargs`` go to its constructor."""
    if kind not in SOURCES:
        raise ValueError(f"unknown data source kind {kind!r}; allowed kinds: {sorted(SOURCES)}")
    return SOURCES[kind](**kwargs)
