"""The report's plots: val loss against step, final loss against the switch point, spike by phase-in."""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass
from typing import Any

from bitflow.report.runs import Run


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


def plot_val_loss(runs: list[Run], keys: list[str], groups: list[Any] | None = None) -> bytes | None:
    """Validation loss against step, one line per run, named by its swept settings and, when the runs differ
    in it, its quantization; a dashed vertical line (same colour) at each switch. Runs without ``val/loss``
    are named in a note under the plot. With seed ``groups`` (:func:`bitflow.report.seeds.seed_groups`) of which
    one has several runs, one line per group: the mean over its seeds with a band of +- one standard deviation."""
    import matplotlib.pyplot as plt

    drawn = [r for r in runs if r.series("val/loss")]
    if not drawn:
        return None
    mixed = len({r.quantization.label for r in drawn}) > 1
    fig, ax = plt.subplots(figsize=(8, 5))
    if groups and any(len(g.runs) > 1 for g in groups):
        swept = [k for k in keys if k != "seed"]
        for i, g in enumerate(groups):
            members = [r for r in g.runs if r.series("val/loss")]
            if not members:
                continue
            color = f"C{i % 10}"
            curves = [dict(r.series("val/loss")) for r in members]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.mean(c[s] for c in curves) for s in steps]
            std = [statistics.stdev(c[s] for c in curves) if len(curves) > 1 else 0.0 for s in steps]
            label = _label(members[0], swept) + (f" ({g.settings.get('quantization')})" if mixed else "")
            ax.plot(steps, mean, marker="o", markersize=3, color=color, label=f"{label}, {len(members)} seed(s)")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std, strict=True)],
                            [m + d for m, d in zip(mean, std, strict=True)], color=color, alpha=0.2)
            for run in members:
                if run.switch_step:
                    ax.axvline(run.switch_step, color=color, linestyle="--", alpha=0.5, linewidth=1)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Validation loss, mean ± std over seeds (dashed: switches)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return _png(fig)
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
        by_x: dict[float, list[float]] = {}
        for x, y in pts:
            by_x.setdefault(x, []).append(y)
        xs = sorted(by_x)
        ys = [statistics.mean(by_x[x]) for x in xs]
        err = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
        # seeds of one switch point: their mean with an error bar of one standard deviation
        ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", color=f"C{i % 10}", label=name, capsize=3)
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
            stds = [statistics.stdev(cells[(t0, p, state)]) if len(cells.get((t0, p, state), [])) > 1 else 0.0
                    for p in phases]
            ax.bar(xs, means, width=width, color=f"C{j}", alpha=0.8, label=label,
                   yerr=stds if any(stds) else None, capsize=3)
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
