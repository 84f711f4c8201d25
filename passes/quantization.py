"""Analysis: choose int8 weights per sparse layer, measuring what it would cost.

Two measurements on the pruned weight:
  * relative weight error ||deq(q(W)) - W||_F / ||W||_F;
  * the fraction of kept (nonzero) weights that int8 flushes to zero. A row with one large outlier
    gets a quantization step so coarse that most of its weights round to 0; the Frobenius error
    hides that because the outlier dominates the norm, and the layer silently becomes much sparser.

quantize="int8" quantizes every sparse layer and reports both numbers; quantize="auto" takes int8
only where the error stays within `quant_budget` (default 2%, sparsec/context.py) and at most
MAX_FLUSHED of the kept weights flush to zero. quantize="log2:B" / "codebook:B" (method (d)'s non-linear
levels, sparsec/levels.py) quantizes every sparse layer to one table of 2^B values (none flushes a kept
weight to 0) and reports the error. With a given plan, its entries decide and the numbers are still
reported.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.errors import InvalidInputError
from sparsec.levels import fake_quant_levels, is_levels, parse_levels
from sparsec.meta import get_meta, layer_nodes, update_meta
from sparsec.plan import dtype_name
from sparsec.reference import fake_quant_int8, int8_scales, relative_error, weight_to_rows

MAX_FLUSHED = 0.05


def pruned_rows(gm: fx.GraphModule, ctx: CompileContext, layer, sparsity: str) -> torch.Tensor:
    """The layer's weight as [out, K] rows, with the plan's mask applied."""
    rows = weight_to_rows(gm.get_parameter(layer.weight_path).detach(), layer.op)
    return rows * ctx.layer_mask(gm, layer, sparsity)


@torch.no_grad()
def scale_problem(pruned: torch.Tensor) -> str | None:
    """Why int8 cannot store these rows at all, or None.

    The format keeps float32 scales max|row| / 127 (sparsec/reference.py). A row whose scale is not a
    positive finite float32 has no int8 form: a float64 row beyond float32's range got scale inf and
    dequantized to NaN (the compiled model returned NaN under quantize="int8"), and a row so small that
    its scale underflows to 0 (float32 max|w| below ~1e-43, float64 below float32's range) lost every
    weight. Such a layer is refused int8 instead."""
    absmax = pruned.abs().amax(dim=-1)
    scales = int8_scales(absmax.float())  # as reference.quantize_int8 computes them
    bad = (absmax > 0) & ~(torch.isfinite(scales) & (scales > 0))
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    what = "overflows to inf" if not bool(torch.isfinite(scales[row])) else "underflows to 0"
    others = int(bad.sum()) - 1
    return (f"row {row}{f' (and {others} more)' if others else ''} has max |w| = {float(absmax[row]):.3g}, whose "
            f"float32 scale max|w| / 127 {what} (int8 keeps float32 per-output-channel scales)")


@torch.no_grad()
def measure_int8(pruned: torch.Tensor) -> tuple[float, float]:
    """(relative weight error, fraction of kept nonzero weights flushed to 0) of int8 on the pruned weight rows."""
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
        pruned = pruned_rows(gm, ctx, meta.layer, decision.sparsity)
        if is_levels(wanted):
            decision = _levels_decision(name, decision, pruned, wanted, meta.layer, opts.plan is not None)
            for node in nodes:
                update_meta(node, decision=decision)
            ctx.counters[f"quant_{decision.quant}" if decision.quant else "quant_refused"] += 1
            continue
        problem = scale_problem(pruned)
        if problem is not None:
            if opts.plan is not None:  # an edited plan is applied exactly or refused, never changed
                raise InvalidInputError(f"plan layer {name!r}: quant 'int8' cannot store this weight: {problem}; "
                                        f"set the entry's quant to None (or rescale the weight)")
            note = f"stays {dtype_name(meta.layer.dtype)}: int8 cannot store it: {problem}"
            decision = dataclasses.replace(decision, quant=None, reason=f"{decision.reason}; {note}")
            for node in nodes:
                update_meta(node, decision=decision)
            ctx.counters["quant_refused"] += 1
            continue
        error, flushed = measure_int8(pruned)
        measured = f"relative weight error {error:.2%}, {flushed:.1%} of kept weights flushed to 0"
        keep = wanted != "auto" or (error <= budget and flushed <= MAX_FLUSHED)
        # (3 significant digits: ":.0%" stated quant_budget=0.005 as "budget 0%")
        limits = f"budget {100 * budget:.3g}% / {100 * MAX_FLUSHED:.3g}%"
        if wanted != "auto":
            note = f"int8 per-channel weights ({measured})"
        elif keep:
            note = f"int8 per-channel weights ({measured}; within {limits})"
        else:
            note = f"stays {dtype_name(meta.layer.dtype)}: int8 would cost {measured} ({limits})"
        decision = dataclasses.replace(decision, quant="int8" if keep else None, reason=f"{decision.reason}; {note}")
        for node in nodes:
            update_meta(node, decision=decision)
        ctx.counters["quant_int8" if keep else "quant_refused"] += 1
    return gm


@torch.no_grad()
def _levels_decision(name: str, decision, pruned: torch.Tensor, wanted: str, layer, from_plan: bool):
    """quantize="log2:B" / "codebook:B" (method (d)): every sparse layer takes the levels, with what they cost
    stated. A weight beyond the float32 table's range (a float64 layer) stays unquantized, or, from a plan,
    is refused: its levels would saturate, silently wrong. (inf / NaN weights never get here: such a layer
    is not pruned.)"""
    absmax = float(pruned.abs().max()) if pruned.numel() else 0.0
    if absmax > torch.finfo(torch.float32).max:
        problem = f"max |w| = {absmax:.3g} is beyond the range of its float32 table of levels"
        if from_plan:
            raise InvalidInputError(f"plan layer {name!r}: quant {wanted!r} cannot store this weight: {problem}; set "
                                    f"the entry's quant to None")
        return dataclasses.replace(decision, quant=None, reason=f"{decision.reason}; stays "
                                   f"{dtype_name(layer.dtype)}: {wanted} cannot store it: {problem}")
    quantized = fake_quant_levels(pruned, parse_levels(wanted))
    distinct = int(quantized[pruned != 0].unique().numel())
    note = (f"{wanted} levels, one table for the layer ({distinct} distinct nonzero values; relative weight error "
            f"{relative_error(quantized, pruned):.2%})")
    return dataclasses.replace(decision, quant=wanted, reason=f"{decision.reason}; {note}")
