"""DQTAdamW: AdamW for ordinary Parameters plus DQT's stochastic-rounding step on the int8 codes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

import bitflow.quant.functional as QF
from bitflow.quant.dqt.convert import unique_dqt_weights
from bitflow.quant.dqt.grid import MOMENT_DTYPES
from bitflow.quant.dqt.layers import DQTWeight

__all__ = ["DQTAdamW", "stochastic_round_bf16"]


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round a float32 tensor to bfloat16 stochastically (unbiased): add a uniform random integer in
    ``[0, 2^16)`` to the 16 low bits of the float32 bit pattern, then truncate them.

    A bfloat16 is a float32 without its 16 low mantissa bits, so the result is the next bfloat16 towards zero or
    away from it with probabilities proportional to the distances. Used for bfloat16 AdamW moments, where
    round-to-nearest would freeze slowly decaying moments (a change below half a bf16 ulp is lost every step).
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class DQTAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for ordinary Parameters plus DQT's stochastic-rounding step for DQT layers.

    Ordinary param groups are stepped by AdamW itself (same code path, ``fused``/``foreach`` included). One extra
    param group, ``name="dqt"``, is created for the DQT layers: its ``lr`` follows LR schedulers like any group,
    its ``weight_decay`` is ``dqt_weight_decay`` (default: ``weight_decay``) and its ``params`` are the current
    float leaves of the DQT layers (empty between steps). Per DQT weight ``W = codes * scale`` (arXiv 2412.04787),
    with AdamW's decoupled weight decay and bias correction exactly as ``torch.optim.AdamW``::

        W   = W (1 - lr wd)
        m   = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
        W'  = W - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
        scale' = scale * max(codes) / Qp       (scale_update="max"; "fixed": scale' = scale)
        codes  = SR(clip(W' / scale', Qn, Qp)) ;  scale = scale'

    Args:
        params: ordinary Parameters or param groups (may be empty).
        dqt_modules: ``(name, DQT layer)`` pairs to train; tied layers (shared codes) are stepped once. More can be
            added later with :meth:`add_dqt_modules` (a run that switches to DQT mid-run).
        moment_dtype: ``"float32"`` (AdamW's own precision) or ``"bfloat16"`` (half the optimizer memory of the DQT
            layers; stored with stochastic rounding).
        seed: seed of the rounding generator(s), one per device; ``None`` = ``torch.initial_seed()``.
        track_flips: count, per step and layer, the codes that changed (``last_flips``; one compare per weight;
            :meth:`take_flip_rate` gives their mean share since its previous call).
        Other arguments as ``torch.optim.AdamW`` (``amsgrad`` is not supported).

    ``state_dict()`` adds ``"dqt"``: the moments per layer name and the generators' states.
    """

    def __init__(
        self,
        params: Iterable[Any],
        dqt_modules: Iterable[tuple[str, nn.Module]] = (),
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        dqt_weight_decay: float | None = None,
        moment_dtype: str = "float32",
        seed: int | None = None,
        track_flips: bool = True,
        **adamw_kwargs: Any,
    ) -> None:
        if adamw_kwargs.get("amsgrad"):
            raise ValueError("DQTAdamW does not support amsgrad=True")
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype={moment_dtype!r} is not supported; allowed: {', '.join(MOMENT_DTYPES)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; allowed: null or an int")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._dqt_params: list[Tensor] = []  # the "dqt" group's params: the leaves of the current step
        wd = weight_decay if dqt_weight_decay is None else dqt_weight_decay
        groups.append({"params": self._dqt_params, "name": "dqt", "dqt": True, "weight_decay": wd})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        self._dqt_group["params"] = self._dqt_params  # Optimizer copied the list; the layers append to ours
        # GradScaler must unscale through the param groups (it would otherwise hand a fused step the scale and skip
        # unscaling the DQT leaves)
        self._step_supports_amp_scaling = False
        self.moment_dtype = moment_dtype
        self.seed = torch.initial_seed() if seed is None else seed
        self.track_flips = track_flips
        self.dqt_entries: list[tuple[str, DQTWeight]] = []
        self.dqt_state: dict[str, dict[str, Tensor]] = {}
        self.last_flips: dict[str, Tensor] = {}
        self._flip_rate_sum: Tensor | None = None  # sum of the per-step flip rates since take_flip_rate()
        self._flip_rate_steps = 0
        self._generators: dict[str, torch.Generator] = {}
        self._pending_rng: dict[str, Tensor] = {}
        self._synced = False
        self.add_dqt_modules(dqt_modules)

    @classmethod
    def for_model(cls, model: nn.Module, groups: list[dict[str, Any]], **kwargs: Any) -> DQTAdamW:
        """A DQTAdamW over ``groups`` and every DQT layer of ``model``; the DQT weight decay defaults to the
        ``weight_decay`` of the group named ``"decay"`` (bitflow's matrices group)."""
        decay = [g["weight_decay"] for g in groups if g.get("name") == "decay"]
        if decay and kwargs.get("dqt_weight_decay") is None:
            kwargs["dqt_weight_decay"] = decay[0]
        return cls(groups, unique_dqt_weights(model), **kwargs)

    # ------------------------------------------------------------------------------------------ DQT layers
    @property
    def _dqt_group(self) -> dict[str, Any]:
        return next(g for g in self.param_groups if g.get("dqt"))

    def add_dqt_modules(
        self,
        modules: Iterable[tuple[str, nn.Module]],
        replaced: dict[str, nn.Parameter] | None = None,
        keep_state: bool = False,
    ) -> None:
        """Train these ``(name, DQT layer)`` pairs from now on.

        ``replaced`` maps a layer name to the float weight Parameter it replaced (a mid-run switch): that
        Parameter leaves the ordinary groups, and its AdamW state is dropped or, with ``keep_state``, becomes the
        layer's DQT moments (same step count; converted to ``moment_dtype``).
        """
        names = {name for name, _ in self.dqt_entries}
        codes = {id(m.codes) for _, m in self.dqt_entries}
        for name, m in modules:
            if not isinstance(m, DQTWeight):
                raise ValueError(f"{name} is a {type(m).__name__}, not a DQT layer")
            if name in names or id(m.codes) in codes:
                continue
            m._slot.sink = self._dqt_params
            self.dqt_entries.append((name, m))
            names.add(name)
            codes.add(id(m.codes))
        for name, p in (replaced or {}).items():
            for g in self.param_groups:
                g["params"][:] = [q for q in g["params"] if q is not p]
            old = self.state.pop(p, None)
            if keep_state and old and name in names:
                dt = MOMENT_DTYPES[self.moment_dtype]
                self.dqt_state[name] = {
                    "step": torch.as_tensor(old["step"], dtype=torch.float32).clone().cpu(),
                    "exp_avg": old["exp_avg"].detach().to(dt).clone(),
                    "exp_avg_sq": old["exp_avg_sq"].detach().to(dt).clone(),
                }

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded rounding generator of ``device`` (created on first use; restored states apply)."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_rng:
                gen.set_state(self._pending_rng.pop(key))
            self._generators[key] = gen
        return gen

    @torch.no_grad()
    def sync_dqt_grads(self) -> None:
        """Average the DQT gradients over data-parallel ranks (DDP reduces only registered Parameters).

        Call it before gradient clipping (bitflow's DQT callback does, in ``on_before_optimizer_step``);
        :meth:`step` calls it too if nobody did. A no-op outside ``torch.distributed``.
        """
        if self._synced:
            return
        self._synced = True
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for leaf in self._dqt_params:
            if leaf.grad is not None:
                dist.all_reduce(leaf.grad, op=dist.ReduceOp.SUM)
                leaf.grad.div_(world)

    def named_leaves(self) -> list[tuple[str, Tensor]]:
        """``(layer name, float leaf)`` of the DQT layers that took part in the current step (what the ``"dqt"``
        param group holds between the forward and :meth:`step`)."""
        return [(name, m._slot.leaf) for name, m in self.dqt_entries if m._slot.leaf is not None]

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (if any), AdamW on the ordinary groups, then the DQT step; frees the DQT leaves."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_dqt_grads()
        leaves = list(self._dqt_params)
        self._dqt_params.clear()  # AdamW itself must not see the leaves
        try:
            super().step()
        finally:
            self._dqt_params.extend(leaves)
        try:
            self._dqt_step()
        finally:
            self._dqt_params.clear()
            for _, m in self.dqt_entries:
                m._slot.leaf = None
            self._synced = False
        return loss

    def _dqt_step(self) -> None:
        group = self._dqt_group
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        maximize = group.get("maximize", False)
        dt = MOMENT_DTYPES[self.moment_dtype]
        self.last_flips = {}
        for name, m in self.dqt_entries:
            leaf = m._slot.leaf
            if leaf is None or leaf.grad is None:
                continue  # the layer took no part in this step (as AdamW skips Parameters without gradient)
            grad = leaf.grad.float()
            if maximize:
                grad = -grad
            st = self.dqt_state.get(name)
            if st is None:
                st = self.dqt_state[name] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(grad, dtype=dt),
                    "exp_avg_sq": torch.zeros_like(grad, dtype=dt),
                }
            gen = self.generator(m.codes.device)
            st["step"] += 1
            t = float(st["step"])
            exp_avg, exp_avg_sq = st["exp_avg"].float(), st["exp_avg_sq"].float()
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if dt == torch.float32:
                st["exp_avg"], st["exp_avg_sq"] = exp_avg, exp_avg_sq
            else:
                st["exp_avg"].copy_(stochastic_round_bf16(exp_avg, gen))
                st["exp_avg_sq"].copy_(stochastic_round_bf16(exp_avg_sq, gen))
            # W' = W (1 - lr wd) - lr / bc1 * m / (sqrt(v / bc2) + eps), on the stored weight (torch's AdamW order)
            w = m.codes.float().mul_(m.scale)
            w.mul_(1 - lr * wd)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            w.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
            del exp_avg, exp_avg_sq, denom
            scale = m.scale
            if m.scale_update == "max":  # the authors' s = Qp / max(W_prev): scale * max(codes) / Qp
                scale = scale * (m.codes.max().float().clamp_min(1.0) / m.qp)
            x = w.div_(scale).clamp_(m.qn, m.qp)
            codes = QF.stochastic_round(x, gen).to(torch.int8)
            if self.track_flips:
                self.last_flips[name] = (codes != m.codes).sum()
            m.codes.copy_(codes)
            m.scale.copy_(scale)
        if self.last_flips:
            sizes = {name: m.codes.numel() for name, m in self.dqt_entries if name in self.last_flips}
            rate = sum(f.float() for f in self.last_flips.values()) / sum(sizes.values())
            self._flip_rate_sum = rate if self._flip_rate_sum is None else self._flip_rate_sum + rate
            self._flip_rate_steps += 1

    def take_flip_rate(self) -> Tensor | None:
        """The mean share of DQT weight codes changed per optimizer step since the previous call (a 0-dim device
        tensor, no host sync), or ``None`` if no DQT step ran since; resets the running mean."""
        if self._flip_rate_sum is None:
            return None
        mean = self._flip_rate_sum / self._flip_rate_steps
        self._flip_rate_sum, self._flip_rate_steps = None, 0
        return mean

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        leaves = list(self._dqt_params)
        self._dqt_params.clear()  # a checkpoint holds no leaves (they are rebuilt by the next forward)
        try:
            sd = super().state_dict()
        finally:
            self._dqt_params.extend(leaves)
        sd[self.EXTRA_STATE_KEY] = self.extra_state()
        return sd

    #: the key of :meth:`extra_state` in :meth:`state_dict`: state that is not per Parameter. Under FSDP2,
    #: ``torch.distributed.checkpoint`` rebuilds optimizer state dicts from Parameter states alone and drops it;
    #: bitflow's LanguageModel writes it back into the checkpoint and restores it (:meth:`load_extra_state`)
    EXTRA_STATE_KEY = "dqt"

    def extra_state(self) -> dict[str, Any]:
        """The DQT layers' moments (per layer name), the rounding generators' states, the seed and moment dtype."""
        rng = dict(self._pending_rng)
        rng.update({key: gen.get_state() for key, gen in self._generators.items()})
        return {
            "state": {name: dict(st) for name, st in self.dqt_state.items()},
            "rng": rng,
            "seed": self.seed,
            "moment_dtype": self.moment_dtype,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        dqt = sd.pop("dqt", None)
        leaves = list(self._dqt_params)
        self._dqt_params.clear()
        try:
            super().load_state_dict(sd)
        finally:
            self._dqt_params.extend(leaves)
            self._dqt_group["params"] = self._dqt_params  # load_state_dict rebuilt the group dicts
        if dqt is not None:
            self.load_extra_state(dqt)

    def load_extra_state(self, dqt: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (moments move to their layer's device and ``moment_dtype``)."""
        known = {name: m for name, m in self.dqt_entries}
        unknown = sorted(set(dqt["state"]) - set(known))
        if unknown:
            raise ValueError(f"the optimizer state has DQT moments of layers this optimizer does not train: {unknown}")
        dt = MOMENT_DTYPES[self.moment_dtype]
        self.dqt_state = {
            name: {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).clone().cpu(),
                "exp_avg": st["exp_avg"].to(device=known[name].codes.device, dtype=dt).clone(),
                "exp_avg_sq": st["exp_avg_sq"].to(device=known[name].codes.device, dtype=dt).clone(),
            }
            for name, st in dqt["state"].items()
        }
        self.seed = dqt.get("seed", self.seed)
        self._generators = {}
        self._pending_rng = {key: state.cpu() for key, state in dqt.get("rng", {}).items()}

