"""Thin Hydra entry points. ``bitflow`` (train) composes conf/train.yaml, checks it, builds and fits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from bitflow.config import (
    ConfigError,
    check_config,
    check_output_dir,
    checkpoint_run_dir,
    config_errors,
    explicit_keys,
    fit_short_run,
    register_resolvers,
    resolve_ckpt_path,
    resolve_precision,
    to_plain,
)

register_resolvers()  # before Hydra resolves hydra.run.dir

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


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the constructor's own error (e.g. a missing data path) unwrapped."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError, TypeError)):
            raise e.__cause__ from None
        raise


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """Every callback config under ``callbacks`` (a dict of ``_target_`` entries), plus the precision transition
    that applies the ``quant`` recipe (from the first step, or at ``transition.at``)."""
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from bitflow.callbacks import build_transition
    from bitflow.callbacks.fault import GracefulStop, NonFiniteGuard

    out = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True) and not any(
        isinstance(c, ProgressBar) for c in out
    ):
        # Lightning's own default is Rich's bar whenever `rich` is importable (many packages pull it in); bitflow's
        # console (log lines through tqdm.write, `ktok/s=` on the bar) is built for the tqdm one, so ask for it
        out.append(TQDMProgressBar())
    transition = build_transition(cfg)
    if transition is not None:
        out.append(transition)
    fault = {k: v for k, v in to_plain(cfg.get("fault") or {}).items() if k not in SLURM_KEYS}
    return [*out, GracefulStop(), NonFiniteGuard(**fault)]


SLURM_KEYS = ("slurm_auto_requeue", "requeue_signal")


def cluster_plugins(cfg: DictConfig) -> list[Any]:
    """Lightning's ``SLURMEnvironment`` with ``fault.slurm_auto_requeue`` and ``fault.requeue_signal`` when running
    under SLURM (Lightning detects it from the environment); nothing elsewhere."""
    import signal

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    name = str(OmegaConf.select(cfg, "fault.requeue_signal", default="SIGUSR1"))  # checked by check_config
    requeue = bool(OmegaConf.select(cfg, "fault.slurm_auto_requeue", default=True))
    return [SLURMEnvironment(auto_requeue=requeue, requeue_signal=getattr(signal, name))]


def check_resume(cfg: DictConfig) -> None:
    """Before resuming from ``ckpt_path``: refuse a checkpoint of another model shape, and a change that reshapes
    the LR schedule (``trainer.max_steps``, ``scheduler.*``) unless ``allow_schedule_change=true``: a resumed run
    continues the run it resumes."""
    from bitflow.lm import CHECKPOINT_KEY, check_same_model, read_checkpoint
    from bitflow.models.llama import LlamaConfig
    from bitflow.tasks import task_name

    ckpt = read_checkpoint(cfg.ckpt_path, mmap=True)
    saved_model = ckpt[CHECKPOINT_KEY]["model_config"]
    saved_task = ckpt[CHECKPOINT_KEY].get("task", "causal_lm")
    if saved_task != task_name(cfg):
        raise ConfigError(f"resuming {cfg.ckpt_path}: the checkpoint was trained with task={saved_task}, this run has "
                          f"task={task_name(cfg)}; resume with the task (and model) of the original run")
    # the vocabulary comes from the tokenizer (the checkpoint carries it); every other field from this config
    if task_name(cfg) == "causal_lm":  # other tasks: run_training compares the built model (the data sizes it)
        check_same_model(
            LlamaConfig.from_dict({**to_plain(cfg.model), "vocab_size": saved_model["vocab_size"]}).to_dict(),
            saved_model,
        )
    check_resume_quant(cfg, ckpt)
    saved_steps = ckpt[CHECKPOINT_KEY].get("max_steps")
    run = checkpoint_run_dir(cfg.ckpt_path)
    run_config = run / ".hydra" / "config.yaml" if run is not None else None
    if saved_steps is None and run_config is not None and run_config.is_file():  # written before max_steps was stored
        saved_steps = OmegaConf.select(OmegaConf.load(run_config), "trainer.max_steps", default=None)
    saved = {f"scheduler.{k}": v for k, v in (ckpt.get("hyper_parameters", {}).get("scheduler") or {}).items()}
    if saved_steps is not None:
        saved["trainer.max_steps"] = saved_steps
    now = {f"scheduler.{k}": v for k, v in to_plain(cfg.scheduler).items()}
    now["trainer.max_steps"] = cfg.trainer.max_steps
    changed = [f"{k}={now.get(k)!r} (checkpoint: {v!r})" for k, v in saved.items() if now.get(k) != v]
    if changed and not cfg.get("allow_schedule_change", False):
        raise ConfigError(
            f"resuming {cfg.ckpt_path} with a different LR schedule: {', '.join(changed)}; that reshapes the "
            "schedule mid-run. Use the checkpoint's values, or add allow_schedule_change=true to do it on purpose"
        )
    if changed:
        log.warning("resuming with a changed LR schedule (allow_schedule_change=true): %s", ", ".join(changed))


def check_resume_quant(cfg: DictConfig, ckpt: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with another quantization (``quant``) or another switch step
    (``transition``) than it was trained with: the model, its optimizer state and the schedule would not match."""
    from bitflow.config import planned_switch_step, quant_and_transition
    from bitflow.lm import recipe_config_of
    from bitflow.quant.recipes import recipe_from_config

    saved_config = recipe_config_of(ckpt)
    saved = recipe_from_config(saved_config)
    recipe, _ = quant_and_transition(cfg)
    if saved != recipe:
        if saved is None or recipe is None or saved.name != recipe.name:
            was = "quant=none (16-bit)" if saved is None else f"quant.recipe={saved.name}"
            now = "quant=none (16-bit)" if recipe is None else f"quant.recipe={recipe.name}"
            what = f"{was}, this run has {now}"
        else:
            a, b = saved.config(), recipe.config()
            what = "other quantization options (" + ", ".join(
                f"quant.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ) + ")"
        raise ConfigError(
            f"resuming {cfg.ckpt_path}: the checkpoint was trained with {what}; resume with the quant option (and "
            "quant.* overrides) of the original run"
        )
    states = [v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("PrecisionTransition")]
    auto = OmegaConf.select(cfg, "transition.at") == "auto"  # the checkpoint holds the step the run chose
    if states and isinstance(states[0], dict) and "switch_step" in states[0] and not auto:
        was_step, now_step = states[0]["switch_step"], planned_switch_step(cfg)
        if was_step != now_step:
            raise ConfigError(
                f"resuming {cfg.ckpt_path}: the checkpoint's run switches precision at step {was_step}, this run at "
                f"step {now_step}; resume with the transition (transition=..., transition.at) of the original run"
            )


def prepare_config(cfg: DictConfig, explicit: set[str] | None = None) -> None:
    """Everything about the config that can be decided or refused before anything is built, in place: short-run
    scaling of step-valued defaults, ``trainer.precision: auto``, every value check, the resume checks.
    Raises :class:`~bitflow.config.ConfigError`. ``explicit``: keys set on the command line (default: Hydra's)."""
    explicit = explicit_keys() if explicit is None else explicit
    if "path" in cfg.model.keys():  # model=hf: a pretrained Hugging Face directory sets the architecture and tokenizer
        from bitflow.export.hf import resolve_hf_model

        try:
            resolve_hf_model(cfg)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
    with config_errors():
        changes = fit_short_run(cfg, explicit)  # a bad trainer.max_steps changes nothing; check_config names it
        if changes:
            log.info(
                "short run (trainer.max_steps=%d): %s; set them explicitly to override",
                cfg.trainer.max_steps, ", ".join(changes),
            )
        precision, why = resolve_precision(cfg.trainer.precision, cfg.trainer.get("accelerator", "auto"))
        if cfg.trainer.precision == "auto":
            cfg.trainer.precision = precision
            log.info("trainer.precision=auto -> %s: %s", precision, why)
        resolve_ckpt_path(cfg)  # last / auto / a requeued SLURM job -> the newest checkpoint of the run
        check_config(cfg)
        if cfg.get("ckpt_path") is not None:
            check_resume(cfg)
        check_output_dir(cfg)  # last: it creates the directory, which a refused config should not leave behind


def plan_layers(cfg: DictConfig) -> list[str]:
    """The layers the ``quant`` recipe will convert, planned on the model's shape before any data is tokenized (a
    weightless copy on the meta device; the vocabulary size does not change which layers match). Raises
    ``ValueError`` for a filter that matches no layer. ``[]`` for a 16-bit run."""
    import torch

    from bitflow.models.llama import Llama, LlamaConfig
    from bitflow.quant.recipes import recipe_from_config
    from bitflow.tasks import plan_layers as plan_task_layers
    from bitflow.tasks import task_name

    if task_name(cfg) != "causal_lm":
        return plan_task_layers(cfg)
    recipe = recipe_from_config(to_plain(cfg.get("quant")))
    if recipe is None:
        return []
    with torch.device("meta"):
        shape = Llama(LlamaConfig.from_dict({**to_plain(cfg.model), "vocab_size": cfg.data.get("vocab_size") or 1}))
    return recipe.plan(shape)


def run_training(cfg: DictConfig, explicit: set[str] | None = None, prepared: bool = False) -> dict[str, float]:
    """Check the config (unless ``prepared``: :func:`prepare_config` ran already), build data, model, callbacks,
    logger and trainer from it, then fit. Returns the final metrics. Bad config values raise
    :class:`~bitflow.config.ConfigError` before the data is tokenized.

    A SIGTERM/SIGINT raises :class:`~bitflow.callbacks.fault.RunInterrupted` (``last.ckpt`` written), a
    non-finite step :class:`~bitflow.callbacks.fault.NonFiniteError`; ``fault.on_nonfinite=rollback`` resumes
    here from the run's newest checkpoint with a lower LR."""
    from bitflow.callbacks.fault import RollbackRequested
    from bitflow.checkpoint import newest_checkpoint

    if not prepared:
        prepare_config(cfg, explicit)
    rollbacks = 0
    while True:
        try:
            return _fit(cfg, rollbacks)
        except RollbackRequested as r:
            ckpt = newest_checkpoint(cfg.paths.output_dir)
            if ckpt is None:
                from bitflow.callbacks.fault import NonFiniteError

                raise NonFiniteError(f"{r}; but the run has no checkpoint yet to roll back to", r.step, None) from r
            log.warning("%s: %s", r, ckpt)
            rollbacks = r.rollbacks
            with open_dict(cfg):
                cfg.ckpt_path = str(ckpt)


def _fit(cfg: DictConfig, rollbacks: int = 0) -> dict[str, float]:
    """One ``trainer.fit`` of :func:`run_training` (``rollbacks``: how many the run has had: scales its LR)."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bitflow.callbacks.fault import GracefulStop, NonFiniteGuard
    from bitflow.checkpoint import AtomicCheckpointIO
    from bitflow.lm import LanguageModel
    from bitflow.threads import apply_threads

    apply_threads(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with config_errors("data", [*cfg.data, *(cfg.data.get("source") or {})]):
        datamodule = instantiate(cfg.data)
    with config_errors("transition", list(cfg.get("transition") or {})):
        callbacks = build_callbacks(cfg)
    with config_errors():
        plan_layers(cfg)
        datamodule.prepare_data()  # tokenizer + token cache; a no-op once cached
    from bitflow.tasks import build_module, task_name

    if task_name(cfg) == "causal_lm":
        model = LanguageModel(
            model={**to_plain(cfg.model), "vocab_size": datamodule.vocab_size},
            optimizer=to_plain(cfg.optimizer),
            scheduler=to_plain(cfg.scheduler),
            compile=cfg.get("compile", False),
            tokenizer_json=datamodule.tokenizer_json,
            quant=to_plain(cfg.get("quant")),
            attention=cfg.get("attention", "auto"),
        )
    else:  # the task's LightningModule (bitflow.tasks), sized by the data
        with config_errors():
            model = build_module(cfg, datamodule)
    model.data_config = to_plain(cfg.data)  # recorded in every checkpoint (bitflow-ptq calibrates on it)
    if cfg.get("init_from") and cfg.get("ckpt_path") is None:  # model=hf: start from the pretrained weights
        from bitflow.export.hf import load_hf_weights

        load_hf_weights(model.model, cfg.init_from)
        log.info("model: weights loaded from %s", cfg.init_from)
    if cfg.get("ckpt_path") is not None:  # a checkpoint of another model fails here, not mid-restore
        from bitflow.lm import CHECKPOINT_KEY, check_same_model, read_checkpoint

        meta = read_checkpoint(cfg.ckpt_path, mmap=True)[CHECKPOINT_KEY]
        with config_errors():
            check_same_model(model.model.config.to_dict(), meta["model_config"])
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    for callback in callbacks:
        if isinstance(callback, NonFiniteGuard):
            callback.rollbacks = max(callback.rollbacks, rollbacks)
    with config_errors():
        plugins = [AtomicCheckpointIO(), *cluster_plugins(cfg)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    if trainer.is_global_zero:
        n = model.model.num_parameters(non_embedding=False)
        log.info("model: %.2fM parameters; output: %s", n / 1e6, cfg.paths.output_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException as e:
        raise interrupted(trainer, cfg) from e
    finally:
        for callback in callbacks:
            if isinstance(callback, GracefulStop):
                callback.restore()
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def interrupted(trainer: Any, cfg: DictConfig) -> Exception:
    """The :class:`~bitflow.callbacks.fault.RunInterrupted` of a trainer that a signal stopped, with the command
    that resumes it."""
    from bitflow.callbacks.fault import GracefulStop, RunInterrupted

    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    name = (stop.signal_name if stop else None) or "SIGTERM"
    ckpt = stop.checkpoint if stop else None
    run = cfg.paths.output_dir
    if ckpt is None:
        return RunInterrupted(f"stopped by {name} at step {trainer.global_step} before any step completed; "
                              "nothing to resume", name, None, trainer.global_step)
    return RunInterrupted(
        f"stopped by {name} after step {trainer.global_step}; saved {ckpt}. Resume with the same command plus "
        f"`hydra.run.dir={run} ckpt_path=last` (or ckpt_path={ckpt})", name, ckpt, trainer.global_step,
    )


def record_config(cfg: DictConfig) -> Path | None:
    """Rewrite Hydra's ``.hydra/config.yaml`` of this run with the config as :func:`prepare_config` settled it
    (``trainer.precision`` resolved, short-run scaling applied), so the run's record and ``bitflow-report`` show
    what the run used; the command line stays in ``overrides.yaml``. Rank 0 only; no-op outside Hydra's app."""
    from hydra.core.hydra_config import HydraConfig

    from bitflow.io import atomic_write_text

    if not HydraConfig.initialized() or int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return None
    return atomic_write_text(
        Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir) / "config.yaml", OmegaConf.to_yaml(cfg)
    )


def record_choice(key: str, value: Any) -> Path | None:
    """Write a value the run decided while training (e.g. ``transition.chosen_at`` of ``transition.at=auto``) into
    its ``.hydra/config.yaml``, so that the run's record and ``bitflow-report`` show it. No-op outside Hydra's app."""
    from hydra.core.hydra_config import HydraConfig

    from bitflow.io import atomic_write_text

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    hydra_cfg = HydraConfig.get()
    path = Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir) / "config.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, key, value, force_add=True)
    return atomic_write_text(path, OmegaConf.to_yaml(cfg))


def report_config_error(error: ConfigError) -> None:
    """Print a config error as one clean message (the traceback only with ``HYDRA_FULL_ERROR=1``) and exit 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    log.error("config error: %s", error)
    raise SystemExit(2)


def app_config(config_name: str, settings: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` without its ``hydra`` section (every setting with its default) and ``settings``
    on top: the config a Python caller of a :func:`hydra_app` passes instead of command-line overrides. An unknown
    key is a :class:`ConfigError` listing the allowed ones."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / f"{config_name}.yaml")
    cfg.pop("hydra", None)
    settings = dict(settings or {}) if not isinstance(settings, DictConfig) else settings
    unknown = [k for k in settings if k not in cfg and k != "hydra"]
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; allowed: {', '.join(map(str, cfg))}")
    return OmegaConf.merge(cfg, {k: v for k, v in settings.items() if k != "hydra"})


def hydra_app(config_name: str, task: Callable[[DictConfig], Any], doc: str) -> Callable[[], None]:
    """The console script of a bitflow Hydra app over ``conf/<config_name>.yaml`` (``bitflow-eval``,
    ``bitflow-ptq``, ...): ``-m`` allowed anywhere among the overrides, and a bad setting (``ConfigError``) is one
    "config error: ..." line with exit code 2 (the traceback only with ``HYDRA_FULL_ERROR=1``)."""

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def _app(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except ConfigError as err:
            report_config_error(err)

    def main() -> None:
        sys.argv[1:] = hydra_argv(sys.argv[1:])
        _app()

    main.__doc__ = doc
    return main


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    """``bitflow``: train a model. Returns the final val/loss (for Hydra sweepers that optimise it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        prepare_config(cfg)  # before the slow imports: a bad value fails within a second or two
    except ConfigError as e:
        report_config_error(e)
    record_config(cfg)
    from bitflow.console import setup_console

    setup_console()  # warning filters, Lightning's console handlers undone, Lightning's adverts dropped
    from bitflow.callbacks.fault import NonFiniteError, RunInterrupted

    try:
        metrics = run_training(cfg, prepared=True)
    except ConfigError as e:
        report_config_error(e)
    except (RunInterrupted, NonFiniteError) as e:  # a scheduler must not take a stopped run for a finished one
        log.error("%s", e)
        raise SystemExit(e.exit_code) from None
    return metrics.get("val/loss")


def train() -> None:
    """The ``bitflow`` console script: Hydra's app over conf/train.yaml, with ``-m`` allowed anywhere."""
    from bitflow.console import tune_allocator

    tune_allocator()  # glibc malloc thresholds, before torch allocates (BITFLOW_MALLOC_TUNING=0 turns it off)
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    _train()


if __name__ == "__main__":
    train()
