"""Framework overhead: a training step that logs nothing reads nothing back from the device."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from bitflow.cli import run_training
from tests.helpers import compose, read_scalars

RECORDS: list[tuple[int, int, list[str]]] = []  # (global step, host reads, what read)


class _HostReads(TorchDispatchMode):
    """Counts ops that copy a tensor's value to Python (``.item()``, ``float(t)``, ``bool(t)``): host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = "".join(traceback.format_stack(limit=12)[:-1])
            # BitLinear reads its strength only where the tensor is on the CPU (bitflow.quant.functional.
            # _cpu_strength); on an accelerator the blend stays a tensor op, so that read is never a sync
            # NonFiniteGuard (fault.on_nonfinite) reads one flag per step by design, before the optimizer step,
            # so that a NaN step is never applied; it is not a metric (README, Clusters: NaN and Inf)
            if "_cpu_strength" not in stack and "on_before_optimizer_step" not in stack:
                self.reads.append(stack)
        return func(*args, **(kwargs or {}))


class HostReadCounter(Callback):
    """Records the host reads of each training step: forward, backward, clipping, optimizer step, every hook."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = _HostReads()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)
        RECORDS.append((trainer.global_step - 1, len(self.mode.reads), self.mode.reads))


def test_steps_between_logging_steps_do_not_sync_and_throughput_spans_the_interval(
    tiny_overrides: list[str], tmp_path: Path
):
    RECORDS.clear()
    overrides = [o for o in tiny_overrides if not o.startswith(("trainer.log_every_n_steps", "trainer.max_steps",
                                                                  "trainer.val_check_interval"))]
    cfg = compose([
        *overrides, "trainer.log_every_n_steps=5", "trainer.max_steps=10", "trainer.val_check_interval=10",
        "quant=ternary", "+callbacks.host_reads._target_=tests.test_overhead.HostReadCounter",
    ])
    run_training(cfg)
    steps = {step: (n, reads) for step, n, reads in RECORDS}
    assert sorted(steps) == list(range(10))
    quiet = {s: steps[s] for s in steps if (s + 1) % 5 and s > 0}  # step 0 converts the model (a one-off)
    assert all(n == 0 for n, _ in quiet.values()), {s: r[:1] for s, (n, r) in quiet.items() if n}
    scalars = read_scalars(tmp_path / "run" / "tb")
    for tag in ("train/loss", "train/lr", "train/tokens_seen", "train/tokens_per_sec"):
        assert [s for s, _ in scalars[tag]] == [4, 9], tag
    assert dict(scalars["train/tokens_seen"])[9] == 10 * 4 * 32
