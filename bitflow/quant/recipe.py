"""The quantization recipe interface: what a model is quantized to, and how its optimizer and checkpoints handle it.

Modelled on torchtitan's ModelConverter: the recipe owns the module rewrite, the optimizer integration and the
checkpoint state; the training loop only calls its hooks. bitflow's :class:`~bitflow.lm.LanguageModel` owns one
recipe (``quant`` config group: *what*), and :class:`~bitflow.callbacks.PrecisionTransition` decides *when* it is
applied (``transition`` config group). The recipes and their registry are in :mod:`bitflow.quant.recipes`.

A recipe's life in a run::

    recipe = recipes.recipe_from_config({"recipe": "bitlinear", "weight_scale": "absmedian"})
    names = recipe.plan(model)                      # which layers; pure: the model is not touched
    opt = recipe.build_optimizer(model, groups, lr=...)
    ...                                             # 16-bit steps
    conversion = recipe.convert(model)              # the switch
    recipe.adopt_optimizer(opt, model, conversion, "keep")
    recipe.set_strength(model, 0.5)                 # phase-in (if supported)
    recipe.before_optimizer_step(model, opt)        # every step, before gradient clipping
    recipe.metrics(model, opt)                      # 0-dim device tensors, at logging steps
    state = recipe.state(model)                     # plain data for the checkpoint
    recipe.restore(fresh_model, state)              # on load, before the weights load
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bitflow.quant.select import as_patterns

__all__ = [
    "OPTIMIZER_MODES", "Conversion", "QuantOptions", "QuantRecipe", "adamw", "check_mode", "check_state",
    "fused_adamw_supported", "named_layers", "unwrap_optimizer",
]

OPTIMIZER_MODES = ("keep", "reset")


@dataclass(frozen=True)
class QuantOptions:
    """Options every recipe has: which layers (fnmatch globs on qualified names, see :mod:`bitflow.quant.select`).

    Each recipe's options dataclass extends this one; its fields are the recipe's ``quant.<key>`` config keys and
    their defaults are the recipe's defaults (one source). Values are validated in ``__post_init__``; messages start
    with the key's name (the registry prefixes ``quant.``).
    """

    include: tuple[str, ...] | None = None  # None = every candidate layer
    exclude: tuple[str, ...] | None = ("lm_head",)  # BitNet and DQT keep the output head in 16 bits
    # the options a converted layer itself holds (and a checkpoint's quant state records); set by each recipe
    LAYER_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", as_patterns("include", self.include))
        object.__setattr__(self, "exclude", as_patterns("exclude", self.exclude))

    def layer_options(self) -> dict[str, Any]:
        """The keyword options of a converted layer (``LAYER_KEYS``), without the layer filter."""
        return {k: getattr(self, k) for k in self.LAYER_KEYS}


@dataclass
class Conversion:
    """What :meth:`QuantRecipe.convert` did: the converted layer names, and the Parameters that left the model
    (a recipe that keeps no float weight, such as DQT, removes them; BitLinear keeps every Parameter)."""

    names: list[str]
    replaced: dict[str, nn.Parameter] = field(default_factory=dict)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def fused_adamw_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter of ``groups``: dense floating-point tensors on a
    device type torch lists for fused optimizers (CPU, CUDA, XPU, MPS, ...)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        p.device.type in devices and torch.is_floating_point(p) and not p.is_sparse for p in params
    )


def adamw(model: nn.Module, groups: list[dict[str, Any]], **adamw_kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(groups, **adamw_kwargs)``: the optimizer of 16-bit runs and the recipes' default.

    The one place the AdamW implementation is chosen: ``fused`` unset or ``None`` (``optimizer.fused: null``) means
    torch's fused kernel (one kernel per parameter group and step instead of a dozen elementwise passes per tensor)
    wherever :func:`fused_adamw_supported`, unless ``foreach`` is given; ``fused=False`` keeps torch's default.
    A fused AdamW unscales gradients through its param groups like any other optimizer under a ``GradScaler``
    (``16-mixed``), so gradient clipping works with it (Lightning refuses to clip for an optimizer that unscales
    inside its step).
    """
    if adamw_kwargs.get("fused") is None and adamw_kwargs.get("foreach") is None:
        adamw_kwargs["fused"] = fused_adamw_supported(groups)
    optimizer = torch.optim.AdamW(groups, **adamw_kwargs)
    if optimizer.defaults.get("fused"):
        optimizer._step_supports_amp_scaling = False  # GradScaler: unscale_ first, then a plain step()
    return optimizer


class QuantRecipe(abc.ABC):
    """One quantization method. Subclasses set ``name``, ``Options`` and implement the abstract methods.

    A third method is one new file in :mod:`bitflow.quant.recipes` (a subclass of this) plus one line in that
    package's ``RECIPES`` registry, and a ``conf/quant/<option>.yaml`` with ``recipe: <name>``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[QuantOptions]] = QuantOptions
    supports_phase_in: ClassVar[bool] = False
    # whether convert keeps every Parameter (BitLinear) or removes some (DQT drops the float weights)
    keeps_parameters: ClassVar[bool] = True
    # whether a run can train with it (quant.recipe); False: applied once to a trained model (post-training)
    trains: ClassVar[bool] = True

    def __init__(self, options: QuantOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(self.options).__name__}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str = "quant") -> QuantRecipe:
        """The recipe with these options (``recipe`` key excluded). Raises ``ValueError`` naming ``<key>.<option>``
        for an unknown key or a bad value."""
        allowed = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ValueError(
                f"{key}.{unknown[0]} is not an option of the {cls.name!r} recipe; allowed: {', '.join(allowed)}"
            )
        try:
            return cls(cls.Options(**dict(config)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{key}.{e}") from None

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QuantRecipe:
        """The recipe that wrote a checkpoint's quant ``state``: the options it recorded, defaults for the rest
        (e.g. the layer filter, which the state's explicit layer names make moot)."""
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        return cls(cls.Options(**{k: v for k, v in dict(state.get("options") or {}).items() if k in fields}))

    def config(self) -> dict[str, Any]:
        """``{"recipe": name, **options}`` as plain data (what ``from_config`` takes; lists for tuples)."""
        out = {"recipe": self.name}
        for k, v in dataclasses.asdict(self.options).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # ------------------------------------------------------------------------------------------ what
    @abc.abstractmethod
    def plan(self, model: nn.Module) -> list[str]:
        """The qualified names of the layers :meth:`convert` would convert. Pure: ``model`` is not changed.
        Raises ``ValueError`` (naming ``quant.include``/``quant.exclude``) when nothing matches."""

    @abc.abstractmethod
    def convert(self, model: nn.Module) -> Conversion:
        """Convert the planned layers of ``model`` in place; at full strength where phase-in applies."""

    @abc.abstractmethod
    def converted(self, model: nn.Module) -> list[str]:
        """The names of the layers of ``model`` this recipe has converted (empty for a 16-bit model)."""

    # ------------------------------------------------------------------------------------------ checkpoints
    @abc.abstractmethod
    def state(self, model: nn.Module) -> dict[str, Any] | None:
        """The quantization state of ``model`` as plain data (``{"kind": name, "layers": [...], "options": {...},
        ...}``), or ``None`` when nothing is converted. May sync with the device: call it at checkpoint time."""

    @abc.abstractmethod
    def restore(self, model: nn.Module, state: Mapping[str, Any]) -> list[str]:
        """Rebuild ``state`` on a fresh 16-bit ``model`` of the same architecture (before its weights load);
        idempotent. Raises ``ValueError`` when the state's options differ from this recipe's."""

    # ------------------------------------------------------------------------------------------ phase-in
    def set_strength(self, model: nn.Module, value: float) -> None:
        """Set the quantization strength lambda in [0, 1] of the converted layers (arXiv 2502.11895)."""
        raise ValueError(
            f"the {self.name!r} recipe has no phase-in (quantization strength); use transition.phase_in=none"
        )

    # ------------------------------------------------------------------------------------------ optimizer
    def build_optimizer(
        self, model: nn.Module, groups: list[dict[str, Any]], **adamw_kwargs: Any
    ) -> torch.optim.Optimizer:
        """The optimizer of a run with this recipe, before or after the conversion (default: AdamW)."""
        return adamw(model, groups, **adamw_kwargs)

    def adopt_optimizer(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, conversion: Conversion, mode: str = "keep"
    ) -> None:
        """Hand the layers converted mid-run to ``optimizer``: ``keep`` their AdamW state or ``reset`` it.

        Default (recipes that keep the Parameters): ``reset`` drops the state of the converted layers' Parameters,
        so AdamW starts them afresh (step 0, zero moments) at the next step; others are untouched.
        """
        check_mode(mode)
        if mode == "reset":
            opt = unwrap_optimizer(optimizer)
            params = {id(p) for n in conversion.names for p in model.get_submodule(n).parameters(recurse=False)}
            for p in [p for p in opt.state if id(p) in params]:
                del opt.state[p]

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called every optimizer step after backward and before gradient clipping (default: nothing)."""
        return None

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Scalars to log, as 0-dim tensors on the model's device (no host sync here). Default: none."""
        return {}


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`OPTIMIZER_MODES`."""
    if mode not in OPTIMIZER_MODES:
        raise ValueError(f"transition.optimizer_state={mode!r} is not allowed; allowed: {', '.join(OPTIMIZER_MODES)}")


def check_state(state: Mapping[str, Any], kind: str, keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``state`` is a quant state of ``kind`` with ``keys`` and at least one layer."""
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        raise ValueError(f"not a {kind!r} quant state: {state!r}")
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ValueError(f"{kind} quant state lacks {missing}; it has {sorted(state)}")
    if not state["layers"]:
        raise ValueError(f"{kind} quant state names no layers")


def named_layers(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    """Every named submodule of ``model`` (all names); raises ``ValueError`` if one of ``layers`` is absent."""
    modules = dict(model.named_modules(remove_duplicate=False))
    absent = [name for name in layers if name not in modules]
    if absent:
        raise ValueError(
            f"the quant state names layers that {type(model).__name__} does not have: {absent[:8]} "
            "(is the checkpoint from another architecture?)"
        )
    return modules
