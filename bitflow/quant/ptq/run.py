"""``bitflow-ptq``: post-training quantization of a checkpoint, its validation loss before and after, and a new
checkpoint that every bitflow tool reads like any other.

    bitflow-ptq ckpt=outputs/train/<time>/checkpoints/last.ckpt method=gptq bits=4 group_size=128
    bitflow-ptq ckpt=... method=rtn bits=3 symmetric=false          # round-to-nearest, asymmetric grid
    bitflow-ptq ckpt=... method=absmedian                            # ternary, as BitLinear (a quant=ternary switch)
    bitflow-ptq -m ckpt=... method=gptq,rtn bits=2,3,4,8             # a sweep: one job per combination

A Hydra app over conf/ptq.yaml (every setting, its default and meaning), with the override syntax of ``bitflow``.
The quantized checkpoint goes to ``out`` (default: beside the input, ``<stem>-<method><bits>[-g<G>][-asym][-act].ckpt``),
the record to the same name with ``.json``; Hydra's log (``ptq.log``) goes beside the input.

Python: :func:`ptq_checkpoint` (``bitflow.quant.ptq.ptq_checkpoint``) does the same and returns the record.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bitflow.cli import hydra_app
from bitflow.config import ConfigError, check_int, fail
from bitflow.eval.config import eval_output_dir
from bitflow.io import atomic_write_text
from bitflow.quant.ptq.rtn import BITS
from bitflow.quant.recipes.ptq import METHODS as NBIT_METHODS

__all__ = ["METHODS", "TERNARY_BITS", "TERNARY_METHODS", "default_output", "main", "ptq_checkpoint"]

log = logging.getLogger("bitflow.ptq")

TERNARY_METHODS = ("absmean", "absmedian")  # BitLinear's ternary weight scales (bitlinear recipe)
METHODS = (*NBIT_METHODS, *TERNARY_METHODS)
TERNARY_BITS = 1.58  # log2(3) ~ 1.585, as the papers write it; what the record's `bits` says for ternary
DEFAULT_BITS = 4  # of rtn and gptq

# conf/ptq.yaml's hydra.run.dir: the checkpoint's folder (as for bitflow-eval)
if not OmegaConf.has_resolver("bitflow.ptq_dir"):
    OmegaConf.register_new_resolver("bitflow.ptq_dir", eval_output_dir)


def _method_bits(method: Any, bits: Any) -> float | int:
    """The bit width of ``method`` (``bits`` checked; None = the method's default)."""
    if method not in METHODS:
        fail("method", method, ", ".join(METHODS))
    if method in TERNARY_METHODS:
        if bits is not None and not (isinstance(bits, (int, float)) and not isinstance(bits, bool)
                                     and abs(bits - TERNARY_BITS) < 0.01):
            fail("bits", bits, f"{TERNARY_BITS} or null with method={method} (ternary)")
        return TERNARY_BITS
    if bits is None:
        return DEFAULT_BITS
    if isinstance(bits, bool) or bits not in BITS:
        fail("bits", bits, f"{', '.join(map(str, BITS))} with method={method}")
    return int(bits)


def check_settings(
    method: Any, bits: Any, group_size: Any, symmetric: Any, act_order: Any, calib_windows: Any, seed: Any,
    val_windows: Any, percdamp: Any = 0.01, block_size: Any = 128, batch_size: Any = 8,
) -> float | int:
    """Check the settings that need no checkpoint; returns the bit width. Raises :class:`ConfigError` naming the
    key, the value and what is allowed."""
    bits = _method_bits(method, bits)
    check_int("group_size", group_size, 1, allow_none=True, allowed="a positive int dividing the layer width, or null (per channel)")
    for key, value in (("symmetric", symmetric), ("act_order", act_order)):
        if not isinstance(value, bool):
            fail(key, value, "true or false")
    if method in TERNARY_METHODS:
        for key, value, default in (("group_size", group_size, None), ("symmetric", symmetric, True),
                                    ("act_order", act_order, False)):
            if value != default:
                fail(key, value, f"{default!r} with method={method}: ternary PTQ is BitLinear's per-tensor "
                     f"{method} scale (set {key} only with method=rtn or gptq)")
    if act_order and method != "gptq":
        fail("act_order", act_order, "false with method=rtn (act-order is a GPTQ option)")
    check_int("calib_windows", calib_windows, 1)
    check_int("seed", seed, 0)
    check_int("val_windows", val_windows, 1, allow_none=True, allowed="a positive int, or null (the run's data.val_windows)")
    check_int("batch_size", batch_size, 1)
    check_int("block_size", block_size, 1)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (math.isfinite(percdamp) and percdamp > 0):
        fail("percdamp", percdamp, "a positive number (a fraction of the mean Hessian diagonal, default 0.01)")
    return bits


def default_output(ckpt: str | Path, method: str, bits: float | int, group_size: int | None = None,
                   symmetric: bool = True, act_order: bool = False) -> Path:
    """``<dir>/<stem>-<method><bits>[-g<G>][-asym][-act].ckpt`` beside ``ckpt`` (``-absmean`` for ternary)."""
    ckpt = Path(ckpt)
    name = method if method in TERNARY_METHODS else f"{method}{bits}"
    name += f"-g{group_size}" if group_size else ""
    name += "" if symmetric else "-asym"
    name += "-act" if act_order else ""
    return ckpt.with_name(f"{ckpt.stem}-{name}.ckpt")


def _recipe(method: str, bits: float | int, group_size: int | None, symmetric: bool, act_order: bool,
            percdamp: float, block_size: int, include: Any, exclude: Any, ternary_act_bits: int | None) -> Any:
    """The quantization recipe of a method: ``ptq`` (rtn, gptq) or ``bitlinear`` (ternary)."""
    from bitflow.quant.recipes import recipe_from_config

    filt = {"include": _plain(include), "exclude": _plain(exclude)}
    if method in TERNARY_METHODS:
        config = {"recipe": "bitlinear", "weight_scale": method, "act_bits": ternary_act_bits, **filt}
    else:
        config = {"recipe": "ptq", "method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                  "act_order": act_order, "percdamp": float(percdamp), "block_size": block_size, **filt}
    try:
        return recipe_from_config(config, key="ptq")
    except ValueError as e:
        message = str(e).replace("ptq.", "")
        if method in TERNARY_METHODS:  # BitLinear's option, under this app's name for it
            message = message.replace("act_bits", "ternary_act_bits").replace("act_qmax", "ternary_act_qmax")
        raise ConfigError(message) from None


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def ptq_checkpoint(
    ckpt: str | Path,
    method: str,
    bits: int | float | None = None,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    act_order: bool = False,
    calib_windows: int = 128,
    seed: int = 0,
    out: str | Path | None = None,
    val_windows: int | None = None,
    percdamp: float = 0.01,
    block_size: int = 128,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = ("lm_head",),
    ternary_act_bits: int | None = 8,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """Quantize the 16-bit checkpoint ``ckpt`` after training and measure what it costs.

    ``method``: ``rtn`` or ``gptq`` (``bits`` in 2, 3, 4, 6, 8; default 4; ``group_size`` None = per output
    channel; ``symmetric``; GPTQ's ``act_order``, ``percdamp``, ``block_size``), or ``absmean``/``absmedian``:
    ternary as BitLinear computes it (``bits`` None or 1.58; 8-bit activations as a ``quant=ternary`` switch, or
    ``ternary_act_bits=None`` for weight-only). ``include``/``exclude``: the layer filter of training (the LM head
    stays 16-bit by default). GPTQ calibrates on ``calib_windows`` windows of the run's training split (seeded by
    ``seed``), sequentially block by block; both losses are measured on the same ``val_windows`` fixed validation
    windows (default: the run's ``data.val_windows``).

    Returns the record ``{method, bits, val_loss_16bit, val_loss_quantized, qid, group_size, symmetric, act_order,
    calib_windows, val_windows, seq_len, seed, layers, n_params, tokens_seen, global_step, checkpoint, output,
    seconds, ...}`` with ``qid = val_loss_quantized - val_loss_16bit``. With ``out``, writes the quantized model
    there as a bitflow checkpoint and the record beside it (``<out stem>.json``); nothing is written otherwise.
    Bad settings raise :class:`~bitflow.config.ConfigError` before any work.
    """
    start = time.perf_counter()
    bits = check_settings(method, bits, group_size, symmetric, act_order, calib_windows, seed, val_windows,
                          percdamp, block_size, batch_size)
    recipe = _recipe(method, bits, group_size, symmetric, act_order, percdamp, block_size, include, exclude,
                     ternary_act_bits)
    import torch

    try:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError, TypeError):
        fail("device", device, "cpu, cuda, cuda:N, ... or null (CUDA if available, else the CPU)")

    from bitflow.checkpoint import CHECKPOINT_KEY, atomic_torch_save
    from bitflow.data.tokenizer import tokenizer_from_checkpoint
    from bitflow.lm import load_checkpoint, read_checkpoint, recipe_config_of
    from bitflow.quant.ptq.calibrate import (
        calibration_windows,
        mean_loss,
        run_data,
        run_data_config,
        validation_windows,
    )

    path = Path(ckpt).expanduser()
    if not path.is_file():
        fail("ckpt", str(ckpt), "the path of a bitflow checkpoint file (<run>/checkpoints/last.ckpt)")
    try:
        source = read_checkpoint(path)
    except ValueError as e:
        raise ConfigError(f"ckpt={str(ckpt)!r}: {e}") from None
    meta = source[CHECKPOINT_KEY]
    if not meta.get("tokenizer"):
        raise ConfigError(f"ckpt={str(ckpt)!r} has no tokenizer (checkpoint['bitflow']['tokenizer']); "
                          "post-training quantization needs the run's tokenizer to read its data")
    run_data_config(path, source)  # no data config: an error now, before any work
    if recipe_config_of(source) is not None and meta.get("quant"):
        raise ConfigError(
            f"ckpt={str(ckpt)!r} is already quantized (quant.recipe={recipe_config_of(source).get('recipe')}); "
            "post-training quantization starts from a 16-bit checkpoint"
        )
    lm = load_checkpoint(path)
    try:
        names = recipe.plan(lm.model)  # the layer filter, a group size that does not divide a layer's width
    except ValueError as e:
        raise ConfigError(str(e).replace("quant.", "")) from None
    data = run_data(path, source, tokenizer_from_checkpoint(source))
    if method == "gptq":
        widest = max(names, key=lambda n: lm.model.get_submodule(n).in_features)
        width = lm.model.get_submodule(widest).in_features
        rows = calib_windows * data.seq_len
        if rows < width:
            raise ConfigError(
                f"calib_windows={calib_windows} gives {calib_windows} x seq_len {data.seq_len} = {rows} calibration "
                f"rows, fewer than the {width} input features of {widest}: GPTQ's Hessian would be singular; "
                f"allowed: calib_windows >= {math.ceil(width / data.seq_len)} (more is better: 128 by default)"
            )
    lm = lm.to(dev)
    n_val = val_windows if val_windows is not None else data.val_windows
    val = validation_windows(data.plan, data.seq_len, n_val)
    loss16 = mean_loss(lm, val, batch_size)
    log.info("16-bit validation loss %.4f on %d windows", loss16, len(val))

    if method == "gptq":
        calib = calibration_windows(data.plan, calib_windows, data.seq_len, seed).to(dev)
        recipe.convert(lm.model, calibration=calib, batch_size=batch_size)
    else:
        recipe.convert(lm.model)
    lm.quant_recipe = recipe
    lm.hparams["quant"] = recipe.config()
    lossq = mean_loss(lm, val, batch_size)
    info = getattr(recipe, "info", {})
    record: dict[str, Any] = {
        "method": method,
        "bits": bits,
        "val_loss_16bit": loss16,
        "val_loss_quantized": lossq,
        "qid": lossq - loss16,
        "group_size": group_size,
        "symmetric": symmetric,
        "act_order": act_order,
        "recipe": recipe.config(),
        "calib_windows": calib_windows if method == "gptq" else 0,
        "val_windows": len(val),
        "seq_len": data.seq_len,
        "seed": seed,
        "layers": names,
        "dampening_retries": {n: i.retries for n, i in info.items() if i.retries},
        "fallback_rtn": [n for n, i in info.items() if i.fallback_rtn],
        "n_params": lm.model.num_parameters(non_embedding=True),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
        "global_step": int(source.get("global_step", 0)),
        "checkpoint": str(path.resolve()),
        "output": None,
        "seconds": None,
    }
    if out is not None:
        out = Path(out).expanduser()
        record["output"] = str(out.resolve())
    record["seconds"] = time.perf_counter() - start
    if out is not None:
        lm = lm.to("cpu")
        written = {k: source[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in source}
        written["state_dict"] = lm.state_dict()
        written["hyper_parameters"] = {**source.get("hyper_parameters", {}), "quant": recipe.config()}
        lm.on_save_checkpoint(written)
        written[CHECKPOINT_KEY].update(max_steps=meta.get("max_steps"), data=data.config, ptq=dict(record))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(written, out)
        atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return record


def run_settings(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Check conf/ptq.yaml's settings, quantize, print the losses and the files written; returns the record."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    allowed = ["ckpt", "method", "bits", "out", *inspect.signature(ptq_checkpoint).parameters]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; allowed: {', '.join(dict.fromkeys(allowed))}")
    ckpt = cfg.pop("ckpt", None)
    if ckpt in (None, ""):
        raise ConfigError("ckpt is required: the 16-bit checkpoint to quantize, e.g. "
                          "ckpt=outputs/train/<time>/checkpoints/last.ckpt")
    method, bits = cfg.pop("method", None), cfg.pop("bits", None)
    full_bits = check_settings(method, bits, cfg.get("group_size"), cfg.get("symmetric", True),
                               cfg.get("act_order", False), cfg.get("calib_windows", 128), cfg.get("seed", 0),
                               cfg.get("val_windows"))
    out = cfg.pop("out", None) or default_output(ckpt, method, full_bits, cfg.get("group_size"),
                                                 cfg.get("symmetric", True), cfg.get("act_order", False))
    record = ptq_checkpoint(ckpt, method, bits, out=out, **cfg)
    what = f"{method} {record['bits']}-bit" + (f", group {record['group_size']}" if record["group_size"] else "")
    print(f"validation loss ({record['val_windows']} windows of {record['seq_len']} tokens):")
    print(f"  16-bit     {record['val_loss_16bit']:.4f}")
    print(f"  quantized  {record['val_loss_quantized']:.4f}  ({what}, {len(record['layers'])} layers)")
    print(f"  difference {record['qid']:+.4f}  (QiD)")
    print(f"checkpoint: {record['output']}")
    print(f"record: {Path(record['output']).with_suffix('.json')}")
    return record


main = hydra_app("ptq", run_settings, "The ``bitflow-ptq`` console script: Hydra's app over conf/ptq.yaml.")

if __name__ == "__main__":
    main()
