"""The task groups name tasks that lm-eval has: every name in ``paper11`` and ``spectra`` is in lm-eval's task
index (built offline from the YAML files of the installed lm-eval package; nothing is downloaded)."""

from __future__ import annotations

import pytest
from lm_eval.tasks import TaskManager

from bitflow.eval.suites import TASK_GROUPS

pytestmark = pytest.mark.integration  # real subprocesses, Trainer fits or lm-eval's task index


@pytest.fixture(scope="module")
def lm_eval_index() -> set[str]:
    """Every task, group and tag name lm-eval's built-in YAML files define."""
    return set(TaskManager().all_tasks)


@pytest.mark.parametrize("group", ["paper11", "spectra"])
def test_every_task_of_the_group_is_in_lm_evals_index(group: str, lm_eval_index: set[str]):
    names = TASK_GROUPS[group]
    assert len(names) == {"paper11": 11, "spectra": 13}[group] == len(set(names))
    assert [n for n in names if n not in lm_eval_index] == []


def test_the_index_check_catches_a_wrong_name(lm_eval_index: set[str]):
    # the check above is not vacuous: near-misses of real names are not in the index
    assert "arc_easy" in lm_eval_index and "arc-easy" not in lm_eval_index and "piqa_v2" not in lm_eval_index
