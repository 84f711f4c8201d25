"""How a functional layer reads its weight: the parameter as it is, or its 2-D transpose.

`x @ W.T` (also `W.t()`, `W.transpose(0, 1)`, `W.permute(1, 0)`, `W.mT` and their aten forms from
torch.export) computes exactly `F.linear(x, W)`, so the candidates pass takes it as a linear layer.
Eligibility counts the transpose's users as the weight's uses, and the rewrite erases the
transpose together with the read once nothing else uses them (weight_rewrites.py). These are
read-only questions about the graph, for analyses and rewrites alike.
"""
from __future__ import annotations

import builtins
import collections

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


# Reads of a tensor's shape alone (`W.shape[0]`, `W.size(-1)`, `W.dim()`, `W.numel()`): pruning keeps
# a weight's shape, so they do not stop its layer being pruned.
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
_SHAPE_ATTRIBUTES = {"shape", "ndim"}


def reads_shape(node: fx.Node) -> bool:
    """Whether `node` reads only the shape of its first argument."""
    return _reads_only(node, _SHAPE_METHODS, _SHAPE_ATTRIBUTES)


def _reads_only(node: fx.Node, methods: set[str], attributes: set[str]) -> bool:
    """Whether `node` calls one of `methods` on its first argument or reads one of its `attributes`."""
    if not node.args:
        return False
    if node.op == "call_method":  # keywords too: W.size(dim=1) reads the shape as W.size(1) does
        return node.target in methods
    return (node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2
            and not node.kwargs and node.args[1] in attributes)


# Reads of what a weight is, not what it holds (`x.to(W.dtype)`, `torch.zeros(n, device=W.device)`): they
# do not stop its layer being pruned either; the rewrite points them at a tensor of the replacement layer
# with the weight's dtype and device (`redirect_metadata_reads`), so they follow `.to()` / `.half()` as before.
_METADATA_ATTRIBUTES = {"dtype", "device", "is_cuda", "is_cpu"}
_METADATA_METHODS = {"get_device", "is_floating_point"}


def reads_metadata(node: fx.Node) -> bool:
    """Whether `node` reads only the dtype or device of its first argument."""
    return _reads_only(node, _METADATA_METHODS, _METADATA_ATTRIBUTES)


def reads_by_target(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The graph's get_attr nodes by the attribute they read, gathered once for a rewrite of every layer:
    each layer's looked up by a scan of the whole graph made a compile quadratic in its layers."""
    out = collections.defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            out[node.target].append(node)
    return out


def owner_of(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module holding attribute path `target` (a get_attr target, "blk.proj.weight"), and the name in it."""
    parent, _, attr = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), attr


def attribute(gm: fx.GraphModule, target: str):
    """The value at attribute path `target` (a parameter, buffer, or plain tensor attribute)."""
    owner, attr = owner_of(gm, target)
    return getattr(owner, attr)
