"""Which tokens train and which validate: a split is a range of a token cache, and :func:`plan_splits` decides
the ranges once the source is tokenized.

Normally the training split is the whole train cache and the validation split the whole val cache. A corpus of one
or a few files (or rows) often has no validation document under the hash split, or one too short for a window;
then, unless the validation data was named explicitly (``val_paths``, ``val_split``), the last ``k * seq_len + 1``
tokens of the training stream are held out for validation, ``k = max(1, ceil(val_fraction * N / seq_len))``, and
training windows are drawn from the tokens before them only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bitflow.data.cache import TokenCache
from bitflow.data.sources import Source


@dataclass(frozen=True)
class TokenRange:
    """Tokens ``[start, stop)`` of a token cache: a split as the datasets read it (the whole cache, or the part
    of the training stream before or after a held-out tail)."""

    cache: TokenCache
    start: int
    stop: int

    @classmethod
    def whole(cls, cache: TokenCache) -> TokenRange:
        """Every token of ``cache``."""
        return cls(cache, 0, cache.num_tokens)

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self) -> np.ndarray:
        """The tokens, a read-only memory map (a view into the cache file)."""
        return self.cache.load()[self.start : self.stop]


@dataclass(frozen=True)
class SplitPlan:
    """Which tokens train and validate (see :func:`plan_splits`): ``heldout`` tokens at the end of the training
    stream serve as the validation split (0 when the source's own validation split is used), ``reason`` why."""

    train: TokenRange
    val: TokenRange
    heldout: int = 0
    reason: str = ""


def plan_splits(source: Source, train: TokenCache, val: TokenCache, seq_len: int) -> SplitPlan:
    """The train and validation token ranges of a tokenized source, or ValueError (naming the config key).

    - no token at all: "no text found in <source>";
    - a validation split with at least one window (``seq_len + 1`` tokens): both caches as they are;
    - otherwise, if the validation data was named explicitly (``val_paths``/``val_split``): an error;
    - otherwise hold out the last ``k * seq_len + 1`` training tokens, ``k = max(1, ceil(val_fraction * N /
      seq_len))`` windows, and train on the ``N - k * seq_len - 1`` tokens before them: the two ranges do not
      overlap, and the plan is a pure function of the caches, ``seq_len`` and ``val_fraction`` (exact on resume,
      the same on every rank).
    """
    window = seq_len + 1
    if train.num_tokens + val.num_tokens == 0:
        raise ValueError(f"no text found in {source.origin()}: every document is empty")
    if train.num_tokens == 0:
        raise ValueError(f"no text found in {source.origin()} for training (only validation data has text)")
    if val.num_tokens >= window:
        if train.num_tokens < window:
            raise ValueError(
                f"data.seq_len={seq_len} is not allowed: the training split of {source.origin()} has "
                f"{train.num_tokens} tokens, fewer than one window of data.seq_len + 1 = {window}; "
                f"give data.seq_len <= {train.num_tokens - 1} or add text"
            )
        return SplitPlan(TokenRange.whole(train), TokenRange.whole(val))
    if source.val_origin() is not None:
        raise ValueError(
            f"data.seq_len={seq_len} is not allowed: the validation data {source.val_origin()} has "
            f"{val.num_tokens} tokens, fewer than one window of data.seq_len + 1 = {window}; "
            f"give data.seq_len <= {max(val.num_tokens - 1, 1)} or more validation text"
        )
    n = train.num_tokens
    windows = max(1, math.ceil(source.val_fraction * n / seq_len))
    heldout = windows * seq_len + 1
    if n - heldout < window:
        raise ValueError(
            f"data.seq_len={seq_len} is not allowed: {source.origin()} has {n} tokens, too few to hold out "
            f"{windows} validation window(s) ({heldout} tokens, data.source.val_fraction={source.val_fraction}) "
            f"and keep one training window of data.seq_len + 1 = {window} tokens; lower data.seq_len (at most "
            f"{max((n - 2) // 2, 1)} even with a single validation window) or data.source.val_fraction, or add text"
        )
    where = f"the validation split of {source.origin()}"
    reason = f"{where} is empty" if val.num_tokens == 0 else (
        f"{where} has only {val.num_tokens} tokens, less than one window of data.seq_len + 1 = {window}"
    )
    return SplitPlan(TokenRange(train, 0, n - heldout), TokenRange(train, n - heldout, n), heldout, reason)
