"""backend="auto": time each way to run a sparse layer at its compiled shape, keep the fastest.

CUDA: the generated Triton kernel, torch's semi-structured GEMM (cuSPARSELt / CUTLASS), cuSPARSE's CSR
product for an unstructured layer (the direct sparse conv kernel for an unstructured conv), and a
dense cuBLAS GEMM on the pruned weight; medians of CUDA-event timings of eager calls (what the
compiled model's caller waits) after warm-up, or with compile's timing="graph" of CUDA graph replays
(GPU time only), each after an L2 flush that leaves the cache clean (weights from device memory),
the candidates taking turns.
CPU, float32 / bfloat16 / float16 linear layers: the C++ kernel (condensed for constant fan-in,
bitmask for N:M; torch's CSR product for unstructured, float64 too) against a dense GEMM on the pruned weight; medians of wall-clock blocks, or, when the model's weights exceed
the cache, of single calls with the weights evicted (codegen/cpu_cache.py). Where the kernel wins,
it is probed at more rows, and its layer runs a dense weight made per call above the last win.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch
import torch.nn.functional as F

from sparsec.codegen.configs import prefetches
from sparsec.codegen.timing import CPU_BLOCKS, CPU_ROUNDS, ROUNDS, time_cpu, time_cuda, timed_in_rounds
from sparsec.errors import last_line
from sparsec.patterns import Unstructured, parse_pattern

DEFAULT_ROWS = 16  # when no example inputs give the real M


def _layer_operands(gm, layer):
    """(weight, bias) of a layer, detached."""
    weight = gm.get_parameter(layer.weight_path).detach()
    bias = gm.get_parameter(layer.bias_path).detach() if layer.bias_path else None
    return weight, bias


@dataclasses.dataclass(eq=False)
class KernelCall:
    """A Triton candidate: run(out=None) computes the layer, writing into `out` when given (the
    NaN-poisoned check, run_poisoned); `config` is a 2:4 kernel's launch config (None: fan-in)."""
    run: object
    config: dict | None = None

    def __call__(self, out=None):
        return self.run(out=out)


def _module_call(module, x, out=None):
    """module(x) as the compiled model calls it; with `out`, the module's kernel writing into it."""
    return module(x) if out is None else module.kernel_forward(x, out=out)


def candidates(gm, ctx, layer, decision, m: int, triton_blocker_reason: str | None) -> dict:
    """name -> callable computing the layer at M = m rows, each through the runtime module that choice
    becomes in the compiled model (passes/sparsify.py), on the same input: eager timings then include
    each module's own per-call Python, which at one row is most of what a call costs. A 2:4 Triton
    kernel gives one entry per launch config worth timing ("triton" with the shape table's config
    first, then "triton#1", ...; KernelCall.config)."""
    from sparsec.codegen.builder import LayerUse, emit_matmul
    from sparsec.codegen.configs import matmul_candidates
    from sparsec.codegen.launch import sm_count
    from sparsec.runtime.csr_linear import CsrLinear
    from sparsec.runtime.cusparselt_linear import CusparseltLinear, semi_structured_available
    from sparsec.runtime.layers import SparseLinear
    from sparsec.runtime.packed import FanInPacked
    from sparsec.runtime.triton_linear import TritonSparseLinear

    weight, bias = _layer_operands(gm, layer)
    pattern = parse_pattern(decision.sparsity)
    x = _sample_input((m, layer.reduction), weight.device, weight.dtype)

    def runtime_module(cls, packed):
        return cls(packed, bias, layer.op, layer.weight_shape, layer.name, decision.sparsity, "")

    dense = runtime_module(SparseLinear, ctx.packed_weight(gm, layer, decision, dense=True))
    out = {"dense": functools.partial(dense, x)}
    if isinstance(pattern, Unstructured) and weight.device.type in CsrLinear.kernel_devices:
        # cuSPARSE's CSR product, as its layer runs it (a dtype it lacks fails its check and is not chosen)
        csr = runtime_module(CsrLinear, ctx.packed_weight(gm, layer, decision))
        csr.build_now()
        out["csr"] = functools.partial(csr, x)
    library = (decision.sparsity == "2:4" and semi_structured_available()
               and weight.dtype in (torch.float16, torch.bfloat16))
    if triton_blocker_reason is not None and not library:
        return out
    packed = ctx.packed_weight(gm, layer, decision)
    if triton_blocker_reason is None:
        spec = runtime_module(TritonSparseLinear, packed).spec()
        name, source = emit_matmul(spec, [LayerUse(layer.name, m, layer.out_features, layer.reduction)])
        configs = ([None] if isinstance(packed, FanInPacked)
                   else matmul_candidates(m, layer.out_features, layer.reduction, spec.act_dtype,
                                          sm_count(weight.device), spec.weight_dtype))
        for i, cfg in enumerate(configs):
            kernel = runtime_module(TritonSparseLinear, packed)
            kernel.kernel_name, kernel.kernel_source = name, source
            kernel.launch = dict(cfg, M=m) if cfg else None
            out[triton_key(i)] = KernelCall(functools.partial(_module_call, kernel, x), cfg)
    if library:
        semi = runtime_module(CusparseltLinear, packed)
        try:
            semi(x)  # shapes the library refuses fail here, not while timing
            out["cusparselt"] = functools.partial(semi, x)
        except (RuntimeError, ValueError):
            pass
    return out


def conv_candidates(gm, ctx, layer, decision, input_shape: tuple[int, ...], triton_blocker_reason: str | None) -> tuple[dict, int]:
    """(name -> zero-argument callable computing the conv layer on an input of `input_shape`, the rows
    M = batch x output pixels of its implicit GEMM): dense cuDNN on the pruned weight, and the 2:4
    Triton conv kernel once per launch config worth timing (as `candidates`). Both read the input as
    the kernel does ([B, C, H, W], padded first where the kernel cannot pad)."""
    from sparsec.codegen.builder import LayerUse, emit_matmul
    from sparsec.codegen.configs import matmul_candidates
    from sparsec.codegen.launch import sparse24_conv2d
    from sparsec.runtime.packed import CSRPacked
    from sparsec.runtime.triton_conv import TritonSparseConv1d, TritonSparseConv2d

    weight, bias = _layer_operands(gm, layer)
    packed = ctx.packed_weight(gm, layer, decision)
    if isinstance(packed, CSRPacked):
        return _direct_conv_candidates(layer, decision, packed, ctx.packed_weight(gm, layer, decision, dense=True),
                                       weight, bias, input_shape, triton_blocker_reason)
    module_class = TritonSparseConv1d if layer.op == "conv1d" else TritonSparseConv2d
    module = module_class(packed, bias, tuple(weight.shape), layer.name, decision.sparsity, "", layer.conv)
    x, geometry, _ = module.kernel_input(_sample_input(input_shape, weight.device, weight.dtype))
    dense = module.effective_weight().contiguous()
    dense = dense.unsqueeze(-2) if layer.op == "conv1d" else dense  # x is [B, C, H, W] as the kernel reads it
    out = {"dense": lambda: F.conv2d(x, dense, bias, geometry.stride, geometry.padding, geometry.dilation)}
    m = geometry.gemm_rows(x)
    if triton_blocker_reason is None:
        spec = module.spec()
        name, source = emit_matmul(spec, [LayerUse(layer.name, m, layer.out_features, layer.reduction)])
        configs = matmul_candidates(m, layer.out_features, layer.reduction, spec.act_dtype, None, spec.weight_dtype,
                                    conv=True)
        for i, cfg in enumerate(configs):
            out[triton_key(i)] = KernelCall(functools.partial(sparse24_conv2d, x, packed.values, packed.meta, packed.scales,
                                                              bias, None, spec, name, source, geometry, config=cfg), cfg)
    return out, m


def _direct_conv_candidates(layer, decision, packed, dense_packed, weight, bias, input_shape,
                            triton_blocker_reason) -> tuple[dict, int]:
    """conv_candidates for an unstructured conv (conv1d: dense only, the kernel is a conv2d's): dense cuDNN on the
    pruned weight, and the direct sparse conv kernel as its layer runs it (the layer's module: its per-call
    checks and offsets lookup are what a call costs)."""
    from sparsec.runtime.direct_conv_layer import DirectSparseConv2d
    from sparsec.runtime.layers import SparseConv1d, SparseConv2d

    x = _sample_input(input_shape, weight.device, weight.dtype)
    dense = (SparseConv1d if layer.op == "conv1d" else SparseConv2d)(
        dense_packed, bias, tuple(weight.shape), layer.name, decision.sparsity, "", layer.conv)
    out = {"dense": functools.partial(dense, x)}
    if triton_blocker_reason is None:
        direct = DirectSparseConv2d(packed, bias, tuple(weight.shape), layer.name, decision.sparsity, "", layer.conv)
        out["triton"] = functools.partial(direct, x)
    with torch.no_grad():
        y = dense(x)
    # the implicit GEMM's rows, batch x output pixels, from y [B, C, *pixels] or [C, *pixels] (one pixel dim for a
    # conv1d: counting by y's rank alone took a batched conv1d's channels for pixels)
    spatial = 1 if layer.op == "conv1d" else 2
    return out, math.prod(y.shape[-spatial:]) * (y.shape[0] if y.dim() == spatial + 2 else 1)


def triton_key(i: int) -> str:
    return "triton" if i == 0 else f"triton#{i}"


def describe_launch(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} tiles, split-K {cfg['SPLIT_K']}, "
            f"{cfg['num_warps']} warps, {cfg['num_stages']} stages" + (", prmt expand" if cfg.get("PRMT_EXPAND") else "")
            + (", CUDA cores" if cfg["BLOCK_M"] < 16 else "") + (", kept values times the x they meet" if cfg.get("GATHER") else "")
            + (", next K block loaded ahead" if prefetches(cfg) else ""))


def _sample_input(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random inputs to time candidates on, from a generator of their own: compiling must not move
    the user's random stream."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, device=device, generator=generator).to(dtype)


def cpu_kernel_candidates(gm, ctx, layer, decision):
    """at(rows) -> {"dense", kernel} on `rows` input rows: a dense GEMM on the pruned weight, and the
    layer's CPU kernel, "condensed" for constant fan-in, "bitmask" for N:M, "csr" for unstructured; at(rows, above_rows=True)
    -> {kernel, "above"}: the kernel, and what its layer runs above the rows the kernel is kept for.
    Both are the runtime module the layer would become, called as the compiled model calls it, so
    what is timed is what runs: forward's checks cost a kernel layer ~13 us a call and a dense one ~4 us
    on this project's 2-core machine, more than a 64 x 64 layer's GEMM at one row (~5 us), so timing
    kernel_forward against a bare F.linear could pick a kernel layer slower than the dense one. (The
    probes above the rows compare two paths of one module, whose forward costs both the same.)"""
    from sparsec.passes.backend import cpu_kernel_for
    from sparsec.runtime.cpu_modules import CPU_KERNEL_MODULES
    from sparsec.runtime.layers import SparseLinear

    weight, bias = _layer_operands(gm, layer)
    name = cpu_kernel_for(decision.sparsity)
    cls = CPU_KERNEL_MODULES[name]
    module = cls(ctx.packed_weight(gm, layer, decision), bias, layer.op, layer.weight_shape,
                 layer.name, decision.sparsity, "")  # (no launch: the kernel at every row count)
    module.build_now()
    # what backend "dense" makes of the layer (passes/sparsify.py)
    dense = SparseLinear(ctx.packed_weight(gm, layer, decision, dense=True), bias, layer.op, layer.weight_shape,
                         layer.name, decision.sparsity, "")

    def at(m: int, above_rows: bool = False) -> dict:
        x = _sample_input((m, layer.reduction), torch.device("cpu"), layer.dtype)
        if above_rows:
            return {name: lambda: module.kernel_forward(x), "above": lambda: module.many_rows(x)}
        return {"dense": lambda: dense(x), name: lambda: module(x)}
    return at


# The CPU kernels win at few rows (they read fewer weight bytes) and can lose to a dense GEMM's
# blocking at many (on this project's 2-core machine, the condensed kernel on a 4096 x 4096 layer at 50%:
# 4.6x dense at 1 row, 1.3x at 256, 0.53x at 1024). When the kernel wins at the compiled rows, probe
# 4x, 16x, ... the rows, against what its layer would run instead (no dense copy: densify or rebuild
# the weight, then F.linear), until it loses or a call would take over PROBE_BUDGET_S.
PROBE_BUDGET_S, PROBE_MAX_ROWS = 0.05, 1 << 16


def cpu_rows_limit(at, kernel: str, rows: int, dense_s: float, cold: bool = False) -> tuple[int | None, str]:
    """(max_rows, note): the most rows the CPU kernel measured faster than its layer's way above them,
    probing upward from `rows`, where it won and a dense call took `dense_s`; None when it won up to
    PROBE_MAX_ROWS. `cold`: timed with weights from memory (time_cpu)."""
    limit, slowest = rows, dense_s
    while limit * 4 <= PROBE_MAX_ROWS:
        if 4 * slowest > PROBE_BUDGET_S:
            return limit, f"kernel up to {limit} rows (not probed further), densified weight + F.linear above"
        probe = at(limit * 4, above_rows=True)
        with torch.no_grad():
            times = {name: time_cpu(fn, block_s=0.01, blocks=3, cold=cold) for name, fn in probe.items()}
        if times[kernel] >= times["above"]:
            return limit, (f"kernel up to {limit} rows, densified weight + F.linear above (at {limit * 4} rows: "
                           f"{kernel} {1e6 * times[kernel]:.0f} us, densified {1e6 * times['above']:.0f} us)")
        limit, slowest = limit * 4, max(times.values())
    return None, f"kernel at every row count (probed up to {limit} rows)"


# How far a candidate may be from the dense result, relative to the dense result's largest magnitude:
# the same pruned (and quantized) weights, summed in another order and, for 16-bit inputs, rounded
# once to the output dtype (fp16 / bf16: 2^-11 / 2^-8 per value).
AGREEMENT = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _tf32_allowed(conv: bool) -> bool:
    """Whether torch runs this kind of dense float32 layer on TF32 tensor cores (cuDNN convs do by
    default, cuBLAS matmuls do not)."""
    return bool(torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32)


def check_candidates(options: dict, tf32: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """(wrong, failed): name -> relative error of every candidate whose output is not the dense
    candidate's within AGREEMENT, and name -> error summary of every candidate that raised. Every
    candidate is checked before it is timed, so a kernel that computes the wrong thing (a miscompiled
    launch config, a conversion the interpreter could not check, elements left unwritten) or that
    cannot run is never timed or chosen. `tf32`: the dense float32 candidate rounds its inputs to
    TF32 (torch's setting for it), so float32 outputs are held to the tolerance of that 10-bit mantissa,
    fp16's, instead of float32's: an exact float32 kernel differs from it by TF32's rounding."""
    agreement = {**AGREEMENT, torch.float32: AGREEMENT[torch.float16]} if tf32 else AGREEMENT
    with torch.no_grad():
        dense_out = options["dense"]()
        reference = dense_out.float()
        # inf / nan outputs (an inf bias, inf inputs) must be the same values at the same places; the
        # rest agree within the tolerance of their largest magnitude
        finite = reference.isfinite()
        any_finite = bool(finite.any())
        scale = max(float(reference[finite].abs().max()) if any_finite else 0.0, 1e-30)
        wrong, failed = {}, {}
        for name, fn in options.items():
            try:
                out = run_poisoned(fn, dense_out.shape, dense_out.dtype, dense_out.device)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not chosen, and is named
                failed[name] = last_line(e, 120)
                continue
            if out.shape != reference.shape:
                wrong[name] = float("inf")
                continue
            tolerance, out = agreement.get(out.dtype, 1e-2), out.float()
            if not torch.equal(out[~finite].nan_to_num(), reference[~finite].nan_to_num()) or bool(
                    out[finite].isnan().any()):
                wrong[name] = float("nan")
                continue
            error = float((out[finite] - reference[finite]).abs().max()) / scale if any_finite else 0.0
            if not error <= tolerance:
                wrong[name] = error
    return wrong, failed


def run_poisoned(fn, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """fn(), written into a NaN-filled output of this shape where fn is a kernel launcher taking `out`:
    a kernel that leaves elements unwritten then fails its check, instead of passing on what a reused
    allocation held (the caching allocator hands the last freed block of that size back, often a right
    answer)."""
    if "out" in inspect.signature(fn).parameters:
        return fn(out=torch.full(shape, float("nan"), dtype=dtype, device=device))
    return fn()


def _times_note(where: str, times: dict, best: str, launch_note: str | None, cache_note: str, wrong: dict,
                failed: dict) -> str:
    """What the plan's reason says of a measurement: every candidate's time, fastest first (the kernel
    with its launch config), the choice and its speed-up over dense, and the candidates that gave wrong
    results or did not run, by name."""
    shown = ", ".join(f"{k} {1e6 * v:.1f} us" + (f" ({launch_note})" if k == "triton" and launch_note else "")
                      for k, v in sorted(times.items(), key=lambda kv: kv[1]))
    note = f"backend auto at {where}: {shown} -> {best} ({times['dense'] / times[best]:.2f}x dense)"
    if cache_note:
        note += f", {cache_note}"
    if wrong:
        note += "; rejected for wrong results: " + ", ".join(f"{k} (error {v:.2g} of dense's largest output)"
                                                           for k, v in sorted(wrong.items()))
    if failed:
        note += "; failed to run: " + ", ".join(f"{k} ({v})" for k, v in sorted(failed.items()))
    return note


def pick_fastest(gm, ctx, layer, decision, m: int | None, triton_blocker_reason: str | None, device: str = "cuda",
                 input_shape: tuple[int, ...] | None = None, graph: bool = False, cpu_cold: tuple[bool, str] | None = None):
    """(backend, note, launch): the fastest way to run the layer at M rows (a conv layer: on an input of
    `input_shape`) among the candidates that agree with dense, a note with the times (and the
    candidates rejected or failing, by name), and for a 2:4 Triton kernel the fastest launch config
    (with "M"), else None. On CUDA each candidate is timed in eager calls, or with `graph` replayed
    from a CUDA graph (GPU time only: compile's timing="graph"). On CPU, `cpu_cold` = (cold, note) from
    cpu_cache.weights_from_memory: whether to time with the weights evicted from the caches."""
    rows = m or DEFAULT_ROWS
    cold, cache_note = cpu_cold or (False, "")
    cuda_timer = (lambda fn: time_cuda(fn, graph=True)) if graph else time_cuda
    if device == "cpu":
        at = cpu_kernel_candidates(gm, ctx, layer, decision)
        options, timer = at(rows), functools.partial(time_cpu, blocks=CPU_BLOCKS, cold=cold)
    elif input_shape is not None:  # a conv layer
        (options, rows), timer = conv_candidates(gm, ctx, layer, decision, input_shape, triton_blocker_reason), cuda_timer
        m = rows
    else:
        options, timer = candidates(gm, ctx, layer, decision, rows, triton_blocker_reason), cuda_timer
    wrong, failed = check_candidates(options, tf32=device != "cpu" and _tf32_allowed(input_shape is not None))
    checked = {name: fn for name, fn in options.items() if name not in wrong and name not in failed}
    # A 2:4 kernel comes once per launch config; its layer keeps the fastest
    kernels = ([name for name in checked if name.split("#")[0] == "triton"]
               if getattr(options.get("triton"), "config", None) is not None else [])
    by_gpu_time = device != "cpu" and not graph and len(kernels) > 1
    if by_gpu_time:
        # The configs share one host path and differ in GPU time only: eager timings of a one-row call are
        # mostly host time, and chose among them by noise (H100, 2026-11-24: split-K 1 at 48.3 us where
        # split-K 4 ran 39.7 us, 0.95x dense). Rank them by GPU time, then time the fastest eagerly
        # against the other backends.
        gpu = timed_in_rounds({name: checked[name] for name in kernels}, lambda fn: time_cuda(fn, graph=True),
                              ROUNDS, failed)
        fastest = min(gpu, key=gpu.get, default=None)
        checked = {name: fn for name, fn in checked.items() if name not in kernels or name == fastest}
    times = timed_in_rounds(checked, timer, CPU_ROUNDS if device == "cpu" else ROUNDS, failed)
    launch = None
    configs = {name: times.pop(name) for name in list(times) if name in kernels}
    if configs:
        fastest = min(configs, key=configs.get)
        times["triton"] = configs[fastest]
        launch = dict(options[fastest].config, M=rows)
    if "dense" not in times:  # dense itself did not run: nothing to compare a kernel with
        return "torch", ("backend auto could not time the dense candidate ("
                         + (failed.get("dense") or "its output was not its own") + "); runs on the torch runtime"), None
    best = min(times, key=times.get)
    configs_ran = sum(name not in failed for name in kernels)
    where = f"M={rows}" + ("" if m else " (no example inputs)")
    if device != "cpu":
        where += ", CUDA graph replays (GPU time) after an L2 flush" if graph else ", eager calls after an L2 flush"
    launch_note = (f"{describe_launch(launch)}, fastest of {configs_ran} configs" + (" by GPU time" if by_gpu_time else "")
                   if launch else None)
    note = _times_note(where, times, best, launch_note, cache_note, wrong, failed)
    if device == "cpu" and best != "dense":  # a CPU kernel (condensed, bitmask, csr): how far up in rows it wins
        max_rows, limit_note = cpu_rows_limit(at, best, rows, times["dense"], cold)
        return best, f"{note}; {limit_note}", {"max_rows": max_rows}
    if best == "csr":  # (on CUDA: no probe above the compiled rows yet; measured at M only, as the Triton kernels)
        return best, f"{note}; cuSPARSE at every row count (not probed above M={rows})", None
    return best, note, launch if best == "triton" else None
