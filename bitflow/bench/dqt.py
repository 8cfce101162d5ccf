"""Direct Quantized Training (arXiv 2412.04787) against BitNet STE training: memory, step time, final loss.

    python -m bitflow.bench.dqt [--quick] [--only=memory,rss,time,loss]

Four tables:

1. Bytes held between steps for the weights plus optimizer state, summed from tensor sizes after two training
   steps. Modes: STE ternary (BitLinear: fp32 latent weights + fp32 AdamW moments), DQT ternary and 8-bit with fp32
   or bf16 moments, and 16-bit AdamW for reference.
2. The same from the resident set size of a fresh process per mode (``MALLOC_MMAP_THRESHOLD_`` set so that freed
   tensors go back to the OS; the peak counter is reset after the model is built, so the fp32 init weights a DQT
   model is converted from do not count): held between steps and peak during the steps.
3. Time of one training step (forward, backward, clipping, optimizer step) under bf16 autocast.
4. Final validation loss after the same number of steps on the default corpus, through the real ``bitflow`` run
   (``run_training`` with ``quant=none|ternary|dqt_ternary|dqt_int8``, the modes of ``+experiment=dqt_vs_ste``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from bitflow.bench.common import print_table
from bitflow.lm import param_groups
from bitflow.models.llama import Llama, LlamaConfig
from bitflow.quant import BitLinear
from bitflow.quant.dqt import DQTAdamW, unique_dqt_weights
from bitflow.quant.recipe import adamw
from bitflow.quant.recipes import recipe_from_config

# mode -> its quant config (bitflow.quant.recipes)
MODES: dict[str, dict[str, Any]] = {
    "16-bit AdamW": {"recipe": "none"},
    "STE ternary (BitLinear)": {"recipe": "bitlinear"},
    "DQT ternary, fp32 moments": {"recipe": "dqt", "bits": None, "moment_dtype": "float32", "seed": 0},
    "DQT ternary, bf16 moments": {"recipe": "dqt", "bits": None, "moment_dtype": "bfloat16", "seed": 0},
    "DQT 8-bit, fp32 moments": {"recipe": "dqt", "bits": 8, "moment_dtype": "float32", "seed": 0},
    "DQT 8-bit, bf16 moments": {"recipe": "dqt", "bits": 8, "moment_dtype": "bfloat16", "seed": 0},
}
STE = "STE ternary (BitLinear)"
MB = 2**20


def build(mode: str, cfg: LlamaConfig, lr: float = 2e-3) -> tuple[Llama, torch.optim.Optimizer]:
    """The model of ``mode`` (seed 0) and its optimizer, as bitflow's LanguageModel builds it."""
    recipe = recipe_from_config(MODES[mode])
    torch.manual_seed(0)
    model = Llama(cfg)
    if recipe is not None:
        recipe.convert(model)
    build_optimizer = recipe.build_optimizer if recipe is not None else adamw
    return model, build_optimizer(model, param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))


def train_step_fn(model: Llama, opt: torch.optim.Optimizer, batch: torch.Tensor):
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        # as Lightning clips: every tensor of every param group (DQT leaves included, they exist from forward on)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def held_bytes(model: Llama, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the targeted layers' weights and optimizer state, and of everything else (between steps)."""
    targeted = [m.weight for m in model.modules() if isinstance(m, BitLinear)]
    ids = {id(p) for p in targeted}
    out = {"targeted_weights": sum(_nbytes(p) for p in targeted), "targeted_state": 0}
    out["targeted_state"] = sum(_nbytes(v) for p, st in opt.state.items() if id(p) in ids for v in st.values())
    if isinstance(opt, DQTAdamW):
        weights = unique_dqt_weights(model)
        out["targeted_weights"] += sum(_nbytes(m.codes) + _nbytes(m.scale) for _, m in weights)
        out["targeted_state"] += sum(_nbytes(v) for st in opt.dqt_state.values() for v in st.values())
    other = [p for p in model.parameters() if id(p) not in ids]
    if not isinstance(opt, DQTAdamW) and not targeted:  # 16-bit: count the same layers as "targeted"
        linears = {id(m.weight) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head"}
        out["targeted_weights"] = sum(_nbytes(p) for p in model.parameters() if id(p) in linears)
        out["targeted_state"] = sum(_nbytes(v) for p, st in opt.state.items() if id(p) in linears
                                    for v in st.values())
        other = [p for p in model.parameters() if id(p) not in linears]
    other_ids = {id(p) for p in other}
    out["other"] = sum(_nbytes(p) for p in other) + sum(
        _nbytes(v) for p, st in opt.state.items() if id(p) in other_ids for v in st.values()
    )
    return out


def memory_rows(cfg: LlamaConfig, batch: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for mode in MODES:
        model, opt = build(mode, cfg)
        step = train_step_fn(model, opt, batch)
        step()
        step()
        b = held_bytes(model, opt)
        rows.append({"mode": mode, "weights MB": b["targeted_weights"] / MB, "opt state MB": b["targeted_state"] / MB,
                     "targeted MB": (b["targeted_weights"] + b["targeted_state"]) / MB,
                     "whole model MB": (b["targeted_weights"] + b["targeted_state"] + b["other"]) / MB})
        del model, opt, step
        gc.collect()
    ste = next(r for r in rows if r["mode"] == STE)
    for r in rows:
        r["weights / STE"] = r["weights MB"] / ste["weights MB"]
        r["targeted / STE"] = r["targeted MB"] / ste["targeted MB"]
        r["whole / STE"] = r["whole model MB"] / ste["whole model MB"]
    return rows


# ----------------------------------------------------------------------------------------------- RSS (subprocess)
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_child(mode: str, cfg_json: str, steps: int) -> None:
    """Run in a fresh process: RSS held after ``steps`` training steps and the peak during them, in MB."""
    cfg = LlamaConfig(**json.loads(cfg_json))
    torch.set_num_threads(1)
    batch = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # load kernels before the baseline
        torch.ones(8, 8) @ torch.ones(8, 8)
    gc.collect()
    base = _rss_kb("VmRSS")
    model, opt = build(mode, cfg)
    gc.collect()
    built = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: the conversion's fp32 weights do not count
        reset = True
    except OSError:
        reset = False
    step = train_step_fn(model, opt, batch)
    for _ in range(steps):
        step()
    gc.collect()
    held, peak = _rss_kb("VmRSS"), _rss_kb("VmHWM")
    print(json.dumps({"model_MB": (built - base) / 1024, "held_MB": (held - base) / 1024,
                      "peak_MB": (peak - base) / 1024, "peak_reset": reset}))


def rss_rows(cfg: LlamaConfig, steps: int = 3) -> list[dict[str, Any]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cfg_json = json.dumps({k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff",
                                                        "max_seq_len", "tie_embeddings")})
    rows = []
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, "-m", "bitflow.bench.dqt", "--rss", mode, cfg_json, str(steps)],
            env=env, capture_output=True, text=True, timeout=1200,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"RSS measurement of {mode!r} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "held MB": r["held_MB"], "peak MB": r["peak_MB"]})
    ste = next(r for r in rows if r["mode"] == STE)
    for r in rows:
        r["held / STE"] = r["held MB"] / ste["held MB"]
        r["peak / STE"] = r["peak MB"] / ste["peak MB"]
    return rows


# ----------------------------------------------------------------------------------------------- step time
def step_time_rows(cfg: LlamaConfig, batch: torch.Tensor, quick: bool) -> list[dict[str, Any]]:
    """Best-of-N times of forward+backward and of clipping+optimizer step, the modes interleaved in every round
    (so that a busy machine slows them alike)."""
    x, y = batch[:, :-1], batch[:, 1:]
    tokens = x.numel()
    models = {mode: build(mode, cfg) for mode in MODES}
    best = {mode: [float("inf"), float("inf")] for mode in MODES}
    for i in range(4 if quick else 10):
        for mode, (model, opt) in models.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
            loss.backward()
            t1 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i > 0:  # the first round warms up
                best[mode] = [min(best[mode][0], t1 - t0), min(best[mode][1], t2 - t1)]
    rows = [{"mode": mode, "fwd+bwd ms": fb * 1e3, "clip+step ms": st * 1e3, "ms/step": (fb + st) * 1e3,
             "tok/s": tokens / (fb + st)} for mode, (fb, st) in best.items()]
    ste = next(r for r in rows if r["mode"] == STE)
    for r in rows:
        r["step / STE"] = r["ms/step"] / ste["ms/step"]
        r["clip+step / STE"] = r["clip+step ms"] / ste["clip+step ms"]
    return rows


# ----------------------------------------------------------------------------------------------- final loss
LOSS_MODES = {"16-bit": "none", "STE ternary": "ternary", "DQT ternary": "dqt_ternary", "DQT 8-bit": "dqt_int8"}


def loss_rows(steps: int, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """val/loss after ``steps`` steps of each mode of ``+experiment=dqt_vs_ste`` on the default corpus."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from bitflow.cli import CONFIG_DIR, run_training

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode, option in LOSS_MODES.items():
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose(config_name="train", overrides=[
                    "+experiment=dqt_vs_ste", f"quant={option}", f"trainer.max_steps={steps}",
                    f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
                    "callbacks=none", "logger=none", f"paths.output_dir={out}/{option}", *(overrides or []),
                ])
            metrics = run_training(cfg)
            rows.append({"mode": mode, "steps": steps, "val/loss": metrics["val/loss"]})
    ste = next(r for r in rows if r["mode"] == "STE ternary")
    for r in rows:
        r["loss / STE"] = r["val/loss"] / ste["val/loss"]
    return rows


PARTS = ("memory", "rss", "time", "loss")
# the final-loss comparison: the default tiny model and corpus with a CPU-sized batch, as experiments/dqt_vs_ste
LOSS_OVERRIDES = ["data.batch_size=8", "data.seq_len=128"]


def run(quick: bool = False, parts: tuple[str, ...] = PARTS) -> list[dict[str, Any]]:
    """The four tables (``parts`` selects some); rows carry a ``table`` key naming theirs."""
    # accounting and step time: the tiny default shape (its 8192-token vocabulary); RSS: wide layers and a small
    # vocabulary so that the targeted weights dominate the process
    tiny = LlamaConfig(vocab_size=8192, d_model=192, n_layers=4, n_heads=6, d_ff=512, max_seq_len=256)
    wide = (LlamaConfig(vocab_size=256, d_model=384, n_layers=4, n_heads=6, d_ff=1024, max_seq_len=64) if quick else
            LlamaConfig(vocab_size=256, d_model=768, n_layers=8, n_heads=12, d_ff=2048, max_seq_len=64))
    torch.manual_seed(0)
    batch = torch.randint(0, tiny.vocab_size, (8 if quick else 16, 257))
    rows: list[dict[str, Any]] = []
    if "memory" in parts:
        mem = memory_rows(tiny, batch[:2, :33])
        print_table("DQT vs STE: bytes held between steps, from tensor sizes (tiny model; 'targeted' = the linear "
                    "layers DQT/BitLinear convert)", mem)
        rows += [{"table": "memory", **r} for r in mem]
    if "rss" in parts:
        rss = rss_rows(wide)
        print_table(f"DQT vs STE: process RSS above baseline (d_model={wide.d_model}, {wide.n_layers} layers, "
                    f"vocab {wide.vocab_size}, batch 1x8)", rss)
        rows += [{"table": "rss", **r} for r in rss]
    if "time" in parts:
        times = step_time_rows(tiny, batch, quick)
        print_table(f"DQT vs STE: training step time (tiny model, batch {batch.shape[0]}x{batch.shape[1] - 1}, "
                    "bf16 autocast, CPU)", times)
        rows += [{"table": "step_time", **r} for r in times]
    if "loss" in parts:
        losses = loss_rows(30 if quick else 300, LOSS_OVERRIDES)
        print_table("DQT vs STE: final val/loss, same model, data, steps and LR (default corpus, batch 8x128)",
                    losses)
        rows += [{"table": "val_loss", **r} for r in losses]
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss":
        _rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), PARTS)
        unknown = sorted(set(only) - set(PARTS))
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; allowed: {', '.join(PARTS)}")
        run(quick="--quick" in sys.argv, parts=tuple(only))
