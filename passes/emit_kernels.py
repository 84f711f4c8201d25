"""Codegen: emit one Triton kernel per distinct fused chain and attach it to the layers that run it.

Layers whose chains are the same (same dtypes, epilogue) share a kernel; its header lists them all.
Every source goes through the kernel cache: a second compile of the same model finds valid files
and writes nothing (`kernel_cache_hit`), a corrupt entry is rebuilt (`kernel_cache_corrupt`).
"""
from __future__ import annotations

import math

import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import get_meta, input_rows, update_meta
from sparsec.plan import dtype_name
from sparsec.runtime.direct_conv_layer import DirectSparseConv2d
from sparsec.runtime.triton_conv import TritonSparseConv2d
from sparsec.runtime.triton_linear import FusedEpilogue


def emit_kernels(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    from sparsec.codegen.builder import LayerUse, emit_matmul, ordered_uses
    from sparsec.codegen.cache import KernelCache

    groups: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), FusedEpilogue):
            k, n = module.packed.reduction, module.packed.out_features
            rows = _conv_rows(node, n) if isinstance(module, TritonSparseConv2d) else input_rows(node, k)
            use = LayerUse(module.layer_name, rows, n, k)
            groups.setdefault(module.spec(), []).append((node, module, use))
    modules = {m.layer_name: m for g in groups.values() for _, m, _ in g}
    for spec, members in sorted(groups.items(), key=lambda item: repr(item[0])):
        uses = ordered_uses(use for _, _, use in members)
        name, source = emit_matmul(spec, uses)
        for node, module, _ in members:
            module.kernel_name, module.kernel_source = name, source
            update_meta(node, kernel=name)
        ctx.kernels[name] = source
        ctx.kernel_manifest[name] = {
            "file": f"{name}.py",
            "pattern": spec.format,
            "dtype": spec.act_dtype,
            "weight_dtype": spec.weight_dtype,
            "out_dtype": spec.out_dtype,
            "fused_ops": spec.epilogue_ops(),
            "layers": [{"name": u.name, "M": u.m, "N": u.n, "K": u.k,
                        **_launch_config(modules[u.name], u)} for u in uses],
        }
    _emit_direct_convs(gm, ctx)
    # A kernel dump (emit_only) writes the sources where it is told and runs none: it needs no cache, and an
    # unusable one (SPARSEC_CACHE_DIR a file) failed it.
    if not ctx.options.emit_only:
        cache = KernelCache()
        for name, source in ctx.kernels.items():
            cache.store(name, source)
        for outcome, count in cache.counters.items():
            ctx.counters[f"kernel_cache_{outcome}"] += count
    return gm


def _emit_direct_convs(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """The direct sparse conv kernel (one source for every unstructured conv2d layer: dtypes and epilogue are
    specialized at launch) and its manifest entry, listing the layers it runs."""
    from sparsec.codegen.direct_conv import direct_conv_config, direct_conv_source

    uses = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), DirectSparseConv2d):
            shape = get_meta(node).shape
            pixels = None if shape is None else math.prod(shape[-2:])
            uses.append({"name": module.layer_name, "dtype": dtype_name(module.packed.dtype_probe.dtype),
                         "weight_shape": list(module.weight_shape), "nnz": module.packed.nnz,
                         "output_shape": None if shape is None else list(shape),
                         "launch_config": direct_conv_config(pixels) if pixels else None})
            update_meta(node, kernel=direct_conv_source()[0])
    if not uses:
        return
    name, source = direct_conv_source()
    ctx.kernels[name] = source
    ctx.kernel_manifest[name] = {"file": f"{name}.py", "pattern": "unstructured", "dtype": sorted({u["dtype"] for u in uses}),
                                 "fused_ops": ["bias"], "layers": sorted(uses, key=lambda u: u["name"])}


def _conv_rows(node: fx.Node, n: int) -> int | None:
    """Rows of a conv layer's implicit GEMM: batch x output pixels, from its output shape (None: unknown)."""
    shape = get_meta(node).shape
    return None if shape is None else math.prod(shape) // n


def _launch_config(module: FusedEpilogue, use) -> dict:
    """What the layer launches with at its compiled rows, and what chose it (`launch_config_for`): the
    measured config, else the shape table's for the layer's device (a conv does not split K). A dump
    made without a GPU cannot know the SM count that split-K is sized by: it says so."""
    from sparsec.codegen.configs import condensed_config, interpreting, matmul_config
    from sparsec.codegen.launch import sm_count

    rows, spec = use.m or 1, module.spec()
    if spec.format == "fanin":
        config = condensed_config(rows, use.n, module.packed.values.shape[1], spec.weight_dtype)
        return {"launch_config": config, "launch_config_for": "the shape table (any device)"}
    if (measured := module.launch_config(rows)) is not None:
        return {"launch_config": measured, "launch_config_for": f"measured by backend auto at M={rows}"}
    conv = spec.layout == "conv2d"
    sms = None if conv else sm_count(module.packed.values.device)
    config = matmul_config(rows, use.n, use.k, spec.act_dtype, sms, conv)
    if interpreting():
        basis = "the Triton CPU interpreter (few large programs; a GPU launch chooses its own)"
    elif conv:
        basis = "the shape table (any device; the conv kernel never splits K)"
    elif sms is None:
        basis = ("the shape table without a GPU (K not split; on a GPU the launch splits K by its SM count "
                 "at small M, and backend auto measures)")
    else:
        basis = f"the shape table for this GPU's {sms} SMs"
    return {"launch_config": config, "launch_config_for": basis}
