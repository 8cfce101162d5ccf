"""Corpus sources: stdlib scan and split, text files/globs, Hugging Face datasets, the factory, errors."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest

from bitflow.data.sources import HFSource, StdlibSource, TextSource, build_source, hash_fraction, is_val


def test_hash_fraction_is_sha1_prefix() -> None:
    # sha1("abc") = a9993e36 4706816a ...; the first 8 bytes over 2**64
    assert hashlib.sha1(b"abc").hexdigest().startswith("a9993e364706816a")
    assert hash_fraction("abc") == 0xA9993E364706816A / 2.0**64
    assert is_val("abc", 0.67) and not is_val("abc", 0.66)  # 0xa999... / 2**64 = 0.6625


def test_stdlib_full_scan_split_by_relpath() -> None:
    src = StdlibSource(val_fraction=0.05)
    keys = [k for k, _ in src.files]
    root = Path(sysconfig.get_paths()["stdlib"])
    assert keys == sorted(keys) and len(keys) > 500
    assert all(k.endswith(".py") and "site-packages" not in k and "dist-packages" not in k for k in keys)
    assert "os.py" in keys and "json/__init__.py" in keys
    assert all(p == root / k for k, p in src.files)
    # validation membership is exactly the hash rule on the relative path
    assert src.val_keys == {k for k in keys if hash_fraction(k) < 0.05}
    assert 0.02 < len(src.val_keys) / len(keys) < 0.08
    val_names = [k for k, _ in src.split_files("val")]
    train_names = [k for k, _ in src.split_files("train")]
    assert set(val_names).isdisjoint(train_names) and len(val_names) + len(train_names) == len(keys)


def test_stdlib_max_files_subset_is_deterministic_and_has_val(stdlib_small: StdlibSource) -> None:
    again = StdlibSource(max_files=60)
    assert [k for k, _ in again.files] == [k for k, _ in stdlib_small.files]
    assert len(stdlib_small.files) == 60
    assert 1 <= len(stdlib_small.val_keys) <= 5  # round(60 * 0.05) = 3 asked for
    assert all(hash_fraction(k) < 0.05 for k in stdlib_small.val_keys)
    docs = list(stdlib_small.documents("val"))
    assert len(docs) == len(stdlib_small.val_keys)
    assert docs[0] == stdlib_small.split_files("val")[0][1].read_text(errors="replace")


def test_stdlib_fingerprint_covers_options_and_python(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = StdlibSource(max_files=20), StdlibSource(max_files=20)
    assert a.fingerprint() == b.fingerprint()
    assert StdlibSource(max_files=21).fingerprint() != a.fingerprint()
    assert StdlibSource(max_files=20, val_fraction=0.1).fingerprint() != a.fingerprint()
    before = a.fingerprint()
    monkeypatch.setattr(sys, "version", "3.99.0 (another interpreter)")
    assert StdlibSource(max_files=20).fingerprint() != before


def test_stdlib_skips_site_packages(write_files) -> None:
    root = write_files({"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "site-packages/c.py": "z\n", "d.txt": "no"})
    src = StdlibSource(root=str(root), val_fraction=0.0)
    assert [k for k, _ in src.files] == ["a.py", "pkg/b.py"]
    assert list(src.documents("train")) == ["x = 1\n", "y = 2\n"]
    assert list(src.documents("val")) == []


def test_bad_split_and_fraction() -> None:
    src = StdlibSource(max_files=5)
    with pytest.raises(ValueError, match="'test'"):
        next(src.documents("test"))
    with pytest.raises(ValueError, match=r"data.source.val_fraction=1.5 is not allowed: give a fraction in \[0, 1\)"):
        StdlibSource(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"data.source.max_files=0 is not allowed: give an integer >= 1 or null"):
        StdlibSource(max_files=0)


def test_text_source_globs_dirs_and_split(write_files) -> None:
    names = {f"corpus/part{i:02d}.txt": f"text number {i}\n" for i in range(40)}
    root = write_files({**names, "corpus/sub/deep.txt": "deep\n", "other/x.md": "markdown\n"})
    src = TextSource([str(root / "corpus/*.txt"), str(root / "other")], val_fraction=0.2)
    keys = [k for k, _ in src.files]
    # keys are relative to each pattern's fixed base directory; `*` does not descend into sub/
    assert keys == sorted([f"part{i:02d}.txt" for i in range(40)] + ["x.md"])
    assert src.val_keys == {k for k in keys if hash_fraction(k) < 0.2} and src.val_keys
    train, val = list(src.documents("train")), list(src.documents("val"))
    assert len(train) + len(val) == 41 and set(train).isdisjoint(val)
    recursive = TextSource(str(root / "corpus/**/*.txt"), val_fraction=0.0)
    assert "sub/deep.txt" in [k for k, _ in recursive.files]


def test_text_source_val_paths_and_fingerprint(write_files) -> None:
    root = write_files({"train.txt": "alpha beta\n", "val.txt": "gamma\n"})
    src = TextSource(str(root / "train.txt"), val_paths=[str(root / "val.txt")])
    assert list(src.documents("train")) == ["alpha beta\n"]
    assert list(src.documents("val")) == ["gamma\n"]
    before = src.fingerprint()
    assert TextSource(str(root / "train.txt"), val_paths=[str(root / "val.txt")]).fingerprint() == before
    (root / "train.txt").write_text("alpha beta gamma delta\n")
    assert TextSource(str(root / "train.txt"), val_paths=[str(root / "val.txt")]).fingerprint() != before


def test_text_source_invalid_utf8_is_replaced(write_files) -> None:
    root = write_files({})
    (root / "bad.txt").write_bytes(b"ok \xff end")
    assert list(TextSource(str(root / "bad.txt"), val_fraction=0.0).documents("train")) == ["ok \ufffd end"]


def test_text_source_missing_path_and_empty_glob(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"^no text found in data.source.paths=\[.*nope.txt'\]: no such file"):
        TextSource(missing)
    with pytest.raises(FileNotFoundError, match=r"^no text found in data.source.paths=.*\*\.json'.* matches no files"):
        TextSource(str(tmp_path / "*.json"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_source("text", paths=[missing])
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(FileNotFoundError, match=r"^no text found in data.source.val_paths=.*\*\.md"):
        TextSource(str(tmp_path / "*.txt"), val_paths=str(tmp_path / "*.md"))
    with pytest.raises(ValueError, match=r"^no text found in data.source.paths=\[\]"):
        TextSource([])


def test_build_source_kinds(write_files) -> None:
    assert isinstance(build_source("stdlib", max_files=3), StdlibSource)
    root = write_files({"a.txt": "a"})
    assert isinstance(build_source("text", paths=str(root / "a.txt")), TextSource)
    with pytest.raises(ValueError, match=r"'parquet' is not allowed.*\['hf', 'stdlib', 'text'\]"):
        build_source("parquet")


@pytest.fixture
def hf_files(tmp_path: Path) -> dict[str, str]:
    docs = [f"document {i}: " + "word " * (i % 7) for i in range(60)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"body": f"held out {i}", "id": i}) + "\n" for i in range(5)))
    txt = tmp_path / "lines.txt"
    txt.write_text("".join(f"line {i}\n" for i in range(20)))
    return {"jsonl": str(jsonl), "val": str(val), "txt": str(txt), "hf_cache": str(tmp_path / "hf"), "docs": docs}


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_json_hash_split(hf_files: dict, streaming: bool) -> None:
    src = HFSource(
        "json",
        data_files=hf_files["jsonl"],
        text_column="body",
        streaming=streaming,
        val_fraction=0.25,
        load_kwargs={"cache_dir": hf_files["hf_cache"]},
    )
    docs = hf_files["docs"]
    want_val = [d for i, d in enumerate(docs) if hash_fraction(str(i)) < 0.25]
    want_train = [d for i, d in enumerate(docs) if hash_fraction(str(i)) >= 0.25]
    assert list(src.documents("val")) == want_val and want_val
    assert list(src.documents("train")) == want_train


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_text_val_split_and_max_documents(hf_files: dict, streaming: bool) -> None:
    kw = {"load_kwargs": {"cache_dir": hf_files["hf_cache"]}, "streaming": streaming}
    lines = HFSource("text", data_files=hf_files["txt"], max_documents=8, val_fraction=0.0, **kw)
    assert list(lines.documents("train")) == [f"line {i}" for i in range(8)]  # the text builder drops "\n"
    files = {"train": hf_files["jsonl"], "validation": hf_files["val"]}
    src = HFSource("json", data_files=files, val_split="validation", text_column="body", **kw)
    assert list(src.documents("val")) == [f"held out {i}" for i in range(5)]
    assert list(src.documents("train")) == hf_files["docs"]


def test_hf_fingerprint_ignores_streaming_tracks_files(hf_files: dict) -> None:
    kw = {"data_files": hf_files["jsonl"], "text_column": "body", "load_kwargs": {"cache_dir": hf_files["hf_cache"]}}
    before = HFSource("json", streaming=False, **kw).fingerprint()
    assert HFSource("json", streaming=True, **kw).fingerprint() == before
    assert HFSource("json", streaming=True, max_documents=3, **kw).fingerprint() != before
    with open(hf_files["jsonl"], "a") as f:
        f.write(json.dumps({"body": "one more", "id": 99}) + "\n")
    os.utime(hf_files["jsonl"], ns=(1, 1))
    assert HFSource("json", streaming=True, **kw).fingerprint() != before


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_missing_text_column_lists_columns(hf_files: dict, streaming: bool) -> None:
    # construction is cheap (no load); the first read checks the column, before any tokenizer is trained
    src = build_source(
        "hf",
        path="json",
        data_files=hf_files["jsonl"],
        streaming=streaming,
        load_kwargs={"cache_dir": hf_files["hf_cache"]},
    )
    with pytest.raises(ValueError, match=r"data.source.text_column='text' is not allowed.*\['body', 'id'\]"):
        next(src.documents("train"))


def test_hf_constructor_checks_arguments_without_loading(tmp_path: Path) -> None:
    # a dataset that does not exist: construction must not touch it (it only checks the arguments)
    src = HFSource("json", data_files=str(tmp_path / "absent.jsonl"), text_column="body")
    assert "data.source.path='json'" in src.origin()
    with pytest.raises(ValueError, match=r"data.source.text_column='' is not allowed: give a non-empty string"):
        HFSource("json", text_column="")
    with pytest.raises(ValueError, match=r"data.source.max_documents=0 is not allowed"):
        HFSource("json", max_documents=0)
    with pytest.raises(ValueError, match=r"data.source.val_fraction=-0.1 is not allowed"):
        HFSource("json", val_fraction=-0.1)


def test_text_source_overlaps(write_files) -> None:
    root = write_files({"a.txt": "a", "b.txt": "b"})
    src = TextSource([str(root / "a.txt"), str(root / "*.txt")], val_fraction=0.0)
    assert list(src.documents("train")) == ["a", "b"]  # a.txt matched twice, read once
    with pytest.raises(ValueError, match="data.source.paths and data.source.val_paths share files.*a.txt"):
        TextSource(str(root / "*.txt"), val_paths=str(root / "a.txt"))
