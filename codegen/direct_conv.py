"""Launcher for the direct sparse conv2d kernel (templates/direct_conv2d.py.tmpl; method (d), D.3): a conv
whose weight is held as CSR rows, computed from the nonzeros against the zero-padded input, with bias and
relu fused. Same arguments and result as sparsec.direct_conv.direct_sparse_conv2d (the plain-torch form and
this kernel's oracle), plus the epilogue and launch options.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the test path).
"""
from __future__ import annotations

import functools
import hashlib

import torch

from sparsec.codegen.builder import _template, header
from sparsec.codegen.cache import KernelCache
from sparsec.codegen.configs import interpreting
from sparsec.codegen.launch import MAX_OFFSET, loaded_kernel, require_runnable, triton_cdiv
from sparsec.direct_conv import conv_shape, input_offsets
from sparsec.errors import InvalidInputError

ACTIVATIONS = (None, "relu")
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third dimensions (pixel tiles, images)


@functools.cache
def direct_conv_source() -> tuple[str, str]:
    """(kernel name, complete source). One source serves every dtype (Triton specializes on the pointers)
    and epilogue (HAS_BIAS, RELU are constexprs); the name carries a hash of the template, so an edited
    template never meets a kernel loaded from the old one under the same name."""
    template = _template("direct_conv2d.py.tmpl")
    name = f"direct_conv2d_{hashlib.sha256(template.template.encode()).hexdigest()[:8]}"
    title = "sparsec direct sparse conv2d (CSR weight, zero-padded input), fused bias and relu, pattern unstructured"
    spec = "direct conv2d; dtype from the pointers (fp16 / bf16 / fp32, fp32 accumulation); HAS_BIAS, RELU constexpr"
    return name, header(title, spec, []) + "\n" + template.substitute(name=name)


def direct_conv_config(pixels: int) -> dict:
    """Launch config for an output of `pixels` (E * F) per channel; the one place that picks it.

    GPU: a tile of up to 128 pixels (one per thread over 4 warps; fewer warps for a 7 x 7 map rather than
    idle lanes), BLOCK_J = 8 nonzeros per step, i.e. 8 gathers in flight per thread, 8 fp32 lanes of
    accumulator. Not yet timed on a GPU (no device here): a first guess, checked only to build without
    spills for sm_80 / sm_90 (tests/test_direct_conv.py). Interpreter: each loop step of each program costs
    about 1.5 ms whatever the tile, so the tiles are as large as is cheap for numpy."""
    size = 1 << max(0, pixels - 1).bit_length()  # next power of 2
    if interpreting():
        return dict(BLOCK=min(256, max(16, size)), BLOCK_J=32, num_warps=4, num_stages=1)
    block = min(128, max(32, size))
    return dict(BLOCK=block, BLOCK_J=8, num_warps=block // 32, num_stages=3)


def dtype_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the kernel cannot run inputs of `dtype` on `device` (None: it can)."""
    if dtype not in _PTR:
        return (f"the direct conv kernel takes float16 or float32 inputs (bfloat16 on a GPU), got {dtype}; use "
                f"sparsec.direct_conv.direct_sparse_conv2d for others")
    if dtype == torch.bfloat16 and device.type != "cuda":
        return ("bfloat16 kernels give wrong results in the Triton interpreter; run the kernel in float16 / float32 "
                "on the CPU, or on a CUDA device")
    return None


def direct_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                  kernel_size, activation: str | None = None, offsets: torch.Tensor | None = None,
                  config: dict | None = None, cache: KernelCache | None = None) -> torch.Tensor:
    """activation(F.conv2d(x, W, bias, stride, padding, dilation, groups)) with W [M, C/groups, *kernel_size]
    given as CSR rows (crow [M + 1], col [nnz], values [nnz]), on the direct sparse conv kernel. x [N, C, H, W]
    (or [C, H, W]) float16 or float32, bfloat16 on a GPU; padding an int, a pair, "same" or "valid";
    activation None or "relu". The output has x's dtype; products accumulate in fp32.

    offsets: the nonzeros' offsets into a padded image, `sparsec.direct_conv.input_offsets` for this input
    size (int32 or int64 [nnz]), to skip recomputing them (and re-checking the CSR arrays) on every call; they
    are trusted, not checked (that would cost a device sync per call). Without them, they are computed here
    from col. config: {"BLOCK", "BLOCK_J", "num_warps", "num_stages"} (default `direct_conv_config`)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    require_runnable(x.device)
    if activation not in ACTIVATIONS:
        raise InvalidInputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if problem := dtype_problem(x.dtype, x.device):
        raise InvalidInputError(problem)
    shape = conv_shape(x, crow, col, values, bias, kernel_size, stride, padding, dilation, groups)
    n, m, (oh, ow), (hp, wp) = shape.batch, shape.out_channels, shape.output, shape.padded
    nnz = values.numel()
    image = shape.channels * hp * wp
    if image > MAX_OFFSET or nnz > MAX_OFFSET:  # (the kernel's offsets into one image, and its loop, are int32)
        raise InvalidInputError(f"a padded image of {shape.channels} x {hp} x {wp} = {image} elements or {nnz} "
                                f"nonzeros is beyond the kernel's int32 indices (at most {MAX_OFFSET})")
    if offsets is None:
        offsets = input_offsets(crow, col, shape.c_per_group, shape.kernel, shape.padded, shape.dilation, groups)
    elif (not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64)
          or tuple(offsets.shape) != (nnz,) or offsets.device != x.device):
        raise InvalidInputError(f"offsets must be an int32 or int64 [{nnz}] tensor on {x.device} "
                                f"(sparsec.direct_conv.input_offsets), got "
                                f"{offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__}"
                                f"{tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else ''}")
    out = torch.empty(n, m, oh, ow, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch(shape.pad(x.unsqueeze(0) if shape.unbatched else x), crow.contiguous(), values.contiguous(),
                offsets.to(torch.int32).contiguous(), bias, out, shape.stride, activation, config, cache)
    return out[0] if shape.unbatched else out


def _launch(xp, crow, values, offsets, bias, out, stride, activation, config, cache) -> None:
    # The input is zero-padded in torch, once, before the launch: every nonzero then reads at one fixed
    # offset from each pixel's receptive-field start, the same for all pixels, with no bounds test per tap
    # (in the unpadded input a tap near the border falls outside and needs a mask built from its (r, s)).
    # The cost is one copy of the input, (Hp * Wp) / (H * W) of its bytes (1.3x for a 3 x 3 conv, padding 1,
    # on a 14 x 14 map), against nnz * E * F gathers in the kernel.
    n, m, oh, ow = out.shape
    has_bias = bias is not None
    if values.numel() == 0:
        # an all-zero layer: every row is empty and the kernel reads no value, but an empty tensor's pointer
        # may be null, which Triton refuses; give it one placeholder entry it never reads
        values, offsets = values.new_zeros(1), offsets.new_zeros(1)
    bias = bias.contiguous() if bias is not None else values  # (a placeholder the kernel never reads)
    cfg = dict(config or direct_conv_config(oh * ow))
    tiles = triton_cdiv(oh * ow, cfg["BLOCK"])
    if tiles > MAX_GRID_YZ:
        raise InvalidInputError(f"{oh} x {ow} output pixels make {tiles} tiles of {cfg['BLOCK']}, more than a CUDA "
                                f"grid holds ({MAX_GRID_YZ}); use a larger BLOCK")
    name, source = direct_conv_source()
    kernel = loaded_kernel(name, source, cache, xp.device)
    for first in range(0, n, MAX_GRID_YZ):  # (images on grid axis 2, at most 65535 per launch)
        images = slice(first, first + MAX_GRID_YZ)
        kernel[(m, tiles, min(MAX_GRID_YZ, n - first))](
            xp[images], xp[0].numel(), crow, values, offsets, bias, out[images], m, oh, ow, xp.shape[3],
            STRIDE_H=stride[0], STRIDE_W=stride[1], HAS_BIAS=has_bias, RELU=activation == "relu", **cfg)


# ---------------------------------------------------------------- ahead-of-time builds (sparsec.codegen.aot)

def direct_conv_signature(dtype: torch.dtype) -> dict[str, str]:
    ptr = _PTR[dtype]
    return {"xp_ptr": ptr, "image_stride": "i32", "crow_ptr": "*i64", "values_ptr": ptr, "offsets_ptr": "*i32",
            "bias_ptr": ptr, "y_ptr": ptr, "M": "i32", "OH": "i32", "OW": "i32", "Wp": "i32",
            **{key: "constexpr" for key in ("STRIDE_H", "STRIDE_W", "HAS_BIAS", "RELU", "BLOCK", "BLOCK_J")}}


# What the build check makes, per dtype and arch: the GPU configs of a 7 x 7 map (49 pixels: BLOCK 64 over
# 2 warps) and of larger ones (BLOCK 128, 4 warps), stride 1 with bias and relu (the heaviest epilogue), and
# stride 2 without either.
DIRECT_CONV_BUILDS = ((49, dict(STRIDE_H=1, STRIDE_W=1, HAS_BIAS=1, RELU=1)),
                      (196, dict(STRIDE_H=1, STRIDE_W=1, HAS_BIAS=1, RELU=1)),
                      (196, dict(STRIDE_H=2, STRIDE_W=2, HAS_BIAS=0, RELU=0)))


def build_direct_conv(capability: int, dtype: torch.dtype, pixels: int, constexprs: dict):
    """triton.compile the kernel for sm_<capability> at the GPU config for `pixels`; raises (aot.compile_for)
    on too much shared memory or a register spill. Run with TRITON_INTERPRET unset, in a process that has
    run no kernel in the interpreter (it leaves triton.language patched).

    Built unaligned (no pointer or integer marked a multiple of 16): every load of this kernel is a gather
    or starts at a row's first nonzero, and the store at a channel's pixel tile, none 16-byte aligned in
    general, so marks would only build a variant real launches do not get."""
    from sparsec.codegen.aot import compile_for

    cfg = dict(direct_conv_config(pixels))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    name, source = direct_conv_source()
    return compile_for(capability, name, source, direct_conv_signature(dtype), {**constexprs, **cfg}, warps, stages,
                       aligned=False)
