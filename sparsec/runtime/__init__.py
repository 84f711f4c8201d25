"""Modules the rewritten graph calls: packed sparse weights and the layers that use them."""
from sparsec.runtime.layers import SparseConv2d, SparseLayer, SparseLinear
from sparsec.runtime.packed import FanInPacked, NMPacked, PackedWeight

__all__ = ["SparseLayer", "SparseLinear", "SparseConv2d", "PackedWeight", "NMPacked", "FanInPacked"]
