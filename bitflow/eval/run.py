"""``bitflow-eval``: evaluate a checkpoint on lm-eval tasks (and perplexity), print a table, save and log it.

    bitflow-eval ckpt=outputs/train/<time>/checkpoints/last.ckpt             # the offline `local` tasks
    bitflow-eval ckpt=... tasks=paper11 batch_size=32 device=cuda             # the paper's 11 tasks
    bitflow-eval ckpt=... tasks=piqa,sciq,local limit=200 perplexity=val      # a mix, + val-split perplexity
    bitflow-eval ckpt=... tasks=none perplexity='data/*.txt' stride=128       # perplexity of text files

Results go to ``eval_results.json`` next to the checkpoint (merged with earlier results of the same checkpoint
and step) and, for a checkpoint inside a run directory (``<run>/checkpoints/x.ckpt``), into that run's
TensorBoard (``<run>/tb``) as ``eval/<task>/<metric>`` at the checkpoint's global step.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bitflow.eval")

RESULTS_FILE = "eval_results.json"


@dataclass
class EvalArgs:
    """Arguments of ``bitflow-eval`` (``key=value`` on the command line)."""

    ckpt: str = ""  # the checkpoint to evaluate (required)
    tasks: str = (
        "local"  # group(s) (local, paper11, spectra) and/or lm-eval task names, comma-separated; none = skip
    )
    limit: float | None = None  # examples per task (an int, or a fraction < 1); None = all
    num_fewshot: int | None = None  # None = each task's default (0 for bitflow's tasks)
    batch_size: str = "16"  # an int or "auto" (start at 64, halve on CUDA out-of-memory)
    device: str | None = None  # cpu, cuda, cuda:1 ... (default: CUDA if available)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), 32, bf16, 16
    max_length: int | None = None  # context length (default: the model's max_seq_len)
    bootstrap_iters: int = 1000  # lm-eval's bootstrap for the stderr of non-mean metrics; 0 = no stderr
    perplexity: str | None = (
        None  # "val" (the run's validation split), file paths/globs (comma-separated), None
    )
    stride: int | None = None  # sliding-window stride for perplexity (default: the context length)
    output: str | None = None  # where to write the results JSON (default: <ckpt dir>/eval_results.json)
    tensorboard: bool = True  # log eval/<task>/<metric> into <run>/tb
    seed: int = 1234  # lm-eval's random seeds (few-shot sampling)


def _convert(name: str, value: str, kind: Any) -> Any:
    text = value.strip()
    if text.lower() in ("null", "none", "~") and name not in ("tasks", "batch_size"):
        return None
    kind = str(kind)
    try:
        if "bool" in kind:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if "float" in kind:
            return float(text)
        if "int" in kind:
            return int(text)
    except ValueError:
        raise ValueError(f"bitflow-eval: {name}={value!r} is not a valid {kind.split(' |')[0]}") from None
    if text.startswith("[") and text.endswith("]"):  # Hydra-style list: tasks=[piqa,sciq]
        text = ",".join(s.strip().strip("'\"") for s in text[1:-1].split(","))
    return text


def parse_args(argv: list[str]) -> EvalArgs:
    """``key=value`` arguments -> EvalArgs; a clear error for an unknown key or a bad value."""
    fields = {f.name: f.type for f in dataclasses.fields(EvalArgs)}
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ValueError(f"bitflow-eval: arguments are key=value, got {arg!r}; run `bitflow-eval --help`")
        if key not in fields:
            raise ValueError(f"bitflow-eval: unknown argument {key!r}; allowed: {', '.join(fields)}")
        values[key] = _convert(key, value, fields[key])
    args = EvalArgs(**values)
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(
                "bitflow-eval: limit must be positive (examples per task, or a fraction < 1), "
                f"got {args.limit}"
            )
        if args.limit >= 1:
            args.limit = int(args.limit)
    if not args.ckpt:
        raise ValueError(
            "bitflow-eval: ckpt=PATH is required (e.g. ckpt=outputs/train/<time>/checkpoints/last.ckpt)"
        )
    return args


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
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    meta = ckpt.get("bitflow", {}) if isinstance(ckpt, dict) else {}
    return {
        "global_step": int(ckpt.get("global_step", 0)),
        "epoch": int(ckpt.get("epoch", 0)),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
    }


def run_dir_of(ckpt: str | Path) -> Path | None:
    """The run directory of ``<run>/checkpoints/<name>.ckpt``, or None for a checkpoint elsewhere."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


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
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _perplexity(lm: Any, args: EvalArgs) -> dict[str, dict[str, float]]:
    from bitflow.eval.perplexity import perplexity_of_files, perplexity_of_split

    kw = {"stride": args.stride, "batch_size": lm.batch_size, "device": lm.device, "precision": lm.precision}
    if args.perplexity == "val":
        source, cache_dir = _run_data_config(args.ckpt)
        res = perplexity_of_split(
            lm.model, lm.tokenizer, source, "val", cache_dir, max_len=lm.max_length, **kw
        )
        return {"ppl_val": res}
    files = perplexity_of_files(
        lm.model, lm.tokenizer, args.perplexity.split(","), max_len=lm.max_length, **kw
    )
    return {"ppl_files": files["total"]}


def _run_data_config(ckpt: str) -> tuple[Any, Any]:
    """The corpus source and cache dir of the run the checkpoint belongs to (``<run>/.hydra/config.yaml``), or
    the default stdlib corpus and cache."""
    run = run_dir_of(ckpt)
    cfg_path = run / ".hydra" / "config.yaml" if run else None
    if cfg_path is None or not cfg_path.is_file():
        log.info("no run config next to %s: perplexity on the default stdlib validation split", ckpt)
        return None, None
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_path)
    source = hydra.utils.instantiate(cfg.data.source)
    try:
        cache_dir = OmegaConf.select(cfg, "data.cache_dir")
    except Exception:  # an interpolation that needs Hydra's runtime: fall back to the default cache
        cache_dir = None
    return source, cache_dir


def evaluate_checkpoint(args: EvalArgs) -> dict[str, Any]:
    """Load the checkpoint, run the tasks and perplexity, print the table, write the JSON, log TensorBoard.
    Returns the record written to the JSON file."""
    from lm_eval.utils import make_table

    from bitflow.eval.harness import BitflowLM
    from bitflow.eval.suites import resolve_tasks, task_manager_for

    ckpt = Path(args.ckpt)
    run_tasks_now = args.tasks.strip().lower() not in ("none", "")
    if run_tasks_now:  # unknown task names fail before the checkpoint is loaded
        task_manager_for(resolve_tasks(args.tasks))
    lm = BitflowLM(
        ckpt=str(ckpt),
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        max_length=args.max_length,
    )
    info = checkpoint_info(ckpt)
    metrics: dict[str, dict[str, float]] = {}
    results: dict[str, Any] = {}
    if run_tasks_now:
        results = run_tasks(lm, args.tasks, args.limit, args.num_fewshot, args.bootstrap_iters, args.seed)
        metrics = flatten_results(results)
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
    ppl = _perplexity(lm, args) if args.perplexity else {}
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
            "tasks": args.tasks,
            "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "precision": lm.precision,
            "max_length": lm.max_length,
            "stride": args.stride,
            "python": ".".join(str(v) for v in sys.version_info[:3]),
        },
    }
    out = Path(args.output) if args.output else ckpt.parent / RESULTS_FILE
    record = write_results(out, record)
    print(f"results: {out}")
    run = run_dir_of(ckpt)
    if args.tensorboard and run is not None and (metrics or ppl):
        tb = log_to_tensorboard(run / "tb", tensorboard_scalars({**metrics, **ppl}), info["global_step"])
        print(f"tensorboard: {tb} (step {info['global_step']})")
    return record


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``bitflow-eval key=value ...``; exit code 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print("arguments (key=value):")
        for f in dataclasses.fields(EvalArgs):
            print(f"  {f.name}={f.default!r}")
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"bitflow-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


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
    sys.exit(main())
