"""The report's table: the settings that differ between runs, the key metrics, markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from bitflow.report.runs import IGNORED_OVERRIDE_PREFIXES, MISSING, Run

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
    *(TASK_METRICS := ("val/masked_acc", "val/acc", "val/macro_f1")),  # the non-decoder tasks (bitflow.tasks)
    "transition/spike",
    "transition/recovery_steps",
    "recovery_vs_16bit",
    "area_vs_16bit",
    "tokens_per_sec",
    "wall_time_s",
    "size_mbit",
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
            or any(r.get(k, MISSING) is MISSING for r in runs)
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
            **{m: run.last(m) for m in TASK_METRICS},
            "transition/spike": run.last("transition/spike"),
            "transition/recovery_steps": run.last("transition/recovery_steps"),
            "tokens_per_sec": statistics.median(tps) if tps else None,
            "wall_time_s": run.wall_time,
            "last_step": max((s for series in run.scalars.values() for s, _ in series), default=None),
        }
    )
    row.update(_size(run))
    row.update({f"eval/{k}": v for k, v in sorted(run.downstream.items())})
    return row


def _size(run: Run) -> dict[str, float | None]:
    """Size in bits of the run's (final) model from its config (:func:`bitflow.quant.size.config_size`), in
    Mbit: ``size_mbit`` counts ternary weights at log2(3) bits, ``size_mbit_storage`` at the 2-bit packing."""
    from omegaconf import DictConfig, OmegaConf

    from bitflow.quant.size import config_size

    model, vocab = run.get("model"), run.get("data.vocab_size")
    quant = run.get("transition.quant")
    quant = quant if isinstance(quant, DictConfig) else run.get("quant")
    if not isinstance(model, DictConfig) or not isinstance(vocab, int):
        return {"size_mbit": None, "size_mbit_storage": None}
    try:
        plain = OmegaConf.to_container(quant, resolve=True) if isinstance(quant, DictConfig) else None
        size = config_size(OmegaConf.to_container(model, resolve=True), vocab, plain)
    except (ValueError, TypeError) as err:
        run.notes.append(f"{run.name}: no size in bits ({err})")
        return {"size_mbit": None, "size_mbit_storage": None}
    return {"size_mbit": size.bits / 1e6, "size_mbit_storage": size.storage_bits / 1e6}


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
    if "loss" in column or "spike" in column or column.startswith(("eval/", "val/")):
        return f"{value:.4f}"
    if "ppl" in column:
        return f"{value:.2f}"
    if column == "wall_time_s":
        return f"{value:.1f}"
    if column.startswith("size_mbit"):
        return f"{value:.3f}"
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
