"""Thin Hydra entry points. ``bitflow`` (train) composes conf/train.yaml, checks it, builds and fits."""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bitflow")

# conf/ at the repository root is installed as the package `bitflow.conf`, so this works for editable and regular
# installs alike, whatever the working directory is.
CONFIG_DIR = str(files("bitflow.conf"))


MULTIRUN_FLAGS = ("-m", "--multirun")


def hydra_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``-m``/``--multirun`` moved to the front, so it may stand anywhere among the overrides.

    Hydra's argparse parser takes the overrides as one positional list: ``bitflow +experiment=x -m seed=1,2`` would
    fail with "unrecognized arguments". Every Hydra entry point of bitflow calls this on ``sys.argv[1:]``.
    """
    flags = [a for a in argv if a in MULTIRUN_FLAGS]
    return flags[:1] + [a for a in argv if a not in MULTIRUN_FLAGS]


def _container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_config(cfg: DictConfig) -> None:
    """Reject bad values before anything is built, with a message naming the value and what is allowed."""
    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"trainer.max_steps must be a positive integer, got {max_steps!r}")
    seq_len, context = cfg.data.get("seq_len"), cfg.model.get("max_seq_len")
    if seq_len is not None and context is not None and seq_len > context:
        raise ValueError(
            f"data.seq_len={seq_len} is longer than the model's context model.max_seq_len={context}; "
            f"use data.seq_len<={context} or raise model.max_seq_len"
        )
    if cfg.get("ckpt_path") is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    from bitflow.schedules import LRSchedule

    LRSchedule(total_steps=max_steps, **_container(cfg.scheduler))
    # the model's own validation (LlamaConfig.__post_init__) runs here, before the data is tokenized
    from bitflow.models.llama import LlamaConfig

    LlamaConfig.from_dict({**_container(cfg.model), "vocab_size": cfg.data.get("vocab_size") or 8192})


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the constructor's own error (e.g. a missing data path) unwrapped."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise e.__cause__ from None
        raise


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """Every callback config under ``callbacks`` (a dict of ``_target_`` entries), plus the transition."""
    out = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if cfg.get("transition") and "_target_" in cfg.transition:
        out.append(instantiate(cfg.transition, _convert_="all"))
    return out


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, callbacks, logger and trainer from a composed config, then fit. Returns final metrics."""
    import lightning as L

    from bitflow.checkpoint import AtomicCheckpointIO
    from bitflow.lm import LanguageModel

    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # tokenizer + token cache; a no-op once cached
    model = LanguageModel(
        model={**_container(cfg.model), "vocab_size": datamodule.vocab_size},
        optimizer=_container(cfg.optimizer),
        scheduler=_container(cfg.scheduler),
        compile=cfg.get("compile", False),
        tokenizer_json=datamodule.tokenizer_json,
    )
    if cfg.get("ckpt_path") is not None:  # a checkpoint of another model fails here, not mid-restore
        from bitflow.lm import CHECKPOINT_KEY, check_same_model, read_checkpoint

        meta = read_checkpoint(cfg.ckpt_path, mmap=True)[CHECKPOINT_KEY]
        check_same_model(model.model.config.to_dict(), meta["model_config"])
    callbacks = build_callbacks(cfg)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if trainer.is_global_zero:
        n = model.model.num_parameters(non_embedding=False)
        log.info("model: %.2fM parameters; output: %s", n / 1e6, cfg.paths.output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    """``bitflow``: train a model. Returns the final val/loss (for Hydra sweepers that optimise it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from bitflow.console import setup_console

    setup_console()  # warning filters, Lightning's console handlers undone, Lightning's adverts dropped
    metrics = run_training(cfg)
    return metrics.get("val/loss")


def train() -> None:
    """The ``bitflow`` console script: Hydra's app over conf/train.yaml, with ``-m`` allowed anywhere."""
    import sys

    from bitflow.console import tune_allocator

    tune_allocator()  # glibc malloc thresholds, before torch allocates (BITFLOW_MALLOC_TUNING=0 turns it off)
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    _train()


if __name__ == "__main__":
    train()
