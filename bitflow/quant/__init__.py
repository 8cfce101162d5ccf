"""Quantization core: quantizer maths (:mod:`bitflow.quant.functional`), :class:`BitLinear`, model conversion."""

from bitflow.quant.bitlinear import BitLinear, get_strength, set_strength
from bitflow.quant.convert import match_name, to_bitlinear, to_linear

__all__ = ["BitLinear", "get_strength", "match_name", "set_strength", "to_bitlinear", "to_linear"]
