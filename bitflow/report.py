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
- ``transition/spike`` and ``transition/recovery_steps``;
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
import csv
import functools
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitflow.events import read_events
from bitflow.io import atomic_write_bytes, atomic_write_text
from bitflow.schedules import resolve_switch_step

RUN_MARKERS = ("tb", ".hydra")
IGNORED_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "paths.", "trainer.enable_progress_bar")
_ABSENT = object()


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Quantization:
    """What a run is quantized to and from when: ``step`` None = never (16-bit), 0 = from scratch; ``method``
    e.g. ``ternary``, ``int4``, ``DQT ternary`` (None for a 16-bit run); ``source``: where the step came
    from."""

    step: int | None
    method: str | None
    source: str

    @property
    def label(self) -> str:
        """``16-bit``, ``<method> from scratch`` or ``16-bit -> <method> at step <t0>``."""
        if self.step is None:
            return "16-bit"
        method = self.method or "quantized"
        return f"{method} from scratch" if self.step == 0 else f"16-bit -> {method} at step {self.step}"


@dataclass
class Run:
    """Everything the report needs from one run directory."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's group -> option (.hydra/hydra.yaml)
    config: Any = None  # the run's .hydra/config.yaml as an OmegaConf DictConfig (None: no config)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_time: float | None = None
    downstream: dict[str, float] = field(default_factory=dict)
    display: str = ""  # the name the table and legends use (set by make_report)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.display or self.path.name

    def get(self, key: str, default: Any = None) -> Any:
        """The config value at the dotted ``key`` (OmegaConf.select; an unresolvable interpolation: None)."""
        if self.config is None:
            return default
        from omegaconf import OmegaConf

        return OmegaConf.select(self.config, key, default=default, throw_on_resolution_failure=False)

    def setting(self, key: str) -> str:
        """The run's value of a setting: from its config (resolved; a sweep over one setting shows the others'
        values too), else from its command line, else "". A config group (a node) shows its option: from the
        command line (``quant=dqt_ternary``: ``dqt_ternary``), else Hydra's record of the choice (an experiment's
        ``override /quant: ternary``), else ""."""
        from omegaconf import DictConfig, ListConfig

        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            return self.overrides.get(key, "")
        if isinstance(value, (DictConfig, ListConfig)):
            if isinstance(value, ListConfig):
                return ""
            return self.overrides.get(key) or self.choices.get(key, "")
        return "null" if value is None else str(value)

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def last(self, tag: str) -> float | None:
        s = self.series(tag)
        return s[-1][1] if s else None

    @property
    def max_steps(self) -> int | None:
        value = self.get("trainer.max_steps")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @functools.cached_property
    def quantization(self) -> Quantization:
        """The run's :class:`Quantization` (see the module docstring for where the step comes from); a config
        whose switch step cannot be resolved adds a note."""
        method = self.method
        logged = self.series("quant/switch_step")
        if logged:
            return Quantization(int(logged[-1][1]), method, "quant/switch_step")
        for node in ("dqt", "transition"):  # a legacy DQT run's own callback, then the precision transition
            if self.get(f"{node}._target_"):
                at = self.get(f"{node}.at", 0 if node == "dqt" else _ABSENT)
                if at is _ABSENT:
                    continue
                try:
                    step = resolve_switch_step(at, self.max_steps, key=f"{node}.at")
                except ValueError as err:
                    self.notes.append(f"{self.name}: {err}; switch step taken from quant/lambda")
                    break
                return Quantization(step, method if step is not None else None, f"{node}.at")
        for step, value in self.series("quant/lambda"):
            if value > 0:
                return Quantization(step, method, "quant/lambda")
        return Quantization(None, None, "none")

    @property
    def switch_step(self) -> int | None:
        """Step of the 16-bit -> quantized switch (0: quantized from scratch; None: never quantized)."""
        return self.quantization.step

    @property
    def method(self) -> str | None:
        """The quantization method from the config: ``DQT ternary`` / ``DQT int8`` for a legacy ``dqt`` node,
        else from ``quant.kind`` (the transition's ``quant`` node first): ``bitlinear`` -> ``ternary`` or
        ``int<bits>``, ``dqt`` -> ``DQT ternary`` / ``DQT int<bits>``, another kind as named; ``none`` ->
        None."""
        if self.get("dqt._target_"):
            bits = self.get("dqt.bits")
            return "DQT ternary" if bits is None else f"DQT int{bits}"
        from omegaconf import DictConfig

        node = self.get("transition.quant")
        if not isinstance(node, DictConfig):
            node = self.get("quant")
        if not isinstance(node, DictConfig):
            return None
        kind = node.get("recipe", node.get("kind"))  # quant.recipe (quant.kind before the recipes)
        if kind in (None, "none"):
            return None
        bits = next((node.get(k) for k in ("weight_bits", "bits") if node.get(k) is not None), None)
        base = "ternary" if bits is None else f"int{bits}"
        if kind == "bitlinear":
            return base
        if kind == "dqt":
            return f"DQT {base}"
        return str(kind)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories in ``paths`` (relative and absolute paths mixed freely): each path that is a run (has
    ``tb/`` or ``.hydra/``), else the runs below it (a multirun's numbered job folders), sorted by job number
    where the names are numbers; a run given twice counts once. Raises FileNotFoundError for a missing path
    and ValueError for a path with no run below it, naming the path."""
    runs: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        shown = f"{p}" if p.is_absolute() else f"{p} (= {p.resolve()})"
        if not p.exists():
            raise FileNotFoundError(f"no such directory: {shown}")
        if not p.is_dir():
            raise NotADirectoryError(f"not a directory: {shown}; give a run or multirun directory")
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
        if not found:
            raise ValueError(f"no run directories (with tb/ or .hydra/) under {shown}")
        for run in found:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                runs.append(run.resolve())
    return runs


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's and omegaconf's parse errors
        raise ValueError(f"cannot read {path}: {err}") from err


def read_run(path: Path) -> Run:
    """Read a run directory (see the module docstring)."""
    run = Run(path=Path(path))
    for item in _read_yaml(run.path / ".hydra" / "overrides.yaml") or []:
        key, _, value = str(item).partition("=")
        run.overrides[key.lstrip("+~")] = value
    run.config = _read_yaml(run.path / ".hydra" / "config.yaml")
    from omegaconf import OmegaConf

    hydra_cfg = _read_yaml(run.path / ".hydra" / "hydra.yaml")
    choices = OmegaConf.select(hydra_cfg, "hydra.runtime.choices", default=None) if hydra_cfg is not None else None
    if choices is not None:
        run.choices = {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra")}
    events = read_events(run.path / "tb")
    run.scalars, run.wall_time = events.scalars, events.wall_time_span()
    for tag, series in run.scalars.items():
        if tag.startswith("eval/") and series:
            run.downstream[tag[len("eval/") :]] = series[-1][1]
    for results in sorted(run.path.glob("**/eval_results.json")):
        try:
            data = json.loads(results.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot read {results}: {err}") from err
        for task, metrics in data.get("results", {}).items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr") and isinstance(value, (int, float)):
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
# config nodes the `quantization` column sums up: the markdown table leaves their other leaves to the CSV
QUANT_NODES = ("quant.", "transition.quant.", "dqt.", "callbacks.dqt.")
MAX_MARKDOWN_SETTINGS = 8
KEY_METRICS = (
    "switch_step",
    "final_val_loss",
    "final_val_ppl",
    "best_val_loss",
    "transition/spike",
    "transition/recovery_steps",
    "tokens_per_sec",
    "wall_time_s",
)


def _leaves(run: Run) -> list[str]:
    """Dotted keys of every non-dict value in a run's config."""
    from omegaconf import OmegaConf

    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix[:-1]] if prefix else []
        return [k for key, value in node.items() for k in walk(value, f"{prefix}{key}.")]

    return walk(OmegaConf.to_container(run.config, resolve=False), "") if run.config is not None else []


def differing_overrides(runs: list[Run]) -> list[str]:
    """The swept settings: override keys whose value (config, else command line) is not the same in every run,
    in command-line order (all override keys when there is one run). A config group choice
    (``quant=dqt_ternary``) counts with its command-line value."""
    keys = sorted(
        {k for r in runs for k in r.overrides if not k.startswith(IGNORED_OVERRIDE_PREFIXES)},
        key=lambda k: min(list(r.overrides).index(k) for r in runs if k in r.overrides),
    )
    keys = [k for k in keys if any(r.setting(k) != "" for r in runs)]
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({r.setting(k) for r in runs}) > 1]


def differing_settings(runs: list[Run]) -> list[str]:
    """Every setting that differs between the runs: the swept overrides first, then any other config value
    that differs (e.g. one an experiment file sets), so runs of different sweeps compare fairly."""
    keys = differing_overrides(runs)
    if len(runs) == 1:
        return keys
    leaves = dict.fromkeys(k for r in runs for k in _leaves(r))
    extra = [
        k
        for k in leaves
        if k not in keys
        and not k.startswith(IGNORED_CONFIG_PREFIXES)
        and len({r.setting(k) for r in runs}) > 1
    ]
    return keys + extra


def markdown_settings(runs: list[Run], keys: list[str]) -> list[str]:
    """The settings the markdown table shows, out of ``keys`` (all that differ): the swept overrides, then the
    other differing config values that every run has (a node only some runs have, e.g. a DQT callback's
    options, is summed up by the quantization column), leaving out those of the quantization nodes, a copy of
    a column already shown (an interpolation such as ``callbacks.dqt: ${dqt}``) and any past
    ``MAX_MARKDOWN_SETTINGS``. The CSV keeps them all."""
    swept = set(differing_overrides(runs)) if len(runs) > 1 else set(keys)
    shown: list[str] = []
    seen_values: set[tuple[str, ...]] = set()
    for k in keys:
        values = tuple(r.setting(k) for r in runs)
        if k not in swept and (
            k.startswith(QUANT_NODES)
            or any(r.get(k, _ABSENT) is _ABSENT for r in runs)
            or values in seen_values
        ):
            continue
        seen_values.add(values)
        shown.append(k)
    return shown[:MAX_MARKDOWN_SETTINGS]


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
    """One report row: the run, its quantization, the differing settings, then the metrics (None: missing)."""
    val = run.series("val/loss")
    final = val[-1][1] if val else None
    best = min(v for _, v in val) if val else None
    tps = [v for _, v in run.series("train/tokens_per_sec")]
    quant = run.quantization
    row: dict[str, Any] = {"run": str(run.path), "quantization": quant.label}
    row.update({k: run.setting(k) for k in keys})
    row.update(
        {
            "switch_step": quant.step,
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
    """A table cell: "–" when missing; losses and accuracies with 4 decimals, perplexities 2, speeds and times
    0-1, steps as ints."""
    if value is None or value == "":
        return "–"
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "–"
    if abs(value) >= 1e6:
        return f"{value:.3e}"
    if "loss" in column or "spike" in column or column.startswith("eval/"):
        return f"{value:.4f}"
    if "ppl" in column:
        return f"{value:.2f}"
    if column == "wall_time_s":
        return f"{value:.1f}"
    return f"{value:.0f}" if value.is_integer() or abs(value) >= 100 else f"{value:.4g}"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """``report.csv``: every column of every row; a missing value is an empty cell."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buf.getvalue()


def render_markdown(
    runs: list[Run], rows: list[dict[str, Any]], keys: list[str], plots: list[str], notes: list[str]
) -> str:
    """``report.md``: the run, its quantization, the settings of :func:`markdown_settings`, the key metrics
    any run has and the main downstream accuracies; then the notes and the plots."""
    shown_keys = markdown_settings(runs, keys)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    evals = main_metric([c[len("eval/") :] for c in columns if c.startswith("eval/")])
    metrics = [
        c for c in (*KEY_METRICS, *[f"eval/{e}" for e in evals]) if any(r.get(c) is not None for r in rows)
    ]
    shown = ["run", "quantization", *shown_keys, *metrics]
    hidden = len(keys) - len(shown_keys)
    lines = [
        "# bitflow report",
        "",
        f"{len(rows)} run(s). Settings shown: those that differ between the runs"
        + (f" ({hidden} more differ: see report.csv)" if hidden else "")
        + ". Losses in nats/token, ppl = exp(loss); tokens/s is the median over training; wall time from the "
        "first to the last training event; – = not logged by that run. Full table: report.csv.",
        "",
        "| " + " | ".join(c.replace("|", "/") for c in shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
    ]
    for run, row in zip(runs, rows, strict=True):
        cells = [_fmt(run.name if c == "run" else row.get(c), c) for c in shown]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    if plots:
        lines += ["", *[f"![{Path(p).stem}]({p})" for p in plots]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plots
def _label(run: Run, keys: list[str], width: int = 70) -> str:
    """Legend text: the run's values of the swept overrides (short key names), else the run's name."""
    parts = [f"{k.split('.')[-1]}={run.setting(k)}" for k in keys if run.setting(k) != ""]
    text = ", ".join(parts) or run.name
    return text if len(text) <= width else text[: width - 1] + "…"


def _png(fig, note: str = "") -> bytes:
    """Lay out a figure (with ``note`` in small print under it), render it as a 120-dpi PNG and close it."""
    import matplotlib.pyplot as plt

    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def plot_val_loss(runs: list[Run], keys: list[str]) -> bytes | None:
    """Validation loss against step, one line per run, named by its swept settings and, when the runs differ
    in it, its quantization; a dashed vertical line (same colour) at each switch. Runs without ``val/loss``
    are named in a note under the plot."""
    import matplotlib.pyplot as plt

    drawn = [r for r in runs if r.series("val/loss")]
    if not drawn:
        return None
    mixed = len({r.quantization.label for r in drawn}) > 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(drawn):
        steps, values = zip(*run.series("val/loss"), strict=True)
        color = f"C{i % 10}"
        label = _label(run, keys) + (f" ({run.quantization.label})" if mixed else "")
        ax.plot(steps, values, marker="o", markersize=3, color=color, label=label)
        t0 = run.switch_step
        if t0 is not None and t0 > 0:
            ax.axvline(t0, color=color, linestyle="--", alpha=0.6, linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss (dashed: each run's 16-bit -> quantized switch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    missing = [r.name for r in runs if not r.series("val/loss")]
    return _png(fig, f"not drawn (no val/loss logged): {', '.join(missing)}" if missing else "")


@dataclass
class SwitchPoints:
    """What ``final_loss_vs_switch.png`` draws: ``series`` name -> [(switch point in % of training, final val
    loss)] of the runs switched mid-run; ``fp16``: the mean final val loss of the never-quantized runs only;
    ``scratch``: per from-scratch label (``ternary from scratch``, ``DQT ternary from scratch``) the mean
    final val loss of those runs."""

    series: dict[str, list[tuple[float, float]]]
    fp16: float | None
    scratch: dict[str, float]


def switch_points(runs: list[Run], keys: list[str]) -> SwitchPoints:
    """The data of :func:`plot_switch_point`: one series per setting of the swept overrides other than the
    switch point (and per method when the switched runs differ in it); baselines kept apart per method, so a
    quantized run is never averaged into the 16-bit baseline."""
    finished = [r for r in runs if r.last("val/loss") is not None]
    switched = [r for r in finished if r.switch_step and r.max_steps]
    fp16 = [r.last("val/loss") for r in finished if r.switch_step is None]
    scratch: dict[str, list[float]] = {}
    for r in finished:
        if r.switch_step == 0:
            scratch.setdefault(r.quantization.label, []).append(r.last("val/loss"))
    other = [k for k in keys if not k.endswith(".at")]
    many_methods = len({r.quantization.method for r in switched}) > 1
    series: dict[str, list[tuple[float, float]]] = {}
    for r in switched:
        parts = [f"{k.split('.')[-1]}={r.setting(k)}" for k in other if r.setting(k) != ""]
        if many_methods:
            parts.insert(0, r.quantization.method or "quantized")
        series.setdefault(", ".join(parts) or "switched runs", []).append(
            (100.0 * r.switch_step / r.max_steps, r.last("val/loss"))
        )
    return SwitchPoints(
        {name: sorted(pts) for name, pts in sorted(series.items())},
        statistics.mean(fp16) if fp16 else None,
        {label: statistics.mean(finals) for label, finals in sorted(scratch.items())},
    )


def plot_switch_point(runs: list[Run], keys: list[str]) -> bytes | None:
    """Final validation loss against the switch point (% of training) as :func:`switch_points` gives it, with
    the 16-bit baseline and one from-scratch baseline per method as horizontal lines."""
    import matplotlib.pyplot as plt

    data = switch_points(runs, keys)
    if not data.series:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, pts) in enumerate(data.series.items()):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
    if data.fp16 is not None:
        ax.axhline(data.fp16, color="black", linestyle="--", label="16-bit baseline")
    for j, (label, loss) in enumerate(data.scratch.items()):
        ax.axhline(loss, color=f"{0.35 + 0.15 * (j % 4):.2f}", linestyle=":", label=label)
    ax.set_xlabel("switch point (% of training steps)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("When to switch from 16-bit to quantized")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def spike_cells(runs: list[Run]) -> tuple[dict[tuple[int, str, str], list[float]], list[str]]:
    """The data of :func:`plot_spike`: (switch step, phase-in schedule, optimizer state) -> the runs' spikes,
    each below zero raised to zero, and the runs so raised (``name (value)``)."""
    cells: dict[tuple[int, str, str], list[float]] = {}
    negative = []
    with_spike = [r for r in runs if r.last("transition/spike") is not None]
    many_methods = len({r.quantization.method for r in with_spike}) > 1
    for r in with_spike:
        spike = r.last("transition/spike")
        if spike < 0:
            negative.append(f"{r.name} ({spike:.4f})")
        phase = str(r.get("transition.phase_in") or "none")
        if many_methods:
            phase = f"{r.quantization.method}, {phase}"
        state = str(r.get("transition.optimizer_state") or r.get("dqt.optimizer_state") or "keep")
        cells.setdefault((r.switch_step or 0, phase, state), []).append(max(spike, 0.0))
    return cells, negative


def plot_spike(runs: list[Run]) -> bytes | None:
    """Loss spike at the switch (``transition/spike``) by phase-in schedule (x) and optimizer state (bars):
    the mean over runs with that pair, each run as a dot; one panel per switch step, so like meets like. A
    spike below zero (the loss fell at the switch) is drawn as zero, with a note under the plot."""
    import matplotlib.pyplot as plt

    cells, negative = spike_cells(runs)
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
    fig.suptitle("Loss spike at the 16-bit -> quantized switch")
    note = f"spike < 0 (the loss fell at the switch) drawn as 0: {', '.join(negative)}" if negative else ""
    return _png(fig, note)


# ----------------------------------------------------------------------------------------- entry point
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


def make_report(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Read the runs under ``paths`` (any mix of relative and absolute paths) and write report.md, report.csv
    and the plots into ``out`` (default: the directory given, when there is one; else ./report). Everything is
    read and rendered first, then each file is written atomically. Returns ``{"rows", "markdown", "csv",
    "plots"}``."""
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
    # legends name the swept overrides; a single run's legend is its name, not all its overrides
    swept = differing_overrides(runs) if len(runs) > 1 else []
    rendered = {
        "val_loss.png": plot_val_loss(runs, swept),
        "final_loss_vs_switch.png": plot_switch_point(runs, swept),
        "spike_by_phase_in.png": plot_spike(runs),
    }
    images = {name: data for name, data in rendered.items() if data is not None}
    markdown = render_markdown(runs, rows, keys, list(images), report_notes(runs))
    table = render_csv(rows)
    # every input is read and every output rendered: only now touch the output directory
    plots = [atomic_write_bytes(out / name, data) for name, data in images.items()]
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
    args = parser.parse_args(argv)
    try:
        result = make_report(args.dirs, args.out)
    except (OSError, ValueError) as err:
        print(f"bitflow-report: error: {err}", file=sys.stderr)
        return 2
    print(result["markdown"].read_text())
    print(f"wrote {result['markdown']}, {result['csv']}" + "".join(f", {p}" for p in result["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
