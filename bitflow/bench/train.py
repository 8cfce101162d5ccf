"""Training throughput: bitflow's decoder against Hugging Face's ``LlamaForCausalLM`` of the same shape.

Both models train with the same loop in the same process: same batch, same precision (bf16 autocast or fp32),
AdamW, cross-entropy computed the same way outside the model. Reported: tokens/s and bitflow / HF.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bitflow.bench.common import print_table, time_per_call
from bitflow.models.llama import Llama, LlamaConfig

# (name, model fields, seq_len, batch)
SHAPES = [
    ("tiny (default)", dict(d_model=192, n_layers=4, n_heads=6, d_ff=512, max_seq_len=256), 256, 16),
    ("small25m", dict(d_model=512, n_layers=8, n_heads=8, d_ff=1376, max_seq_len=512), 256, 8),
]
VOCAB = 8192


def hf_llama(cfg: LlamaConfig) -> torch.nn.Module | None:
    """The same decoder in Hugging Face transformers (None when transformers is not installed)."""
    try:
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    hf_cfg = HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def train_step_fn(model: torch.nn.Module, batch: torch.Tensor, bf16: bool, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits if hf else model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for name, fields, seq_len, batch_size in shapes:
        cfg = LlamaConfig(vocab_size=VOCAB, **fields)
        batch = torch.randint(0, VOCAB, (batch_size, seq_len + 1))
        for precision in ("bf16", "fp32"):
            bf16 = precision == "bf16"
            torch.manual_seed(0)
            ours = Llama(cfg)
            row = {"model": name, "params_M": ours.num_parameters(non_embedding=False) / 1e6,
                   "precision": precision, "tokens/step": batch_size * seq_len}
            iters = 3 if quick else 8
            t_ours = time_per_call(train_step_fn(ours, batch, bf16, hf=False), warmup=2, iters=iters, repeats=2)
            row["bitflow tok/s"] = batch_size * seq_len / t_ours
            hf = hf_llama(cfg)
            if hf is None:
                row["HF tok/s"], row["bitflow/HF"] = "not installed", ""
            else:
                t_hf = time_per_call(train_step_fn(hf, batch, bf16, hf=True), warmup=2, iters=iters, repeats=2)
                row["HF tok/s"] = batch_size * seq_len / t_hf
                row["bitflow/HF"] = t_hf / t_ours
            rows.append(row)
            del ours
    print_table("Training throughput: bitflow Llama vs HF LlamaForCausalLM (same shape, batch, precision)", rows)
    return rows


if __name__ == "__main__":
    run()
