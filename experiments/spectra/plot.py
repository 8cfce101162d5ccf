"""Spectra's headline comparison at CPU scale: validation loss against size in bits for the FloatLM, TriLM and
QuantLM (GPTQ of the FloatLM at 3, 4, 6, 8 bits) families (Kaushal et al., arXiv 2407.12327).

    python experiments/spectra/plot.py RUNS OUT      # RUNS/{floatlm,trilm}/<size>, as train.sh writes them

FloatLM and QuantLM losses come from bitflow-ptq's measurement on the FloatLM's last checkpoint (16-bit and
quantized loss on the same validation windows; the points are cached with bitflow-qid's cache in
RUNS/qid_cache); TriLM's is its final ``val/loss`` (the same validation windows). Sizes: bitflow.quant.size.
Writes OUT/spectra.md, OUT/spectra.csv and OUT/loss_vs_size.png.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from bitflow.events import read_events
from bitflow.io import atomic_write_bytes, atomic_write_text
from bitflow.qid.measure import PTQSettings, find_checkpoints, measure
from bitflow.quant.size import config_size, meta_model, model_size, ptq_formats

SIZES = ("micro_s", "micro_m", "micro_l", "tiny")
QUANT_BITS = (3, 4, 6, 8)
SETTINGS = PTQSettings(calib_windows=32)  # GPTQ per channel, symmetric; the run's validation windows


def _config(run: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run / ".hydra" / "config.yaml")


def rows_for(runs: Path) -> list[dict]:
    from omegaconf import OmegaConf

    rows = []
    for size in SIZES:
        float_run, tri_run = runs / "floatlm" / size, runs / "trilm" / size
        cfg = _config(float_run)
        model_cfg, vocab = OmegaConf.to_container(cfg.model, resolve=True), cfg.data.vocab_size
        last = max(find_checkpoints([float_run]), key=lambda c: c.step)
        points, _ = measure([last], ["gptq"], list(QUANT_BITS), SETTINGS, runs / "qid_cache")
        base = {"model": size, "step": last.step, "tokens": last.tokens_seen}
        size16 = config_size(model_cfg, vocab, None)
        n = meta_model(model_cfg, vocab).num_parameters(non_embedding=True)
        rows.append({**base, "family": "FloatLM", "bits": 16, "N": n, "size_mbit": size16.bits / 1e6,
                     "size_mbit_storage": size16.storage_bits / 1e6, "val_loss": points[0]["val_loss_16bit"]})
        model = meta_model(model_cfg, vocab)
        for p in points:
            s = model_size(model, ptq_formats(model, p["P"]))
            rows.append({**base, "family": f"QuantLM {p['P']}-bit", "bits": p["P"], "N": n,
                         "size_mbit": s.bits / 1e6, "size_mbit_storage": s.storage_bits / 1e6,
                         "val_loss": p["val_loss_quantized"]})
        tri_cfg = _config(tri_run)
        tri = config_size(model_cfg, vocab, OmegaConf.to_container(tri_cfg.quant, resolve=True))
        val = read_events(tri_run / "tb").scalars["val/loss"]
        rows.append({**base, "family": "TriLM", "bits": 1.58, "N": n, "size_mbit": tri.bits / 1e6,
                     "size_mbit_storage": tri.storage_bits / 1e6, "val_loss": val[-1][1]})
        float_tb = read_events(float_run / "tb").scalars["val/loss"][-1][1]
        rows[-1 - len(points) - 1]["val_loss_tb"] = float_tb  # the FloatLM's own final val/loss, for a check
    return rows


def plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = ["FloatLM", "TriLM", *[f"QuantLM {b}-bit" for b in QUANT_BITS]]
    styles = {"FloatLM": ("k", "o", "-"), "TriLM": ("tab:red", "s", "-")}
    cmap = plt.get_cmap("Blues")
    for i, b in enumerate(QUANT_BITS):
        styles[f"QuantLM {b}-bit"] = (cmap(0.4 + 0.6 * i / (len(QUANT_BITS) - 1)), "^", "--")
    for fam in families:
        pts = sorted((r["size_mbit"], r["val_loss"], r["model"]) for r in rows if r["family"] == fam)
        if not pts:
            continue
        color, marker, ls = styles[fam]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ls=ls, label=fam)
        if fam in ("FloatLM", "TriLM"):
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="size of the weights (Mbit; ternary at log2(3) bits, 16-bit embeddings/norms)",
           ylabel="validation loss (nats/token)", title="Spectra at CPU scale: loss against size in bits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


COLUMNS = ("family", "model", "bits", "N", "step", "tokens", "size_mbit", "size_mbit_storage", "val_loss", "val_loss_tb")


def main(runs: Path, out: Path) -> None:
    rows = rows_for(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rows, key=lambda r: (r["family"], r["size_mbit"])):
        md.append("| " + " | ".join(
            f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "–")) for c in COLUMNS) + " |")
    atomic_write_bytes(out / "loss_vs_size.png", plot(rows))
    atomic_write_text(out / "spectra.csv", buf.getvalue())
    atomic_write_text(out / "spectra.md", "\n".join(md) + "\n\n![loss_vs_size](loss_vs_size.png)\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
