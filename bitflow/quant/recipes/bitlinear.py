"""The ``bitlinear`` recipe: fake-quantized :class:`~bitflow.quant.BitLinear` layers over full-precision latent
weights, trained with the straight-through estimator (BitNet b1.58, arXiv 2402.17764; median variant, arXiv
2411.05882; phase-in of continual QAT, arXiv 2502.11895).

Each targeted ``nn.Linear`` becomes a BitLinear that reuses the very same weight/bias Parameters, so the optimizer
keeps training them (``keep``) or starts their AdamW state afresh (``reset``). The checkpoint state::

    {"kind": "bitlinear",
     "layers": ["layers.0.attn.wq", ...],              # qualified names of the converted nn.Linear layers
     "options": {"weight_scale": "absmean", ...},      # BitLinear's keyword options
     "strength": {"weight": 1.0, "act": 1.0}}          # lambda of weights and activations (or, after a
                                                        # progressive switch, {"layers": {name: {...}}})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from bitflow.quant.bitlinear import BitLinear, BitLinearOptions, _validate_options, set_strength
from bitflow.quant.convert import as_linear, bitlinear_targets, to_bitlinear
from bitflow.quant.recipe import Conversion, QuantOptions, QuantRecipe, check_state, named_layers
from bitflow.quant.select import first_names, linear_kinds

__all__ = ["BitLinearQuant", "BitLinearRecipe"]


@dataclass(frozen=True)
class BitLinearQuant(BitLinearOptions, QuantOptions):
    """The ``bitlinear`` recipe's options: the layer filter plus :class:`~bitflow.quant.BitLinearOptions`."""

    LAYER_KEYS: ClassVar[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(BitLinearOptions))

    def __post_init__(self) -> None:
        QuantOptions.__post_init__(self)
        BitLinearOptions.__post_init__(self)


class BitLinearRecipe(QuantRecipe):
    """BitNet-style quantization-aware training with latent weights; supports the phase-in strength lambda."""

    name = "bitlinear"
    Options = BitLinearQuant
    supports_phase_in = True
    options: BitLinearQuant

    def plan(self, model: nn.Module) -> list[str]:
        targets = bitlinear_targets(model, self.options.include, self.options.exclude)
        for name, m in targets:  # options that depend on the layer's shape (group_size)
            try:
                _validate_options(as_linear(m, name).in_features, **self.options.layer_options())
            except ValueError as e:
                raise ValueError(f"quant.{e} (layer {name})") from None
        return [name for name, _ in targets]

    def convert(self, model: nn.Module) -> Conversion:
        self.plan(model)  # the filter errors name quant.include / quant.exclude
        names = to_bitlinear(model, self.options.include, self.options.exclude, **self.options.layer_options())
        return Conversion(names)

    def converted(self, model: nn.Module) -> list[str]:
        return [name for name, _ in first_names(model, BitLinear)]

    def set_strength(self, model: nn.Module, value: float) -> None:
        set_strength(model, weight=value, act=value)  # fills buffers in place: a compiled model is not recompiled

    # ------------------------------------------------------------------------------------------ checkpoints
    def state(self, model: nn.Module) -> dict[str, Any] | None:
        found = [(name, m) for name, m in first_names(model, BitLinear)]
        if not found:
            return None
        options = found[0][1].options()
        differ = [name for name, m in found if m.options() != options]
        if differ:
            raise ValueError(
                f"the BitLinear layers of {type(model).__name__} have different options ({differ[:4]} differ from "
                f"{found[0][0]}); a bitlinear quant state holds one set of options"
            )
        per_layer = {name: (float(m.weight_strength), float(m.act_strength)) for name, m in found}
        if len(set(per_layer.values())) == 1:
            w, a = next(iter(per_layer.values()))
            strength: dict[str, Any] = {"weight": w, "act": a}
        else:  # a progressive switch: the blocks are at different strengths
            strength = {"layers": {name: {"weight": w, "act": a} for name, (w, a) in per_layer.items()}}
        return {"kind": self.name, "layers": [name for name, _ in found], "options": dict(options), "strength": strength}

    def restore(self, model: nn.Module, state: Mapping[str, Any]) -> list[str]:
        check_state(state, self.name, ("layers", "options", "strength"))
        layers, strength = list(state["layers"]), dict(state["strength"])
        theirs = {**dataclasses.asdict(BitLinearOptions()), **dict(state["options"])}
        if theirs != self.options.layer_options():
            raise ValueError(
                f"the checkpoint's BitLinear options {theirs} differ from this run's quant config "
                f"{self.options.layer_options()}"
            )
        modules = named_layers(model, layers)
        wrong = [name for name in layers if not isinstance(modules[name], linear_kinds())]
        if wrong:
            raise ValueError(f"the quant state names layers that are not nn.Linear: {wrong[:8]}")
        todo = [name for name in layers if not isinstance(modules[name], BitLinear)]
        if todo:  # exact names: a glob without wildcards matches only that name (or a dotted suffix)
            done = to_bitlinear(model, include=todo, exclude=None, **self.options.layer_options())
            extra = sorted(set(done) - set(todo))
            if extra:
                raise ValueError(f"restoring the quant state converted layers it was not asked to: {extra}")
        if "layers" in strength:  # per layer (a progressive switch)
            for name, value in dict(strength["layers"]).items():
                set_strength(model.get_submodule(name), weight=value.get("weight"), act=value.get("act"))
        else:
            set_strength(model, weight=strength.get("weight"), act=strength.get("act"))
        return layers

