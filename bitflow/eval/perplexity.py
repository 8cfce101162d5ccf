"""Perplexity of a model on its validation split or on any text files, with sliding windows.

Every token is predicted exactly once (:func:`bitflow.eval.scoring.rolling_windows`); with ``stride`` below
the context length each prediction sees at least ``max_len + 1 - stride`` tokens of context (Press et al.,
arXiv 2012.15832), which lowers perplexity towards what the model achieves on long documents.

    loss = -1/N * sum_i log p(t_i | t_<i),    ppl = exp(loss),    bits/byte = N * loss / (ln 2 * bytes)
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from torch import nn

from bitflow.eval.scoring import rolling_windows, score_windows
from bitflow.models import model_root


def _summary(total_logp: float, n_tokens: int, n_bytes: int | None = None) -> dict[str, float]:
    loss = -total_logp / max(n_tokens, 1)
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": float(n_tokens)}
    if n_bytes:
        out["bits_per_byte"] = -total_logp / math.log(2) / n_bytes
    return out


def perplexity_of_tokens(
    model: nn.Module,
    tokens: Sequence[int] | np.ndarray,
    max_len: int | None = None,
    stride: int | None = None,
    prefix: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    precision: str = "32",
) -> dict[str, float]:
    """Mean next-token loss, perplexity and token count of one token stream (``prefix``, e.g. EOS, is
    prepended so the first token is scored too). ``max_len`` defaults to the model's ``max_seq_len``."""
    decoder = model_root(model)
    max_len = max_len or int(decoder.config.max_seq_len)
    windows = rolling_windows([int(t) for t in tokens], max_len, stride=stride, prefix=prefix)
    if not windows:
        raise ValueError("nothing to score: the token stream needs at least one token after the first")
    was_training = decoder.training
    decoder.eval()
    try:
        scores = score_windows(decoder, windows, batch_size, device, precision)
    finally:
        decoder.train(was_training)
    return _summary(sum(s for s, _ in scores), sum(w.n_scored for w in windows))


def expand_paths(patterns: str | Sequence[str]) -> list[Path]:
    """Files named by paths, directories (every file under them) and glob patterns, sorted and de-duplicated.
    Raises FileNotFoundError naming a pattern that matches nothing."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file())
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"perplexity: no file matches {pattern!r}")
        out += [p for p in found if p not in out]
    return out


def perplexity_of_files(
    model: nn.Module,
    tokenizer: Tokenizer,
    paths: str | Sequence[str],
    eos_id: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Perplexity of each text file (one document each, conditioned on ``eos_id``) and of all of them
    together: ``{"files": {path: {...}}, "total": {"loss", "ppl", "tokens", "bits_per_byte"}}``. ``kwargs`` go
    to :func:`perplexity_of_tokens` (``stride``, ``batch_size``, ``device``, ``precision``)."""
    if eos_id is None:  # bitflow.data imports Lightning: import it only when needed
        from bitflow.data.tokenizer import eos_id as tokenizer_eos_id

        eos_id = tokenizer_eos_id(tokenizer)
    per_file, total_logp, total_tokens, total_bytes = {}, 0.0, 0, 0
    for path in expand_paths(paths):
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            continue
        res = perplexity_of_tokens(model, ids, prefix=eos_id, **kwargs)
        n_bytes = len(text.encode("utf-8"))
        res = _summary(-res["loss"] * res["tokens"], int(res["tokens"]), n_bytes)
        per_file[str(path)] = res
        total_logp += -res["loss"] * res["tokens"]
        total_tokens += int(res["tokens"])
        total_bytes += n_bytes
    if not per_file:
        raise ValueError(f"perplexity: the files {paths!r} hold no text")
    return {"files": per_file, "total": _summary(total_logp, total_tokens, total_bytes)}


def perplexity_of_split(
    model: nn.Module,
    tokenizer: Tokenizer,
    source: Any | None = None,
    split: str = "val",
    cache_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Perplexity on a corpus split: the token stream bitflow validates on (every document followed by
    ``<|endoftext|>``, read from the token cache or tokenized now), scored from its first token.

    ``source`` defaults to the stdlib corpus (:class:`~bitflow.data.sources.StdlibSource`); ``max_tokens``
    keeps only the stream's first tokens (quick checks). ``kwargs`` go to :func:`perplexity_of_tokens`.
    """
    from bitflow.data.cache import build_token_cache
    from bitflow.data.datamodule import default_cache_dir
    from bitflow.data.sources import StdlibSource
    from bitflow.data.tokenizer import eos_id as tokenizer_eos_id

    source = StdlibSource() if source is None else source
    cache = build_token_cache(
        source, tokenizer, split, cache_dir if cache_dir is not None else default_cache_dir()
    )
    tokens = cache.load()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return perplexity_of_tokens(model, np.asarray(tokens), prefix=tokenizer_eos_id(tokenizer), **kwargs)
