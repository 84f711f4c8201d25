"""How a functional layer reads its weight: the parameter as it is, or its 2-D transpose.

`x @ W.T` (also `W.t()`, `W.transpose(0, 1)`, `W.permute(1, 0)`, `W.mT` and their aten forms from
torch.export) computes exactly `F.linear(x, W)`, so the candidates pass takes it as a linear layer.
Eligibility counts the transpose's users as the weight's uses, and the rewrite erases the
transpose together with the read once nothing else uses them.
"""
from __future__ import annotations

import builtins

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten

_T_ATTRIBUTES = {"T", "mT"}
_T_FUNCTIONS = {torch.t, aten.t.default, aten.numpy_T.default}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose.int}
_PERMUTE_FUNCTIONS = {torch.permute, aten.permute.default}


def _dims(values: list) -> list[int] | None:
    """Dimension arguments for a 2-D tensor, made non-negative (None when not two valid ints)."""
    if len(values) != 2 or not all(isinstance(d, int) and -2 <= d <= 1 for d in values):
        return None
    return [d % 2 for d in values]


def transposed_input(node: fx.Node) -> fx.Node | None:
    """The node `node` transposes, when it is one of the 2-D transposes above (None otherwise).

    Only the form is checked here; that the input is 2-D is the caller's to check.
    """
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, rest = node.args[0], list(node.args[1:])
    if node.op == "call_function" and node.target is builtins.getattr:
        return source if rest and rest[0] in _T_ATTRIBUTES else None
    if node.kwargs:
        return None
    if (node.op == "call_method" and node.target == "t") or (node.op == "call_function" and node.target in _T_FUNCTIONS):
        return source if not rest else None
    transpose = (node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims")) or (
        node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS)
    if transpose:
        dims = _dims(rest)
        return source if dims is not None and dims[0] != dims[1] else None
    permute = (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS)
    if permute:
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return source if _dims(dims) == [1, 0] else None
    return None


def parameter_read(gm: fx.GraphModule, node: object) -> tuple[str, nn.Parameter, bool] | None:
    """(path, parameter, transposed) when `node` is a parameter of `gm` or the transpose of a 2-D one."""
    transposed = False
    if isinstance(node, fx.Node) and (source := transposed_input(node)) is not None:
        node, transposed = source, True
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    if transposed and value.dim() != 2:
        return None
    return node.target, value, transposed


def readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that use the value a get_attr node reads, looking through transposes of it."""
    out = []
    for user in node.users:
        out.extend(user.users if transposed_input(user) is node else [user])
    return out
