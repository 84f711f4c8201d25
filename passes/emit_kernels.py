"""Codegen: emit one Triton kernel per distinct fused chain and attach it to the layers that run it.

Layers whose chains are the same (same dtypes, epilogue) share a kernel; its header lists them all.
Every source goes through the kernel cache: a second compile of the same model finds valid files
and writes nothing (`kernel_cache_hit`), a corrupt entry is rebuilt (`kernel_cache_corrupt`).
"""
from __future__ import annotations

import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import input_rows, update_meta
from sparsec.runtime.triton_linear import TritonSparseLinear


def emit_kernels(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    from sparsec.codegen.builder import LayerUse, emit_matmul
    from sparsec.codegen.cache import KernelCache

    groups: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), TritonSparseLinear):
            k = module.packed.reduction
            use = LayerUse(module.layer_name, input_rows(node, k), module.packed.out_features, k)
            groups.setdefault(module.spec(), []).append((node, module, use))
    modules = {m.layer_name: m for g in groups.values() for _, m, _ in g}
    cache = KernelCache()
    for spec, members in sorted(groups.items(), key=lambda item: repr(item[0])):
        uses = sorted({use for _, _, use in members}, key=lambda u: u.name)
        name, source = emit_matmul(spec, uses)
        cache.store(name, source)
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
                        "launch_config": _launch_config(modules[u.name], u)} for u in uses],
        }
    for outcome, count in cache.counters.items():
        ctx.counters[f"kernel_cache_{outcome}"] += count
    return gm


def _launch_config(module: TritonSparseLinear, use) -> dict:
    """What the layer launches with at its compiled rows: the measured config, else the shape table's
    for the layer's device."""
    from sparsec.codegen.configs import condensed_config, matmul_config
    from sparsec.codegen.launch import sm_count

    rows, spec = use.m or 1, module.spec()
    if spec.format == "fanin":
        return condensed_config(rows, use.n, module.packed.values.shape[1])
    return module.launch_config(rows) or matmul_config(rows, use.n, use.k, spec.act_dtype,
                                                       sm_count(module.packed.values.device))
