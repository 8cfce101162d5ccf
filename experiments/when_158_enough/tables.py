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
        arch = f"{cfg.model.get('arch', family)}, {cfg.trainer.max_steps} steps"
        out.append({"family": family, "arch": arch, "width": width, "quant": quant,
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
    order = sorted(cells, key=lambda k: (k[0], k[1] or 0, list(QUANT).index(k[2])))
    head = "| model, budget | width | weights | " + " | ".join(METRICS[family]) + " |"
    lines = [f"### {TITLES[family]}", "", head, "|" + "---|" * (3 + len(METRICS[family]))]
    for key in order:
        arch, width, quant = key
        lines.append(f"| {arch} | {width or '–'} | {QUANT[quant]} | " + " | ".join(fmt(cells[key][m]) for m in METRICS[family])
                     + " |")
    return "\n".join(lines) + "\n", cells


def plot(cells_by_family: dict[str, dict], out: Path) -> None:
    """MLP and GNN: bars per model and weights; encoder and encoder-decoder: the metric against the hidden size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, family in zip(axes, ("mlp", "gnn", "encoder", "encdec"), strict=True):
        metric = METRICS[family][0]
        cells = cells_by_family.get(family, {})
        archs = sorted({k[0] for k in cells})
        for qi, quant in enumerate(QUANT):
            keys = [k for k in sorted(cells, key=str) if k[2] == quant]
            if not keys:
                continue
            if family in ("mlp", "gnn"):
                xs = [archs.index(k[0]) + 0.27 * (qi - 1) for k in keys]
                ys, es = zip(*(stats(cells[k][metric]) for k in keys), strict=True)
                ax.bar(xs, ys, width=0.25, yerr=es, capsize=3, label=QUANT[quant])
                ax.set_xticks(range(len(archs)), archs)
            else:
                keys.sort(key=lambda k: k[1])
                ys, es = zip(*(stats(cells[k][metric]) for k in keys), strict=True)
                ax.errorbar([k[1] for k in keys], ys, yerr=es, marker="osd"[qi], capsize=3, label=QUANT[quant])
                ax.set_xscale("log", base=2)
                ax.set_xlabel("hidden size d_model")
        ax.set_ylabel(f"final {metric} (mean ± sd over seeds)")
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
