"""Analysis: can a candidate layer be made sparse at all? Records a `blocker` sentence when not.

Checks that do not depend on the pattern: weight dtype, non-finite weights, weights shared with
another use (tied weights, direct reads), and call sites that disagree on how the weight is used.
Whether the shape fits a given pattern is checked where the pattern is chosen (selection pass).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import data_input, get_meta, layer_nodes, op_name, update_meta
from sparsec.passes.weight_reads import attribute, readers, reads_metadata, reads_shape
from sparsec.plan import dtype_name
from sparsec.reference import count_nonfinite

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _weight_uses(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every use of every parameter path: call_module sites read their module's parameters implicitly.
    Reads of the shape, dtype or device alone are not uses (pruning keeps them; the rewrite folds the
    shape reads and points the others at the replacement layer). A tensor
    constant holding a parameter's memory is a use of it too: a weight read where the tracer sees a
    tensor, not a proxy (`dict(self.named_parameters())[...]`, `self.fc._parameters[...]`), is
    stored in the graph as a constant of the unpruned values."""
    storage = {p.untyped_storage().data_ptr(): path for path, p in gm.named_parameters() if p.numel()}
    uses: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":  # x @ W.T: the matmul, not the transpose, is the use
            path = node.target
            if not _is_parameter(gm, path):
                value = attribute(gm, path)
                if not isinstance(value, torch.Tensor) or not value.numel():
                    continue
                path = storage.get(value.untyped_storage().data_ptr(), path)
            for user in readers(node):
                if not (reads_shape(user) or reads_metadata(user)):
                    uses.setdefault(path, []).append(user)
        elif node.op == "call_module":
            # recurse: a module called as a whole (a leaf) reads its submodules' parameters too; F.linear(x,
            # blk.sub.w) outside leaf `blk` was pruned while blk's own forward kept computing with the dense w
            for pname, _ in gm.get_submodule(node.target).named_parameters():
                uses.setdefault(f"{node.target}.{pname}", []).append(node)
    return uses


def _is_parameter(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_parameter(path)
        return True
    except AttributeError:
        return False


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Parameter path -> other paths holding the very same Parameter (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for path, p in gm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(path)
    return {path: [o for o in paths if o != path] for paths in by_id.values() for path in paths}


def _described(gm: fx.GraphModule, node: fx.Node) -> str:
    """A graph node as the user knows it: the module it calls, or the op and its node name."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    return f"{op_name(node)} (graph node {node.name})"


def blocker_for(gm: fx.GraphModule, nodes: list[fx.Node], uses: dict[str, list[fx.Node]], aliases: dict[str, list[str]]) -> str | None:
    layer = get_meta(nodes[0]).layer
    weight = gm.get_parameter(layer.weight_path)
    if weight.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        return f"weight dtype {dtype_name(weight.dtype)} is not supported (supported: {names})"
    if not weight.numel():  # nn.Linear(16, 0): no groups to prune, and no bytes to save
        return f"weight has no elements (shape {'x'.join(map(str, weight.shape))}): there is nothing to prune"
    bad = count_nonfinite(weight)
    if bad:
        return (f"weight holds {bad} NaN/Inf value{'s' if bad > 1 else ''}: magnitudes are undefined, so sparsec "
                f"refuses to prune this layer (fix the weights and compile again)")
    if aliases.get(layer.weight_path):
        return f"weight is tied to {', '.join(aliases[layer.weight_path])}: pruning it here would change that layer too"
    if read := getattr(gm, "trace_time_reads", {}).get(layer.weight_path):
        return (f"the forward computed with the weight while it was traced, outside the graph (by {read}): the "
                f"graph holds the result as a constant of the unpruned weight, which pruning would leave stale; read "
                f"the weight as a module attribute (self.fc.weight) so that torch.fx records the computation")
    others = [u for u in dict.fromkeys(uses.get(layer.weight_path, [])) if u not in nodes]
    if others:
        return (f"weight is also read by {', '.join(_described(gm, u) for u in others)}: pruning it would change "
                f"that use too")
    if layer.weight_left and any(get_meta(data_input(n)).shape is None for n in nodes):
        return ("W @ x runs as a layer on x.mT, and x's rank (which dims to swap) is unknown without "
                "example inputs: pass example_inputs to compile")
    kinds = {(site.op, site.conv, site.bias_path, site.runtime_bias, site.weight_left)
             for site in (get_meta(n).layer for n in nodes)}
    if len(kinds) > 1:
        return "the weight is used by call sites of different kinds (op, bias or conv settings differ)"
    return None


def check_eligibility(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    uses, aliases = _weight_uses(gm), _aliases(gm)
    for name, nodes in layer_nodes(gm).items():
        blocker = blocker_for(gm, nodes, uses, aliases)
        for node in nodes:
            update_meta(node, blocker=blocker)
        ctx.counters["eligible" if blocker is None else "blocked"] += 1
    return gm
