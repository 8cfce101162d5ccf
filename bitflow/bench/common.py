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
    print(f"\n{title}\nCPU: {cpu_name()}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
