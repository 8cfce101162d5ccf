"""The ``ptq`` recipe on a tiny Llama: its options and their errors, sequential block-by-block calibration (each
block's Hessians come from the outputs of the already quantized blocks below), and PTQLinear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitflow.quant.ptq import PTQLinear
from bitflow.quant.ptq.gptq import HessianAccumulator
from bitflow.quant.ptq.sequential import calibrate_sequential
from bitflow.quant.recipes import recipe_from_config
from tests.helpers import TINY_LINEARS, tiny_llama


def test_bad_options_name_the_quant_key():
    for option, match in [
        ({"bits": 5}, r"quant.bits=5 is not allowed; allowed: 2, 3, 4, 6, 8"),
        ({"method": "awq"}, r"quant.method='awq' is not allowed; allowed: rtn, gptq"),
        ({"percdamp": -1}, r"quant.percdamp=-1 is not allowed"),
        ({"symmetric": "yes"}, r"quant.symmetric='yes' is not allowed"),
    ]:
        with pytest.raises(ValueError, match=match):
            recipe_from_config({"recipe": "ptq", **option})
    with pytest.raises(ValueError, match=r"quant.group_size=24 is not allowed: it does not divide .*\(layer layers.0"):
        recipe_from_config({"recipe": "ptq", "group_size": 24}).plan(tiny_llama())
    with pytest.raises(ValueError, match="needs calibration data"):
        recipe_from_config({"recipe": "ptq", "method": "gptq"}).convert(tiny_llama())
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['tok_emb'\]"):
        recipe_from_config({"recipe": "ptq", "exclude": []}).plan(tiny_llama())


def test_gptq_is_sequential_block_by_block():
    model = tiny_llama(0)
    windows = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    recipe = recipe_from_config({"recipe": "ptq", "method": "gptq", "bits": 2})
    original = tiny_llama(0)

    def record(name: str, layer: nn.Linear, h: torch.Tensor) -> None:  # what convert's callback gets
        seen[name] = h
        with torch.no_grad():
            layer.weight.mul_(0.5)  # any change: the next blocks must see it

    calibrate_sequential(model, TINY_LINEARS, windows, record, batch_size=4)
    assert list(seen) == TINY_LINEARS

    def hessians(m: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        acc = {n: HessianAccumulator(m.get_submodule(n).in_features) for n in names}
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: acc[n].add(a[0])) for n in names]
        with torch.no_grad():
            m(windows)
        for h in hooks:
            h.remove()
        return {n: a.hessian() for n, a in acc.items()}

    # block 0 sees the 16-bit model's inputs; block 1 the outputs of the changed block 0 (not the 16-bit ones)
    first = [n for n in TINY_LINEARS if n.startswith("layers.0.attn")]
    for name, h in hessians(original, first).items():
        assert torch.allclose(seen[name], h, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for name in [n for n in TINY_LINEARS if n.startswith("layers.0.")]:
            original.get_submodule(name).weight.mul_(0.5)
    for name, h in hessians(original, ["layers.1.attn.wq", "layers.1.mlp.w2"]).items():
        assert torch.allclose(seen[name], h, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seen["layers.1.attn.wq"], hessians(tiny_llama(0), ["layers.1.attn.wq"])["layers.1.attn.wq"])

    recipe.convert(model, calibration=windows)
    assert recipe.converted(model) == TINY_LINEARS and set(recipe.info) == set(TINY_LINEARS)
    layer = model.get_submodule("layers.1.mlp.w2")
    assert isinstance(layer, PTQLinear) and not layer.weight.requires_grad
    assert torch.equal(layer.weight, layer.dequantized()) and set(layer.codes.unique().tolist()) <= {0, 1, 2, 3}
    x = torch.randn(3, layer.in_features)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized()))


def test_a_run_cannot_train_with_the_post_training_recipe():
    from bitflow.config import ConfigError, quant_and_transition
    from tests.helpers import compose

    cfg = compose(["paths.output_dir=.", "quant.recipe=ptq"])  # quant=none (default) plus the recipe name
    with pytest.raises(ConfigError, match=r"quant.recipe='ptq' is not allowed; allowed: a recipe that trains "
                                          r"\(bitlinear, dqt\).*bitflow-ptq ckpt="):
        quant_and_transition(cfg)
