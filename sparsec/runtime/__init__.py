"""Modules the rewritten graph calls: packed sparse weights and the layers that use them."""
from sparsec.runtime.layers import RuntimeLayer, SparseConv1d, SparseConv2d, SparseLayer, SparseLinear
from sparsec.runtime.packed import CSRPacked, DensePacked, FanInPacked, NMPacked, PackedWeight

__all__ = ["RuntimeLayer", "SparseLayer", "SparseLinear", "SparseConv1d", "SparseConv2d", "PackedWeight", "NMPacked", "FanInPacked", "CSRPacked",
           "DensePacked"]
