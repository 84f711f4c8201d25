"""SparsecGraphModule: an fx.GraphModule whose printed code carries sparsec's annotations.

Each candidate layer's line in `gm.code` is preceded by a comment with its pattern, quantization
and the plan's reason, so `print(cm.graph_module.code)` tells what happened to every layer. The
comments are added after fx generated and compiled the code, so they never change behaviour.
"""
from __future__ import annotations

import copy
import pickle

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _forward_from_src

from sparsec.checkpointing import CONTEXTS, checkpointed_code, portable_contexts
from sparsec.meta import get_meta
# (RetraceTracer under this name too: files saved before it moved to sparsec.tracing name it here)
from sparsec.tracing import TRACE_LOCK, RetraceTracer, drop_unresolvable_fx_wraps


def annotation(node: fx.Node) -> str | None:
    meta = get_meta(node)
    if meta.layer is None:
        return None
    d = meta.decision
    if d is None:
        return f"# sparsec: {meta.layer.name} ({meta.layer.op})"
    parts = [d.sparsity or "dense"] + ([d.quant] if d.quant else []) + ([f"grad {d.grad_sparsity}"] if d.grad_sparsity else [])
    parts += [f"fused {'+'.join(meta.fused)}"] if meta.fused else []
    parts += [f"kernel {meta.kernel}"] if meta.kernel else []
    reason = d.reason.removeprefix("kept dense: ")
    return f"# sparsec: {meta.layer.name} ({meta.layer.op}) -> {', '.join(parts)}: {reason}"


def layer_notes(graph: fx.Graph) -> dict[str, str]:
    """node name -> its annotation, for every candidate layer's node."""
    return {node.name: text for node in graph.nodes if (text := annotation(node))}


def annotate_code(code: str, notes: dict[str, str]) -> str:
    notes = dict(notes)
    if not notes:
        return code
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        name = stripped.split(" = ", 1)[0] if " = " in stripped else None
        if name in notes:
            out.append(line[: len(line) - len(stripped)] + notes.pop(name))
        out.append(line)
    return "\n".join(out)


# What frontend.capture found of the traced forward, kept with the graph wherever it goes (a copy,
# save / load, a second compile): the train / eval mode the graph fixed (and the layers it holds in the
# other mode), the arguments a torch.export graph fixed, the parameters it holds constants computed from,
# and the order the model registers its modules and tensors in.
CAPTURE_FACTS = ("fixed_training", "layers_in_other_mode", "fixed_arguments", "trace_time_reads", "registration_order")


def registration_order(model: nn.Module) -> list[str]:
    """Every submodule, parameter and buffer path of `model`, in the order `model` registers them."""
    return [name for named in (model.named_modules, model.named_parameters, model.named_buffers)
            for name, _ in named(remove_duplicate=False)]


def follow_registration_order(gm: nn.Module, order: list[str]) -> None:
    """Order each module's submodules, parameters and buffers in `gm` as `order` (registration_order of
    the traced model) has them, any others after those in their own order. fx builds a graph module
    (when tracing, copying or unpickling one) with what the graph reads in the order it reads it: the
    compiled model's parameters() came in forward order, so an optimizer state_dict of the dense model,
    which optimizers map by position, loaded one layer's momentum into another of the same shape."""
    rank = {name: i for i, name in enumerate(order)}
    for path, module in list(gm.named_modules(remove_duplicate=False)):
        prefix = f"{path}." if path else ""
        for entries in (module._modules, module._parameters, module._buffers):
            keys = sorted(entries, key=lambda key: rank.get(prefix + key, len(rank)))  # (stable)
            if keys != list(entries):
                items = dict(entries)
                entries.clear()
                entries.update((key, items[key]) for key in keys)


def _retraced_with(module: fx.GraphModule) -> None:
    """Have `module` and the graph modules inside it (torch.cond's branches) rebuilt by RetraceTracer
    when unpickled (torch.export leaves its own tracer class on them, which needs constructor
    arguments fx cannot give: such a file failed to load)."""
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule):
            sub._tracer_cls = RetraceTracer
            sub.graph._tracer_cls = RetraceTracer


def _rebuild_in_turn(rebuild, body: dict, imports: str):
    """fx's rebuild of a pickled graph module, taking its turn with the traces (TRACE_LOCK). It sets the
    code on a class the whole process shares (_CodeOnlyModule.forward), then traces it: two models loaded
    in two threads at once (sparsec.load or torch.load) could each trace the other's code, and one came
    back computing the other model's forward on its own weights, without an error."""
    with TRACE_LOCK:
        return rebuild(body, imports)


class SparsecGraphModule(fx.GraphModule):
    def __reduce__(self):
        # fx pickles the code and traces it again on load, which torch's control-flow operators
        # (torch.cond, ...) refuse: such a file saved, then failed to load with a TypeError from fx
        flow = sorted({str(n.target) for m in self.modules() if isinstance(m, fx.GraphModule)
                       for n in m.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)})
        if flow:
            raise pickle.PicklingError(
                f"this graph calls {', '.join(flow)} (torch.export's control flow), which a pickled graph module "
                f"cannot hold (pickle keeps its code, and loading traces it again, which those operators refuse; "
                f"copy.deepcopy copies it)")
        _retraced_with(self)
        rebuild, (body, imports) = super().__reduce__()
        # fx rebuilds the module from its code, keeping only the submodules the graph reads: a module
        # torch.export left unreferenced (a head tied to the embedding, read as the embedding's weight)
        # was lost, and with it its state_dict key. Carry them all; restore() puts back the missing ones.
        modules = {path: m for path, m in self.named_modules(remove_duplicate=False) if path}
        if CONTEXTS in body:
            body[CONTEXTS] = portable_contexts(body[CONTEXTS])
        return _rebuild_in_turn, (rebuild, dict(body, sparsec_modules=modules), imports)

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)  # fx's copy keeps only the attributes torch knows of
        for name in CAPTURE_FACTS:
            if name in self.__dict__:
                setattr(copied, name, copy.deepcopy(self.__dict__[name], memo))
        follow_registration_order(copied, getattr(copied, "registration_order", []))
        return copied

    def recompile(self):
        python_code = super().recompile()
        checkpointed = checkpointed_code(self.graph)
        if checkpointed is not None:  # the same graph, with its checkpoint calls made again
            python_code, contexts = checkpointed
            self._code, self._lineno_map = python_code.src, None
            co_fields = getattr(self.graph, "_co_fields", {})
            type(self).forward = _forward_from_src(self._code, python_code.globals, co_fields)
            setattr(self, CONTEXTS, contexts)
        elif CONTEXTS in self.__dict__:  # (a rewrite removed the calls)
            delattr(self, CONTEXTS)
        # A graph rebuilt by unpickling (fx re-traces the saved code) has no node meta: its notes are
        # the ones it was saved with, kept in this attribute, which pickles with the module.
        self.sparsec_notes = layer_notes(self.graph) or getattr(self, "sparsec_notes", {})
        self._code = annotate_code(self._code, self.sparsec_notes)
        return python_code


def restore(gm: fx.GraphModule) -> SparsecGraphModule:
    """An unpickled graph module (fx rebuilds a plain GraphModule from the saved code) as a
    SparsecGraphModule again, sharing its parameters and submodules, with its saved annotations."""
    if isinstance(gm, SparsecGraphModule) or not hasattr(gm, "sparsec_notes"):
        return gm
    with TRACE_LOCK:  # (the user's own symbolic_trace after a load would fail on them)
        drop_unresolvable_fx_wraps()
    restored = SparsecGraphModule(gm, gm.graph, type(gm).__name__)
    restored.sparsec_notes = gm.sparsec_notes
    for path, module in getattr(gm, "sparsec_modules", {}).items():  # parents come before their children
        parent, _, leaf = path.rpartition(".")
        owner = restored.get_submodule(parent)
        if leaf not in owner._modules:
            owner.add_module(leaf, module)
    for kept in CAPTURE_FACTS:
        if hasattr(gm, kept):
            setattr(restored, kept, getattr(gm, kept))
    follow_registration_order(restored, getattr(restored, "registration_order", []))
    restored.recompile()
    return restored
