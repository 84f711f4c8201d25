"""Launcher for the generated 2:4 prune kernel (SDGP's data-gradient pruning): magnitude 2:4 along the
last dim, written compressed (values, meta) or in place as a pruned dense tensor.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the test path).
"""
from __future__ import annotations

import math

import torch

from sparsec.codegen.builder import emit_prune
from sparsec.codegen.cache import KernelCache
from sparsec.codegen.configs import prune_config
from sparsec.codegen.launch import loaded_kernel, require_runnable, triton_cdiv
from sparsec.codegen.spec import PruneSpec
from sparsec.errors import InvalidInputError

_PRUNE = None


def prune_kernel_source() -> tuple[str, str]:
    global _PRUNE
    if _PRUNE is None:
        _PRUNE = emit_prune(PruneSpec())
    return _PRUNE


def prune24(x: torch.Tensor, cache: KernelCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude 2:4 along the last dim: (values [..., K/2], int16 meta [..., ceil(K/16)]), bit-exact with
    `sparsec.reference.nm_compress_masked(x, nm_mask(x, 2, 4), 2, 4)`, inf and NaN included (NaN ranks
    above inf, as in nm_mask, so a loss scaler still sees it)."""
    x2, k = _prune_rows(x)
    values = torch.empty(x2.shape[0], k // 2, dtype=x.dtype, device=x.device)
    meta = torch.empty(x2.shape[0], math.ceil(k / 16), dtype=torch.int16, device=x.device)
    _launch_prune(x2, values, meta, values, cache, compressed=True)
    return values.reshape(*x.shape[:-1], k // 2), meta.reshape(*x.shape[:-1], meta.shape[1])


def prune24_dense(x: torch.Tensor, cache: KernelCache | None = None) -> torch.Tensor:
    """Magnitude 2:4 along the last dim, kept in place: x with the two smaller |x| of every group of four
    set to 0, bit-exact with `torch.where(sparsec.reference.nm_mask(x, 2, 4), x, 0)`, inf and NaN included
    (`x * mask` is not that: a dropped inf times 0 is NaN). One pass over x
    (what a dense GEMM on the pruned tensor needs, without compressing and decompressing it)."""
    x2, k = _prune_rows(x)
    pruned = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch_prune(x2, pruned, pruned, pruned, cache, compressed=False)
    return pruned.reshape(x.shape)


# The kernel ranks by tl.abs and zero-fills with 0.0: right for floats only (abs of int8 -128 is -128, the
# largest magnitude ranked smallest; nm_mask ranks integers by their true magnitude).
_PRUNE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _prune_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    require_runnable(x.device)
    if x.dim() == 0:
        raise InvalidInputError("cannot prune a 0-dim tensor: it has no last dimension to group along")
    if x.dtype not in _PRUNE_DTYPES:
        raise InvalidInputError(f"the 2:4 prune kernel takes float16, bfloat16, float32 or float64 tensors, got {x.dtype}")
    k = x.shape[-1]
    if k % 4:
        raise InvalidInputError(f"last dimension {k} is not a multiple of 4")
    # (the row count spelled out, not -1: reshape(-1, 0) of an empty K is ambiguous and raised)
    return x.reshape(math.prod(x.shape[:-1]), k), k


def _launch_prune(x2, values, meta, pruned, cache, compressed: bool) -> None:
    """One launch of the prune kernel writing the compressed form (values, meta) or the pruned dense
    tensor; the other pointers are placeholders the kernel never touches."""
    r, k = x2.shape
    if not r or not k:  # nothing to write (a grid with a 0 dimension is no launch)
        return
    cfg = prune_config(r, k)
    grid = (triton_cdiv(r, cfg["BLOCK_R"]), triton_cdiv(math.ceil(k / 16), cfg["BLOCK_W"]))
    name, source = prune_kernel_source()
    loaded_kernel(name, source, cache, x2.device)[grid](x2, x2.stride(0), x2.stride(1), values, values.stride(0), meta,
                                                  meta.stride(0), pruned, pruned.stride(0), r, k,
                                                  COMPRESSED=compressed, DENSE=not compressed, **cfg)
