"""Token cache: a split tokenized once into a flat, memory-mapped array of token ids.

Layout (as in nanoGPT): ``tokens-<fingerprint>.bin`` holds the raw ids (numpy ``uint16`` when the vocabulary has
at most 65536 entries, else ``uint32``), every document followed by ``<|endoftext|>``; ``tokens-<fingerprint>.json``
holds the metadata. The fingerprint covers the source, the tokenizer (hash of its JSON) and the split, so a
changed corpus or tokenizer never reads a stale cache. Files are written to a temporary name and renamed, so a
crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bitflow.data.sources import Source, check_split, stable_hash
from bitflow.data.tokenizer import eos_id
from bitflow.io import atomic_output, build_lock, verify_manifest, write_manifest

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = "~/.cache/bitflow"


def default_cache_dir() -> Path:
    """Where tokenizers and token arrays are cached: ``$BITFLOW_CACHE`` if set, else ``~/.cache/bitflow``."""
    return Path(os.environ.get("BITFLOW_CACHE") or DEFAULT_CACHE_DIR).expanduser()


@dataclass(frozen=True)
class TokenCache:
    """A tokenized split on disk: ``path`` (the .bin), ``num_tokens``, ``dtype``, and ``hit``: True when it was
    found on disk, False when it was tokenized by this call."""

    path: Path
    num_tokens: int
    num_documents: int
    dtype: str
    hit: bool
    seconds: float = 0.0

    def load(self) -> np.ndarray:
        """The tokens as a read-only memory map (an empty array when there are none)."""
        return load_tokens(self.path, self.dtype, self.num_tokens)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha1 of the tokenizer's JSON."""
    return hashlib.sha1(tokenizer.to_str().encode("utf-8")).hexdigest()


def cache_fingerprint(source: Source, tokenizer: Tokenizer, split: str) -> str:
    """Cache key of a tokenized split: source fingerprint + tokenizer hash + split (+ cache format)."""
    return stable_hash(
        {
            "source": source.fingerprint(),
            "tokenizer": tokenizer_hash(tokenizer),
            "split": check_split(split),
            "format": CACHE_FORMAT,
        }
    )


def load_tokens(path: str | os.PathLike, dtype: str, num_tokens: int) -> np.ndarray:
    """Memory-map a ``.bin`` token file read-only (numpy cannot map an empty file: returns an empty array)."""
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def encode_documents(
    tokenizer: Tokenizer, documents: Iterable[str], dtype: np.dtype, chunk_size: int = 256
) -> Iterator[tuple[np.ndarray, int]]:
    """Tokenize documents in chunks with ``encode_batch`` (parallel in Rust) and yield, per chunk, the flat id
    array (each document followed by EOS) and the number of documents in it. Empty documents are skipped."""
    eos = eos_id(tokenizer)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets
    for chunk in _chunks((d for d in documents if d), chunk_size):
        ids = [e.ids + [eos] for e in encode(chunk, add_special_tokens=False)]
        yield np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype), len(chunk)


def build_token_cache(
    source: Source,
    tokenizer: Tokenizer,
    split: str,
    cache_dir: str | os.PathLike,
    chunk_size: int = 256,
) -> TokenCache:
    """Tokenize ``split`` of ``source`` into ``cache_dir/tokens-<fingerprint>.bin`` unless it is already there.

    A second call with the same source, tokenizer and split reads only the metadata and returns ``hit=True``.
    """
    cache_dir = Path(cache_dir).expanduser()
    fp = cache_fingerprint(source, tokenizer, split)
    bin_path, meta_path = cache_dir / f"tokens-{fp}.bin", cache_dir / f"tokens-{fp}.json"
    cached = _cached_tokens(bin_path, meta_path)
    if cached is not None:
        return cached
    with build_lock(bin_path):  # two runs at once: the second waits, then finds the first one's cache
        cached = _cached_tokens(bin_path, meta_path)
        return cached if cached is not None else _build(source, tokenizer, split, bin_path, meta_path, chunk_size)


def _cached_tokens(bin_path: Path, meta_path: Path) -> TokenCache | None:
    """The cache at ``bin_path`` if it is whole (size from its metadata, size and sha256 from its manifest);
    None when absent or damaged (logged with its path: it is tokenized again)."""
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{meta_path} is unreadable ({e})"
    else:
        actual = bin_path.stat().st_size
        problem = verify_manifest(bin_path) if actual == expected else (
            f"{bin_path} is {actual} bytes, its metadata {meta_path.name} says {expected}: truncated")
        if problem is None:
            return TokenCache(bin_path, meta["num_tokens"], meta["num_documents"], meta["dtype"], hit=True)
    log.warning("token cache: %s; tokenizing again", problem)
    return None


def _build(
    source: Source, tokenizer: Tokenizer, split: str, bin_path: Path, meta_path: Path, chunk_size: int
) -> TokenCache:
    dtype = token_dtype(tokenizer.get_vocab_size())
    start = time.perf_counter()
    num_tokens = num_docs = 0
    with atomic_output(bin_path) as tmp, open(tmp, "wb") as f:
        for ids, n in encode_documents(tokenizer, source.documents(split), dtype, chunk_size):
            ids.tofile(f)
            num_tokens += len(ids)
            num_docs += n
    write_manifest(bin_path)
    seconds = time.perf_counter() - start
    meta = {
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "dtype": dtype.name,
        "split": split,
        "source": source.fingerprint(),
        "tokenizer_sha1": tokenizer_hash(tokenizer),
        "tokenize_seconds": seconds,
        "format": CACHE_FORMAT,
    }
    with atomic_output(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return TokenCache(bin_path, num_tokens, num_docs, dtype.name, hit=False, seconds=seconds)
