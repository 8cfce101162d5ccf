"""Checks and resolutions of a composed ``bitflow`` config that run before anything is built.

* :func:`check_config` rejects bad values with a :class:`ConfigError` that names the full config key (``data.batch_size``,
  ``optimizer.lr``), the bad value and what is allowed: within a second or two of start-up, before any data is
  tokenized or any model is built.
* :func:`resolve_precision` turns ``trainer.precision: auto`` into the fastest safe precision of this machine.
* :func:`fit_short_run` scales the step-valued defaults (LR warmup, validation and logging intervals) down for a
  short run, so ``bitflow trainer.max_steps=N`` works for any N >= 1; explicit values that cannot fit still fail.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("bitflow")

__all__ = [
    "PRECISIONS",
    "ConfigError",
    "check_config",
    "check_int",
    "check_output_dir",
    "config_errors",
    "explicit_keys",
    "fail",
    "fit_short_run",
    "planned_switch_step",
    "qualify",
    "quant_and_transition",
    "resolve_ckpt_path",
    "resolve_precision",
    "run_dir_of",
    "to_plain",
]

# Lightning's precision strings (as strings: a bare 16 or 32 is the template pitfall), plus bitflow's "auto"
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")
OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "fused")


class ConfigError(ValueError):
    """A bad config value, found before training. ``bitflow`` prints it as one line, without a traceback."""


def qualify(message: str, section: str, names: Iterable[str], owner: str | None = None) -> str:
    """``message`` with each bare field name of ``names`` written as its config key ``section.name``.

    Library code names its own arguments (``warmup_steps=500``, ``LlamaConfig.d_model``); a user reads config keys
    (``scheduler.warmup_steps=500``, ``model.d_model``). ``owner`` is a class prefix to replace (``LlamaConfig``).
    """
    if owner:
        message = message.replace(f"{owner}.", f"{section}.")
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.]){re.escape(name)}\b(?=\s*[=<>]|\s+must|\s+is)", f"{section}.{name}", message)
    return message


@contextmanager
def config_errors(section: str | None = None, names: Iterable[str] = (), owner: str | None = None) -> Iterator[None]:
    """Turn the ``ValueError``/``TypeError``/``FileNotFoundError`` of a check into a :class:`ConfigError`, with the
    field names of ``section`` qualified (see :func:`qualify`)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as e:
        message = str(e) if not section else qualify(str(e), section, names, owner)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", message) if section else None
        if unexpected:  # a key the constructor does not take
            message = f"{section}.{unexpected.group(1)} is not a key of {section}: {message}"
        raise ConfigError(message) from e


def fail(key: str, value: Any, allowed: str) -> None:
    """Raise the one :class:`ConfigError` format: ``<key>=<value> is not allowed; allowed: <allowed>``."""
    raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def check_int(key: str, value: Any, minimum: int, allow_none: bool = False, allowed: str | None = None) -> None:
    """:func:`fail` unless ``value`` is an integer >= ``minimum`` (or None, with ``allow_none``); ``allowed``
    replaces the default description of what is allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, value, allowed or f"an integer >= {minimum}" + (" or null" if allow_none else ""))


def _number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        if math.isfinite(high):
            allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        else:
            allowed = f"a number {'>' if low_open else '>='} {low:g}"
        fail(key, value, allowed)


def to_plain(node: Any) -> Any:
    """A config node as plain Python data (interpolations resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# ------------------------------------------------------------------------------------------------ precision
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX) and torch uses it (its CPU capability, which
    ``ATEN_CPU_CAPABILITY`` can lower, is AVX-512 or above): only then is bf16 autocast faster than fp32.

    On AVX2-only CPUs (most laptops) a bf16 matmul is emulated: measured ~170x slower than fp32 for a 1024^2 matmul
    and 15x slower for a training step of the default model.
    """
    import torch

    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def native_bf16_gpu() -> tuple[bool, str]:
    """``(native bf16, GPU name)`` of this process's CUDA device (``LOCAL_RANK``: each DDP rank asks before
    Lightning picks its device, and touching GPU 0 from every rank would put a context of each on it). Emulated
    bf16 (pre-Ampere GPUs) does not count: it is the slow case."""
    import torch

    device = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name(device)


def resolve_precision(precision: Any, accelerator: Any = "auto") -> tuple[str, str]:
    """``(precision, why)``: ``auto`` becomes ``bf16-mixed`` on a CUDA GPU with bf16 support or on a CPU with native
    bf16 (AVX-512 BF16 / AMX), else ``32-true``. Any other value is returned as it is."""
    if precision != "auto":
        return str(precision), "set in the config"
    import torch

    use_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_gpu:
        native, name = native_bf16_gpu()
        if native:
            return "bf16-mixed", f"GPU {name} supports bf16"
        return "32-true", f"GPU {name} has no native bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    if native_bf16_cpu():
        return "bf16-mixed", f"CPU ({capability}) has native bf16"
    return "32-true", f"CPU ({capability}) has no native bf16, where bf16 is far slower than fp32"


# ------------------------------------------------------------------------------------------------ short runs
def explicit_keys() -> set[str]:
    """Config keys set on this run's command line (Hydra's task overrides), e.g. ``{"scheduler.warmup_steps"}``.
    Empty when Hydra's job machinery is not running (e.g. ``hydra.compose`` in a test)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def fit_short_run(cfg: DictConfig, explicit: set[str] = frozenset()) -> list[str]:
    """Scale the step-valued defaults down to a short run, in place; returns what changed (``"key a -> b"``).

    With ``trainer.max_steps = N``: ``scheduler.warmup_steps`` becomes N // 10 when it is more than a quarter of the
    run; ``trainer.val_check_interval`` and ``trainer.log_every_n_steps`` become N when longer than the run. Keys
    in ``explicit`` (set on the command line) are kept: if they cannot fit, :func:`check_config` says so.
    """
    steps = cfg.trainer.get("max_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        return []
    changes = []

    def scale(section: str, key: str, too_long: bool, new: int) -> None:
        node = cfg.get(section)
        full = f"{section}.{key}"
        if node is None or full in explicit or key not in node:
            return
        old = node.get(key)
        if isinstance(old, int) and not isinstance(old, bool) and too_long and old != new:
            with open_dict(node):
                node[key] = new
            changes.append(f"{full} {old} -> {new}")

    warmup = cfg.get("scheduler", {}).get("warmup_steps")
    if isinstance(warmup, int):
        scale("scheduler", "warmup_steps", warmup > steps // 4, steps // 10)
    for key in ("val_check_interval", "log_every_n_steps"):
        value = cfg.trainer.get(key)
        if isinstance(value, int):
            scale("trainer", key, value > steps, steps)
    return changes


# ------------------------------------------------------------------------------------------------ checks
def check_trainer(trainer: Mapping[str, Any]) -> None:
    check_int("trainer.max_steps", trainer.get("max_steps"), 1)
    precision = trainer.get("precision")
    if str(precision) not in PRECISIONS and precision not in ("32", "16", "bf16", "64"):
        fail("trainer.precision", precision, ", ".join(PRECISIONS) + " (auto = bf16-mixed where native, else 32-true)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float):
        _number("trainer.val_check_interval", interval, 0.0, 1.0, low_open=True)
    else:
        check_int("trainer.val_check_interval", interval, 1, allow_none=True)
    check_int("trainer.log_every_n_steps", trainer.get("log_every_n_steps", 1), 1)
    check_int("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), 1)
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        _number("trainer.gradient_clip_val", clip, 0.0)


def check_optimizer(optimizer: Mapping[str, Any]) -> None:
    """AdamW's values, checked as ``torch.optim.AdamW`` would (which only complains inside ``trainer.fit``)."""
    unknown = sorted(set(optimizer) - set(OPTIMIZER_KEYS))
    if unknown:
        raise ConfigError(f"unknown optimizer key(s) {unknown}; allowed: {', '.join(OPTIMIZER_KEYS)} (remove "
                          f"{', '.join('optimizer.' + k for k in unknown)})")
    _number("optimizer.lr", optimizer.get("lr"), 0.0, low_open=True)
    betas = optimizer.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        fail("optimizer.betas", betas, "a pair [beta1, beta2], each in [0, 1)")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            fail(f"optimizer.betas[{i}]", beta, "a number in [0, 1)")
    _number("optimizer.eps", optimizer.get("eps", 1e-8), 0.0, low_open=True)
    _number("optimizer.weight_decay", optimizer.get("weight_decay", 0.0), 0.0)
    if optimizer.get("fused") not in (None, True, False):
        fail("optimizer.fused", optimizer.get("fused"), "null, true or false")


def check_data(data: Mapping[str, Any]) -> None:
    check_int("data.seq_len", data.get("seq_len"), 1)
    check_int("data.batch_size", data.get("batch_size"), 1)
    check_int("data.num_workers", data.get("num_workers", 0), 0)
    check_int("data.val_windows", data.get("val_windows"), 1, allow_none=True)
    tokenizer = data.get("tokenizer_path")
    if tokenizer is not None and not Path(str(tokenizer)).expanduser().is_file():
        raise ConfigError(f"data.tokenizer_path={tokenizer!r} does not exist; give a tokenizer.json or null")
    if tokenizer is None:
        vocab = data.get("vocab_size")
        check_int("data.vocab_size", vocab, 257)


FAULT_KEYS = ("on_nonfinite", "max_consecutive_skips", "max_rollbacks", "rollback_lr_factor", "slurm_auto_requeue",
              "requeue_signal")
NONFINITE_POLICIES = ("stop", "skip", "rollback")


def check_fault(fault: Mapping[str, Any]) -> None:
    """The ``fault`` group (conf/fault/default.yaml): the non-finite policy and SLURM requeue options."""
    import signal

    unknown = sorted(set(fault) - set(FAULT_KEYS))
    if unknown:
        fail(f"fault.{unknown[0]}", fault[unknown[0]], f"the keys {', '.join(FAULT_KEYS)}")
    if fault.get("on_nonfinite", "stop") not in NONFINITE_POLICIES:
        fail("fault.on_nonfinite", fault.get("on_nonfinite"), ", ".join(NONFINITE_POLICIES))
    check_int("fault.max_consecutive_skips", fault.get("max_consecutive_skips", 10), 1)
    check_int("fault.max_rollbacks", fault.get("max_rollbacks", 3), 0)
    _number("fault.rollback_lr_factor", fault.get("rollback_lr_factor", 0.5), 0.0, 1.0, low_open=True)
    if fault.get("slurm_auto_requeue", True) not in (True, False):
        fail("fault.slurm_auto_requeue", fault.get("slurm_auto_requeue"), "true or false")
    name = fault.get("requeue_signal", "SIGUSR1")
    if not isinstance(getattr(signal, str(name), None), signal.Signals) or not str(name).startswith("SIG"):
        fail("fault.requeue_signal", name, "a signal name such as SIGUSR1, SIGUSR2, SIGTERM")


def check_config(cfg: DictConfig) -> None:
    """Reject bad values before anything is built, with a :class:`ConfigError` naming the key, the value and what
    is allowed. Cheap: reads the config, imports no training code but the dataclasses that validate themselves."""
    check_trainer(cfg.trainer)
    max_steps = cfg.trainer.max_steps
    data, model = cfg.data, cfg.model
    from bitflow.tasks import check_family, check_task_config

    with config_errors():
        task = check_family(cfg)  # the task and its model family (task=..., model=...)
    if task.name != "causal_lm":
        with config_errors():
            check_task_config(cfg)
    else:
        check_data(data)
    seq_len, context = data.get("seq_len"), model.get("max_seq_len")
    if task.name == "causal_lm" and isinstance(context, int) and seq_len > context:
        raise ConfigError(
            f"data.seq_len={seq_len} is longer than the model's context model.max_seq_len={context}; "
            f"use data.seq_len<={context} or raise model.max_seq_len"
        )
    check_optimizer(to_plain(cfg.optimizer))
    from bitflow.models.compile import check_compile
    from bitflow.models.llama import check_attention

    with config_errors():
        check_compile(cfg.get("compile", False))
        check_attention(cfg.get("attention", "auto"))
    if task.name != "causal_lm" and cfg.get("attention", "auto") != "auto":
        fail("attention", cfg.get("attention"), f"auto with task={task.name} (the key picks the decoder's causal "
             "attention kernel; the other families use torch's scaled_dot_product_attention)")
    check_fault(to_plain(cfg.get("fault")) or {})
    threads = cfg.get("threads", "auto")
    if threads != "auto":
        check_int("threads", threads, 1, allowed="auto (the cores this process may use / concurrent runs) or an "
                  "integer >= 1")
    from bitflow.schedules import LRSchedule

    scheduler = to_plain(cfg.scheduler)
    with config_errors("scheduler", [*scheduler, "name"]):
        try:
            LRSchedule(total_steps=max_steps, **scheduler)
        except TypeError as e:  # an unknown key
            import dataclasses

            known = {f.name for f in dataclasses.fields(LRSchedule)} - {"total_steps"}
            unknown = sorted(set(scheduler) - known)
            if unknown:
                fail(f"scheduler.{unknown[0]}", scheduler[unknown[0]], f"the keys {', '.join(sorted(known))}")
            raise ConfigError(f"scheduler: {e}") from e
        except ValueError as e:
            raise ValueError(str(e).replace("total_steps=", "trainer.max_steps=")) from e
    from bitflow.models.llama import LlamaConfig

    fields = to_plain(model)
    import dataclasses

    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LlamaConfig)} - {"_target_"})
    if unknown and task.name == "causal_lm":  # (the other families' fields: bitflow.tasks.check_task_config)
        known = ", ".join(f.name for f in dataclasses.fields(LlamaConfig) if f.name != "vocab_size")
        fail(f"model.{unknown[0]}", fields[unknown[0]], f"the LlamaConfig fields {known}")
    with config_errors("model", fields, owner="LlamaConfig"):
        # the vocabulary size comes from the tokenizer later; a placeholder validates every other field now
        if task.name == "causal_lm":  # (the other tasks' models were checked by check_task_config)
            LlamaConfig.from_dict({**fields, "vocab_size": 1})
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path={ckpt!r} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    with config_errors():
        t0 = planned_switch_step(cfg)  # quant options, quant/transition combination, transition.at against the run
        recipe, trans = quant_and_transition(cfg)
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if "ModelParallelStrategy" in strategy and recipe is not None and recipe.name == "dqt" and trans is not None:
        raise ConfigError(
            "trainer=fsdp with a transition to quant.recipe='dqt' is not supported: the switch replaces each float "
            "weight with int8 codes, and FSDP2 cannot release a Parameter it shards (it would keep gathering the "
            "float weights every step); train DQT from the first step (transition=none) or use trainer=ddp"
        )
    if "ModelParallelStrategy" in strategy and OmegaConf.select(cfg, "transition.gap_every", default=0):
        fail("transition.gap_every", OmegaConf.select(cfg, "transition.gap_every"),
             "0 with trainer=fsdp (the online gap evaluates unsharded weights; use trainer=ddp to measure it)")
    if t0 and recipe is not None and not recipe.keeps_parameters and strategy.startswith("ddp") and (
        "find_unused_parameters_true" not in strategy
    ):
        raise ConfigError(
            f"trainer.strategy={strategy!r} with a mid-run switch (step {t0}) to quant.recipe={recipe.name!r}: the "
            "switch removes the float weights that DDP synchronises; use "
            "trainer.strategy=ddp_find_unused_parameters_true (or quantize from the first step)"
        )


# ------------------------------------------------------------------------------------------------ quant, transition
NEEDS_QUANT = (
    "a precision transition needs a quantization to switch to, but quant=none (16-bit); pick one, e.g. "
    "quant=ternary or quant=dqt_ternary, or drop transition=default"
)


def training_recipes() -> list[str]:
    """The names of the registered recipes a run can train with (``quant.recipe``)."""
    from bitflow.quant.recipes import RECIPES

    return [name for name, cls in RECIPES.items() if cls.trains]


def quant_and_transition(cfg: DictConfig) -> tuple[Any, dict[str, Any] | None]:
    """What (the ``quant`` recipe, None = 16-bit) and when (the ``transition`` arguments, None = no transition
    selected: a recipe then applies from the first step) of a run, checked without Lightning.

    Raises ``ValueError`` naming the key for bad ``quant.*`` options, ``transition.*`` options set without
    ``transition=default`` (e.g. ``+transition.at=0.5``), another ``transition._target_``, or a transition with
    ``quant=none``. :func:`bitflow.callbacks.build_transition` builds the callback from this.
    """
    from bitflow.quant.recipes import recipe_from_config

    recipe = recipe_from_config(to_plain(OmegaConf.select(cfg, "quant")))
    if recipe is not None and not recipe.trains:
        fail("quant.recipe", recipe.name, f"a recipe that trains ({', '.join(training_recipes())}); {recipe.name} is "
             f"applied once to a trained checkpoint: bitflow-ptq ckpt=... method=...")
    node = OmegaConf.select(cfg, "transition")
    trans = dict(to_plain(node)) if node is not None else {}
    target = trans.pop("_target_", None)
    if target is None:
        if trans:
            key = sorted(trans)[0]
            raise ValueError(
                f"transition.{key}={trans[key]!r} is set, but no transition is selected; add transition=default "
                f"(e.g. `bitflow quant=ternary transition=default transition.{key}={trans[key]}`)"
            )
        return recipe, None
    if str(target).rsplit(".", 1)[-1] != "PrecisionTransition":
        fail("transition._target_", target, "bitflow.callbacks.PrecisionTransition")
    if recipe is None and trans.get("quant") is None:
        raise ValueError(NEEDS_QUANT)
    if trans.get("at") == "auto" and not trans.get("gap_every"):
        fail("transition.at", "auto", "auto only with transition.gap_every > 0 (the rule reads the gap)")
    return recipe, trans


def planned_switch_step(cfg: DictConfig) -> int | None:
    """The step at which the run's ``quant`` applies: 0 without a transition, ``transition.at`` resolved with a
    transition, None for a 16-bit run (or a transition that never switches, or ``at: auto``, which the run decides;
    its bounds ``min_at``/``max_at`` are checked here)."""
    from bitflow.schedules import resolve_switch_step

    recipe, trans = quant_and_transition(cfg)
    if trans is None:
        return 0 if recipe is not None else None
    if trans.get("at") == "auto":
        for key in ("min_at", "max_at"):
            resolve_switch_step(trans.get(key), cfg.trainer.max_steps, key=f"transition.{key}")
        return None
    return resolve_switch_step(trans.get("at", 0.5), cfg.trainer.max_steps, key="transition.at")


# ------------------------------------------------------------------------------------------------ run directory
def run_dir_of(ckpt: str | Path) -> Path | None:
    """The run directory of ``<run>/checkpoints/<name>.ckpt``, or None for a checkpoint elsewhere."""
    ckpt = Path(ckpt).expanduser().resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def checkpoint_run_dir(ckpt_path: Any) -> Path | None:
    """The bitflow run a checkpoint belongs to: :func:`run_dir_of` when it holds ``.hydra/`` or ``tb/`` (a resume
    continues there), else None."""
    run = run_dir_of(str(ckpt_path)) if ckpt_path else None
    return run if run is not None and any((run / marker).is_dir() for marker in (".hydra", "tb")) else None


# ckpt_path values that name no file: the newest checkpoint of the run directory (``last``: one must exist; ``auto``:
# start fresh when there is none)
RESUME_KEYWORDS = ("last", "auto")


def newest_run(runs_dir: str | Path) -> Path | None:
    """The run directory under ``runs_dir`` (e.g. ``outputs/train``) whose newest checkpoint is the newest, or None."""
    from bitflow.checkpoint import newest_checkpoint

    runs_dir = Path(runs_dir)
    found = [(c, d) for d in runs_dir.iterdir() if d.is_dir() for c in [newest_checkpoint(d)] if c is not None] if (
        runs_dir.is_dir()) else []
    return max(found, key=lambda cd: cd[0].stat().st_mtime_ns)[1] if found else None


def _run_dir(ckpt_path: Any, default: str) -> str:
    if ckpt_path in RESUME_KEYWORDS:  # `bitflow ckpt_path=last`: continue the newest run of outputs/<task_name>
        run = newest_run(Path(default).parent)
        return str(run) if run is not None else default
    run = checkpoint_run_dir(ckpt_path)
    return str(run) if run is not None else default


def _hydra_subdir(ckpt_path: Any, stamp: str, mode: Any = "RUN", run_dir: Any = None) -> str:
    # a resumed run keeps the original .hydra/ (its overrides are what bitflow-report reads) and adds its own; a
    # multirun job resuming a checkpoint has a new job directory of its own, so its configs go to .hydra as usual
    if str(mode).upper().endswith("MULTIRUN"):
        return ".hydra"
    if ckpt_path in RESUME_KEYWORDS:
        resuming = run_dir is not None and (Path(str(run_dir)) / ".hydra").is_dir()
    else:
        resuming = checkpoint_run_dir(ckpt_path) is not None
    return f".hydra/resume_{stamp}" if resuming else ".hydra"


def check_output_dir(cfg: DictConfig) -> None:
    """Refuse an output directory (``paths.output_dir``) that cannot be created or written, before training: a
    run would otherwise fail at its first checkpoint. Nothing is created here (a refused run leaves no directory):
    the nearest existing folder on the path must be a writable directory."""
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
    if output_dir is None:
        return
    path = Path(str(output_dir)).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(
            f"paths.output_dir={str(output_dir)!r} cannot be written ({problem}); give a directory this "
            "user can write (hydra.run.dir=... for the bitflow command)"
        )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """Turn ``ckpt_path=last|auto`` into the newest checkpoint of the run directory ``paths.output_dir``, in place.

    ``ckpt_path: null`` in a directory that holds an ``hpc_ckpt_<n>.ckpt`` (a SLURM job requeued by Lightning's
    ``SLURMEnvironment(auto_requeue=True)``: it runs again in the same directory) resumes the same way, as Lightning
    itself would, so bitflow's resume checks run on it. Raises :class:`ConfigError` for ``last`` without any
    checkpoint. Returns the path (None: a fresh start)."""
    from bitflow.checkpoint import newest_checkpoint

    ckpt = cfg.get("ckpt_path")
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
    requeued = ckpt is None and output_dir is not None and any(Path(str(output_dir)).glob("hpc_ckpt_*.ckpt"))
    if ckpt not in RESUME_KEYWORDS and not requeued:
        return ckpt
    newest = newest_checkpoint(output_dir) if output_dir is not None else None
    if newest is None and ckpt == "last":
        raise ConfigError(
            f"ckpt_path=last: no checkpoint in the run directory {output_dir} (checkpoints/*.ckpt or hpc_ckpt_*.ckpt); "
            "give the run with hydra.run.dir=<run>, a checkpoint file, or ckpt_path=auto to start fresh when there "
            "is none"
        )
    with open_dict(cfg):
        cfg.ckpt_path = str(newest) if newest is not None else None
    log.info("ckpt_path=%s -> %s", ckpt if ckpt is not None else "null (requeued SLURM job)",
             newest if newest is not None else "no checkpoint yet: starting fresh")
    return cfg.ckpt_path


def register_resolvers() -> None:
    """``${bitflow.run_dir:...}`` and ``${bitflow.hydra_subdir:...}`` for conf/hydra/default.yaml: resuming from
    ``<run>/checkpoints/x.ckpt`` continues in ``<run>`` (one TensorBoard curve, one cli.log)."""
    for name, fn in (("bitflow.run_dir", _run_dir), ("bitflow.hydra_subdir", _hydra_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
