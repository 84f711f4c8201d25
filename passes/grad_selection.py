"""Analysis: choose each layer's data-gradient pattern (SDGP), with the reason, when training.

A layer gets `grad_pattern` unless:
  * nothing upstream of its input is trainable (requires_grad): its data gradient dX is never used
    (the first layer reading the model input, or one after frozen layers only), so there is nothing
    to prune;
  * the pattern keeps every value (N = M): nothing to prune either;
  * its output-feature count (conv: output channels) is not a multiple of M: dY cannot be grouped
    along it, the gradient stays dense;
  * exclude= names it;
  * it is the last layer (no candidate layer after it) and include= does not name it: its dY is the loss
    gradient itself, the one every earlier layer's gradient is computed from, which SDGP's original leaves
    dense (it converts convs only, never the classifier; methods.md A.4);
  * it cannot be trained as a sparsec layer at all (eligibility blocker; a given plan asking for one there
    is refused).
Weight sparsity and gradient sparsity are independent: a dense-weight layer can still use SDGP.
"""
from __future__ import annotations

import dataclasses

import networkx as nx
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.dataflow import dataflow_graph
from sparsec.errors import InvalidInputError
from sparsec.meta import data_input, get_meta, layer_nodes, update_meta
from sparsec.passes.selection import first_match
from sparsec.patterns import NM, parse_pattern


def _trainable_sources(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that read trainable parameters (requires_grad; frozen ones need no gradient): get_attr of
    such a Parameter, or a call to a module owning one."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                if gm.get_parameter(node.target).requires_grad:
                    out.add(node)
            except AttributeError:
                pass
        elif node.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(node.target).parameters()):
            out.add(node)
    return out


def _downstream_of(graph: nx.DiGraph, sources: set[fx.Node]) -> set[fx.Node]:
    """The sources in the graph and every node downstream of one: one search from all of them at once (an
    ancestors search per layer was quadratic: 1,600 layers, 2.1 s of a compile)."""
    starts = [s for s in sources if s in graph]
    return set(starts) | {edge[1] for edge in nx.edge_bfs(graph, starts)} if starts else set()


def choose_grad_sparsity(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.options
    if not opts.train:
        return gm
    default = parse_pattern(opts.grad_default) if opts.grad_default is not None else None
    # (only a default asks: a detached input has no gradient upstream, so the gradients' dataflow)
    trainable_downstream = (_downstream_of(dataflow_graph(gm, gradients=True), _trainable_sources(gm))
                            if default is not None else None)
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision, layer = meta.decision, meta.layer
        grad, note = (_default_grad(name, nodes, meta, default, opts, trainable_downstream, ctx.last_layers)
                      if default is not None else (None, None))
        if opts.plan is not None:
            given = decision.grad_sparsity
            _check_given(name, layer, meta, given)
            if default is None:  # (a plan that does not say its default: a JSON from before the field, or by hand)
                grad, note = given, _sdgp_note(layer, given, opts) if given else None
            elif given != grad:
                grad, note = given, (f"{_sdgp_note(layer, given, opts)}; set by the given plan" if given else
                                     "gradient dense: set by the given plan") + f" (default: {note})"
        if note is None:
            continue
        ctx.counters["grad_pruned" if grad else "grad_dense"] += 1
        decision = dataclasses.replace(decision, grad_sparsity=grad, reason=f"{decision.reason}; {note}")
        for node in nodes:
            update_meta(node, decision=decision)
    return gm


def _check_given(name: str, layer, meta, grad: str | None) -> None:
    """Refuse a given plan's gradient pattern the layer cannot take, naming why."""
    if grad is None:
        return
    pattern = parse_pattern(grad)
    if not isinstance(pattern, NM):  # (a FanIn has no .m)
        raise InvalidInputError(f"the given plan asks for gradient pattern {grad!r} on layer {name!r}; data "
                                f"gradients are pruned N:M (e.g. '2:4'), or None for a dense gradient")
    if meta.blocker:
        # (as a weight pattern there is refused: the layer would become a TrainableLayer holding a copy of
        # the weight, silently untying it from the module / op that shares it)
        raise InvalidInputError(f"the given plan asks for gradient pattern {grad} on layer {name!r}, which "
                                f"cannot take it: {meta.blocker}")
    if layer.out_features % pattern.m:
        raise InvalidInputError(f"the given plan asks for gradient pattern {grad} on layer {name!r}, whose "
                                f"{layer.out_features} output features are not a multiple of M={pattern.m}")


def _default_grad(name: str, nodes: list[fx.Node], meta, g: NM, opts, trainable_downstream: set[fx.Node],
                  last: dict[str, str]) -> tuple[str | None, str]:
    """(the layer's gradient pattern under grad_pattern g, or None; the note saying why)."""
    layer, decision = meta.layer, meta.decision
    data = [d for n in nodes if isinstance(d := data_input(n), fx.Node)]
    included_by = first_match(opts.include, name)
    if (excluded_by := first_match(opts.exclude, name)) is not None:
        return None, f"gradient dense: excluded by exclude={excluded_by!r}"
    if meta.blocker:  # (said here too: with pattern='dense' the layer's reason did not mention it)
        # (SDGP prunes dY, not the weight, but it runs in the layer sparsec puts in the module's place, which
        # would hold a copy of the weight: the blocker is why the layer is left as it is; the weight's reason
        # says it already unless pattern='dense')
        why = "" if meta.blocker in decision.reason else f", since {meta.blocker}"
        return None, f"gradient dense: SDGP runs in the layer sparsec puts in place, and this one stays as it is{why}"
    if g.n == g.m:
        return None, f"gradient dense: grad_pattern {g} keeps every value (N = M)"
    if not any(d in trainable_downstream for d in data):
        return None, "gradient dense: no trainable parameter upstream, so its data gradient is never used"
    if layer.out_features % g.m:
        what = "output channels" if layer.conv is not None else "output features"
        return None, f"gradient dense: {layer.out_features} {what} are not a multiple of M={g.m}"
    if name in last and included_by is None:
        return None, (f"gradient dense: last layer ({last[name]}), whose dY is the loss gradient every earlier "
                      f"layer's comes from (SDGP's original keeps the classifier's dense); include=['{name}'] overrides")
    note = _sdgp_note(layer, str(g), opts)
    forced = f"forced by include={included_by!r}"
    if name in last and forced not in decision.reason:  # (the weights' reason says it already when they were forced)
        note += f"; {forced} over the default policy: last layer ({last[name]})"
    return str(g), note


def _sdgp_note(layer, grad: str, opts) -> str:
    along = "output channels at each position" if layer.conv is not None else "output features"
    return f"SDGP: dX from dY pruned {grad} along {along} ({opts.grad_mode}); dW, db dense"
