"""SparsecGraphModule: an fx.GraphModule whose printed code carries sparsec's annotations.

Each candidate layer's line in `gm.code` is preceded by a comment with its pattern, quantization
and the plan's reason, so `print(cm.graph_module.code)` tells what happened to every layer. The
comments are added after fx generated and compiled the code, so they never change behaviour.
"""
from __future__ import annotations

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


def annotate_code(code: str, graph: fx.Graph) -> str:
    notes = {node.name: text for node in graph.nodes if (text := annotation(node))}
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


class SparsecGraphModule(fx.GraphModule):
    def recompile(self):
        python_code = super().recompile()
        self._code = annotate_code(self._code, self.graph)
        return python_code
