"""Fast CPU forward of an N:M linear layer from its compressed values plus one bit per weight
(C++ kernel csrc/bitmask.cpp, torch fallback).

An N:M weight W [out, K] keeps the same number of values, nnz = K*N/M, in every row. The kernel reads
them as the layer stores them, `values [out, nnz]` in column order (float32, bfloat16 or float16, or
int8 with per-row scales), plus `masks [out, ceil(K/16)]`: bit j of word w set = column 16 w + j kept.
On AVX-512 one word is one vexpandps (2:4 at batch 1: two fixed permutes, see FORM_TWO_OF_FOUR) and
one FMA per batch row, so a layer reads about half the bytes of its dense weight (2:4 float32: 2.1
bytes per weight, 16-bit 1.1 against 2, int8 0.6), which is what a memory-bound small batch pays.

API
    prepare(values, mask, scales=None) -> BitmaskWeight
        Once per layer: builds the bit masks from the boolean mask [out, K] (each row must keep nnz =
        values.shape[1]). Shares `values` / `scales` (no copy when they are contiguous).
    densify(weight) -> Tensor
        The dense float32 weight [out, K] (int8 dequantized), at memory speed: what a batch too large
        for the kernel multiplies with F.linear (nibble metadata decoded by torch ops costs ~20x more).
    bitmask_linear(x, weight, bias=None) -> Tensor
        x [..., K] float32 / bfloat16 / float16 CPU, no autograd -> [..., out] in x's dtype from the
        kernel (computed in float32, as torch's CPU GEMMs compute 16-bit layers); anything else (other
        dtypes or devices, autograd of x, bias, values or scales, no kernel here) runs `reference`:
        scatter to dense and F.linear, never wrong, only slower. `calls` counts which path each call took.
    is_available(), isa() ("avx512" / "scalar" / "torch"), set_isa(name) (tests: "scalar" / "best").

Build: the first use compiles csrc/bitmask.cpp (runtime/cpp_build.py). Any failure is logged once as
a warning and leaves is_available() False; SPARSEC_NO_CPP=1 skips the build.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.runtime.cpp_build import CppKernels


calls: collections.Counter = collections.Counter()
# x, float values and bias dtypes the kernel takes (computing in float32, y in x's dtype)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What every mask word is known to hold, so the kernel can take a faster form (csrc/bitmask.cpp):
FORM_ANY = 0           # any number of kept columns
FORM_EIGHT = 8         # exactly 8: a fixed-size load (2:4, 4:8 with K a multiple of 16)
FORM_TWO_OF_FOUR = 24  # exactly 2 in each group of 4 columns: placed by two permutes, not vexpandps


@dataclass(frozen=True, eq=False)
class BitmaskWeight:
    values: torch.Tensor         # [out, nnz] float32 / bfloat16 / float16, or int8: kept values in column order
    masks: torch.Tensor          # [out, ceil(K / 16)] int16 (read as uint16)
    scales: torch.Tensor | None  # [out] float32 for int8 values
    in_features: int
    form: int                    # what every mask word holds: FORM_TWO_OF_FOUR, FORM_EIGHT or FORM_ANY

    @property
    def out_features(self) -> int:
        return self.values.shape[0]


def prepare(values: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor | None = None) -> BitmaskWeight:
    if values.dim() != 2 or mask.dim() != 2 or mask.shape[0] != values.shape[0] or mask.dtype != torch.bool:
        raise ValueError(f"values {tuple(values.shape)} must be [out, nnz] and mask {tuple(mask.shape)} a bool [out, K]")
    # Load the library (and its operators' fake versions) now, eagerly: a layer's layout is built when
    # the layer is made or loaded, and TorchDynamo cannot trace the build and load if the first call
    # is what triggers them (torch.compile(fullgraph=True) of a freshly loaded model failed).
    _load()
    out, k = mask.shape
    words = -(-k // 16)
    padded = torch.zeros(out, words * 16, dtype=torch.float32)
    padded[:, :k] = mask.cpu()
    # One small matmul gives each word's value (bit j = column 16 w + j; exact in float32 below 2^24)
    # and its count of kept columns: integer reductions over 16 elements are ~10x slower in torch.
    value_count = padded.view(out, words, 16) @ torch.stack([2.0 ** torch.arange(16), torch.ones(16)], 1)
    counts = value_count[..., 1].to(torch.int64)
    kept = counts.sum(1)
    if out and not bool((kept == values.shape[1]).all()):
        raise ValueError(f"every row of the mask must keep values.shape[1] = {values.shape[1]} columns "
                         f"(rows keep {int(kept.min())} to {int(kept.max())})")
    if (values.dtype == torch.int8) != (scales is not None):
        raise ValueError("int8 values need per-row scales; float values take none")
    # (float64 values were accepted here, then the kernel refused them at the first float32 call, while
    # the reference rounded them to float32 without a word)
    if values.dtype not in (*KERNEL_DTYPES, torch.int8):
        raise ValueError(f"values must be float32, bfloat16 or float16, or int8 with scales; got {values.dtype}")
    form = FORM_ANY
    if bool((counts == 8).all()):
        group_counts = padded.view(out, -1, 4).sum(-1)
        form = FORM_TWO_OF_FOUR if bool((group_counts == 2).all()) else FORM_EIGHT
    # the two's-complement low 16 bits: the C++ reads them as uint16
    masks = value_count[..., 0].to(torch.int32).to(torch.int16).contiguous()
    return BitmaskWeight(values.contiguous(), masks, None if scales is None else scales.float().contiguous(), k, form)


def reference_weight(weight: BitmaskWeight) -> torch.Tensor:
    """Plain torch: the dense float32 weight [out, K] the masks and values stand for."""
    masks = weight.masks.to(torch.int32) & 0xFFFF
    bits = ((masks.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32)) & 1).bool()
    mask = bits.reshape(weight.out_features, -1)[:, :weight.in_features]
    values = weight.values.float() if weight.scales is None else weight.values.float() * weight.scales.unsqueeze(1)
    # on the values' device: a CPU dense filled from "meta" values stayed zeros without an error
    dense = torch.zeros(mask.shape, dtype=torch.float32, device=values.device)
    dense[mask.to(values.device)] = values.flatten()
    return dense


def reference(x: torch.Tensor, weight: BitmaskWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch: the dense weight (reference_weight) and F.linear, in float32 or wider, returned in
    x's dtype (as the kernel computes a 16-bit layer)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    dense = reference_weight(weight).to(dtype=dtype, device=x.device)
    y = F.linear(x.to(dtype), dense, None if bias is None else bias.to(dtype))
    return y.to(x.dtype) if x.dtype.is_floating_point else y


def _register_fakes() -> None:
    """Shape-only versions of the operators, for torch.compile / torch.export."""
    torch.library.register_fake("sparsec_bitmask::linear")(
        lambda x, vals, masks, scales, bias, out, form: x.new_empty(*x.shape[:-1], out))
    torch.library.register_fake("sparsec_bitmask::densify")(
        lambda vals, masks, scales, k, form: vals.new_empty(vals.shape[0], k, dtype=torch.float32))


_kernels = CppKernels("bitmask.cpp", "sparsec_bitmask", _register_fakes, "bitmask CPU kernel")
_load = _kernels.op
is_available, isa, set_isa = _kernels.is_available, _kernels.isa, _kernels.set_isa  # isa: "avx512" / "scalar" / "torch"


def densify(weight: BitmaskWeight) -> torch.Tensor:
    """The dense float32 weight [out, K] (int8 dequantized), from the kernel's pass over the layout
    (memory speed), else from `reference`'s torch ops."""
    op = _load()
    if op is None:
        return reference_weight(weight)
    return op.densify(weight.values, weight.masks, weight.scales, weight.in_features, weight.form)


def bitmask_linear(x: torch.Tensor, weight: BitmaskWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the layer takes {weight.in_features}")
    # values / scales count too: prepare shares them, and the kernel's output, computed from a values
    # Parameter, had no gradient for it (torch only warned, at backward, that none was registered).
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad) or weight.values.requires_grad
        or (weight.scales is not None and weight.scales.requires_grad))
    op = _load()
    # (values elsewhere than the CPU, on "meta" say, dispatched to the operator's shape-only version,
    # which returned uninitialised memory for a CPU x)
    if (op is not None and x.dtype in KERNEL_DTYPES and x.is_cpu and weight.values.is_cpu and not needs_grad
            and (bias is None or (bias.dtype in KERNEL_DTYPES and bias.is_cpu))):
        calls["fast"] += 1
        return op.linear(x, weight.values, weight.masks, weight.scales, bias, weight.out_features, weight.form)
    calls["fallback"] += 1
    return reference(x, weight, bias)
