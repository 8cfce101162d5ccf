"""The quantization recipes and their registry: ``quant.recipe`` in the config picks one by name.

Add a method: write ``bitflow/quant/recipes/<name>.py`` with a :class:`~bitflow.quant.recipe.QuantRecipe` subclass,
add one line to :data:`RECIPES`, and a ``conf/quant/<option>.yaml`` with ``recipe: <name>``. Every switch, resume
and report test runs over the registered recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bitflow.quant.recipe import QuantRecipe
from bitflow.quant.recipes.bitlinear import BitLinearRecipe
from bitflow.quant.recipes.dqt import DQTRecipe
from bitflow.quant.recipes.ptq import PTQRecipe

__all__ = ["RECIPES", "QuantRecipe", "recipe_for_state", "recipe_from_config"]

RECIPES: dict[str, type[QuantRecipe]] = {
    BitLinearRecipe.name: BitLinearRecipe,
    DQTRecipe.name: DQTRecipe,
    PTQRecipe.name: PTQRecipe,  # post-training quantization (bitflow-ptq), applied once from a checkpoint
}
NONE = "none"  # quant=none: 16-bit, no recipe


def recipe_from_config(config: Mapping[str, Any] | None, key: str = "quant") -> QuantRecipe | None:
    """The recipe a ``quant`` config names (``recipe: bitlinear | dqt | ptq | none`` plus its options), or ``None`` for
    16-bit (``recipe: none``, an empty or a null config). Raises ``ValueError`` naming ``<key>.<option>``."""
    config = dict(config or {})
    name = config.pop("recipe", NONE if not config else None)
    if name == NONE:
        if config:
            raise ValueError(
                f"{key}.{sorted(config)[0]} is set, but {key}.recipe=none quantizes nothing; pick a quantization "
                f"(e.g. quant=ternary) or drop the option"
            )
        return None
    if name not in RECIPES:
        raise ValueError(f"{key}.recipe={name!r} is not allowed; allowed: {', '.join([NONE, *RECIPES])}")
    return RECIPES[name].from_config(config, key=key)


def recipe_for_state(state: Mapping[str, Any]) -> QuantRecipe:
    """The recipe that wrote a checkpoint's quant ``state`` (``state["kind"]`` names it)."""
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in RECIPES:
        raise ValueError(f"unknown quant state kind {kind!r}; known: {', '.join(RECIPES)}")
    return RECIPES[kind].from_state(state)
