"""``bitflow-eval``: evaluate a checkpoint on lm-eval tasks (and perplexity), print a table, save and log it.

A Hydra app over conf/eval.yaml (every setting, its default and what it means), with the override syntax of
``bitflow``; ``-m``/``--multirun`` may stand anywhere among the overrides:

    bitflow-eval ckpt=outputs/train/<time>/checkpoints/last.ckpt             # the offline `local` tasks
    bitflow-eval ckpt=... tasks=paper11 batch_size=auto device=cuda           # the paper's 11 tasks
    bitflow-eval ckpt=... tasks=[piqa,sciq,local] limit=200 perplexity=val    # a list, + val-split perplexity
    bitflow-eval ckpt=... tasks=none perplexity='data/*.txt' stride=128       # perplexity of text files
    bitflow-eval -m ckpt=a.ckpt,b.ckpt tasks=local limit=4                    # one job per checkpoint

Results go to ``eval_results.json`` next to the checkpoint (merged with earlier results of the same checkpoint
and step) and, for a checkpoint inside a run directory (``<run>/checkpoints/x.ckpt``), into that run's
TensorBoard (``<run>/tb``) as ``eval/<task>/<metric>`` at the checkpoint's global step. Hydra's log (``eval.log``)
is appended next to the checkpoint too: nothing is written to the working directory.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bitflow.cli import hydra_app
from bitflow.config import ConfigError, run_dir_of
from bitflow.eval.config import EVAL_CONFIG, check_eval_config, eval_config, eval_output_dir
from bitflow.io import atomic_write_text

log = logging.getLogger("bitflow.eval")

RESULTS_FILE = "eval_results.json"

# conf/eval.yaml's hydra.run.dir: the checkpoint's folder (see eval_output_dir)
if not OmegaConf.has_resolver("bitflow.eval_dir"):
    OmegaConf.register_new_resolver("bitflow.eval_dir", eval_output_dir)


def flatten_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results["results"]`` -> ``{task: {metric: value}}``: "acc,none" becomes "acc", a metric
    under another filter becomes "<metric>_<filter>"; stderr entries are kept as "<metric>_stderr" when
    numeric."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                row[name] = float(value)
        out[task] = row
    return out


def run_tasks(
    lm: Any,
    tasks: str | list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 0,
    seed: int = 1234,
    manager: Any = None,
) -> dict[str, Any]:
    """Evaluate an lm-eval model (e.g. :class:`~bitflow.eval.harness.BitflowLM`) on task groups/names.

    Returns lm-eval's results dict (``results``, ``versions``, ``n-shot``, ``higher_is_better``,
    ``config``...). Bad task names raise ValueError before anything runs. ``manager``: a TaskManager from
    :func:`~bitflow.eval.suites.task_manager_for` to reuse (indexing tasks takes time).
    """
    import lm_eval

    from bitflow.eval.suites import resolve_tasks, task_manager_for

    names = resolve_tasks(tasks)
    manager = manager if manager is not None else task_manager_for(names)
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of the examples
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # lm-eval returns None on non-zero ranks
        return {"results": {}}
    return results


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """global_step, epoch and tokens_seen of a checkpoint, read without loading its tensors (mmap)."""
    from bitflow.checkpoint import safe_load

    ckpt = safe_load(path, mmap=True)
    meta = ckpt.get("bitflow", {}) if isinstance(ckpt, dict) else {}
    return {
        "global_step": int(ckpt.get("global_step", 0)),
        "epoch": int(ckpt.get("epoch", 0)),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
    }


def tensorboard_scalars(metrics: dict[str, dict[str, float]], prefix: str = "eval") -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"eval/<task>/<metric>": v}`` (stderr entries left out)."""
    return {
        f"{prefix}/{task}/{metric}": value
        for task, row in metrics.items()
        for metric, value in row.items()
        if not metric.endswith("_stderr") and "_stderr_" not in metric and metric != "tokens"
    }


def log_to_tensorboard(log_dir: str | Path, scalars: dict[str, float], step: int) -> Path:
    """Append scalars to the TensorBoard event files in ``log_dir`` (a new events file next to the run's)."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in sorted(scalars.items()):
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return log_dir


def write_results(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` to ``path``; if the file already holds results of the same checkpoint at the same
    step, keep its other tasks (a later `tasks=paper11` adds to an earlier `tasks=local`)."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            old = {}
        same = (
            old.get("checkpoint_path") == record["checkpoint_path"]
            and old.get("global_step") == record["global_step"]
        )
        if same:
            record = {
                **record,
                "results": {**old.get("results", {}), **record["results"]},
                "perplexity": {**old.get("perplexity", {}), **record["perplexity"]},
            }
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _perplexity(lm: Any, cfg: DictConfig) -> dict[str, dict[str, float]]:
    from bitflow.eval.perplexity import perplexity_of_files, perplexity_of_split

    kw = {"stride": cfg.stride, "batch_size": lm.batch_size, "device": lm.device, "precision": lm.precision}
    if cfg.perplexity == "val":
        source, cache_dir = _run_data_config(cfg.ckpt)
        res = perplexity_of_split(
            lm.model, lm.tokenizer, source, "val", cache_dir, max_len=lm.max_length, **kw
        )
        return {"ppl_val": res}
    files = perplexity_of_files(lm.model, lm.tokenizer, list(cfg.perplexity), max_len=lm.max_length, **kw)
    return {"ppl_files": files["total"]}


def _run_data_config(ckpt: str) -> tuple[Any, Any]:
    """The corpus source and cache dir of the run the checkpoint belongs to (``<run>/.hydra/config.yaml``), or
    the default stdlib corpus and cache."""
    run = run_dir_of(ckpt)
    cfg_path = run / ".hydra" / "config.yaml" if run else None
    if cfg_path is None or not cfg_path.is_file():
        log.info("no run config next to %s: perplexity on the default stdlib validation split", ckpt)
        return None, None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_path)
    source = hydra.utils.instantiate(cfg.data.source)
    try:
        cache_dir = OmegaConf.select(cfg, "data.cache_dir")
    except Exception:  # an interpolation that needs Hydra's runtime: fall back to the default cache
        cache_dir = None
    return source, cache_dir


def evaluate_checkpoint(settings: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Check the settings (conf/eval.yaml's keys; missing ones take its defaults), check the task names, load
    the checkpoint, run the tasks and perplexity, print the table, write the JSON, log TensorBoard.

    Bad settings, unknown tasks and unreadable checkpoints raise :class:`~bitflow.config.ConfigError`
    before any task runs. Returns the record written to the JSON file.
    """
    given = eval_config(settings)
    cfg = check_eval_config(given)
    from bitflow.eval.suites import task_manager_for

    manager = None
    if cfg.tasks:  # unknown task names fail before the checkpoint is loaded
        try:
            manager = task_manager_for(list(cfg.tasks))
        except ValueError as err:
            tasks = OmegaConf.to_container(given.tasks) if OmegaConf.is_list(given.tasks) else given.tasks
            raise ConfigError(f"tasks={tasks!r}: {err}") from None
    from lm_eval.utils import make_table

    from bitflow.eval.harness import BitflowLM

    ckpt = Path(cfg.ckpt)
    try:
        lm = BitflowLM(
            ckpt=str(ckpt),
            batch_size=cfg.batch_size,
            device=cfg.device,
            precision=cfg.precision,
            max_length=cfg.max_length,
        )
    except (ValueError, FileNotFoundError) as err:  # not a bitflow checkpoint, max_length beyond the model's
        raise ConfigError(f"cannot evaluate ckpt={str(ckpt)!r}: {err}") from err
    info = checkpoint_info(ckpt)
    metrics: dict[str, dict[str, float]] = {}
    results: dict[str, Any] = {}
    if cfg.tasks:
        results = run_tasks(
            lm, list(cfg.tasks), cfg.limit, cfg.num_fewshot, cfg.bootstrap_iters, cfg.seed, manager
        )
        metrics = flatten_results(results)
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    ppl = _perplexity(lm, cfg) if cfg.perplexity else {}
    for name, row in ppl.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))

    record = {
        "checkpoint": ckpt.name,
        "checkpoint_path": str(ckpt.resolve()),
        **info,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "results": metrics,
        "perplexity": ppl,
        "versions": {k: v for k, v in results.get("versions", {}).items()},
        "n_shot": results.get("n-shot", {}),
        "settings": {
            "tasks": ",".join(cfg.tasks) or "none",
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "precision": lm.precision,
            "max_length": lm.max_length,
            "stride": cfg.stride,
            "python": ".".join(str(v) for v in sys.version_info[:3]),
        },
    }
    out = Path(cfg.output) if cfg.output else ckpt.parent / RESULTS_FILE
    record = write_results(out, record)
    print(f"results: {out}")
    run = run_dir_of(ckpt)
    if cfg.tensorboard and run is not None and (metrics or ppl):
        tb = log_to_tensorboard(run / "tb", tensorboard_scalars({**metrics, **ppl}), info["global_step"])
        print(f"tensorboard: {tb} (step {info['global_step']})")
    return record


main = hydra_app(EVAL_CONFIG, evaluate_checkpoint, "The ``bitflow-eval`` console script: Hydra's app over conf/eval.yaml.")


def lm_eval_cli(argv: list[str] | None = None) -> None:
    """``bitflow-lm-eval``: lm-eval's own command line (every option of ``lm_eval run``) with the model
    ``bitflow`` registered and bitflow's local tasks on the task path (``--include_path`` unless given).

        bitflow-lm-eval --model bitflow --model_args ckpt=<run>/checkpoints/last.ckpt --tasks piqa

    Pass the device with ``--device`` (lm-eval's CLI passes ``cuda:0`` otherwise; without CUDA, bitflow falls
    back to the CPU), not inside ``--model_args``.
    """
    from bitflow.eval import register_lm_eval_model
    from bitflow.eval.local_tasks import tasks_dir

    register_lm_eval_model()
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] not in ("ls", "validate") and "--include_path" not in args:
        args += ["--include_path", str(tasks_dir())]
    sys.argv = ["bitflow-lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
