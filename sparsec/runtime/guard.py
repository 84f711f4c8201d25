"""InputGuard: the check a graph captured by torch.export runs on its inputs.

torch.export leaves an input dim dynamic only where the model's code allows it (within a range:
export assumes a dynamic size is not 0 or 1, and may bound it), and bakes the rest into the graph
(reshape sizes and the like), so the graph is right only for inputs within those limits. torch.export
guards that with a module that cannot be pickled; sparsec puts this one in its place, with an error
that says which dim is wrong and what to do.

Each input's spec is a tuple with one entry per dim: an int (the dim is fixed) or `(symbol, low,
high)` (dynamic: any size in [low, high], high None for no bound; dims sharing a symbol must be
equal); or, for an input that is not a tensor, a Constant: torch.export bakes such values (a float
scale, a bool flag, None) into the graph, so a call passing another would silently compute with the
example's. Files saved by earlier versions hold int dims only, and None for non-tensor inputs
(unchecked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

DimSpec = int | tuple[str, int, int | None]


@dataclass(frozen=True)
class Constant:
    value: Any

    def matches(self, arg: Any) -> bool:
        return type(arg) is type(self.value) and (arg is self.value or arg == self.value)


class InputGuard(nn.Module):
    def __init__(self, shapes: list[tuple[DimSpec, ...] | None]):
        super().__init__()
        self.shapes = shapes

    def forward(self, *args) -> None:
        problems, seen = [], {}
        for i, (spec, arg) in enumerate(zip(self.shapes, args)):
            if spec is None:
                continue
            if isinstance(spec, Constant):
                if not spec.matches(arg):
                    problems.append(f"input {i} is fixed at {spec.value!r} (not a tensor: the graph holds its value), "
                                    f"got {arg!r}")
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
                f"this model was captured with torch.export, whose graph holds only for inputs "
                f"{self.describe()}: {'; '.join(problems)}. Call it with such inputs, or compile again with example "
                f"inputs of the new shape (or make the model symbolic_trace-able: its graph keeps no shapes)")

    def describe(self) -> str:
        """The accepted inputs, e.g. [(s0 in [2, inf), 5, 32), 2.0]."""
        def dim(want: DimSpec) -> str:
            return str(want) if isinstance(want, int) else f"{want[0]} in {_range(want[1], want[2])}"

        def entry(spec) -> str:
            if spec is None or isinstance(spec, Constant):
                return "-" if spec is None else repr(spec.value)
            return "(" + ", ".join(map(dim, spec)) + ("," if len(spec) == 1 else "") + ")"

        return "[" + ", ".join(map(entry, self.shapes)) + "]"


def _range(low: int, high: int | None) -> str:
    return f"[{low}, {high}]" if high is not None else f"[{low}, inf)"
