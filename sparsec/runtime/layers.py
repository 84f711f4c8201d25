"""The nn.Modules the rewritten graph calls in place of chosen Linear / Conv2d / matmul layers.

CPU execution is plain torch: rebuild the dense weight from the packed form, then run the same
F.linear / F.conv2d the original layer ran. That is exactly "the original model with the pruned
(and fake-quantized) weights", and keeps no dense copy between calls.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.meta import ConvParams
from sparsec.reference import rows_to_weight
from sparsec.runtime.packed import PackedWeight


class SparseLayer(nn.Module):
    """Common part: the packed weight, the bias, and what the plan said about this layer."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, op: str, weight_shape: tuple[int, ...],
                 layer_name: str, pattern: str, reason: str):
        super().__init__()
        self.packed = packed
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None
        self.op, self.weight_shape = op, tuple(weight_shape)
        self.layer_name, self.pattern, self.reason = layer_name, pattern, reason

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes with, in the original shape (rebuilt on each access)."""
        return self.effective_weight()

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return rows_to_weight(self.packed.rows(dtype), self.op, self.weight_shape)

    def mask(self) -> torch.Tensor:
        return rows_to_weight(self.packed.mask(), self.op, self.weight_shape)

    def extra_repr(self) -> str:
        quant = f", {self.packed.quant}" if self.packed.quant else ""
        return f"{self.layer_name!r}: {self.op} {tuple(self.weight_shape)}, {self.pattern}{quant}"


class SparseLinear(SparseLayer):
    """y = x W^T + b for op "linear" (W [out, in]); y = x @ W for op "matmul" (W [K, N])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed rows are [out, K] for both ops, which is exactly F.linear's weight layout.
        return F.linear(x, self.packed.rows(), self.bias)


class SparseConv2d(SparseLayer):
    def __init__(self, packed, bias, weight_shape, layer_name, pattern, reason, conv: ConvParams):
        super().__init__(packed, bias, "conv2d", weight_shape, layer_name, pattern, reason)
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        if conv.padding_mode != "zeros":
            # Same as nn.Conv2d: pad explicitly with the requested mode, then convolve unpadded.
            kh, kw = self.weight_shape[2:]
            if conv.padding == "same":
                pads = []
                for d, k in ((conv.dilation[1], kw), (conv.dilation[0], kh)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
            elif conv.padding == "valid":
                pads = [0, 0, 0, 0]
            else:
                pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
            self.explicit_pad = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = rows_to_weight(self.packed.rows(), "conv2d", self.weight_shape)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.explicit_pad, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
