"""Evaluation: the lm-eval adapter (model ``bitflow``), task groups, offline local tasks, perplexity, the
in-training callback and the ``bitflow-eval`` entry point.

Importing this package registers the model name ``bitflow`` with lm-eval (lm-eval 0.4 finds external models only
through import side effects; the class itself loads on first use). Heavier modules load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

MODEL_NAME = "bitflow"
_MODEL_TARGET = "bitflow.eval.harness:BitflowLM"

_LAZY = {
    "BitflowLM": "bitflow.eval.harness",
    "LMEvalCallback": "bitflow.eval.callback",
    "TASK_GROUPS": "bitflow.eval.suites",
    "resolve_tasks": "bitflow.eval.suites",
    "evaluate_checkpoint": "bitflow.eval.run",
    "run_tasks": "bitflow.eval.run",
    "perplexity_of_tokens": "bitflow.eval.perplexity",
    "perplexity_of_files": "bitflow.eval.perplexity",
    "perplexity_of_split": "bitflow.eval.perplexity",
}


def register_lm_eval_model() -> None:
    """Make ``bitflow`` a model name lm-eval knows (``lm_eval --model bitflow``, ``simple_evaluate("bitflow")``).

    lm-eval registers its built-in models when ``lm_eval.models`` is imported, and only if its registry is still
    empty at lookup time; so import it first, then add ``bitflow`` as a lazy placeholder. Idempotent.
    """
    import lm_eval.models  # noqa: F401  (registers the built-in models)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_MODEL_TARGET)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_lm_eval_model()

__all__ = ["MODEL_NAME", "register_lm_eval_model", *_LAZY]
