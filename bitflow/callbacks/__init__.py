"""Lightning callbacks: the precision transition (when a run's quantization recipe applies), monitoring, and what a
run shows while it trains and when it ends."""

from bitflow.callbacks.dashboards import TensorBoardDashboards
from bitflow.callbacks.monitor import QuantMonitor
from bitflow.callbacks.summary import QuietModelSummary, RunSummary
from bitflow.callbacks.transition import OPTIMIZER_STATES, PrecisionTransition, build_transition

__all__ = [
    "OPTIMIZER_STATES", "PrecisionTransition", "QuantMonitor", "QuietModelSummary", "RunSummary", "TensorBoardDashboards",
    "build_transition",
]
