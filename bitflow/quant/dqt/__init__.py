"""Direct Quantized Training (DQT): weights live only on a low-bit grid, updates are rounded back stochastically.

Zhao et al., "Direct Quantized Training of Language Models with Stochastic Rounding" (arXiv 2412.04787). BitNet-style
training (:class:`~bitflow.quant.BitLinear`) keeps a full-precision latent weight for the straight-through estimator;
DQT keeps none. With ``b`` bits, ``Qp = 2^(b-1) - 1`` and ``Qn = -2^(b-1)`` (ternary: ``Qp = 1, Qn = -1``):

* init: ``W <- clamp(round(W s), Qn, Qp) / s`` with ``s = Qp / mean|W|``;
* forward: the stored weight as it is (no STE for weights); activations 8-bit absmax per token with the STE;
* step: ``W' = W - lr * update`` with AdamW's update computed on the stored ``W``, then
  ``x = clip(W' s, Qn, Qp)`` and ``W <- SR(x) / s``, where ``SR(x)`` is ``ceil(x)`` with probability
  ``x - floor(x)``, else ``floor(x)`` (unbiased: ``E[SR(x)] = x``).

Storage: a targeted layer holds ``codes`` (int8 buffer, values in ``[Qn, Qp]``) and ``scale`` (float32 0-dim buffer,
the dequantization step ``1 / s``), so ``W = codes * scale`` exactly. No float copy of ``W`` outlives a step: the
forward builds one float leaf tensor per layer (in the autocast dtype under bf16 autocast, else float32) that
collects the gradient; :class:`DQTAdamW` reads its ``.grad``, writes new codes and drops it.

Scale: the paper's init uses ``s = Qp / mean|W|``; for the steps its authors' code takes ``s = Qp / max(W_prev)``
(the largest signed pre-update weight). On the grid that is ``scale' = scale * max(codes) / Qp``: unchanged while
some code sits at ``Qp`` (the usual case, since the absmean init clips the tails onto ``Qp``), finer otherwise.
``scale_update="max"`` (default) does this; ``"fixed"`` keeps the init scale. A fresh ``s = Qp / mean|W|`` every
step is not offered: on a ternary grid ``mean|W| = (share of non-zero codes) * scale``, so it would shrink the grid
every step.

The optimizer (:class:`DQTAdamW`) is ``torch.optim.AdamW`` for every ordinary Parameter plus the DQT step above for
the DQT layers. Its ``"dqt"`` param group holds the current float leaves from forward to step, so whatever treats
an optimizer's param groups (Lightning's gradient clipping, ``GradScaler.unscale_``, ``zero_grad``) treats the DQT
gradients too: with ``gradient_clip_val`` the global norm covers DQT and ordinary gradients alike, as it does for
BitNet's latent weights. The AdamW moments of a DQT layer (``exp_avg``, ``exp_avg_sq``) are float32 by default or,
with ``moment_dtype="bfloat16"``, bfloat16 written with stochastic rounding; the rounding noise comes from a seeded
``torch.Generator`` whose state is part of the optimizer's ``state_dict`` (so a resumed run continues exactly).

Norm gains stay in full precision (they are ``d``-sized vectors: nothing to save, and a ternary gain would switch
channels off). The LM head is a Linear (opt in with ``exclude=[]``); token embeddings opt in with
``embeddings=True``; a weight tied between the two must be converted on both sides or neither.
"""

from bitflow.quant.dqt.convert import dqt_modules, dqt_targets, to_dqt, unique_dqt_weights
from bitflow.quant.dqt.grid import INIT_SCALES, MOMENT_DTYPES, SCALE_UPDATES, dqt_qrange, init_codes
from bitflow.quant.dqt.layers import DQTEmbedding, DQTLinear, DQTWeight
from bitflow.quant.dqt.optim import DQTAdamW, stochastic_round_bf16

__all__ = [
    "INIT_SCALES",
    "MOMENT_DTYPES",
    "SCALE_UPDATES",
    "DQTAdamW",
    "DQTEmbedding",
    "DQTLinear",
    "DQTWeight",
    "dqt_modules",
    "dqt_qrange",
    "dqt_targets",
    "init_codes",
    "stochastic_round_bf16",
    "to_dqt",
    "unique_dqt_weights",
]
