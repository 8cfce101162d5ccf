"""bitflow's offline lm-eval tasks: deterministic generation, hand-checked examples, the shipped data,
groups."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bitflow.data.sources import is_val
from bitflow.eval import make_tasks
from bitflow.eval.local_tasks import LOCAL_TASKS, load_task_data, read_task_file, tasks_dir
from bitflow.eval.suites import TASK_GROUPS, resolve_tasks, task_manager_for

SOURCE = '''"""A module."""


def area_of_circle(radius):
    """Compute the surface enclosed by a round shape."""
    return 3.14159 * radius * radius


def mentions_itself():
    """mentions_itself is excluded: the docstring names the function."""


class Box:
    def volume(self, width, height, depth):
        """Multiply the three side lengths together."""
        result = width * height * depth
        return result
'''


@pytest.fixture(scope="module")
def held_out_subset() -> list[tuple[str, str]]:
    """A few real held-out stdlib files (the generator's input), enough for every task."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["copy.py", "fileinput.py", "tempfile.py", "traceback.py", "dis.py"]
    assert all(is_val(n, make_tasks.VAL_FRACTION) for n in names)  # held out from training
    return [(n, (root / n).read_text(encoding="utf-8")) for n in names]


def test_generation_is_byte_identical(tmp_path: Path, held_out_subset):
    a = make_tasks.generate(tmp_path / "a", seed=7, num_docs=30, files=held_out_subset)
    b = make_tasks.generate(tmp_path / "b", seed=7, num_docs=30, files=list(reversed(held_out_subset)))
    assert sorted(a) == sorted(b) == sorted(LOCAL_TASKS.values())
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
        data = json.loads(a[name].read_text())
        assert data["meta"]["python_version"] == platform.python_version()
        assert data["meta"]["num_docs"] == len(data["docs"]) > 0
    c = make_tasks.generate(tmp_path / "c", seed=8, num_docs=30, files=held_out_subset)
    assert c["next_line"].read_bytes() != a["next_line"].read_bytes()  # the seed chooses the examples


def test_docstring_candidates_of_a_hand_written_file():
    found = make_tasks.docstring_candidates([("m.py", SOURCE)])
    assert found == [
        {
            "id": "m.py:4:0",
            "name": "area_of_circle",
            "args": "radius",
            "doc": "Compute the surface enclosed by a round shape.",
        },
        {
            "id": "m.py:14:4",
            "name": "volume",
            "args": "self, width, height, depth",
            "doc": "Multiply the three side lengths together.",
        },
    ]


def test_identifier_candidates_of_a_hand_written_file():
    found = make_tasks.identifier_candidates([("m.py", SOURCE)])
    # the last identifier of a logical line that already occurs in the <= 600 characters before it; the
    # `radius` of line 6 has only ~130 characters before it (< 150) and is left out
    assert [(c["id"], c["target"]) for c in found] == [
        ("m.py:16:34", " depth"),  # result = width * height * depth  (depth is in the def line)
        ("m.py:17:15", " result"),  # return result
    ]
    assert found[1]["context"].endswith("        return")
    assert found[1]["context"] + found[1]["target"] in SOURCE


def test_the_shipped_data_are_well_formed():
    for task, stem in LOCAL_TASKS.items():
        data = read_task_file(stem)
        assert data["meta"]["task"] == task
        assert data["meta"]["python_version"].count(".") == 2
        docs = data["docs"]
        assert len(docs) >= 200
        assert len({d["id"] for d in docs}) == len(docs)
    for d in read_task_file("docstring_names")["docs"]:
        assert len(set(d["names"])) == 4 and 0 <= d["label"] < 4
        gold = d["names"][d["label"]]
        assert d["contexts"][d["label"]].startswith(f"def {gold}(") and gold not in d["target"]
    for d in read_task_file("next_identifier")["docs"]:
        assert d["target"].strip().isidentifier() and d["target"].strip() in d["context"]
    for d in read_task_file("next_line")["docs"]:
        assert len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 and d["context"].endswith("\n")
    labels = [d["label"] for d in read_task_file("next_line")["docs"]]
    assert min(labels.count(k) for k in range(4)) > len(labels) / 8  # the gold position is spread out


def test_lm_eval_loads_the_local_tasks():
    manager = task_manager_for(resolve_tasks("local"))
    loaded = manager.load(list(LOCAL_TASKS))
    for name, n in (("bitflow_next_line", 400), ("bitflow_next_identifier", 400)):
        assert len(loaded["tasks"][name].eval_docs) == n
    assert len(load_task_data("docstring_names")["test"]) == len(read_task_file("docstring_names")["docs"])
    assert (tasks_dir() / "bitflow_next_line.yaml").is_file()


def test_task_groups_resolve_to_lm_eval_names():
    assert TASK_GROUPS["paper11"] == [
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
    ]
    assert len(TASK_GROUPS["spectra"]) == 13
    assert resolve_tasks("local,bitflow_next_line,piqa") == [*LOCAL_TASKS, "piqa"]
    assert resolve_tasks(["[", "sciq"]) == ["[", "sciq"]  # names pass through; task_manager_for checks them


def test_an_empty_task_list_is_an_error():
    # unknown names: tests/eval/test_run.py (they need lm-eval's built-in index, which takes seconds)
    with pytest.raises(ValueError, match="no tasks given"):
        resolve_tasks(" , ")


@pytest.mark.slow
def test_the_shipped_files_are_what_the_generator_writes():
    proc = subprocess.run(
        [sys.executable, "-m", "bitflow.eval.make_tasks", "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
