"""``bitflow-qid DIR...``: quantization-induced degradation over checkpoints, sizes and bit widths, and the fit
of its scaling law (Ouyang et al., "Low-Bit Quantization Favors Undertrained LLMs", arXiv 2411.17691).

    bitflow-qid multirun/qid/2026-01-01_12-00-00 --methods gptq,rtn --bits 2,3,4,8
    bitflow-qid runs/micro_s runs/micro_m runs/micro_l --out experiments/qid_scaling --group-size 32

For every 16-bit checkpoint under the directories (:func:`bitflow.qid.measure.find_checkpoints`; train with
``+experiment=qid_checkpoints`` to keep one every 50 steps) and every method and bit width: the 16-bit and the
quantized validation loss on the same fixed windows (``bitflow-ptq``'s :func:`~bitflow.quant.ptq.ptq_checkpoint`),
N (non-embedding parameters), D (training tokens seen), P (bits). Writes into ``--out`` (default: the one DIR
given, else ./qid): ``qid.csv`` and ``qid.md`` (the table and, per method, the fit of
QiD = k D^beta / (N^alpha P^gamma) with confidence intervals, the single-factor fits and the paper's values),
``qid_fit.json`` and the plots. Points are cached (``--cache``, default ``<out>/qid_cache/``, one file per point):
a rerun measures only what is new, and processes measuring different runs into one cache can run side by side.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from bitflow.io import atomic_write_bytes, atomic_write_text
from bitflow.qid.law import (
    FACTORS,
    PAPER,
    PAPER_SINGLE,
    LawFit,
    SingleFactorFit,
    fit_qid_law,
    fit_single_factor,
)
from bitflow.qid.measure import CACHE_NAME, COLUMNS, PTQSettings, find_checkpoints, measure, run_names

__all__ = ["fit_rows", "main", "render_markdown", "run_qid"]

DEFAULT_METHODS = ("gptq", "rtn")
DEFAULT_BITS = (2, 3, 4, 8)


def fit_rows(rows: list[dict[str, Any]], method: str) -> tuple[LawFit | None, dict[str, SingleFactorFit], list[str]]:
    """The law fit and single-factor fits of one method's rows (points with D = 0 left out), and notes (a fit
    that cannot be made is a note with its error)."""
    pts = [r for r in rows if r["method"] == method]
    notes = []
    zero_d = [r for r in pts if r["D"] <= 0]
    if zero_d:
        notes.append(f"{method}: {len(zero_d)} point(s) at D = 0 (untrained checkpoints) left out of the fit")
    pts = [r for r in pts if r["D"] > 0]
    cols = [[float(r[c]) for r in pts] for c in ("N", "D", "P", "qid")]
    fit = None
    try:
        fit = fit_qid_law(*cols)
    except ValueError as err:
        notes.append(f"{method}: no law fit: {err}")
    singles = {}
    for name in FACTORS:
        try:
            singles[name] = fit_single_factor(name, *cols)
        except ValueError as err:
            notes.append(f"{method}: no single-factor fit of {name}: {err}")
    return fit, singles, notes


def _g(value: float, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _fit_table(method: str, fit: LawFit | None, singles: dict[str, SingleFactorFit]) -> list[str]:
    lines = [f"## Fit: {method}", ""]
    if fit is not None:
        pct = round(100 * fit.confidence)
        lines += [
            f"QiD = k * D^beta / (N^alpha * P^gamma), least squares on log QiD: {fit.n_points} points, "
            f"{fit.n_dropped} dropped (QiD <= 0), R^2 = {fit.r2:.3f}.",
            "",
            f"| parameter | fitted | {pct}% interval | single-factor fit ({pct}% interval) | paper (unified) | "
            "paper (single-factor) |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("k", "beta", "alpha", "gamma"):
            lo, hi = fit.ci[name]
            single = singles.get(name)
            single_txt = (
                f"{single.exponent:.4g} [{_g(single.ci[0])}, {_g(single.ci[1])}] ({single.slices} slices)"
                if single else "–"
            )
            lines.append(
                f"| {name} | {getattr(fit, name):.4g} | [{_g(lo)}, {_g(hi)}] | {single_txt} | {PAPER[name]} | "
                f"{PAPER_SINGLE.get(name, '–')} |"
            )
    else:
        lines.append("No law fit (see the notes).")
    return lines + [""]


def render_markdown(rows: list[dict[str, Any]], fits: dict[str, tuple[Any, ...]], notes: list[str],
                    plots: list[str]) -> str:
    """``qid.md``: the fits per method, the notes, the plots, then the table of every point."""
    lines = [
        "# QiD: quantization-induced degradation",
        "",
        f"{len(rows)} point(s): QiD = val_loss_quantized - val_loss_16bit (nats/token) on the same validation "
        "windows; N = non-embedding parameters, D = training tokens seen, P = bits. Paper: Ouyang et al., "
        "arXiv 2411.17691 (Pythia, GPTQ).",
        "",
    ]
    for method, (fit, singles, _) in fits.items():
        lines += _fit_table(method, fit, singles)
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots] + ([""] if plots else [])
    lines += ["## Points", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """``qid.csv``: one line per point, columns ``COLUMNS``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_qid(dirs: list[str | Path], methods: list[str], bits: list[int], settings: PTQSettings,
            out: str | Path | None = None, fit: bool = True, cache: str | Path | None = None) -> dict[str, Any]:
    """Find the checkpoints, measure the missing points, fit, plot and write every output atomically. Returns
    ``{"rows", "fits", "notes", "measured", "files"}``."""
    from bitflow.quant.ptq.run import check_settings

    if not dirs:
        raise ValueError("no directories given")
    for m in methods:
        for b in bits:  # the same checks (and messages) as bitflow-ptq, before any work
            check_settings(m, b, settings.group_size, settings.symmetric, settings.act_order, settings.calib_windows,
                           settings.seed, settings.val_windows)
    out = Path(out) if out is not None else (Path(dirs[0]) if len(dirs) == 1 else Path("qid"))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    notes: list[str] = []
    checkpoints = find_checkpoints(dirs, notes)
    cache = Path(cache) if cache is not None else out / CACHE_NAME
    rows, measured = measure(checkpoints, methods, bits, settings, cache, run_names(checkpoints))
    fits = {m: fit_rows(rows, m) for m in methods} if fit else {}
    for _, _, fit_notes in fits.values():
        notes += fit_notes
    from bitflow.qid.plots import plot_all

    images = plot_all(rows, {m: f[0] for m, f in fits.items()}) if rows else {}
    files = [atomic_write_bytes(out / name, data) for name, data in images.items()]
    summary = {m: {"law": f[0].as_dict() if f[0] else None,
                   "single_factor": {k: {"exponent": s.exponent, "ci": list(s.ci), "slices": s.slices,
                                         "n_points": s.n_points} for k, s in f[1].items()},
                   "paper": PAPER, "paper_single_factor": PAPER_SINGLE}
               for m, f in fits.items()}
    files.append(atomic_write_text(out / "qid_fit.json", json.dumps(summary, indent=2) + "\n"))
    files.append(atomic_write_text(out / "qid.csv", render_csv(rows)))
    files.append(atomic_write_text(out / "qid.md", render_markdown(rows, fits, notes, list(images))))
    return {"rows": rows, "fits": fits, "notes": notes, "measured": measured, "files": files}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``bitflow-qid DIR... [--methods gptq,rtn] [--bits 2,3,4,8] [--out DIR] ...``."""
    parser = argparse.ArgumentParser(
        prog="bitflow-qid",
        description="QiD (quantized minus 16-bit validation loss) over checkpoints, sizes and bit widths, and the "
        "fit of QiD = k D^beta / (N^alpha P^gamma) (arXiv 2411.17691).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or multirun directories with checkpoints")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="PTQ methods: gptq,rtn (default)")
    parser.add_argument("--bits", type=_ints, default=list(DEFAULT_BITS), help="bit widths (default 2,3,4,8)")
    parser.add_argument("--group-size", type=int, default=None, help="columns per scale (default: per channel)")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric grids (a zero point per scale)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    parser.add_argument("--calib-windows", type=int, default=128, help="GPTQ calibration windows (default 128)")
    parser.add_argument("--val-windows", type=int, default=None, help="validation windows (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default: DIR, else ./qid)")
    parser.add_argument("--cache", default=None, metavar="DIR", help="point cache (default: OUT/qid_cache)")
    parser.add_argument("--no-fit", action="store_true", help="measure and tabulate only")
    args = parser.parse_args(argv)
    from bitflow.config import ConfigError

    settings = PTQSettings(group_size=args.group_size, symmetric=not args.asymmetric, act_order=args.act_order,
                           calib_windows=args.calib_windows, seed=args.seed, val_windows=args.val_windows)
    try:
        result = run_qid(args.dirs, [m for m in args.methods.split(",") if m], args.bits, settings, args.out,
                         fit=not args.no_fit, cache=args.cache)
    except (OSError, ValueError, ConfigError) as err:
        print(f"bitflow-qid: error: {err}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{len(result['rows'])} point(s), {result['measured']} measured now; wrote "
          + ", ".join(str(f) for f in result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
