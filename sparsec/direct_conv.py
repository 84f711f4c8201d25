"""Direct sparse convolution (Park et al., ICLR 2017; method (d), D.3 in methods.md) in plain torch: the
CPU form and the oracle of the Triton kernel (sparsec.codegen.direct_conv).

The weight W [M, C/groups, R, S] is held as CSR rows [M, C/groups * R * S] (sparsec.reference.csr_compress:
crow int64 [M + 1], col int32 [nnz] ascending per row, values [nnz]). The input is zero-padded once, to
Xp [N, C, Hp, Wp]; each nonzero j at column (c, r, s) of row m reads Xp at one fixed offset

    off_j = (g * C/groups + c) * Hp * Wp + r * dil_h * Wp + s * dil_w       (g = m's group)

from the start of each output pixel's receptive field, so that

    y[n, m, e, f] = bias[m] + sum_{j in row m} val_j * Xp_flat[n, off_j + e * stride_h * Wp + f * stride_w]

an SpMM against a *virtual* im2col matrix: nothing is lowered, only nonzeros are touched, and the work is
nnz * E * F multiply-adds instead of M * C/groups * R * S * E * F.

One difference from F.conv2d on the dense weight: a pruned (absent) weight is never multiplied, so an inf or
NaN in x reaches only the outputs whose kept weights read it (the dense conv's 0 * inf = NaN spreads it to
every output whose window covers it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsec.errors import InvalidInputError
from sparsec.reference import check_csr, csr_row_index

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Gathered taps held at once by the torch form ([batch, nonzeros of a chunk, output pixels]): 2^24
# elements is 64 MiB in fp32, so a large layer is taken in chunks of nonzeros rather than all at once.
CHUNK_ELEMENTS = 1 << 24


def _pair(value, what: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if (pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or min(pair) < minimum):
        raise InvalidInputError(f"{what} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def conv_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) for F.conv2d's `padding`: an int, a pair, "valid" (none) or
    "same" (stride 1 only, as F.conv2d; an odd total pads the extra row / column at the bottom / right,
    as torch does)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise InvalidInputError(f"padding='same' needs stride 1 (as F.conv2d), got stride {stride}")
            (th, tw) = (d * (k - 1) for d, k in zip(dilation, kernel_size))
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise InvalidInputError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding", 0)
    return ph, ph, pw, pw


@dataclass(frozen=True)
class DirectConvShape:
    """A direct sparse conv's sizes, checked against its operands: input [batch, channels, H, W], weight
    [out_channels, channels / groups, *kernel], the padded input [.., *padded] and the output [.., *output]."""
    batch: int
    channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    dilation: tuple[int, int]
    padded: tuple[int, int]
    output: tuple[int, int]
    unbatched: bool  # x came as [C, H, W] (as F.conv2d accepts): the output drops the batch dim too

    @property
    def c_per_group(self) -> int:
        return self.channels // self.groups

    @property
    def k_total(self) -> int:
        """Columns of the CSR rows: C/groups * R * S."""
        return self.c_per_group * self.kernel[0] * self.kernel[1]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] zero-padded to [N, C, Hp, Wp], contiguous (NCHW: the offsets assume that layout)."""
        top, bottom, left, right = self.pads
        return F.pad(x, (left, right, top, bottom)).contiguous()


def conv_shape(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               bias: torch.Tensor | None, kernel_size, stride, padding, dilation, groups) -> DirectConvShape:
    """Check the operands of a direct sparse conv against each other (dtypes, devices, shapes; not the CSR
    contents, which `input_offsets` checks) and work out its sizes. Raises InvalidInputError naming the problem."""
    for label, t in (("x", x), ("crow", crow), ("col", col), ("values", values), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() not in (3, 4):
        raise InvalidInputError(f"x must be [N, C, H, W] (or [C, H, W]), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise InvalidInputError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if values.dtype != x.dtype:
        raise InvalidInputError(f"values ({values.dtype}) and x ({x.dtype}) must have the same dtype, as F.conv2d's "
                                f"weight and input")
    if bias is not None and bias.dtype != x.dtype:
        raise InvalidInputError(f"bias ({bias.dtype}) and x ({x.dtype}) must have the same dtype")
    for label, t in (("crow", crow), ("col", col)):
        if t.dtype not in _INDEX_DTYPES or t.dim() != 1:
            raise InvalidInputError(f"{label} must be a 1-d int32 or int64 tensor, got {t.dtype} of shape "
                                    f"{tuple(t.shape)}")
    if values.dim() != 1 or col.numel() != values.numel():
        raise InvalidInputError(f"col {tuple(col.shape)} and values {tuple(values.shape)} must both be [nnz]")
    devices = {t.device for t in (x, crow, col, values, bias) if t is not None}
    if len(devices) > 1:
        raise InvalidInputError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise InvalidInputError(f"groups must be a positive int, got {groups!r}")
    kernel = _pair(kernel_size, "kernel_size", 1)
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    pads = conv_padding(padding, kernel, stride, dilation)
    unbatched = x.dim() == 3
    batch, channels, h, w = (1, *x.shape) if unbatched else x.shape
    out_channels = crow.numel() - 1
    if out_channels < 0:
        raise InvalidInputError("crow must hold M + 1 row pointers, got an empty tensor")
    if channels % groups or out_channels % groups:
        raise InvalidInputError(f"groups={groups} must divide the input channels ({channels}) and the output "
                                f"channels ({out_channels}, from crow's {crow.numel()} entries)")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise InvalidInputError(f"bias must be [{out_channels}] (one per CSR row), got {tuple(bias.shape)}")
    padded = (h + pads[0] + pads[1], w + pads[2] + pads[3])
    output = tuple((size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(padded, kernel, stride, dilation))
    if min(output) < 1:
        raise InvalidInputError(f"a {kernel[0]}x{kernel[1]} kernel with dilation {dilation} does not fit the padded "
                                f"input {padded[0]}x{padded[1]}: output size {output[0]}x{output[1]}")
    return DirectConvShape(batch, channels, out_channels, groups, kernel, stride, pads, dilation, padded, output,
                           unbatched)


def input_offsets(crow: torch.Tensor, col: torch.Tensor, c_per_group: int, kernel_size, padded_size,
                  dilation=1, groups: int = 1) -> torch.Tensor:
    """Each nonzero's flat offset (int64 [nnz]) into one zero-padded image Xp [C, Hp, Wp], from its column
    (c, r, s) = (col // (R*S), col // S % R, col % S) of CSR rows [M, C/groups * R * S] (the weight's memory
    order): `(g * C/groups + c) * Hp * Wp + r * dil_h * Wp + s * dil_w`, g the group of its row. An output
    pixel (e, f) then reads `offset + e * stride_h * Wp + f * stride_w`. Checks the CSR arrays first
    (sparsec.reference.check_csr): a corrupt one would give offsets outside the image."""
    r, s = _pair(kernel_size, "kernel_size", 1)
    hp, wp = _pair(padded_size, "padded_size", 1)
    dil_h, dil_w = _pair(dilation, "dilation", 1)
    out = crow.numel() - 1
    if out % groups:
        raise InvalidInputError(f"groups={groups} must divide the output channels ({out})")
    check_csr(crow, col, col.numel(), out, c_per_group * r * s)
    col = col.long()
    channel, tap = col // (r * s), col % (r * s)
    offsets = channel * (hp * wp) + (tap // s) * (dil_h * wp) + (tap % s) * dil_w
    if groups > 1:
        group = csr_row_index(crow, col.numel()) // (out // groups)
        offsets += group * (c_per_group * hp * wp)
    return offsets


def pixel_offsets(output_size, stride, padded_width: int, device=None) -> torch.Tensor:
    """Where each output pixel's receptive field starts in a padded image (int64 [E * F], row-major):
    e * stride_h * Wp + f * stride_w."""
    (e, f), (sh, sw) = output_size, stride
    rows = torch.arange(e, device=device) * (sh * padded_width)
    return (rows[:, None] + torch.arange(f, device=device) * sw).reshape(-1)


def direct_sparse_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                         bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                         kernel_size) -> torch.Tensor:
    """F.conv2d(x, W, bias, stride, padding, dilation, groups) with W [M, C/groups, *kernel_size] given as CSR
    rows (crow [M + 1], col [nnz], values [nnz]), computed directly from the nonzeros (module docstring).
    x [N, C, H, W] or [C, H, W]; padding an int, a pair, "same" or "valid". 16-bit inputs accumulate in fp32
    (on CUDA through index_add_'s atomics: sums in no fixed order, run-to-run differences at rounding level).
    Bad operands raise InvalidInputError."""
    shape = conv_shape(x, crow, col, values, bias, kernel_size, stride, padding, dilation, groups)
    offsets = input_offsets(crow, col, shape.c_per_group, shape.kernel, shape.padded, shape.dilation, groups)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, m, (e, f) = shape.batch, shape.out_channels, shape.output
    pixels = e * f
    acc = torch.zeros(n, m, pixels, dtype=acc_dtype, device=x.device)
    nnz = values.numel()
    if n and m and nnz:
        xp = shape.pad(x.unsqueeze(0) if shape.unbatched else x).to(acc_dtype).reshape(n, -1)
        base = pixel_offsets(shape.output, shape.stride, shape.padded[1], x.device)
        rows = csr_row_index(crow, nnz)
        vals = values.to(acc_dtype)
        chunk = max(1, CHUNK_ELEMENTS // (n * pixels))
        for start in range(0, nnz, chunk):  # (chunks of nonzeros, to bound memory; each one vectorised)
            part = slice(start, start + chunk)
            taps = xp[:, offsets[part, None] + base[None, :]]          # [N, j, E*F]: the virtual im2col rows
            acc.index_add_(1, rows[part], taps * vals[part, None])      # into each nonzero's output channel
    if bias is not None:
        acc += bias.to(acc_dtype)[None, :, None]
    y = acc.to(x.dtype).reshape(n, m, e, f)
    return y[0] if shape.unbatched else y
