"""Train-step time of BitLinear vs nn.Linear (and the seed authors' PyPI ``bitlinear`` layer, if installed).

Two tables. **Layers** (the issue's target rows): one layer's forward + backward for the shapes
(8,256,1024)->4096, (8,256,4096)->1024 and (16,256,192)->512, ``nn.Linear`` / BitLinear absmean / BitLinear
absmedian, eager and ``torch.compile``-d, with 1 and 2 threads, in the precision ``trainer.precision: auto`` picks
(bf16 autocast only where bf16 is native). The variants of a row group are interleaved round by round; reported:
the median of the rounds with their spread, and median / median of nn.Linear. The bound is the matmul: BitLinear
runs the same ``F.linear``, the quantizers add two reads of W and of x (statistic, then quantize-dequantize).

**Stack** (below):
A small decoder-like stack (attention-shaped projections wq/wk/wv/wo with a cheap token mixer instead of softmax
attention, and a SwiGLU MLP w1/w3/w2, pre-RMSNorm, residuals) is trained for a few steps (forward + backward +
AdamW) under bf16 autocast on the CPU, with every projection an ``nn.Linear``, a :class:`~bitflow.quant.BitLinear`
(absmean, absmedian) or ``bitlinear.BitLinear``. All variants run in the same process, interleaved round by round,
and the best round's wall time per step is reported (the minimum is the estimate least disturbed by other processes
on a shared machine) with its ratio to ``nn.Linear`` (goal: <= 1.10), next to the process CPU time per step (with
``--threads 1`` the measure least sensitive to a busy machine: time spent descheduled does not count).

Run: ``python -m bitflow.bench.bitlinear [--quick] [--compile] [--threads N]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitflow.bench.common import default_bf16, interleaved, median, print_table, spread
from bitflow.quant import BitLinear

LinearFactory = Callable[[int, int], nn.Module]


class _Block(nn.Module):
    def __init__(self, d: int, ffn: int, linear: LinearFactory) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (linear(d, d) for _ in range(4))
        self.w1, self.w3, self.w2 = linear(d, ffn), linear(d, ffn), linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (x.shape[-1],))
        # a gated token-local mixer with attention's projection shapes; softmax attention would only add a constant
        x = x + self.wo(self.wq(h) * torch.sigmoid(self.wk(h)) + self.wv(h))
        h = F.rms_norm(x, (x.shape[-1],))
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def _stack(linear: LinearFactory, n_layers: int, d: int, ffn: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[_Block(d, ffn, linear) for _ in range(n_layers)])


def _seed_authors_layer() -> tuple[LinearFactory | None, str]:
    """The PyPI ``bitlinear`` package's layer with absmedian weights and no input norm (as our absmedian row)."""
    try:
        import bitlinear  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None, "not installed (pip install --no-deps bitlinear)"

    def make(i: int, o: int) -> nn.Module:
        try:
            return bitlinear.BitLinear(i, o, bias=False, weight_measure="AbsMedian", norm=None)
        except TypeError:  # older releases have no norm argument (and always layer-norm the input)
            return bitlinear.BitLinear(i, o, bias=False, weight_measure="AbsMedian")

    try:
        version = importlib.metadata.version("bitlinear")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree
        version = "(source)"
    return make, f"seed authors' layer, bitlinear {version}: AbsMedian, no input norm"


def _variants() -> list[tuple[str, LinearFactory | None, str]]:
    seed, note = _seed_authors_layer()
    return [
        ("nn.Linear", lambda i, o: nn.Linear(i, o, bias=False), ""),
        ("BitLinear absmean", lambda i, o: BitLinear(i, o, bias=False), "ternary absmean, 8-bit act"),
        (
            "BitLinear absmedian",
            lambda i, o: BitLinear(i, o, bias=False, weight_scale="absmedian"),
            "ternary absmedian, 8-bit act",
        ),
        ("bitlinear (PyPI)", seed, note),
    ]


LAYER_SHAPES = [((8, 256), 1024, 4096), ((8, 256), 4096, 1024), ((16, 256), 192, 512)]  # (batch dims, in, out)
LAYERS = {
    "nn.Linear": lambda i, o: nn.Linear(i, o, bias=False),
    "BitLinear absmean": lambda i, o: BitLinear(i, o, bias=False),
    "BitLinear absmedian": lambda i, o: BitLinear(i, o, bias=False, weight_scale="absmedian"),
}


def layer_steps(
    lead: tuple[int, ...], d_in: int, d_out: int, compiled: bool, device: str = "cpu", bf16: bool | None = None
):
    """``{variant: step}``: forward + backward of one fresh layer of each kind (same weights) on one input."""
    bf16 = default_bf16(device) if bf16 is None else bf16
    torch.manual_seed(0)
    x = torch.randn(*lead, d_in, device=device, requires_grad=True)
    grad = torch.randn(*lead, d_out, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    steps = {}
    for name, make in LAYERS.items():
        torch.manual_seed(1)
        layer = make(d_in, d_out).to(device)
        fwd = torch.compile(layer) if compiled else layer

        def step(fwd: nn.Module = fwd, layer: nn.Module = layer) -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                y = fwd(x)
            y.backward(grad.to(y.dtype))
            x.grad, layer.weight.grad = None, None

        step()  # warm-up (and compilation)
        step()
        steps[name] = step
    return steps


def run_layers(quick: bool = False, device: str = "cpu", threads: tuple[int, ...] = (1, 2)) -> list[dict]:
    """The layer table: one row per shape, variant, eager/compiled and thread count; printed and returned."""
    shapes = [((2, 32), 64, 128)] if quick else LAYER_SHAPES
    repeats, iters = (5, 1) if quick else (7, 3)
    bf16 = default_bf16(device)
    rows = []
    saved = torch.get_num_threads()
    for n in threads if device == "cpu" else (saved,):
        torch.set_num_threads(n)
        for compiled in (False, True):
            for lead, d_in, d_out in shapes:
                times = interleaved(layer_steps(lead, d_in, d_out, compiled, device, bf16), repeats, iters, device)
                base = median(times["nn.Linear"])
                for name, ts in times.items():
                    rows.append({
                        "shape": f"{lead}x{d_in}->{d_out}", "layer": name, "compiled": compiled, "threads": n,
                        "ms (median)": 1e3 * median(ts), "spread ms": spread([1e3 * t for t in ts]),
                        "vs nn.Linear": median(ts) / base,
                    })
    torch.set_num_threads(saved)
    print_table(
        f"BitLinear train step (fwd+bwd) / nn.Linear, {'bf16 autocast' if bf16 else 'fp32'} (the default's "
        f"precision), median of {repeats} interleaved rounds x {iters} steps (goal: absmean <= 1.05, "
        "absmedian <= 1.10)", rows,
    )
    return rows


def run(quick: bool = False) -> list[dict]:
    """The layer table (:func:`run_layers`), then the stack table (:func:`run_stack`), eager."""
    return run_layers(quick) + run_stack(quick)


def run_stack(quick: bool = False, compile: bool = False) -> list[dict]:
    """Time train steps of each variant; returns one row per variant and prints a table.

    ``quick``: a tiny configuration (for CI/smoke tests). ``compile``: wrap every model in ``torch.compile``
    (slow to start; then the quantizer's elementwise ops are fused).
    """
    if quick:
        n_layers, d, ffn, batch, seq, rounds, steps = 1, 64, 172, 2, 64, 3, 2
    else:
        n_layers, d, ffn, batch, seq, rounds, steps = 4, 256, 688, 8, 256, 15, 1
    x = torch.randn(batch, seq, d)
    runners: dict[str, Callable[[], None]] = {}
    rows: dict[str, dict] = {}
    for name, factory, note in _variants():
        rows[name] = {
            "bench": "bitlinear",
            "layer": name,
            "shape": f"{n_layers}x(d={d}, ffn={ffn}), batch {batch} x seq {seq}",
            "compiled": compile,
            "threads": torch.get_num_threads(),
            "ms_per_step": None,
            "ms_median": None,
            "ratio_vs_linear": None,
            "cpu_ms_per_step": None,
            "cpu_ratio_vs_linear": None,
            "note": note,
        }
        if factory is None:
            continue
        model = _stack(factory, n_layers, d, ffn)
        fwd = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(fwd: nn.Module = fwd, opt: torch.optim.Optimizer = opt) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fwd(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up (and compilation)
            step()
        runners[name] = step
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    # interleave the variants so that load from other processes hits all of them alike
    for _ in range(rounds):
        for name, step in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    base, cpu_base = min(times["nn.Linear"]), min(cpu["nn.Linear"])
    for name, ts in times.items():
        rows[name]["ms_per_step"] = round(1e3 * min(ts), 2)
        rows[name]["ms_median"] = round(1e3 * statistics.median(ts), 2)
        rows[name]["ratio_vs_linear"] = round(min(ts) / base, 3)
        rows[name]["cpu_ms_per_step"] = round(1e3 * min(cpu[name]), 2)
        rows[name]["cpu_ratio_vs_linear"] = round(min(cpu[name]) / cpu_base, 3)
    out = list(rows.values())
    _print_table(out)
    return out


def _print_table(rows: list[dict]) -> None:
    print(
        f"train step (fwd+bwd+AdamW), bf16 autocast, CPU, {torch.get_num_threads()} threads: {rows[0]['shape']}"
    )
    print(f"{'layer':<22} {'ms/step':>9} {'vs Linear':>10} {'CPU ms':>9} {'vs Linear':>10}  note")
    for r in rows:
        cells = [f"{r[key]:.2f}" if r[key] is not None else "-" for key in ("ms_per_step", "cpu_ms_per_step")]
        ratios = [
            f"{r[key]:.3f}x" if r[key] is not None else "-"
            for key in ("ratio_vs_linear", "cpu_ratio_vs_linear")
        ]
        print(f"{r['layer']:<22} {cells[0]:>9} {ratios[0]:>10} {cells[1]:>9} {ratios[1]:>10}  {r['note']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = (args.threads,) if args.threads is not None else (1, 2)
    run_layers(quick=args.quick, threads=threads)
    run_stack(quick=args.quick, compile=args.compile)
