"""Plots of a `bitflow +experiment=dqt_vs_ste -m` sweep: training loss, flip rate, grid-level shares per step.

    python experiments/dqt_vs_ste/plots.py multirun/dqt_vs_ste/<time> --out experiments/dqt_vs_ste

(validation loss, the run table and the CSV come from `bitflow-report <sweep dir> --out ...`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitflow.events import read_scalars  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    runs = {p.name: read_scalars(p / "tb") for p in sorted(args.sweep.iterdir()) if (p / "tb").is_dir()}
    args.out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in runs.items():
        steps, values = zip(*s["train/loss"])
        smooth, ema = [], values[0]
        for v in values:  # exponential moving average, as TensorBoard's smoothing
            ema = 0.8 * ema + 0.2 * v
            smooth.append(ema)
        ax.plot(steps, smooth, label=name)
    ax.set(xlabel="step", ylabel="training loss (EMA 0.8)", title="train/loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "train_loss.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in runs.items():
        if "quant/flip_rate" in s:
            steps, values = zip(*s["quant/flip_rate"])
            ax.plot(steps, values, label=name)
    ax.set(xlabel="step", ylabel="share of weight codes changed", yscale="log", title="quant/flip_rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "flip_rate.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, [n for n in runs if n.endswith(("_ternary", "_int8")) and "ste" not in n]):
        s = runs[name]
        for tag in sorted(t for t in s if t.startswith("dqt/level_share/")):
            steps, values = zip(*s[tag])
            ax.plot(steps, values, label=tag.rsplit("/", 1)[1])
        ax.set(xlabel="step", ylabel="share of weights", title=f"{name}: dqt/level_share")
        ax.legend(title="code")
    fig.tight_layout()
    fig.savefig(args.out / "level_share.png", dpi=120)
    print(f"wrote train_loss.png, flip_rate.png, level_share.png to {args.out}")


if __name__ == "__main__":
    main()
