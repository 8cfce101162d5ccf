"""BERT's masked-language-modelling corruption (Devlin et al. 2019, arXiv 1810.04805), as a pure function.

Each position is chosen with probability ``mask_prob``; of the chosen, 80% become ``[MASK]``, 10% a random token,
10% stay as they are; the labels are the original ids at the chosen positions and ``-100`` (ignored) elsewhere.
The draw comes from a ``torch.Generator`` the caller seeds (the MLM task seeds it with the run's seed and the
step), so a resumed run masks exactly what the uninterrupted run would have masked.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE", "mask_tokens", "step_generator"]

IGNORE = -100  # F.cross_entropy's ignore_index


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, step, salt)``: the randomness of one training or validation batch."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + int(salt)) % (2**63 - 1))
    return g


def mask_tokens(
    tokens: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator, mask_prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of BERT's corruption of ``tokens`` [B, T] (random tokens drawn from
    ``[0, vocab_size)``). At least one position per sequence is chosen, so every sequence has a target."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"task.mask_prob={mask_prob!r} is not allowed; allowed: a number in (0, 1)")
    b, t = tokens.shape
    draw = torch.rand(b, t, generator=generator)
    chosen = draw < mask_prob
    chosen[torch.arange(b), draw.argmin(dim=1)] = True  # the smallest draw is always chosen
    kind = torch.rand(b, t, generator=generator)
    random_ids = torch.randint(0, vocab_size, (b, t), generator=generator)
    cpu = tokens.cpu()
    inputs = torch.where(chosen & (kind < 0.8), torch.full_like(cpu, mask_id), cpu)
    inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    labels = torch.where(chosen, cpu, torch.full_like(cpu, IGNORE))
    return inputs.to(tokens.device), labels.to(tokens.device)
