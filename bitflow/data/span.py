"""T5's span corruption (Raffel et al. 2020, arXiv 1910.10683, section 3.1.4), as a pure function.

A sequence of ``L`` tokens gets ``n = round(L * noise_density)`` noise tokens in ``k = round(n / mean_span)``
spans; noise and non-noise lengths are random positive partitions, interleaved non-noise first (T5's
``random_spans_noise_mask``). The input keeps the non-noise tokens with one sentinel per dropped span; the target is
each sentinel followed by the span it replaced, then end-of-sequence. Lengths depend only on ``L``, so batches need
no padding. The draw comes from a caller-seeded ``torch.Generator`` (exact on resume).
"""

from __future__ import annotations

import torch

__all__ = ["span_corrupt", "span_lengths"]


def span_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """``(noise tokens, spans)`` of a sequence of ``length`` tokens (at least one of each, one non-noise token)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"task.noise_density={noise_density!r} is not allowed; allowed: a number in (0, 1)")
    if mean_span < 1:
        raise ValueError(f"task.mean_span={mean_span!r} is not allowed; allowed: a number >= 1")
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(1, min(round(noise / mean_span), noise, length - noise))
    return noise, spans


def _partition(n: int, k: int, generator: torch.Generator) -> list[int]:
    """A uniformly random composition of ``n`` into ``k`` positive parts."""
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def span_corrupt(
    tokens: torch.Tensor, first_sentinel: int, eos_id: int, generator: torch.Generator,
    noise_density: float = 0.15, mean_span: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [B, L - n + k], targets [B, n + k + 1])`` of ``tokens`` [B, L]; sentinel ``i`` is id
    ``first_sentinel + i``."""
    b, length = tokens.shape
    noise, spans = span_lengths(length, noise_density, mean_span)
    cpu = tokens.cpu()
    inputs, targets = [], []
    for row in cpu:
        noise_parts = _partition(noise, spans, generator)
        keep_parts = _partition(length - noise, spans, generator)
        src, tgt, pos = [], [], 0
        for i, (keep, drop) in enumerate(zip(keep_parts, noise_parts, strict=True)):
            src.append(row[pos : pos + keep])
            pos += keep
            sentinel = torch.tensor([first_sentinel + i])
            src.append(sentinel)
            tgt += [sentinel, row[pos : pos + drop]]
            pos += drop
        tgt.append(torch.tensor([eos_id]))
        inputs.append(torch.cat(src))
        targets.append(torch.cat(tgt))
    return torch.stack(inputs).to(tokens.device), torch.stack(targets).to(tokens.device)
