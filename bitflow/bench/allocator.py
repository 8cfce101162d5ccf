"""Training tokens/s with bitflow's glibc malloc tuning against glibc's default allocator settings.

The thresholds are per process and cannot be reset once set, so each measurement is a fresh subprocess; the
variants are run side by side, interleaved round by round (default, mallopt, env, default, mallopt, env, ...), so a
change in machine load hits all of them alike. Each subprocess trains the default tiny Llama shape in fp32 (the
same on every CPU; bf16 is 100x slower without native bf16) with the training benchmark's loop.

    glibc default     BITFLOW_MALLOC_TUNING=0, no GLIBC_TUNABLES
    mallopt (bitflow) what every `bitflow` process does at start-up: bitflow.console.tune_allocator()
    GLIBC_TUNABLES    the same thresholds set through the environment (the former `make train` way)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any

from bitflow.bench.common import cpu_name, print_table
from bitflow.console import MALLOC_THRESHOLD, OPT_OUT_ENV

TUNABLES = f"glibc.malloc.mmap_threshold={MALLOC_THRESHOLD}:glibc.malloc.trim_threshold={MALLOC_THRESHOLD}"
VARIANTS = {
    "glibc default": {OPT_OUT_ENV: "0"},
    "mallopt (bitflow)": {OPT_OUT_ENV: "1"},
    "GLIBC_TUNABLES": {OPT_OUT_ENV: "0", "GLIBC_TUNABLES": TUNABLES},
}


def child(steps: int) -> None:
    """One measurement: tune (or not, by the environment), then train ``steps`` steps; print tokens/s as JSON."""
    from bitflow.console import tune_allocator

    status = tune_allocator()
    import torch

    from bitflow.bench.common import time_per_call
    from bitflow.bench.train import SHAPES, VOCAB, train_step_fn
    from bitflow.models.llama import Llama, LlamaConfig

    _, fields, seq_len, batch_size = SHAPES[0]
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, **fields))
    batch = torch.randint(0, VOCAB, (batch_size, seq_len + 1))
    seconds = time_per_call(train_step_fn(model, batch, bf16=False, hf=False), warmup=2, iters=steps, repeats=1)
    print(json.dumps({"tokens_per_s": batch_size * seq_len / seconds, "allocator": status}))


def _measure(variant: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT_ENV)}
    env.update(VARIANTS[variant])
    proc = subprocess.run(
        [sys.executable, "-m", "bitflow.bench.allocator", "--child", "--steps", str(steps)],
        env=env, capture_output=True, text=True, check=True,
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"])


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Interleaved rounds of every variant; median tokens/s with the spread (min-max) and the ratio to default."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        print("\n[allocator] skipped: not Linux with glibc")
        return []
    rounds, steps = (2, 2) if quick else (7, 20)
    measured: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS)
        order = order[r % len(order):] + order[: r % len(order)]  # rotate: no variant always runs first
        for variant in order:
            measured[variant].append(_measure(variant, steps))
    base = statistics.median(measured["glibc default"])
    cpu = cpu_name()
    rows = [
        {"variant": v, "median tok/s": statistics.median(xs), "min": min(xs), "max": max(xs),
         "vs default": statistics.median(xs) / base, "runs": len(xs), "cpu": cpu}
        for v, xs in measured.items()
    ]
    print_table(f"glibc malloc tuning: training tokens/s (tiny Llama, fp32, {steps} steps x {rounds} interleaved "
                f"rounds, one process each)", rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="one measurement (internal)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps (a smoke test)")
    args = parser.parse_args()
    if args.child:
        child(args.steps)
    else:
        run(quick=args.quick)


if __name__ == "__main__":
    main()
