"""The settings of ``bitflow-eval`` (conf/eval.yaml, the one source of their defaults) and their checks.

The checks run before any model, Lightning or lm-eval module is imported, so a bad value fails in about a second
with one message that names the key, the value and what is allowed (a :class:`~bitflow.config.ConfigError`, which
``bitflow-eval`` prints as ``bitflow`` does: one line, no traceback unless ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bitflow.config import ConfigError, check_int, fail

EVAL_CONFIG = "eval"  # conf/eval.yaml
PRECISIONS = ("auto", "32", "bf16", "16")
NO_TASKS = ("none", "null", "")
FALLBACK_DIR = "bitflow-eval"  # under the system's temp directory


def default_eval_config() -> DictConfig:
    """conf/eval.yaml without its ``hydra`` section: every setting with its default."""
    from bitflow.cli import app_config

    return app_config(EVAL_CONFIG)


def eval_config(settings: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """The defaults of conf/eval.yaml with ``settings`` on top (Python callers of
    :func:`~bitflow.eval.run.evaluate_checkpoint`); an unknown key is an error that lists the allowed ones."""
    from bitflow.cli import app_config

    return app_config(EVAL_CONFIG, settings)


def eval_output_dir(ckpt: Any) -> str:
    """Hydra's output folder for evaluating ``ckpt`` (the ``bitflow.eval_dir`` resolver of conf/eval.yaml): the
    checkpoint's folder when the checkpoint exists, else ``<tmp>/bitflow-eval`` (a mistyped path writes nothing
    next to the user; the run then stops at the ``ckpt`` check)."""
    path = Path(str(ckpt)).expanduser() if ckpt not in (None, "") else None
    if path is not None and path.is_file():
        return str(path.resolve().parent)
    return str(Path(tempfile.gettempdir()) / FALLBACK_DIR)


def parse_batch_size(batch_size: int | str | None) -> tuple[int, bool]:
    """``batch_size`` as lm-eval and conf/eval.yaml pass it (an int, a digit string, "auto" or "auto:N") ->
    (size, auto). "auto" starts at 64 and halves on CUDA out-of-memory."""
    if batch_size is None:
        return 16, False
    text = str(batch_size)
    if text.startswith("auto"):
        return 64, True
    if isinstance(batch_size, bool) or not text.isdigit() or int(text) < 1:
        fail("batch_size", batch_size, "a positive integer or auto")
    return int(text), False


def task_list(tasks: Any) -> list[str]:
    """``tasks`` as given (a name, a comma-separated string, a list, or none) -> task names, groups expanded;
    ``[]`` for none."""
    from bitflow.eval.suites import resolve_tasks

    if tasks is None or (isinstance(tasks, str) and tasks.strip().lower() in NO_TASKS):
        return []
    items = list(tasks) if isinstance(tasks, (list, tuple, ListConfig)) else str(tasks)
    try:
        return resolve_tasks(items)
    except ValueError as err:
        raise ConfigError(f"tasks={tasks!r}: {err}") from None


def check_eval_config(cfg: DictConfig) -> DictConfig:
    """Check every ``bitflow-eval`` setting; returns a normalised copy (``tasks`` a list of task names,
    ``perplexity`` None, "val" or a list of paths, ``precision`` a string, ``limit`` an int or a fraction).

    Raises :class:`ConfigError` naming the first bad key. Task names that are neither groups nor local
    tasks are checked against lm-eval's index later (:func:`~bitflow.eval.suites.task_manager_for`), still
    before the model loads.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    ckpt = cfg.ckpt
    if ckpt in (None, ""):
        raise ConfigError(
            "ckpt is required: the checkpoint to evaluate, e.g. ckpt=outputs/train/<time>/checkpoints/last.ckpt"
        )
    if not Path(str(ckpt)).expanduser().is_file():
        raise ConfigError(
            f"ckpt={ckpt!r}: checkpoint not found; give the path of a bitflow checkpoint file "
            "(<run>/checkpoints/last.ckpt)"
        )
    cfg.ckpt = str(Path(str(ckpt)).expanduser())

    cfg.tasks = task_list(cfg.tasks)

    limit = cfg.limit
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            fail(
                "limit", limit, "examples per task (a whole number >= 1), a fraction in (0, 1), or null (all)"
            )
        if limit >= 1:
            if float(limit) != int(limit):
                fail("limit", limit, "a whole number of examples when >= 1, or a fraction in (0, 1)")
            cfg.limit = int(limit)
    check_int(
        "num_fewshot",
        cfg.num_fewshot,
        0,
        allow_none=True,
        allowed="a whole number >= 0, or null (each task's default)",
    )
    parse_batch_size(cfg.batch_size)
    cfg.batch_size = str(cfg.batch_size)
    device = cfg.device
    if device is not None and str(device) != "auto":
        import torch

        try:
            torch.device(str(device))
        except (RuntimeError, ValueError):
            fail("device", device, "cpu, cuda, cuda:N, mps, auto or null (CUDA if available)")
    if str(cfg.precision) not in PRECISIONS:
        fail("precision", cfg.precision, f"one of {', '.join(PRECISIONS)}")
    cfg.precision = str(cfg.precision)
    check_int(
        "max_length",
        cfg.max_length,
        1,
        allow_none=True,
        allowed="a positive number of tokens (at most the model's max_seq_len), or null",
    )
    if cfg.bootstrap_iters is None:
        cfg.bootstrap_iters = 0
    check_int(
        "bootstrap_iters",
        cfg.bootstrap_iters,
        0,
        allow_none=True,
        allowed="a whole number >= 0 (0 = no stderr)",
    )
    check_int(
        "stride",
        cfg.stride,
        1,
        allow_none=True,
        allowed="a positive number of tokens, or null (the context length)",
    )
    if not isinstance(cfg.tensorboard, bool):
        fail("tensorboard", cfg.tensorboard, "true or false")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        fail("seed", cfg.seed, "an integer")

    ppl = cfg.perplexity
    if ppl is not None and str(ppl) != "val":
        from bitflow.eval.perplexity import expand_paths

        paths = [str(p) for p in ppl] if isinstance(ppl, ListConfig) else str(ppl).split(",")
        try:
            expand_paths(paths)
        except FileNotFoundError as err:
            raise ConfigError(
                f"perplexity={ppl!r}: {str(err).removeprefix('perplexity: ')}; allowed: val, files, directories or globs (a list as [a,b])"
            ) from None
        cfg.perplexity = paths
    if not cfg.tasks and cfg.perplexity is None:
        raise ConfigError("tasks=none and perplexity=null: nothing to evaluate; give tasks or perplexity")
    return cfg
