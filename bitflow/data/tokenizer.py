"""Byte-level BPE tokenizer: trained on a source's train split, cached on disk, stored in checkpoints.

Byte-level means the 256 byte values are the base alphabet (Radford et al., 2019, GPT-2), so every text
encodes without unknown tokens and ``decode(encode(text)) == text`` holds exactly: no normalizer, no prefix
space. One special token, ``<|endoftext|>``, separates documents in the token streams (see ``cache.py``).
Everything returns a plain ``tokenizers.Tokenizer``; decode with ``skip_special_tokens=False`` to keep EOS.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bitflow.data.sources import Source, stable_hash
from bitflow.io import atomic_output, build_lock, verify_manifest, write_manifest

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)
DEFAULT_VOCAB_SIZE = 8192  # the one default (TokenDataModule, conf/data/stdlib.yaml: a test keeps them equal)
# every setting that changes the trained tokenizer enters its cache key
TOKENIZER_SETTINGS = {
    "model": "bpe",
    "pre_tokenizer": "byte_level(add_prefix_space=False, use_regex=True)",
    "decoder": "byte_level",
    "special_tokens": list(SPECIAL_TOKENS),
    "min_frequency": 2,
    "version": 1,
}


def check_vocab_size(vocab_size: int) -> int:
    """Return ``vocab_size`` if a byte-level BPE can have it (>= 256 bytes + special tokens), else ValueError
    naming ``data.vocab_size``."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"data.vocab_size={vocab_size!r} is not allowed: the minimum is {MIN_VOCAB_SIZE} (a byte-level BPE "
            f"needs the {BYTE_ALPHABET} byte tokens plus {len(SPECIAL_TOKENS)} special token); give an integer "
            f">= {MIN_VOCAB_SIZE}"
        )
    return vocab_size


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with bitflow's settings (no normalizer, no prefix space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (bytes + ``<|endoftext|>`` + merges) on ``documents``.

    The result can have fewer entries than asked for when the corpus is too small to supply enough merges
    (pairs seen fewer than ``min_frequency`` times are not merged); read ``get_vocab_size()``.
    """
    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=TOKENIZER_SETTINGS["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def tokenizer_fingerprint(source: Source, vocab_size: int) -> str:
    """Cache key of the tokenizer trained on ``source``: its fingerprint, the vocab size and the settings."""
    return stable_hash({"source": source.fingerprint(), "vocab_size": vocab_size, "settings": TOKENIZER_SETTINGS})


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` file; FileNotFoundError (naming ``data.tokenizer_path``) if it does not exist."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer_path={str(path)!r} is not allowed: no such file")
    return Tokenizer.from_file(str(path))


def build_tokenizer(
    source: Source,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
) -> tuple[Tokenizer, bool]:
    """The tokenizer for ``source``: loaded from ``tokenizer_path`` if given, else from the cache
    ``cache_dir/tokenizer-<fingerprint>.json``, else trained on the train split and saved there.

    Returns ``(tokenizer, cache_hit)``; ``cache_hit`` is False only when it was trained now.
    """
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path), True
    check_vocab_size(vocab_size)
    path = Path(cache_dir).expanduser() / f"tokenizer-{tokenizer_fingerprint(source, vocab_size)}.json"
    cached = _cached_tokenizer(path)
    if cached is not None:
        return cached, True
    with build_lock(path):  # two runs at once: the second waits, then finds the first one's tokenizer
        cached = _cached_tokenizer(path)
        if cached is not None:
            return cached, True
        tok = train_tokenizer(source.documents("train"), vocab_size)
        with atomic_output(path) as tmp:
            tok.save(str(tmp))
        write_manifest(path)
    return tok, False


def _cached_tokenizer(path: Path) -> Tokenizer | None:
    """The cached tokenizer at ``path``; None when absent, or corrupted (logged with its path: rebuilt)."""
    if not path.is_file():
        return None
    problem = verify_manifest(path)
    if problem is None:
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # a file from before manifests existed, damaged
            problem = f"{path} does not load ({e})"
    log.warning("tokenizer cache: %s; training it again", problem)
    return None


# the end-of-document tokens of bitflow's own tokenizers (first) and of imported ones (Llama 3, Llama 2/Mistral, ...)
EOS_TOKENS = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


def eos_token(tokenizer: Tokenizer) -> str:
    """The tokenizer's end-of-document token: the first of :data:`EOS_TOKENS` it has (``<|endoftext|>`` for
    bitflow's own). ValueError naming them if it has none."""
    for token in EOS_TOKENS:
        if tokenizer.token_to_id(token) is not None:
            return token
    raise ValueError(f"tokenizer has none of the end-of-document tokens {list(EOS_TOKENS)}; bitflow's token streams "
                     f"separate documents with one")


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of the tokenizer's end-of-document token (:func:`eos_token`)."""
    return tokenizer.token_to_id(eos_token(tokenizer))


def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer stored in a bitflow checkpoint dict at ``ckpt["bitflow"]["tokenizer"]`` (JSON string)."""
    try:
        blob = ckpt["bitflow"]["tokenizer"]
    except (KeyError, TypeError) as err:
        raise ValueError("not a bitflow checkpoint: no ckpt['bitflow']['tokenizer'] entry") from err
    if isinstance(blob, dict):  # tolerate an already-parsed JSON object
        blob = json.dumps(blob)
    if not isinstance(blob, str):
        raise TypeError(f"ckpt['bitflow']['tokenizer'] must be a JSON string, got {type(blob).__name__}")
    return Tokenizer.from_str(blob)
