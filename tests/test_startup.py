"""Start-up: what a command imports. ``bitflow --help`` and config errors import no torch; training imports
nothing for evaluation, plots or Hugging Face datasets (assertions on sys.modules, never on time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, bitflow_env

HEAVY = ("datasets", "lm_eval", "matplotlib", "transformers", "torch", "lightning")
TRAINING_NEEDS_NONE_OF = ("datasets", "lm_eval", "matplotlib", "transformers")


def _modules_after(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line with the heavy modules it found loaded."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_module():
    found = _modules_after(
        f"import json, sys, bitflow.cli; print(json.dumps({{'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert found["loaded"] == []


def test_bitflow_help_loads_no_heavy_module():
    code = f"""
import contextlib, io, json, sys
sys.argv = ["bitflow", "--help"]
import bitflow.cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        bitflow.cli.train()
    except SystemExit:
        pass
assert out.getvalue().startswith("bitflow:"), out.getvalue()[:200]
print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    assert _modules_after(code)["loaded"] == []


@pytest.mark.slow
def test_a_training_run_imports_no_eval_plot_or_datasets_module_of_its_own(cache_dir: Path, tmp_path: Path):
    # Lightning imports torchmetrics, which imports matplotlib and transformers when they are installed: those
    # count against Lightning; what the run adds beyond `import lightning` must hold none of them
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'run'}",
    ]
    code = f"""
import json, sys
import lightning
with_lightning = set(sys.modules)
from tests.helpers import compose
from bitflow.cli import run_training
run_training(compose({overrides!r}))
names = {TRAINING_NEEDS_NONE_OF!r}
print(json.dumps({{"lightning": [m for m in names if m in with_lightning],
                  "added": [m for m in names if m in sys.modules and m not in with_lightning]}}))
"""
    env = bitflow_env(cache_dir)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    found = _modules_after(code, env=env, cwd=tmp_path)
    assert found["added"] == [], found
    assert "datasets" not in found["lightning"] and "lm_eval" not in found["lightning"]
