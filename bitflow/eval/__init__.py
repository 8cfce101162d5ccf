"""Evaluation: the lm-eval adapter (model ``bitflow``), task groups, offline local tasks, perplexity, the
in-training callback and the ``bitflow-eval`` entry point.

lm-eval 0.4 finds external models only through import side effects (it has no plugin entry points), so
importing this package makes ``bitflow`` a model name lm-eval knows: at once if lm-eval's registry is already
loaded, else the moment it is (a one-shot import hook), so ``import bitflow.eval`` itself stays cheap. The
class loads on first use. A one-line ``.pth`` file (``import bitflow.eval``) in site-packages makes the plain
``lm_eval --model bitflow`` CLI work; ``bitflow-lm-eval`` is lm-eval's CLI with bitflow registered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

MODEL_NAME = "bitflow"
_MODEL_TARGET = "bitflow.eval.harness:BitflowLM"
_REGISTRY_MODULE = "lm_eval.api.registry"

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
    """Make ``bitflow`` a model name lm-eval knows (``lm_eval --model bitflow``,
    ``simple_evaluate("bitflow")``).

    lm-eval registers its built-in models when ``lm_eval.models`` is imported, and only if its registry is
    still empty at lookup time; so import it first, then add ``bitflow`` as a lazy placeholder. Idempotent.
    """
    import lm_eval.models  # noqa: F401  (registers the built-in models)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_MODEL_TARGET)


class _RegisterWhenLoaded(importlib.abc.MetaPathFinder):
    """One-shot import hook: after ``lm_eval.api.registry`` executes, register ``bitflow`` in it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            loader_exec(module)
            register_lm_eval_model()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install_registration() -> None:
    if _REGISTRY_MODULE in sys.modules:
        register_lm_eval_model()
    elif not any(isinstance(f, _RegisterWhenLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenLoaded())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install_registration()

__all__ = ["MODEL_NAME", "register_lm_eval_model", *_LAZY]
