"""Analysis: choose what runs each sparse layer, and record why.

backend="torch"   plain-torch runtime everywhere.
backend="triton"  the generated fused kernels for every layer they cover (2:4 or constant fan-in
                  linear / matmul, 2:4 conv1d / conv2d with groups=1; float16 / bfloat16 / float32
                  weights); other sparse layers stay on torch, with the reason. Needs CUDA, or
                  TRITON_INTERPRET=1 for the CPU interpreter.
backend="auto"    on CPU: float32 / bfloat16 / float16 linear layers time their C++ kernel (condensed
                  for constant fan-in, bitmask for N:M) against a dense GEMM on the pruned weight and
                  take the faster (the kernel up to the most rows it measured faster at); every other
                  layer keeps its pruned weight dense (backend "dense"): the torch runtime would
                  rebuild that weight on every call and then run the same op, so it cannot be faster.
                  On CUDA: per layer, time the Triton kernel, cuSPARSELt (when this torch has it) and a dense
                  GEMM (cuDNN for a conv) on the pruned weight at the compiled shape, and take the
                  fastest, so a compiled layer is never slower than dense where it was compiled.
With a given plan, its `backend` entries are applied as they are.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.errors import InvalidInputError
from sparsec.meta import LayerInfo, data_input, get_meta, input_rows, layer_nodes, update_meta
from sparsec.plan import dtype_name
from sparsec.shape_cache import SHARED_SHAPES_KEPT, remember

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_NOTE = "runs a fused Triton kernel"
DIRECT_CONV_NOTE = "runs the direct sparse conv Triton kernel (CSR rows against the padded input, bias fused)"
CPU_KERNEL_PATTERNS = {"condensed": "constant fan-in", "bitmask": "N:M", "csr": "unstructured"}  # CPU kernels' patterns


def triton_note(decision) -> str:
    """The plan's note for a layer on backend "triton": unstructured layers run the direct sparse conv."""
    return DIRECT_CONV_NOTE if decision.sparsity.startswith("unstructured:") else TRITON_NOTE


def cpu_kernel_for(sparsity: str) -> str:
    """The CPU kernel that runs a linear layer of this pattern: condensed (constant fan-in), csr
    (unstructured: torch's own CSR product) or bitmask (N:M)."""
    return "condensed" if sparsity.startswith("fanin:") else "csr" if sparsity.startswith("unstructured:") else "bitmask"


def triton_blocker(layer: LayerInfo, sparsity: str, device: torch.device, runs: bool = True,
                   quant: str | None = None) -> str | None:
    """Why the generated kernel cannot run this layer (None: it can); runs=False: the kernel is only
    written (a kernel dump), so what only stops running it here does not count."""
    from sparsec.codegen.configs import TRITON_MISSING, interpreting, triton_installed

    if not triton_installed():
        return TRITON_MISSING
    unstructured = sparsity.startswith("unstructured:")
    if sparsity != "2:4" and not sparsity.startswith("fanin:") and not unstructured:
        return f"the Triton kernels cover 2:4, constant fan-in and unstructured convs only (this layer is {sparsity})"
    if unstructured and layer.op != "conv2d":
        return (f"the Triton kernel for unstructured sparsity is the direct sparse conv2d (this layer is a "
                f"{layer.op}; on the CPU backend auto measures torch's CSR product for linear layers)")
    if layer.conv is not None and sparsity != "2:4" and not unstructured:
        return f"the Triton conv kernels cover 2:4 and unstructured only (this layer is {sparsity})"
    if layer.conv is not None and layer.conv.groups != 1 and not unstructured:
        return (f"the Triton conv kernel covers groups=1 only (this layer has groups={layer.conv.groups}: each "
                f"output channel reads other input channels, which is not one GEMM)")
    if quant not in (None, "int8") and not unstructured:  # (the direct conv reads dequantized values)
        return f"the Triton matmul kernels read float or int8 weights (this layer stores {quant} level codes)"
    if layer.dtype not in TRITON_DTYPES:
        return f"the Triton kernel covers float16 / bfloat16 / float32 weights (this layer is {dtype_name(layer.dtype)})"
    if runs and device.type == "cpu" and interpreting() and layer.dtype == torch.bfloat16:
        return "bfloat16 tl.dot is wrong in the Triton CPU interpreter"
    return None


def cpu_kernel_blocker(layer: LayerInfo, decision, device: torch.device, need_library: bool = True) -> str | None:
    """Why no CPU kernel runs this layer here (None: one does: condensed for constant fan-in, bitmask for
    N:M, each for float32 / bfloat16 / float16 linear layers; csr for unstructured, float64 too, and on CUDA
    as well). need_library=False leaves out whether the kernel library built in this process (a layer
    without it runs plain torch)."""
    from sparsec.runtime import bitmask_cpu, condensed_cpu
    from sparsec.runtime.cpu_modules import CPU_KERNEL_MODULES

    kernel = cpu_kernel_for(decision.sparsity)
    if device.type not in CPU_KERNEL_MODULES[kernel].kernel_devices:
        return f"the {kernel} kernel runs on the CPU (this layer is on {device})"
    if layer.op not in ("linear", "matmul"):
        return f"the CPU kernels run linear layers (this one is a {layer.op})"
    dtypes = CPU_KERNEL_MODULES[kernel].kernel_dtypes
    if layer.dtype not in dtypes:
        runs = " / ".join(dtype_name(d) for d in dtypes)
        return f"the {kernel} CPU kernel runs {runs} layers (this one is {dtype_name(layer.dtype)})"
    if kernel == "bitmask" and decision.quant not in (None, "int8"):
        return f"the bitmask CPU kernel reads float or int8 values (this layer stores {decision.quant} level codes)"
    library = {"condensed": condensed_cpu, "bitmask": bitmask_cpu}.get(kernel)  # (csr: torch's own, always there)
    if need_library and library is not None and not library.is_available():
        return (f"the C++ {kernel} kernel could not be built or loaded here (no C++ "
                f"compiler, or SPARSEC_NO_CPP is set; the warning logged says which)")
    return None


def kept_dense_note(blocker: str) -> str:
    return (f"runs as a dense pruned weight (backend auto): {blocker}, and the torch runtime would rebuild the "
            f"weight on every call before running the same op, so it is never faster (backend='torch' keeps the "
            f"compressed form, at that cost)")


# CPU timings are the machine's, not the model's: measured once per layer shape (and thread count, and
# weights hot or cold) in a process, so explain() then compile(), or a test suite compiling the same model
# again, measure once and plan alike. (CUDA timings are taken again per compile: they depend on what else
# holds the GPU.) key -> ((backend, note, launch), the cache note the note quotes)
CPU_MEASUREMENTS: dict = {}


def _measured_backend(gm, ctx: CompileContext, layer: LayerInfo, decision, node: fx.Node, triton_blocker_reason,
                      device: str, cpu_cold: tuple[bool, str] | None = None):
    """backend="auto": the fastest way to run this layer, measured once per distinct shape in a
    compile (timings depend on shapes, dtypes and pattern, not on the weight values), so a 12-layer
    model with 4 layer shapes measures 4 times; on CPU once per shape in a process."""
    from sparsec.codegen.measure import pick_fastest

    m = input_rows(node, layer.reduction)
    input_shape = get_meta(data_input(node)).shape if layer.conv is not None else None
    if layer.conv is not None and input_shape is None:
        return "torch", ("backend auto times a conv layer on its input, whose shape is unknown without example "
                         "inputs; runs on the torch runtime (pass example_inputs to compile)"), None
    graph = ctx.options.timing == "graph"
    key = (device, layer.op, layer.weight_shape, layer.conv, layer.dtype, decision.sparsity, decision.quant,
           layer.bias_path is not None, input_shape or m, triton_blocker_reason, graph)
    if key not in ctx.measurements:
        # Keyed on hot / cold, not on the note saying why (it names the model's size: the same layer shape
        # in a model of another size was timed again), and the note the first model's timing quoted is
        # this model's in the result.
        cold, cache_note = cpu_cold or (False, "")
        cpu_key = (key, torch.get_num_threads(), cold)
        if device == "cpu" and cpu_key in CPU_MEASUREMENTS:
            (backend, note, launch), measured_note = CPU_MEASUREMENTS[cpu_key]
            result = (backend, note.replace(measured_note, cache_note) if measured_note else note, launch)
        else:
            result = pick_fastest(gm, ctx, layer, decision, m, triton_blocker_reason, device=device,
                                  input_shape=input_shape, graph=graph, cpu_cold=cpu_cold)
            if device == "cpu":  # (bounded: a sweep over shapes and batch sizes adds one per measurement)
                remember(CPU_MEASUREMENTS, cpu_key, (result, cache_note), SHARED_SHAPES_KEPT)
        ctx.measurements[key] = (*result, layer.name)
        return _own_launch(result)
    backend, note, launch, measured_on = ctx.measurements[key]
    return _own_launch((backend, f"{note}; measured on {measured_on}, which has the same shape", launch))


def _own_launch(result):
    """result with a launch dict of its own: the stored measurement's dict became the plan's
    LayerPlan.launch, so editing one plan entry in place (plan["fc"].launch["max_rows"] = 64) changed
    every other layer of that shape and every later compile in the process that reused the measurement."""
    backend, note, launch = result
    return backend, note, dict(launch) if launch is not None else None


def _device(gm: fx.GraphModule, layer: LayerInfo) -> torch.device:
    return gm.get_parameter(layer.weight_path).device


def choose_backend(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    from sparsec.codegen.timing import release_buffers

    try:
        return _choose_backends(gm, ctx)
    finally:
        release_buffers()  # (auto's flush / eviction buffers: no use once every layer is measured)


def _given_backend(name: str, layer: LayerInfo, decision, device: torch.device):
    """(backend, note, launch) of a layer whose backend a given plan sets: checked, never measured."""
    from sparsec.codegen.launch import can_run_on

    backend = decision.backend  # the given plan decides; no measuring
    if backend == "triton":
        if problem := triton_blocker(layer, decision.sparsity, device, quant=decision.quant) or (
                None if can_run_on(device) else f"the layer is on {device} and TRITON_INTERPRET is not 1"):
            raise InvalidInputError(f"the given plan asks for backend 'triton' on layer {name!r}: {problem}")
    if backend == "cusparselt" and (decision.sparsity != "2:4" or device.type != "cuda"):
        raise InvalidInputError(f"the given plan asks for backend 'cusparselt' on layer {name!r}: it needs a "
                                f"2:4 layer on CUDA (this one is {decision.sparsity} on {device})")
    if backend in CPU_KERNEL_PATTERNS and layer.conv is not None:
        raise InvalidInputError(f"the given plan asks for backend {backend!r} on layer {name!r}: it runs "
                                f"{CPU_KERNEL_PATTERNS[backend]} linear layers only (this one is a "
                                f"{decision.sparsity} {layer.op}); set its backend to null to let sparsec choose")
    if backend in CPU_KERNEL_PATTERNS and (problem := cpu_kernel_blocker(layer, decision, device, need_library=False)):
        # (it would run the torch reference while the plan names the kernel: a float64 layer, a CUDA one)
        raise InvalidInputError(f"the given plan asks for backend {backend!r} on layer {name!r}, but {problem}; "
                                f"set its backend to null to let sparsec choose")
    note = {"torch": None, "triton": triton_note(decision)}.get(backend, f"backend {backend}, set by the given plan")
    if backend in CPU_KERNEL_PATTERNS and (problem := cpu_kernel_blocker(layer, decision, device)):
        # a plan made where the library built, applied where it does not: the layer runs the
        # kernel's plain-torch fallback (the weight rebuilt per call, 0.03-0.8x dense in the
        # README's table) while the plan named the kernel and nothing said otherwise
        note += (f", but {problem}: this layer runs the kernel's plain-torch fallback, slower than dense "
                 f"(set its backend to 'dense', or null to let sparsec choose)")
    return backend, note, decision.launch


def _choose_backends(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    from sparsec.codegen.cpu_cache import weights_from_memory
    from sparsec.codegen.launch import can_run_on

    wanted = ctx.options.backend
    if ctx.options.train:
        return gm  # training runs the torch runtime (sparsec/runtime/training.py)
    cpu_cold = None  # (cold, note) for the CPU measurements: the model's weights against the cache
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision, layer = meta.decision, meta.layer
        if decision is None or decision.sparsity is None:
            continue
        device = _device(gm, layer)
        given, chosen_again = decision.backend if ctx.options.plan is not None else None, None
        if given in CPU_KERNEL_PATTERNS and layer.conv is None and cpu_kernel_for(decision.sparsity) != given:
            # the plan's sparsity was edited after auto chose this kernel for the old pattern
            chosen_again = (f"the given plan's backend {given!r} runs {CPU_KERNEL_PATTERNS[given]} layers only, not "
                            f"{decision.sparsity}: chosen again")
            given = None
        if given is not None:
            backend, note, launch = _given_backend(name, layer, decision, device)
        elif wanted == "torch":
            backend, note, launch = "torch", None, None
        elif wanted == "auto" and device.type != "cuda":
            if (blocker := cpu_kernel_blocker(layer, decision, device)) is None:
                cpu_cold = cpu_cold or weights_from_memory(gm)
                backend, note, launch = _measured_backend(gm, ctx, layer, decision, nodes[0], None, "cpu", cpu_cold)
            else:
                backend, note, launch = "dense", kept_dense_note(blocker), None
        elif wanted == "triton":
            if not can_run_on(device) and not ctx.options.emit_only:
                raise InvalidInputError(
                    f"backend='triton' needs the model on a CUDA device, or TRITON_INTERPRET=1 to run kernels in the CPU "
                    f"interpreter (slow; for tests); layer {name!r} is on {device}. Use backend='torch' (or 'auto') on CPU")
            # (a dump runs nothing: with TRITON_INTERPRET=1 in its environment it left bf16 layers without a kernel)
            problem = triton_blocker(layer, decision.sparsity, device, runs=not ctx.options.emit_only,
                                     quant=decision.quant)
            backend, note = ("torch", f"runs on the torch runtime: {problem}") if problem else ("triton", triton_note(decision))
            launch = None
        else:  # auto on CUDA: measure
            blocker = triton_blocker(layer, decision.sparsity, device, quant=decision.quant)
            backend, note, launch = _measured_backend(gm, ctx, layer, decision, nodes[0], blocker, "cuda")
        note = "; ".join(part for part in (chosen_again, note) if part)
        reason = f"{decision.reason}; {note}" if note else decision.reason
        decision = dataclasses.replace(decision, backend=backend, reason=reason, launch=launch)
        for node in nodes:
            update_meta(node, decision=decision)
        ctx.counters[f"backend_{backend}"] += 1
    return gm
