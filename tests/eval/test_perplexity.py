"""Perplexity with sliding windows: against per-token direct computations, on files, and on a corpus split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitflow.data.cache import build_token_cache
from bitflow.data.sources import TextSource
from bitflow.eval.perplexity import (
    expand_paths,
    perplexity_of_files,
    perplexity_of_split,
    perplexity_of_tokens,
)
from tests.eval.evalkit import CONTEXT

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint


def _token_logp(lm_module, context: list[int], target: int) -> float:
    logits = lm_module.model(torch.tensor([context]))[0, -1]
    return F.log_softmax(logits.double(), dim=-1)[target].item()


@pytest.mark.parametrize("stride", [None, 4, 1])
def test_perplexity_of_tokens_equals_per_token_direct_computation(tiny_lm, stride):
    tokens = [(7 * i + 3) % 290 for i in range(40)]  # 40 tokens, context 16
    eos = 5
    stream = [eos] + tokens
    s = CONTEXT if stride is None else stride
    total, j = 0.0, 1
    while j < len(stream):
        # token j's chunk and window start, written out: chunks of `s` after a first one up to CONTEXT
        first_end = CONTEXT + 1
        if j < first_end:
            b, a = min(len(stream), max(1 + s, first_end)), 1
        else:
            a = first_end + ((j - first_end) // s) * s
            b = min(len(stream), a + s)
        start = max(0, b - 1 - CONTEXT)
        for k in range(max(j, a), b):
            total += _token_logp(tiny_lm, stream[start:k], stream[k])
        j = b
    res = perplexity_of_tokens(tiny_lm, tokens, stride=stride, prefix=eos)
    assert res["tokens"] == 40
    assert res["loss"] == pytest.approx(-total / 40, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(-total / 40), rel=1e-6)


def test_a_smaller_stride_gives_more_context(tiny_lm):
    tokens = [(11 * i + 1) % 290 for i in range(60)]
    disjoint = perplexity_of_tokens(tiny_lm, tokens, prefix=5)
    sliding = perplexity_of_tokens(tiny_lm, tokens, stride=2, prefix=5)
    assert disjoint["tokens"] == sliding["tokens"] == 60
    assert sliding["loss"] != pytest.approx(disjoint["loss"], rel=1e-4)


def test_perplexity_of_files_weights_files_by_tokens(tiny_lm, tiny_tokenizer, tmp_path: Path):
    (tmp_path / "a.py").write_text("import os\nprint(os.getcwd())\n")
    (tmp_path / "b.py").write_text("def f(x):\n    return x * 2\n" * 5)
    res = perplexity_of_files(tiny_lm, tiny_tokenizer, [str(tmp_path / "*.py")])
    eos = tiny_tokenizer.token_to_id("<|endoftext|>")
    for name in ("a.py", "b.py"):
        text = (tmp_path / name).read_text()
        direct = perplexity_of_tokens(tiny_lm, tiny_tokenizer.encode(text).ids, prefix=eos)
        row = res["files"][str(tmp_path / name)]
        assert row["loss"] == pytest.approx(direct["loss"], rel=1e-9)
        assert row["bits_per_byte"] == pytest.approx(
            direct["loss"] * direct["tokens"] / math.log(2) / len(text)
        )
    rows = res["files"].values()
    total = sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert res["total"]["loss"] == pytest.approx(total)


def test_perplexity_of_a_split_scores_its_token_stream(tiny_lm, tiny_tokenizer, tmp_path: Path):
    (tmp_path / "train.txt").write_text("x = 1\n" * 50)
    (tmp_path / "val.txt").write_text("def g(y):\n    return y + 1\n" * 4)
    source = TextSource(str(tmp_path / "train.txt"), val_paths=str(tmp_path / "val.txt"))
    res = perplexity_of_split(tiny_lm, tiny_tokenizer, source, "val", cache_dir=tmp_path / "cache")
    stream = build_token_cache(source, tiny_tokenizer, "val", tmp_path / "cache").load()
    eos = tiny_tokenizer.token_to_id("<|endoftext|>")
    assert list(stream[-1:]) == [eos]  # every document ends with <|endoftext|>
    direct = perplexity_of_tokens(tiny_lm, [int(t) for t in stream], prefix=eos)
    assert res == pytest.approx(direct)


def test_missing_files_are_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_paths([str(tmp_path / "*.txt")])
