"""Offline lm-eval tasks that ship with bitflow: their names, their data files, and the loader lm-eval calls.

The data are generated from the held-out (validation) files of the default stdlib corpus by
:mod:`bitflow.eval.make_tasks`, so a model trained on the training files is scored on code it has not seen.
The task YAML files in ``bitflow/eval/tasks/`` point their ``custom_dataset`` at :func:`load_task_data`.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# lm-eval task name -> data file stem; the order is the order of the `local` group
LOCAL_TASKS = {
    "bitflow_docstring_names": "docstring_names",
    "bitflow_next_identifier": "next_identifier",
    "bitflow_next_line": "next_line",
}
LOCAL_TAG = "bitflow_local"


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns on every load of a task with a ``custom_dataset`` that custom kwargs can be passed
    through ``--metadata``; bitflow's local tasks take none, so drop that hint for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(tuple(f"{t}: Custom kwargs" for t in LOCAL_TASKS)))


logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


def tasks_dir() -> Path:
    """The directory of bitflow's lm-eval task YAML files (``include_path`` for lm-eval's TaskManager)."""
    return Path(str(files("bitflow.eval") / "tasks"))


def data_path(name: str) -> Path:
    """The JSON data file of local task ``name`` (a data stem such as ``"docstring_names"``)."""
    if name not in LOCAL_TASKS.values():
        raise ValueError(f"unknown local task data {name!r}; known: {sorted(LOCAL_TASKS.values())}")
    return tasks_dir() / "data" / f"{name}.json"


@cache
def read_task_file(name: str) -> dict[str, Any]:
    """The parsed data file of local task ``name``: ``{"meta": {...}, "docs": [...]}``.

    Warns once if it was generated under another Python minor version: the stdlib (and so the held-out split)
    then differs a little from the one the model's corpus came from.
    """
    path = data_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"local task data {path} is missing; regenerate with `python -m bitflow.eval.make_tasks`"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    recorded = data["meta"].get("python_version", "")
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not recorded.startswith(running + "."):
        log.warning(
            "local task %s was generated from the stdlib of Python %s, this is Python %s: some of its files "
            "may be in this Python's training split; regenerate with `python -m bitflow.eval.make_tasks`",
            name,
            recorded,
            running,
        )
    return data


def load_task_data(name: str, **_: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` hook: ``{"test": datasets.Dataset}`` of local task ``name``.

    lm-eval also passes the task's metadata and the model arguments as keywords; they are ignored.
    """
    import datasets

    return {"test": datasets.Dataset.from_list(read_task_file(name)["docs"])}
