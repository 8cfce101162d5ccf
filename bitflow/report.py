"""``bitflow-report DIR...``: one table and a few plots for a set of runs (a Hydra multirun or run dirs).

    bitflow-report multirun/transition_sweep/2026-01-01_12-00-00
    bitflow-report outputs/train/run_a outputs/train/run_b --out reports/ab

A run is a directory with ``tb/`` (TensorBoard event files) and, from Hydra, ``.hydra/overrides.yaml`` and
``.hydra/config.yaml``; a directory that is not a run is searched for runs below it. Per run, the report
reads:

- the settings that differ between the runs: the swept command-line overrides first (each run's value from
  its resolved config), then any other config value that differs (e.g. one an experiment file sets);
- ``val/loss``: final and best, and their perplexities exp(loss);
- the switch step of a precision transition: the config's ``transition.at`` resolved against
  ``trainer.max_steps`` (an int is a step, a float in (0, 1) a fraction, 0 = ternary from the start, null =
  never), else the first step where the scalar ``quant/lambda`` is > 0;
- ``transition/spike`` and ``transition/recovery_steps`` (logged by
  :class:`bitflow.callbacks.PrecisionTransition`);
- ``train/tokens_per_sec`` (median) and the wall time from the first to the last event;
- downstream accuracies from ``eval_results.json`` (``bitflow-eval``) or the ``eval/<task>/<metric>`` scalars.

It writes ``report.md``, ``report.csv`` and PNG plots: validation loss against step with each run's switch
marked; final validation loss against the switch point, with the 16-bit and the 1.58-bit-from-scratch
baselines; the loss spike at the switch by phase-in schedule and optimizer state (one panel per switch step).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_MARKERS = ("tb", ".hydra")
IGNORED_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "paths.", "trainer.enable_progress_bar")


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class Run:
    """Everything the report needs from one run directory."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_time: float | None = None
    downstream: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def setting(self, key: str) -> str:
        """The run's value of a setting: from its config (resolved; a sweep over one setting shows the others'
        values too), else from its command line, else "". A config group (a dict) has no single value: ""."""
        if _has(self.config, key):
            value = _get(self.config, key)
            if isinstance(value, (dict, list)):
                return ""
            return "null" if value is None else str(value)
        return self.overrides.get(key, "")

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def last(self, tag: str) -> float | None:
        s = self.series(tag)
        return s[-1][1] if s else None

    @property
    def max_steps(self) -> int | None:
        value = _get(self.config, "trainer.max_steps")
        return int(value) if isinstance(value, int) else None

    @property
    def switch_step(self) -> int | None:
        """Step of the 16-bit -> ternary switch (None: never switched)."""
        transition = _get(self.config, "transition")
        if isinstance(transition, dict) and transition.get("_target_"):
            return resolve_switch_step(transition.get("at"), self.max_steps)
        for step, value in self.series("quant/lambda"):
            if value > 0:
                return step
        return None


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _has(cfg: dict[str, Any], dotted: str) -> bool:
    parent, _, last = dotted.rpartition(".")
    node = _get(cfg, parent) if parent else cfg
    return isinstance(node, dict) and last in node


def resolve_switch_step(at: Any, max_steps: int | None) -> int | None:
    """``transition.at`` as a step, as :class:`~bitflow.callbacks.PrecisionTransition` resolves it: None =
    never, a float in (0, 1) = ``round(at * max_steps)``, 0 or an int = that step."""
    if at is None:
        return None
    if isinstance(at, float) and at != 0.0:
        return round(at * max_steps) if max_steps else None
    return int(at)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories in ``paths``: each path that is a run (has ``tb/`` or ``.hydra/``), else the runs below
    it (a multirun's numbered job folders). Sorted by job number where the names are numbers. Raises
    FileNotFoundError for a missing path and ValueError when no run is found."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"bitflow-report: no such directory: {p}")
        if any((p / m).is_dir() for m in RUN_MARKERS):
            found = [p]
        else:
            found = sorted(
                {
                    d.parent
                    for m in RUN_MARKERS
                    for d in p.rglob(m)
                    if d.is_dir() and "checkpoints" not in d.parts
                },
                key=lambda d: [int(x) if x.isdigit() else x for x in d.relative_to(p).parts],
            )
        runs += [r for r in found if r not in runs]
    if not runs:
        raise ValueError(
            f"bitflow-report: no run directories (with tb/ or .hydra/) under {[str(p) for p in paths]}"
        )
    return runs


def read_scalars(tb_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], float | None]:
    """All scalar series of the event files in ``tb_dir`` as ``{tag: [(step, value), ...]}`` sorted by step (a
    step logged twice keeps its last value), and the wall time in seconds from the first to the last event."""
    if not tb_dir.is_dir():
        return {}, None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # purge_orphaned_data=False: an evaluation appended later (bitflow-eval) may log an earlier step than the
    # run's last one
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    scalars, times = {}, []
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        by_step = {}
        for e in sorted(events, key=lambda e: e.wall_time):
            by_step[int(e.step)] = float(e.value)
        scalars[tag] = sorted(by_step.items())
        if not tag.startswith("eval/"):  # later evaluations do not count as training time
            times += [e.wall_time for e in events]
    return scalars, (max(times) - min(times)) if times else None


def _resolved(node: Any) -> Any:
    """A plain container of an OmegaConf node with every interpolation resolved where possible; one that needs
    Hydra's runtime (``${hydra:runtime.output_dir}``) stays as written."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    raw = OmegaConf.to_container(node, resolve=False)
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    out = {} if isinstance(node, DictConfig) else []
    for key in keys:
        try:
            value = _resolved(node[key])
        except Exception:  # omegaconf's resolution errors: keep the interpolation text
            value = raw[key]
        if isinstance(out, dict):
            out[str(key)] = value
        else:
            out.append(value)
    return out


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return _resolved(OmegaConf.load(path))


def read_run(path: Path) -> Run:
    """Read a run directory (see the module docstring)."""
    run = Run(path=path)
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml") or []
    for item in overrides:
        key, _, value = str(item).partition("=")
        run.overrides[key.lstrip("+~")] = value
    run.config = _read_yaml(path / ".hydra" / "config.yaml") or {}
    run.scalars, run.wall_time = read_scalars(path / "tb")
    for tag, series in run.scalars.items():
        if tag.startswith("eval/") and series:
            run.downstream[tag[len("eval/") :]] = series[-1][1]
    for results in sorted(path.glob("**/eval_results.json")):
        data = json.loads(results.read_text())
        for task, metrics in data.get("results", {}).items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    run.downstream[f"{task}/{metric}"] = float(value)
    return run


# ------------------------------------------------------------------------------------------- the table
IGNORED_CONFIG_PREFIXES = (
    "paths.",
    "hydra.",
    "logger.",
    "callbacks.model_checkpoint.",
    "task_name",
    "trainer.enable_progress_bar",
)


def _leaves(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every non-dict value in a nested config."""
    if not isinstance(cfg, dict):
        return [prefix] if prefix else []
    return [k for key, value in cfg.items() for k in _leaves(value, f"{prefix}{key}.")] if cfg else []


def differing_overrides(runs: list[Run]) -> list[str]:
    """The swept settings: override keys whose value (command line, else config) is not the same in every run,
    in command-line order (all override keys when there is one run). Config group choices
    (``transition=default``, ``+experiment=x``) are left out: the settings they bring show instead."""
    keys = sorted(
        {k for r in runs for k in r.overrides if not k.startswith(IGNORED_OVERRIDE_PREFIXES)},
        key=lambda k: min(list(r.overrides).index(k) for r in runs if k in r.overrides),
    )
    keys = [k for k in keys if any(_has(r.config, k) and r.setting(k) != "" for r in runs)]
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({r.setting(k) for r in runs}) > 1]


def differing_settings(runs: list[Run]) -> list[str]:
    """Every setting that differs between the runs: the swept overrides first, then any other config value
    that differs (e.g. one an experiment file sets), so runs of different sweeps compare fairly."""
    keys = differing_overrides(runs)
    if len(runs) == 1:
        return keys
    leaves = dict.fromkeys(k[:-1] for r in runs for k in _leaves(r.config))
    extra = [
        k
        for k in leaves
        if k not in keys
        and not k.startswith(IGNORED_CONFIG_PREFIXES)
        and len({r.setting(k) for r in runs}) > 1
    ]
    return keys + extra


def _ppl(loss: float | None) -> float | None:
    return math.exp(min(loss, 700.0)) if loss is not None else None


def main_metric(metrics: list[str]) -> list[str]:
    """Per task, the metric the markdown table shows: acc, else acc_norm, else the first one."""
    by_task: dict[str, list[str]] = {}
    for m in metrics:
        task, _, metric = m.rpartition("/")
        by_task.setdefault(task, []).append(metric)
    out = []
    for task, names in by_task.items():
        pick = next((n for n in ("acc", "acc_norm") if n in names), names[0])
        out.append(f"{task}/{pick}")
    return out


def run_row(run: Run, keys: list[str]) -> dict[str, Any]:
    """One report row: the differing overrides, then the metrics."""
    val = run.series("val/loss")
    final = val[-1][1] if val else None
    best = min(v for _, v in val) if val else None
    tps = [v for _, v in run.series("train/tokens_per_sec")]
    row: dict[str, Any] = {"run": str(run.path)}
    row.update({k: run.setting(k) for k in keys})
    row.update(
        {
            "switch_step": run.switch_step,
            "final_val_loss": final,
            "final_val_ppl": _ppl(final),
            "best_val_loss": best,
            "best_val_ppl": _ppl(best),
            "transition/spike": run.last("transition/spike"),
            "transition/recovery_steps": run.last("transition/recovery_steps"),
            "tokens_per_sec": statistics.median(tps) if tps else None,
            "wall_time_s": run.wall_time,
            "last_step": max((s for series in run.scalars.values() for s, _ in series), default=None),
        }
    )
    row.update({f"eval/{k}": v for k, v in sorted(run.downstream.items())})
    return row


def _fmt(value: Any, column: str = "") -> str:
    """A table cell: losses and accuracies with 4 decimals, perplexities 2, speeds and times 0-1, steps as
    ints."""
    if value is None or value == "":
        return "–"
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 1e6:
        return f"{value:.3e}"
    if "loss" in column or "spike" in column or column.startswith("eval/"):
        return f"{value:.4f}"
    if "ppl" in column:
        return f"{value:.2f}"
    if column == "wall_time_s":
        return f"{value:.1f}"
    return f"{value:.0f}" if value.is_integer() or abs(value) >= 100 else f"{value:.4g}"


def write_table(
    rows: list[dict[str, Any]], keys: list[str], out: Path, plots: list[Path] | None = None
) -> tuple[Path, Path]:
    """``report.csv`` (every column) and ``report.md`` (overrides, losses, transition, speed, main
    accuracies)."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    evals = main_metric([c[len("eval/") :] for c in columns if c.startswith("eval/")])
    shown = [
        "run",
        *keys,
        "switch_step",
        "final_val_loss",
        "final_val_ppl",
        "best_val_loss",
        "best_val_ppl",
        "transition/spike",
        "transition/recovery_steps",
        "tokens_per_sec",
        "wall_time_s",
        *[f"eval/{e}" for e in evals],
    ]
    shown = [c for c in shown if c in ("run", *keys) or any(row.get(c) is not None for row in rows)]
    md_path = out / "report.md"
    lines = [
        "# bitflow report",
        "",
        f"{len(rows)} run(s). Settings shown: those that differ between the runs. Losses in nats/token, "
        "ppl = exp(loss); tokens/s is the median over training; wall time from the first to the last "
        "training event. Full table: report.csv.",
        "",
        "| " + " | ".join(c.replace("|", "/") for c in shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
    ]
    # runs are named by their path below the directory all of them share (0, 1, ... for a multirun)
    common = os.path.commonpath([row["run"] for row in rows]) if len(rows) > 1 else None
    for row in rows:
        cells = []
        for c in shown:
            value = row.get(c)
            if c == "run" and common and str(value).startswith(common):
                value = str(value)[len(common) :].lstrip("/") or value
            cells.append(_fmt(value, c))
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


# ---------------------------------------------------------------------------------------------------- plots
def _label(run: Run, keys: list[str], width: int = 70) -> str:
    """Legend text: the run's values of the swept overrides (short key names), else the run's directory."""
    parts = [f"{k.split('.')[-1]}={run.setting(k)}" for k in keys if run.setting(k) != ""]
    text = ", ".join(parts) or run.name
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_val_loss(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """Validation loss against step, one line per run; a dashed vertical line (same colour) at each switch."""
    import matplotlib.pyplot as plt

    drawn = [r for r in runs if r.series("val/loss")]
    if not drawn:
        return None
    # name the precision of runs that never switch or start ternary, when the runs differ in that
    mixed = len({r.switch_step if r.switch_step in (None, 0) else "t0" for r in drawn}) > 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(drawn):
        steps, values = zip(*run.series("val/loss"), strict=True)
        color = f"C{i % 10}"
        label = _label(run, keys)
        if mixed and run.switch_step in (None, 0):
            label += " (16-bit)" if run.switch_step is None else " (1.58-bit from the start)"
        ax.plot(steps, values, marker="o", markersize=3, color=color, label=label)
        t0 = run.switch_step
        if t0 is not None and t0 > 0:
            ax.axvline(t0, color=color, linestyle="--", alpha=0.6, linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss (dashed: each run's 16-bit -> 1.58-bit switch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write as a 120-dpi PNG and close a figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_switch_point(runs: list[Run], keys: list[str], path: Path) -> Path | None:
    """Final validation loss against the switch point (% of training), one series per setting of the other
    swept overrides, with the 16-bit (never switched) and 1.58-bit-from-scratch (switch at 0) baselines as
    lines."""
    import matplotlib.pyplot as plt

    def final(run: Run) -> float | None:
        return run.last("val/loss")

    switched = [r for r in runs if r.switch_step and r.max_steps and final(r) is not None]
    fp16 = [final(r) for r in runs if r.switch_step is None and final(r) is not None]
    ternary = [final(r) for r in runs if r.switch_step == 0 and final(r) is not None]
    if not switched:
        return None
    other = [k for k in keys if k != "transition.at"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in switched:
        name = ", ".join(f"{k.split('.')[-1]}={r.setting(k)}" for k in other if r.setting(k) != "")
        name = name or "switched runs"
        series.setdefault(name, []).append((100.0 * r.switch_step / r.max_steps, final(r)))
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, pts) in enumerate(sorted(series.items())):
        xs, ys = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
    if fp16:
        ax.axhline(statistics.mean(fp16), color="black", linestyle="--", label="16-bit baseline")
    if ternary:
        ax.axhline(statistics.mean(ternary), color="gray", linestyle=":", label="1.58-bit from scratch")
    ax.set_xlabel("switch point (% of training steps)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("When to switch from 16-bit to 1.58-bit")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_spike(runs: list[Run], path: Path) -> Path | None:
    """Loss spike at the switch (``transition/spike``) by phase-in schedule (x) and optimizer state (bars):
    the mean over runs with that pair, each run as a dot; one panel per switch step, so like meets like."""
    import matplotlib.pyplot as plt

    cells: dict[tuple[int, str, str], list[float]] = {}
    for r in runs:
        spike = r.last("transition/spike")
        if spike is None:
            continue
        phase = str(_get(r.config, "transition.phase_in") or "none")
        state = str(_get(r.config, "transition.optimizer_state") or "keep")
        cells.setdefault((r.switch_step or 0, phase, state), []).append(spike)
    if not cells:
        return None
    switches = sorted({t0 for t0, _, _ in cells})
    phases = sorted({p for _, p, _ in cells})
    states = sorted({s for _, _, s in cells})
    width = 0.8 / len(states)
    fig, axes = plt.subplots(
        1,
        len(switches),
        figsize=(max(5.0, 1.6 * len(phases) + 2) * min(len(switches), 3) ** 0.7, 4.5),
        sharey=True,
        squeeze=False,
    )
    for ax, t0 in zip(axes[0], switches, strict=True):
        for j, state in enumerate(states):
            xs = [i + (j - (len(states) - 1) / 2) * width for i in range(len(phases))]
            means = [statistics.mean(cells.get((t0, p, state), [math.nan])) for p in phases]
            label = f"optimizer state: {state}" if t0 == switches[0] else None
            ax.bar(xs, means, width=width, color=f"C{j}", alpha=0.8, label=label)
            for x, p in zip(xs, phases, strict=True):
                for v in cells.get((t0, p, state), []):
                    ax.plot(x, v, "k.", markersize=4)
        ax.set_xticks(range(len(phases)), phases)
        ax.set_xlabel("phase-in schedule of the quantization strength")
        pct = {r.switch_step: r.max_steps for r in runs if r.max_steps}.get(t0)
        ax.set_title(f"switch at step {t0}" + (f" ({100 * t0 / pct:.0f}%)" if pct else ""), fontsize=10)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("loss spike at the switch (nats/token)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Loss spike at the 16-bit -> 1.58-bit switch")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- entry point
def make_report(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Read the runs under ``paths`` and write report.md, report.csv and the plots into ``out`` (default: the
    directory given, when there is one; else ./report). Returns ``{"rows", "markdown", "csv", "plots"}``."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [read_run(p) for p in find_runs(list(paths))]
    out = Path(out) if out is not None else (Path(paths[0]) if len(paths) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    keys = differing_settings(runs)
    rows = [run_row(r, keys) for r in runs]
    # legends name the swept overrides; a single run's legend is its name, not all its overrides
    swept = differing_overrides(runs) if len(runs) > 1 else []
    plots = [
        p
        for p in (
            plot_val_loss(runs, swept, out / "val_loss.png"),
            plot_switch_point(runs, swept, out / "final_loss_vs_switch.png"),
            plot_spike(runs, out / "spike_by_phase_in.png"),
        )
        if p is not None
    ]
    md, csv_path = write_table(rows, keys, out, plots)
    return {"rows": rows, "markdown": md, "csv": csv_path, "plots": plots}


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``bitflow-report DIR... [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="bitflow-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="a multirun directory, or run directories")
    parser.add_argument("--out", default=None, help="output directory (default: DIR when one is given)")
    args = parser.parse_args(argv)
    try:
        result = make_report(args.dirs, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"bitflow-report: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"].read_text())
    print(f"wrote {result['markdown']}, {result['csv']}" + "".join(f", {p}" for p in result["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
