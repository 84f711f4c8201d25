"""Fast CPU forward of a condensed constant fan-in linear layer (C++ kernel, torch fallback).

A constant fan-in weight W [out, K] keeps exactly k weights per row, stored condensed as
`values [out, k]` (float32) and `indices [out, k]` (integer column positions in [0, K)). The layer is

    y[..., o] = sum_j values[o, j] * x[..., indices[o, j]] + bias[o]

API
    prepare(values, indices) -> CondensedWeight
        Once per layer (10-30 ms for 3072->768): checks the indices (integers >= 0; sorted here if
        they are not ascending) and builds the kernels' layouts (csrc/condensed.cpp): "rows", a
        row-major copy with uint16 indices, always; "seg", the AVX-512 small-batch layout, when
        isa() is "avx512". Keeps `values` / `indices` themselves for the fallback. The layouts are
        copies: after editing `values` in place, prepare() again.
    condensed_linear(x, values, indices=None, bias=None) -> Tensor
        x [..., K] (any leading dims, 1-D included) -> [..., out], float32 on the fast path, else
        torch.promote_types(x.dtype, values.dtype) (so float64 x gives float64). `values` is either
        a CondensedWeight (then `indices` is not needed) or the raw values tensor with `indices`,
        which prepares on every call (slow: use prepare). bias [out] or None. Raises IndexError
        when x has fewer than max(indices) + 1 features. On AVX-512, batches (rows of x) below
        CondensedWeight.seg_batch_limit run the seg kernel, larger ones the rows kernel.
    is_available() -> bool
        Whether the C++ kernels built and loaded here (builds them on first call).
    isa() -> str, set_isa(name) -> str
        The kernel family in use ("avx512", "avx2", "scalar"; "torch" when unavailable); set_isa
        lowers it for tests ("best" restores). Layers prepared under "avx512" keep using seg.
A CondensedWeight belongs to the process (and CPU) that prepared it: prepare() again elsewhere.

Fast path: float32 CPU x, a layout from prepare(), float32 CPU bias or None, and no autograd
needed (grad disabled, or nothing requires grad). Anything else (float64, half, other devices,
x / values / bias requiring grad) runs `reference`: scatter to dense and F.linear, differentiable
and never wrong, only slower. The fast path sums kept weights only, so an inf / nan in x reaches
only the rows that keep that column (as with a CSR matmul); the dense reference multiplies it by
the zeros as well. `calls` counts which path each call took ("fast" / "fallback").

Build: the first prepare() / is_available() / condensed_linear() compiles csrc/condensed.cpp
(runtime/cpp_build.py: once per source, compiler and torch version). The library holds AVX-512, AVX2
and scalar kernels and picks one at run time. Any failure (no compiler, compile error, unwritable
cache) is logged once as a warning and leaves is_available() False. SPARSEC_NO_CPP=1 skips the build.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.runtime.cpp_build import CppKernels


LANES, SEGMENT = 16, 32  # rows per block, columns per table lookup: kLanes / kSegment in the C++
# AVX-512: the seg kernel's time grows with batch x padding, the transposed rows kernel's stays flat up
# to 16 rows; measured crossovers (3072->768; sparsity 0.8 / 0.9 / 0.95, padding 1.65 / 2.0 / 2.5):
# batch ~16 / 12 / 9, i.e. batch * padding ~ 24.
SEG_CROSSOVER = 24.0

calls: collections.Counter = collections.Counter()


@dataclass(frozen=True, eq=False)
class CondensedWeight:
    """One layer prepared for condensed_linear: the kernels' layouts plus the original tensors."""

    values: torch.Tensor      # [out, k] as given (used by the fallback)
    indices: torch.Tensor     # [out, k] as given
    out_features: int
    min_features: int         # max(indices) + 1: x needs at least this many features
    rows: tuple = ()          # (values [out, k] float32, indices [out, k] int16 / int32), sorted; () = fallback only
    seg: tuple = ()           # AVX-512 small-batch layout, see _seg_layout; () when not built
    seg_batch_limit: float = 0.0  # batches below this use seg: SEG_CROSSOVER / padding


def prepare(values: torch.Tensor, indices: torch.Tensor) -> CondensedWeight:
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [out, k]")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError("indices must be non-negative")
    out = values.shape[0]
    min_features = int(indices.max()) + 1 if indices.numel() else 0
    rows = seg = ()
    op = _load()
    if op is not None and values.dtype == torch.float32 and values.device.type == "cpu" == indices.device.type:
        # Sorted columns make each (row, segment)'s weights contiguous and xT reads ascending; the spec
        # has them ascending already.
        idx, order = indices.detach().long().sort(dim=-1, stable=True)
        val = values.detach().gather(1, order).contiguous()
        # uint16 indices (6 bytes per weight instead of 8) while K <= 65536; int16 holds the same bits.
        rows = (val, idx.to(torch.int16 if min_features <= 65536 else torch.int32))
        seg = _seg_layout(val, idx, min_features) if op.isa() == "avx512" else ()
        padding = seg[0].numel() / max(1, values.numel()) if seg else 0.0  # steps * 16 / kept weights
        limit = SEG_CROSSOVER / max(padding, 1.0) if seg else 0.0
        return CondensedWeight(values, indices, out, min_features, rows, seg, limit)
    return CondensedWeight(values, indices, out, min_features)


def _seg_layout(values: torch.Tensor, indices: torch.Tensor, min_features: int) -> tuple:
    """(vals [steps, 16], idx [steps, 16] uint8, counts [nblk, nseg] uint8, starts [nblk + 1])."""
    out, k = values.shape
    nblk, nseg = -(-out // LANES), -(-min_features // SEGMENT)
    seg = indices // SEGMENT
    per_row = torch.zeros(nblk * LANES, nseg, dtype=torch.int64)  # kept weights of row o in segment s
    per_row[:out].scatter_add_(1, seg, torch.ones_like(seg))
    counts = per_row.view(nblk, LANES, nseg).amax(1)  # steps of (block, segment): its fullest row
    if counts.numel() and int(counts.max()) > 255:  # only with repeated indices; uint8 counts
        return ()
    ends = counts.flatten().cumsum(0)
    first_step = (ends - counts.flatten()).view(nblk, nseg)
    # Rank of each weight among its row's weights in the same segment (indices are sorted).
    first_j = (per_row[:out].cumsum(1) - per_row[:out]).gather(1, seg)
    rank = torch.arange(k).expand(out, k) - first_j
    rows = torch.arange(out)
    step = first_step[(rows // LANES)[:, None], seg] + rank
    lane = (rows % LANES)[:, None].expand(out, k)
    steps = int(ends[-1]) if ends.numel() else 0
    vals = torch.zeros(steps, LANES, dtype=torch.float32)
    vals[step, lane] = values
    idx = torch.full((steps, LANES), 0x80, dtype=torch.uint8)  # bit 7: padding, looks up 0
    idx[step, lane] = (indices % SEGMENT).to(torch.uint8)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.sum(1).cumsum(0)])
    return vals, idx, counts.to(torch.uint8).contiguous(), starts


def reference(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch: scatter to dense and F.linear (differentiable in x, values and bias)."""
    dtype = torch.promote_types(x.dtype, values.dtype)
    dense = torch.zeros(values.shape[0], x.shape[-1], dtype=dtype, device=values.device)
    dense = dense.scatter_add(1, indices.long(), values.to(dtype))
    return F.linear(x.to(dtype), dense, None if bias is None else bias.to(dtype))


def _register_fakes() -> None:
    """Shape-only versions of the kernels, so torch.compile / torch.export can trace a model that calls
    them (they run the real kernel at run time); both return x's shape with `out` last features."""
    def fake(x, *tensors_bias_out):
        return x.new_empty(*x.shape[:-1], tensors_bias_out[-1])

    for name in ("linear_seg", "linear_rows"):
        torch.library.register_fake(f"sparsec_condensed::{name}")(fake)


_kernels = CppKernels("condensed.cpp", "sparsec_condensed", _register_fakes, "condensed CPU kernels")
_load = _kernels.op
# isa(): "avx512", "avx2", "scalar" or "torch". set_isa("avx512" / "avx2" / "scalar" / "best"): the
# rows kernels switch at once; only prepare() under "avx512" builds the seg layout.
is_available, isa, set_isa = _kernels.is_available, _kernels.isa, _kernels.set_isa


def condensed_linear(x: torch.Tensor, values, indices: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(values, CondensedWeight):
        w = values
    elif indices is None:
        raise TypeError("condensed_linear needs indices unless values is a CondensedWeight from prepare()")
    else:
        w = prepare(values, indices)
    if x.shape[-1] < w.min_features:
        raise IndexError(f"x has {x.shape[-1]} features but the indices reach {w.min_features - 1}")
    # Cheapest tests first (x.device.type alone costs 0.3 us; the whole wrapper is ~0.6 us).
    needs_grad = (x.requires_grad or w.values.requires_grad or (bias is not None and bias.requires_grad)) \
        and torch.is_grad_enabled()
    if (w.rows and x.dtype is torch.float32 and x.is_cpu and not needs_grad
            and (bias is None or (bias.dtype is torch.float32 and bias.is_cpu))):
        calls["fast"] += 1
        op = _load()
        if x.numel() < w.seg_batch_limit * x.shape[-1]:
            return op.linear_seg(x, *w.seg, bias, w.out_features)
        return op.linear_rows(x, *w.rows, bias, w.out_features)
    calls["fallback"] += 1
    return reference(x, w.values, w.indices, bias)
