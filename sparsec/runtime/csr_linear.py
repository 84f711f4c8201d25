"""CsrLinear: an unstructured linear layer run as a CSR sparse x dense product by torch's own sparse
kernels (MKL on CPU, cuSPARSE on CUDA), chosen by backend="auto" where it measured faster than a dense
GEMM on the pruned weight at the compiled batch. At 90% sparsity and above it reads and multiplies only
the kept weights, which is what method (d) (Pietron & Zurek) relies on; at 50% it is several times slower
than dense, which is why auto measures instead of assuming (see runtime/cpu_linear.py for when it runs and
what it falls back to).

The layout is the packed CSR arrays in the dtype the product runs in (int8 dequantized, int32 indices).
torch's CPU CSR product takes float32 and float64 only, so 16-bit CPU layers multiply in float32 and round
the result to the layer's dtype, as torch's CPU GEMMs and sparsec's C++ kernels compute 16-bit layers; on
CUDA the product runs in the layer's dtype. Eager calls multiply with a sparse tensor built once
with the layout; under torch.compile / torch.export the product is the operator sparsec_csr::linear on the
arrays (TorchDynamo does not trace sparse tensors), which views them as one inside it.
"""
from __future__ import annotations

import collections
import contextlib
import warnings

import torch

from sparsec.runtime.cpu_linear import CpuKernelLinear
from sparsec.runtime.packed import CSRPacked

calls: collections.Counter = collections.Counter()  # "fast": CSR products run (tests count them)


def sparse_weight(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The CSR arrays as a torch sparse tensor (a view: no copy)."""
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        # check_invariants=False said outright: CSRPacked checked the arrays when packed and when loaded
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def csr_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a sparse CSR weight [out, K], in the weight's dtype, returned in x's."""
    calls["fast"] += 1
    rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    out = weight.shape[0]
    # W x^T: the sparse operand must come first; x^T made contiguous (one small copy) runs ~1.3x faster in
    # MKL than its transposed view at a few rows, and addmm adds the bias in the same call. Autocast off
    # inside: the layer decides the dtypes (MKL's CSR product has no bfloat16), the caller's autocast has
    # already chosen x's.
    with _autocast_off(x.device.type):
        xt = rows.t().contiguous()
        y = (torch.sparse.mm(weight, xt) if bias is None else
             torch.addmm(bias.to(weight.dtype).unsqueeze(1), weight, xt))
    # row-major, as F.linear's output and the operator's fake: the product's transpose is column-major, so a
    # .view() after the layer failed where nn.Linear's output allows it, and torch.compile refused the op
    return y.t().to(x.dtype).contiguous().reshape(*x.shape[:-1], out)


def _autocast_off(device: str):
    on = torch.is_autocast_enabled(device) if hasattr(torch, "get_autocast_dtype") else True  # (torch < 2.4)
    return torch.autocast(device, enabled=False) if on else contextlib.nullcontext()


@torch.library.custom_op("sparsec_csr::linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., out_features] in x's dtype, = F.linear(x, W, bias) with W the CSR arrays: the
    product as torch.compile / torch.export see it (TorchDynamo does not trace sparse tensors)."""
    return csr_product(x, sparse_weight(crow, col, values, (out_features, x.shape[-1])), bias)


@csr_linear.register_fake
def _(x, crow, col, values, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


class CsrLinear(CpuKernelLinear):
    kernel_backend = "csr"
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    kernel_devices = ("cpu", "cuda")  # MKL on the CPU, cuSPARSE on CUDA: where backend auto measures it faster

    def __init__(self, packed, *args, **kwargs):
        if not isinstance(packed, CSRPacked):
            raise TypeError(f"backend 'csr' runs a CSR-packed (unstructured) weight, got {type(packed).__name__}")
        super().__init__(packed, *args, **kwargs)

    def build_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crow, col, values, the sparse tensor viewing them): eager calls take the sparse tensor as it is
        (building it per call cost 12 of the 20 us a 256 x 256 product took at one row), torch.compile the arrays."""
        packed = self.packed
        dtype = packed.dtype_probe.dtype
        if packed.values.device.type == "cpu" and dtype != torch.float64:
            dtype = torch.float32  # (MKL's CSR product has no 16-bit kernels; cuSPARSE has)
        index = torch.int32 if packed.nnz < 2**31 else torch.int64  # half the index bytes where they fit
        crow, col = packed.crow_indices.to(index), packed.col_indices.to(index)
        values = packed.kept_values(dtype).contiguous()
        return crow, col, values, sparse_weight(crow, col, values, (packed.out_features, packed.reduction))

    def call_kernel(self, x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
        crow, col, values, weight = layout
        if torch.compiler.is_compiling():
            return csr_linear(x, crow, col, values, self.packed.out_features, bias)
        return csr_product(x, weight, bias)
