"""`make bench-gpu`: the ratios of `make bench` on a CUDA GPU, ending in one summary table.

    python -m bitflow.bench.gpu [--quick]

BitLinear / nn.Linear train step (the three layer shapes, absmean and absmedian, eager and compiled), whole-model
ternary / 16-bit step (tiny, small25m), bitflow / Hugging Face ``LlamaForCausalLM`` throughput, and tokens/s of the
``spectra_99m`` preset (16-bit and ternary), all in the precision ``trainer.precision: auto`` picks on the GPU
(bf16 where the GPU supports it), timed with ``torch.cuda.synchronize`` around every measurement. Without a CUDA
device it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch


def spectra_rows(quick: bool) -> list[dict[str, Any]]:
    """tokens/s of ``model=spectra_99m`` (16-bit, ternary) with the whole-model loop of :mod:`bitflow.bench.train`."""
    from bitflow.bench import train
    from bitflow.bench.common import default_bf16, interleaved, median, spread
    from bitflow.bench.framework import compose_config
    from bitflow.config import to_plain
    from bitflow.models.llama import LlamaConfig

    fields = to_plain(compose_config(["model=spectra_99m"]).model)
    batch_size, seq_len = (2, 128) if quick else (16, 1024)
    cfg = LlamaConfig.from_dict({**fields, "vocab_size": train.VOCAB})
    batch = torch.randint(0, train.VOCAB, (batch_size, seq_len + 1), device="cuda")
    bf16 = default_bf16("cuda")
    steps = {}
    for name, model in train.models(cfg, "cuda").items():
        if model is not None and not name.startswith("HF"):
            steps[name] = train.train_step_fn(model, batch, bf16, hf=False, device="cuda")
            steps[name]()  # warm-up (and, for the compiled variants, compilation)
            steps[name]()
    times = interleaved(steps, repeats=5 if quick else 7, iters=1 if quick else 5, device="cuda")
    tokens = batch_size * seq_len
    return [{"ratio": f"spectra_99m {name} tok/s ({batch_size}x{seq_len})", "value": tokens / median(ts),
             "spread": spread([tokens / t for t in ts])} for name, ts in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench-gpu: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); run it on "
              "a machine with an NVIDIA GPU and a CUDA build of torch. `make bench` measures the CPU.", file=sys.stderr)
        raise SystemExit(2)
    from bitflow.bench import bitlinear, train  # after the check: the message comes before any slow import
    from bitflow.bench.common import default_bf16, print_table

    summary: list[dict[str, Any]] = []
    for r in bitlinear.run_layers(quick=args.quick, device="cuda"):
        if r["layer"] != "nn.Linear":
            summary.append({"ratio": f"{r['layer']} / nn.Linear {r['shape']}{' compiled' if r['compiled'] else ''}",
                            "value": r["vs nn.Linear"], "spread": f"{r['spread ms']} ms"})
    rows = train.run(quick=args.quick, device="cuda")
    for r in rows:
        if r["variant"] != "16-bit":
            summary.append({"ratio": f"{r['model']}: {r['variant']} / 16-bit step time",
                            "value": r["step time vs 16-bit"], "spread": f"{r['spread tok/s']} tok/s"})
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = next(r for r in rows if r["model"] == model and r["variant"] == "16-bit")
        hf = next((r for r in rows if r["model"] == model and r["variant"].startswith("HF")), None)
        summary.append({"ratio": f"{model}: bitflow / HF LlamaForCausalLM throughput",
                        "value": ours["tok/s"] / hf["tok/s"] if hf else "transformers not installed", "spread": ""})
    summary += spectra_rows(args.quick)
    print_table(f"GPU summary ({'bf16' if default_bf16('cuda') else 'fp32'}, the default's precision)", summary)


if __name__ == "__main__":
    main()
