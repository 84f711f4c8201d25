"""Analysis: choose int8 weights per sparse layer, measuring what it would cost.

Two measurements on the pruned weight:
  * relative weight error ||deq(q(W)) - W||_F / ||W||_F;
  * the fraction of kept (nonzero) weights that int8 flushes to zero. A row with one large outlier
    gets a quantization step so coarse that most of its weights round to 0; the Frobenius error
    hides that because the outlier dominates the norm, and the layer silently becomes much sparser.

quantize="int8" quantizes every sparse layer and reports both numbers; quantize="auto" takes int8
only where the error stays within `quant_budget` (default 2%, sparsec/context.py) and at most
MAX_FLUSHED of the kept weights flush to zero. With a given plan, its entries decide and the
numbers are still reported.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import get_meta, layer_nodes, update_meta
from sparsec.plan import dtype_name
from sparsec.reference import fake_quant_int8, relative_error, weight_to_rows

MAX_FLUSHED = 0.05


@torch.no_grad()
def measure_int8(gm: fx.GraphModule, ctx: CompileContext, layer, sparsity: str) -> tuple[float, float]:
    """(relative weight error, fraction of kept nonzero weights flushed to 0) of int8 on the pruned weight."""
    rows = weight_to_rows(gm.get_parameter(layer.weight_path).detach(), layer.op)
    pruned = rows * ctx.layer_mask(gm, layer, sparsity)
    quantized = fake_quant_int8(pruned)
    nonzero = pruned != 0
    flushed = float((quantized[nonzero] == 0).sum()) / max(int(nonzero.sum()), 1)
    return relative_error(quantized, pruned), flushed


def choose_quantization(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.options
    budget = opts.quant_budget
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision = meta.decision
        if decision is None or decision.sparsity is None:
            continue
        wanted = decision.quant if opts.plan is not None else opts.quantize
        if wanted is None:
            continue
        error, flushed = measure_int8(gm, ctx, meta.layer, decision.sparsity)
        measured = f"relative weight error {error:.2%}, {flushed:.1%} of kept weights flushed to 0"
        keep = wanted != "auto" or (error <= budget and flushed <= MAX_FLUSHED)
        if wanted != "auto":
            note = f"int8 per-channel weights ({measured})"
        elif keep:
            note = f"int8 per-channel weights ({measured}; within budget {budget:.0%} / {MAX_FLUSHED:.0%})"
        else:
            note = f"stays {dtype_name(meta.layer.dtype)}: int8 would cost {measured} (budget {budget:.0%} / {MAX_FLUSHED:.0%})"
        decision = dataclasses.replace(decision, quant="int8" if keep else None, reason=f"{decision.reason}; {note}")
        for node in nodes:
            update_meta(node, decision=decision)
        ctx.counters["quant_int8" if keep else "quant_refused"] += 1
    return gm
