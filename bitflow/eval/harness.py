"""The lm-eval model adapter: any bitflow checkpoint (16-bit or ternary) as lm-eval's model ``bitflow``.

    lm_eval --model bitflow --model_args ckpt=outputs/train/<run>/checkpoints/last.ckpt --tasks piqa
    bitflow-eval ckpt=outputs/train/<run>/checkpoints/last.ckpt tasks=paper11

The checkpoint restores the architecture, the weights, the tokenizer and the quantization state
(:func:`bitflow.lm.load_checkpoint`), so a ternary model is scored exactly as it was trained. A model in
memory (the in-training :class:`~bitflow.eval.callback.LMEvalCallback`) is wrapped with ``BitflowLM(model=...,
tokenizer=...)``.

Requests are scored by :func:`bitflow.eval.scoring.score_windows`: batched, longest first; contexts are cut
from the left to the model's context length; documents longer than it are scored in rolling windows that
predict every token exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from bitflow.data.tokenizer import eos_id
from bitflow.eval.config import PRECISIONS, parse_batch_size
from bitflow.eval.scoring import (
    Window,
    autocast_context,
    continuation_windows,
    rolling_windows,
    score_windows,
)
from bitflow.models import model_root

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> the first CUDA device if there is one, else the CPU; anything else as given, except
    that a CUDA device on a machine without one falls back to the CPU with a warning (lm-eval's CLI passes
    "cuda:0" unless told otherwise)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: evaluating on the CPU", device)
        return torch.device("cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on a GPU with native bf16 (:func:`bitflow.config.native_bf16_gpu`), else "32"; "32",
    "bf16", "16" as given."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "32"  # scores on the CPU in fp32, whatever the CPU: exact and comparable across machines
    from bitflow.config import native_bf16_gpu

    return "bf16" if native_bf16_gpu()[0] else "32"


def _as_tokenizer(tokenizer: Tokenizer | str) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, str):
        return Tokenizer.from_str(tokenizer)
    raise TypeError(
        f"tokenizer must be a tokenizers.Tokenizer or its JSON string, got {type(tokenizer).__name__}"
    )


def _as_decoder(model: nn.Module) -> nn.Module:
    """The plain decoder (``forward(idx) -> logits`` with ``.config.max_seq_len``) inside a LanguageModel, or
    the module itself."""
    model = model_root(model)
    if not hasattr(model, "config"):
        raise TypeError(
            "model must be a bitflow LanguageModel or Llama (a module with .config.max_seq_len), "
            f"got {type(model)}"
        )
    return model


@register_model("bitflow")
class BitflowLM(TemplateLM):
    """lm-eval model for bitflow checkpoints and in-memory models.

    Args:
        ckpt: path to a bitflow checkpoint (``<run>/checkpoints/last.ckpt``). Give either this or ``model``.
        model: a :class:`~bitflow.lm.LanguageModel` or :class:`~bitflow.models.llama.Llama` in memory.
        tokenizer: the model's tokenizer (``tokenizers.Tokenizer`` or its JSON string); with ``model`` only.
        batch_size: sequences per forward pass; "auto" starts at 64 and halves on CUDA out-of-memory.
        max_batch_size: upper bound for "auto".
        device: "cpu", "cuda", "cuda:1", ... (default: CUDA if available; a model in memory stays put).
        precision: "auto" (bf16 autocast on a GPU, float32 on the CPU), "32", "bf16" or "16".
        max_length: context length in tokens (default and maximum: the model's ``max_seq_len``).
        max_gen_toks: default number of tokens ``generate_until`` may produce.
    """

    def __init__(
        self,
        ckpt: str | Path | None = None,
        model: nn.Module | None = None,
        tokenizer: Tokenizer | str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args for bitflow: {sorted(unknown)}; allowed: ckpt, batch_size, "
                "max_batch_size, device, precision, max_length, max_gen_toks"
            )
        if (ckpt is None) == (model is None):
            raise ValueError(
                "give exactly one of ckpt=PATH (a bitflow checkpoint) or model=<module in memory>"
            )
        self.ckpt_path = str(ckpt) if ckpt is not None else None
        if model is not None:  # evaluated where it lives (it may be the model being trained)
            here = next(model.parameters()).device
            if device is not None and resolve_device(device) != here:
                raise ValueError(
                    f"the model in memory is on {here}, not {device}; move it or leave device unset"
                )
            device = here
        self._device = resolve_device(device)
        if ckpt is not None:
            from bitflow.lm import load_checkpoint

            lm = load_checkpoint(ckpt, map_location=self._device)
            if lm.tokenizer_json is None:
                raise ValueError(f"{ckpt} holds no tokenizer (checkpoint['bitflow']['tokenizer'] is empty)")
            self.quant_state = lm.quant_state
            model, tokenizer = lm, lm.tokenizer_json
        else:
            if tokenizer is None:
                raise ValueError("a model in memory needs its tokenizer: BitflowLM(model=..., tokenizer=...)")
            self.quant_state = getattr(model, "quant_state", None)
        self.model = _as_decoder(model)
        self.tokenizer = _as_tokenizer(tokenizer)
        self._eot_id = eos_id(self.tokenizer)
        context = int(self.model.config.max_seq_len)
        if max_length is not None and not 1 <= int(max_length) <= context:
            raise ValueError(
                f"max_length must be in 1..{context} (the model's max_seq_len), got {max_length}"
            )
        self._max_length = int(max_length) if max_length is not None else context
        self.batch_size, self._auto_batch = parse_batch_size(batch_size)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.precision = resolve_precision(precision, self._device)
        if int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks}")
        self.max_gen_toks = int(max_gen_toks)
        self.progress = True  # progress bars (the in-training callback turns them off)
        self._warned_sampling = False

    # ------------------------------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        # bitflow's token streams separate documents with <|endoftext|>: it is what precedes every document
        return self._eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "bitflow-bpe"

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results["config"]."""
        return {
            "ckpt": self.ckpt_path,
            "model_config": self.model.config.to_dict() if hasattr(self.model.config, "to_dict") else None,
            "quantized": bool(self.quant_state),
            "precision": self.precision,
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (byte-level BPE: no special tokens are ever added)."""
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _score(self, windows: list[Window], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Score windows in chunks (for a progress bar); with batch_size="auto", halve on CUDA
        out-of-memory."""
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[tuple[float, bool]] = []
            chunk = max(self.batch_size * 8, 1)
            bar = tqdm(
                total=len(windows),
                desc=desc,
                disable=disable_tqdm or not self.progress or len(windows) < chunk,
            )
            i = 0
            while i < len(windows):
                part = windows[i : i + chunk]
                try:
                    out += score_windows(
                        self.model, part, self.batch_size, self._device, self.precision, self._eot_id
                    )
                except torch.cuda.OutOfMemoryError:
                    if not self._auto_batch or self.batch_size == 1:
                        raise
                    self.batch_size //= 2
                    torch.cuda.empty_cache()
                    log.warning("out of memory: batch_size lowered to %d", self.batch_size)
                    continue
                bar.update(len(part))
                i += len(part)
            bar.close()
            return out
        finally:
            self.model.train(was_training)

    def _score_groups(
        self, groups: list[list[Window]], desc: str, disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """Per group of windows: the summed log-probability and whether every window is greedy. Identical
        windows (the same context and choice asked twice) are scored once; all groups' windows are batched
        together."""
        unique = list(dict.fromkeys(w for group in groups for w in group))
        scores = dict(zip(unique, self._score(unique, desc, disable_tqdm), strict=True))
        return [(sum(scores[w][0] for w in group), all(scores[w][1] for w in group)) for group in groups]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request: the sum of the continuation tokens'
        log-probabilities, and whether greedy decoding from the context reproduces the whole continuation."""
        groups = [continuation_windows(ctx, cont, self.max_length) for _, ctx, cont in requests]
        results = self._score_groups(groups, "loglikelihood", disable_tqdm)
        for (args, _, _), res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (conditioned on <|endoftext|>) in rolling windows of
        ``max_length`` that predict every token exactly once; the windows of all documents are batched
        together."""
        groups = [
            rolling_windows(self.tok_encode(req.args[0]), self.max_length, prefix=self._eot_id)
            for req in requests
        ]
        results = [total for total, _ in self._score_groups(groups, "loglikelihood_rolling", disable_tqdm)]
        for req, total in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return results

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def _greedy(self, contexts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy decoding of contexts that all have the same length; each row stops at EOS, at a stop string,
        or after ``max_new`` tokens. The text is cut before the first stop string."""
        from bitflow.generate import generate_tokens

        generated: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        with autocast_context(self._device, self.precision):
            # KV cache (bitflow.generate, as bitflow-generate); the window slides past max_length tokens
            steps = generate_tokens(self.model, contexts, max_new, context=self.max_length, slide=True)
            for next_ids in steps:
                for k, tok in enumerate(next_ids.tolist()):
                    if done[k]:
                        continue
                    if tok == self._eot_id:
                        done[k] = True
                        continue
                    generated[k].append(tok)
                    if until and any(s in self.tok_decode(generated[k]) for s in until):
                        done[k] = True
                if all(done):
                    break
        texts = []
        for gen in generated:
            text = self.tok_decode(gen)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            texts.append(text)
        return texts

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop sequence (``until``), EOS, or ``max_gen_toks`` tokens. Requests with
        the same settings and context length run as one batch. Sampling settings are ignored (greedy only)."""
        eos_text = self.tok_decode([self._eot_id], skip_special_tokens=False)
        prepared = []
        for req in requests:
            context, raw_kwargs = req.args
            kw = normalize_gen_kwargs(dict(raw_kwargs or {}), default_max_gen_toks=self.max_gen_toks)
            if kw.get("do_sample") and not self._warned_sampling:
                log.warning("bitflow generates greedily; do_sample/temperature are ignored")
                self._warned_sampling = True
            until = [s for s in kw.get("until") or [] if s and s != eos_text]
            ids = self.tok_encode(context) or [self._eot_id]
            # the model reads the last max_length tokens at every step (the window slides with the text)
            prepared.append((ids[-self.max_length :], int(kw["max_gen_toks"]), tuple(until)))
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}
        for i, (ids, max_new, until) in enumerate(prepared):
            groups.setdefault((len(ids), max_new, until), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        was_training = self.model.training
        self.model.eval()
        try:
            for (_, max_new, until), idx in groups.items():
                for start in range(0, len(idx), self.batch_size):
                    part = idx[start : start + self.batch_size]
                    texts = self._greedy([prepared[i][0] for i in part], max_new, list(until))
                    for i, text in zip(part, texts, strict=True):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(part))
        finally:
            self.model.train(was_training)
            bar.close()
        return results  # type: ignore[return-value]
