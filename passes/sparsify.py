"""Rewrite: replace every layer the plan made sparse by a runtime module holding its packed weight.

Reads decisions from `node.meta["sparsec"]`; never decides. A `call_module` layer is swapped in
place (same module path, so the graph line stays `self.fc1(x)`); a functional one
(`F.linear(x, self.w)`, `aten.linear` from torch.export, `x @ self.w`, an einsum) becomes a
`call_module` of a new module registered at the layer's name with dots replaced (`sparse_blk_proj`);
`W @ x` becomes that call on `x.transpose(-1, -2)`, transposed back. The dense weight (and bias)
attributes the old nodes read are deleted: no dense copy stays behind.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import META_KEY, LayerInfo, SparsecMeta, data_input, get_meta, layer_nodes, runtime_bias, update_meta
from sparsec.passes.weight_reads import owner_of, reads_by_target
from sparsec.passes.weight_rewrites import erase_unused_reads, fold_shape_reads, redirect_metadata_reads
from sparsec.runtime import SparseConv1d, SparseConv2d, SparseLayer, SparseLinear
from sparsec.runtime.cpu_linear import CpuKernelLinear
from sparsec.runtime.cpu_modules import CPU_KERNEL_MODULES
from sparsec.runtime.cusparselt_linear import CusparseltLinear
from sparsec.runtime.direct_conv_layer import DirectSparseConv2d
from sparsec.runtime.packed import CSRPacked
from sparsec.runtime.triton_conv import TritonSparseConv1d, TritonSparseConv2d
from sparsec.runtime.triton_linear import TritonSparseLinear


def _set_submodule(gm: fx.GraphModule, path: str, module: torch.nn.Module) -> None:
    setattr(*owner_of(gm, path), module)


# decision.backend -> the module class running a linear / matmul layer (each class names its backend;
# a "dense" decision stores a DensePacked weight in the plain layer)
LINEAR_MODULES = {None: SparseLinear, "dense": SparseLinear,
                  **{cls.kernel_backend: cls for cls in (SparseLinear, TritonSparseLinear, CusparseltLinear,
                                                          *CPU_KERNEL_MODULES.values())}}


# (op, runs the Triton kernel) -> the module class running a convolution
CONV_MODULES = {("conv1d", False): SparseConv1d, ("conv2d", False): SparseConv2d,
                ("conv1d", True): TritonSparseConv1d, ("conv2d", True): TritonSparseConv2d}


def build_runtime_module(gm: fx.GraphModule, ctx: CompileContext, layer: LayerInfo, decision) -> SparseLayer:
    # backend "dense": measured faster than any sparse kernel at the compiled shape
    packed = ctx.packed_weight(gm, layer, decision, dense=decision.backend == "dense")
    bias = gm.get_parameter(layer.bias_path) if layer.bias_path else None
    if layer.conv is not None:
        conv_class = (DirectSparseConv2d if decision.backend == "triton" and isinstance(packed, CSRPacked)
                      else CONV_MODULES[layer.op, decision.backend == "triton"])
        module = conv_class(packed, bias, layer.weight_shape, layer.name, decision.sparsity, decision.reason, layer.conv)
    else:
        module = LINEAR_MODULES[decision.backend](packed, bias, layer.op, layer.weight_shape, layer.name,
                                                  decision.sparsity, decision.reason)
    if decision.launch is not None:
        module.launch = dict(decision.launch)
    if isinstance(module, CpuKernelLinear):
        module.build_now()
    return module


def replace_layer(gm: fx.GraphModule, name: str, nodes: list[fx.Node], module: torch.nn.Module,
                  attr_reads: dict[str, list[fx.Node]]) -> list[fx.Node]:
    """Make every call site of layer `name` call `module`. Returns the weight reads this left behind, for
    one `erase_unused_reads` after every layer is replaced (which drops the attributes only they read).

    A module layer keeps its path (the module is swapped); functional sites become call_module of
    `sparse_<name>` with the data input as the only argument. attr_reads: `reads_by_target(gm)`, gathered
    before the first layer is replaced.
    """
    module_sites = [n for n in nodes if n.op == "call_module"]
    path = module_sites[0].target if module_sites else _free_path(gm, "sparse_" + name.replace(".", "_"))
    _set_submodule(gm, path, module)
    weight_reads = []
    for node in nodes:
        if node.op == "call_module":
            if node.kwargs:  # self.fc(input=x): nn.Linear / nn.Conv2d name it `input`, the runtime layers `x`
                node.args, node.kwargs = (data_input(node),), {}
            continue
        data, bias = data_input(node), runtime_bias(node)
        weight_reads.extend(a for a in node.all_input_nodes if a is not data and a is not bias)
        swap = get_meta(node).layer.weight_left and len(get_meta(data).shape) >= 2  # W @ x = layer(x.mT).mT
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(path, (_swap_last_dims(gm, data) if swap else data,))
            replacement.meta.update(node.meta)
            if swap:
                update_meta(replacement, shape=_swapped(get_meta(node).shape))
                replacement = _swap_last_dims(gm, replacement)
            if bias is not None:  # F.linear(x, W, b) = layer(x) + b for a b computed at run time
                meta = get_meta(node)
                replacement = gm.graph.call_function(operator.add, (replacement, bias))
                replacement.meta[META_KEY] = SparsecMeta(shape=meta.shape, dtype=meta.dtype)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    # The model may read the weight's shape (the packed layer keeps it) or its dtype / device (the layer's
    # probe tensor has them, and follows .to() as the weight would).
    layer = get_meta(nodes[0]).layer
    reads = attr_reads.get(layer.weight_path, [])
    return (weight_reads + fold_shape_reads(gm, reads, layer.weight_shape, layer.dtype)
            + redirect_metadata_reads(gm, reads, f"{path}.{module.weight_probe}"))


def _free_path(gm: fx.GraphModule, path: str) -> str:
    """`path`, or `path_1`, `path_2`, ... when the graph module already has that attribute: layers
    "a.b_c" and "a_b.c" both map to sparse_a_b_c, and the model may hold a module of its own named
    sparse_w. Overwriting it made the other call sites run this layer's weight."""
    free, i = path, 0
    while hasattr(gm, free):
        i += 1
        free = f"{path}_{i}"
    return free


def _swapped(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-2] + (shape[-1], shape[-2])


def _swap_last_dims(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """`node.transpose(-1, -2)`, with its shape recorded for the passes after this one."""
    meta = get_meta(node)
    swapped = gm.graph.call_function(torch.transpose, (node, -1, -2))
    swapped.meta[META_KEY] = SparsecMeta(shape=_swapped(meta.shape), dtype=meta.dtype)
    return swapped


def sparsify_layers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    attr_reads, left = reads_by_target(gm), []
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision, layer = meta.decision, meta.layer
        if decision is None or decision.sparsity is None:
            continue
        left += replace_layer(gm, name, nodes, build_runtime_module(gm, ctx, layer, decision), attr_reads)
        ctx.masks.pop(name, None)  # the packed module holds the mask now
        ctx.counters[f"sparsified_{layer.op}"] += 1
        if decision.quant:
            ctx.counters[f"quantized_{decision.quant}"] += 1
    erase_unused_reads(gm, left)
    return gm
