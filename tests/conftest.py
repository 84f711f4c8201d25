import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU, Triton kernels run in the interpreter. The flag is read when a kernel module is
# imported, so it has to be set before any test loads one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when this is unset

settings.register_profile("sparsec", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("sparsec")


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_cache(tmp_path_factory):
    """Generated kernels go to a per-session cache, not the user's ~/.cache/sparsec."""
    os.environ["SPARSEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("sparsec-cache"))
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def auto_as_on_a_gpu(monkeypatch):
    """backend="auto" as on a GPU, with the candidates run for real (in the interpreter without one):
    the device check says CUDA, the kernel has two launch configs (BLOCK_K 32, then 16), and the timer
    makes the kernel's second config the fastest (10 us; the first 20 us; every other candidate 30
    us). Returns the list of every callable timed."""
    from sparsec.codegen.measure import KernelCall

    timed = []

    def fake_time(fn, *args, **kwargs):
        timed.append(fn)
        if not isinstance(fn, KernelCall):
            return 30e-6
        return 10e-6 if fn.config["BLOCK_K"] == 16 else 20e-6

    monkeypatch.setattr("sparsec.passes.backend._device", lambda gm, layer: torch.device("cuda"))
    monkeypatch.setattr("sparsec.codegen.measure.time_cuda", fake_time)
    monkeypatch.setattr("sparsec.codegen.configs.matmul_candidates",
                        lambda m, n, k, *a, **kw: [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, GROUP_M=1, SPLIT_K=1,
                                                        PRMT_EXPAND=0, GATHER=0, num_warps=4, num_stages=1)
                                                   for bk in (32, 16)])
    return timed


@pytest.fixture
def run_without_compiler(tmp_path):
    """run(code): `code` in a fresh Python whose C++ compiler does not exist (and whose extension cache
    is empty), so sparsec's C++ kernels cannot build there; fails the test if the code fails."""
    import subprocess

    def run(code: str) -> None:
        env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    return run
