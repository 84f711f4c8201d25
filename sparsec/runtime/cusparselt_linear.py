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
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._semi_structured = None

    def semi_structured_weight(self):
        if self._semi_structured is None:
            self._semi_structured = torch.sparse.to_sparse_semi_structured(self.packed.rows())
        return self._semi_structured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            raise RuntimeError(f"layer {self.layer_name!r} was compiled for cuSPARSELt, which needs CUDA tensors")
        return F.linear(x, self.semi_structured_weight(), self.bias)

    def _apply(self, fn, recurse=True):
        self._semi_structured = None  # device / dtype changes: rebuild from the packed weight
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_semi_structured"] = None
        return state
