"""Token cache: content (documents joined by EOS), dtype, reuse without re-tokenizing, cache keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bitflow.data import EOS_TOKEN, TextSource, TokenDataModule, build_token_cache, build_tokenizer
from bitflow.data.cache import cache_fingerprint, token_dtype


def test_dtype_choice() -> None:
    assert token_dtype(320) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_content_is_documents_followed_by_eos(tmp_path: Path, write_files) -> None:
    docs = {"a.txt": "first document\n", "b.txt": "", "c.txt": "third \u00e9\n"}
    root = write_files(docs)
    src = TextSource(str(root / "*.txt"), val_fraction=0.0)
    tok, _ = build_tokenizer(src, 260, tmp_path)
    cache = build_token_cache(src, tok, "train", tmp_path)
    tokens = cache.load()
    eos = tok.token_to_id(EOS_TOKEN)
    expected = tok.encode("first document\n").ids + [eos] + tok.encode("third \u00e9\n").ids + [eos]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected  # the empty b.txt is skipped
    assert cache.num_documents == 2 and cache.num_tokens == len(expected)
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == (
        "first document\n" + EOS_TOKEN + "third \u00e9\n" + EOS_TOKEN
    )
    empty = build_token_cache(src, tok, "val", tmp_path)
    assert empty.num_tokens == 0 and len(empty.load()) == 0


def test_second_call_reuses_cache(tmp_path: Path, datamodule: TokenDataModule, stdlib_small) -> None:
    tok = datamodule.tokenizer
    first = build_token_cache(stdlib_small, tok, "val", tmp_path)
    assert not first.hit and first.num_tokens > 0
    mtime = first.path.stat().st_mtime_ns
    second = build_token_cache(stdlib_small, tok, "val", tmp_path)
    assert second.hit and second.path == first.path and second.num_tokens == first.num_tokens
    assert first.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.load(), first.load())
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == first.num_tokens and meta["split"] == "val" and meta["dtype"] == "uint16"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # tmp files were renamed


def test_datamodule_second_instance_hits_cache(datamodule: TokenDataModule, stdlib_small, cache_dir) -> None:
    dm = TokenDataModule(stdlib_small, seq_len=16, batch_size=2, vocab_size=320, cache_dir=str(cache_dir))
    dm.setup()  # without prepare_data: builds what is missing, here nothing
    assert dm.caches["train"].hit and dm.caches["val"].hit
    assert dm.caches["train"].path == datamodule.caches["train"].path


def test_truncated_cache_is_rebuilt(tmp_path: Path, datamodule: TokenDataModule, stdlib_small) -> None:
    first = build_token_cache(stdlib_small, datamodule.tokenizer, "val", tmp_path)
    with open(first.path, "r+b") as f:
        f.truncate(10)
    again = build_token_cache(stdlib_small, datamodule.tokenizer, "val", tmp_path)
    assert not again.hit and again.path.stat().st_size == 2 * first.num_tokens


def test_cache_key_covers_split_and_tokenizer(datamodule: TokenDataModule, stdlib_small, write_files) -> None:
    tok = datamodule.tokenizer
    assert cache_fingerprint(stdlib_small, tok, "train") != cache_fingerprint(stdlib_small, tok, "val")
    root = write_files({"a.txt": "some other text to learn from " * 20})
    other, _ = build_tokenizer(TextSource(str(root / "a.txt"), val_fraction=0.0), 270, root / "c")
    assert cache_fingerprint(stdlib_small, other, "train") != cache_fingerprint(stdlib_small, tok, "train")
    with pytest.raises(ValueError, match="split"):
        cache_fingerprint(stdlib_small, tok, "validation")
