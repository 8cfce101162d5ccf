"""Tables and plots of the "When are 1.58 bits enough?" study: one table per family, mean +- sample std over seeds
of the final validation metrics, read back from each run's TensorBoard events (bitflow.events) and its Hydra config.

    python experiments/when_158_enough/tables.py multirun/when_158_enough --out experiments/when_158_enough
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from bitflow.events import read_scalars
from bitflow.io import atomic_write_text

QUANT = {"none": "16-bit", "absmean": "1.58-bit absmean", "absmedian": "1.58-bit absmedian"}
METRICS = {
    "mlp": ["val/acc", "val/macro_f1", "val/loss"],
    "gnn": ["val/acc", "val/macro_f1", "val/loss"],
    "encoder": ["val/loss", "val/masked_acc"],
    "encdec": ["val/loss"],
}
TITLES = {"mlp": "Wide MLP, stdlib package classification", "gnn": "SGC (K=2) / GCN, stdlib import graph",
          "encoder": "Encoder (MLM), masked tokens", "encdec": "Encoder-decoder (T5 span corruption)"}


def runs(root: Path) -> list[dict]:
    """One record per finished run under ``root``: family, arch, width, quantization, seed, final metrics."""
    out = []
    for cfg_file in sorted(root.rglob(".hydra/config.yaml")):
        run = cfg_file.parent.parent
        cfg = OmegaConf.load(cfg_file)
        family = cfg.model.get("family", "decoder")
        scalars = read_scalars(run)
        if "val/loss" not in scalars or scalars["val/loss"][-1][0] < cfg.trainer.max_steps - 1:
            continue  # not finished
        recipe = cfg.quant.get("recipe", "none")
        quant = "none" if recipe == "none" else cfg.quant.get("weight_scale")
        width = cfg.model.get("d_model") or cfg.model.get("d_hidden")
        out.append({"family": family, "arch": cfg.model.get("arch", family), "width": width, "quant": quant,
                    "seed": cfg.seed, "steps": scalars["val/loss"][-1][0],
                    **{m: scalars[m][-1][1] for m in METRICS[family] if m in scalars}})
    return out


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f} (n={len(values)})"


def table(records: list[dict], family: str) -> tuple[str, dict]:
    """The markdown table of one family and its cells {(arch, width, quant): {metric: [values]}}."""
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["family"] == family:
            for m in METRICS[family]:
                if m in r:
                    cells[(r["arch"], r["width"], r["quant"])][m].append(r[m])
    order = sorted(cells, key=lambda k: (k[0], k[1], list(QUANT).index(k[2])))
    head = "| model | width | weights | " + " | ".join(METRICS[family]) + " |"
    lines = [f"### {TITLES[family]}", "", head, "|" + "---|" * (3 + len(METRICS[family]))]
    for key in order:
        arch, width, quant = key
        lines.append(f"| {arch} | {width} | {QUANT[quant]} | " + " | ".join(fmt(cells[key][m]) for m in METRICS[family])
                     + " |")
    return "\n".join(lines) + "\n", cells


def plot(cells_by_family: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, family in zip(axes, ("mlp", "gnn", "encoder", "encdec"), strict=True):
        metric = METRICS[family][0]
        cells = cells_by_family.get(family, {})
        archs = sorted({k[0] for k in cells})
        for quant, marker in zip(QUANT, "osd", strict=True):
            for arch in archs:
                keys = sorted(k for k in cells if k[0] == arch and k[2] == quant)
                if not keys:
                    continue
                xs = [k[1] for k in keys]
                ys = [statistics.mean(cells[k][metric]) for k in keys]
                es = [statistics.stdev(cells[k][metric]) if len(cells[k][metric]) > 1 else 0 for k in keys]
                label = f"{arch} {QUANT[quant]}" if len(archs) > 1 else QUANT[quant]
                ax.errorbar(xs if len(xs) > 1 else [xs[0] * (1 + 0.04 * list(QUANT).index(quant))], ys, yerr=es,
                            marker=marker, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size")
        ax.set_ylabel(metric)
        ax.set_title(TITLES[family], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    a = p.parse_args()
    records = runs(a.root)
    parts, cells = [], {}
    for family in ("mlp", "gnn", "encoder", "encdec"):
        text, cells[family] = table(records, family)
        parts.append(text)
    atomic_write_text(a.out / "tables.md", "\n".join(parts))
    plot(cells, a.out / "when_158_enough.png")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
