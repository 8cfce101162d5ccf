"""Byte-level BPE: exact round trip, vocab checks, disk cache, loading from files and checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bitflow.data import EOS_TOKEN, TextSource, TokenDataModule, build_tokenizer, load_tokenizer
from bitflow.data.tokenizer import (
    MIN_VOCAB_SIZE,
    check_vocab_size,
    eos_id,
    tokenizer_fingerprint,
    tokenizer_from_checkpoint,
    train_tokenizer,
)


def test_round_trip_on_stdlib_text(datamodule: TokenDataModule, stdlib_small) -> None:
    tok = datamodule.tokenizer
    docs = list(stdlib_small.documents("val")) + list(stdlib_small.documents("train"))[:10]
    for doc in docs:
        assert tok.decode(tok.encode(doc).ids, skip_special_tokens=False) == doc
    # whitespace, tabs, CRLF, non-ASCII and U+FFFD survive unchanged (no normalizer, no added prefix space)
    tricky = "  leading spaces\tTab\r\nCRLF  trailing  \n\n\u00e9\u00e8 \u65e5\u672c \U0001f600 \ufffd end"
    assert tok.decode(tok.encode(tricky).ids, skip_special_tokens=False) == tricky
    assert tok.encode("x").tokens[0] == "x"  # no prefix space was added


def test_tokenizer_shape(datamodule: TokenDataModule) -> None:
    tok = datamodule.tokenizer
    assert datamodule.vocab_size == tok.get_vocab_size() == 320
    assert eos_id(tok) == datamodule.eos_id == tok.token_to_id(EOS_TOKEN)
    # the EOS string is one token; an unseen byte (0x00) still encodes, as its byte token
    assert tok.encode(EOS_TOKEN).ids == [datamodule.eos_id]
    assert len(tok.encode("\x00").ids) == 1
    # BPE learned merges from Python code: "def" and "self" take fewer tokens than bytes
    assert len(tok.encode("    def __init__(self):").ids) < len("    def __init__(self):")


def test_vocab_size_too_small() -> None:
    assert MIN_VOCAB_SIZE == 257
    assert check_vocab_size(257) == 257
    for bad in (0, 100, 256):
        with pytest.raises(ValueError, match=rf"vocab_size={bad}.*minimum is 257"):
            check_vocab_size(bad)
    with pytest.raises(ValueError, match="vocab_size=256"):
        train_tokenizer(["abc"], 256)


def test_minimum_vocab_is_bytes_plus_eos() -> None:
    tok = train_tokenizer(["hello world " * 10], 257)
    assert tok.get_vocab_size() == 257  # no room for merges
    assert len(tok.encode("hello").ids) == 5


def test_cache_reused_and_keyed(tmp_path: Path, write_files) -> None:
    root = write_files({"a.txt": "the cat sat on the mat. " * 40, "b.txt": "the dog ate the log. " * 40})
    src = TextSource(str(root / "*.txt"), val_fraction=0.0)
    tok, hit = build_tokenizer(src, 300, tmp_path / "cache")
    path = tmp_path / "cache" / f"tokenizer-{tokenizer_fingerprint(src, 300)}.json"
    assert not hit and path.is_file()
    mtime = path.stat().st_mtime_ns
    again, hit = build_tokenizer(src, 300, tmp_path / "cache")
    assert hit and again.to_str() == tok.to_str() and path.stat().st_mtime_ns == mtime
    assert tokenizer_fingerprint(src, 301) != tokenizer_fingerprint(src, 300)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]


def test_load_from_file_and_checkpoint(tmp_path: Path, datamodule: TokenDataModule) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(datamodule.tokenizer_json)
    assert load_tokenizer(path).to_str() == datamodule.tokenizer_json
    ckpt = {"state_dict": {}, "bitflow": {"tokenizer": datamodule.tokenizer_json, "quant": None}}
    restored = tokenizer_from_checkpoint(ckpt)
    assert restored.encode("import os\n").ids == datamodule.tokenizer.encode("import os\n").ids
    with pytest.raises(ValueError, match="not a bitflow checkpoint"):
        tokenizer_from_checkpoint({"state_dict": {}})


def test_missing_tokenizer_path(tmp_path: Path, stdlib_small) -> None:
    missing = tmp_path / "none" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        TokenDataModule(stdlib_small, seq_len=8, batch_size=2, tokenizer_path=str(missing))


def test_datamodule_uses_given_tokenizer(tmp_path: Path, datamodule: TokenDataModule, stdlib_small) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(datamodule.tokenizer_json)
    # vocab_size is ignored (even an invalid one) when a tokenizer file is given
    dm = TokenDataModule(stdlib_small, seq_len=8, batch_size=2, vocab_size=1, tokenizer_path=str(path))
    assert dm.tokenizer_json == datamodule.tokenizer_json and dm.vocab_size == 320


def test_imported_tokenizers_end_documents_with_their_own_eos_token():
    """An imported (model=hf) tokenizer ends documents with its own EOS token: Llama 3's <|end_of_text|>, Llama 2's
    and Mistral's </s>; bitflow's own keep <|endoftext|>, and a tokenizer with none of them is refused by name."""
    from tokenizers import Tokenizer, models

    from bitflow.data.tokenizer import EOS_TOKENS, eos_id, eos_token

    def vocab(*tokens: str) -> Tokenizer:
        return Tokenizer(models.WordLevel({t: i for i, t in enumerate(["a", "b", *tokens])}, unk_token="a"))

    assert (eos_token(vocab("</s>")), eos_id(vocab("</s>"))) == ("</s>", 2)
    assert eos_token(vocab("<|end_of_text|>", "</s>")) == "<|end_of_text|>"
    assert eos_token(vocab("</s>", EOS_TOKEN)) == EOS_TOKEN  # bitflow's own first
    with pytest.raises(ValueError, match=r"none of the end-of-document tokens \['<\|endoftext\|>'"):
        eos_id(vocab("<pad>"))
    assert EOS_TOKENS[0] == EOS_TOKEN
