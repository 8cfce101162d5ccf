"""The quantization recipes (bitflow.quant.recipes): options, plan, convert, checkpoint state, optimizer handover."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bitflow.models.llama import Llama
from bitflow.quant import BitLinear, BitLinearOptions
from bitflow.quant.dqt import DQTAdamW, DQTLinear
from bitflow.quant.recipe import Conversion, QuantRecipe
from bitflow.quant.recipes import RECIPES, recipe_for_state, recipe_from_config
from tests.helpers import tiny_llama

MLP = [f"layers.{i}.mlp.{w}" for i in range(2) for w in ("w1", "w3", "w2")]
BITLINEAR = {"recipe": "bitlinear"}
DQT = {"recipe": "dqt"}
PTQ = {"recipe": "ptq", "method": "rtn", "bits": 3, "group_size": 16}  # RTN: a conversion that needs no data


def _model(seed: int = 0) -> Llama:
    return tiny_llama(seed)


class HookedLinear(nn.Linear):
    """An nn.Linear subclass (as a user's model may have), used to check that the plan leaves layers alone."""


@pytest.mark.parametrize("quant", [BITLINEAR, DQT, PTQ])
def test_plan_is_pure_hooks_and_subclasses_survive(quant):
    model = _model()
    old = model.layers[0].mlp.w1
    hooked = HookedLinear(old.in_features, old.out_features, bias=False)
    model.layers[0].mlp.w1 = hooked
    seen = []
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    before = {name: (type(m), id(m)) for name, m in model.named_modules()}
    params = {name: id(p) for name, p in model.named_parameters()}
    recipe = recipe_from_config({**quant, "include": ["mlp.*"]})
    assert recipe.plan(model) == MLP
    assert {name: (type(m), id(m)) for name, m in model.named_modules()} == before
    assert {name: id(p) for name, p in model.named_parameters()} == params
    model(torch.randint(0, 64, (1, 4)))
    assert len(seen) == 1  # the hook still fires on the very same HookedLinear
    # converting carries the forward hook over to the new layer
    recipe.convert(model)
    model(torch.randint(0, 64, (1, 4)))
    assert len(seen) == 2


@pytest.mark.parametrize("quant", [BITLINEAR, DQT, PTQ])
def test_state_then_restore_rebuilds_the_model(quant):
    recipe = recipe_from_config({**quant, "include": ["mlp.*"]})
    src = _model(0)
    assert recipe.state(src) is None and recipe.converted(src) == []
    assert recipe.convert(src).names == MLP == recipe.converted(src)
    if recipe.supports_phase_in:
        recipe.set_strength(src, 0.25)
    else:
        with pytest.raises(ValueError, match="has no phase-in"):
            recipe.set_strength(src, 0.25)
    state = recipe.state(src)
    assert state["kind"] == recipe.name and state["layers"] == MLP
    assert recipe_for_state(state).name == recipe.name
    dst = _model(1)
    assert recipe.restore(dst, state) == MLP
    assert recipe.converted(dst) == MLP
    dst.load_state_dict(src.state_dict())  # the state dict of the converted model loads unchanged
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(src(idx), dst(idx))
    modules = {id(m) for m in dst.modules()}
    assert recipe.restore(dst, state) == MLP  # idempotent
    assert {id(m) for m in dst.modules()} == modules
    assert recipe.state(dst) == state


def test_bitlinear_state_format_and_strength():
    recipe = recipe_from_config({**BITLINEAR, "include": ["mlp.*"], "weight_scale": "absmedian", "act_bits": None})
    model = _model()
    recipe.convert(model)
    recipe.set_strength(model, 0.25)
    assert recipe.state(model) == {
        "kind": "bitlinear",
        "layers": MLP,
        "options": {**dataclasses.asdict(BitLinearOptions()), "weight_scale": "absmedian", "act_bits": None},
        "strength": {"weight": 0.25, "act": 0.25},
    }


@pytest.mark.parametrize(
    "state, match",
    [
        ({"kind": "gptq"}, "unknown quant state kind 'gptq'; known: bitlinear, dqt, ptq"),
        ({"kind": "bitlinear", "layers": ["layers.0.mlp.w1"]}, r"lacks \['options', 'strength'\]"),
        ({"kind": "bitlinear", "layers": ["layers.9.mlp.w1"], "options": {}, "strength": {}},
         r"does not have: \['layers.9.mlp.w1'\]"),
        ({"kind": "bitlinear", "layers": ["layers.0.mlp_norm"], "options": {}, "strength": {}}, "not nn.Linear"),
        ({"kind": "bitlinear", "layers": [], "options": {}, "strength": {}}, "names no layers"),
        ({"kind": "bitlinear", "layers": MLP, "options": {"weight_scale": "absmax"}, "strength": {}},
         "the checkpoint's BitLinear options .* differ from this run's quant config"),
    ],
)
def test_bad_states_raise(state, match: str):
    with pytest.raises(ValueError, match=match):
        if state.get("kind") == "bitlinear":
            recipe_from_config(BITLINEAR).restore(_model(), state)
        else:
            recipe_for_state(state)


@pytest.mark.parametrize("quant", [BITLINEAR, DQT])
@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_adopt_optimizer_keeps_or_resets_the_converted_weights(quant, mode):
    from bitflow.lm import param_groups

    model = _model()
    recipe = recipe_from_config(quant)
    opt = recipe.build_optimizer(model, param_groups(model, 0.1), lr=1e-2)
    x = torch.randint(0, 64, (2, 9))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    step()
    w1 = model.layers[0].mlp.w1.weight
    moments = opt.state[w1]["exp_avg"].clone()
    conversion = recipe.convert(model)
    recipe.adopt_optimizer(opt, model, conversion, mode)
    step()
    layer = model.layers[0].mlp.w1
    if isinstance(layer, BitLinear):
        assert layer.weight is w1  # the same Parameter continues
        assert float(opt.state[w1]["step"]) == (3 if mode == "keep" else 1)
    else:
        assert isinstance(layer, DQTLinear) and isinstance(opt, DQTAdamW)
        assert all(p is not w1 for g in opt.param_groups for p in g["params"])  # the float weight left
        st = opt.dqt_state["layers.0.mlp.w1"]
        assert float(st["step"]) == (3 if mode == "keep" else 1)
        if mode == "keep":  # the AdamW moments continue as the DQT moments: one more step of the EMA
            assert not torch.equal(st["exp_avg"], torch.zeros_like(moments))


def test_bad_options_name_the_config_key():
    with pytest.raises(ValueError, match="quant.weight_bits=1 is not supported"):
        recipe_from_config({**BITLINEAR, "weight_bits": 1})
    with pytest.raises(ValueError, match="quant.moment_dtype='fp8' is not supported"):
        recipe_from_config({**DQT, "moment_dtype": "fp8"})
    with pytest.raises(ValueError, match="quant.embeddings is not an option of the 'bitlinear' recipe"):
        recipe_from_config({**BITLINEAR, "embeddings": True})
    with pytest.raises(ValueError, match="quant.recipe='gptq' is not allowed; allowed: none, bitlinear, dqt, ptq"):
        recipe_from_config({"recipe": "gptq"})
    assert recipe_from_config({"recipe": "none"}) is None and recipe_from_config(None) is None


def test_tied_weights_must_be_converted_on_both_sides_for_dqt():
    model = _model()  # the tiny Llama ties lm_head and the token embedding
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['tok_emb'\]"):
        recipe_from_config({**DQT, "exclude": []}).plan(model)
    assert "lm_head" in recipe_from_config({**DQT, "exclude": [], "embeddings": True}).plan(model)
    # BitLinear keeps the Parameter: a tied head may be converted alone
    assert "lm_head" in recipe_from_config({**BITLINEAR, "exclude": []}).plan(model)


def test_a_third_recipe_is_one_class_and_one_registry_line(monkeypatch):
    class Halve(QuantRecipe):
        """A toy method: halves the selected weights once (stands for PTQ and friends)."""

        name = "halve"

        def plan(self, model):
            return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]

        def convert(self, model):
            names = self.plan(model)
            with torch.no_grad():
                for n in names:
                    model.get_submodule(n).weight.mul_(0.5)
            model.halved = names
            return Conversion(names)

        def converted(self, model):
            return list(getattr(model, "halved", []))

        def state(self, model):
            names = self.converted(model)
            return {"kind": self.name, "layers": names, "options": {}} if names else None

        def restore(self, model, state):
            model.halved = list(state["layers"])
            return model.halved

    monkeypatch.setitem(RECIPES, "halve", Halve)
    recipe = recipe_from_config({"recipe": "halve", "exclude": []})
    model = _model()
    assert recipe.convert(model).names == recipe.converted(model)
    assert recipe_for_state(recipe.state(model)).name == "halve"
