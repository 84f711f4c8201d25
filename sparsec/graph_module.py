"""SparsecGraphModule: an fx.GraphModule whose printed code carries sparsec's annotations.

Each candidate layer's line in `gm.code` is preceded by a comment with its pattern, quantization
and the plan's reason, so `print(cm.graph_module.code)` tells what happened to every layer. The
comments are added after fx generated and compiled the code, so they never change behaviour.
"""
from __future__ import annotations

import copy

import torch.fx as fx

from sparsec.meta import get_meta


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
# save / load, a second compile): the train / eval mode the graph fixed, and the parameters it holds
# constants computed from.
CAPTURE_FACTS = ("fixed_training", "trace_time_reads")


class SparsecGraphModule(fx.GraphModule):
    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)  # fx's copy keeps only the attributes torch knows of
        for name in CAPTURE_FACTS:
            if name in self.__dict__:
                setattr(copied, name, copy.deepcopy(self.__dict__[name], memo))
        return copied

    def recompile(self):
        python_code = super().recompile()
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
    restored = SparsecGraphModule(gm, gm.graph, type(gm).__name__)
    restored.sparsec_notes = gm.sparsec_notes
    for kept in CAPTURE_FACTS:
        if hasattr(gm, kept):
            setattr(restored, kept, getattr(gm, kept))
    restored.recompile()
    return restored
