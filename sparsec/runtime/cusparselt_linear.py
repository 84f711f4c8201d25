"""CusparseltLinear: a 2:4 linear layer run by torch's semi-structured sparse GEMM (cuSPARSELt, or
CUTLASS where cuSPARSELt is missing), chosen by backend="auto" where it measured fastest.

The packed sparsec weight stays the source of truth (mask, effective weight, saving); the
semi-structured tensor is derived from it on the first CUDA call and not saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.runtime.layers import SparseLinear


def semi_structured_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.sparse, "to_sparse_semi_structured")


class CusparseltLinear(SparseLinear):
    def semi_structured_weight(self):
        return self.derived("semi_structured", lambda: torch.sparse.to_sparse_semi_structured(self.packed.rows()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            raise RuntimeError(f"layer {self.layer_name!r} was compiled for cuSPARSELt, which needs CUDA tensors")
        return F.linear(x, self.semi_structured_weight(), self.bias)
