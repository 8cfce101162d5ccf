"""PackedTernaryLinear: 2-bit codes in memory, the fake-quantized model's logits."""

from __future__ import annotations

import pytest
import torch

from bitflow.quant import set_strength, to_bitlinear
from bitflow.quant.packed import PackedTernaryLinear, pack_model
from tests.helpers import TINY_LINEARS, tiny_llama


@pytest.mark.parametrize("options", [{}, {"granularity": "channel", "input_norm": "rmsnorm"}])
def test_packed_model_gives_the_fake_quantized_logits_with_8x_smaller_linear_weights(options):
    model = tiny_llama(n_kv_heads=1).eval()
    to_bitlinear(model, exclude=["lm_head"], **options)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    bf16_bytes = {n: model.get_submodule(n).weight.numel() * 2 for n in TINY_LINEARS}
    assert pack_model(model) == TINY_LINEARS
    for name in TINY_LINEARS:
        layer = model.get_submodule(name)
        assert isinstance(layer, PackedTernaryLinear) and not any(True for _ in layer.parameters())
        assert layer.packed.dtype == torch.uint8 and layer.packed.numel() * 8 == bf16_bytes[name]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_a_bitlinear_mid_phase_in_is_not_packed():
    model = tiny_llama()
    to_bitlinear(model, exclude=["lm_head"])
    set_strength(model, weight=0.5)
    with pytest.raises(ValueError, match=r"layers.0.attn.wq: .*full strength"):
        pack_model(model)
