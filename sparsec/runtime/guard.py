"""InputGuard: the check an exported (shape-specialised) graph runs on its inputs.

torch.export bakes the example inputs' shapes into the graph (reshape sizes and the like), so the
graph is only right at those shapes. torch.export guards that with a module that cannot be
pickled; sparsec puts this one in its place, with an error that says what to do.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class InputGuard(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...] | None]):
        super().__init__()
        self.shapes = shapes

    def forward(self, *args) -> None:
        got = [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args]
        if got != self.shapes:
            raise ValueError(
                f"this model was captured with torch.export, which specialises the graph to the example inputs' "
                f"shapes {self.shapes}; got {got}. Call it with those shapes, or compile again with example inputs "
                f"of the new shape (or make the model symbolic_trace-able so shapes stay dynamic)")
