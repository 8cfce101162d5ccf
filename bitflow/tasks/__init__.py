"""Training tasks: which LightningModule trains which model family on which data (the ``task`` config group).

======================  ==========================  ========================================================
``task=``               model family (``model=``)   data (default, offline)
======================  ==========================  ========================================================
``causal_lm``           decoder (``tiny``, ...)     token windows of the stdlib corpus (``data=stdlib``)
``mlm``                 encoder (``encoder_tiny``)  the same token windows, BERT-masked (:mod:`bitflow.data.mlm`)
``span_corruption``     encdec (``encdec_tiny``)    the same token windows, T5-corrupted (:mod:`bitflow.data.span`)
``text_classification`` mlp (``mlp_wide``)          stdlib files by package (``data=stdlib_classes``)
``node_classification`` gnn (``sgc``, ``gcn``)      stdlib import graph (``data=stdlib_graph``)
======================  ==========================  ========================================================

A model preset names its family (``family:`` in conf/model/*.yaml; a preset without one is a Llama decoder). The
checks here run before anything is built; this module imports no torch (the models and modules load lazily).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["FAMILIES", "TASKS", "Task", "build_module", "check_family", "check_task_config", "model_family",
           "plan_layers", "task_name"]

DEFAULT_TASK = "causal_lm"


@dataclass(frozen=True)
class Task:
    """A task: its model family and LightningModule (``module:Class``; None = bitflow.lm.LanguageModel)."""

    name: str
    family: str
    module: str | None


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("causal_lm", "decoder", None),
        Task("mlm", "encoder", "bitflow.tasks.mlm:MLMModule"),
        Task("span_corruption", "encdec", "bitflow.tasks.span:SpanCorruptionModule"),
        Task("text_classification", "mlp", "bitflow.tasks.classify:TextClassificationModule"),
        Task("node_classification", "gnn", "bitflow.tasks.classify:NodeClassificationModule"),
    )
}
# family -> (model class, config class)
FAMILIES: dict[str, tuple[str, str]] = {
    "decoder": ("bitflow.models.llama:Llama", "bitflow.models.llama:LlamaConfig"),
    "encoder": ("bitflow.models.encoder:Encoder", "bitflow.models.encoder:EncoderConfig"),
    "encdec": ("bitflow.models.encdec:EncoderDecoder", "bitflow.models.encdec:EncoderDecoderConfig"),
    "mlp": ("bitflow.models.mlp:WideMLP", "bitflow.models.mlp:WideMLPConfig"),
    "gnn": ("bitflow.models.gnn:GNN", "bitflow.models.gnn:GNNConfig"),
}
# the model fields that come from the data (placeholders while checking and planning)
DATA_FIELDS = {"vocab_size": 512, "in_features": 8, "n_classes": 2}


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _plain(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node or {})


def task_name(cfg: DictConfig) -> str:
    """The run's ``task.name`` (``causal_lm`` when the config has no task group). Raises for an unknown one."""
    name = OmegaConf.select(cfg, "task.name", default=DEFAULT_TASK)
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not allowed; allowed: {', '.join(TASKS)}")
    return name


def model_family(model: Any) -> str:
    """The family of a ``model`` config (``family:``; none = ``decoder``)."""
    family = _plain(model).get("family", "decoder")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not allowed; allowed: {', '.join(FAMILIES)}")
    return family


def _presets(family: str) -> list[str]:
    from importlib.resources import files

    out = []
    for f in sorted(files("bitflow.conf").joinpath("model").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            if (OmegaConf.load(str(f)).get("family") or "decoder") == family:
                out.append(f.name[: -len(".yaml")])
    return out


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def check_family(cfg: DictConfig) -> Task:
    """The run's task, after checking that ``model`` is of the family it trains (a clear error otherwise)."""
    task = TASKS[task_name(cfg)]
    family = model_family(cfg.model)
    if family != task.family:
        presets = ", ".join(f"model={p}" for p in _presets(task.family))
        raise ValueError(
            f"task={task.name} trains {_a(task.family)} model, but model.family={family!r}"
            f"{' (a Llama decoder preset)' if family == 'decoder' else ''}; pick {_a(task.family)} preset ({presets})"
            f" or the task of this model ({', '.join('task=' + t.name for t in TASKS.values() if t.family == family)})"
        )
    return task


def model_config(cfg: DictConfig, **sizes: int) -> Any:
    """The model's config dataclass from ``cfg.model`` (``family`` dropped) with the data-given ``sizes``."""
    family = model_family(cfg.model)
    config_cls = _load(FAMILIES[family][1])
    fields = {k: v for k, v in _plain(cfg.model).items() if k != "family"}
    known = set(config_cls.__dataclass_fields__)
    return config_cls.from_dict({**fields, **{k: v for k, v in sizes.items() if k in known}})


def check_task_config(cfg: DictConfig) -> None:
    """The checks of a non-``causal_lm`` task that need no data: model family and fields, the task options, the
    data module's arguments, torch-geometric for graphs. Raises ``ValueError`` naming the key."""
    from bitflow.config import check_int, config_errors

    task = check_family(cfg)
    owner = FAMILIES[task.family][1].rpartition(":")[2]  # LlamaConfig.d_model -> model.d_model in messages
    with config_errors("model", [*_plain(cfg.model)], owner=owner):
        config = model_config(cfg, **DATA_FIELDS)
    options = _plain(cfg.get("task"))
    if task.family in ("encoder", "encdec"):
        from bitflow.config import check_data

        check_data(cfg.data)
        seq_len = cfg.data.get("seq_len")
        if seq_len > config.max_seq_len:
            raise ValueError(f"data.seq_len={seq_len} is longer than the model's context model.max_seq_len="
                             f"{config.max_seq_len}; use data.seq_len<={config.max_seq_len} or raise model.max_seq_len")
    if task.name == "mlm":
        p = options.get("mask_prob")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"task.mask_prob={p!r} is not allowed; allowed: a number in (0, 1)")
    if task.name == "span_corruption":
        from bitflow.data.span import span_lengths

        check_int("task.n_sentinels", options.get("n_sentinels"), 1)
        _, spans = span_lengths(cfg.data.seq_len, options.get("noise_density"), options.get("mean_span"))
        if spans > options["n_sentinels"]:
            raise ValueError(f"task.n_sentinels={options['n_sentinels']} is too few: data.seq_len={cfg.data.seq_len} "
                             f"gives {spans} noise spans, each needs its own sentinel")
    if task.family == "gnn":
        from bitflow.models.gnn import require_pyg

        try:
            require_pyg()
        except ImportError as e:
            raise ValueError(str(e)) from None
    target = str(cfg.data.get("_target_", ""))
    wanted = {"encoder": "TokenDataModule", "encdec": "TokenDataModule", "mlp": "TextClassificationDataModule",
              "gnn": "NodeClassificationDataModule"}[task.family]
    if not target.endswith(wanted):
        raise ValueError(f"data._target_={target!r} is not allowed for task={task.name}; allowed: a {wanted} "
                         f"(the task's default data, e.g. `bitflow task={task.name}` without data=...)")


def build_model_shape(cfg: DictConfig) -> Any:
    """The model with placeholder data sizes (on the current default device): what planning inspects."""
    family = model_family(cfg.model)
    return _load(FAMILIES[family][0])(model_config(cfg, **DATA_FIELDS))


def plan_layers(cfg: DictConfig) -> list[str]:
    """The layers the ``quant`` recipe will convert in this task's model (:func:`bitflow.cli.plan_layers`)."""
    import torch

    from bitflow.quant.recipes import recipe_from_config

    recipe = recipe_from_config(_plain(cfg.get("quant")) or None)
    if recipe is None:
        return []
    with torch.device("meta"):
        shape = build_model_shape(cfg)
    return recipe.plan(shape)


def build_module(cfg: DictConfig, datamodule: Any) -> Any:
    """The task's LightningModule, sized by the prepared ``datamodule`` (vocabulary, features, classes)."""
    task = TASKS[task_name(cfg)]
    module_cls = _load(task.module)
    options = {k: v for k, v in _plain(cfg.get("task")).items() if k != "name"}
    sizes = module_cls.data_sizes(datamodule, options)
    model = {**{k: v for k, v in _plain(cfg.model).items() if k != "family"}, **sizes}
    return module_cls(
        model=model,
        optimizer=_plain(cfg.optimizer),
        scheduler=_plain(cfg.scheduler),
        compile=cfg.get("compile", False),
        tokenizer_json=getattr(datamodule, "tokenizer_json", None),
        quant=_plain(cfg.get("quant")) or None,
        task=options,
    )
