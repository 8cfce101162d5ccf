"""Post-training quantization speed: GPTQ of whole model presets, and of one 1024x1024 layer next to gptqmodel.

    python -m bitflow.bench.ptq [--quick]          (or: python -m bitflow.bench --only ptq)

Two tables:

1. Seconds to GPTQ every targeted layer of the ``tiny`` and ``spectra_99m`` presets at 4 bits (per channel, and with
   groups of 128 where the widths allow), sequentially block by block as ``bitflow-ptq`` does
   (:meth:`~bitflow.quant.recipes.ptq.PTQRecipe.convert`): capturing the block inputs, accumulating the Hessians,
   the GPTQ column loops, the block re-runs. Weights: random init (seed 0); calibration: 128 windows of 256 random
   token ids (the time does not depend on what the tokens say). Vocabulary 8192.
2. Seconds of GPTQ of one 1024x1024 layer at 4 bits given its Hessian (from 128 x 256 rows): bitflow's
   :func:`~bitflow.quant.ptq.gptq.gptq` and gptqmodel's per-layer ``GPTQ.hf_quantize`` (when installed), plus
   bitflow's Hessian accumulation for those rows.

``--quick`` (for checking the script): only ``tiny`` with 8 windows, a 256x256 layer.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bitflow.bench.common import print_table, time_per_call
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant.ptq.gptq import HessianAccumulator, gptq
from bitflow.quant.recipes import recipe_from_config

VOCAB = 8192
PRESETS = ("tiny", "spectra_99m")


def preset(name: str) -> LlamaConfig:
    """The model preset ``conf/model/<name>.yaml`` as composed by ``bitflow model=<name>``."""
    from hydra import compose, initialize_config_dir

    from bitflow.cli import CONFIG_DIR
    from bitflow.config import to_plain

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "paths.output_dir=."])
    return LlamaConfig.from_dict({**to_plain(cfg.model), "vocab_size": VOCAB})


def model_rows(quick: bool) -> list[dict[str, Any]]:
    """Table 1: whole-model GPTQ seconds per preset and grid."""
    rows = []
    windows, seq_len = (8, 64) if quick else (128, 256)
    for name in PRESETS[:1] if quick else PRESETS:
        cfg = preset(name)
        calib = torch.randint(0, VOCAB, (windows, seq_len), generator=torch.Generator().manual_seed(0))
        for group_size in (None, 128):
            if group_size and (cfg.d_model % group_size or cfg.d_ff % group_size):
                continue
            torch.manual_seed(0)
            model = Llama(cfg).eval()
            recipe = recipe_from_config({"recipe": "ptq", "method": "gptq", "bits": 4, "group_size": group_size})
            start = time.perf_counter()
            names = recipe.convert(model, calibration=calib, batch_size=8).names
            seconds = time.perf_counter() - start
            rows.append({"preset": name, "non-emb params M": model.num_parameters() / 1e6, "layers": len(names),
                         "grid": f"4-bit, {'group ' + str(group_size) if group_size else 'per channel'}",
                         "calibration": f"{windows}x{seq_len}", "seconds": seconds})
    return rows


def layer_rows(quick: bool) -> list[dict[str, Any]]:
    """Table 2: one square layer, GPTQ given the Hessian, bitflow and gptqmodel."""
    d = 256 if quick else 1024
    rows_in = 128 * 256
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)
    x = torch.randn(rows_in, d, generator=g) @ mix
    w = torch.randn(d, d, generator=g) * 0.02

    def accumulate() -> None:
        acc = HessianAccumulator(d)
        for chunk in x.split(8 * 256):
            acc.add(chunk)

    acc = HessianAccumulator(d)
    acc.add(x)
    h = acc.hessian()
    out = []
    t_acc = time_per_call(accumulate, warmup=1, iters=1, repeats=2)
    for group_size in (None, 128):
        t_ours = time_per_call(lambda gs=group_size: gptq(w, h, 4, gs), warmup=1, iters=1, repeats=3)
        row = {"layer": f"{d}x{d}", "grid": f"4-bit, {'group ' + str(group_size) if group_size else 'per channel'}",
               "Hessian accumulation s": t_acc, "bitflow GPTQ s": t_ours}
        theirs = gptqmodel_seconds(w, x, group_size)
        row["gptqmodel GPTQ s"] = theirs if theirs is not None else "not installed"
        row["bitflow / gptqmodel"] = t_ours / theirs if theirs else ""
        out.append(row)
    return out


def gptqmodel_seconds(w: torch.Tensor, x: torch.Tensor, group_size: int | None) -> float | None:
    """Best of 3 seconds of gptqmodel's per-layer ``hf_quantize`` (Hessian accumulated before, not timed), or None
    when gptqmodel is not installed."""
    try:
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ
    except ImportError:
        return None
    best = float("inf")
    for _ in range(3):
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        cfg = QuantizeConfig(bits=4, group_size=group_size or -1, sym=True, desc_act=False, act_group_aware=False)
        q = GPTQ(layer, cfg)
        q.quantizer.configure(perchannel=True)
        q.add_batch(x.unsqueeze(0), None)
        start = time.perf_counter()
        q.hf_quantize(blocksize=128, percdamp=0.01, group_size=group_size or -1, actorder=False,
                      act_group_aware=False)
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Both tables; rows carry a ``table`` key naming theirs."""
    models = model_rows(quick)
    print_table("GPTQ of whole presets (random-init weights, sequential block by block, as bitflow-ptq)", models)
    layers = layer_rows(quick)
    print_table("GPTQ of one layer given its Hessian (128 x 256 calibration rows)", layers)
    return [{"table": "models", **r} for r in models] + [{"table": "layer", **r} for r in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny only, 8 windows, a 256x256 layer")
    run(quick=parser.parse_args().quick)


if __name__ == "__main__":
    main()
