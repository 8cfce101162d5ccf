"""Shared fixtures: offline HF, one token cache per test session, tiny config overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One BITFLOW_CACHE for the whole session, so the tiny tokenizer and token arrays are built once."""
    path = Path(os.environ.get("BITFLOW_TEST_CACHE") or tmp_path_factory.mktemp("bitflow-cache"))
    os.environ["BITFLOW_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_overrides(cache_dir: Path, tmp_path: Path) -> list[str]:
    return [*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path / 'run'}"]



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers: a test that needs the token cache (a real corpus: Trainer fits, `bitflow` subprocesses) is
    ``integration``; ``make test-unit`` runs the rest (``-m "not slow and not integration"``) in under a minute."""
    for item in items:
        if "cache_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
