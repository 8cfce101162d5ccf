"""Every config file composes; every experiment composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bitflow.cli import CONFIG_DIR, build_callbacks, instantiate, prepare_config
from bitflow.models.llama import Llama, LlamaConfig
from tests.helpers import compose

CONF = Path(CONFIG_DIR)
# groups whose options are selected as `group=option` on top of train.yaml
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra", "__pycache__")
)
# options that need a value the user must give
REQUIRED = {
    ("data", "text"): [f"data.source.paths=[{Path(__file__)}]"],
    ("data", "hf"): ["data.source.path=text", f"data.source.data_files={Path(__file__)}"],
    ("model", "hf"): ["model.path=/pretrained"],  # a Hugging Face directory: tests/export/test_hf.py loads one
}


# groups outside train.yaml's defaults list are added with `+group=option`
IN_DEFAULTS = {next(iter(d)) for d in OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml").defaults) if isinstance(d, dict)}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options_and_the_defaults_exist():
    assert {"model", "data", "trainer", "optimizer", "scheduler", "logger", "callbacks", "paths"} <= set(GROUPS)
    for group in GROUPS:
        assert options(group), group
    assert {"tiny", "small25m", "spectra_99m", "spectra_390m", "olmo_1b"} <= set(options("model"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group: str, option: str, tmp_path: Path):
    plus = "" if group in IN_DEFAULTS else "+"
    cfg = compose([f"{plus}{group}={option}", *REQUIRED.get((group, option), []), f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    assert cfg.trainer.max_steps > 0
    if group == "model" and option == "hf":  # model=hf's shape comes from the directory (tests/export)
        pass
    elif group == "model" and cfg.model.get("family") is not None:  # another family (bitflow.tasks)
        from bitflow.tasks import build_model_shape

        if cfg.model.family == "gnn":
            pytest.importorskip("torch_geometric")
        with torch.device("meta"):
            assert type(build_model_shape(cfg)).__name__ in ("Encoder", "EncoderDecoder", "WideMLP", "GNN")
    elif group == "model":
        # the preset's shape is valid; build it without allocating memory
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_dict({**OmegaConf.to_container(cfg.model), "vocab_size": 8192}))
        assert model.config.d_model == cfg.model.d_model


def test_model_presets_have_the_papers_shapes():
    def params(name: str) -> float:
        cfg = compose([f"model={name}", "paths.output_dir=x"])
        with torch.device("meta"):
            return Llama(LlamaConfig.from_dict({**OmegaConf.to_container(cfg.model), "vocab_size": 32000})).config

    s99 = params("spectra_99m")
    assert (s99.d_model, s99.d_ff, s99.n_heads, s99.n_layers) == (512, 1280, 8, 16)
    s390 = params("spectra_390m")
    assert (s390.d_model, s390.d_ff, s390.n_heads, s390.n_layers) == (1024, 2560, 16, 24)
    olmo = params("olmo_1b")
    assert (olmo.d_model, olmo.n_layers, olmo.tie_embeddings) == (2048, 16, True)


def test_slurm_launcher_config_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


# the decoder's experiments (the other families' when158_*: tests/test_tasks.py)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("when158_"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(name: str, tiny_overrides: list[str]):
    cfg = compose([f"+experiment={name}", *tiny_overrides])
    assert cfg.task_name != "train", "an experiment names its output folder"
    prepare_config(cfg, explicit=set())  # what `bitflow` does first: checks, precision auto, short-run scaling
    datamodule = instantiate(cfg.data)
    assert datamodule.seq_len == 32
    from bitflow.lm import LanguageModel

    lm = LanguageModel(
        model={**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": 320},
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        quant=OmegaConf.to_container(cfg.quant, resolve=True),
    )
    assert isinstance(lm.model, Llama)
    callbacks = build_callbacks(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.max_steps == cfg.trainer.max_steps
