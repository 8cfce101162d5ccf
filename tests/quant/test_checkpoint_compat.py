"""Checkpoints written before the quantization redesign (issue 9) still load and resume to the same weights.

tests/fixtures/compat/ holds step-6 checkpoints of three 12-step runs made by the commit named in overrides.json
(16-bit; BitLinear switched at step 3, mid-way through a linear phase-in; ternary DQT switched at step 3), plus a
fingerprint of each uninterrupted run's weights at step 12. Resuming from step 6 with today's code and today's
spelling of the same configuration must reproduce those weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitflow.cli import run_training
from bitflow.lm import load_checkpoint
from tests.helpers import compose

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "compat"
RECORD = json.loads((FIXTURES / "overrides.json").read_text())

# today's spelling of each fixture run's configuration (RECORD["runs"] holds the spelling of the day it was made);
# attention=sdpa: the kernel those runs used (attention=auto now takes the matmul form on the CPU, whose bf16
# rounding differs in the last bits)
TODAY = {
    "fp16": ["quant=none", "attention=sdpa"],
    "bitlinear_phase_in": [
        "quant=ternary", "transition=default", "transition.at=3", "transition.phase_in=linear",
        "transition.phase_in_steps=6", "attention=sdpa",
    ],
    "dqt_ternary": ["quant=dqt_ternary", "transition=default", "transition.at=3", "attention=sdpa"],
}
LINEARS = [f"layers.{i}.{m}" for i in range(2) for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")]


def _layer_types(lm) -> set[str]:
    return {type(lm.model.get_submodule(name)).__name__ for name in LINEARS}


@pytest.mark.parametrize("name, types", [
    ("fp16", {"Linear"}), ("bitlinear_phase_in", {"BitLinear"}), ("dqt_ternary", {"DQTLinear"}),
])
def test_old_checkpoint_loads(name: str, types: set[str]):
    lm = load_checkpoint(FIXTURES / f"{name}.ckpt")
    assert _layer_types(lm) == types
    assert type(lm.model.get_submodule("lm_head")).__name__ == "Linear"
    if name == "bitlinear_phase_in":  # linear phase-in from step 3 over 6 steps: lambda(6) = 0.5
        layer = lm.model.get_submodule("layers.0.attn.wq")
        assert float(layer.weight_strength) == float(layer.act_strength) == 0.5
    with torch.no_grad():
        assert torch.isfinite(lm(torch.randint(0, 320, (1, 8)))).all()


@pytest.mark.parametrize("name", list(TODAY))
def test_old_checkpoint_resumes_to_the_same_weights(name: str, cache_dir: Path, tmp_path: Path):
    ckpt = tmp_path / f"{name}.ckpt"  # a copy: resuming must not write next to the fixture
    shutil.copyfile(FIXTURES / f"{name}.ckpt", ckpt)
    out = tmp_path / "run"
    common = [o for o in RECORD["common"] if o != "logger=none"]
    run_training(compose([*common, *TODAY[name], f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}",
                          f"ckpt_path={ckpt}"]))
    final = torch.load(out / "checkpoints" / "step12.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 12
    expected = RECORD["step12"][name]
    assert set(final["state_dict"]) == set(expected)
    for key, (total, abs_total) in expected.items():
        v = final["state_dict"][key].double()
        assert float(v.sum()) == pytest.approx(total, rel=1e-6, abs=1e-6), key
        assert float(v.abs().sum()) == pytest.approx(abs_total, rel=1e-6, abs=1e-6), key
