"""Launch configurations: the one place that picks tile sizes, warps and stages.

Chosen by shape from a small table rather than autotuned at run time, so a compile is
deterministic and the interpreter (about 1.5 ms per program per K step) stays fast; a GPU
benchmark can override per shape. Every entry is recorded in the kernel manifest.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def matmul_config(m: int, n: int, k: int, act_dtype: str) -> dict:
    """Tiles for y[M, N] = x[M, K] @ W^T; tl.dot needs every tile dimension >= 16."""
    if interpreting():
        # Few, large programs: the interpreter's cost is per program and per K step.
        return dict(BLOCK_M=_pow2_clamp(m, 16, 64), BLOCK_N=_pow2_clamp(n, 16, 128), BLOCK_K=_pow2_clamp(k, 16, 128),
                    GROUP_M=8, num_warps=4, num_stages=1)
    if act_dtype == "float32":
        # 4-byte values and the pipelined value/metadata tiles: at BLOCK_K=128, 4 stages need 248 KB of
        # shared memory, over sm_80's 163 KB; these stay under 90 KB (checked in tests/test_codegen.py).
        if m <= 16:
            return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    if m <= 16:
        # Decode / small batch: weight bytes dominate; a short M tile and long K steps stream them.
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def prune_config(r: int, k: int) -> dict:
    return dict(BLOCK_R=_pow2_clamp(r, 1, 32), BLOCK_W=_pow2_clamp(max(k // 16, 1), 1, 32 if interpreting() else 16),
                num_warps=4)


def _pow2_clamp(value: int, low: int, high: int) -> int:
    p = low
    while p < value and p < high:
        p *= 2
    return p


def condensed_config(m: int, n: int, k: int) -> dict:
    """Tiles for the condensed (gather + reduce) kernel: a [BLOCK_M, BLOCK_N, BLOCK_J] gather per step
    holds 4096 fp32 values at most, which keeps it in registers at 4 warps."""
    block_m = _pow2_clamp(m, 1, 8)
    block_j = _pow2_clamp(k, 8, 32)
    block_n = max(8, min(128, 4096 // (block_m * block_j)))
    if interpreting():
        block_n = _pow2_clamp(n, 8, 128)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j, num_warps=4)
