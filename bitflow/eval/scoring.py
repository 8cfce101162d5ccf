"""Batched scoring of token sequences with a causal LM, and the sliding windows for texts longer than its
context.

Everything in :mod:`bitflow.eval` that asks "how likely is this text?" goes through :func:`score_windows`: the
lm-eval adapter's ``loglikelihood`` (a continuation after a context) and ``loglikelihood_rolling`` (a whole
text), and the perplexity of a validation split or of text files.

A :class:`Window` is a run of tokens ``w`` fed to the model as ``w[:-1]`` and predicting ``w[1:]``; only its
last ``n_scored`` targets count. Scoring a text longer than the context uses :func:`rolling_windows`: every
token is predicted exactly once, each with as much left context as the model accepts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Window:
    """Tokens ``w``: the model reads ``w[:-1]`` and the last ``n_scored`` of the targets ``w[1:]`` are
    scored."""

    tokens: tuple[int, ...]
    n_scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_scored <= len(self.tokens) - 1:
            raise ValueError(
                f"a window of {len(self.tokens)} tokens can score 1..{len(self.tokens) - 1} targets, "
                f"got n_scored={self.n_scored}"
            )


def rolling_windows(
    tokens: Sequence[int],
    max_len: int,
    stride: int | None = None,
    prefix: int | None = None,
    first: int | None = None,
) -> list[Window]:
    """Windows that score every token of the stream ``s = [prefix] + tokens`` from position ``first`` on
    exactly once, each with the most left context the model accepts. ``first`` defaults to 1: everything but
    the stream's first token (which is ``prefix`` when one is given).

    Targets are cut into consecutive chunks of ``stride`` tokens (default ``max_len``: disjoint windows, as
    lm-eval's rolling log-likelihood). To predict ``s[a:b]`` the model reads ``s[max(0, b-1-max_len) : b-1]``,
    so every token of a chunk sees at least ``max_len + 1 - stride`` tokens before it, or all there are. A
    chunk that starts within the first ``max_len`` tokens reaches up to ``s[max_len]``: its tokens see the
    whole stream start either way. A stride below ``max_len`` gives every token more context at a higher cost
    (the sliding-window evaluation of Press et al., arXiv 2012.15832).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be a positive number of tokens, got {max_len}")
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len={max_len}, got {stride}")
    s = ([prefix] if prefix is not None else []) + list(tokens)
    a = 1 if first is None else first
    if a < 1:
        raise ValueError(f"first must be >= 1 (a token needs a token before it), got {first}")
    windows = []
    while a < len(s):
        b = min(len(s), max(a + stride, max_len + 1))
        start = max(0, b - 1 - max_len)
        windows.append(Window(tuple(s[start:b]), b - a))
        a = b
    return windows


def continuation_windows(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[Window]:
    """The windows that score ``continuation`` after ``context``, cutting the context from the left to fit.

    A continuation of up to ``max_len`` tokens is one window: the model reads the last ``max_len`` tokens of
    ``context + continuation[:-1]``. A longer one is scored in rolling windows with stride ``max_len // 2``,
    so each of its tokens still sees at least half a context.
    """
    if not context:
        raise ValueError(
            "the context must hold at least one token (use the EOS/BOS token for an empty context)"
        )
    if not continuation:
        raise ValueError("the continuation is empty: there is nothing to score")
    stride = max_len if len(continuation) <= max_len else max(1, max_len // 2)
    return rolling_windows(list(context) + list(continuation), max_len, stride=stride, first=len(context))


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the model's device for ``precision`` "bf16"/"16"; a no-op for "32"."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be one of '32', 'bf16', '16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def _scored_logits(
    model: nn.Module, inputs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Logits at positions (rows[k], cols[k]) only: the LM head runs on just these hidden states when the
    model exposes ``hidden_states`` and ``lm_head`` (bitflow's Llama), which saves a [B, T, V] tensor."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        return model.lm_head(model.hidden_states(inputs)[rows, cols])
    return model(inputs)[rows, cols]


@torch.no_grad()
def score_windows(
    model: nn.Module,
    windows: Sequence[Window],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    precision: str = "32",
    pad_id: int = 0,
) -> list[tuple[float, bool]]:
    """Sum of log-probabilities of each window's scored targets, and whether greedy decoding (argmax at every
    scored position) reproduces all of them: ``sum_j log p(w[j+1] | w[:j+1])`` over the last ``n_scored``
    positions.

    Windows are run longest first in batches of ``batch_size``, right-padded with ``pad_id`` (a causal model
    never attends to the padding that follows a position, so padding changes nothing). Results come back in
    input order. Log-softmax is taken in float32 whatever ``precision`` the forward pass runs in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].tokens), i))
    for batch in _batches(order, batch_size):
        width = len(windows[batch[0]].tokens) - 1
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(batch):
            w = windows[i]
            n_in = len(w.tokens) - 1
            inputs[r, :n_in] = torch.tensor(w.tokens[:-1], dtype=torch.long)
            rows += [r] * w.n_scored
            cols += range(n_in - w.n_scored, n_in)
            targets += w.tokens[-w.n_scored :]
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        targets_t = torch.tensor(targets, device=device)
        with autocast_context(device, precision):
            logits = _scored_logits(model, inputs.to(device), rows_t, cols_t)
        logp = F.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(1, targets_t[:, None])[:, 0].double().cpu()
        hit = (logp.argmax(dim=-1) == targets_t).cpu()
        k = 0
        for i in batch:
            n = windows[i].n_scored
            out[i] = (float(token_logp[k : k + n].sum()), bool(hit[k : k + n].all()))
            k += n
    return out  # type: ignore[return-value]
