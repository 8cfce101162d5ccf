"""The one TensorBoard reader: every scalar (and, on request, histogram) of a run, read from its event files.

Used by ``bitflow-report``, the tests and the experiment scripts::

    from bitflow.events import read_events, read_scalars
    read_scalars("outputs/train/<time>/tb")["val/loss"]  # [(step, value), ...] sorted by step
    read_events(run_dir).wall_time_span()  # seconds from the first to the last training event

A directory is searched recursively for ``events.out.tfevents.*`` files, so a run directory, its ``tb/``
folder or one event file may be given. When a step of a tag was logged more than once (a resumed run, an
evaluation appended later), the value written last (by wall time) is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunEvents", "event_files", "read_events", "read_scalars"]

EVENT_GLOB = "events.out.tfevents.*"


@dataclass
class RunEvents:
    """What the event files of one run hold.

    ``scalars``: tag -> [(step, value)] sorted by step, one value per step; ``wall_times``: tag -> the wall
    times (seconds since the epoch) of its events; ``histograms``: tag -> [(step, HistogramValue)] sorted by
    step (TensorBoard's ``HistogramValue``: ``min``, ``max``, ``num``, ``sum``, ``bucket_limit``,
    ``bucket``), filled only when asked for."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_times: dict[str, list[float]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    # per event file (one per process that wrote the run: the first start and every resume), tag -> wall times
    file_wall_times: list[dict[str, list[float]]] = field(default_factory=list)

    def wall_time_span(self, exclude: tuple[str, ...] = ("eval/",)) -> float | None:
        """Seconds of training: from the first to the last scalar event of each event file, summed over the files
        (a resumed run writes a new file, and the pause before the resume does not count), leaving out tags
        that start with ``exclude`` (by default the ``eval/`` scalars, which ``bitflow-eval`` may append long
        after training). None: no events."""
        spans = []
        for per_tag in self.file_wall_times:
            times = [t for tag, ts in per_tag.items() if not tag.startswith(exclude) for t in ts]
            if times:
                spans.append(max(times) - min(times))
        return sum(spans) if spans else None


def event_files(path: str | os.PathLike) -> list[Path]:
    """The TensorBoard event files at ``path``: the file itself, or every one below a directory (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.rglob(EVENT_GLOB)) if path.is_dir() else []


def read_events(path: str | os.PathLike, histograms: bool = False) -> RunEvents:
    """Read every scalar (and with ``histograms=True`` every histogram) of the event files at ``path`` (see
    the module docstring). A path without event files gives an empty :class:`RunEvents`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    hist_latest: dict[str, dict[int, tuple[float, Any]]] = {}
    out = RunEvents()
    guidance = {"scalars": 0, "histograms": 0 if histograms else 1}
    for file in event_files(path):
        # purge_orphaned_data=False: an evaluation appended later may log a step before the run's last one
        acc = EventAccumulator(str(file), size_guidance=guidance, purge_orphaned_data=False)
        acc.Reload()
        tags = acc.Tags()
        this_file: dict[str, list[float]] = {}
        out.file_wall_times.append(this_file)
        for tag in tags.get("scalars", []):
            by_step = latest.setdefault(tag, {})
            for e in acc.Scalars(tag):
                out.wall_times.setdefault(tag, []).append(e.wall_time)
                this_file.setdefault(tag, []).append(e.wall_time)
                if int(e.step) not in by_step or e.wall_time >= by_step[int(e.step)][0]:
                    by_step[int(e.step)] = (e.wall_time, float(e.value))
        for tag in tags.get("histograms", []) if histograms else []:
            by_step_h = hist_latest.setdefault(tag, {})
            for e in acc.Histograms(tag):
                if int(e.step) not in by_step_h or e.wall_time >= by_step_h[int(e.step)][0]:
                    by_step_h[int(e.step)] = (e.wall_time, e.histogram_value)
    out.scalars = {tag: [(s, v) for s, (_, v) in sorted(steps.items())] for tag, steps in latest.items()}
    out.histograms = {
        tag: [(s, h) for s, (_, h) in sorted(steps.items())] for tag, steps in hist_latest.items()
    }
    return out


def read_scalars(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files at ``path`` as tag -> [(step, value)] sorted by step (see
    :func:`read_events`)."""
    return read_events(path).scalars
