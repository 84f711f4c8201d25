"""The graph surgery rewrites do around a weight they replace: its shape reads folded to numbers, its
dtype / device reads pointed at a tensor of the same kind, and its reads (and transposes of them) erased
once nothing uses them. The read-only questions about weight reads are in weight_reads.py."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsec.passes.weight_reads import owner_of, reads_metadata, reads_shape, transposed_input


def redirect_metadata_reads(gm: fx.GraphModule, reads: list[fx.Node], probe: str) -> list[fx.Node]:
    """Make every dtype / device read of a parameter (through its get_attr `reads`, directly or through a
    transpose) read the tensor at attribute path `probe` instead, which has the same dtype and device.
    Returns the reads it may have left without users, for `erase_unused_reads`."""
    out = list(reads)
    for read in reads:
        views = [read] + [u for u in read.users if transposed_input(u) is read]
        out += views[1:]
        for view in views:
            for user in [u for u in view.users if reads_metadata(u)]:
                with gm.graph.inserting_before(user):
                    user.args = (gm.graph.get_attr(probe),) + tuple(user.args[1:])
    return out


def fold_shape_reads(gm: fx.GraphModule, reads: list[fx.Node], shape: tuple[int, ...], dtype: torch.dtype) -> list[fx.Node]:
    """Replace every read of the shape of a parameter (through its get_attr `reads`, directly or through a
    transpose) by its value.

    Used where a rewrite removes the dense weight or changes its shape: the model computed with the
    shape it had when it was traced, and still does. Returns the reads (get_attr, transposes) this may
    have left without users, for `erase_unused_reads`.
    """
    weight = torch.empty(shape, dtype=dtype, device="meta")  # only shapes are computed
    out = list(reads)
    for read in reads:
        for user in list(read.users):
            if reads_shape(user):
                _replace_by_value(gm, user, _run_on(user, {read: weight}))
            elif transposed_input(user) is read:
                transposed = _run_on(user, {read: weight})
                for shape_read in [u for u in user.users if reads_shape(u)]:
                    _replace_by_value(gm, shape_read, _run_on(shape_read, {user: transposed}))
                out.append(user)
    return out


def _run_on(node: fx.Node, values: dict[fx.Node, torch.Tensor]):
    """`node`'s result when its input nodes hold `values`."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _replace_by_value(gm: fx.GraphModule, node: fx.Node, value) -> None:
    """Put `value` in place of `node`, then fold the Python arithmetic on it that is now constant
    (`W.shape[0] ** -0.5` becomes one number), so later analyses see numbers, not nodes."""
    users = list(node.users)
    for user in users:
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: value if n is node else n)
    gm.graph.erase_node(node)
    for user in users:
        if user.op == "call_function" and user.target in _PYTHON_ARITHMETIC and not user.all_input_nodes:
            _replace_by_value(gm, user, user.target(*user.args, **user.kwargs))


_PYTHON_ARITHMETIC = {operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                      operator.mod, operator.pow, operator.neg}


def erase_unused_reads(gm: fx.GraphModule, reads: list[fx.Node]) -> None:
    """Erase the weight / bias reads (and transposes of them) that rewritten nodes left without users,
    and the attributes no remaining node reads: no dense copy stays behind. Attributes of a module the
    graph calls are that module's own (its forward reads them) and stay."""
    erased = set()
    while reads:
        node = reads.pop()
        source = transposed_input(node)  # None for a get_attr
        if node.users or node in erased or (node.op != "get_attr" and source is None):
            continue
        gm.graph.erase_node(node)
        erased.add(node)
        if source is not None:
            reads.append(source)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in {n.target for n in erased if n.op == "get_attr"} - still_read:
        parent = target.rpartition(".")[0]
        if not any(parent == m or parent.startswith(m + ".") for m in called):
            delattr(*owner_of(gm, target))
