"""format=gguf in llama.cpp itself (llama-cpp-python, `make install-export`): logits and greedy generation.

References: llama.cpp computes f16 matmuls with f16-rounded inputs, and TQ matmuls with inputs quantized to
Q8_K (int8, one float scale per block of 256 values, scale max|x| / 127). The tight comparisons are against
bitflow's decoder doing the same (:func:`llama_cpp_reference`); the loose ones against bitflow's own forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitflow.export.run import export_checkpoint
from bitflow.export.source import load_source
from bitflow.quant import set_strength
from tests.export.conftest import write_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

WIDE = dict(d_model=256, d_ff=512, n_heads=4, n_kv_heads=2)
PROMPT = "class Point:\n    def add(self, x):\n        return x"
GGML_F32 = 0  # ggml_type of the KV cache: f32, so attention adds no rounding of its own


def q8k(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_K activation quantization, dequantized: per block of 256 values along the last dim,
    ``round(x * 127 / max|x|) * max|x| / 127`` (int8 codes, float32 scale)."""
    blocks = x.reshape(*x.shape[:-1], -1, 256)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(x.shape)


class _Reference(nn.Module):
    """A linear layer as llama.cpp computes it: TQ weights with Q8_K inputs, or f16 weights with f16 inputs."""

    def __init__(self, weight: torch.Tensor, quantize) -> None:
        super().__init__()
        self.weight, self.quantize = weight, quantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize(x), self.weight)


def llama_cpp_reference(source, weights: str) -> nn.Module:
    """bitflow's decoder computing what the GGUF export computes in llama.cpp (weights tq2_0|tq1_0|f16)."""
    decoder = source.decoder
    half = lambda t: t.half().float()  # noqa: E731
    ternary = source.ternary()
    for name, m in list(decoder.named_modules()):
        if not isinstance(m, nn.Linear) or name == "lm_head":
            continue
        parent, _, child = name.rpartition(".")
        tw = ternary.get(name)
        if tw is not None and weights.startswith("tq"):
            w = tw.codes.float() * (1 / tw.scale).half().float()
            layer = _Reference(w, q8k)
        else:
            w = tw.dense() if tw is not None else m.weight.detach()
            layer = _Reference(half(w), half)
        setattr(decoder.get_submodule(parent), child, layer)
    emb = half(decoder.tok_emb.weight.detach())
    decoder.tok_emb.weight.data = emb
    decoder.lm_head = _Reference(emb, half)
    return decoder


def cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=GGML_F32, type_v=GGML_F32)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llama_cpp")
    return {
        "dense": write_checkpoint(d / "dense.ckpt", tokenizer, seed=3, **WIDE),
        "ternary": write_checkpoint(d / "ternary.ckpt", tokenizer, quant={"recipe": "bitlinear"}, seed=4, **WIDE),
    }


@pytest.mark.parametrize("kind", ["dense", "ternary"])
def test_f32_gguf_logits_match_bitflow_and_greedy_generation_is_identical(wide, tmp_path, kind):
    from bitflow.generate import generate_tokens

    path = tmp_path / "m.gguf"
    export_checkpoint({"ckpt": str(wide[kind]), "format": "gguf", "weights": "f32", "out": str(path)})
    source = load_source(wide[kind])
    if kind == "ternary":  # exported dense: no activation quantization
        set_strength(source.decoder, act=0.0)
    ids = source.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        ours = source.decoder(torch.tensor([ids]))[0]
    theirs_logits = cpp_logits(path, ids)
    print(f"f32 {kind}: vs bitflow {rel(theirs_logits, ours):.2e}")
    assert rel(theirs_logits, ours) <= 1e-4
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                          type_k=GGML_F32, type_v=GGML_F32)
    llm.eval(ids)
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert [int(t) for t in generate_tokens(source.decoder, [ids], 32)] == theirs


def test_f16_gguf_logits_match_an_f16_rounding_reference(wide, tmp_path):
    path = tmp_path / "m.gguf"
    export_checkpoint({"ckpt": str(wide["dense"]), "format": "gguf", "weights": "f16", "out": str(path)})
    source = load_source(wide["dense"])
    ids = source.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        raw = source.decoder(torch.tensor([ids]))[0]
        reference = llama_cpp_reference(source, "f16")(torch.tensor([ids]))[0]
    theirs = cpp_logits(path, ids)
    print(f"f16: vs reference {rel(theirs, reference):.2e}, vs bitflow {rel(theirs, raw):.2e}")
    # measured 1.4e-4: the reference rounds what llama.cpp rounds, but sums in another order
    assert rel(theirs, reference) <= 5e-4
    assert rel(theirs, raw) <= 1e-3  # f16 weights and f16 matmul inputs: measured 3e-4 from the fp32 model


@pytest.mark.parametrize("weights", ["tq2_0", "tq1_0"])
def test_tq_gguf_logits_match_a_q8k_reference_tightly_and_bitflow_loosely(wide, tmp_path, weights):
    path = tmp_path / "m.gguf"
    export_checkpoint({"ckpt": str(wide["ternary"]), "format": "gguf", "weights": weights, "out": str(path)})
    source = load_source(wide["ternary"])
    ids = source.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        raw = source.decoder(torch.tensor([ids]))[0]
        reference = llama_cpp_reference(source, weights)(torch.tensor([ids]))[0]
    theirs = cpp_logits(path, ids)
    print(f"{weights}: vs Q8_K reference {rel(theirs, reference):.2e}, vs bitflow {rel(theirs, raw):.2e}")
    assert rel(theirs, reference) <= 1e-4
    # bitflow quantizes activations per token (8 bits over the whole row), llama.cpp per block of 256 values
    assert rel(theirs, raw) <= 2e-2  # measured 2e-3


def test_a_transition_run_exports_and_runs_in_llama_cpp(tiny_overrides, tmp_path):
    """`bitflow +experiment=transition_50pct`'s recipe (16-bit, then ternary at 50%) on the tiny model, exported
    as TQ2_0 (its 32-wide rows stored f16 by tq_fallback) and run by llama.cpp."""
    from bitflow.cli import run_training
    from tests.helpers import compose

    run_training(compose([*tiny_overrides, "quant=ternary", "transition=default", "transition.at=0.5"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path = tmp_path / "m.gguf"
    export_checkpoint({"ckpt": str(ckpt), "format": "gguf", "weights": "tq2_0", "tq_fallback": "f16",
                       "out": str(path)})
    source = load_source(ckpt)
    assert source.quant["strength"] == {"weight": 1.0, "act": 1.0}
    ids = source.tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        reference = llama_cpp_reference(source, "f16")(torch.tensor([ids]))[0]  # f16 layers, no act. quant
    assert rel(cpp_logits(path, ids), reference) <= 1e-3
