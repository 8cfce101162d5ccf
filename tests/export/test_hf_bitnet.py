"""format=hf_bitnet: transformers' packed BitNet layout, loaded and run by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitflow.config import ConfigError
from bitflow.export.run import export_checkpoint
from bitflow.export.source import load_source
from tests.export.conftest import write_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def test_packing_is_transformers_own_layout():
    from transformers.integrations.bitnet import pack_weights

    from bitflow.export.hf_bitnet import pack_bitnet

    codes = torch.randint(-1, 2, (12, 7), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    assert torch.equal(pack_bitnet(codes), pack_weights(codes.to(torch.int16)))


@pytest.mark.parametrize(
    ("quant", "match"),
    [
        ({"granularity": "channel"}, "quant.granularity=channel"),
        ({"input_norm": "layernorm"}, "quant.input_norm=layernorm"),
        ({"act_bits": 4}, "quant.act_bits=4"),
        ({"exclude": None}, "a ternary lm_head"),
    ],
)
def test_options_transformers_cannot_express_are_refused(tokenizer, tmp_path: Path, quant, match):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", tokenizer, quant={"recipe": "bitlinear", **quant})
    out = tmp_path / "hf"
    with pytest.raises(ConfigError, match=f"BitNet layout cannot express.*{match}"):
        export_checkpoint({"ckpt": str(ckpt), "format": "hf_bitnet", "out": str(out)})
    assert not out.exists()


@pytest.mark.slow  # transformers' BitLinear torch.compile-s its unpacking on first use
def test_packed_bitnet_export_loads_in_transformers_and_matches_bitflow(ternary_ckpt: Path, tmp_path: Path):
    pytest.importorskip("accelerate")  # transformers' BitNet quantizer requires it
    out = tmp_path / "hf"
    export_checkpoint({"ckpt": str(ternary_ckpt), "format": "hf_bitnet", "out": str(out)})
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["linear_class"], config["quantization_mode"]) == (
        "bitnet", "bitlinear", "offline",
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "BitLinear" and q.weight.dtype == torch.uint8
    source = load_source(ternary_ckpt)
    assert float(q.weight_scale) == pytest.approx(float(source.ternary()["layers.0.attn.wq"].scale))
    ids = torch.tensor([source.tokenizer.encode("class Point:\n    def add(self, x):\n        return x").ids])
    with torch.no_grad():
        ours, theirs = source.decoder(ids), model(ids).logits
    # both quantize activations per token to 8 bits in fp32 with the same formula; only a code landing within
    # float rounding of a .5 tie could differ (one activation step); measured ~1e-7
    assert (ours - theirs).abs().max() <= 1e-4
