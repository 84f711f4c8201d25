"""TrainOffset: a per-channel constant added in training mode only, for shrink's bias folds.

shrink removes a channel whose value is a known constant c and adds c * (that input column) to the
bias of each layer reading it. Behind a BatchNorm, c depends on the mode: an all-zero channel leaves
BatchNorm as beta with batch statistics (training) but as (0 - mean) * gamma / sqrt(var + eps) + beta
with running statistics (eval). The consumer's bias takes the eval-mode fold (what inference runs,
with nothing added) and this module, right after the consumer, adds the difference while training.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TrainOffset(nn.Module):
    """x + offset along the channel dim while training; x itself in eval mode."""

    def __init__(self, offset: torch.Tensor, dim: int):
        super().__init__()
        if dim >= 0:
            raise ValueError(f"dim counts from the end (-1: Linear, -3: Conv2d), got {dim}")
        self.register_buffer("offset", offset.detach().clone().flatten())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + self.offset.view((-1,) + (1,) * (-self.dim - 1)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.offset.numel()}, dim={self.dim}"
