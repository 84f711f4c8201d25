"""Analysis: choose each layer's sparsity, with the reason, from the default policy or a given plan.

Default policy (design.md, "Default layer selection"), in order of precedence:
  1. pattern "dense"                     -> nothing pruned (analysis only)
  2. exclude= matches the layer          -> dense
  3. eligibility blocker / shape misfit  -> dense (include= cannot override these)
  4. include= matches the layer          -> sparse, even if 5-7 would keep it dense
  5. first layer: no other candidate upstream of it (it reads the model input)   -> dense
  6. last layer: no other candidate downstream of it (it produces the output)    -> dense
     (5 and 6 keep accuracy, as SDGP, ASP and SRigL's baselines do)
  7. fewer than `min_weights` weights    -> dense
  8. otherwise                           -> sparse

A name in include= / exclude= matches a layer when it (as a regular expression, full match)
matches the layer's name or the path of a module containing it: exclude=["encoder.0"] keeps the
whole block dense. An entry matching nothing raises, listing close names.
"""
from __future__ import annotations

import dataclasses
import difflib
import re

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from sparsec.context import CompileContext
from sparsec.dataflow import dataflow_graph
from sparsec.errors import InvalidInputError
from sparsec.meta import Decision, LayerInfo, get_meta, layer_nodes, update_meta
from sparsec.patterns import NM, Dense, Pattern, Unstructured, parse_pattern
from sparsec.reference import kept_per_row


def _compile_regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error:
        return re.compile(re.escape(text))


def _scopes(name: str) -> list[str]:
    """The name and every module path containing it: 'a.b.c' -> ['a.b.c', 'a.b', 'a']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def first_match(patterns: tuple[str, ...], name: str) -> str | None:
    """The first entry matching `name`, or None. (Test the result with `is not None`: the entry "" is the
    root module's name, that of a model that is itself an nn.Linear / Conv.)"""
    for text in patterns:
        regex = _compile_regex(text)
        if any(regex.fullmatch(scope) for scope in _scopes(name)):
            return text
    return None


def check_names_match(arg: str, patterns: tuple[str, ...], names: list[str], also: list[str] = ()) -> None:
    """Every include=/exclude= entry must match some layer (or a name in `also`); otherwise say which
    names are close."""
    for text in patterns:
        if not any(first_match((text,), name) is not None for name in [*names, *also]):
            known = sorted({scope for name in names for scope in _scopes(name)})
            close = difflib.get_close_matches(text, known, n=5, cutoff=0.4)

            def shown(names: list[str]) -> str:  # (the model itself, an nn.Linear / Conv, is named "")
                return ", ".join(name or "'' (the model itself)" for name in names)
            try:
                re.compile(text)
                literal = ""
            except re.error as e:  # (matched as a literal name then; the regex error went unmentioned)
                literal = f" (as a literal name: it is not a valid regular expression, {e})"
            raise InvalidInputError(
                f"{arg}={text!r} matches no candidate layer{literal}"
                + (f"; close names: {shown(close)}" if close else "")
                + f"; candidate layers: {shown(names) if names else '(none)'}")


def shape_misfit(layer: LayerInfo, pattern: Pattern) -> str | None:
    """Why the layer's shape cannot take the pattern (None when it can)."""
    if isinstance(pattern, NM) and not pattern.fits(layer.reduction):
        return (f"reduction size {_reduction_text(layer)} is not a multiple of M={pattern.m} "
                f"({pattern} groups run along the reduction dimension; sparsec never pads)")
    return None


def _reduction_text(layer: LayerInfo) -> str:
    if layer.op == "conv2d":
        _, cin_g, kh, kw = layer.weight_shape
        return f"K = in/groups*kh*kw = {cin_g}*{kh}*{kw} = {layer.reduction}"
    if layer.op == "conv1d":
        _, cin_g, k = layer.weight_shape
        return f"K = in/groups*k = {cin_g}*{k} = {layer.reduction}"
    return f"K = {'in_features' if layer.op == 'linear' else 'rows of the weight'} = {layer.reduction}"


def describe_sparse(layer: LayerInfo, pattern: Pattern) -> str:
    if isinstance(pattern, NM):
        # 3 significant digits: ":.0f" said 2:16 keeps 12% and 1:256 keeps 0% of weights
        return f"{pattern} along the reduction dimension ({_reduction_text(layer)}): keeps {100 * pattern.density:.3g}% of weights"
    if isinstance(pattern, Unstructured):
        numel = layer.out_features * layer.reduction
        kept = pattern.kept(numel)
        return (f"{pattern}: keeps the {kept} of {numel} weights of largest magnitude ({100 * kept / numel:.3g}%), "
                f"wherever they are")
    k = pattern.k(layer.out_features * layer.reduction, layer.out_features)
    return f"{pattern}: every output row keeps k={k} of {layer.reduction} weights (constant fan-in)"


def layer_positions(gm: fx.GraphModule) -> tuple[dict[str, str], dict[str, str]]:
    """(first, last): layer name -> why, for layers a call of which has no other candidate upstream /
    downstream in the dataflow graph. Judged per call: a layer applied to the model input and again
    mid-network (shared weights) reads the input all the same, which the rule keeps dense for; the
    union of its calls' neighbours pruned it."""
    graph = dataflow_graph(gm)
    by_name = layer_nodes(gm)
    owner = {node: name for name, nodes in by_name.items() for node in nodes}
    # A call of a module the trace did not enter (excluded, or a leaf) that holds layers is layers too: with
    # exclude=['blocks.0.attn'] the MLP after that attention was "first" under symbolic_trace, where the
    # attention is one opaque call, but not under torch.export, which inlines its Linears.
    owner.update({node: f"<{node.target}>" for node in gm.graph.nodes
                  if node.op == "call_module" and node not in owner and _holds_layers(gm.get_submodule(node.target))})
    first, last = {}, {}
    for found, side, upstream in ((first, "before", True), (last, "after", False)):
        reached = _owners_reached(graph, owner, upstream)
        for name, nodes in by_name.items():
            calls = [i for i, n in enumerate(nodes) if reached[n] <= {name}]
            if len(nodes) == 1 and calls:
                found[name] = f"no candidate layer {side} it"
            elif len(calls) == 1:
                found[name] = f"its call {calls[0] + 1} of {len(nodes)} has no candidate layer {side} it"
            elif calls:  # (its own other calls only: "call 1 has none after it" read wrong where call 2 follows)
                numbers = ", ".join(str(i + 1) for i in calls[:-1]) + f" and {calls[-1] + 1}"
                found[name] = f"its calls {numbers} of {len(nodes)} have no other candidate layer {side} them"
    return first, last


def _owners_reached(graph: nx.DiGraph, owner: dict, upstream: bool) -> dict[fx.Node, frozenset]:
    """node -> the layers owning nodes upstream (or downstream) of it, two at most: a call is alone when
    they are its own layer or none, which two of them settle. One pass over the graph's strongly connected
    components (an in-place write makes cycles) in topological order: an ancestors / descendants search per
    layer was quadratic (1,600 layers: 4.6 s of a 13 s compile)."""
    dag = nx.condensation(graph)
    order = list(nx.topological_sort(dag))
    neighbours = dag.predecessors if upstream else dag.successors
    inside, beyond = {}, {}  # per component: its members' owners; the owners reached outside it (and inside a cycle)
    for component in (order if upstream else reversed(order)):
        members = dag.nodes[component]["members"]
        inside[component] = _two({owner[m] for m in members if m in owner})
        found = set(inside[component]) if len(members) > 1 else set()  # (a cycle's members reach each other)
        for other in neighbours(component):
            found |= inside[other] | beyond[other]
            if len(found) > 1:
                break
        beyond[component] = _two(found)
    return {node: beyond[component] for node, component in dag.graph["mapping"].items()}


def _two(names: set) -> frozenset:
    return frozenset(sorted(names)[:2])


def _holds_layers(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)) for m in module.modules())


def default_decision(layer: LayerInfo, blocker: str | None, pattern: Pattern, ctx: CompileContext,
                     first: dict[str, str], last: dict[str, str]) -> Decision:
    opts = ctx.options

    def dense(reason: str) -> Decision:
        return Decision(sparsity=None, quant=None, grad_sparsity=None, reason=reason)

    if (excluded_by := first_match(opts.exclude, layer.name)) is not None:
        return dense(f"kept dense: excluded by exclude={excluded_by!r}")
    if layer.trained_pattern is not None:
        return Decision(sparsity=layer.trained_pattern, quant=None, grad_sparsity=None,
                        reason=f"{layer.trained_pattern} learned in training: the trained mask is kept as it is")
    if isinstance(pattern, Dense):
        return dense("pattern 'dense': weights not pruned")
    # include= overrides the position and size policy only: a layer it names that cannot be pruned says so
    included_by = first_match(opts.include, layer.name)
    refused = f"; include={included_by!r} cannot override this" if included_by is not None else ""
    if blocker:
        return dense(f"kept dense: {blocker}{refused}")
    if misfit := shape_misfit(layer, pattern):
        return dense(f"kept dense: {misfit}{refused}")
    sparse_text = describe_sparse(layer, pattern)
    policy = None
    if layer.name in first:
        policy = f"first layer ({first[layer.name]})"
    elif layer.name in last:
        policy = f"last layer ({last[layer.name]})"
    elif layer.out_features * layer.reduction < opts.min_weights:
        policy = f"too small to matter ({layer.out_features * layer.reduction} weights < min_weights={opts.min_weights})"
    if included_by is not None:
        suffix = f"; forced by include={included_by!r}" + (f" over the default policy: {policy}" if policy else "")
        return Decision(sparsity=str(pattern), quant=None, grad_sparsity=None, reason=sparse_text + suffix)
    if policy:
        return dense(f"kept dense: {policy}; include=['{layer.name}'] overrides")
    return Decision(sparsity=str(pattern), quant=None, grad_sparsity=None, reason=sparse_text)


def _plan_decision(layer: LayerInfo, blocker: str | None, ctx: CompileContext, default: Decision) -> Decision:
    entry = ctx.options.plan.get(layer.name)
    if entry is None:
        return Decision(None, None, None, "kept dense: not listed in the given plan")
    if (entry.op, tuple(entry.weight_shape)) != (layer.op, tuple(layer.weight_shape)):
        raise InvalidInputError(f"the given plan describes layer {layer.name!r} as {entry.op} with weight "
                                f"{tuple(entry.weight_shape)}, but in this model it is {layer.op} with weight "
                                f"{tuple(layer.weight_shape)}: the plan was made for another model. Make one for this "
                                f"model with sparsec.explain(model, ...) and edit that")
    if entry.sparsity is not None:
        pattern = parse_pattern(entry.sparsity)
        problem = blocker or shape_misfit(layer, pattern)
        if problem:
            raise InvalidInputError(f"the given plan asks for {entry.sparsity} on layer {layer.name!r}, which cannot take it: {problem}")
    if entry.quant is not None and entry.sparsity is None:
        raise InvalidInputError(f"the given plan asks for quant={entry.quant!r} on dense layer {layer.name!r}; "
                                "sparsec quantizes sparse layers only")
    # the patterns as sparsec spells them: the passes after this one read the text (" unstructured:0.9", which
    # parse_pattern accepts, reached backend auto as an N:M layer and crashed it)
    sparsity = str(parse_pattern(entry.sparsity)) if entry.sparsity is not None else None
    grad_sparsity = str(parse_pattern(entry.grad_sparsity)) if entry.grad_sparsity is not None else None
    if sparsity == default.sparsity:
        reason = default.reason
    elif entry.sparsity is None:
        reason = f"kept dense: set by the given plan (default policy: {default.reason})"
    else:
        reason = f"{describe_sparse(layer, parse_pattern(entry.sparsity))}; set by the given plan (default policy: {default.reason})"
    backend, launch = entry.backend, entry.launch
    if (backend is not None or launch is not None) and (entry.sparsity is None or ctx.options.train):
        # (said, not dropped silently: an entry turned dense, or an inference plan trained, keeps the backend
        # the plan was made with, which runs no layer here)
        what = f"backend {backend!r}" if backend is not None else f"launch {launch!r}"
        trains = ctx.options.train and (entry.sparsity is not None or entry.grad_sparsity is not None)
        runs = ("training runs sparsec's TrainableLayer, weight * mask (an inference compile of the trained model "
                "chooses one again)" if trains else "a dense layer runs as the model's own")
        reason += f"; the given plan's {what} not used: {runs}"
        backend = launch = None
    return Decision(sparsity=sparsity, quant=entry.quant, grad_sparsity=grad_sparsity, reason=reason,
                    backend=backend, launch=launch)


def _with_learned_count(gm: fx.GraphModule, ctx: CompileContext, layer: LayerInfo, decision: Decision) -> Decision:
    """A trained layer keeping its learned mask says what that mask holds: its count is not the pattern's on
    its shape once the mask was shrunk with the layer or changed by hand (the plan's counts read it too:
    Decision.mask_kept becomes LayerPlan.mask_kept)."""
    if decision.sparsity is None or layer.trained_module_path is None or decision.sparsity != layer.trained_pattern:
        return decision
    kept, numel = int(kept_per_row(ctx.layer_mask(gm, layer, decision.sparsity)).sum()), layer.out_features * layer.reduction
    return dataclasses.replace(decision, mask_kept=kept, reason=f"{decision.reason}, {kept} of {numel} weights "
                                                               f"({100 * kept / max(numel, 1):.3g}%)")


def choose_sparsity(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.options
    by_name = layer_nodes(gm)
    all_names = list(by_name) + list(ctx.unreached)
    check_names_match("include", opts.include, all_names)
    # An excluded module is called whole, not traced into (fx_tracer.Tracer), so the functional layers
    # inside it (F.linear / x @ W on its own parameters) are no candidates; the exclusion did its work all
    # the same (they stay dense). Such a name raised "matches no candidate layer", while include= with the
    # same name pruned them. A module called whole that holds a weight matrix counts as matched.
    whole = [n.target for n in gm.graph.nodes if n.op == "call_module"
             and any(p.dim() >= 2 for p in gm.get_submodule(n.target).parameters())]
    check_names_match("exclude", opts.exclude, all_names, also=whole)
    if opts.plan is not None:
        unknown = [lp.name for lp in opts.plan if lp.name not in by_name and lp.name not in ctx.unreached]
        for name in unknown:
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.4)
            raise InvalidInputError(f"the given plan names layer {name!r}, which this model does not have"
                                    + (f"; close names: {', '.join(close)}" if close else ""))
        for lp in opts.plan:
            unreached = ctx.unreached.get(lp.name)
            if unreached is not None and (lp.sparsity or unreached.sparsity) and (
                    (lp.sparsity, lp.quant) != (unreached.sparsity, unreached.quant)):
                asked = f"{lp.sparsity or 'dense'}{' ' + lp.quant if lp.quant else ''}"
                raise InvalidInputError(f"the given plan asks for {asked} on layer {lp.name!r}, which cannot take it: "
                                        f"{unreached.why}")
            if unreached is not None and lp.grad_sparsity is not None:  # (it was dropped without a word)
                raise InvalidInputError(f"the given plan asks for gradient pattern {lp.grad_sparsity} on layer "
                                        f"{lp.name!r}, which cannot take it: {unreached.why}")
    first, last = layer_positions(gm)
    ctx.last_layers = last  # (the gradients' choice reads them too: the positions are a whole-graph search)
    pattern = parse_pattern(opts.plan.pattern) if opts.plan is not None else opts.pattern
    for name, nodes in by_name.items():
        meta = get_meta(nodes[0])
        decision = default_decision(meta.layer, meta.blocker, pattern, ctx, first, last)
        if opts.plan is not None:
            decision = _plan_decision(meta.layer, meta.blocker, ctx, decision)
        decision = _with_learned_count(gm, ctx, meta.layer, decision)
        for node in nodes:
            update_meta(node, decision=decision)
        ctx.counters["chose_sparse" if decision.sparsity else "chose_dense"] += 1
    return gm
