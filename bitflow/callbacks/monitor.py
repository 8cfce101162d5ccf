"""QuantMonitor: TensorBoard statistics of the quantized (BitLinear) layers of any run.

Scalars (at the steps Lightning logs ``train/loss``, i.e. when ``(step + 1) % every_n_steps == 0``; the statistics
describe the weights that step's forward used):

* ``quant/zero_fraction``: fraction of weight codes that are 0, over all BitLinear layers (element-weighted);
* ``quant/weight_scale``: the dequantization step ``1 / s_w`` (= mean|W| for ternary absmean, BitNet b1.58,
  arXiv 2402.17764; the median variant of arXiv 2411.05882 uses median|W|), averaged over the scale's entries and
  then over layers;
* ``quant/flip_rate``: fraction of weight codes that differ from those at the previous measurement (the first
  measurement after the layers appear has no flip rate);
* the same per layer, ``quant/<stat>/<layer name>``, every ``per_layer_every_n_steps`` steps;
* histograms of the latent (full-precision) weights, ``quant/latent_weight/<layer name>``, every
  ``histogram_every_n_steps`` steps (TensorBoard loggers only).

Everything is computed on rank 0 only (the weights are the same on every rank), under ``no_grad``, and moved to the
host in one transfer per measurement; between measurements the monitor costs nothing. Runs without BitLinear
layers (yet) log nothing.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from bitflow.callbacks.transition import log_scalars
from bitflow.models import gathered, is_sharded, model_root
from bitflow.quant import BitLinear

__all__ = ["QuantMonitor"]


def _interval(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name}={value!r} is not allowed; allowed: null (the default) or an integer >= 0 (0 = off)")
    return value


class QuantMonitor(Callback):
    """Log zero fraction, weight scale, flip rate (aggregated and per layer) and latent-weight histograms.

    Args:
        every_n_steps: interval of the aggregated scalars; ``None`` = the trainer's ``log_every_n_steps``; 0 = off.
        per_layer_every_n_steps: interval of the per-layer scalars; ``None`` = 10 x ``every_n_steps``; 0 = off.
        histogram_every_n_steps: interval of the latent-weight histograms; ``None`` = the per-layer interval;
            0 = off.
        flip_rate: measure ``quant/flip_rate`` (keeps the previous codes: one int8 per quantized weight).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        per_layer_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        flip_rate: bool = True,
    ) -> None:
        self.every_n_steps = _interval("every_n_steps", every_n_steps)
        self.per_layer_every_n_steps = _interval("per_layer_every_n_steps", per_layer_every_n_steps)
        self.histogram_every_n_steps = _interval("histogram_every_n_steps", histogram_every_n_steps)
        self.flip_rate = bool(flip_rate)
        self._codes: dict[str, torch.Tensor] = {}  # codes at the previous measurement, for the flip rate
        self._measured_step = -1

    def intervals(self, trainer: L.Trainer) -> tuple[int, int, int]:
        """``(aggregate, per layer, histogram)`` intervals in steps for this trainer (0 = off)."""
        every = trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps
        per_layer = 10 * every if self.per_layer_every_n_steps is None else self.per_layer_every_n_steps
        hist = per_layer if self.histogram_every_n_steps is None else self.histogram_every_n_steps
        return every, per_layer, hist

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # after forward and backward, before the update: the weights of this step's forward, layers already switched
        step = trainer.global_step
        # the statistics of FSDP2-sharded weights are collectives: then every rank measures (the loggers write on
        # rank 0 only); otherwise rank 0 alone
        if step == self._measured_step or not (trainer.is_global_zero or is_sharded(pl_module)):
            return
        every, per_layer, hist = (n > 0 and (step + 1) % n == 0 for n in self.intervals(trainer))
        if not (every or per_layer or hist):
            return
        self._measured_step = step
        layers = [(name, m) for name, m in model_root(pl_module).named_modules() if isinstance(m, BitLinear)]
        if not layers:
            return
        metrics = self.measure(layers, per_layer=per_layer)
        if not every:
            metrics = {k: v for k, v in metrics.items() if k.count("/") > 1}
        log_scalars(trainer, metrics, step)
        if hist:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, m in layers:
                        logger.experiment.add_histogram(
                            f"quant/latent_weight/{name}", gathered(m.weight).detach().float().cpu(), global_step=step
                        )

    @torch.no_grad()
    def measure(self, layers: list[tuple[str, BitLinear]], per_layer: bool = False) -> dict[str, float]:
        """The statistics of ``(name, BitLinear)`` layers as ``{tag: value}``; updates the stored codes."""
        rows, info = [], []  # info: (name, number of weights, whether a flip rate is defined)
        for name, layer in layers:
            codes, scale = layer.quantized_weight()
            prev = self._codes.get(name)
            comparable = prev is not None and prev.shape == codes.shape
            flips = (codes != prev).sum() if comparable else codes.new_zeros(())
            if self.flip_rate:
                self._codes[name] = codes
            rows.append(torch.stack([(codes == 0).sum().float(), scale.reciprocal().mean(), flips.float()]))
            info.append((name, codes.numel(), comparable))
        stats = gathered(torch.stack(rows)).double().cpu().tolist()  # the one host transfer (sharded: a collective)
        records = [(name, n, has_flips, *row) for (name, n, has_flips), row in zip(info, stats, strict=True)]
        out = {
            "quant/zero_fraction": sum(r[3] for r in records) / sum(r[1] for r in records),
            "quant/weight_scale": sum(r[4] for r in records) / len(records),
        }
        flipping = [r for r in records if r[2]]
        if flipping:
            out["quant/flip_rate"] = sum(r[5] for r in flipping) / sum(r[1] for r in flipping)
        if per_layer:
            for name, n, has_flips, zeros, step_size, flips in records:
                out[f"quant/zero_fraction/{name}"] = zeros / n
                out[f"quant/weight_scale/{name}"] = step_size
                if has_flips:
                    out[f"quant/flip_rate/{name}"] = flips / n
        return out
