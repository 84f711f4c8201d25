"""Analysis: gather the per-node decisions into the user-facing `Plan` (ctx.plan).

Every Linear / Conv2d of the model appears, including those the traced graph does not run as a
candidate (inside a module called as a whole, weight used by an unsupported op), with the reason.
"""
from __future__ import annotations

import math

import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import get_meta, layer_nodes
from sparsec.passes.selection import first_match
from sparsec.plan import LayerPlan, Plan, dtype_name
from sparsec.reference import kept_per_row


def _flops(nodes: list[fx.Node], reduction: int) -> int | None:
    """2 * MACs summed over call sites: every output element is a K-long dot product."""
    shapes = [get_meta(n).shape for n in nodes]
    if not shapes or any(s is None for s in shapes):
        return None
    return sum(2 * math.prod(s) * reduction for s in shapes)


def _module_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the nodes calling it, from one pass over the graph."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _callers_of(calls: dict[str, list[fx.Node]], path: str) -> list[fx.Node]:
    """The nodes calling the module at `path` or a module holding it (a fused epilogue around a packed
    layer): their outputs have the layer's output shape, as elementwise epilogues keep it. Looked up per
    prefix of the path: a scan of the graph per layer was quadratic in the layer count."""
    parts = path.split(".")
    return [n for i in range(1, len(parts) + 1) for n in calls.get(".".join(parts[:i]), [])]


def _graph_position(gm: fx.GraphModule):
    """Sort key putting plan entries in the order the graph runs them: a layer at its first call site,
    a layer the graph does not run at the module containing it or the read of its weight; layers
    never run last, in model order (the sort is stable). A call site goes before any read: torch.export
    graphs read every parameter at the top."""
    runs, position = {}, {}
    for i, node in enumerate(gm.graph.nodes):
        if (layer := get_meta(node).layer) is not None:
            runs.setdefault(layer.name, i)
        if node.op in ("call_module", "get_attr"):
            position.setdefault(node.target, i)

    def key(lp: LayerPlan) -> int:
        if lp.name in runs:
            return runs[lp.name]
        parts = lp.name.split(".")
        for path in [f"{lp.name}.weight"] + [".".join(parts[:n]) for n in range(len(parts), 0, -1)]:
            if path in position:
                return position[path]
        return len(position) + len(gm.graph.nodes)
    return key


def _packed_kept(gm: fx.GraphModule, weight_path: str) -> int | None:
    """The count of the mask a layer packed by an earlier compile holds (weight_path: its packed weight)."""
    try:
        packed = gm.get_submodule(weight_path)
    except AttributeError:
        return None
    return int(kept_per_row(packed.mask()).sum()) if hasattr(packed, "mask") else None


def build_plan(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    layers = []
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        d, layer = meta.decision, meta.layer
        layers.append(LayerPlan(name=name, op=layer.op, weight_shape=layer.weight_shape, sparsity=d.sparsity,
                                quant=d.quant, grad_sparsity=d.grad_sparsity, reason=d.reason,
                                dtype=dtype_name(layer.dtype), flops=_flops(nodes, layer.reduction), backend=d.backend,
                                launch=d.launch, mask_kept=d.mask_kept))
    calls = None  # (built on first use)
    for name, info in ctx.unreached.items():
        excluded_by = first_match(ctx.options.exclude, name)
        if info.sparsity is not None:  # packed by an earlier compile
            reason = info.why
        else:
            reason = (f"kept dense: excluded by exclude={excluded_by!r}" if excluded_by is not None
                      else f"kept dense: {info.why}")
        entry = LayerPlan(name=name, op=info.op, weight_shape=info.weight_shape, sparsity=info.sparsity,
                          quant=info.quant, grad_sparsity=None, reason=reason, dtype=dtype_name(info.dtype))
        if info.sparsity is not None:
            if calls is None:
                calls = _module_calls(gm)
            entry.flops = _flops(_callers_of(calls, info.weight_path.rsplit(".", 1)[0]), entry.reduction)
            entry.backend = info.backend
            entry.mask_kept = _packed_kept(gm, info.weight_path)
        layers.append(entry)
    layers.sort(key=_graph_position(gm))
    pattern = ctx.options.plan.pattern if ctx.options.plan is not None else str(ctx.options.pattern)
    opts = ctx.options
    grad_pattern = opts.grad_default
    # (the mode is said where gradients are pruned or may be, by an edit of a plan made with grad_pattern: a
    # plan whose every layer kept its gradient dense ran an edit of it in compile's default mode, not its own)
    said = opts.train and (grad_pattern is not None or any(lp.grad_sparsity for lp in layers))
    ste = opts.train and opts.weight_update == "ste"
    ctx.plan = Plan(layers=layers, pattern=pattern, notes=list(ctx.notes), grad_mode=opts.grad_mode if said else None,
                    grad_pattern=grad_pattern, weight_update="ste" if ste else None,
                    ste_decay=opts.ste_decay if ste else None)
    return gm
