"""The gap against what switching costs: the online ternary gap of the 16-bit runs (mean ± std over seeds) and, at
each run's switch step, its final validation loss minus the 16-bit run of the same seed.

    python experiments/switch_timing/plots.py multirun/switch_timing --out experiments/switch_timing

(the run table, seed table and the other plots come from `bitflow-report`, see run.sh).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitflow.report import find_runs, read_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    runs = [read_run(p) for p in find_runs([args.sweep])]
    runs = [r for r in runs if r.series("val/loss") and r.max_steps and r.series("val/loss")[-1][0] >= r.max_steps - 1]
    fp16 = {r.setting("seed"): r for r in runs if r.switch_step is None and r.series("quant/gap")}
    gaps = [dict(r.series("quant/gap")) for r in fp16.values()]
    steps = sorted(set.intersection(*(set(g) for g in gaps)))
    mean = [statistics.mean(g[s] for g in gaps) for s in steps]
    std = [statistics.stdev(g[s] for g in gaps) if len(gaps) > 1 else 0.0 for s in steps]

    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(steps, mean, color="black", label=f"quant/gap of the 16-bit runs (mean ± std, {len(gaps)} seeds)")
    ax.fill_between(steps, [m - d for m, d in zip(mean, std, strict=True)],
                    [m + d for m, d in zip(mean, std, strict=True)], color="black", alpha=0.15)
    kinds = {"fixed": ("C0", "o"), "auto (plateau)": ("C3", "*"), "auto (threshold)": ("C1", "P"),
             "progressive (first block)": ("C2", "s")}
    seen: set[str] = set()
    for r in runs:
        base = fp16.get(r.setting("seed"))
        if not r.switch_step or base is None or r.last("val/loss") is None:
            continue
        if r.setting("transition.schedule") == "progressive":
            kind = "progressive (first block)"
        elif r.setting("transition.at") == "auto":
            kind = f"auto ({r.setting('transition.auto_rule')})"
        else:
            kind = "fixed"
        color, marker = kinds[kind]
        ax.plot(r.switch_step, r.last("val/loss") - base.last("val/loss"), marker=marker, color=color,
                linestyle="none", markersize=8, label=None if kind in seen else f"final val loss - 16-bit: {kind}")
        seen.add(kind)
    ax.set(xlabel="training step (switch step for the markers)", ylabel="nats/token",
           title="The gap of switching now, and what switching there cost at the end")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "gap_vs_cost.png", dpi=120)
    print(f"wrote {args.out / 'gap_vs_cost.png'}")


if __name__ == "__main__":
    main()
