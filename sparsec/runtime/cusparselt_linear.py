"""CusparseltLinear: a 2:4 linear layer run by torch's semi-structured sparse GEMM (cuSPARSELt, or
CUTLASS where cuSPARSELt is missing), chosen by backend="auto" where it measured fastest.

The packed sparsec weight stays the source of truth (mask, effective weight, saving); the
semi-structured tensor is derived from it on the first CUDA call and not saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.runtime import traced_call
from sparsec.runtime.layers import SparseLinear


def semi_structured_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.sparse, "to_sparse_semi_structured")


class CusparseltLinear(traced_call.OpaqueKernel, SparseLinear):
    kernel_backend = "cusparselt"

    def semi_structured_weight(self):
        return self.derived("semi_structured", lambda: torch.sparse.to_sparse_semi_structured(self.packed.rows()))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return SparseLinear.forward(self, x)  # (the dense product on the packed rows)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            raise RuntimeError(f"layer {self.layer_name!r} was compiled for cuSPARSELt, which needs CUDA tensors")
        return F.linear(x, self.semi_structured_weight(), self.bias)

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped as the layer's output on x (for tracers)."""
        return x.new_empty(*x.shape[:-1], self.packed.out_features)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel_forward(x)
