"""`python -m bitflow.bench [--quick] [--only NAME ...]`: run the benchmarks and print their tables.

Each module in bitflow/bench/ exposes ``run(quick) -> rows``. Figures are measured in one process, so ratios
compare like with like on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch

from bitflow.bench.common import print_table

BENCHES = ("train", "allocator", "data", "bitlinear", "dqt", "ptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer iterations")
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    results: dict[str, list[dict]] = {}
    for name in args.only:
        try:
            module = importlib.import_module(f"bitflow.bench.{name}")
        except ImportError as e:
            print(f"\n[{name}] skipped: {e}")
            continue
        results[name] = module.run(quick=args.quick)
    if "train" in results and "data" in results:
        train = next(r for r in results["train"] if r["precision"] == "bf16")
        loader = max((r for r in results["data"] if r.get("case", "").startswith("train loader")),
                     key=lambda r: r["tokens_per_s"])
        print_table("Data pipeline against what training consumes (default model, bf16)", [{
            "training tok/s": train["bitflow tok/s"], "data loader tok/s": float(loader["tokens_per_s"]),
            "headroom (goal >= 50x)": loader["tokens_per_s"] / train["bitflow tok/s"],
        }])


if __name__ == "__main__":
    main()
