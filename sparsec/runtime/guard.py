"""InputGuard: the check a graph captured by torch.export runs on its inputs.

torch.export leaves an input dim dynamic only where the model's code allows it (within a range:
export assumes a dynamic size is not 0 or 1, and may bound it), and bakes the rest into the graph
(reshape sizes and the like), so the graph is right only for inputs within those limits. torch.export
guards that with a module that cannot be pickled; sparsec puts this one in its place, with an error
that says which dim is wrong and what to do.

Each input's spec is None (not a tensor) or one entry per dim: an int (the dim is fixed) or
`(symbol, low, high)` (dynamic: any size in [low, high], high None for no bound; dims sharing a
symbol must be equal). Files saved before dims could be dynamic hold only ints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

DimSpec = int | tuple[str, int, int | None]


class InputGuard(nn.Module):
    def __init__(self, shapes: list[tuple[DimSpec, ...] | None]):
        super().__init__()
        self.shapes = shapes

    def forward(self, *args) -> None:
        problems, seen = [], {}
        for i, (spec, arg) in enumerate(zip(self.shapes, args)):
            if spec is None:
                continue
            if not isinstance(arg, torch.Tensor) or arg.dim() != len(spec):
                got = f"a {arg.dim()}-d tensor" if isinstance(arg, torch.Tensor) else type(arg).__name__
                problems.append(f"input {i} must be a {len(spec)}-d tensor, got {got}")
                continue
            for d, (want, size) in enumerate(zip(spec, arg.shape)):
                if isinstance(want, int):
                    if size != want:
                        problems.append(f"input {i} dim {d} is fixed at {want}, got {size}")
                    continue
                symbol, low, high = want
                if size < low or (high is not None and size > high):
                    problems.append(f"input {i} dim {d} must be in {_range(low, high)}, got {size}"
                                    + (" (torch.export traces a dynamic size as neither 0 nor 1: for that size, "
                                       "compile with example inputs of that size there)" if size < 2 <= low else ""))
                elif seen.setdefault(symbol, (size, i, d))[0] != size:
                    first, j, e = seen[symbol]
                    problems.append(f"input {i} dim {d} must equal input {j} dim {e} ({first}), got {size}")
        if problems:
            raise ValueError(
                f"this model was captured with torch.export, whose graph holds only for inputs of shape "
                f"{self.describe()}: {'; '.join(problems)}. Call it with such inputs, or compile again with example "
                f"inputs of the new shape (or make the model symbolic_trace-able: its graph keeps no shapes)")

    def describe(self) -> str:
        """The accepted shapes, e.g. [(s0 in [2, inf), 5, 32)]."""
        def dim(want: DimSpec) -> str:
            return str(want) if isinstance(want, int) else f"{want[0]} in {_range(want[1], want[2])}"

        return "[" + ", ".join("-" if s is None else "(" + ", ".join(map(dim, s)) + ("," if len(s) == 1 else "") + ")"
                               for s in self.shapes) + "]"


def _range(low: int, high: int | None) -> str:
    return f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
