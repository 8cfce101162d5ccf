"""``bitflow-eval``, the Hydra app over conf/eval.yaml: real subprocesses on a real tiny checkpoint. The results
table, eval_results.json next to the checkpoint, TensorBoard scalars in the run's tb/ at the checkpoint's step,
perplexity, ``-m`` sweeps over checkpoints, nothing written to the working directory, and one-line errors that name
the key for bad settings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bitflow.config import ConfigError
from bitflow.data.sources import TextSource
from bitflow.eval.config import check_eval_config, eval_config
from bitflow.eval.harness import BitflowLM
from bitflow.eval.perplexity import perplexity_of_split, perplexity_of_tokens
from bitflow.eval.run import evaluate_checkpoint, lm_eval_cli
from tests.eval.evalkit import make_lm, save_checkpoint
from tests.helpers import bitflow_env, read_scalars

pytestmark = pytest.mark.integration  # real subprocesses, Trainer fits or lm-eval's task index

pytest_plugins = ["tests.eval.evalkit"]  # fixtures: tiny_tokenizer, tiny_lm, tiny_run_checkpoint

CONF = Path(__file__).resolve().parents[2] / "conf" / "eval.yaml"


def bitflow_eval(*args: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    """Run the ``bitflow-eval`` console script in ``cwd`` (an empty folder: the tests check it stays empty)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = bitflow_env(Path(os.environ.get("BITFLOW_CACHE", cwd)))
    env.pop("HYDRA_FULL_ERROR")
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        ["bitflow-eval", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_eval_writes_results_json_and_tensorboard(tiny_run_checkpoint: Path, tmp_path: Path):
    text = tmp_path / "sample.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 8)
    cwd = tmp_path / "cwd"
    args = [f"ckpt={tiny_run_checkpoint}", "tasks=[bitflow_next_line]", "limit=6", "device=cpu"]
    proc = bitflow_eval(*args, f"perplexity={text}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitflow_next_line" in proc.stdout and "acc_norm" in proc.stdout and "ppl_files" in proc.stdout
    record = json.loads((tiny_run_checkpoint.parent / "eval_results.json").read_text())
    assert record["checkpoint"] == "last.ckpt" and record["global_step"] == 7
    assert record["settings"]["tasks"] == "bitflow_next_line" and record["settings"]["limit"] == 6
    acc = record["results"]["bitflow_next_line"]["acc"]
    assert acc in {k / 6 for k in range(7)}
    # the file perplexity equals a direct sliding-window computation with the same model
    adapter = BitflowLM(ckpt=str(tiny_run_checkpoint), device="cpu")
    ids = adapter.tokenizer.encode(text.read_text()).ids
    want = perplexity_of_tokens(adapter.model, ids, prefix=adapter.eot_token_id)
    assert record["perplexity"]["ppl_files"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert record["perplexity"]["ppl_files"]["ppl"] == pytest.approx(math.exp(want["loss"]), rel=1e-6)
    scalars = read_scalars(tiny_run_checkpoint.parent.parent / "tb")
    assert scalars["eval/bitflow_next_line/acc"] == [(7, pytest.approx(acc))]
    assert "eval/ppl_files/ppl" in scalars and "eval/ppl_files/tokens" not in scalars
    # Hydra's log is next to the checkpoint; nothing lands in the working directory, no .hydra/ in the run
    assert "bitflow_next_line" in (tiny_run_checkpoint.parent / "eval.log").read_text()
    assert list(cwd.iterdir()) == []
    assert not list(tiny_run_checkpoint.parent.parent.rglob(".hydra"))


@pytest.mark.slow
def test_multirun_over_checkpoints_with_m_after_an_override(tiny_tokenizer, tmp_path: Path):
    ckpts = []
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name / "tb").mkdir(parents=True)
        ckpts.append(
            save_checkpoint(make_lm(tiny_tokenizer, seed=seed), tmp_path / name / "checkpoints" / "last.ckpt")
        )
    cwd = tmp_path / "cwd"
    # an earlier evaluation of a: the sweep adds its task to a's results
    proc = bitflow_eval(f"ckpt={ckpts[0]}", "tasks=bitflow_docstring_names", "limit=3", "device=cpu", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = f"ckpt={ckpts[0]},{ckpts[1]}"
    proc = bitflow_eval(sweep, "tasks=bitflow_next_line", "-m", "limit=4", "device=cpu", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("|bitflow_next_line|") == 2  # one table per job
    for ckpt in ckpts:
        record = json.loads((ckpt.parent / "eval_results.json").read_text())
        assert record["checkpoint_path"] == str(ckpt.resolve()) and record["settings"]["limit"] == 4
        scalars = read_scalars(ckpt.parent.parent / "tb")
        assert scalars["eval/bitflow_next_line/acc"] == [
            (7, pytest.approx(record["results"]["bitflow_next_line"]["acc"]))
        ]
    assert set(json.loads((ckpts[0].parent / "eval_results.json").read_text())["results"]) == {
        "bitflow_docstring_names",
        "bitflow_next_line",
    }
    assert set(json.loads((ckpts[1].parent / "eval_results.json").read_text())["results"]) == {
        "bitflow_next_line"
    }
    assert list(cwd.iterdir()) == []  # no outputs/, multirun/ or multirun.yaml next to the user


def config_error(proc: subprocess.CompletedProcess) -> str:
    """The one "config error: ..." line ``bitflow-eval`` printed (as ``bitflow`` does), checking that it exited
    with code 2 and printed no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if "config error: " in line]
    return line.split("config error: ", 1)[1]


BAD_VALUES = [
    (
        "limit=0",
        "limit=0 is not allowed; allowed: examples per task (a whole number >= 1), a fraction in (0, 1)",
    ),
    ("limit=many", "limit='many' is not allowed; allowed: examples per task"),
    ("limit=2.5", "limit=2.5 is not allowed; allowed: a whole number of examples when >= 1"),
    ("batch_size=big", "batch_size='big' is not allowed; allowed: a positive integer or auto"),
    ("precision=fp8", "precision='fp8' is not allowed; allowed: one of auto, 32, bf16, 16"),
    ("num_fewshot=-1", "num_fewshot=-1 is not allowed; allowed: a whole number >= 0"),
    ("device=gpu", "device='gpu' is not allowed; allowed: cpu, cuda, cuda:N"),
    ("stride=0", "stride=0 is not allowed; allowed: a positive number of tokens"),
    ("tensorboard=maybe", "tensorboard='maybe' is not allowed; allowed: true or false"),
    (
        "perplexity=[nothing/*.txt]",
        "perplexity=['nothing/*.txt']: no file matches 'nothing/*.txt'; allowed: val,",
    ),
]


@pytest.mark.parametrize("override,message", [BAD_VALUES[0], BAD_VALUES[3]])
def test_a_bad_value_is_one_line_naming_the_key(tiny_run_checkpoint: Path, tmp_path: Path, override, message):
    proc = bitflow_eval(f"ckpt={tiny_run_checkpoint}", override, cwd=tmp_path / "cwd")
    assert config_error(proc).startswith(message)
    assert not (tiny_run_checkpoint.parent / "eval_results.json").exists()


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_every_bad_value_is_caught_by_the_checks(tiny_run_checkpoint: Path, override, message):
    # the same checks as the subprocess above, on the config Hydra composes (all of them, in-process: fast)
    from hydra import compose, initialize_config_dir

    from bitflow.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt={tiny_run_checkpoint}", override])
    with pytest.raises(ConfigError) as err:
        check_eval_config(cfg)
    assert str(err.value).startswith(message)


def test_settings_are_checked_before_lm_eval_lightning_or_the_model_load(tiny_run_checkpoint: Path):
    code = (
        "import sys\n"
        "from bitflow.config import ConfigError\n"
        "from bitflow.eval.run import evaluate_checkpoint\n"
        "for bad in ({'limit': 0}, {'batch_size': 'big'}, {'perplexity': 'nothing/*.txt'}):\n"
        f"    try: evaluate_checkpoint({{'ckpt': {str(tiny_run_checkpoint)!r}, **bad}})\n"
        "    except ConfigError as e: print('caught', e)\n"
        "print(sorted(m for m in ('lm_eval', 'lightning', 'bitflow.lm', 'bitflow.eval.harness') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("caught ") == 3 and proc.stdout.strip().endswith("[]"), proc.stdout


def test_a_missing_checkpoint_fails_at_once_and_creates_nothing(tmp_path: Path):
    cwd = tmp_path / "cwd"
    missing = tmp_path / "runs" / "missing.ckpt"
    proc = bitflow_eval(f"ckpt={missing}", cwd=cwd)
    assert config_error(proc).startswith(f"ckpt='{missing}': checkpoint not found")
    assert not (tmp_path / "runs").exists() and list(cwd.iterdir()) == []
    proc = bitflow_eval(cwd=cwd)  # no ckpt at all
    assert config_error(proc).startswith("ckpt is required")
    # HYDRA_FULL_ERROR=1 shows where the error came from
    proc = bitflow_eval("ckpt=missing.ckpt", cwd=cwd, full_error=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert list(cwd.iterdir()) == []


def test_hydras_own_errors_for_unknown_keys_and_unquoted_lists(tiny_run_checkpoint: Path, tmp_path: Path):
    proc = bitflow_eval(f"ckpt={tiny_run_checkpoint}", "task=piqa", cwd=tmp_path / "cwd")
    assert (
        proc.returncode == 1
        and "Could not override 'task'" in proc.stderr  # bitflow-eval takes tasks=[...]
        and "Traceback" not in proc.stderr
    )
    proc = bitflow_eval(f"ckpt={tiny_run_checkpoint}", "tasks=piqa,sciq", cwd=tmp_path / "cwd")
    assert proc.returncode == 1 and "use key=[value1,value2]" in proc.stderr


def test_an_unknown_task_fails_before_the_checkpoint_is_loaded(tmp_path: Path):
    # the checkpoint is a text file: loading it would fail, so an error about the task shows it was checked first
    (tmp_path / "a.ckpt").write_text("hello")
    proc = bitflow_eval(
        f"ckpt={tmp_path / 'a.ckpt'}", "tasks=[local,bitflow_nonexistent]", cwd=tmp_path / "cwd"
    )
    error = config_error(proc)
    assert error.startswith("tasks=['local', 'bitflow_nonexistent']: unknown task(s) ['bitflow_nonexistent']")
    assert "Known groups: local, paper11, spectra" in error
    proc = bitflow_eval(f"ckpt={tmp_path / 'a.ckpt'}", "tasks=local", cwd=tmp_path / "cwd")
    error = config_error(proc)
    assert (
        error.startswith(f"cannot evaluate ckpt='{tmp_path / 'a.ckpt'}'")
        and "not a bitflow checkpoint" in error
    )


def test_settings_compose_and_normalise(tiny_run_checkpoint: Path):
    from hydra import compose, initialize_config_dir

    from bitflow.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                f"ckpt={tiny_run_checkpoint}",
                "tasks=[paper11, sciq, local]",
                "limit=50",
                "batch_size=auto",
                "tensorboard=false",
                "precision=32",
            ],
        )
    checked = check_eval_config(cfg)
    # the continual-QAT paper's 11 tasks, in its order (papers.md)
    assert checked.tasks[:11] == "piqa hellaswag winogrande openbookqa sciq arc_easy copa rte cb mrpc sst2".split()
    assert checked.tasks[11:] == ["bitflow_docstring_names", "bitflow_next_identifier", "bitflow_next_line"]
    assert (checked.limit, checked.batch_size, checked.tensorboard, checked.precision) == (
        50,
        "auto",
        False,
        "32",
    )
    assert check_eval_config(eval_config({"ckpt": str(tiny_run_checkpoint), "limit": 0.25})).limit == 0.25
    assert check_eval_config(eval_config({"ckpt": str(tiny_run_checkpoint), "limit": 20.0})).limit == 20
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['task'\]; allowed: ckpt, tasks"):
        eval_config({"ckpt": "x", "task": "piqa"})
    with pytest.raises(ConfigError, match="tasks=none and perplexity=null: nothing to evaluate"):
        check_eval_config(eval_config({"ckpt": str(tiny_run_checkpoint), "tasks": "none"}))


def test_every_setting_in_conf_eval_yaml_has_a_comment():
    keys = [line for line in CONF.read_text().splitlines() if line and line[0].isalpha() and line != "hydra:"]
    assert [k.split(":")[0] for k in keys] == list(eval_config())
    assert all("  # " in k for k in keys), [k for k in keys if "  # " not in k]


def test_validation_perplexity_uses_the_runs_corpus(tiny_run_checkpoint: Path, tmp_path: Path):
    (tmp_path / "train.txt").write_text("x = 1\n" * 40)
    (tmp_path / "val.txt").write_text("def g(y):\n    return y + 1\n" * 6)
    source = {
        "_target_": "bitflow.data.sources.TextSource",
        "paths": str(tmp_path / "train.txt"),
        "val_paths": str(tmp_path / "val.txt"),
    }
    config = {"data": {"source": source, "cache_dir": str(tmp_path / "cache")}}
    run = tiny_run_checkpoint.parent.parent
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    evaluate_checkpoint(
        {"ckpt": str(tiny_run_checkpoint), "tasks": "none", "perplexity": "val", "device": "cpu"}
    )
    record = json.loads((tiny_run_checkpoint.parent / "eval_results.json").read_text())
    adapter = BitflowLM(ckpt=str(tiny_run_checkpoint), device="cpu")
    src = TextSource(str(tmp_path / "train.txt"), val_paths=str(tmp_path / "val.txt"))
    want = perplexity_of_split(adapter.model, adapter.tokenizer, src, "val", cache_dir=tmp_path / "cache")
    assert record["perplexity"]["ppl_val"] == pytest.approx(want)
    assert record["results"] == {}
    assert read_scalars(run / "tb")["eval/ppl_val/loss"] == [(7, pytest.approx(want["loss"]))]


def test_bitflow_lm_eval_is_lm_evals_cli_with_bitflow(tiny_run_checkpoint: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bitflow-lm-eval"])
    args = [
        "--model",
        "bitflow",
        "--model_args",
        f"ckpt={tiny_run_checkpoint}",
        "--tasks",
        "bitflow_next_line",
    ]
    lm_eval_cli([*args, "--limit", "3", "--device", "cpu", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert "bitflow_next_line" in out and "acc_norm" in out
