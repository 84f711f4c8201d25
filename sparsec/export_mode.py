"""Let a torch.export graph follow cm.train() / cm.eval(), where the model allows it.

torch.export traces the model in the mode it has and writes that mode into the graph as constants:
`aten.dropout.default(x, 0.5, True)`, `aten.batch_norm.default(..., True, momentum, eps, ...)`, and
in training mode each BatchNorm's `num_batches_tracked.add_(1)`. When the model exported in the other
mode gives the same graph but for those constants (the forward reads self.training nowhere else), the
graph can read the mode instead: a small module (`ModeFlag`) answers the graph's own training flag,
and the mode arguments read it. Otherwise the graph stays fixed to its mode (frontend.capture says so).
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten

# op -> position of its train / eval argument
_MODE_ARGUMENT = {aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
                  aten.feature_alpha_dropout.default: 2, aten.batch_norm.default: 5}
FLAG = "sparsec_mode"


class ModeFlag(nn.Module):
    """Returns the training flag of the graph it sits in: train() / eval() reach it like any submodule."""

    def forward(self) -> bool:
        return self.training


def _counts_batches(node: fx.Node) -> bool:
    """BatchNorm's `num_batches_tracked.add_(1)`, which torch.export records in training mode only."""
    return (node.target is aten.add_.Tensor and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
            and node.args[0].target.endswith("num_batches_tracked"))


def _shape(graph: fx.Graph) -> tuple[list, list[fx.Node]]:
    """The graph's nodes as comparable tuples, mode arguments and batch counters left out, and its
    nodes that take a mode argument, in order."""
    kept = [n for n in graph.nodes if not _counts_batches(n)]
    index = {n: i for i, n in enumerate(kept)}
    rows, moded = [], []
    for node in kept:
        args = list(node.args)
        position = _MODE_ARGUMENT.get(node.target)
        if position is not None and position < len(args) and isinstance(args[position], bool):
            args[position] = "mode"
            moded.append(node)
        args = fx.node.map_aggregate(tuple(args), lambda a: ("node", index[a]) if isinstance(a, fx.Node) else a)
        rows.append((node.op, str(node.target), repr(args), repr(sorted(node.kwargs.items()))))
    return rows, moded


DIFFERENT_GRAPHS = ("torch.export traces every layer as it runs in the mode of the model it is given, and its "
                    "forward depends on the mode in other ways than dropout and batch norm")


def _owner(node: fx.Node) -> str:
    """The module path of the layer that ran `node` (torch.export's nn_module_stack), "" for the model's own."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def layers_in_other_mode(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """The layers of `model` in the other train / eval mode than the model (a dropout kept on in an eval model, a
    batch norm frozen in a training one) whose ops in `gm` (exported from it) take a mode: torch.export wrote their
    mode into the graph as it wrote the model's, alike in both exports, and model.eval() / model.train() would
    switch them too, which the graph cannot. Told by the module's own flag, not the op's constant: a batch norm
    without running statistics, or F.dropout(training=True), takes the same constant in both modes and is right."""
    _, moded = _shape(gm.graph)
    found = set()
    for node in moded:
        owner = _owner(node)
        try:
            module = model.get_submodule(owner) if owner else None
        except AttributeError:
            continue
        if module is not None and module.training != model.training:
            found.add(owner)
    return sorted(found)


def follow_mode(gm: fx.GraphModule, other: fx.GraphModule, training: bool) -> str | None:
    """Rewrite `gm` (exported in mode `training`) to read its mode, if `other` (the same model exported
    in the other mode) differs from it only in mode arguments and batch counters. Returns None when it did,
    else why the graph keeps its mode."""
    rows, moded = _shape(gm.graph)
    other_rows, other_moded = _shape(other.graph)
    if rows != other_rows:
        return DIFFERENT_GRAPHS
    train_graph = gm.graph if training else other.graph
    flips = [(n, _MODE_ARGUMENT[n.target]) for n, o in zip(moded, other_moded)
             if n.args[_MODE_ARGUMENT[n.target]] != o.args[_MODE_ARGUMENT[o.target]]]
    if any(n.args[i] != training for n, i in flips):  # the constant must be the mode itself
        return DIFFERENT_GRAPHS
    counted = [n.args[0].target for n in train_graph.nodes if _counts_batches(n)]
    reads = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    if any(target not in reads for target in counted):
        return DIFFERENT_GRAPHS
    gm.add_submodule(FLAG, ModeFlag())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        mode = gm.graph.call_module(FLAG, ())
    for node, i in flips:
        node.update_arg(i, mode)
    for node in [n for n in gm.graph.nodes if _counts_batches(n)]:
        gm.graph.erase_node(node)
    for target in counted:  # counted in training mode only: add 1 or 0 (the flag as a number)
        with gm.graph.inserting_after(reads[target]):
            gm.graph.call_function(aten.add_.Tensor, (reads[target], mode))
    gm.graph.lint()
    gm.recompile()
    return None


@contextlib.contextmanager
def in_other_mode(model: nn.Module):
    """The model switched to the other train / eval mode, every module's own flag restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(not model.training)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def fixed_mode_note(training: bool, why: str) -> str:
    mode, other = ("training", "eval") if training else ("eval", "training")
    return (f"the graph holds for {mode} mode only: {why}; cm.{'eval' if training else 'train'}() is refused "
            f"rather than computing {mode}-mode results (compile the model in {other} mode for {other})")


def other_mode_note(training: bool, layers: list[str]) -> str:
    mode, other = ("training", "eval") if training else ("eval", "training")
    return (f"the graph holds the modes the layers had: the {mode}-mode model's {layers} "
            f"{'run' if len(layers) > 1 else 'runs'} in {other} mode, which torch.export writes into the graph; "
            f"cm.train() and cm.eval() are refused, as both would switch {'those layers' if len(layers) > 1 else 'it'} "
            f"and the graph cannot (compile the model in the modes you run it)")
