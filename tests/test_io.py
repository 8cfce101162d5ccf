"""bitflow.io: atomic writes leave the old file intact on failure and give new files the usual mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bitflow.io import atomic_output, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_new_files_get_the_mode_of_open_under_the_umask(tmp_path: Path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
