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
