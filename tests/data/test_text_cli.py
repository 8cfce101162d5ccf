"""`bitflow data=text` on a single file: a real subprocess trains to the end and validates on a held-out tail."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY, bitflow_env, read_scalars

WORDS = "the a model token stream window train loss value layer weight scale of to and in is for on with".split()


@pytest.mark.slow  # a real `bitflow` process: about 20-40 s on 2 shared cores
def test_bitflow_data_text_with_one_file_trains_and_validates(tmp_path: Path, cache_dir: Path) -> None:
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)) + "\n")
    overrides = [o for o in TINY if not o.startswith("data.source.max_files=")]
    run = tmp_path / "run"
    proc = subprocess.run(
        ["bitflow", "data=text", f"data.source.paths=[{corpus}]", *overrides, f"paths.output_dir={run}"],
        cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    held = re.search(r"validation: holding out the last (\d+) of (\d+) training tokens .*is empty", out)
    assert held, out[-3000:]
    assert int(held[1]) < int(held[2])
    assert out.count("train tokens:") == 1  # the CLI and Lightning both call prepare_data: reported once
    scalars = read_scalars(run)
    assert len(scalars["train/loss"]) == 12
    assert [step for step, _ in sorted(scalars["val/loss"])] == [5, 11]  # every 6 steps, the last one included
    assert all(0 < v < 10 for _, v in scalars["val/loss"])
    assert (run / "checkpoints" / "last.ckpt").is_file()
