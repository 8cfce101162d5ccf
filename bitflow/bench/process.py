"""Whole ``bitflow`` processes: start-up, the CPU defaults with and without each, peak memory ternary / 16-bit.

Every measurement is a fresh ``python -m bitflow.cli ...`` process (what the ``bitflow`` console script runs), so
allocator settings and imports are those of a real start. Variants are interleaved round by round; reported:
medians with the spread.

* start-up: wall time of ``bitflow --help``, and of ``bitflow trainer.max_steps=1`` from the process start to
  the first training step (the wall time of its first ``train/loss`` event) and to the process end, with a warm
  token cache (one untimed run first);
* CPU defaults: tokens/s of the default run (median of its logged ``train/tokens_per_sec``) as it is, with
  ``trainer.precision=32-true`` instead of ``auto``'s bf16 pick (only where ``auto`` picks bf16), without the
  in-process allocator setting (``BITFLOW_MALLOC_TUNING=0``) and, where the config has a ``threads`` key, with
  torch's own thread count instead of the per-job share;
* memory: peak resident set size (the child's own ``VmHWM``, see :func:`run_bitflow`) of the default run with
  ``quant=none`` and ``quant=ternary`` (goal: ternary / 16-bit <= 1.05).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bitflow.bench.common import default_bf16, median, print_table, spread
from bitflow.bench.framework import QUICK_OVERRIDES, compose_config

BITFLOW = [sys.executable, "-m", "bitflow.cli"]


def _vm_hwm_mib(pid: int) -> float | None:
    """The peak resident set of process ``pid`` since its ``exec`` (``VmHWM`` of ``/proc/<pid>/status``), in MiB;
    None where there is no such file (not Linux, or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_bitflow(args: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``bitflow args`` to its end; ``{"seconds", "start", "max_rss_mib"}`` (raises on failure).

    The peak RSS is the child's own ``VmHWM``, read every 20 ms while it runs (it only grows). ``wait4``'s
    ``ru_maxrss`` is not used: Linux carries the forking parent's high-water mark into the child across ``exec``, so
    after the in-process benchmarks every child reported this process's size (1,412 MiB for 16-bit and ternary
    alike)."""
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*BITFLOW, *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.02):
            hwm = _vm_hwm_mib(proc.pid)
            if hwm is not None:
                peak[0] = max(peak[0], hwm)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out = proc.stdout.read() if proc.stdout else ""  # until the child closes its output: at its exit
    hwm = _vm_hwm_mib(proc.pid)  # (a zombie has no memory map left: then the last polled value stands)
    if hwm is not None:
        peak[0] = max(peak[0], hwm)
    done.set()
    poller.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bitflow {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": seconds, "start": start, "max_rss_mib": peak[0] or usage.ru_maxrss / 1024}


def _run_dir(tmp: str, name: str) -> Path:
    return Path(tmp) / f"{name}-{time.time_ns()}"


def _tokens_per_sec(run: Path) -> float:
    from bitflow.events import read_scalars

    return statistics.median(v for _, v in read_scalars(run / "tb")["train/tokens_per_sec"])


def startup_rows(base: list[str], repeats: int, tmp: str) -> list[dict[str, Any]]:
    """``bitflow --help`` and ``bitflow trainer.max_steps=1`` (warm cache) start-up times."""
    from bitflow.events import read_events

    run_bitflow([*base, "trainer.max_steps=1", f"hydra.run.dir={_run_dir(tmp, 'warm')}"])  # warm the caches
    helps, first, total = [], [], []
    for _ in range(repeats):
        helps.append(run_bitflow(["--help"])["seconds"])
        run = _run_dir(tmp, "first")
        result = run_bitflow([*base, "trainer.max_steps=1", f"hydra.run.dir={run}"])
        first.append(read_events(run / "tb").wall_times["train/loss"][0] - result["start"])
        total.append(result["seconds"])
    return [
        {"command": "bitflow --help", "what": "to exit", "seconds": median(helps), "spread s": spread(helps)},
        {"command": "bitflow trainer.max_steps=1", "what": "to the first step", "seconds": median(first),
         "spread s": spread(first)},
        {"command": "bitflow trainer.max_steps=1", "what": "to exit (validation, checkpoint)",
         "seconds": median(total), "spread s": spread(total)},
    ]


def default_variants(base: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (overrides, environment) of the default-run variants measured here."""
    variants = {"default run (16-bit)": ([], {})}
    if default_bf16():
        variants["trainer.precision=32-true (instead of auto's bf16)"] = (["trainer.precision=32-true"], {})
    variants["BITFLOW_MALLOC_TUNING=0 (glibc's allocator defaults)"] = ([], {"BITFLOW_MALLOC_TUNING": "0"})
    if "threads" in compose_config(base):
        variants[f"threads={os.cpu_count()} (torch's default, no per-job share)"] = (
            [f"threads={os.cpu_count()}"], {}
        )
    variants["quant=ternary"] = (["quant=ternary"], {})
    return variants


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The start-up, CPU-defaults and memory tables; returns their rows."""
    repeats, steps = (1, 6) if quick else (5, 40)
    base = [*(QUICK_OVERRIDES if quick else []), "trainer.log_every_n_steps=2" if quick else "trainer.log_every_n_steps=10"]
    with tempfile.TemporaryDirectory() as tmp:
        start = startup_rows(base, repeats, tmp)
        variants = default_variants(base)
        tps: dict[str, list[float]] = {v: [] for v in variants}
        rss: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                overrides, env = variants[name]
                run = _run_dir(tmp, "default")
                result = run_bitflow([*base, *overrides, f"trainer.max_steps={steps}", f"hydra.run.dir={run}"], env)
                tps[name].append(_tokens_per_sec(run))
                rss[name].append(result["max_rss_mib"])
    print_table(f"Start-up (warm cache), median of {repeats}", start)
    default = median(tps["default run (16-bit)"])
    defaults = [
        {"variant": name, "tok/s": median(ts), "spread": spread(ts), "vs default run": median(ts) / default}
        for name, ts in tps.items()
    ]
    print_table(f"CPU defaults: tokens/s of the default run ({steps} steps) with and without each default, median "
                f"of {repeats} interleaved runs", defaults)
    base_rss = median(rss["default run (16-bit)"])
    memory = [
        {"run": name, "peak RSS MiB": median(rss[name]), "spread": spread(rss[name]),
         "vs 16-bit": median(rss[name]) / base_rss}
        for name in ("default run (16-bit)", "quant=ternary")
    ]
    print_table(f"Peak memory (RSS of the process) of the default run, {steps} steps, median of {repeats} "
                "(goal: ternary / 16-bit <= 1.05)", memory)
    return start + defaults + memory


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus, 2 repeats")
    run(quick=parser.parse_args().quick)
