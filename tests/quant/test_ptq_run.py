"""``bitflow-ptq`` / ``bitflow.quant.ptq.ptq_checkpoint`` end to end on a really trained tiny run: the record and
its JSON, the quantized checkpoint read back by ``bitflow.lm.load_checkpoint`` and ``bitflow-eval``, exactly which
layers changed, ternary PTQ as a BitLinear checkpoint, and the bad-input errors before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bitflow.config import ConfigError
from bitflow.quant.ptq import PTQLinear, ptq_checkpoint
from bitflow.quant.ptq.rtn import rtn
from tests.helpers import TINY, TINY_LINEARS, bitflow_env, compose

KEYS = {"method", "bits", "val_loss_16bit", "val_loss_quantized", "qid"}


@pytest.fixture(scope="module")
def run_ckpt(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<run>/checkpoints/last.ckpt`` of a 6-step tiny run, with the run's ``.hydra/config.yaml`` as the
    ``bitflow`` app records it."""
    from bitflow.cli import run_training

    run = tmp_path_factory.mktemp("ptq") / "run"
    cfg = compose([*TINY, f"paths.cache_dir={cache_dir}", f"paths.output_dir={run}", "trainer.max_steps=6",
                   "trainer.val_check_interval=6", "logger=none", "trainer.precision=32-true"])
    run_training(cfg)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run / "checkpoints" / "last.ckpt"


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_gptq_writes_a_checkpoint_every_reader_takes(run_ckpt: Path, tmp_path: Path):
    from bitflow.lm import load_checkpoint
    from bitflow.quant.ptq.calibrate import mean_loss, run_data, validation_windows

    out = tmp_path / "q" / "tiny-gptq4.ckpt"
    record = ptq_checkpoint(run_ckpt, "gptq", 4, group_size=16, calib_windows=8, out=out, val_windows=4)
    assert KEYS <= set(record) and record["method"] == "gptq" and record["bits"] == 4
    assert record["qid"] == record["val_loss_quantized"] - record["val_loss_16bit"]
    assert record["layers"] == TINY_LINEARS and record["val_windows"] == 4 and record["calib_windows"] == 8
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(record))

    lm = load_checkpoint(out)
    assert [n for n, m in lm.model.named_modules() if isinstance(m, PTQLinear)] == TINY_LINEARS
    assert lm.quant_recipe.name == "ptq" and lm.quant_recipe.options.group_size == 16
    for name in TINY_LINEARS:  # the weight is exactly its codes on the grid
        layer = lm.model.get_submodule(name)
        assert int(layer.codes.max()) <= 15 and torch.equal(layer.weight.float(), layer.dequantized())
        assert not layer.weight.requires_grad
    before, after = _state(run_ckpt), _state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # (the LightningModule registers the decoder twice: as ``model`` and as its uncompiled ``_forward``)
    assert {k.split(".", 1)[1] for k in changed} == {f"{n}.weight" for n in TINY_LINEARS}  # the rest stays 16-bit
    # the quantized loss reads back exactly from the written checkpoint, on the same validation windows
    source = torch.load(run_ckpt, map_location="cpu", weights_only=False)
    from bitflow.data.tokenizer import tokenizer_from_checkpoint

    data = run_data(run_ckpt, source, tokenizer_from_checkpoint(source))
    val = validation_windows(data.plan, data.seq_len, 4)
    assert mean_loss(lm, val) == pytest.approx(record["val_loss_quantized"], abs=1e-6)
    assert mean_loss(load_checkpoint(run_ckpt), val) == pytest.approx(record["val_loss_16bit"], abs=1e-6)
    meta = torch.load(out, map_location="cpu", weights_only=False)["bitflow"]
    assert meta["ptq"]["method"] == "gptq" and meta["data"]["seq_len"] == 32 and meta["quant"]["kind"] == "ptq"
    # an already quantized checkpoint is refused
    with pytest.raises(ConfigError, match="already quantized"):
        ptq_checkpoint(out, "rtn", 4)


def test_rtn_quantizes_each_layer_to_its_nearest_grid_point(run_ckpt: Path, tmp_path: Path):
    from bitflow.lm import load_checkpoint

    out = tmp_path / "rtn3.ckpt"
    record = ptq_checkpoint(run_ckpt, "rtn", 3, symmetric=False, out=out, val_windows=2)
    assert record["calib_windows"] == 0 and record["bits"] == 3
    lm, src = load_checkpoint(out), load_checkpoint(run_ckpt)
    for name in TINY_LINEARS:
        want = rtn(src.model.get_submodule(name).weight, 3, None, symmetric=False)
        assert torch.equal(lm.model.get_submodule(name).codes, want.codes)
    assert ptq_checkpoint(run_ckpt, "rtn", 3, symmetric=False, val_windows=2)["val_loss_quantized"] == pytest.approx(
        record["val_loss_quantized"]
    )  # without out: the same numbers, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rtn3.ckpt", "rtn3.ckpt.manifest.json", "rtn3.json"]


@pytest.mark.parametrize("method", ["absmean", "absmedian"])
def test_ternary_ptq_is_the_checkpoint_a_bitlinear_switch_writes(run_ckpt: Path, tmp_path: Path, method: str):
    import bitflow.quant.functional as QF
    from bitflow.lm import load_checkpoint
    from bitflow.quant import BitLinear

    out = tmp_path / f"{method}.ckpt"
    record = ptq_checkpoint(run_ckpt, method, None, out=out, val_windows=2)
    assert record["bits"] == 1.58 and record["recipe"]["recipe"] == "bitlinear"
    lm = load_checkpoint(out)
    assert lm.quant_recipe.name == "bitlinear" and lm.quant_recipe.options.weight_scale == method
    assert lm.quant_recipe.options.act_bits == 8  # as quant=ternary switches a run
    layer = lm.model.get_submodule("layers.0.mlp.w1")
    assert isinstance(layer, BitLinear)
    values = QF.fake_quantize_weight(layer.weight, method).unique()
    assert len(values) <= 3  # BitLinear's own ternary quantizer
    hp = torch.load(out, map_location="cpu", weights_only=False)["hyper_parameters"]["quant"]
    assert hp["recipe"] == "bitlinear" and hp["weight_scale"] == method


def test_bad_settings_fail_before_any_work(tmp_path: Path):
    missing = tmp_path / "none.ckpt"
    cases = [
        (dict(method="awq", bits=4), "method='awq' is not allowed; allowed: rtn, gptq, absmean, absmedian"),
        (dict(method="gptq", bits=5), "bits=5 is not allowed; allowed: 2, 3, 4, 6, 8 with method=gptq"),
        (dict(method="absmean", bits=4), "bits=4 is not allowed; allowed: 1.58 or null with method=absmean"),
        (dict(method="absmean", bits=None, group_size=64), "group_size=64 is not allowed"),
        (dict(method="rtn", bits=4, act_order=True), "act_order=True is not allowed"),
        (dict(method="gptq", bits=4, calib_windows=0), "calib_windows=0 is not allowed"),
        (dict(method="gptq", bits=4, group_size=0), "group_size=0 is not allowed"),
        (dict(method="gptq", bits=4, percdamp=0), "percdamp=0 is not allowed"),
        (dict(method="gptq", bits=4, device="gpu7"), "device='gpu7' is not allowed"),
        (dict(method="absmean", bits=None, ternary_act_bits=1), "ternary_act_bits=1 is not supported"),
        (dict(method="gptq", bits=4), "ckpt=.* is not allowed; allowed: the path of a bitflow checkpoint"),
    ]
    for kwargs, match in cases:
        method, bits = kwargs.pop("method"), kwargs.pop("bits")
        with pytest.raises(ConfigError, match=match):
            ptq_checkpoint(missing, method, bits, **kwargs)


def test_bad_checkpoints_and_shapes_fail_before_any_work(run_ckpt: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"group_size=24 is not allowed: it does not divide the layer width"):
        ptq_checkpoint(run_ckpt, "gptq", 4, group_size=24)
    # seq_len 32 x 1 window = 32 rows, fewer than the 64 inputs of mlp.w2
    with pytest.raises(ConfigError, match=r"calib_windows=1 gives 1 x seq_len 32 = 32 calibration rows, fewer than "
                                          r"the 64 input features of layers.0.mlp.w2.*calib_windows >= 2"):
        ptq_checkpoint(run_ckpt, "gptq", 4, calib_windows=1)
    ckpt = torch.load(run_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["bitflow"]["data"]["seq_len"] == 32  # training records its data config in every checkpoint
    del ckpt["bitflow"]["data"]  # as in checkpoints written before it did
    torch.save(ckpt, tmp_path / "elsewhere.ckpt")  # not inside a run either: no data config at all
    with pytest.raises(ConfigError, match=r"elsewhere.ckpt' has no data config"):
        ptq_checkpoint(tmp_path / "elsewhere.ckpt", "rtn", 4)
    ckpt["bitflow"]["tokenizer"] = None
    torch.save(ckpt, run_ckpt.parent / "no-tokenizer.ckpt")
    with pytest.raises(ConfigError, match=r"no-tokenizer.ckpt' has no tokenizer"):
        ptq_checkpoint(run_ckpt.parent / "no-tokenizer.ckpt", "rtn", 4)
    with pytest.raises(ConfigError, match="include=.* match no nn.Linear"):
        ptq_checkpoint(run_ckpt, "rtn", 4, include=["nothing.*"])


def _ptq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = bitflow_env(Path(os.environ["BITFLOW_CACHE"]))
    env.pop("HYDRA_FULL_ERROR")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-m", "bitflow.quant.ptq.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_app_prints_the_losses_writes_beside_the_input_and_sweeps(run_ckpt: Path, tmp_path: Path):
    from bitflow.eval.run import evaluate_checkpoint

    cwd = tmp_path / "cwd"
    proc = _ptq(f"ckpt={run_ckpt}", "method=rtn", "bits=3", "val_windows=4", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16-bit" in proc.stdout and "quantized" in proc.stdout and "(QiD)" in proc.stdout
    out = run_ckpt.with_name("last-rtn3.ckpt")
    record = json.loads(out.with_suffix(".json").read_text())
    assert KEYS <= set(record) and f"{record['val_loss_16bit']:.4f}" in proc.stdout
    assert list(cwd.iterdir()) == []  # nothing in the working directory; ptq.log beside the checkpoint
    assert (run_ckpt.parent / "ptq.log").is_file()
    # bitflow-eval reads it like any other checkpoint (val-split perplexity through the run's data config)
    res = evaluate_checkpoint({"ckpt": str(out), "tasks": "none", "perplexity": "val", "tensorboard": False,
                               "device": "cpu", "output": str(tmp_path / "eval.json")})
    assert res["perplexity"]["ppl_val"]["loss"] > 0
    # -m anywhere: one job per combination
    proc = _ptq(f"ckpt={run_ckpt}", "method=rtn,gptq", "-m", "bits=4", "calib_windows=4", "val_windows=2", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_ckpt.with_name("last-rtn4.json").is_file() and run_ckpt.with_name("last-gptq4.json").is_file()
    proc = _ptq(f"ckpt={run_ckpt}", "bits=5", cwd=cwd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "config error: bits=5 is not allowed; allowed: 2, 3, 4, 6, 8 with method=gptq" in proc.stderr + proc.stdout


def test_conf_ptq_yaml_states_the_api_defaults_and_unknown_keys_fail():
    import inspect

    from bitflow.quant.ptq.run import run_settings
    from bitflow.quant.recipes.ptq import PTQQuant

    conf = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "ptq.yaml"))
    conf.pop("hydra")
    params = inspect.signature(ptq_checkpoint).parameters
    assert set(conf) == set(params) | {"out"}
    for key, value in conf.items():
        if key not in ("ckpt", "method", "out"):  # required, or decided per call
            default = params[key].default
            assert value == (list(default) if isinstance(default, tuple) else default), key
    assert (conf["percdamp"], conf["block_size"]) == (PTQQuant.percdamp, PTQQuant.block_size)
    with pytest.raises(ConfigError, match="ckpt is required"):
        run_settings({"method": "rtn"})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['bogus'\]; allowed: ckpt, method, bits, out, "):
        run_settings({"ckpt": "x.ckpt", "method": "rtn", "bogus": 1})
