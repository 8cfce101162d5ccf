"""``bitflow-export``: write a bitflow checkpoint as a Hugging Face directory or a GGUF file.

A Hydra app over conf/export.yaml (every setting, its default and what it means), with ``bitflow``'s override
syntax. Every setting and the checkpoint are checked before anything is written; the output is written to a
temporary path next to ``out`` and renamed onto it at the end, so a failure leaves nothing half-written, and an
existing ``out`` is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bitflow.cli import app_config, hydra_app
from bitflow.config import ConfigError, fail

log = logging.getLogger("bitflow.export")

EXPORT_CONFIG = "export"  # conf/export.yaml
FORMATS = ("hf", "hf_bitnet", "gguf")
GGUF_WEIGHTS = ("tq2_0", "tq1_0", "f16", "f32")
HF_WEIGHTS = ("f32", "f16", "bf16")


def export_config(settings: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """conf/export.yaml's defaults with ``settings`` on top; an unknown key is an error listing the allowed."""
    return app_config(EXPORT_CONFIG, settings)


def check_export_config(cfg: DictConfig) -> DictConfig:
    """Check every setting that needs no checkpoint; returns a plain copy. Raises :class:`ConfigError`."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.ckpt in (None, ""):
        raise ConfigError("ckpt is required: the checkpoint to export, e.g. ckpt=outputs/train/<time>/checkpoints/last.ckpt")
    if not Path(str(cfg.ckpt)).expanduser().is_file():
        fail("ckpt", cfg.ckpt, "the path of a bitflow checkpoint file (<run>/checkpoints/last.ckpt): no such file")
    if cfg.format not in FORMATS:
        fail("format", cfg.format, " | ".join(FORMATS))
    allowed = GGUF_WEIGHTS if cfg.format == "gguf" else HF_WEIGHTS if cfg.format == "hf" else ()
    if cfg.weights is not None and cfg.weights not in allowed:
        fail("weights", cfg.weights, f"with format={cfg.format}: " + (" | ".join(allowed) or "null (packed ternary)"))
    if cfg.tq_fallback not in (None, "f16", "f32"):
        fail("tq_fallback", cfg.tq_fallback, "null (refuse), f16 or f32")
    if cfg.out in (None, ""):
        raise ConfigError("out is required: the output " + ("file, e.g. out=model.gguf" if cfg.format == "gguf"
                                                              else "directory, e.g. out=exports/hf"))
    if Path(str(cfg.out)).exists() and not cfg.overwrite:
        fail("out", cfg.out, "a path that does not exist yet (or add overwrite=true to replace it)")
    if not isinstance(cfg.overwrite, bool):
        fail("overwrite", cfg.overwrite, "true or false")
    return cfg


def export_checkpoint(settings: Mapping[str, Any] | DictConfig) -> Path:
    """Check the settings, read the checkpoint, write ``out`` (atomically). Returns ``out``.

    Bad settings, a foreign checkpoint and what a format cannot express raise :class:`ConfigError` before anything
    is written."""
    cfg = check_export_config(export_config(settings))
    from bitflow.export.source import load_source

    try:
        source = load_source(Path(cfg.ckpt).expanduser())
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"ckpt={cfg.ckpt!r}: {err}") from None
    out = Path(cfg.out).expanduser()
    try:
        if cfg.format == "hf":
            from bitflow.export.hf import export_hf

            export_hf(source, out, cfg.weights or "f32", overwrite=cfg.overwrite)
        elif cfg.format == "hf_bitnet":
            from bitflow.export.hf_bitnet import export_hf_bitnet

            export_hf_bitnet(source, out, overwrite=cfg.overwrite)
        else:
            from bitflow.export.gguf_file import export_gguf

            weights = cfg.weights or ("tq2_0" if source.quant else "f16")
            export_gguf(source, out, weights, tq_fallback=cfg.tq_fallback, overwrite=cfg.overwrite)
    except ValueError as err:
        raise ConfigError(f"format={cfg.format}: {err}") from None
    print(f"exported {cfg.ckpt} -> {out}")
    return out


main = hydra_app(EXPORT_CONFIG, export_checkpoint, "The ``bitflow-export`` console script.")

if __name__ == "__main__":
    main()
