"""Analysis: choose what runs each sparse layer, and record why.

backend="torch"   plain-torch runtime everywhere (CPU default).
backend="triton"  the generated fused kernels for every layer they cover (2:4 or constant fan-in
                  linear / matmul, 2:4 conv1d / conv2d with groups=1; float16 / bfloat16 / float32
                  weights); other sparse layers stay on torch, with the reason. Needs CUDA, or
                  TRITON_INTERPRET=1 for the CPU interpreter.
backend="auto"    on CPU: constant fan-in fp32 linear layers time the condensed kernel against a dense
                  GEMM on the pruned weight and take the faster; everything else runs torch. On CUDA:
                  per layer, time the Triton kernel, cuSPARSELt (when this torch has it) and a dense
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

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_NOTE = "runs a fused Triton kernel"
AUTO_OFF_CUDA_NOTE = "runs on the torch runtime (backend 'auto' off CUDA; the Triton kernels need a GPU)"


def triton_blocker(layer: LayerInfo, sparsity: str, device: torch.device) -> str | None:
    """Why the generated kernel cannot run this layer (None: it can)."""
    from sparsec.codegen.configs import interpreting

    if sparsity != "2:4" and not sparsity.startswith("fanin:"):
        return f"the Triton kernels cover 2:4 and constant fan-in only (this layer is {sparsity})"
    if layer.conv is not None and sparsity != "2:4":
        return f"the Triton conv kernel covers 2:4 only (this layer is {sparsity})"
    if layer.conv is not None and layer.conv.groups != 1:
        return (f"the Triton conv kernel covers groups=1 only (this layer has groups={layer.conv.groups}: each "
                f"output channel reads other input channels, which is not one GEMM)")
    if layer.dtype not in TRITON_DTYPES:
        return f"the Triton kernel covers float16 / bfloat16 / float32 weights (this layer is {dtype_name(layer.dtype)})"
    if device.type == "cpu" and interpreting() and layer.dtype == torch.bfloat16:
        return "bfloat16 tl.dot is wrong in the Triton CPU interpreter"
    return None


def _condensed_candidate(layer: LayerInfo, decision) -> bool:
    """A constant fan-in fp32 linear layer, where this machine has the CPU condensed kernel."""
    from sparsec.runtime import condensed_cpu

    return (decision.sparsity.startswith("fanin:") and layer.op in ("linear", "matmul")
            and layer.dtype == torch.float32 and condensed_cpu.is_available())


def _measured(gm, ctx: CompileContext, layer: LayerInfo, decision, node: fx.Node, triton_problem, device: str):
    """backend="auto": the fastest way to run this layer, measured once per distinct shape in a
    compile (timings depend on shapes, dtypes and pattern, not on the weight values), so a 12-layer
    model with 4 layer shapes measures 4 times."""
    from sparsec.codegen.measure import pick_fastest

    m = input_rows(node, layer.reduction)
    input_shape = get_meta(data_input(node)).shape if layer.conv is not None else None
    if layer.conv is not None and input_shape is None:
        return "torch", ("backend auto times a conv layer on its input, whose shape is unknown without example "
                         "inputs; runs on the torch runtime (pass example_inputs to compile)"), None
    graph = ctx.options.timing == "graph"
    key = (device, layer.op, layer.weight_shape, layer.conv, layer.dtype, decision.sparsity, decision.quant,
           layer.bias_path is not None, input_shape or m, triton_problem, graph)
    if key not in ctx.measurements:
        ctx.measurements[key] = (*pick_fastest(gm, ctx, layer, decision, m, triton_problem, device=device,
                                               input_shape=input_shape, graph=graph), layer.name)
        return ctx.measurements[key][:3]
    backend, note, launch, measured_on = ctx.measurements[key]
    return backend, f"{note}; measured on {measured_on}, which has the same shape", launch


def _device(gm: fx.GraphModule, layer: LayerInfo) -> torch.device:
    return gm.get_parameter(layer.weight_path).device


def choose_backend(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    from sparsec.codegen.launch import can_run_on

    wanted = ctx.options.backend
    if ctx.options.train:
        return gm  # training runs the torch runtime (sparsec/runtime/training.py)
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision, layer = meta.decision, meta.layer
        if decision is None or decision.sparsity is None:
            continue
        device = _device(gm, layer)
        if ctx.options.plan is not None and decision.backend is not None:
            backend = decision.backend  # the given plan decides; no measuring
            if backend == "triton":
                if problem := triton_blocker(layer, decision.sparsity, device) or (
                        None if can_run_on(device) else f"the layer is on {device} and TRITON_INTERPRET is not 1"):
                    raise InvalidInputError(f"the given plan asks for backend 'triton' on layer {name!r}: {problem}")
            if backend == "cusparselt" and (decision.sparsity != "2:4" or device.type != "cuda"):
                raise InvalidInputError(f"the given plan asks for backend 'cusparselt' on layer {name!r}: it needs a "
                                        f"2:4 layer on CUDA (this one is {decision.sparsity} on {device})")
            if backend == "condensed" and not (decision.sparsity.startswith("fanin:") and layer.conv is None):
                raise InvalidInputError(f"the given plan asks for backend 'condensed' on layer {name!r}: it runs "
                                        f"constant fan-in linear layers only (this one is {decision.sparsity} "
                                        f"{layer.op}); set its backend to null to let sparsec choose")
            note = {"torch": None, "triton": TRITON_NOTE}.get(backend, f"backend {backend}, set by the given plan")
            launch = decision.launch
        elif wanted == "auto" and device.type == "cpu" and _condensed_candidate(layer, decision):
            backend, note, launch = _measured(gm, ctx, layer, decision, nodes[0], None, "cpu")
        elif wanted == "torch":
            backend, note, launch = "torch", None, None
        elif wanted == "auto" and device.type != "cuda":
            backend, note, launch = "torch", AUTO_OFF_CUDA_NOTE, None
        elif wanted == "triton":
            if not can_run_on(device) and not ctx.options.emit_only:
                raise InvalidInputError(
                    f"backend='triton' needs the model on a CUDA device, or TRITON_INTERPRET=1 to run kernels in the CPU "
                    f"interpreter (slow; for tests); layer {name!r} is on {device}. Use backend='torch' (or 'auto') on CPU")
            problem = triton_blocker(layer, decision.sparsity, device)
            backend, note = ("torch", f"runs on the torch runtime: {problem}") if problem else ("triton", TRITON_NOTE)
            launch = None
        else:  # auto on CUDA: measure
            backend, note, launch = _measured(gm, ctx, layer, decision, nodes[0],
                                              triton_blocker(layer, decision.sparsity, device), "cuda")
        reason = f"{decision.reason}; {note}" if note else decision.reason
        decision = dataclasses.replace(decision, backend=backend, reason=reason, launch=launch)
        for node in nodes:
            update_meta(node, decision=decision)
        ctx.counters[f"backend_{backend}"] += 1
    return gm
