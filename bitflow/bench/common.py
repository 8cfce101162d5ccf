"""Small shared pieces of the benchmarks: timing and table printing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path


@cache
def cpu_name() -> str:
    """The CPU's model name, torch's CPU capability and whether bf16 is native, e.g.
    ``AMD EPYC 7B13 (AVX2, no native bf16, 2 cores)``: printed with every benchmark table."""
    import torch

    from bitflow.config import native_bf16_cpu

    name = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    bf16 = "native bf16" if native_bf16_cpu() else "no native bf16"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {bf16}, {os.cpu_count()} cores)"


def machine_line() -> str:
    """The header line of every table: CPU model, torch's CPU capability, native bf16, threads, the malloc setting
    (:mod:`bitflow.bench`) and the GPU."""
    import torch

    from bitflow.bench import ALLOCATOR

    line = f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; malloc: {ALLOCATOR}"
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return line


def time_per_call(fn: Callable[[], object], warmup: int = 3, iters: int = 10, repeats: int = 3) -> float:
    """Best-of-``repeats`` mean seconds per call of ``fn`` over ``iters`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Print rows of dicts as an aligned text table."""
    if not rows:
        print(f"\n{title}: no rows")
        return
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}\n{machine_line()}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def default_bf16(device: str = "cpu") -> bool:
    """Whether ``trainer.precision: auto`` picks ``bf16-mixed`` on ``device`` (bf16 only where it is native): the
    precision every benchmark runs in, so the figures are those of a default run."""
    from bitflow.config import resolve_precision

    return resolve_precision("auto", "gpu" if device == "cuda" else "cpu")[0] == "bf16-mixed"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, iters: int = 1, device: str = "cpu",
    setup: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, measured round-robin: every round times ``iters`` calls of every
    function, in an order rotated each round, so load from other processes hits all variants alike. ``repeats``
    rounds give ``repeats`` samples per variant; ``setup(name)`` runs before each variant's timing (untimed)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if setup is not None:
                setup(name)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def spread(samples: Sequence[float]) -> str:
    """``min-max`` of samples in the units they come in, for the tables' spread column."""
    return f"{min(samples):,.4g}-{max(samples):,.4g}"


def median(samples: Sequence[float]) -> float:
    """The median of ``samples``."""
    import statistics

    return statistics.median(samples)
