"""`make bench-gpu` without a CUDA device: a clear message and exit status 2, before any work."""

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_bench_gpu_without_cuda_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "bitflow.bench.gpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "make bench" in proc.stderr
    assert proc.stdout == ""
