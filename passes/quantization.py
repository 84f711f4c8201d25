"""Analysis: choose int8 weights per sparse layer, measuring what it would cost.

Two measurements on the pruned weight:
  * relative weight error ||deq(q(W)) - W||_F / ||W||_F;
  * the fraction of kept (nonzero) weights that int8 flushes to zero. A row with one large outlier
    gets a quantization step so coarse that most of its weights round to 0; the Frobenius error
    hides that because the outlier dominates the norm, and the layer silently becomes much sparser.

quantize="int8" quantizes every sparse layer and reports both numbers; quantize="auto" takes int8
only where the error stays within `quant_budget` (default 2%, sparsec/options.py) and at most
MAX_FLUSHED of the kept weights flush to zero. quantize="log2:B" / "codebook:B" (method (d)'s non-linear
levels, sparsec/levels.py) quantizes every sparse layer to one table of 2^B values (none flushes a kept
weight to 0) and reports the error. With a given plan, its entries decide and the numbers are still
reported.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from sparsec import reference
from sparsec.context import CompileContext
from sparsec.errors import InvalidInputError
from sparsec.levels import is_levels, lookup_levels, parse_levels, quantize_levels
from sparsec.meta import get_meta, layer_nodes, update_meta
from sparsec.plan import dtype_name
from sparsec.reference import by_row_chunks, fake_quant_int8, int8_scales, weight_to_rows

MAX_FLUSHED = 0.05


def kept_values(gm: fx.GraphModule, ctx: CompileContext, layer, sparsity: str) -> torch.Tensor:
    """The weights the plan's mask keeps, flat in row-major order (the order of every compressed form's
    values), gathered a slice of rows at a time: levels cost nothing at pruned positions (code 0 is exactly
    0), so their table and error come from these alone, without a dense pruned copy of the layer."""
    rows = weight_to_rows(gm.get_parameter(layer.weight_path).detach(), layer.op)
    slices = reference.row_slices(rows, ctx.layer_mask(gm, layer, sparsity))
    return torch.cat([part.masked_select(part_mask) for _, (part, part_mask) in slices])


@torch.no_grad()
def int8_row_stats(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What int8 does to each row of the pruned weight `rows * mask`, float64 `[out, 5]`: max |w|,
    sum of (deq(q(w)) - w)^2, sum of w^2, kept nonzero weights it flushes to 0, kept nonzero weights.
    Row by row sums, so computed a slice of rows at a time: the whole layer's float64 copies were 15x a
    bfloat16 layer at once."""
    return by_row_chunks(_int8_stats, rows, mask)


def _int8_stats(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pruned = rows * mask
    quantized = fake_quant_int8(pruned)
    nonzero = pruned != 0
    exact, approx = pruned.double(), quantized.double()
    return torch.stack([pruned.abs().amax(dim=-1).double(), (approx - exact).square().sum(-1), exact.square().sum(-1),
                        (nonzero & (quantized == 0)).sum(-1).double(), nonzero.sum(-1).double()], dim=-1)


def scale_problem(absmax: torch.Tensor) -> str | None:
    """Why int8 cannot store rows of these max |w| at all, or None.

    The format keeps float32 scales max|row| / 127 (sparsec/reference.py). A row whose scale is not a
    positive finite float32 has no int8 form: a float64 row beyond float32's range got scale inf and
    dequantized to NaN (the compiled model returned NaN under quantize="int8"), and a row so small that
    its scale underflows to 0 (float32 max|w| below ~1e-43, float64 below float32's range) lost every
    weight. Such a layer is refused int8 instead."""
    scales = int8_scales(absmax.float())  # as reference.quantize_int8 computes them
    bad = (absmax > 0) & ~(torch.isfinite(scales) & (scales > 0))
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0, 0])
    what = "overflows to inf" if not bool(torch.isfinite(scales[row])) else "underflows to 0"
    others = int(bad.sum()) - 1
    return (f"row {row}{f' (and {others} more)' if others else ''} has max |w| = {float(absmax[row]):.3g}, whose "
            f"float32 scale max|w| / 127 {what} (int8 keeps float32 per-output-channel scales)")


def measure_int8(stats: torch.Tensor) -> tuple[float, float]:
    """(relative weight error ||deq(q(W)) - W||_F / ||W||_F, fraction of kept nonzero weights flushed to 0)
    from `int8_row_stats`."""
    _, squared_error, squared_norm, flushed, nonzero = stats.sum(0).tolist()
    error = math.sqrt(squared_error) / math.sqrt(squared_norm) if squared_norm > 0 else math.sqrt(squared_error)
    return error, flushed / max(nonzero, 1)


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
        if is_levels(wanted):
            kept = kept_values(gm, ctx, meta.layer, decision.sparsity)
            decision, table = _levels_decision(name, decision, kept, wanted, meta.layer, opts.plan is not None)
            if table is not None:
                ctx.level_tables[name, wanted] = table
            for node in nodes:
                update_meta(node, decision=decision)
            ctx.counters[f"quant_{decision.quant}" if decision.quant else "quant_refused"] += 1
            continue
        rows = weight_to_rows(gm.get_parameter(meta.layer.weight_path).detach(), meta.layer.op)
        stats = int8_row_stats(rows, ctx.layer_mask(gm, meta.layer, decision.sparsity))
        problem = scale_problem(stats[:, 0])
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
        error, flushed = measure_int8(stats)
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
def _levels_decision(name: str, decision, kept: torch.Tensor, wanted: str, layer, from_plan: bool):
    """quantize="log2:B" / "codebook:B" (method (d)): every sparse layer takes the levels, with what they cost
    stated, measured on its `kept` weights. A weight beyond the float32 table's range (a float64 layer) stays
    unquantized, or, from a plan, is refused: its levels would saturate, silently wrong. (inf / NaN weights
    never get here: such a layer is not pruned.) Returns the decision and the fitted table (None: none)."""
    absmax = float(kept.abs().max()) if kept.numel() else 0.0
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    if absmax > huge or 0 < absmax < tiny:
        # (below float32's normal range the levels are float32 subnormals, then one value: a float64 layer at
        # 1e-300 had every weight stored as +-2**-149, codebook's of both signs as one, 1e255 times too large)
        problem = (f"max |w| = {absmax:.3g} is {'beyond' if absmax > huge else 'below'} the range of its float32 "
                   f"table of levels")
        if from_plan:
            raise InvalidInputError(f"plan layer {name!r}: quant {wanted!r} cannot store this weight: {problem}; set "
                                    f"the entry's quant to None")
        return dataclasses.replace(decision, quant=None, reason=f"{decision.reason}; stays "
                                   f"{dtype_name(layer.dtype)}: {wanted} cannot store it: {problem}"), None
    codes, table = quantize_levels(kept, parse_levels(wanted))
    error, per_weight, distinct = _levels_cost(kept, codes, table)
    note = (f"{wanted} levels, one table for the layer ({distinct} distinct nonzero values; relative weight error "
            f"{error:.2%}, {per_weight:.2%} of its magnitude per weight on average)")
    return dataclasses.replace(decision, quant=wanted, reason=f"{decision.reason}; {note}"), table


def _levels_cost(values: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> tuple[float, float, int]:
    """(relative weight error ||q - w|| / ||w||, mean of |q - w| / |w| over the nonzero weights, distinct nonzero
    values) of the levels `codes` / `table` give `values`, summed a slice at a time (the dequantized layer's
    float64 copies were many times its size). The mean per weight shows what the norm hides: a codebook
    whose few values went to a layer's outliers stored the outliers exactly and the rest collapsed (0.29% by
    the norm, 28% per weight). Computed on w / max|w|: squares of a float64 layer's 1e-300 underflowed to 0."""
    squared_error = squared_norm = per_weight = 0.0
    nonzero = 0
    used = torch.zeros(table.numel(), dtype=torch.bool, device=table.device)
    size = reference.ROW_CHUNK_WEIGHTS
    scale = float(values.abs().max()) if values.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    for part, part_codes in zip(values.reshape(-1).split(size), codes.reshape(-1).split(size)):
        exact = part.double() / scale
        approx = lookup_levels(part_codes, table, values.dtype).double() / scale
        squared_error += float((approx - exact).square().sum())
        squared_norm += float(exact.square().sum())
        kept = exact != 0
        per_weight += float(((approx - exact)[kept] / exact[kept]).abs().sum())
        nonzero += int(kept.sum())
        used |= torch.bincount(part_codes[part != 0].long(), minlength=table.numel()) > 0
    error = math.sqrt(squared_error) / math.sqrt(squared_norm) if squared_norm > 0 else math.sqrt(squared_error)
    per_weight = per_weight / nonzero if nonzero else 0.0
    return error, per_weight, int(table[used].to(values.dtype).unique().numel())
