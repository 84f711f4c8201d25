"""CsrLinear: an unstructured linear layer run as a CSR sparse x dense product by torch's own sparse
kernels (MKL on CPU, cuSPARSE on CUDA), chosen by backend="auto" where it measured faster than a dense
GEMM on the pruned weight at the compiled batch. At 90% sparsity and above it reads and multiplies only
the kept weights, which is what method (d) (Pietron & Zurek) relies on; at 50% it is several times slower
than dense, which is why auto measures instead of assuming (see runtime/cpu_linear.py for when it runs and
what it falls back to).

The layout is the packed CSR arrays in the dtype the product runs in (int8 dequantized, int32 indices).
torch's CPU CSR product takes float32 and float64 only, so 16-bit CPU layers multiply in float32 and round
the result to the layer's dtype, as torch's CPU GEMMs and sparsec's C++ kernels compute 16-bit layers; on
CUDA the product runs in the layer's dtype. The product is the operator sparsec_csr::linear, opaque to
torch.compile / torch.export (TorchDynamo does not trace sparse tensors), which builds the sparse tensor
view inside it.
"""
from __future__ import annotations

import collections
import warnings

import torch

from sparsec.runtime.cpu_linear import CpuKernelLinear
from sparsec.runtime.packed import CSRPacked

calls: collections.Counter = collections.Counter()  # "fast": products run by the operator (tests count them)


@torch.library.custom_op("sparsec_csr::linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., out_features] in x's dtype, = F.linear(x, W, bias) with W the CSR arrays."""
    calls["fast"] += 1
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        # check_invariants=False said outright: CSRPacked checked the arrays when packed and when loaded
        weight = torch.sparse_csr_tensor(crow, col, values, size=(out_features, x.shape[-1]), check_invariants=False)
    rows = x.reshape(-1, x.shape[-1]).to(values.dtype)
    # W x^T: the sparse operand must come first; x^T made contiguous (one small copy) runs ~1.3x faster in
    # MKL than its transposed view at a few rows. Autocast off inside: the layer decides the dtypes (MKL's
    # CSR product has no bfloat16), and the caller's autocast has already chosen x's.
    with torch.autocast(x.device.type, enabled=False):
        y = torch.sparse.mm(weight, rows.t().contiguous()).t()
        if bias is not None:
            y = y + bias.to(y.dtype)
    # row-major, as F.linear's output and the fake below: the product's transpose is column-major, so a .view()
    # after the layer failed where nn.Linear's output allows it, and torch.compile refused the op (fake strides)
    return y.to(x.dtype).contiguous().reshape(*x.shape[:-1], out_features)


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

    def build_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = self.packed
        dtype = packed.dtype_probe.dtype
        if packed.values.device.type == "cpu" and dtype != torch.float64:
            dtype = torch.float32  # (MKL's CSR product has no 16-bit kernels; cuSPARSE has)
        index = torch.int32 if packed.nnz < 2**31 else torch.int64  # half the index bytes where they fit
        return packed.crow_indices.to(index), packed.col_indices.to(index), packed.kept_values(dtype).contiguous()

    def call_kernel(self, x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
        return csr_linear(x, *layout, self.packed.out_features, bias)
