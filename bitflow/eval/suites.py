"""Task groups and task name resolution for ``bitflow-eval`` and the in-training callback.

``tasks=`` takes a group name, lm-eval task names, or a comma-separated mix:

- ``paper11``: the 11 zero-shot tasks of continual QAT (Nielsen et al., arXiv 2502.11895; OLMo's suite);
- ``spectra``: the 13 tasks of Spectra (Kaushal et al., arXiv 2407.12327);
- ``local``: bitflow's offline tasks, generated from the held-out stdlib files
  (:mod:`bitflow.eval.make_tasks`).

lm-eval's built-in tasks download their data from the Hugging Face Hub on first use; the local tasks need no
network. Indexing lm-eval's ~200 built-in task folders takes seconds, so it happens only when a requested name
is not a local task.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from bitflow.eval.local_tasks import LOCAL_TAG, LOCAL_TASKS, tasks_dir

TASK_GROUPS: dict[str, list[str]] = {
    # PIQA, HellaSwag, WinoGrande, OpenBookQA, SciQ, ARC-Easy, COPA, RTE, CommitmentBank, MRPC, SST-2
    "paper11": [
        "piqa",
        "hellaswag",
        "winogrande",
        "openbookqa",
        "sciq",
        "arc_easy",
        "copa",
        "rte",
        "cb",
        "mrpc",
        "sst2",
    ],
    # ARC-e, ARC-c, HellaSwag, BoolQ, PIQA, WinoGrande, LAMBADA, SciQ, LogiQA, MMLU, TriviaQA, CrowS-Pairs,
    # TruthfulQA-MC1 (papers.md section 5)
    "spectra": [
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "boolq",
        "piqa",
        "winogrande",
        "lambada_openai",
        "sciq",
        "logiqa",
        "mmlu",
        "triviaqa",
        "crows_pairs_english",
        "truthfulqa_mc1",
    ],
    "local": list(LOCAL_TASKS),
}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Expand group names in ``spec`` ("local", "paper11,local", ["piqa", "sciq"], ...) into a de-duplicated
    list of lm-eval task names, in order. Names that are not groups pass through (checked by
    :func:`task_manager_for`)."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    items = [s.strip() for s in items if s and s.strip()]
    if not items:
        raise ValueError(f"no tasks given; use a group ({', '.join(TASK_GROUPS)}) or lm-eval task names")
    out: list[str] = []
    for item in items:
        for name in TASK_GROUPS.get(item, [item]):
            if name not in out:
                out.append(name)
    return out


def needs_builtin_tasks(names: Sequence[str]) -> bool:
    """Whether any of ``names`` is not one of bitflow's local tasks (or their tag)."""
    return any(n not in LOCAL_TASKS and n != LOCAL_TAG for n in names)


def task_manager_for(names: Sequence[str]) -> Any:
    """An lm-eval ``TaskManager`` that knows bitflow's local tasks, and lm-eval's built-in tasks only when
    ``names`` need them (indexing them takes seconds). Raises ValueError for a name it does not know, listing
    the groups."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=needs_builtin_tasks(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hints = "; ".join(f"{n!r}: did you mean {', '.join(c)}?" for n, c in close.items() if c)
        raise ValueError(
            f"unknown task(s) {unknown}. Known groups: {', '.join(sorted(TASK_GROUPS))}; local tasks: "
            f"{', '.join(LOCAL_TASKS)}; or any lm-eval task name (list them with `lm_eval ls tasks`)."
            + (f" {hints}" if hints else "")
        )
    return manager
