"""Whole-model train steps: ternary / 16-bit, and bitflow's decoder against Hugging Face's ``LlamaForCausalLM``.

One loop for every variant: the same batch (16 x 256 tokens), the precision ``trainer.precision: auto`` picks,
AdamW as bitflow builds it (:func:`bitflow.quant.recipe.adamw`: fused where torch has it), gradient clipping at 1.0.
bitflow's models compute their loss as a run does (:func:`bitflow.models.loss.next_token_loss`, chunked); the HF
model returns logits and the loss is ``F.cross_entropy`` of them in float32. Variants are interleaved round by
round; reported: the median tokens/s with the spread, and the ratios (goal: ternary / 16-bit step time <= 1.03,
bitflow / HF throughput >= 1.3). The bound of ternary / 16-bit: the quantizers' passes over weights and
activations (see the bitlinear bench); of bitflow / HF: the same matmuls, so only the loss, the attention kernel
and the framework's own elementwise work can differ. A third table times the causal attention kernels (torch's
SDPA and the matmul form ``attention: auto`` takes on the CPU) on each shape's heads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bitflow.bench.common import default_bf16, interleaved, median, print_table, spread
from bitflow.lm import param_groups
from bitflow.models.compile import compile_model
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.models.loss import next_token_loss
from bitflow.quant.recipe import adamw
from bitflow.quant.recipes import recipe_from_config

# (name, model fields, seq_len, batch)
SHAPES = [
    ("tiny (default)", dict(d_model=192, n_layers=4, n_heads=6, d_ff=512, max_seq_len=256), 256, 16),
    ("small25m", dict(d_model=512, n_layers=8, n_heads=8, d_ff=1376, max_seq_len=512), 256, 16),
]
QUICK_SHAPE = ("quick", dict(d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=64), 32, 4)
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


def train_step_fn(model: torch.nn.Module, batch: torch.Tensor, bf16: bool, hf: bool, device: str = "cpu"):
    """One training step of ``model`` on ``batch`` [B, T+1]: forward, loss, backward, clipping, AdamW."""
    opt = adamw(model, param_groups(model, 0.1), lr=1e-4)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if hf:
                loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def models(cfg: LlamaConfig, device: str = "cpu") -> dict[str, torch.nn.Module | None]:
    """``16-bit`` and ``ternary`` (the default ``quant=ternary`` recipe) bitflow decoders with the same initial
    weights, and the HF decoder of the same shape (None without transformers)."""
    out: dict[str, torch.nn.Module | None] = {}
    for name in ("16-bit", "ternary", "16-bit, compile: regional", "ternary, compile: regional"):
        torch.manual_seed(0)
        model = Llama(cfg)
        if name.startswith("ternary"):
            recipe_from_config({"recipe": "bitlinear"}).convert(model)
        if name.endswith("regional"):  # what `compile: regional` does in a run (each block compiled, code shared)
            compile_model(model, "regional")
        out[name] = model.to(device)
    torch.manual_seed(0)
    hf = hf_llama(cfg)
    out["HF LlamaForCausalLM"] = hf.to(device) if hf is not None else None
    return out


def run_attention(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Causal attention forward + backward of each model shape's heads (batch 16 x 256 tokens): torch's
    ``scaled_dot_product_attention`` against the matmul form that ``attention: auto`` takes on the CPU
    (:func:`bitflow.models.llama.causal_attention`), interleaved; precision as a default run."""
    from bitflow.models.llama import causal_attention

    bf16 = default_bf16(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    repeats, iters = (5, 1) if quick else (7, 5)
    rows = []
    for name, fields, seq_len, batch_size in [QUICK_SHAPE] if quick else SHAPES:
        heads, head_dim = fields["n_heads"], fields["d_model"] // fields["n_heads"]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch_size, heads, seq_len, head_dim, generator=gen).to(device, dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(batch_size, heads, seq_len, head_dim, generator=gen).to(device, dtype)

        def step(mode: str, q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v,
                 grad: torch.Tensor = grad) -> Any:
            def call() -> None:
                causal_attention(q, k, v, mode).backward(grad)
                q.grad = k.grad = v.grad = None
            return call

        steps = {"sdpa": step("sdpa"), "matmul (attention: auto on CPU)": step("matmul")}
        for fn in steps.values():
            fn()
        times = interleaved(steps, repeats, iters, device)
        base = median(times["sdpa"])
        for variant, ts in times.items():
            rows.append({"model": name, "q/k/v": f"{batch_size}x{heads}x{seq_len}x{head_dim}", "kernel": variant,
                         "ms (median)": 1e3 * median(ts), "spread ms": spread([1e3 * t for t in ts]),
                         "time vs sdpa": median(ts) / base})
    print_table(f"Causal attention fwd+bwd, {'bf16' if bf16 else 'fp32'}, median of {repeats} interleaved rounds "
                f"x {iters} calls", rows)
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """The attention table, then both model tables for every shape; returns the rows of the whole-model table
    (one per model and variant)."""
    run_attention(quick, device)
    bf16 = default_bf16(device)
    precision = "bf16 autocast" if bf16 else "fp32"
    repeats, iters = (5, 1) if quick else (7, 3)
    rows, hf_rows = [], []
    for name, fields, seq_len, batch_size in [QUICK_SHAPE] if quick else SHAPES:
        cfg = LlamaConfig(vocab_size=VOCAB, **fields)
        torch.manual_seed(0)
        batch = torch.randint(0, VOCAB, (batch_size, seq_len + 1), device=device)
        steps = {}
        for variant, model in models(cfg, device).items():
            if model is not None:
                steps[variant] = train_step_fn(model, batch, bf16, hf=variant.startswith("HF"), device=device)
                steps[variant]()  # warm-up (and, for the compiled variants, compilation)
                steps[variant]()
        times = interleaved(steps, repeats, iters, device)
        tokens = batch_size * seq_len
        for variant, ts in times.items():
            same_mode = "16-bit, compile: regional" if variant.endswith("regional") else "16-bit"
            rows.append({
                "model": name, "variant": variant, "precision": precision, "tokens/step": tokens,
                "tok/s": tokens / median(ts), "spread tok/s": spread([tokens / t for t in ts]),
                # ternary against 16-bit in the same compile mode
                "step time vs 16-bit": median(ts) / median(times[same_mode]),
            })
        hf = times.get("HF LlamaForCausalLM")
        for variant in ("16-bit", "16-bit, compile: regional"):
            base = median(times[variant])
            hf_rows.append({
                "model": name, "bitflow": variant, "precision": precision, "bitflow tok/s": tokens / base,
                "HF tok/s (eager)": tokens / median(hf) if hf else "transformers not installed",
                "bitflow / HF": median(hf) / base if hf else "",
            })
    print_table(f"Whole-model train step (fwd+bwd+clip+AdamW), batch x seq as listed, median of {repeats} "
                f"interleaved rounds x {iters} steps (goal: ternary step time <= 1.03x 16-bit)", rows)
    print_table("Training throughput: bitflow Llama vs HF LlamaForCausalLM (same shape, batch, precision, loop; "
                "goal >= 1.3x)", hf_rows)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, a few seconds")
    run(quick=parser.parse_args().quick)
