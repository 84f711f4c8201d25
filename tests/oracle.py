"""Independent plain-torch oracle for tests: written differently from sparsec/reference.py.

Masks are computed with numpy's lexsort on the explicit key (-|w|, index), and for small groups by
pairwise ranking (an element is kept when fewer than `keep` elements of its group beat it: larger
magnitude, or equal magnitude at a lower index), not by torch's stable sort, so a bug in the
reference's sort-based code cannot hide behind the same bug here.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn as nn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_mask(groups: torch.Tensor, keep: int) -> torch.Tensor:
    """groups [..., G]: keep each element beaten by fewer than `keep` others in its group."""
    a = groups.abs().double()
    g = a.shape[-1]
    idx = torch.arange(g)
    bigger = a.unsqueeze(-2) > a.unsqueeze(-1)                       # [..., i, j]: |x_j| > |x_i|
    tie_lower = (a.unsqueeze(-2) == a.unsqueeze(-1)) & (idx.view(1, g) < idx.view(g, 1))  # j < i, equal
    beaten_by = (bigger | tie_lower).sum(-1)
    return beaten_by < keep


def lexsort_mask(groups: torch.Tensor, keep: int) -> torch.Tensor:
    """groups [..., G]: keep the first `keep` in order of (-|x|, index)."""
    a = groups.detach().abs().double().numpy()
    index = np.broadcast_to(np.arange(a.shape[-1]), a.shape)
    order = np.lexsort((index, -a), axis=-1)  # last key is the primary one
    mask = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :keep], True, axis=-1)
    return torch.from_numpy(mask)


def oracle_nm_mask(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = rows.reshape(rows.shape[0], -1, m)
    mask = rank_mask(groups, n) if m <= 16 else lexsort_mask(groups, n)
    return mask.reshape(rows.shape)


def oracle_fanin_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    return lexsort_mask(rows, k)


def oracle_int8(rows: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 fake quantization, row by row."""
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        s = row.abs().max().float() / torch.tensor(127.0, device=row.device)  # IEEE division on any device
        s = s if s > 0 else torch.tensor(1.0)
        out[i] = (torch.clamp(torch.round(row.float() / s), -127, 127) * s).to(rows.dtype)
    return out


def to_rows(w: torch.Tensor, op: str) -> torch.Tensor:
    return w.t() if op == "matmul" else w.reshape(w.shape[0], -1)


def from_rows(r: torch.Tensor, op: str, shape) -> torch.Tensor:
    return r.t() if op == "matmul" else r.reshape(shape)


def fanin_k(numel: int, out: int, sparsity: float) -> int:
    return max(1, math.floor(numel * (1 - sparsity)) // out)


def unstructured_pruned_count(numel: int, sparsity: float) -> int:
    """methods.md D.4: round(S * numel) weights are pruned (halves up), in exact decimal arithmetic where the
    float's shortest text is exact (0.95 * 20 = 19, not the float product 18.999...)."""
    from decimal import ROUND_HALF_UP, Decimal
    return int((Decimal(repr(sparsity)) * numel).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def oracle_unstructured_mask(rows: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = rows.numel() - unstructured_pruned_count(rows.numel(), sparsity)
    return lexsort_mask(rows.reshape(1, -1), keep).reshape(rows.shape)


def pruned_weight(w: torch.Tensor, op: str, sparsity: str, quant: str | None) -> torch.Tensor:
    """w pruned (and fake-quantized) as the plan says, computed on the CPU, returned on w's device."""
    rows = to_rows(w.detach().cpu(), op)
    if sparsity.startswith("unstructured:"):
        mask = oracle_unstructured_mask(rows, float(sparsity.split(":")[1]))
    elif sparsity.startswith("fanin:"):
        mask = oracle_fanin_mask(rows, fanin_k(rows.numel(), rows.shape[0], float(sparsity[6:])))
    else:
        n, m = map(int, sparsity.split(":"))
        mask = oracle_nm_mask(rows, n, m)
    rows = rows * mask
    if quant == "int8":
        rows = oracle_int8(rows)
    elif quant is not None and quant.startswith("log2:"):
        rows = oracle_log2(rows, int(quant[5:]))
    return from_rows(rows, op, w.shape).to(w.device)


def oracle_log2(w: torch.Tensor, bits: int) -> torch.Tensor:
    """"log2:B" of one layer with numpy: each nonzero becomes sign * 2**e, e = log2|w| rounded to the nearest
    integer and clamped to the L = 2**(B-1) - 1 exponents ending at the largest weight's (rounded) exponent.
    (Not the float16 / bfloat16 range clamp: weights here are far inside it.)"""
    a = w.detach().double().numpy()
    nonzero = a != 0
    if not nonzero.any():
        return w.clone()
    exponents = np.round(np.log2(np.abs(a[nonzero])))
    top = exponents.max()
    levels = np.sign(a[nonzero]) * np.exp2(np.clip(exponents, top - (2 ** (bits - 1) - 1) + 1, top))
    out = np.zeros_like(a)
    out[nonzero] = levels
    return torch.from_numpy(out).to(w.dtype)


def pruned_model(model: nn.Module, plan, weight_of=None) -> nn.Module:
    """A copy of `model` whose planned layers carry the pruned (and fake-quantized) weights.

    weight_of(copy, name) -> Parameter locates a layer's weight; default: module `name`.weight,
    or the parameter at `name` for functional layers named by their parameter path.
    """
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for lp in plan:
        if not lp.sparsity:
            continue
        w = weight_of(ref, lp.name) if weight_of else params.get(f"{lp.name}.weight", params.get(lp.name))
        with torch.no_grad():
            w.copy_(pruned_weight(w, lp.op, lp.sparsity, lp.quant))
    return ref


def output_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale (max |b|)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def kernel_operands_24(rows: torch.Tensor, int8: bool):
    """(values, meta, scales, pruned) of a 2:4 weight [n, K] as a kernel test feeds it: the mask, the
    pruned (and int8 fake-quantized) weight from this oracle; the compressed form (values + nibble
    metadata, int8 values + scales) from sparsec.reference, whose layout is what the kernel reads."""
    from sparsec import reference

    mask = oracle_nm_mask(rows, 2, 4)
    pruned = rows * mask
    if int8:
        pruned = oracle_int8(pruned)
    values, meta = reference.nm_compress_masked(pruned, mask, 2, 4)
    scales = None
    if int8:
        values, scales = reference.quantize_int8(values)
    return values, meta, scales, pruned


def shrunk_and_unchanged(model: nn.Module, x: torch.Tensor):
    """The model compiled dense for training and shrunk (sparsec.shrink), after checking that the smaller
    model computes what the original does on x."""
    import sparsec
    from sparsec.shrink import shrink

    small = shrink(sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True))
    with torch.no_grad():
        assert output_error(small(x), model(x)) <= 1e-5
    return small
