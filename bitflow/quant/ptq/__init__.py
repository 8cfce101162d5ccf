"""Post-training quantization (PTQ) of trained checkpoints: round-to-nearest and GPTQ (Frantar et al., arXiv
2210.17323) to 2/3/4/6/8-bit grids, and ternary absmean/absmedian as BitLinear computes it.

* :mod:`~bitflow.quant.ptq.rtn`: the n-bit grid (scales, zero points, codes) and round-to-nearest;
* :mod:`~bitflow.quant.ptq.gptq`: the Hessian accumulator and GPTQ of one layer;
* :mod:`~bitflow.quant.ptq.sequential`: block-by-block calibration of a whole decoder;
* :mod:`~bitflow.quant.ptq.layer`: :class:`PTQLinear`, the quantized layer a checkpoint holds;
* :mod:`~bitflow.quant.ptq.calibrate`: calibration and validation windows from a run's own data;
* :mod:`~bitflow.quant.ptq.run`: :func:`ptq_checkpoint` (the Python API) and the ``bitflow-ptq`` app.

The recipe that applies it to a model is :class:`bitflow.quant.recipes.ptq.PTQRecipe` (``quant.recipe: ptq``).
"""

from __future__ import annotations

from typing import Any

from bitflow.quant.ptq.gptq import GPTQInfo, HessianAccumulator
from bitflow.quant.ptq.layer import PTQLinear
from bitflow.quant.ptq.rtn import BITS, Grid, QuantizedWeight

# the functions rtn.rtn and gptq.gptq are not re-exported: they would shadow their modules' names
__all__ = ["BITS", "GPTQInfo", "Grid", "HessianAccumulator", "PTQLinear", "QuantizedWeight", "ptq_checkpoint"]


def __getattr__(name: str) -> Any:
    # ptq_checkpoint needs the LightningModule, which imports the recipes, which import this package: load it on use
    if name == "ptq_checkpoint":
        from bitflow.quant.ptq.run import ptq_checkpoint

        return ptq_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
