"""format=hf and model=hf: bitflow's decoder in transformers' LlamaForCausalLM, checked in transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitflow.config import ConfigError
from bitflow.export.run import export_checkpoint
from bitflow.export.source import load_source
from bitflow.quant import set_strength

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PROMPT = "class Point:\n    def add(self, x):\n        return x"


def hf_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_dense_export_loads_in_transformers_and_matches_bitflow(dense_ckpt: Path, tmp_path: Path):
    out = tmp_path / "hf"
    export_checkpoint({"ckpt": str(dense_ckpt), "format": "hf", "out": str(out)})
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"]
    source = load_source(dense_ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == source.tokenizer.encode(PROMPT).ids  # the checkpoint's own tokenizer
    assert hf_tok.eos_token == "<|endoftext|>"
    with torch.no_grad():
        ours = source.decoder(ids)
    assert (hf_logits(out, ids) - ours).abs().max() <= 1e-4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == hf_tok.eos_token_id


def test_ternary_export_is_dequantized_exactly_and_matches_bitflow_at_activation_strength_0(
    ternary_ckpt: Path, tmp_path: Path
):
    from safetensors.torch import load_file

    from bitflow.export.hf import hf_name

    out = tmp_path / "hf"
    export_checkpoint({"ckpt": str(ternary_ckpt), "format": "hf", "out": str(out)})
    source = load_source(ternary_ckpt)
    tensors = load_file(str(out / "model.safetensors"))
    for name, tw in source.ternary().items():
        hf_w = tensors[hf_name(f"{name}.weight")]
        step = 1 / tw.scale
        assert torch.equal(hf_w, tw.codes.float() / tw.scale)  # exactly (1 / s_w) x {-1, 0, 1}
        assert set(torch.unique(hf_w.abs()).tolist()) <= {0.0, float(step)}
    ids = torch.tensor([source.tokenizer.encode(PROMPT).ids])
    set_strength(source.decoder, act=0.0)
    with torch.no_grad():
        ours = source.decoder(ids)
    assert (hf_logits(out, ids) - ours).abs().max() <= 1e-4


def test_bad_export_settings_fail_before_anything_is_written(dense_ckpt: Path, tmp_path: Path):
    out = tmp_path / "hf"
    cases = [
        ({"format": "onnx"}, r"format='onnx'.*hf \| hf_bitnet \| gguf"),
        ({"format": "gguf", "weights": "q4_0"}, r"weights='q4_0'.*tq2_0 \| tq1_0 \| f16 \| f32"),
        ({"ckpt": str(tmp_path / "none.ckpt")}, r"ckpt=.*no such file"),
        ({"format": "gguf", "weights": "tq2_0"}, r"16-bit.*PTQ or a transition"),
        ({"out": None}, "out is required"),
    ]
    for settings, match in cases:
        with pytest.raises(ConfigError, match=match):
            export_checkpoint({"ckpt": str(dense_ckpt), "out": str(out), **settings})
        assert not out.exists()
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a bitflow checkpoint"):
        export_checkpoint({"ckpt": str(text), "out": str(out)})
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"out=.*overwrite=true"):
        export_checkpoint({"ckpt": str(dense_ckpt), "out": str(out)})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_checkpoint({"ckpt": str(dense_ckpt), "out": str(out), "overwrite": True})
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def _pretrained(tmp_path: Path, tokenizer, **overrides) -> Path:
    """A small LlamaForCausalLM (GQA, tied embeddings, Llama-3-like rope_theta and eps) saved offline."""
    from bitflow.export.hf import write_hf_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_theta=500000.0, tie_word_embeddings=True, **overrides,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "pretrained"
    model.save_pretrained(out)
    write_hf_tokenizer(tokenizer, out, 128)
    return out


def test_import_then_export_gives_the_original_logits(tokenizer, tmp_path: Path):
    from bitflow.export.hf import load_hf_model
    from bitflow.export.source import source_from_model
    from bitflow.models.llama import Llama

    src = _pretrained(tmp_path, tokenizer)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    original = hf_logits(src, ids)
    cfg, sd = load_hf_model(src)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings, cfg.norm_eps, cfg.rope_theta) == (4, 2, True, 1e-6, 5e5)
    decoder = Llama(cfg)
    decoder.load_state_dict(sd)
    with torch.no_grad():
        assert (decoder.eval()(ids) - original).abs().max() <= 1e-4
    from bitflow.export.hf import export_hf

    export_hf(source_from_model(decoder, tokenizer), tmp_path / "again")
    assert (hf_logits(tmp_path / "again", ids) - original).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"head_dim": 32}, "head_dim=32"),
    ],
)
def test_an_unrepresentable_hf_model_names_the_field(tokenizer, tmp_path: Path, overrides, field):
    from bitflow.export.hf import load_hf_model

    src = _pretrained(tmp_path, tokenizer, **overrides)
    with pytest.raises(ValueError, match=f"{field}.*cannot be represented"):
        load_hf_model(src)


@pytest.mark.slow
def test_bitflow_model_hf_continues_a_pretrained_model_in_ternary(tokenizer, tiny_overrides, tmp_path: Path):
    from tokenizers import Tokenizer

    from bitflow.cli import run_training
    from bitflow.export.hf import load_hf_model
    from bitflow.lm import load_checkpoint
    from tests.helpers import compose

    src = _pretrained(tmp_path, tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["def f(x):\n    return x * 2\n"] * 200))
    keep = [o for o in tiny_overrides if not o.startswith(("model.", "data.vocab_size", "data.source"))]
    cfg = compose([
        *keep, "model=hf", f"model.path={src}", "data=text", f"data.source.paths=[{corpus}]",
        "quant=ternary", "transition=default", "transition.at=0", "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    ])
    run_training(cfg)
    assert cfg.model.d_model == 64 and cfg.model.n_kv_heads == 2 and cfg.data.tokenizer_path.endswith("tokenizer.json")
    lm = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert lm.quant_state["kind"] == "bitlinear" and len(lm.quant_state["layers"]) == 14
    assert Tokenizer.from_str(lm.tokenizer_json).get_vocab() == tokenizer.get_vocab()
    _, sd = load_hf_model(src)
    # two steps of training moved the pretrained weights only a little: it started from them
    assert (lm.model.tok_emb.weight - sd["tok_emb.weight"]).abs().max() < 0.05


def test_model_hf_without_a_path_or_with_a_bad_one_is_a_config_error(tiny_overrides, tmp_path: Path):
    from bitflow.cli import run_training
    from tests.helpers import compose

    keep = [o for o in tiny_overrides if not o.startswith("model.")]
    with pytest.raises(ConfigError, match="model.path is required"):
        run_training(compose([*keep, "model=hf"]))
    with pytest.raises(ConfigError, match=r"model.path=.*no config.json"):
        run_training(compose([*keep, "model=hf", f"model.path={tmp_path}"]))
