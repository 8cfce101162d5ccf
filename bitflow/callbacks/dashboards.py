"""TensorBoard dashboards in every run's log directory: a Custom Scalars layout and an HParams session.

* Custom Scalars (written when the fit starts): grouped charts of the transition (training and validation loss,
  lambda per block, the switch step, the quantization gap and per-layer sensitivity), quantization health (zero
  fraction, flip rate, weight scale, DQT level shares) and throughput. Chart entries are the tag regexes TensorBoard
  matches against the run's scalars (:data:`LAYOUT`).
* HParams (written when the fit ends): the run's swept overrides (Hydra's ``hydra.overrides.task``, e.g.
  ``transition.at=0.2``; in a multirun only the keys it sweeps, else every override) as hyperparameters, and as metrics the final validation loss, the switch step, the spike,
  the in-run recovery and the last gap before the switch (``hparams/<name>`` scalars at the last step), so that after
  ``bitflow +experiment=transition_sweep -m`` the HParams tab compares the runs with no extra step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = [
    "HPARAM_METRICS", "LAYOUT", "TensorBoardDashboards", "hparam_value", "swept_keys", "swept_overrides",
]

log = logging.getLogger(__name__)

# category -> chart title -> tag regexes (one Multiline chart each)
LAYOUT: dict[str, dict[str, list[str]]] = {
    "transition": {
        "loss": ["train/loss", "val/loss"],
        "lambda (per block) and layers switched": [r"quant/lambda(/.*)?$", "quant/layers_switched"],
        "switch step": ["quant/switch_step"],
        "quantization gap (quantized - 16-bit loss)": ["quant/gap$"],
        "gap losses": ["quant/gap_loss_16bit", "quant/gap_loss_quantized"],
        "per-layer sensitivity": [r"quant/gap_layer/.*"],
        "spike and recovery": ["transition/spike", "transition/recovery_steps"],
    },
    "quantization health": {
        "zero fraction": [r"quant/zero_fraction$"],
        "flip rate": [r"quant/flip_rate$"],
        "weight scale": [r"quant/weight_scale$"],
        "level shares": [r"dqt/level_share/.*"],
    },
    "throughput": {
        "tokens per second": ["train/tokens_per_sec"],
        "tokens seen": ["train/tokens_seen"],
        "learning rate": ["train/lr"],
    },
}
# the HParams metrics: hparams/<name> <- where the value comes from
HPARAM_METRICS = ("val_loss", "switch_step", "spike", "recovery_steps", "gap")
IGNORED_PREFIXES = ("hydra.", "hydra/", "paths.", "trainer.enable_progress_bar")


def swept_overrides() -> list[str]:
    """The run's command-line overrides (``hydra.overrides.task``) while Hydra runs it, else ``[]``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def swept_keys(multirun_yaml: str | Path | None = None) -> list[str]:
    """The keys a Hydra multirun sweeps (a ``,``-list or a sweep function on its command line, or the sweeper's
    ``params`` of an experiment), read from the sweep's ``multirun.yaml`` (default: this job's sweep); ``[]``
    outside a multirun."""
    from omegaconf import OmegaConf

    if multirun_yaml is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return []
        multirun_yaml = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
    path = Path(multirun_yaml)
    if not path.is_file():
        return []
    cfg = OmegaConf.load(path)
    keys = [str(k) for k in (OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {})]
    for item in OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []:
        key, _, value = str(item).partition("=")
        if re.search(r",|^(range|choice|glob|interval)\(", value) and not value.startswith(("[", "{")):
            keys.append(key)
    return [k.lstrip("+~") for k in dict.fromkeys(keys)]


def hparam_value(text: str) -> bool | int | float | str:
    """An override's value as HParams shows it: a number or a bool where it reads as one, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class TensorBoardDashboards(Callback):
    """Write the Custom Scalars layout at fit start and the HParams session when the fit ends (rank 0, TensorBoard
    loggers only; a run without one gets nothing).

    Args:
        overrides: ``key=value`` strings to show as hyperparameters; ``None`` = the run's Hydra overrides
            (:func:`swept_overrides`), minus ``hydra.*``/``paths.*``; in a multirun only the keys it sweeps
            (:func:`swept_keys`).
    """

    def __init__(self, overrides: list[str] | None = None) -> None:
        self.overrides = overrides

    @staticmethod
    def _writers(trainer: L.Trainer) -> list[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        layout = {cat: {title: ["Multiline", tags] for title, tags in charts.items()} for cat, charts in LAYOUT.items()}
        for writer in self._writers(trainer):
            writer.add_custom_scalars(layout)
            writer.flush()

    def hparams(self) -> dict[str, bool | int | float | str]:
        """The hyperparameters of this run: its (swept) overrides, ``+``/``~`` dropped from the keys."""
        items = self.overrides if self.overrides is not None else swept_overrides()
        out: dict[str, bool | int | float | str] = {}
        for item in items:
            key, _, value = str(item).partition("=")
            key = key.lstrip("+~")
            if key and not key.startswith(IGNORED_PREFIXES):
                out[key] = hparam_value(value)
        # in a multirun only what it sweeps (TensorBoard shows the first few hyperparameters in alphabetical order;
        # the overrides every run shares would push the swept ones out of view); the full config is in .hydra/
        swept = [k for k in swept_keys() if k in out]
        return {k: out[k] for k in swept} if swept else out

    @staticmethod
    def metrics(trainer: L.Trainer) -> dict[str, float]:
        """``hparams/<name>`` of :data:`HPARAM_METRICS` that this run has."""
        from bitflow.callbacks.transition import PrecisionTransition

        out: dict[str, float] = {}
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            out["hparams/val_loss"] = float(val)
        for cb in trainer.callbacks:
            if isinstance(cb, PrecisionTransition):
                if cb.switch_step is not None:
                    out["hparams/switch_step"] = float(cb.switch_step)
                for name, key in (("spike", "transition/spike"), ("recovery_steps", "transition/recovery_steps"),
                                  ("gap", "quant/gap")):
                    if key in cb.results:
                        out[f"hparams/{name}"] = float(cb.results[key])
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after every callback's on_train_end (the transition reports a spike cut short by the end there)
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        from torch.utils.tensorboard.summary import hparams

        params = self.hparams()
        metrics = self.metrics(trainer)
        # every metric of HPARAM_METRICS is declared (a run without a switch leaves its column empty)
        declared = {f"hparams/{name}": metrics.get(f"hparams/{name}", float("nan")) for name in HPARAM_METRICS}
        for writer in self._writers(trainer):
            exp, ssi, sei = hparams(params, declared)
            file_writer = writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step=trainer.global_step)
            writer.flush()
