"""Launchers for the generated matmul kernels (2:4 matmul and conv, condensed fan-in matmul):
check inputs, allocate outputs, pick the grid, launch.

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the test path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from sparsec.codegen.cache import KernelCache
from sparsec.codegen.configs import condensed_config, derived_constexprs, form_problem, interpreting, matmul_config
from sparsec.codegen.direct_launch import DirectLaunch
from sparsec.codegen.spec import MatmulSpec
from sparsec.errors import InvalidInputError
from sparsec import shape_cache
from sparsec.shape_cache import remember


def can_run_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require_runnable(device: torch.device) -> None:
    if not can_run_on(device):
        raise RuntimeError(
            f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on the CPU interpreter (slow; "
            f"meant for tests); got a tensor on {device}. Compile with backend='torch' for plain-torch CPU execution")


_LOADED: dict[tuple, DirectLaunch] = {}  # (name, device, interpreting) -> kernel: skips hashing the source per call


def loaded_kernel(name: str, source: str, cache: KernelCache | None, device: torch.device) -> DirectLaunch:
    key = (name, device, interpreting())
    if cache is not None or key not in _LOADED:
        _LOADED[key] = DirectLaunch(getattr((cache or KernelCache()).load(name, source), name),
                                    device.index if device.type == "cuda" else None)
    return _LOADED[key]


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None,
                    bias: torch.Tensor | None, out_scale: torch.Tensor | None, spec: MatmulSpec, name: str, source: str,
                    cache: KernelCache | None = None, config: dict | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., N] = epilogue(x[..., K] @ W^T) with W given as 2:4 values + metadata; written into `out`
    ([rows, N], the kernel's output dtype) when given, e.g. a NaN-filled one to check every element is written."""
    k = x.shape[-1]
    n = values.shape[0]
    _check_24_operands(values, meta, k, f"x[..., {k}]")
    check_weight_dtype(values, spec, name)
    # (from the shape, not numel() // k: with K = 0 that was 0 rows, so nothing launched and the output
    # came back uninitialized instead of the epilogue of an empty sum)
    rows = math.prod(x.shape[:-1])
    launch = sparse24_launch(rows, n, k, spec, name, source, x.device, config, cache)
    return launch(x, values, meta, scales, bias, out_scale, out)


@dataclass(frozen=True)
class Sparse24Launch:
    """A 2:4 kernel launch at one shape with everything but its tensors worked out (kernel, config,
    grid): per-call Python time is what a single-row call waits for. Call it with the tensors."""
    kernel: object
    spec: MatmulSpec
    name: str
    n: int
    cfg: dict
    unsplit_cfg: dict
    tiles: int
    derived: dict  # constexprs that follow from the config and K (configs.derived_constexprs)

    def __call__(self, x, values, meta, scales, bias, out_scale, out=None) -> torch.Tensor:
        x2, y, whole = _rows_and_output(x, self.n, self.spec, self.name, out)
        m, n, k = x2.shape[0], self.n, x2.shape[1]
        if m == 0:
            return whole
        if m * max(x2.stride(0), y.stride(0)) + max(k, n) > MAX_OFFSET:  # (one cheap test per call: rarely true)
            rows = rows_per_launch(m, (x2.stride(0), k), (y.stride(0), n))
            if rows < m:
                for start in range(0, m, rows):
                    part = replace(self, tiles=triton_cdiv(min(rows, m - start), self.cfg["BLOCK_M"])
                                   * triton_cdiv(n, self.cfg["BLOCK_N"]))
                    part(x2[start:start + rows], values, meta, scales, bias, out_scale, y[start:start + rows])
                return whole
        values, meta = values.contiguous(), meta.contiguous()
        if values.data_ptr() % (2 * values.element_size()):
            values = values.clone()  # the kernel reads each group's two values as one aligned word
        if self.cfg["GATHER"] and (x2.data_ptr() % 8 or x2.stride(0) % 4):
            # the GATHER form reads each group's four x values as one aligned 8-byte word
            x2 = x2.clone(memory_format=torch.contiguous_format)
        cfg, partials, counts = self.cfg, values, values  # (pointer arguments the unsplit kernel never reads)
        if cfg["SPLIT_K"] > 1:
            counts = split_counters(x.device, self.tiles)
            if counts is None:
                cfg, counts = self.unsplit_cfg, values  # no counters on this stream now: run unsplit (same result)
            else:
                partials = torch.empty(cfg["SPLIT_K"], m, n, dtype=torch.float32, device=x.device)
        self.kernel[(self.tiles, cfg["SPLIT_K"])](
            x2, x2.stride(0),
            values, values.stride(0), meta, meta.stride(0),
            *_epilogue_operands(scales, bias, out_scale, values),
            y, y.stride(0),
            partials, counts,
            m, n, k,
            **self.derived, **cfg)
        return whole


_LAUNCHES: dict[tuple, Sparse24Launch] = {}

# The generated kernels compute element offsets (row * row stride + column) in int32, the type Triton
# gives integer arguments under 2^31: an operand spanning more elements wrapped them negative, which
# crashed or read and wrote other memory (x [M, K] or y [M, N] past 2^31 elements, e.g. a 128256-word
# vocabulary head at 16.7k rows). Such a call is launched in blocks of rows (conv: of images) that fit.
MAX_OFFSET = 2 ** 31 - 1


def rows_per_launch(m: int, *operands: tuple[int, int]) -> int:
    """How many of m rows one launch may cover so that every offset `row * stride + column` (column <
    width) of each operand (row stride, width) fits int32."""
    fit = m
    for stride, width in operands:
        if stride > 0 and (fit - 1) * stride + width - 1 > MAX_OFFSET:
            fit = min(fit, (MAX_OFFSET - width + 1) // stride + 1)
    if fit < 1:
        raise InvalidInputError(f"one row of these operands spans more than 2^31 elements (row widths "
                                f"{[width for _, width in operands]}), which the kernels' int32 offsets cannot address")
    return fit


def sparse24_launch(m: int, n: int, k: int, spec: MatmulSpec, name: str, source: str, device: torch.device,
                    config: dict | None = None, cache: KernelCache | None = None) -> Sparse24Launch:
    """The launch of kernel `name` for x[m, k] and 2:4 weights [n, k]: `config`, or the shape table's."""
    key = (name, m, n, k, device, interpreting(), tuple(sorted(config.items())) if config else None)
    if cache is None and key in _LAUNCHES:
        return _LAUNCHES[key]
    require_runnable(device)
    cfg = dict(config or _config(max(m, 1), n, k, spec.act_dtype, device))
    cfg.setdefault("SPLIT_K", 1)
    cfg.setdefault("GATHER", 0)
    _check_forms(cfg, spec, name)
    tiles = triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"])
    unsplit = dict(cfg, SPLIT_K=1)
    if cfg["SPLIT_K"] > 1 and (tiles > SPLIT_COUNTERS or cfg["SPLIT_K"] * m * n >= 2 ** 31):
        cfg = unsplit  # no room for this split: run unsplit (same result)
    launch = Sparse24Launch(loaded_kernel(name, source, cache, device), spec, name, n, cfg, unsplit, tiles,
                            derived_constexprs(cfg, k))
    return remember(_LAUNCHES, key, launch, shape_cache.SHARED_SHAPES_KEPT)


def _check_forms(cfg: dict, spec: MatmulSpec, name: str) -> None:
    """A config's PRMT_EXPAND and GATHER fit this kernel and where it runs."""
    cfg.setdefault("PRMT_EXPAND", 0)
    if problem := form_problem(cfg, spec.weight_dtype, spec.act_dtype, f"kernel {name}"):
        raise InvalidInputError(problem)
    if cfg["PRMT_EXPAND"] and interpreting():
        raise InvalidInputError("launch PRMT_EXPAND=1 runs inline PTX, which the Triton interpreter cannot run; "
                                "use PRMT_EXPAND=0 under TRITON_INTERPRET=1")


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's kernel size, stride, zero padding and dilation, as (height, width) pairs."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                     for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation))

    def gemm_rows(self, x: torch.Tensor) -> int:
        """Rows M of the implicit GEMM on input x [B, C, H, W]: batch times output pixels."""
        oh, ow = self.output_size(x.shape[2], x.shape[3])
        return x.shape[0] * oh * ow


def sparse24_conv2d(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None,
                    bias: torch.Tensor | None, out_scale: torch.Tensor | None, spec: MatmulSpec, name: str, source: str,
                    geometry: ConvGeometry, cache: KernelCache | None = None, config: dict | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, N, OH, OW] = epilogue(conv2d(x [B, C, H, W], W)) with W [N, C, KH, KW] given as the 2:4
    values + metadata of its rows W.reshape(N, -1), zero padding `geometry.padding` (pad x first for
    anything else); `out` as for sparse24_matmul, [B, N, OH, OW]."""
    require_runnable(x.device)
    _check_input_dtype(x, spec, name)
    if values.device != x.device:  # (as F.conv2d refuses: the kernel would read one device's addresses on the other)
        raise InvalidInputError(f"kernel {name}'s weight is on {values.device}, got an input on {x.device}")
    kh, kw = geometry.kernel
    n = values.shape[0]
    if x.dim() != 4:
        raise InvalidInputError(f"kernel {name} takes a [B, C, H, W] input, got shape {tuple(x.shape)}")
    batch, channels, h, w = x.shape
    k = channels * kh * kw
    _check_24_operands(values, meta, k, f"a {kh}x{kw} conv on {channels} channels (K = {k})")
    check_weight_dtype(values, spec, name)
    oh, ow = geometry.output_size(h, w)
    if oh < 1 or ow < 1:
        raise InvalidInputError(f"a {kh}x{kw} conv ({geometry}) leaves no output pixels on a {h}x{w} input")
    dtype = _TORCH_DTYPES[spec.out_dtype]
    if out is None:
        out = torch.empty(batch, n, oh, ow, dtype=dtype, device=x.device)
    elif out.shape != (batch, n, oh, ow) or out.dtype != dtype or out.device != x.device:
        raise InvalidInputError(f"out must be a [{batch}, {n}, {oh}, {ow}] {dtype} tensor on {x.device}; got "
                                f"{tuple(out.shape)} {out.dtype} on {out.device}")
    m = batch * oh * ow
    if m == 0:
        return out
    images = rows_per_launch(batch, (x.stride(0), _image_span(x)), (out.stride(0), _image_span(out)))
    if images < batch:  # (int32 offsets, see MAX_OFFSET)
        for start in range(0, batch, images):
            sparse24_conv2d(x[start:start + images], values, meta, scales, bias, out_scale, spec, name, source,
                            geometry, cache, config, out[start:start + images])
        return out
    cfg = dict(config or _config(m, n, k, spec.act_dtype, x.device, conv=True))
    if cfg.pop("SPLIT_K", 1) != 1:
        raise InvalidInputError(f"kernel {name} is a convolution, which does not split K; use SPLIT_K=1")
    if cfg.pop("GATHER", 0):
        raise InvalidInputError(f"kernel {name} is a convolution, which has no GATHER form (one row); use GATHER=0")
    _check_forms(cfg, spec, name)
    values, meta = values.contiguous(), meta.contiguous()
    if values.data_ptr() % (2 * values.element_size()):
        values = values.clone()  # the kernel reads each group's two values as one aligned word
    grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]),)
    loaded_kernel(name, source, cache, x.device)[grid](
        x, *x.stride(), values, values.stride(0), meta, meta.stride(0),
        *_epilogue_operands(scales, bias, out_scale, values), out, *out.stride(),
        h, w, oh, ow, m, n, k,
        KH=kh, KW=kw, STRIDE_H=geometry.stride[0], STRIDE_W=geometry.stride[1], PAD_H=geometry.padding[0],
        PAD_W=geometry.padding[1], DIL_H=geometry.dilation[0], DIL_W=geometry.dilation[1], **cfg)
    return out


def condensed_matmul(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor | None,
                     bias: torch.Tensor | None, out_scale: torch.Tensor | None, spec: MatmulSpec, name: str, source: str,
                     cache: KernelCache | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., N] = epilogue(x[..., K] @ W^T) with W condensed: values [N, k] + int32 indices [N, k];
    `out` as for sparse24_matmul."""
    require_runnable(x.device)
    n, k = values.shape
    if indices.shape != (n, k) or indices.dtype != torch.int32:
        raise InvalidInputError(f"condensed operands disagree: values {tuple(values.shape)}, indices "
                                f"{tuple(indices.shape)} {indices.dtype} (want int32 of the same shape)")
    x2, y, whole = _rows_and_output(x, n, spec, name, out)
    m = x2.shape[0]
    if m == 0:
        return whole
    if m * max(x2.stride(0), y.stride(0)) + max(x2.shape[1], n) > MAX_OFFSET:  # (int32 offsets, see MAX_OFFSET)
        rows = rows_per_launch(m, (x2.stride(0), x2.shape[1]), (y.stride(0), n))
        if rows < m:
            for start in range(0, m, rows):
                condensed_matmul(x2[start:start + rows], values, indices, scales, bias, out_scale, spec, name,
                                 source, cache, y[start:start + rows])
            return whole
    key = ("fanin", m, n, k, spec.weight_dtype, interpreting())
    cfg = _CONFIGS.get(key) or remember(_CONFIGS, key, condensed_config(m, n, k, spec.weight_dtype), shape_cache.SHARED_SHAPES_KEPT)
    values, indices = values.contiguous(), indices.contiguous()
    grid = (triton_cdiv(m, cfg["BLOCK_M"]), triton_cdiv(n, cfg["BLOCK_N"]))
    unused = values
    loaded_kernel(name, source, cache, x.device)[grid](
        x2, x2.stride(0), values, values.stride(0), indices, indices.stride(0),
        *_epilogue_operands(scales, bias, out_scale, unused), y, y.stride(0), m, n, k, **cfg)
    return whole


_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _rows_and_output(x: torch.Tensor, n: int, spec: MatmulSpec, name: str,
                     out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as [rows, K], contiguous along K as the kernels read it; the output [rows, N] the kernel writes
    (`out`, or a new empty one); and that output as x's leading dims + [N], what the caller returns. A new
    output is allocated in that shape, so the result is a tensor of its own, not a view: autograd lets
    in-place ops (relu_) follow it without a copy (see KernelForward). x must have the dtype the kernel
    was generated for."""
    _check_input_dtype(x, spec, name)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    dtype = _TORCH_DTYPES[spec.out_dtype]
    rows = x2.shape[0]
    if out is None:
        whole = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
        return x2, (whole if x.dim() == 2 else whole.view(rows, n)), whole
    if out.shape != (rows, n) or out.dtype != dtype or out.device != x.device or out.stride(1) != 1:
        raise InvalidInputError(f"out must be a [{rows}, {n}] {dtype} tensor on {x.device}, contiguous along "
                                f"its last dimension; got {tuple(out.shape)} {out.dtype} on {out.device}, "
                                f"strides {out.stride()}")
    return x2, out, (out if x.dim() == 2 else out.view(*x.shape[:-1], n))


def _image_span(t: torch.Tensor) -> int:
    """Elements from the first to the last of one image of t [B, ...]: 1 + the largest offset into t[0]."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _check_input_dtype(x: torch.Tensor, spec: MatmulSpec, name: str) -> None:
    if x.dtype != _TORCH_DTYPES[spec.act_dtype]:
        raise InvalidInputError(f"kernel {name} was generated for {spec.act_dtype} inputs, got {x.dtype}")


def check_weight_dtype(values: torch.Tensor, spec: MatmulSpec, name: str) -> None:
    """The 2:4 kernels read the values by their width (a group's two as one integer twice as wide): values
    of another dtype (a state dict of another dtype loaded with assign=True) were read as garbage, silently.
    (The fan-in kernel loads them by their own dtype and converts: any float dtype computes right there.)"""
    want = torch.int8 if spec.weight_dtype == "int8" else _TORCH_DTYPES[spec.act_dtype]
    if values.dtype != want:
        raise InvalidInputError(f"kernel {name} was generated for {spec.weight_dtype} weight values, got "
                                f"{values.dtype} (weights of another dtype loaded, by load_state_dict(assign=True)?)")


def _check_24_operands(values: torch.Tensor, meta: torch.Tensor, k: int, fits: str) -> None:
    """2:4 values [N, K/2] and metadata [N, ceil(K/16)] for a reduction of K; `fits` names what reads them."""
    n = values.shape[0]
    if values.shape != (n, k // 2) or k % 4 or meta.shape != (n, (k + 15) // 16):
        raise InvalidInputError(f"2:4 operands do not fit {fits}: values {tuple(values.shape)} (want [{n}, {k // 2}]), "
                                f"meta {tuple(meta.shape)} (want [{n}, {math.ceil(k / 16)}])")


def _epilogue_operands(scales, bias, out_scale, unused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The epilogue's pointer arguments; absent ones get a placeholder the generated code never reads."""
    return (scales if scales is not None else unused, bias if bias is not None else unused,
            out_scale if out_scale is not None else unused)


_CONFIGS: dict[tuple, dict] = {}


def _config(m: int, n: int, k: int, act_dtype: str, device: torch.device, conv: bool = False) -> dict:
    """The shape table's config, looked up once per shape; conv: for the conv kernel (never splits K)."""
    key = (m, n, k, act_dtype, interpreting(), str(device), conv)
    config = _CONFIGS.get(key)
    if config is None:
        config = remember(_CONFIGS, key, matmul_config(m, n, k, act_dtype, None if conv else sm_count(device), conv),
                          shape_cache.SHARED_SHAPES_KEPT)
    return config


def sm_count(device: torch.device) -> int | None:
    """Multiprocessors of a CUDA device (None elsewhere): split-K is sized to fill them."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


# Split-K arrival counters: one zeroed int32 buffer per (device, stream), reset by the kernel itself
# after each use, so launches need no memset and are safe to capture in CUDA graphs. One buffer per
# stream keeps concurrent launches on different streams apart; launches on one stream run in order.
SPLIT_COUNTERS = 1 << 16
_COUNTERS: dict[tuple, torch.Tensor] = {}


def split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The counters for launches on the current stream of `device`; None when a launch has more
    output tiles than there are counters, or when a CUDA graph is being captured on a stream that
    has none yet (the caller then does not split)."""
    if tiles > SPLIT_COUNTERS:
        return None
    stream = _raw_stream(device) if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # memory allocated while capturing belongs to the graph's pool: do not keep it
        _COUNTERS[key] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _raw_stream(device: torch.device) -> int:
    """The current CUDA stream's handle, the way Triton's launcher reads it (torch's raw-stream call,
    without building a torch.cuda.Stream object on every launch)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return torch.cuda.current_stream(device).cuda_stream
    return raw(device.index if device.index is not None else torch.cuda.current_device())


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)

