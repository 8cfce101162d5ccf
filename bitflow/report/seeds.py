"""Comparisons across runs for the report: recovery against the 16-bit run of the same sweep, and seed groups.

Recovery against 16-bit (the in-run ``transition/recovery_steps`` compares a run with its own pre-switch loss, which
is 0 in short runs whose loss is still falling at the switch): both runs' training losses are smoothed by the same
exponential moving average over the logged points (beta :data:`SMOOTHING` = 0.6, TensorBoard's default), and

* ``recovery_vs_16bit`` = the steps from the switch t0 until the run's smoothed loss is back within ``tol`` nats of
  the 16-bit run's at the same step and stays there to the end of the run (``never`` if it is outside at the end);
* ``area_vs_16bit`` = the area between the two smoothed curves from t0 to the last common step,
  sum over steps of (L_run - L_16bit) * step spacing (nats x steps; trapezoid rule).

The 16-bit run is one that never quantizes, with the same seed if there is one, else the first; same
``trainer.max_steps`` required.

Seeds: runs whose settings differ only in ``seed`` form a group; the report shows each group's mean and standard
deviation and marks a group whose mean final validation loss is within the seed spread of the best group's
(|difference| <= sqrt(s_a^2 + s_b^2), the standard deviation of the difference of two single runs).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from bitflow.report.runs import Run

__all__ = [
    "SMOOTHING", "SeedGroup", "area_between", "baseline_of", "recovery_vs", "seed_groups", "seed_table", "smoothed",
    "within_spread",
]

SMOOTHING = 0.6  # per logged point, as TensorBoard's default smoothing
SEED_KEY = "seed"
DEFAULT_TOL = 0.05


def smoothed(series: list[tuple[int, float]], beta: float = SMOOTHING) -> dict[int, float]:
    """The exponential moving average ``m_t = beta m_{t-1} + (1 - beta) x_t`` of a (step, value) series."""
    out, m = {}, None
    for step, value in series:
        m = value if m is None else beta * m + (1 - beta) * value
        out[step] = m
    return out


def baseline_of(run: Run, runs: list[Run]) -> Run | None:
    """The 16-bit run ``run`` is compared with: one that never quantizes, has a training loss and the same
    ``trainer.max_steps``; the same seed when there is one. None for a 16-bit run itself."""
    if run.switch_step is None:
        return None
    candidates = [r for r in runs if r.switch_step is None and r.series("train/loss") and r.max_steps == run.max_steps]
    same_seed = [r for r in candidates if r.setting(SEED_KEY) == run.setting(SEED_KEY)]
    return (same_seed or candidates or [None])[0]


def recovery_vs(run: Run, base: Run, tol: float = DEFAULT_TOL) -> int | None:
    """Steps from the switch until the run's smoothed training loss is within ``tol`` of the 16-bit run's at
    the same step from then on (see the module docstring); None = not within it at the end of the run."""
    t0 = run.switch_step or 0
    mine, theirs = smoothed(run.series("train/loss")), smoothed(base.series("train/loss"))
    steps = sorted(s for s in mine if s >= t0 and s in theirs)
    outside = [s for s in steps if mine[s] - theirs[s] > tol]
    if not steps or (outside and outside[-1] == steps[-1]):
        return None
    return next(s for s in steps if not outside or s > outside[-1]) - t0


def area_between(run: Run, base: Run) -> float | None:
    """The area between the run's and the 16-bit run's smoothed training losses from the switch on (nats x steps)."""
    t0 = run.switch_step or 0
    mine, theirs = smoothed(run.series("train/loss")), smoothed(base.series("train/loss"))
    steps = sorted(s for s in mine if s >= t0 and s in theirs)
    if len(steps) < 2:
        return None
    diff = [mine[s] - theirs[s] for s in steps]
    return sum((b - a) * (da + db) / 2 for a, b, da, db in zip(steps, steps[1:], diff, diff[1:], strict=False))


@dataclass
class SeedGroup:
    """Runs whose settings differ only in ``seed``: ``settings`` are the shared values of the other keys."""

    settings: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, column: str) -> list[float]:
        """The rows' numeric values of ``column`` (missing and "never" left out)."""
        return [float(r[column]) for r in self.rows if isinstance(r.get(column), (int, float)) and r[column] is not None
                and not (isinstance(r[column], float) and math.isnan(r[column]))]

    def mean_std(self, column: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation of ``column`` over the seeds (std None with one value)."""
        v = self.values(column)
        if not v:
            return None, None
        return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None


def seed_groups(runs: list[Run], rows: list[dict[str, Any]], keys: list[str]) -> list[SeedGroup]:
    """Group the runs (with their report rows) by their values of ``keys`` (the report passes the swept command-line
    overrides) but ``seed`` and ``*.seed``, in first-seen order; a run's quantization is part of its group (the
    kind only for ``transition.at=auto``, whose seeds choose different steps)."""
    groups: dict[tuple, SeedGroup] = {}
    others = [k for k in keys if k != SEED_KEY and not k.endswith(f".{SEED_KEY}")]  # data.seed: ${seed}
    for run, row in zip(runs, rows, strict=True):
        auto = run.get("transition.at") == "auto" or run.setting("transition.at") == "auto"
        settings = {"quantization": _quant_kind(run) if auto else row["quantization"]}
        settings.update({k: run.setting(k) for k in others})
        group = groups.setdefault(tuple(settings.items()), SeedGroup(settings))
        group.runs.append(run)
        group.rows.append(row)
    return list(groups.values())


def _quant_kind(run: Run) -> str:
    """A group label that does not split auto-switched runs by the step each seed chose."""
    q = run.quantization
    if q.step is None:
        return "16-bit"
    if q.step == 0:
        return q.label
    return f"16-bit -> {q.method or 'quantized'} (at: auto)"


def within_spread(a: SeedGroup, b: SeedGroup, column: str = "final_val_loss") -> bool | None:
    """Whether the means of ``column`` of two groups differ by no more than sqrt(s_a^2 + s_b^2); None when a
    group has fewer than two values."""
    (ma, sa), (mb, sb) = a.mean_std(column), b.mean_std(column)
    if ma is None or mb is None or sa is None or sb is None:
        return None
    return abs(ma - mb) <= math.sqrt(sa * sa + sb * sb)


SEED_COLUMNS = ("final_val_loss", "switch_step", "transition/spike", "recovery_vs_16bit", "area_vs_16bit")


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def seed_table(groups: list[SeedGroup]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown section and the CSV rows of the seed groups (only when some group has several seeds)."""
    if not any(len(g.runs) > 1 for g in groups):
        return "", []
    best = min((g for g in groups if g.mean_std("final_val_loss")[0] is not None),
               key=lambda g: g.mean_std("final_val_loss")[0], default=None)
    keys = list(dict.fromkeys(k for g in groups for k in g.settings))
    lines = [
        "## Seeds: mean ± standard deviation over the runs that differ only in `seed`",
        "",
        "`≈ best`: the mean final val loss is within the seed spread of the best group's "
        "(|difference| <= sqrt(s_a² + s_b²)); recovery counts only the seeds that recovered (`never` otherwise).",
        "",
        "| " + " | ".join([*keys, "seeds", *SEED_COLUMNS, "vs best"]) + " |",
        "|" + "|".join("---" for _ in [*keys, "seeds", *SEED_COLUMNS, "vs best"]) + "|",
    ]
    rows = []
    for g in groups:
        cells = [g.settings.get(k, "") for k in keys] + [str(len(g.runs))]
        row: dict[str, Any] = {**g.settings, "seeds": len(g.runs)}
        for col in SEED_COLUMNS:
            mean, std = g.mean_std(col)
            digits = 4 if "loss" in col or "spike" in col else 2 if "area" in col else 1
            text = _pm(mean, std, digits)
            never = sum(1 for r in g.rows if r.get(col) == "never")
            if never:
                text = f"{text} ({never} never)" if mean is not None else f"never ({never} of {len(g.rows)})"
            cells.append(text)
            row[f"{col}_mean"], row[f"{col}_std"] = mean, std
        if g is best:
            mark = "best"
        else:
            close = within_spread(g, best) if best is not None else None
            mean, best_mean = g.mean_std("final_val_loss")[0], best.mean_std("final_val_loss")[0] if best else None
            delta = f"{mean - best_mean:+.4f}" if mean is not None and best_mean is not None else "–"
            mark = delta + (" ≈ best" if close else "")
        cells.append(mark)
        row["vs_best"] = mark
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        rows.append(row)
    return "\n".join(lines) + "\n", rows
