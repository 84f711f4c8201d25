"""GPU benchmark scripts must run, and skip cleanly, on a machine without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("script", ["bench_sparse24.py", "bench_training.py", "bench_condensed_gpu.py"])
def test_gpu_benchmarks_skip_cleanly_without_cuda(script):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmarks are run by hand there")
    result = subprocess.run([sys.executable, os.path.join(BENCH, script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
