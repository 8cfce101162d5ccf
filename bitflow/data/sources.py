"""Corpus sources: where the text comes from and how it splits into train and validation.

A source yields documents (one string each) for a split, ``"train"`` or ``"val"``, and a fingerprint: a stable
hash of everything that decides the content, so the tokenizer and the token caches built from it can be reused
safely. Three kinds exist:

- ``stdlib``: the ``.py`` files of the running Python's standard library (about 30 MB, always offline);
- ``text``: local text files, directories or glob patterns;
- ``hf``: any Hugging Face dataset, through ``datasets.load_dataset``.

The train/validation split is decided by a hash of a machine-independent key (a file's relative path, a
document's index), so two machines that see the same data get the same split. A hash split that would leave the
training split with nothing (one file that hashes into validation) puts everything in training instead; when the
validation split ends up empty or shorter than one window, the DataModule holds out the tail of the training token
stream (:func:`bitflow.data.splits.plan_splits`).

Error messages name the config keys (``data.source.<option>``) that the Hydra configs in ``conf/data/source/`` set.
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
# the one default of every source's val_fraction (conf/data/source/*.yaml restate it; a test keeps them equal)
DEFAULT_VAL_FRACTION = 0.05
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


def check_fraction(key: str, value: float) -> float:
    """Return ``value`` as a float if it is a number in [0, 1), else ValueError naming the config ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r} is not allowed: give a fraction in [0, 1)")
    return float(value)


def check_int(key: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """ValueError naming the config ``key`` unless ``value`` is an integer >= ``minimum`` (or None when allowed)."""
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        also = " or null" if allow_none else ""
        raise ValueError(f"{key}={value!r} is not allowed: give an integer >= {minimum}{also}")


def _file_stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class Source(ABC):
    """A corpus: documents per split, a fingerprint of its content, and where it comes from (for messages).

    ``val_fraction`` is the expected share of the validation split under a hash split; the DataModule also uses
    it to size a held-out tail when the hash split leaves validation empty.
    """

    kind: str = "abstract"
    val_fraction: float = DEFAULT_VAL_FRACTION

    @abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """Yield the documents (one string each) of ``split`` ("train" or "val") in a deterministic order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hash (hex) of everything that determines the documents: kind, files or dataset, options."""

    @abstractmethod
    def origin(self) -> str:
        """Where the text comes from, as the config key and value a user set (e.g. ``data.source.paths=[...]``)."""

    def val_origin(self) -> str | None:
        """The config key and value that name separate validation data, or None when the split is a hash split
        (then a too-small validation split is replaced by a held-out tail of the training stream)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.origin()})"


def _hash_val_keys(keys: Sequence[str], val_fraction: float) -> set[str]:
    """The keys whose hash puts them in validation; none when that would leave the training split empty (one
    file, or a few that all hash into validation): then everything trains and the DataModule holds out a tail."""
    val = {k for k in keys if is_val(k, val_fraction)}
    return set() if len(val) == len(keys) else val


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
        val_fraction: expected fraction of files in the validation split (``data.source.val_fraction``).
        max_files: keep only this many files (for tiny test corpora). The subset is deterministic (files ordered
            by a second hash of their path) and keeps the validation share, with at least one validation file.
        root: the directory to scan; defaults to the running Python's stdlib.
    """

    kind = "stdlib"

    def __init__(
        self, val_fraction: float = DEFAULT_VAL_FRACTION, max_files: int | None = None, root: str | None = None
    ):
        self.val_fraction = check_fraction("data.source.val_fraction", val_fraction)
        check_int("data.source.max_files", max_files, 1, allow_none=True)
        self.max_files = max_files
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.source.root={str(self.root)!r} is not allowed: no such directory")
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            # prune third-party trees (and bytecode caches) instead of walking them: site-packages is large
            dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS and d != "__pycache__"]
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".py") and path.is_file():
                    files.append((path.relative_to(self.root).as_posix(), path))
        files.sort()
        if not files:
            raise ValueError(f"no text found in {self.origin()}: no .py files there")
        val_keys = {k for k, _ in files if is_val(k, self.val_fraction)}
        if self.max_files is not None and self.max_files < len(files):
            files, val_keys = self._subset(files, val_keys, self.max_files)
        self.files = files
        self.val_keys = _hash_val_keys([k for k, _ in files], self.val_fraction)

    def _subset(self, files, val_keys, n):
        """A deterministic, spread-out subset of ``n`` files that keeps the validation share (at least 1)."""
        order = sorted(files, key=lambda kp: hash_fraction("subset:" + kp[0]))
        val = [kp for kp in order if kp[0] in val_keys]
        train = [kp for kp in order if kp[0] not in val_keys]
        n_val = min(len(val), max(1, round(n * self.val_fraction))) if self.val_fraction > 0 else 0
        chosen = sorted(val[:n_val] + train[: n - n_val])
        return chosen, {k for k, _ in chosen if k in val_keys}

    def origin(self) -> str:
        extra = f", data.source.max_files={self.max_files}" if self.max_files is not None else ""
        return f"the standard library's .py files under {str(self.root)!r} (data=stdlib{extra})"

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


def _as_list(paths: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """A path or a list of paths (Hydra's ListConfig too) as a plain list of strings."""
    if paths is None:
        return None
    return [_plain(paths)] if isinstance(paths, (str, os.PathLike)) else _plain(paths)


def _expand(pattern: str, where: str) -> list[tuple[str, Path]]:
    """Expand a file, directory or glob pattern into sorted (key, path) pairs; the key is the path relative to
    the pattern's fixed base directory (so it does not depend on where the data lives on this machine).
    ``where`` (the config key and value) starts the FileNotFoundError raised when nothing matches."""
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
        parts = Path(expanded).parts
        fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
        base = Path(*fixed) if fixed else Path(".")
        paths = [Path(p) for p in glob.glob(expanded, recursive=True)]
    elif os.path.isdir(expanded):
        base = Path(expanded)
        paths = list(base.rglob("*"))
    elif os.path.isfile(expanded):
        base = Path(expanded).parent
        paths = [Path(expanded)]
    else:
        raise FileNotFoundError(f"no text found in {where}: no such file or directory: {pattern!r}")
    pairs = sorted((p.relative_to(base).as_posix(), p) for p in paths if p.is_file())
    if not pairs:
        raise FileNotFoundError(
            f"no text found in {where}: {pattern!r} matches no files; give text files, directories or globs"
        )
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


def _files_with_text(patterns: list[str], key: str) -> list[tuple[str, Path]]:
    """Every file the patterns match, deduplicated; FileNotFoundError/ValueError starting "no text found in
    <key>=<patterns>" when a pattern matches nothing or every matched file is empty (a cheap stat, no reads)."""
    where = f"{key}={patterns}"
    if not patterns:
        raise ValueError(f"no text found in {where}: give at least one file, directory or glob")
    pairs = _dedupe([kp for pattern in patterns for kp in _expand(pattern, where)])
    if all(p.stat().st_size == 0 for _, p in pairs):
        raise ValueError(f"no text found in {where}: the {len(pairs)} matched file(s) are empty")
    return pairs


class TextSource(_FileSource):
    """Local text files: each file is one document.

    Args:
        paths: a path or a list of paths (``data.source.paths``); each is a file, a directory (all files under
            it) or a glob pattern (``**`` allowed). A missing path, a pattern that matches nothing, or files that
            are all empty raise "no text found in data.source.paths=..." here, before any work.
        val_fraction: expected fraction of files in the validation split (by a hash of the file's path relative
            to its pattern's base directory). Ignored when ``val_paths`` is given. One file, or a few that leave
            the validation split empty, get a held-out tail of the token stream instead (see the DataModule).
        val_paths: files for the validation split, given like ``paths``; then ``paths`` are all train.
        encoding: text encoding; undecodable bytes become U+FFFD.
    """

    kind = "text"

    def __init__(
        self,
        paths: str | Sequence[str],
        val_fraction: float = DEFAULT_VAL_FRACTION,
        val_paths: str | Sequence[str] | None = None,
        encoding: str = "utf-8",
    ):
        self.paths = _as_list(paths)
        self.val_paths = _as_list(val_paths)
        self.val_fraction = check_fraction("data.source.val_fraction", val_fraction)
        self.encoding = encoding
        train = _files_with_text(self.paths, "data.source.paths")
        if self.val_paths is None:
            files = train
            self.val_keys = _hash_val_keys([k for k, _ in files], self.val_fraction)
        else:
            # keys get a prefix so a train and a val file with the same relative name stay distinct
            val = [("val:" + k, p) for k, p in _files_with_text(self.val_paths, "data.source.val_paths")]
            both = {p.resolve() for _, p in train} & {p.resolve() for _, p in val}
            if both:
                raise ValueError(
                    "data.source.paths and data.source.val_paths share files (allowed: disjoint sets): "
                    f"{sorted(map(str, both))[:5]}"
                )
            files = [("train:" + k, p) for k, p in train] + val
            self.val_keys = {k for k, _ in val}
        files.sort()
        self.files = files

    def origin(self) -> str:
        return f"data.source.paths={self.paths}"

    def val_origin(self) -> str | None:
        return None if self.val_paths is None else f"data.source.val_paths={self.val_paths}"

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

    Constructing one only checks the arguments; the dataset is loaded (and ``text_column`` checked) on first use,
    in the DataModule's ``prepare_data``, so that a config is validated in well under a second.

    Args:
        path: dataset name on the Hub or a builder such as ``"json"``, ``"text"``, ``"parquet"``.
        name: dataset configuration name.
        split: the split to read the training documents from.
        val_split: the split to read validation documents from; if None, the documents of ``split`` are divided
            by a hash of their index: ``hash_fraction(str(index)) < val_fraction`` goes to validation (all go to
            training when none would, e.g. a one-row dataset; the DataModule then holds out a tail).
        text_column: the column holding the text; a missing column raises ValueError listing the columns.
        streaming: stream instead of downloading and preparing the whole dataset.
        data_files: passed to ``load_dataset`` (local files: their sizes and mtimes enter the fingerprint).
        val_fraction: used when ``val_split`` is None.
        max_documents: read at most this many documents from each loaded split (before the hash split).
        revision: dataset revision on the Hub (enters the fingerprint).
        load_kwargs: more keyword arguments for ``load_dataset`` (e.g. ``cache_dir``).
    """

    kind = "hf"
    # version of the hash-split rule, in the fingerprint: 2 = "no training document -> everything trains"
    HASH_SPLIT_RULE = 2

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        text_column: str = "text",
        streaming: bool = False,
        data_files: Any = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        max_documents: int | None = None,
        revision: str | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
    ):
        for key, value, optional in (
            ("path", path, False), ("split", split, False), ("text_column", text_column, False),
            ("name", name, True), ("val_split", val_split, True), ("revision", revision, True),
        ):  # fmt: skip
            if not (optional and value is None) and (not isinstance(value, str) or not value):
                allowed = "a non-empty string" + (" or null" if optional else "")
                raise ValueError(f"data.source.{key}={value!r} is not allowed: give {allowed}")
        self.path, self.name, self.split, self.val_split = path, name, split, val_split
        self.text_column, self.streaming = text_column, bool(streaming)
        self.data_files = _plain(data_files)
        self.val_fraction = check_fraction("data.source.val_fraction", val_fraction)
        check_int("data.source.max_documents", max_documents, 1, allow_none=True)
        self.max_documents = max_documents
        self.revision = revision
        self.load_kwargs = _plain(load_kwargs) or {}
        self._loaded: dict[str, Any] = {}
        self._all_train: bool | None = None

    def _load(self, hf_split: str):
        """The loaded split (once), with ``text_column`` checked."""
        if hf_split not in self._loaded:
            import datasets  # heavy import, only when this source is used

            kwargs = dict(self.load_kwargs)
            if self.data_files is not None:
                kwargs["data_files"] = self.data_files
            if self.revision is not None:
                kwargs["revision"] = self.revision
            ds = datasets.load_dataset(self.path, self.name, split=hf_split, streaming=self.streaming, **kwargs)
            self._check_column(ds, hf_split)
            self._loaded[hf_split] = ds
        return self._loaded[hf_split]

    def _check_column(self, ds, hf_split: str) -> None:
        columns = getattr(ds, "column_names", None)
        if columns is None:  # streaming datasets with unknown features: look at the first row
            first = next(iter(ds), None)
            columns = list(first.keys()) if first is not None else [self.text_column]  # no rows: no text
        if self.text_column not in columns:
            raise ValueError(
                f"data.source.text_column={self.text_column!r} is not allowed: {self.origin()} split {hf_split!r} "
                f"has no such column; available columns: {sorted(columns)}"
            )

    def _texts(self, hf_split: str) -> Iterator[str]:
        ds = self._load(hf_split)
        if self.max_documents is not None:
            ds = ds.take(self.max_documents) if self.streaming else ds.select(range(min(self.max_documents, len(ds))))
        # read only the text column, a block of rows at a time (much faster than row by row)
        for block in ds.select_columns([self.text_column]).iter(batch_size=1024):
            for text in block[self.text_column]:
                yield "" if text is None else str(text)

    def _no_train_document(self) -> bool:
        """Whether the hash split would put every document in validation (reads rows only up to the first
        training index, so it is cheap even when streaming)."""
        if self._all_train is None:
            self._all_train = not any(
                not is_val(str(i), self.val_fraction) for i, _ in enumerate(self._texts(self.split))
            )
        return self._all_train

    def documents(self, split: str) -> Iterator[str]:
        want_val = check_split(split) == "val"
        if self.val_split is not None:
            yield from self._texts(self.val_split if want_val else self.split)
            return
        if self._no_train_document():
            if not want_val:
                yield from self._texts(self.split)
            return
        for i, text in enumerate(self._texts(self.split)):
            if is_val(str(i), self.val_fraction) == want_val:
                yield text

    def origin(self) -> str:
        files = f", data.source.data_files={self.data_files}" if self.data_files is not None else ""
        name = f", data.source.name={self.name!r}" if self.name is not None else ""
        return f"data.source.path={self.path!r}{name}{files} (split {self.split!r})"

    def val_origin(self) -> str | None:
        return None if self.val_split is None else f"data.source.val_split={self.val_split!r} of {self.origin()}"

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
                "hash_split_rule": None if self.val_split is not None else self.HASH_SPLIT_RULE,
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
        raise ValueError(f"data source kind {kind!r} is not allowed: give one of {sorted(SOURCES)}")
    return SOURCES[kind](**kwargs)
