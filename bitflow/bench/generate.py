"""Generation speed and memory: bf16 dense vs packed ternary (PackedTernaryLinear) vs llama.cpp's TQ2_0.

One ternary model with random weights (widths that are multiples of 256, so TQ2_0 holds every linear layer):
  * bf16 dense: the dequantized ternary weights ``codes / s_w`` in bf16 ``nn.Linear`` layers (no activation
    quantization: what ``format=hf`` exports);
  * packed: :class:`~bitflow.quant.packed.PackedTernaryLinear` layers (2-bit codes in memory), bf16 compute;
  * llama.cpp: the ``format=gguf weights=tq2_0`` export run by llama-cpp-python (skipped when it is absent).
Each generates greedily with a KV cache from the same prompt; tokens/s covers the new tokens (prefill included),
memory is the bytes of the model's tensors (the GGUF file for llama.cpp). Ratios are against bf16 dense.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from bitflow.bench.common import print_table

QUICK = dict(d_model=256, n_layers=2, n_heads=4, d_ff=512, max_seq_len=128)
FULL = dict(d_model=1024, n_layers=12, n_heads=16, d_ff=2560, max_seq_len=512)


def _bytes(module: torch.nn.Module, linear_only: bool = False) -> int:
    from bitflow.quant.packed import PackedTernaryLinear

    total = 0
    for m in module.modules():
        is_linear = isinstance(m, (torch.nn.Linear, PackedTernaryLinear)) and not getattr(m, "_is_head", False)
        if linear_only and not is_linear:
            continue
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        total += sum(t.numel() * t.element_size() for t in tensors if not (linear_only and t.dim() < 1))
    return total


def _tokens_per_s(decoder: torch.nn.Module, prompt: list[int], new: int) -> float:
    from bitflow.generate import generate_tokens

    list(generate_tokens(decoder, [prompt], 4))  # warm-up
    start = time.perf_counter()
    n = sum(1 for _ in generate_tokens(decoder, [prompt], new))
    return n / (time.perf_counter() - start)


def run(quick: bool = False) -> list[dict]:
    from bitflow.data.tokenizer import train_tokenizer
    from bitflow.export.source import ExportSource
    from bitflow.models.llama import Llama, LlamaConfig
    from bitflow.quant import to_bitlinear
    from bitflow.quant.packed import pack_model

    shape = QUICK if quick else FULL
    new = 16 if quick else 128
    docs = [f"def f{i}(x):\n    return x * {i} + len('{i}')\n" for i in range(400)]
    tok = train_tokenizer(docs, vocab_size=512)
    torch.manual_seed(0)
    ternary = Llama(LlamaConfig(vocab_size=tok.get_vocab_size(), **shape)).eval()
    to_bitlinear(ternary, exclude=["lm_head"])
    prompt = tok.encode(docs[0] * 4).ids[:32]
    source = ExportSource(ternary, tok, {"kind": "bitlinear"})

    dense = Llama(ternary.config).eval()
    dense.load_state_dict(source.dense_weights())
    dense.to(torch.bfloat16)
    packed = copy.deepcopy(ternary)
    pack_model(packed)
    packed.to(torch.bfloat16)
    rows = []
    for case, model in (("bf16 dense (nn.Linear)", dense), ("packed ternary (2-bit codes)", packed)):
        model.lm_head._is_head = True
        rows.append({
            "case": case, "tokens/s": _tokens_per_s(model, prompt, new),
            "model MB": _bytes(model) / 2**20, "linear MB": _bytes(model, linear_only=True) / 2**20,
        })
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama.cpp skipped: {e}")
    else:
        from bitflow.export.gguf_file import export_gguf

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.gguf"
            export_gguf(source, path, "tq2_0")
            llm = llama_cpp.Llama(str(path), n_ctx=shape["max_seq_len"], n_threads=torch.get_num_threads(),
                                  verbose=False)
            llm.create_completion(prompt, max_tokens=4, temperature=0)  # warm-up
            start = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=new, temperature=0)
            n = out["usage"]["completion_tokens"]
            rows.append({"case": "llama.cpp TQ2_0 (GGUF)", "tokens/s": n / (time.perf_counter() - start),
                         "model MB": path.stat().st_size / 2**20, "linear MB": float("nan")})
    base = rows[0]
    for r in rows:
        r["speed vs bf16"] = r["tokens/s"] / base["tokens/s"]
        r["memory vs bf16"] = r["model MB"] / base["model MB"]
    print_table(f"Generation: {new} new tokens after a {len(prompt)}-token prompt, greedy, KV cache "
                f"({shape['n_layers']} layers, d_model {shape['d_model']})", rows)
    return rows
