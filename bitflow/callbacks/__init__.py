"""Lightning callbacks: the 16-bit -> 1.58-bit precision transition and quantization monitoring."""

from bitflow.callbacks.monitor import QuantMonitor
from bitflow.callbacks.transition import OPTIMIZER_STATES, PrecisionTransition

__all__ = ["OPTIMIZER_STATES", "PrecisionTransition", "QuantMonitor"]
