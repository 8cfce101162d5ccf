"""``bitflow-report DIR...``: one table and a few plots for a set of runs (a Hydra multirun or run dirs).

    bitflow-report multirun/transition_sweep/2026-01-01_12-00-00
    bitflow-report outputs/train/run_a /abs/path/outputs/train/run_b --out reports/ab

A run is a directory with ``tb/`` (TensorBoard event files) and, from Hydra, ``.hydra/overrides.yaml`` and
``.hydra/config.yaml``; a directory that is not a run is searched for runs below it. Per run, the report
reads:

- the settings that differ between the runs: the swept command-line overrides first (each run's value from
  its resolved config; a config group choice such as ``quant=dqt_ternary`` as given), then any other config
  value that differs (e.g. one an experiment file sets);
- what the run is quantized to and from which step (the ``quantization`` column: ``16-bit``, ``ternary from
  scratch``, ``DQT ternary from scratch``, ``16-bit -> ternary at step 50``). The switch step is the scalar
  ``quant/switch_step`` that :class:`bitflow.callbacks.PrecisionTransition` logs once; for runs without it,
  the config's ``transition.at`` (or a legacy DQT run's ``dqt.at``) resolved against ``trainer.max_steps``
  by :func:`bitflow.schedules.resolve_switch_step`; else the first step where ``quant/lambda`` is > 0. The
  method comes from the config (``quant.kind`` and its bits, or the legacy ``dqt`` node);
- ``val/loss``: final and best, and their perplexities exp(loss);
- ``transition/spike`` and ``transition/recovery_steps``; and, when the runs include a 16-bit run, the recovery
  against it (``recovery_vs_16bit``: steps after the switch until the smoothed training loss is back within
  ``--recovery-tol`` of the 16-bit run's at the same step for good, or ``never``) and the area between the two curves
  (``area_vs_16bit``), see :mod:`bitflow.report.seeds`;
- seeds: runs that differ only in ``seed`` are grouped; ``report.md`` adds a table of their means and standard
  deviations (``report_seeds.csv``), marking the groups within the seed spread of the best, and the val-loss plot
  draws a group as its mean with a band of one standard deviation;
- ``train/tokens_per_sec`` (median) and the wall time from the first to the last event;
- downstream accuracies from ``eval_results.json`` (``bitflow-eval``) or the ``eval/<task>/<metric>`` scalars.

It writes ``report.md`` (the settings that differ, the quantization and the key metrics; a metric a run lacks
is "–"), ``report.csv`` (every column; a missing metric is empty) and PNG plots: validation loss against step
with each run's switch marked; final validation loss against the switch point, with the 16-bit baseline and
one from-scratch baseline per quantization method; the loss spike at the switch by phase-in schedule and
optimizer state (one panel per switch step; a spike below zero is drawn as zero). Every file is written
atomically after all runs have been read, so a bad input leaves an earlier report untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bitflow.io import atomic_write_bytes, atomic_write_text
from bitflow.report.plots import plot_spike, plot_switch_point, plot_val_loss, spike_cells, switch_points
from bitflow.report.runs import Quantization, Run, find_runs, read_run
from bitflow.report.seeds import DEFAULT_TOL, area_between, baseline_of, recovery_vs, seed_groups, seed_table
from bitflow.report.table import differing_overrides, differing_settings, render_csv, render_markdown, run_row

__all__ = [
    "Quantization", "Run", "find_runs", "main", "make_report", "read_run", "spike_cells", "switch_points",
]

def _display_names(runs: list[Run]) -> None:
    """Name each run by its path below the directory all of them share (0, 1, ... for a multirun)."""
    if len(runs) == 1:
        runs[0].display = runs[0].path.name
        return
    common = Path(os.path.commonpath([str(r.path) for r in runs]))
    for r in runs:
        r.display = str(r.path.relative_to(common)) if r.path != common else r.path.name


def report_notes(runs: list[Run]) -> list[str]:
    """What a reader of the table must know: runs without ``val/loss`` (in the table, not in the loss plots),
    negative spikes (drawn as zero), switch steps that could not be resolved from the config."""
    notes = [n for r in runs for n in r.notes]
    missing = [r.name for r in runs if not r.series("val/loss")]
    if missing:
        notes.append(f"no val/loss logged (metrics shown as –, not in the loss plots): {', '.join(missing)}")
    negative = [
        f"{r.name} ({r.last('transition/spike'):.4f})" for r in runs if (r.last("transition/spike") or 0) < 0
    ]
    if negative:
        notes.append(
            "transition/spike < 0 (the loss fell at the switch; the table keeps the value, "
            f"spike_by_phase_in.png draws it as 0): {', '.join(negative)}"
        )
    return notes


def make_report(
    paths: list[str | Path], out: str | Path | None = None, recovery_tol: float = DEFAULT_TOL
) -> dict[str, Any]:
    """Read the runs under ``paths`` (any mix of relative and absolute paths) and write report.md, report.csv
    and the plots into ``out`` (default: the directory given, when there is one; else ./report). Everything is
    read and rendered first, then each file is written atomically. Returns ``{"rows", "markdown", "csv",
    "plots"}``. ``recovery_tol``: the tolerance (nats) of the recovery against the 16-bit run."""
    import matplotlib

    matplotlib.use("Agg")
    if not paths:
        raise ValueError("no directories given")
    out = Path(out) if out is not None else (Path(paths[0]) if len(paths) == 1 else Path("report"))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    runs = [read_run(p) for p in find_runs(list(paths))]
    _display_names(runs)
    keys = differing_settings(runs)
    rows = [run_row(r, keys) for r in runs]
    for run, row in zip(runs, rows, strict=True):  # recovery against the 16-bit run of the same sweep
        base = baseline_of(run, runs)
        if base is not None and run.switch_step:
            steps = recovery_vs(run, base, recovery_tol)
            row["recovery_vs_16bit"] = "never" if steps is None else steps
            row["area_vs_16bit"] = area_between(run, base)
    groups = seed_groups(runs, rows, differing_overrides(runs))  # same command line but the seed
    seeds_md, seed_rows = seed_table(groups)
    # legends name the swept overrides; a single run's legend is its name, not all its overrides
    swept = differing_overrides(runs) if len(runs) > 1 else []
    rendered = {
        "val_loss.png": plot_val_loss(runs, swept, groups),
        "final_loss_vs_switch.png": plot_switch_point(runs, swept),
        "spike_by_phase_in.png": plot_spike(runs),
    }
    images = {name: data for name, data in rendered.items() if data is not None}
    markdown = render_markdown(runs, rows, keys, list(images), report_notes(runs))
    table = render_csv(rows)
    if seeds_md:
        markdown += "\n" + seeds_md
    # every input is read and every output rendered: only now touch the output directory
    plots = [atomic_write_bytes(out / name, data) for name, data in images.items()]
    if seed_rows:
        atomic_write_text(out / "report_seeds.csv", render_csv(seed_rows))
    csv_path = atomic_write_text(out / "report.csv", table)
    md_path = atomic_write_text(out / "report.md", markdown)
    return {"rows": rows, "markdown": md_path, "csv": csv_path, "plots": plots}


HELP_EPILOG = """\
A run directory holds tb/ (TensorBoard events) and .hydra/ (Hydra's config.yaml and overrides.yaml); any other
directory is searched for runs below it, so a multirun's sweep directory reports all its jobs. Relative and
absolute paths can be mixed.

writes into --out:
  report.md                 the settings that differ between the runs, each run's quantization
                            (16-bit / <method> from scratch / 16-bit -> <method> at step N) and the key
                            metrics (final/best val loss and ppl, switch step, transition spike and
                            recovery, tokens/s, wall time, main downstream accuracies); "–" = not logged
  report.csv                every column, every run (a missing value is an empty cell)
  report_seeds.csv          runs that differ only in seed: mean and std per group (when a group has 2+ seeds)
  val_loss.png              validation loss per run, each switch dashed
  final_loss_vs_switch.png  final val loss against the switch point, with 16-bit and from-scratch baselines
  spike_by_phase_in.png     loss spike at the switch by phase-in schedule and optimizer state

examples:
  bitflow-report multirun/transition_50pct/2026-01-01_12-00-00
  bitflow-report outputs/train/run_a /data/outputs/train/run_b --out reports/ab
"""


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``bitflow-report DIR... [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="bitflow-report",
        description="One table (markdown + CSV) and plots comparing bitflow runs (a multirun or run dirs).",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun directory, or run directories")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default: DIR when one is given, else ./report)",
    )
    parser.add_argument(
        "--recovery-tol",
        type=float,
        default=DEFAULT_TOL,
        metavar="NATS",
        help=f"recovery against the 16-bit run: within this many nats of its smoothed loss (default {DEFAULT_TOL})",
    )
    args = parser.parse_args(argv)
    try:
        result = make_report(args.dirs, args.out, args.recovery_tol)
    except (OSError, ValueError) as err:
        print(f"bitflow-report: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"].read_text())
    print(f"wrote {result['markdown']}, {result['csv']}" + "".join(f", {p}" for p in result["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
