"""bitflow-qid's plots (PNG bytes): QiD against D per bit width, against N, against P, measured against predicted.

Axes are logarithmic (the law is a power law); points with QiD <= 0 cannot be drawn there and are counted in a
note under each plot.
"""

from __future__ import annotations

from typing import Any

from bitflow.qid.law import LawFit
from bitflow.report.plots import _png

__all__ = ["plot_all"]


def _positive(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    keep = [r for r in rows if r["qid"] > 0 and r["D"] > 0]
    dropped = len(rows) - len(keep)
    return keep, (f"{dropped} point(s) with QiD <= 0 (or D = 0) not drawn on the log axes" if dropped else "")


def _panels(methods: list[str]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.2), squeeze=False)
    return fig, dict(zip(methods, axes[0], strict=True))


def _colors(values: list[Any]) -> dict[Any, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return {v: cmap(i / max(1, len(values) - 1)) for i, v in enumerate(values)}


MARKERS = "osD^v<>p*h"


def plot_vs_d(rows: list[dict[str, Any]], methods: list[str]) -> bytes:
    """QiD against training tokens D, one line per (model size N, bit width P); colour = P, marker = N."""
    rows, note = _positive(rows)
    fig, axes = _panels(methods)
    bits = sorted({r["P"] for r in rows})
    sizes = sorted({r["N"] for r in rows})
    color = _colors(bits)
    for method, ax in axes.items():
        for i, n in enumerate(sizes):
            for p in bits:
                pts = sorted((r["D"], r["qid"]) for r in rows if r["method"] == method and r["N"] == n and r["P"] == p)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=MARKERS[i % len(MARKERS)], color=color[p], lw=1,
                            label=f"{p}-bit, N={n / 1e6:.2f}M")
        ax.set(xscale="log", yscale="log", xlabel="D (training tokens)", ylabel="QiD (nats/token)", title=method)
        ax.grid(alpha=0.3, which="both")
    next(iter(axes.values())).legend(fontsize=6, ncol=2)
    return _png(fig, note)


def _last_checkpoints(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of each run's last checkpoint."""
    last = {}
    for r in rows:
        last[r["run"]] = max(last.get(r["run"], 0), r["step"])
    return [r for r in rows if r["step"] == last[r["run"]]]


def plot_vs_n(rows: list[dict[str, Any]], methods: list[str]) -> bytes:
    """QiD against non-embedding parameters N at each run's last checkpoint, one line per bit width."""
    rows, note = _positive(_last_checkpoints(rows))
    fig, axes = _panels(methods)
    color = _colors(sorted({r["P"] for r in rows}))
    for method, ax in axes.items():
        for p, c in color.items():
            pts = sorted((r["N"], r["qid"]) for r in rows if r["method"] == method and r["P"] == p)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=c, label=f"{p}-bit")
        ax.set(xscale="log", yscale="log", xlabel="N (non-embedding parameters)", ylabel="QiD (nats/token)",
               title=f"{method}, last checkpoint of each run")
        ax.grid(alpha=0.3, which="both")
    next(iter(axes.values())).legend(fontsize=7)
    return _png(fig, note)


def plot_vs_p(rows: list[dict[str, Any]], methods: list[str]) -> bytes:
    """QiD against bits P at each run's last checkpoint, one line per run."""
    rows, note = _positive(_last_checkpoints(rows))
    fig, axes = _panels(methods)
    runs = sorted({(r["N"], r["run"]) for r in rows})
    color = _colors(runs)
    for method, ax in axes.items():
        for key in runs:
            pts = sorted((r["P"], r["qid"]) for r in rows if r["method"] == method and r["run"] == key[1])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=color[key], label=f"{key[1]} (N={key[0] / 1e6:.2f}M)")
        ax.set(xscale="log", yscale="log", xlabel="P (bits)", ylabel="QiD (nats/token)",
               title=f"{method}, last checkpoint of each run")
        ax.set_xticks(sorted({r["P"] for r in rows}), [str(p) for p in sorted({r["P"] for r in rows})])
        ax.grid(alpha=0.3, which="both")
    next(iter(axes.values())).legend(fontsize=7)
    return _png(fig, note)


def plot_predicted(rows: list[dict[str, Any]], fits: dict[str, LawFit]) -> bytes | None:
    """Measured QiD against the fitted law's prediction, one panel per method with a fit; y = x dashed."""
    methods = [m for m in fits if fits[m] is not None]
    if not methods:
        return None
    rows, note = _positive(rows)
    fig, axes = _panels(methods)
    color = _colors(sorted({r["P"] for r in rows}))
    for method, ax in axes.items():
        fit = fits[method]
        pts = [r for r in rows if r["method"] == method]
        for p, c in color.items():
            sel = [r for r in pts if r["P"] == p]
            if sel:
                pred = [float(fit.predict(r["N"], r["D"], r["P"])) for r in sel]
                ax.scatter(pred, [r["qid"] for r in sel], color=c, s=14, label=f"{p}-bit")
        values = [r["qid"] for r in pts] + [float(fit.predict(r["N"], r["D"], r["P"])) for r in pts]
        if values:
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="predicted QiD", ylabel="measured QiD",
               title=f"{method}: k={fit.k:.3g}, beta={fit.beta:.3f}, alpha={fit.alpha:.3f}, gamma={fit.gamma:.2f}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3, which="both")
    next(iter(axes.values())).legend(fontsize=7)
    return _png(fig, note)


def plot_all(rows: list[dict[str, Any]], fits: dict[str, LawFit | None]) -> dict[str, bytes]:
    """Every plot by file name (a plot without anything to draw is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = {
        "qid_vs_D.png": plot_vs_d(rows, methods),
        "qid_vs_N.png": plot_vs_n(rows, methods),
        "qid_vs_P.png": plot_vs_p(rows, methods),
        "qid_measured_vs_predicted.png": plot_predicted(rows, fits),  # type: ignore[arg-type]
    }
    return {k: v for k, v in out.items() if v is not None}
