"""Fixtures of the data tests: a 60-file stdlib corpus and its DataModule, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitflow.data import StdlibSource, TokenDataModule

SEQ_LEN = 32
BATCH = 4
VOCAB = 320  # the same tiny corpus and vocab as the end-to-end tests, so the session cache is shared


@pytest.fixture(scope="session")
def stdlib_small() -> StdlibSource:
    return StdlibSource(max_files=60)


@pytest.fixture(scope="session")
def datamodule(stdlib_small: StdlibSource, cache_dir: Path) -> TokenDataModule:
    dm = TokenDataModule(
        stdlib_small, seq_len=SEQ_LEN, batch_size=BATCH, vocab_size=VOCAB, cache_dir=str(cache_dir), val_windows=None
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def write_files(tmp_path: Path):
    """A function that creates ``files`` (relative path -> text) under ``tmp_path`` and returns ``tmp_path``."""

    def write(files: dict[str, str]) -> Path:
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return tmp_path

    return write
