"""bitflow's console: `bitflow --help`, a quiet run with its summary (console and cli.log), the allocator tuning."""

from __future__ import annotations

import io
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitflow import console
from bitflow.cli import CONFIG_DIR
from tests.helpers import TINY, bitflow_env

FIRST_COMMANDS = (
    "bitflow\n",
    "bitflow +experiment=transition_50pct -m",
    "bitflow ckpt_path=",
    "bitflow-eval ckpt=",
    "bitflow-report multirun/",
)


def test_help_lists_every_config_group_and_the_first_commands(tmp_path: Path, cache_dir: Path):
    proc = subprocess.run(
        ["bitflow", "--help"], cwd=tmp_path, env=bitflow_env(cache_dir), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("bitflow: train small Llama language models")
    assert "powered by Hydra" not in text
    for command in FIRST_COMMANDS:
        assert command in text, command
    conf = Path(CONFIG_DIR)
    groups = sorted(
        str(d.relative_to(conf)) for d in conf.rglob("*") if d.is_dir() and any(d.glob("*.yaml"))
        and d.relative_to(conf).parts[0] not in ("hydra", "__pycache__")
    )
    assert {"model", "data", "quant", "transition", "trainer", "experiment"} <= set(groups)
    for group in groups:  # a one-line description, and the options as found in conf/
        assert re.search(rf"^  {re.escape(group)} +\S", text, re.M), f"no description of {group}"
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in text
    assert "`transition: {}`: no switch, the run stays" in text
    assert len(text.splitlines()) < 70  # no dump of every value


def test_a_run_prints_no_noise_and_ends_with_a_summary_also_in_cli_log(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "run"
    # the progress bar on (TINY turns it off): tokens/s on it, log lines written through tqdm
    overrides = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]
    proc = subprocess.run(
        ["bitflow", *overrides, f"hydra.run.dir={run}"], cwd=tmp_path, env=bitflow_env(cache_dir),
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in ("litlogger", "Tip:", "Deprecat", "deprecated", "FLOPs", "Total estimated model params",
                  "is not supported by the model summary", "TPU available", "limit_val_batches",
                  "Automatic Mixed Precision"):
        assert noise not in out, noise
    assert out.count("train tokens:") == 1 and out.count("val tokens:") == 1
    assert "ktok/s=" in proc.stdout  # tokens/s on the progress bar

    last, tb = run / "checkpoints" / "last.ckpt", run / "tb"
    assert last.is_file()
    summary = [
        "run finished at step 12 in ",
        "train loss ", "val ppl ",
        "tokens/s ",
        f"last checkpoint: {last}",
        f"best checkpoint: {run / 'checkpoints'}",
        f"resume: bitflow ckpt_path={last}",
        f"tensorboard --logdir {tb}",
    ]
    cli_log = (run / "cli.log").read_text()
    for line in summary:
        assert line in proc.stdout, line
        assert line in cli_log, line
    # one line per validation with the losses and tokens/s, in cli.log
    steps = re.findall(r"step (\d+): train loss (\d+\.\d+), val loss (\d+\.\d+), ([\d,]+) tokens/s", cli_log)
    assert [s[0] for s in steps] == ["6", "12"]
    final_val = re.search(r"val loss (\d+\.\d+) \| val ppl (\d+\.\d+)", cli_log)
    assert final_val and final_val.group(1) == steps[-1][2]
    assert float(final_val.group(2)) == pytest.approx(2.718281828 ** float(final_val.group(1)), rel=1e-3)


def test_log_lines_are_written_above_the_progress_bar():
    from tqdm import tqdm

    stream = io.StringIO()
    handler = console.TqdmHandler(stream)
    logger = logging.getLogger("bitflow.test_console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=10, file=stream, desc="Epoch 0", ascii=True) as bar:
            bar.update(3)
            logger.warning("a line of its own")
            bar.update(3)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    # the bar is cleared before the line ("\r" + blanks + "\r") and redrawn after it
    before, after = text.split("a line of its own\n")
    assert before.endswith("\r")
    assert "Epoch 0" in after


def test_lightning_adverts_are_dropped_and_other_lines_kept(caplog: pytest.LogCaptureFixture):
    console.setup_console()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/...)")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("GPU available: True (cuda), used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: True (cuda), used: False"]


# ------------------------------------------------------------------------------------------------ allocator
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh interpreter: tune (or not), malloc 8 MiB, print how many bytes glibc holds in mmapped chunks.
PROBE = """
import ctypes
from bitflow.console import tune_allocator
print(tune_allocator())
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
p = libc.malloc(8 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _probe(**env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", console.OPT_OUT_ENV)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True,
                          timeout=60, check=True)
    status, mmapped = proc.stdout.split("\n")[:2]
    return status, int(mmapped)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_tune_allocator_keeps_large_blocks_in_the_heap():
    status, mmapped = _probe()
    assert status == "tuned" and mmapped == 0  # 8 MiB served from the heap, below the 1 GiB threshold
    status, mmapped = _probe(**{console.OPT_OUT_ENV: "0"})
    assert status == "opted out" and mmapped >= 8 << 20  # glibc's default: above 128 KiB -> its own mmap
    # the user's own GLIBC_TUNABLES win (here: the default threshold set explicitly)
    status, mmapped = _probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert status == "user GLIBC_TUNABLES" and mmapped >= 8 << 20


def test_tune_allocator_is_skipped_off_glibc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert console.tune_allocator({}) == "not glibc"
    assert console.tune_allocator({console.OPT_OUT_ENV: "off"}) == "opted out"
