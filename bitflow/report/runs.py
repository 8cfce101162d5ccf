"""Reading a run for the report: its directory, overrides, config, Hydra choices, TensorBoard scalars, downstream
accuracies and quantization (the switch step and method)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitflow.events import read_events
from bitflow.schedules import resolve_switch_step

RUN_MARKERS = ("tb", ".hydra")
IGNORED_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "paths.", "trainer.enable_progress_bar")
MISSING = object()  # the default of Run.get that tells a missing key from a null value


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

        value = self.get(key, MISSING)
        if value is MISSING:
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
                at = self.get(f"{node}.at", 0 if node == "dqt" else MISSING)
                if at is MISSING:
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
