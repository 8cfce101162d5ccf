"""Quantization core: quantizer maths (:mod:`bitflow.quant.functional`), :class:`BitLinear`, model conversion,
DQT (:mod:`bitflow.quant.dqt`), layer selection (:mod:`bitflow.quant.select`) and the recipes
(:mod:`bitflow.quant.recipe` is the interface, :mod:`bitflow.quant.recipes` the registry)."""

from bitflow.quant.bitlinear import BitLinear, BitLinearOptions, get_strength, set_strength
from bitflow.quant.convert import match_name, to_bitlinear, to_linear

__all__ = ["BitLinear", "BitLinearOptions", "get_strength", "match_name", "set_strength", "to_bitlinear", "to_linear"]
