"""Text generation with a KV cache: ``bitflow-generate`` and the loop lm-eval's ``generate_until`` runs.

    bitflow-generate ckpt=<run>/checkpoints/last.ckpt "prompt='def fib(n):'" max_new_tokens=64
    bitflow-generate ckpt=... "prompt='import os'" temperature=0 packed=true      # greedy, packed ternary weights

The prompt is encoded once (prefill) and every new token is one forward pass of one position over the cached keys
and values (:class:`bitflow.models.llama.KVCache`): the prefix is never recomputed while it fits the context.
Sampling: temperature (0 = greedy), then top-k, then top-p (nucleus) filtering of the distribution.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from bitflow.cli import app_config, hydra_app
from bitflow.config import ConfigError, check_int, fail

log = logging.getLogger("bitflow.generate")

GENERATE_CONFIG = "generate"  # conf/generate.yaml


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """``logits`` [B, V] with every token outside the top-k and outside the top-p nucleus set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability sums to at least ``top_p`` (Holtzman et
    al. 2019, arXiv 1904.09751); the most likely token is always kept."""
    logits = logits.clone()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = -torch.inf
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, -torch.inf))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token ids [B] from the last position's logits [B, V]: argmax for ``temperature`` 0, else a sample
    of ``softmax(filter_logits(logits / temperature))``."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    decoder: nn.Module,
    prompts: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    context: int | None = None,
    slide: bool = False,
    logits_hook: Callable[[Tensor], None] | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids [B] for ``max_new_tokens`` steps after equal-length ``prompts`` [B, T].

    The prompt is prefilled once; each later step feeds the one new token through the KV cache. ``context``
    (default: the model's ``max_seq_len``) is the most tokens the model reads: a longer prompt is a ValueError
    unless ``slide``, which keeps the last ``context`` tokens; once the text fills the context the window slides
    (the cache is rebuilt from the last ``context`` tokens at each further step, as an uncached model reading the
    last ``context`` tokens would). Stopping at EOS is the caller's (rows of a batch stop at different steps).
    ``logits_hook`` sees each step's last-position logits [B, V] (tests compare them with an uncached forward).
    """
    from bitflow.models import model_root

    decoder = model_root(decoder)
    limit = int(context or decoder.config.max_seq_len)
    device = next(decoder.parameters()).device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompts must be a non-empty [batch, tokens] array, got shape {tuple(ids.shape)}")
    if ids.shape[1] > limit:
        if not slide:
            raise ValueError(
                f"the prompt has {ids.shape[1]} tokens, more than the model's context of {limit} tokens"
            )
        ids = ids[:, -limit:]
    cache = decoder.new_cache()
    logits = decoder(ids, cache)[:, -1]
    for step in range(max_new_tokens):
        if logits_hook is not None:
            logits_hook(logits)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if ids.shape[1] > limit:  # the window slides: every position moves, so the cache is rebuilt
            ids = ids[:, -limit:]
            cache = decoder.new_cache()
            logits = decoder(ids, cache)[:, -1]
        else:
            logits = decoder(nxt[:, None], cache)[:, -1]


class TextStream:
    """Decode generated ids incrementally: :meth:`add` returns the new text (held back while a UTF-8 character is
    split across byte-level tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new


# -------------------------------------------------------------------------------------------------- the command
def generate_config(settings: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """conf/generate.yaml's defaults with ``settings`` on top; an unknown key is an error listing the allowed."""
    return app_config(GENERATE_CONFIG, settings)


def check_generate_config(cfg: DictConfig) -> DictConfig:
    """Check every setting before the model loads; raises :class:`ConfigError` naming the key."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.ckpt in (None, "") or not Path(str(cfg.ckpt)).expanduser().is_file():
        fail("ckpt", cfg.ckpt, "the path of a bitflow checkpoint file (<run>/checkpoints/last.ckpt)")
    if cfg.prompt is None:
        cfg.prompt = ""
    cfg.prompt = str(cfg.prompt)
    check_int("max_new_tokens", cfg.max_new_tokens, 1)
    t = cfg.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        fail("temperature", t, "a number >= 0 (0 = greedy)")
    check_int("top_k", cfg.top_k, 1, allow_none=True, allowed="a whole number >= 1, or null (no top-k)")
    p = cfg.top_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        fail("top_p", p, "a number in (0, 1] (1 = no nucleus filtering)")
    check_int("seed", cfg.seed, 0)
    if not isinstance(cfg.packed, bool):
        fail("packed", cfg.packed, "true or false")
    return cfg


def run_generate(settings: Mapping[str, Any] | DictConfig, out: Any = None) -> str:
    """Load the checkpoint, generate, stream the new text to ``out`` (default stdout). Returns the new text."""
    from bitflow.data.tokenizer import eos_id
    from bitflow.eval.harness import resolve_device, resolve_precision
    from bitflow.eval.scoring import autocast_context

    cfg = check_generate_config(generate_config(settings))
    out = out or sys.stdout
    from bitflow.export.source import load_source

    try:
        source = load_source(Path(cfg.ckpt).expanduser())
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"ckpt={cfg.ckpt!r}: {err}") from None
    decoder, tok = source.decoder, source.tokenizer
    eos = eos_id(tok)
    ids = tok.encode(cfg.prompt).ids or [eos]  # an empty prompt starts a new document
    context = decoder.config.max_seq_len
    if len(ids) > context:
        fail("prompt", f"<{len(ids)} tokens>", f"at most the model's context of {context} tokens")
    if cfg.packed:
        from bitflow.quant.packed import pack_model

        try:
            pack_model(decoder)
        except ValueError as err:
            raise ConfigError(f"packed=true: {err}") from None
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    decoder.to(device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    stream = TextStream(tok)
    with autocast_context(device, precision):
        # the prompt fits (checked above); past the context the window slides
        steps = generate_tokens(
            decoder, [ids], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator, slide=True
        )
        for nxt in steps:
            token = int(nxt[0])
            if token == eos:
                break
            piece = stream.add(token)
            if piece:
                out.write(piece)
                out.flush()
    out.write("\n")
    return tok.decode(stream.ids, skip_special_tokens=False)


main = hydra_app(GENERATE_CONFIG, run_generate, "The ``bitflow-generate`` console script.")

if __name__ == "__main__":
    main()
