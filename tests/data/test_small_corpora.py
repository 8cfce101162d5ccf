"""Small corpora: one or a few files (or rows) get a held-out tail of the token stream for validation, with
train and validation token ranges that never overlap; an empty corpus is "no text found in data.source.paths"."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bitflow.cli import instantiate
from bitflow.data import (
    HFSource,
    ShardSampler,
    TextSource,
    TokenDataModule,
    TokenRange,
    TrainWindows,
    ValWindows,
)
from bitflow.data.sources import DEFAULT_VAL_FRACTION, hash_fraction
from tests.data.test_datamodule import _fit
from tests.helpers import compose

SEQ, BATCH, VOCAB = 16, 4, 300
WORDS = "the a model token stream window train loss value layer weight scale of to and in is for on with".split()
HOLDOUT_LOG = "validation: holding out the last"


def prose(n_words: int, seed: int) -> str:
    """Deterministic text of ``n_words`` words, a line break every 12."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12)) + "\n"


def name_with_hash(prefix: str, want_val: bool) -> str:
    """The first file name ``<prefix><i>.txt`` that the default hash split puts in validation (or not)."""
    return next(
        name
        for name in (f"{prefix}{i}.txt" for i in itertools.count())
        if (hash_fraction(name) < DEFAULT_VAL_FRACTION) == want_val
    )


def datamodule(source, tmp_path: Path, seq_len: int = SEQ) -> TokenDataModule:
    cache = tmp_path / "cache"
    return TokenDataModule(source, seq_len=seq_len, batch_size=BATCH, vocab_size=VOCAB, cache_dir=str(cache),
                           val_windows=None)  # fmt: skip


def heldout_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(HOLDOUT_LOG)]


def check_heldout_arithmetic(dm: TokenDataModule) -> tuple[int, int]:
    """The held-out plan is the documented one, and train/val token ranges are disjoint and exact.
    Returns (tokens in the training stream, held-out tokens)."""
    cache = dm.caches["train"]
    n = cache.num_tokens
    k = max(1, math.ceil(dm.source.val_fraction * n / SEQ))
    held = k * SEQ + 1
    assert dm.heldout_tokens == held
    assert dm.plan.train == TokenRange(cache, 0, n - held)
    assert dm.plan.val == TokenRange(cache, n - held, n)
    tokens = cache.load()
    # validation: k windows tiling [n - held, n) exactly
    assert len(dm.val_dataset) == k
    got = np.concatenate([dm.val_dataset[i].numpy()[1:] for i in range(k)])
    np.testing.assert_array_equal(dm.val_dataset[0].numpy()[0], tokens[n - held])
    np.testing.assert_array_equal(got, tokens[n - held + 1 :])
    # training: every window ends before the held-out tail, and holds the tokens at its start offset
    train = dm.train_dataset
    starts = np.concatenate([train.sample_starts(b) for b in range(400)])
    assert starts.min() >= 0 and starts.max() + SEQ + 1 <= n - held
    assert starts.max() + SEQ + 1 > (n - held) * 0.9  # the whole training range is drawn from
    for b in range(5):
        expected = np.stack([tokens[s : s + SEQ + 1] for s in train.sample_starts(b)]).astype(np.int64)
        np.testing.assert_array_equal(train.batch(b).numpy(), expected)
    return n, held


def test_one_file_holds_out_the_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(prose(3000, seed=1))
    dm = datamodule(TextSource(str(path)), tmp_path)
    with caplog.at_level(logging.INFO, logger="bitflow.data"):
        dm.prepare_data()
        dm.setup("fit")
        dm.prepare_data()  # the CLI and then Lightning both call it: nothing is done or logged twice
    assert dm.caches["val"].num_tokens == 0
    n, held = check_heldout_arithmetic(dm)
    assert held < 0.1 * n and held > 0.05 * n - 1
    (line,) = heldout_records(caplog)
    assert line == (
        f"validation: holding out the last {held} of {n} training tokens ({(held - 1) // SEQ} window(s) of "
        f"data.seq_len + 1), because the validation split of data.source.paths=['{path}'] is empty; training "
        f"windows come from the first {n - held} tokens only"
    )
    assert sum("train tokens:" in r.getMessage() for r in caplog.records) == 1


def test_one_file_that_hashes_into_validation_trains_on_everything(tmp_path: Path) -> None:
    name = name_with_hash("solo", want_val=True)
    (tmp_path / name).write_text(prose(2000, seed=2))
    src = TextSource(str(tmp_path / name))
    assert src.val_keys == set()  # else the training split (and the tokenizer's corpus) would be empty
    assert list(src.documents("val")) == [] and len(list(src.documents("train"))) == 1
    dm = datamodule(src, tmp_path)
    dm.setup()
    check_heldout_arithmetic(dm)


def setup_files(tmp_path: Path, caplog: pytest.LogCaptureFixture, files: dict[str, str]):
    """Write ``files``, set up a DataModule over ``*.txt``; returns it and its held-out log lines."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    dm = datamodule(TextSource(str(tmp_path / "*.txt")), tmp_path)
    with caplog.at_level(logging.INFO, logger="bitflow.data"):
        dm.setup()
    return dm, heldout_records(caplog)


def test_two_files_without_validation_file_hold_out_the_tail(tmp_path: Path, caplog) -> None:
    a, b = name_with_hash("a", want_val=False), name_with_hash("b", want_val=False)
    dm, lines = setup_files(tmp_path, caplog, {a: prose(1500, seed=3), b: prose(1500, seed=4)})
    assert dm.caches["train"].num_documents == 2
    check_heldout_arithmetic(dm)
    assert len(lines) == 1


def test_validation_file_shorter_than_a_window_is_replaced_by_the_tail(tmp_path: Path, caplog) -> None:
    train, val = name_with_hash("t", want_val=False), name_with_hash("v", want_val=True)
    dm, lines = setup_files(tmp_path, caplog, {train: prose(3000, seed=5), val: "a b\n"})
    small = dm.caches["val"].num_tokens
    assert 0 < small < SEQ + 1
    check_heldout_arithmetic(dm)
    (line,) = lines
    assert f"has only {small} tokens, less than one window of data.seq_len + 1 = {SEQ + 1}" in line


def test_a_usable_validation_file_is_kept(tmp_path: Path, caplog) -> None:
    train, val = name_with_hash("t", want_val=False), name_with_hash("v", want_val=True)
    dm, lines = setup_files(tmp_path, caplog, {train: prose(3000, seed=6), val: prose(300, seed=7)})
    assert dm.heldout_tokens == 0 and lines == []
    assert dm.plan.train == TokenRange.whole(dm.caches["train"])
    assert dm.plan.val == TokenRange.whole(dm.caches["val"])


def test_heldout_plan_is_the_same_in_a_new_process_and_resumes_exactly(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(prose(3000, seed=8))
    first = datamodule(TextSource(str(path)), tmp_path)
    first.setup()
    expected = [first.train_dataset.batch(k) for k in range(4)]
    _, trainer = _fit(first, 2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    # a resumed run builds everything anew (cache hits): same plan, and the stream continues at batch 2
    again = datamodule(TextSource(str(path)), tmp_path)
    resumed, _ = _fit(again, 4, ckpt_path=tmp_path / "step2.ckpt")
    assert again.caches["train"].hit and again.caches["train"].path == first.caches["train"].path
    span = [(r.start, r.stop) for r in (again.plan.train, again.plan.val)]
    assert span == [(r.start, r.stop) for r in (first.plan.train, first.plan.val)]
    assert len(resumed.seen) == 2
    for got, want in zip(resumed.seen, expected[2:], strict=True):
        torch.testing.assert_close(got, want)


def test_heldout_windows_shard_across_ranks(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(prose(6000, seed=9))
    dm = datamodule(TextSource(str(path)), tmp_path)
    dm.setup()
    val = ValWindows(dm.plan.val, SEQ)
    assert len(val) >= 4
    rows = []
    for rank in range(2):
        loader = DataLoader(val, batch_size=3, sampler=ShardSampler(len(val), rank, 2), num_workers=1)
        rows += [tuple(r) for b in loader for r in b.tolist()]  # a worker process re-opens the held-out range
    assert sorted(rows) == sorted(tuple(val[i].tolist()) for i in range(len(val)))
    n_train = len(dm.plan.train)
    for rank in range(2):
        ds = TrainWindows(dm.plan.train, SEQ, BATCH, rank=rank, world_size=2)
        assert max(ds.sample_starts(ds.batch_index(s)).max() for s in range(100)) + SEQ + 1 <= n_train


def test_corpus_too_small_to_hold_out_a_window(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words here\n")
    dm = datamodule(TextSource(str(path)), tmp_path, seq_len=64)
    with pytest.raises(ValueError, match=r"^data.seq_len=64 is not allowed: data.source.paths=\[.*tiny.txt'\] has \d+ "
                       r"tokens, too few to hold out 1 validation window"):  # fmt: skip
        dm.setup()


def _data_config(tmp_path: Path, paths: str):
    cfg = compose(["data=text", f"data.source.paths={paths}", f"paths.cache_dir={tmp_path / 'cache'}"])
    return cfg.data


@pytest.mark.parametrize(
    ("files", "pattern", "error", "match"),
    [
        ({"empty.txt": ""}, "empty.txt", ValueError, r": the 1 matched file\(s\) are empty$"),
        ({"a.txt": "", "b.txt": ""}, "*.txt", ValueError, r": the 2 matched file\(s\) are empty$"),
        ({"a.txt": "text"}, "*.md", FileNotFoundError, r": '.*\*\.md' matches no files"),
        ({}, "missing.txt", FileNotFoundError, r": no such file or directory: '.*missing.txt'$"),
    ],
)
def test_empty_corpus_fails_at_construction(tmp_path, write_files, files, pattern, error, match) -> None:
    given = str(write_files(files) / pattern)
    with pytest.raises(error, match="^no text found in " + re.escape(f"data.source.paths=['{given}']") + match):
        instantiate(_data_config(tmp_path, f"[{given}]"))
    assert not (tmp_path / "cache").exists()  # failed before any tokenizer or token cache was built


def test_constructing_the_datamodule_builds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(prose(500, seed=10))
    dm = instantiate(_data_config(tmp_path, f"[{path}]"))
    assert isinstance(dm, TokenDataModule) and dm.plan is None
    assert not (tmp_path / "cache").exists()  # nothing tokenized or trained until prepare_data


def _jsonl(path: Path, bodies: list[str]) -> str:
    path.write_text("".join(json.dumps({"body": b}) + "\n" for b in bodies))
    return str(path)


def test_hf_tiny_dataset_holds_out_the_tail(tmp_path: Path, caplog) -> None:
    rows = [prose(800, seed=s) for s in range(3)]
    assert not any(hash_fraction(str(i)) < DEFAULT_VAL_FRACTION for i in range(3))  # no validation row
    kw = {"text_column": "body", "load_kwargs": {"cache_dir": str(tmp_path / "hf")}}
    src = HFSource("json", data_files=_jsonl(tmp_path / "docs.jsonl", rows), **kw)
    dm = datamodule(src, tmp_path)
    with caplog.at_level(logging.INFO, logger="bitflow.data"):
        dm.setup()
    assert dm.caches["train"].num_documents == 3
    check_heldout_arithmetic(dm)
    (line,) = heldout_records(caplog)
    assert "the validation split of data.source.path='json'" in line and "is empty" in line
    # one row that hashes into validation (hash_fraction("0") = 0.71 < 0.8): it trains, and the tail validates
    one = HFSource("json", data_files=_jsonl(tmp_path / "one.jsonl", rows[:1]), val_fraction=0.8, **kw)
    assert list(one.documents("val")) == [] and list(one.documents("train")) == rows[:1]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_empty_dataset_is_no_text_found(tmp_path: Path, streaming: bool) -> None:
    files = _jsonl(tmp_path / "empty.jsonl", ["", "", ""])
    src = HFSource("json", data_files=files, text_column="body", streaming=streaming,
                   load_kwargs={"cache_dir": str(tmp_path / "hf")})  # fmt: skip
    with pytest.raises(ValueError, match=r"^no text found in data.source.path='json', data.source.data_files="):
        datamodule(src, tmp_path).setup()
