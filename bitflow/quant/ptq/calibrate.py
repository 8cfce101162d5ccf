"""The data of post-training quantization, from the run the checkpoint belongs to: calibration windows from its
training split, validation windows from its validation split, and the validation loss.

The run's data config (corpus, ``seq_len``, ``val_windows``, cache) is read from the checkpoint itself
(``checkpoint["bitflow"]["data"]``, which training and ``bitflow-ptq`` write), else, for checkpoints written before
it was recorded, from the run's ``<run>/.hydra/config.yaml`` (``<run>/checkpoints/<name>.ckpt``). The splits are the ones training used
(:func:`bitflow.data.splits.plan_splits` on the token caches of the checkpoint's own tokenizer).

* Calibration: ``N`` training windows of ``seq_len`` tokens at the positions :class:`~bitflow.data.TrainWindows`
  draws for seed ``seed`` (a hash of (seed, sample index): the same windows on every machine).
* Validation: the run's fixed, evenly spaced validation windows (:class:`~bitflow.data.ValWindows`), ``val_windows``
  of them (default: the run's ``data.val_windows``); the 16-bit and the quantized model are scored on the very same
  windows, so their difference (QiD) carries no sampling noise of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bitflow.config import ConfigError, checkpoint_run_dir, run_dir_of
from bitflow.data.splits import SplitPlan

__all__ = ["RunData", "calibration_windows", "mean_loss", "run_data", "run_data_config", "validation_windows"]

log = logging.getLogger("bitflow.ptq")


def run_data_config(ckpt_path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The data config of the run that wrote ``ckpt`` as plain data (interpolations resolved where they can be);
    raises :class:`ConfigError` naming ``ckpt`` when there is none."""
    meta = ckpt.get("bitflow") or {}
    if meta.get("data"):
        return dict(meta["data"])
    run = checkpoint_run_dir(ckpt_path) or run_dir_of(ckpt_path)
    path = run / ".hydra" / "config.yaml" if run is not None else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"ckpt={str(ckpt_path)!r} has no data config: it carries none, and it is not inside a bitflow run "
            f"(<run>/checkpoints/x.ckpt with <run>/.hydra/config.yaml); post-training quantization calibrates on the "
            "run's own training data: give a checkpoint of a bitflow run"
        )
    cfg = OmegaConf.load(path)
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "source" not in data:
        raise ConfigError(f"ckpt={str(ckpt_path)!r}: the run config {path} has no data.source")
    out: dict[str, Any] = {}
    for key in data:
        try:
            value = OmegaConf.select(cfg, f"data.{key}", throw_on_resolution_failure=True)
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # an interpolation that needs Hydra's runtime (e.g. cache_dir): the default
            out[key] = None
    return out


@dataclass(frozen=True)
class RunData:
    """A run's corpus split as training saw it: ``plan`` (train/val token ranges), ``seq_len``, the default number
    of validation windows, and the data config it came from (plain data)."""

    plan: SplitPlan
    seq_len: int
    val_windows: int | None
    config: dict[str, Any]


def run_data(ckpt_path: str | Path, ckpt: dict[str, Any], tokenizer: Any) -> RunData:
    """Tokenize (or find in the cache) the run's corpus with the checkpoint's ``tokenizer`` and plan its splits."""
    import hydra

    from bitflow.data.cache import build_token_cache, default_cache_dir
    from bitflow.data.splits import plan_splits

    config = run_data_config(ckpt_path, ckpt)
    try:
        source = hydra.utils.instantiate(config["source"])
    except Exception as e:
        raise ConfigError(f"ckpt={str(ckpt_path)!r}: cannot build the run's data.source: {e}") from e
    cache_dir = Path(config["cache_dir"]).expanduser() if config.get("cache_dir") else default_cache_dir()
    train = build_token_cache(source, tokenizer, "train", cache_dir)
    val = build_token_cache(source, tokenizer, "val", cache_dir)
    seq_len = int(config["seq_len"])
    return RunData(plan_splits(source, train, val, seq_len), seq_len, config.get("val_windows"), config)


def calibration_windows(plan: SplitPlan, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` training windows ``[n, seq_len]`` (int64), at the positions training draws for ``seed``."""
    from bitflow.data.datamodule import TrainWindows

    return TrainWindows(plan.train, seq_len, batch_size=n, seed=seed).batch(0)[:, :seq_len].contiguous()


def validation_windows(plan: SplitPlan, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The fixed validation windows ``[n, seq_len + 1]`` (int64) the run validates on (``max_windows`` evenly
    spaced ones, or all for None)."""
    from bitflow.data.datamodule import ValWindows

    ds = ValWindows(plan.val, seq_len, max_windows)
    return torch.stack([ds[i] for i in range(len(ds))])


@torch.no_grad()
def mean_loss(lm: Any, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy of a :class:`~bitflow.lm.LanguageModel` over ``windows``
    (``[n, T + 1]``), as its validation computes it (:meth:`~bitflow.lm.LanguageModel.loss`), in float64."""
    was = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            total += float(lm.loss(batch.to(device), reduction="sum").double())
            count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        lm.train(was)
    return total / count
