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

ShapeGuard also checks torch.export's other conditions on the input sizes (an even batch, one dim
larger than another, a dim that is not 1: sparsec.export_capture._size_conditions reads them).
"""
from __future__ import annotations

import math
import re
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


class ShapeGuard(InputGuard):
    """InputGuard that also checks torch.export's other conditions on the input sizes (see
    sparsec.export_capture._size_conditions). They are kept as source (picklable) and compiled to one function
    on load."""

    def __init__(self, shapes: list, conditions: list[str]):
        super().__init__(shapes)
        self.conditions = conditions
        self._check = self._compiled()

    def _dims(self) -> dict[str, tuple[int, int]]:
        """symbol -> (input, dim) of the first dynamic dim it names."""
        dims = {}
        for i, spec in enumerate(self.shapes):
            for d, want in enumerate(spec if isinstance(spec, tuple) else ()):
                if isinstance(want, tuple):
                    dims.setdefault(want[0], (i, d))
        return dims

    def _compiled(self):
        """check(args) -> the conditions that fail; the sizes are read as `s77 = args[0].shape[0]`. A
        condition that cannot be evaluated (`s0 % s1` at s1 = 0, a dim whose range allows 0) fails too."""
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
        source = ("def check(args):\n" + "".join(f"    {s} = args[{i}].shape[{d}]\n" for s, (i, d) in self._dims().items())
                  + "    failed = []\n"
                  + "".join(f"    try:\n        ok = bool({c})\n    except ArithmeticError:\n        ok = False\n"
                            f"    if not ok:\n        failed.append(conditions[{k}])\n" for k, c in enumerate(self.conditions))
                  + "    return failed\n")
        namespace = {**SYMPY_INTERP, "math": math, "conditions": self.conditions}
        exec(source, namespace)  # noqa: S102 - source built from torch's own guard expressions
        return namespace["check"]

    def forward(self, *args) -> None:
        super().forward(*args)  # ranks, fixed dims and ranges first: their messages name the dim
        failed = self._check(args)
        if failed:
            sizes = ", ".join(f"{s} = input {i} dim {d} = {args[i].shape[d]}" for s, (i, d) in self._dims().items()
                              if any(re.search(rf"\b{s}\b", c) for c in failed))
            raise ValueError(
                f"this model was captured with torch.export, whose graph holds only for input sizes where "
                f"{' and '.join(failed)} (the model's code depends on them; here {sizes}). Call it with such "
                f"inputs, or compile again with example inputs of these sizes (or make the model "
                f"symbolic_trace-able: its graph keeps no shapes)")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_check", None)  # a function made by exec: made again on load
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._check = self._compiled()
