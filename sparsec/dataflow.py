"""The fx graph as a networkx DiGraph of data flow, for the analyses that ask what reaches what: the
first / last layer rule (passes/selection.py) and whether anything trainable sits upstream of a layer
(passes/grad_selection.py). Views and in-place writes are followed, so a layer's output written into a
view of a buffer reaches that buffer's later readers."""
from __future__ import annotations

import operator

import networkx as nx
import torch.fx as fx

from sparsec.meta import op_name


def dataflow_graph(gm: fx.GraphModule, *, gradients: bool = False):
    """The fx graph as a networkx DiGraph (an edge from every input node to its user).

    gradients=True: the graph gradients flow back along, for "is anything trainable upstream"
    questions. A detach (`x.detach()`, `x.data`) starts a tensor no gradient flows back from, so it
    gets no edge from its input, and an in-place write through a detached alias reaches the alias
    (its readers' gradients do reach the written value) but not the tensor it aliases. The default
    graph follows the data: a detached tensor still carries its input's values (first / last layer).
    """
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        if not (gradients and _detaches(node)):
            for inp in node.all_input_nodes:
                graph.add_edge(inp, node)
        # An in-place write (`acc.index_add_(0, i, y)`, `buf[:, :n] = y`) hands its inputs on to the tensor
        # it writes and to what that is a view of: their later readers read y too.
        target = node.args[0] if _writes_in_place(node) and node.args else None
        while isinstance(target, fx.Node):
            graph.add_edge(node, target)
            if gradients and _detaches(target):
                break
            target = target.args[0] if target.args and _is_view(target) else None
    return graph


def _writes_in_place(node: fx.Node) -> bool:
    """Whether `node` writes into its first argument."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)  # aten ops (torch.export graphs)
    return bool(schema is not None and schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write)


# Ops whose result shares its first argument's memory (a write to it writes there too), by `op_name`, so
# x.movedim, torch.movedim and aten.movedim.int alike; an in-place variant (x.squeeze_, x.t_) returns its
# argument itself and has the same name. Ops that may return a view (reshape, flatten, reshape_as) count;
# those that alias only when they change nothing (contiguous, to, type_as) do not.
_VIEWS = {
    "view", "view_as", "unsafe_view", "reshape", "reshape_as", "flatten", "unflatten",  # reshaping
    "transpose", "swapaxes", "swapdims", "t", "adjoint", "permute", "movedim", "moveaxis",  # reordering dims
    "mT", "mH", "numpy_T", "matrix_H",  # x.mT, x.mH, x.T, x.H as torch.export records them (aten.numpy_T, ...)
    "squeeze", "unsqueeze", "expand", "expand_as", "as_strided", "alias", "detach",
    "narrow", "select", "slice", "diagonal", "unfold", "getitem",  # parts of it
    "chunk", "split", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "dsplit", "unbind",  # ... then getitem
    "view_as_real", "view_as_complex", "real", "imag",
}
# Tensor attributes that are views (fx records `x.mT` as getattr(x, "mT")).
_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "imag", "data"}


def _is_view(node: fx.Node) -> bool:
    """Whether `node`'s result shares its first argument's memory."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
    return op_name(node) in _VIEWS


def _detaches(node: fx.Node) -> bool:
    """Whether `node` is a detach (`x.detach()`, `torch.detach(x)`, aten.detach, `x.data`): its result
    holds its input's values but no gradient flows back through it."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] == "data"
    return node.op in ("call_method", "call_function") and op_name(node) == "detach"
