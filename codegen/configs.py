"""Launch configurations: the one place that picks tile sizes, split-K, warps and stages.

Two sources, both deterministic for a given shape and device:
* `matmul_config`: a small shape table, used when nothing was measured (backend="triton", or M
  unknown). Every entry builds for sm_80 and sm_90 without spilling registers (checked by
  tests/test_codegen.py through `sparsec.codegen.aot`): the in-register 2:4 decompression is
  register hungry, and a spilled tile turns the memory-bound decode case into a local-memory one.
* `matmul_candidates`: a few alternatives around it; backend="auto" on CUDA times them at the
  compiled shape and records the fastest in the plan (`LayerPlan.launch`).

BLOCK_M under 16 selects the kernel's CUDA-core form (builder._dot): multiply-adds into per-k
partial sums instead of tl.dot, for a single row (decode at batch 1), where a tensor-core tile
computes 16 rows to use one and the expanded weights go through shared memory into the dot's
operand layout. The static model (bench/kernel_stats.py) puts it slightly behind tl.dot with Triton
3.9 and 10-15% ahead with Triton 3.6 for 16-bit inputs, and 3x ahead for fp32 (whose IEEE tl.dot runs
on the same CUDA cores, 16 rows of them); it is a candidate at M = 1, for the GPU to decide. On an
H100 (2026-11-23, bench/results/sparse24-*) it was never the fastest for 16-bit inputs: the 16-row
tensor-core tile with split-K won at M = 1 too; on 2026-11-24 (clean L2 flush) it won every M = 1 row.
Its loads feed no tl.dot, and Triton software-pipelines only loads that do, so each of its K blocks
waited for its own loads. With num_stages > 1 the kernel now issues the next K block's loads before it
expands and multiplies this one (PREFETCH, `prefetches`): the form streamed the same ~1e12 kept weights
/s with fp16 and int8 values, which a fixed number of weights in flight per SM would give (as would its
equal instructions per weight: bench/gpu_notes.md). Both forms are candidates (num_stages 3 and 1) until
a GPU decides.

GATHER (one row of fp16 / bf16 inputs, weights of their dtype or int8; spec.gathers): 1 runs the CUDA-core
form without expanding: per group of four positions, the two kept values times the x values at their
positions (a 64-bit shift of the group's four x values each), everything in one [BLOCK_N, BLOCK_K / 4]
layout. On sm_90 (Triton 3.6 and 3.9, bench/kernel_stats.py) that is 4.1-4.6 instructions per weight
position (5.0-5.6 with PREFETCH) against 5.9-7.6 expanding (6.3-8.3), 40 registers against 72-96, and no
shared-memory round trip in the K loop, for tiles that give each thread one metadata word, the four
groups of its vector of values (BLOCK_N * BLOCK_K = 512 * num_warps; at 1 x 32 x 128 over 4 warps a
thread loads two words, and the kernel changed layout through shared memory every K step). It skips
pruned positions, whose zeros make a dense product NaN where x is inf or NaN: a program whose x slice is
not all finite runs a loop that adds those products too. A candidate at M = 1, not yet timed on a GPU.

Split-K: at small M a layer has few output tiles (N = 4096 at BLOCK_N = 32 is 128 tiles for 132
SMs on an H100, and only some of them stream weights at a time), so K is split until the
programs fill the device with about WAVES 4-warp programs per SM (as many warps in more, smaller
programs for tiles of 1 or 2 warps), keeping each split at least MIN_SPLIT_BLOCKS K blocks long
and the fp32 partials the splits write and read back (8 bytes per output element and split) under
a quarter of the 2:4 weight bytes (about one byte per weight), i.e. split <= K / (32 M).

PRMT_EXPAND (16-bit weights, and int8 weights with fp16 / bf16 activations; spec.has_prmt_expand):
1 expands the 2:4 groups with byte permutes in inline PTX (codegen/prmt.py), the int8 conversion
included, where the Triton form shifts each kept value into place (64-bit shifts for 16-bit
values) and converts int8 with `cvt`, an eighth-rate instruction on sm_80/sm_90. On sm_90 it takes
the K loop of the decode kernel from 4.7 to about 2 integer instructions per fp16 weight, from 4.2
(and a cvt) to 2.7 per int8 weight for fp16 and from 6.5 to 3.3 for bf16 (bench/kernel_stats.py);
for fp16 inputs that is below what streaming the weights from HBM takes. Inline PTX
cannot run in the Triton interpreter, so the shape table does not set it: it is a candidate, and
backend="auto" checks every candidate's output against dense before timing it. Measured on an H100
(2026-11-23, every config checked against torch first, all right): 10-25% faster than the Triton
shifts at M = 128 and 2048, within 1% at M <= 16 (so integer work is not what holds the decode
kernel at 36-58% of the copy bandwidth), and from 7% faster to 5% slower at M = 8192.
"""
from __future__ import annotations

import functools
import importlib
import os

from sparsec.codegen.spec import GATHER_APPLIES, PRMT_EXPAND_APPLIES, gathers, has_prmt_expand

LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "PRMT_EXPAND", "GATHER", "num_warps",
               "num_stages")
MAX_SPLIT_K = 16
MIN_SPLIT_BLOCKS = 4
WAVES = 2  # 4-warp programs per SM that split-K aims for (three 4-warp decode programs fit an SM's registers)


@functools.cache
def triton_installed() -> bool:
    """Whether the triton package imports here (an optional dependency: `pip install 'sparsec[triton]'`).
    Looked up once: SDGP asks in every backward."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


TRITON_MISSING = "the triton package is not installed (pip install 'sparsec[triton]', or triton>=3.0)"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: TRITON_INTERPRET read as Triton reads it (1, true,
    on or yes, any case), so that sparsec's tables and checks follow what the kernels really run on (set to
    'true', Triton interpreted while sparsec asked for TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
    except ImportError:  # (no Triton, or one from before its knobs)
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


# The conv kernel (implicit GEMM) computes each input address from image, row, column and channel,
# with image sizes the JIT cannot take as multiples of 16 (7 x 7 or 14 x 14 feature maps): more
# registers than the matmul at the same tile. Built so, the matmul's large-M tile (128 x 128 x 32,
# 8 warps) spilled on sm_80 and sm_90 (a 216-byte stack frame with fp16, 208 with int8 weights), as did
# 128 x 64 and 64 x 128 tiles over 4 warps; these two stay spill-free (codegen/aot.py checks them).
CONV_LARGE_TILES = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
                    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)]


def _tiles(m: int, n: int, act_dtype: str, conv: bool = False) -> dict:
    if act_dtype == "float32":
        # IEEE fp32 dots run on FMA units and hold [BLOCK_M, BLOCK_N, BLOCK_K] products in registers:
        # only small tiles stay spill-free.
        if m <= 16:
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=3)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if m <= 16:
        # Decode / small batch: weight bytes dominate; small tiles leave room for three programs per SM.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if conv:
        return dict(CONV_LARGE_TILES[0])
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


def prefetches(cfg: dict) -> bool:
    """Whether a 2:4 matmul launch loads each next K block by hand while it computes one (the kernel's
    PREFETCH): the CUDA-core form (BLOCK_M < 16) with num_stages > 1. Triton software-pipelines only
    loads that feed a tl.dot, so num_stages did nothing for that form."""
    return cfg["BLOCK_M"] < 16 and cfg["num_stages"] > 1


def derived_constexprs(cfg: dict, k: int) -> dict:
    """The 2:4 matmul kernel's constexprs that follow from a launch config and K: EVEN_K (K a positive multiple
    of BLOCK_K, so no per-element K bounds; K = 0 has nothing to load, and the GATHER form loads unmasked) and
    PREFETCH (`prefetches`)."""
    return {"EVEN_K": k > 0 and k % cfg["BLOCK_K"] == 0, "PREFETCH": prefetches(cfg)}


def split_k(m: int, n: int, k: int, cfg: dict, sms: int | None) -> int:
    """How many ways to split K so that about WAVES programs of 4 warps run per SM, or as many warps in
    smaller programs (1 without an SM count)."""
    if not sms:
        return 1
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    blocks_k = -(-k // cfg["BLOCK_K"])
    programs = WAVES * sms * max(1, 4 // cfg["num_warps"])
    split = 1
    while (tiles * split < programs and split * 2 <= MAX_SPLIT_K
           and blocks_k // (split * 2) >= MIN_SPLIT_BLOCKS and split * 2 * 32 * m <= k):
        split *= 2
    return split


def matmul_config(m: int, n: int, k: int, act_dtype: str, sms: int | None = None, conv: bool = False) -> dict:
    """Tiles for y[M, N] = x[M, K] @ W^T (tl.dot needs every tile dimension >= 16); `sms` is the
    device's multiprocessor count (None: do not split K); conv: for the conv kernel's implicit GEMM
    (which never splits K: its M, batch times output pixels, is large)."""
    if interpreting():
        # Few, large programs: the interpreter's cost is per program and per K step.
        return dict(BLOCK_M=_pow2_clamp(m, 16, 64), BLOCK_N=_pow2_clamp(n, 16, 128), BLOCK_K=_pow2_clamp(k, 16, 128),
                    GROUP_M=8, SPLIT_K=1, PRMT_EXPAND=0, GATHER=0, num_warps=4, num_stages=1)
    cfg = _tiles(m, n, act_dtype, conv)
    cfg["SPLIT_K"] = 1 if conv else split_k(m, n, k, cfg, sms)
    cfg["PRMT_EXPAND"] = cfg["GATHER"] = 0
    return {key: cfg[key] for key in LAUNCH_KEYS}


def matmul_candidates(m: int, n: int, k: int, act_dtype: str, sms: int | None, weight_dtype: str | None = None,
                      conv: bool = False) -> list[dict]:
    """The default config first, then alternatives worth timing at this shape: other spill-free
    tiles (each with its own split), other splits of the default tiles, and where the kernel has a
    PRMT_EXPAND form (spec.has_prmt_expand) each of those again with it. `weight_dtype` defaults to
    `act_dtype`; conv as for matmul_config (no split-K)."""
    sms = None if conv else sms
    base = matmul_config(m, n, k, act_dtype, sms, conv)
    if interpreting():
        tiles = []
    elif act_dtype == "float32":  # only small tiles stay spill-free (_tiles); at one row, the CUDA-core form
        tiles = ([dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=s) for s in (3, 1)]
                 if m == 1 else [])
    elif m <= 16:
        # Kept from the H100 runs: on 2026-11-23 (18 decode rows) 16x64x128 over 8 warps and the CUDA-core form
        # at BLOCK_N 64 were never within 3% of the best; on 2026-11-24 (clean L2, 12 rows) neither were
        # 16x64x64 over 6 stages, 16x64x256 over 8 warps, the 2-warp 16x128x64 and the int8-only 16x128x64 /
        # 16x256x32 tiles (1.08-1.61x the best at their best). Deeper pipelines and wider K steps won nothing:
        # every config landed within ~5% of the others, the stream held by work per weight rather than by
        # bytes in flight (bench/gpu_notes.md). What stays won or came within 3% somewhere.
        tiles = [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4),
                 dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=6),
                 # 2 warps: 6-8 bytes of shared-memory traffic per weight instead of 10.6-11.6 (every warp
                 # of a tl.dot reads the whole x tile); fastest at int8 16 x 14336 x 4096 by 5%
                 dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=2, num_stages=4)]
        if m == 1:  # the CUDA-core form (BLOCK_M < 16): no 16-row tensor-core tile for a single row; loading
            # the next K block ahead (num_stages > 1, see prefetches) or not; and where it applies its GATHER form
            tiles += [dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=s) for s in (3, 1)]
            if gathers(weight_dtype or act_dtype, act_dtype) and not conv:  # (tiles of one metadata word a thread)
                tiles += [dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=s, GATHER=1)
                          for s in (3, 1)]
                tiles.append(dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3, GATHER=1))
        if conv:  # with the conv kernel's address arithmetic 2-warp tiles spill (16 x 128 x 64 on sm_90)
            tiles = [t for t in tiles if t["num_warps"] > 2]
    elif m <= 128:
        tiles = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)]
    elif conv:
        tiles = CONV_LARGE_TILES
    else:
        tiles = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)]
    variants = [base] + [dict(t, SPLIT_K=split_k(m, n, k, t, sms), PRMT_EXPAND=0, GATHER=t.get("GATHER", 0))
                         for t in tiles]
    if base["SPLIT_K"] > 1:
        variants += [dict(base, SPLIT_K=base["SPLIT_K"] // 2), dict(base, SPLIT_K=1)]
    elif sms and m <= 64 and -(-k // base["BLOCK_K"]) // 2 >= MIN_SPLIT_BLOCKS:
        variants.append(dict(base, SPLIT_K=2))
    if has_prmt_expand(weight_dtype or act_dtype, act_dtype) and not interpreting():
        variants += [dict(cfg, PRMT_EXPAND=1) for cfg in variants if not cfg["GATHER"]]  # (GATHER expands nothing)
    unique = []
    for cfg in variants:
        cfg = {key: cfg[key] for key in LAUNCH_KEYS}
        if cfg not in unique:
            unique.append(cfg)
    return unique


# launch keys renamed since plans and model files started recording launch configs: old -> new
RENAMED_LAUNCH_KEYS = {"INT8_PRMT": "PRMT_EXPAND"}  # int8 conversion by prmt became the general prmt expansion


# launch keys added since, with the value that runs what a launch recorded without them ran
ADDED_LAUNCH_KEYS = {"GATHER": 0}


def upgrade_launch(launch):
    """A recorded launch config as this version spells it: renamed keys renamed, keys added since with the
    value that runs the kernel recorded (anything else is returned as is, for validate_launch to judge)."""
    if not isinstance(launch, dict) or "BLOCK_M" not in launch:  # (not a 2:4 launch: the CPU kernels' max_rows)
        return launch
    return {**ADDED_LAUNCH_KEYS, **{RENAMED_LAUNCH_KEYS.get(key, key): value for key, value in launch.items()}}


FORM_KEYS = ("PRMT_EXPAND", "GATHER")  # launch keys choosing a form of the 2:4 kernel, 0 or 1


def form_problem(cfg: dict, weight_dtype: str | None = None, act_dtype: str | None = None,
                 who: str = "the kernel") -> str | None:
    """Why a 2:4 launch config's forms (FORM_KEYS) cannot run (None: they can): values other than 0 / 1 (the
    kernel takes any truthy constexpr as 1: "0" ran the form), GATHER with more than one row a program or with
    PRMT_EXPAND, and, given the kernel's dtypes, a form it does not have; `who` names the kernel or layer."""
    for key in FORM_KEYS:
        if key in cfg and (type(cfg[key]) is not int or cfg[key] not in (0, 1)):
            return f"launch {key} must be 0 or 1, got {cfg[key]!r}"
    if cfg.get("GATHER") and (cfg["BLOCK_M"] != 1 or cfg.get("PRMT_EXPAND")):
        return "launch GATHER=1 takes BLOCK_M 1 (one row per program) and PRMT_EXPAND 0 (it expands nothing)"
    for key, applies, has in (("PRMT_EXPAND", PRMT_EXPAND_APPLIES, has_prmt_expand), ("GATHER", GATHER_APPLIES, gathers)):
        if cfg.get(key) and weight_dtype is not None and not has(weight_dtype, act_dtype):
            return (f"launch {key}=1 applies to {applies}; {who} has {weight_dtype} weights and {act_dtype} inputs. "
                    f"Set {key} to 0")
    return None


def validate_launch(launch: dict) -> str | None:
    """Why a plan's launch entry (a config plus the rows "M" it applies at) cannot be used; None when it can."""
    if not isinstance(launch, dict) or set(launch) != {"M", *LAUNCH_KEYS}:
        return f"a launch config needs exactly the keys {['M', *LAUNCH_KEYS]}"
    cfg = launch
    if problem := form_problem(cfg):
        return problem
    for key, value in cfg.items():
        if key not in FORM_KEYS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"launch {key} must be a positive integer, got {value!r}"
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
        if cfg[key] & (cfg[key] - 1):
            return f"launch {key} must be a power of two, got {cfg[key]}"
    if min(cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        return "BLOCK_N and BLOCK_K must be >= 16 (tl.dot's minimum; BLOCK_M under 16 selects the CUDA-core form)"
    if cfg["SPLIT_K"] > MAX_SPLIT_K:
        return f"launch SPLIT_K must be at most {MAX_SPLIT_K}, got {cfg['SPLIT_K']}"
    return None


def prune_config(r: int, k: int) -> dict:
    return dict(BLOCK_R=_pow2_clamp(r, 1, 32), BLOCK_W=_pow2_clamp(max(k // 16, 1), 1, 32 if interpreting() else 16),
                num_warps=4)


def _pow2_clamp(value: int, low: int, high: int) -> int:
    p = low
    while p < value and p < high:
        p *= 2
    return p


def condensed_config(m: int, n: int, k: int, weight_dtype: str = "float16") -> dict:
    """Tiles for the condensed (gather + reduce) kernel: a [BLOCK_M, BLOCK_N, BLOCK_J] gather per step
    holds 4096 fp32 values at most, which keeps it in registers at 4 warps; with int8 weights and one
    row, 2048 (1 x 128 x 32 spilled 16 bytes on sm_90 at a fan-in that is not a multiple of 16)."""
    block_m = _pow2_clamp(m, 1, 8)
    block_j = _pow2_clamp(k, 8, 32)
    gather = 2048 if weight_dtype == "int8" and block_m == 1 else 4096
    block_n = max(8, min(128, gather // (block_m * block_j)))
    if interpreting():
        block_n = _pow2_clamp(n, 8, 128)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j, num_warps=4)
