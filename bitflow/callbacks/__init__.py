"""Lightning callbacks: the precision transition (when a run's quantization recipe applies) and monitoring."""

from bitflow.callbacks.monitor import QuantMonitor
from bitflow.callbacks.transition import OPTIMIZER_STATES, PrecisionTransition, build_transition

__all__ = ["OPTIMIZER_STATES", "PrecisionTransition", "QuantMonitor", "build_transition"]
