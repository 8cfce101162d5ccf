"""Train-step time of BitLinear vs nn.Linear (and the seed authors' PyPI ``bitlinear`` layer, if installed).

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


def run(quick: bool = False, compile: bool = False) -> list[dict]:
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
    run(quick=args.quick, compile=args.compile)
