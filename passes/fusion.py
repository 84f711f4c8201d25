"""Rewrite: fold the elementwise ops that follow a Triton sparse layer into its kernel's epilogue.

Chain, in this order, each step optional:
    sparse matmul -> + bias -> relu | gelu | gelu_tanh | silu -> * per-channel scale -> cast
(a conv layer's chain is its activation and cast: its channels are not the last dim)
(the int8 dequant scale is part of the layer already). Views / reshapes that keep the last dim may
sit anywhere in the chain: they stay in the graph, and the steps after them move into the kernel.
A step is absorbed only when the value before it has no other user (torch.export's metadata check before
a cast reads none: it is erased with the chain), and only for a layer called from one place (the
epilogue belongs to the module, which every call site shares). Each absorbed op increments
`fused_<op>`. A bias / scale vector is copied into the layer (in the layer's dtype): only one that
nothing else in the graph reads, if trainable only one of the layer's shape and dtype, and if 0-dim only one
of the layer's dtype. A fused bias is added after the product in the layer's torch reference, as the graph did
(under autocast F.linear casts its bias; the graph's `+ vector` promotes).
"""
from __future__ import annotations

import enum
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsec.codegen.configs import interpreting
from sparsec.context import CompileContext
from sparsec.meta import get_meta, update_meta
from sparsec.passes.weight_reads import attribute
from sparsec.passes.weight_rewrites import erase_unused_reads
from sparsec.runtime.triton_linear import FusedEpilogue, TritonSparseLinear
from sparsec.symbolic_capture import own_hooks

aten = torch.ops.aten

_RELU = {torch.relu, F.relu, aten.relu.default, aten.relu_.default}
_GELU = {F.gelu, aten.gelu.default}
_SILU = {F.silu, aten.silu.default, aten.silu_.default}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_CAST_METHODS = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VIEW_FUNCTIONS = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# h.add(v) / h.mul(v), and `buffer + h` / `buffer * h`: fx records a tensor on the left as buffer.add(h)
_VECTOR_METHODS = {"add": _ADD, "mul": _MUL}
# torch.export puts a metadata check before each .to(dtype) (aten.to.dtype): a user that reads no value
# (its own users: none), so it does not keep a value from being fused; it checks the dtype the value had
# before the cast, which the kernel no longer writes, so it is erased with the chain
_METADATA_CHECKS = {aten._assert_tensor_metadata.default} if hasattr(aten, "_assert_tensor_metadata") else set()


def _activation(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> str | None:
    """Which activation `node` applies to `x`, if it is one the kernel can fuse."""
    if node.op == "call_function" and node.args[:1] == (x,):
        if node.target in _RELU:
            return "relu"       # relu / relu_ / F.relu(inplace=...)
        if node.target in _SILU:
            return "silu"       # x * sigmoid(x)
        if node.target in _GELU:  # gelu(approximate='none' | 'tanh')
            return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if node.op == "call_method" and node.target in ("relu", "relu_") and node.args[:1] == (x,):
        return "relu"           # x.relu()
    if node.op == "call_module" and node.args[:1] == (x,):
        module = gm.get_submodule(node.target)
        if own_hooks(module):  # its hooks run only where the module is called: fused, they were dropped
            return None
        if type(module) is nn.ReLU:
            return "relu"       # nn.ReLU()
        if type(module) is nn.SiLU:
            return "silu"       # nn.SiLU()
        if type(module) is nn.GELU:
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


def _vector_operand(gm: fx.GraphModule, node: fx.Node, x: fx.Node, targets: set, n: int) -> fx.Node | None:
    """The get_attr operand of `x (+|*) vector` where the vector has n (or 1) elements and leaves x's
    dtype as it is (the kernel writes the layer's dtype: a float32 bias on a float16 layer promotes the
    sum to float32 in torch, so it stays in the graph)."""
    is_method = node.op == "call_method" and _VECTOR_METHODS.get(node.target) is targets
    if not (is_method or node.op == "call_function" and node.target in targets) or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is x else node.args[0] if node.args[1] is x else None
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    value = attribute(gm, other.target)
    if not isinstance(value, torch.Tensor) or value.numel() not in (1, n) or value.dim() > 1:
        return None
    if value.dim() == 0 and value.dtype != get_meta(x).dtype:
        # torch computes `y * s` with a 0-dim s of a wider dtype unrounded on the CPU and rounded to y's dtype
        # on CUDA (2**17 is inf in float16): no one copy in the layer's dtype agrees with both
        return None
    before, after = get_meta(x).dtype, get_meta(node).dtype
    if before is None or (after or torch.result_type(torch.empty(0, dtype=before), value)) != before:
        return None
    # The layer gets a copy of the vector (in its own dtype, which its torch reference needs: F.linear
    # refuses a bias of another dtype). A copy computes what the vector did only where nothing else
    # reads it (a tied parameter's gradient would be split between the two, an in-place update of a
    # buffer missed) and, for a trainable one, where it is the layer's own shape and dtype (a trainable
    # scalar would become n independent values).
    if value.requires_grad and (value.shape != (n,) or value.dtype != before):
        return None
    if set(other.users) != {node} or _read_elsewhere(gm, other, value):
        return None
    return other


def _read_elsewhere(gm: fx.GraphModule, read: fx.Node, value: torch.Tensor) -> bool:
    """Whether the graph reads `value` anywhere but at the get_attr `read`: another get_attr of it, or a
    module the graph calls that holds it (`y + self.norm.bias` where `self.norm` also runs)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node is not read and attribute(gm, node.target) is value:
            return True
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if any(t is value for t in (*module.parameters(), *module.buffers())):
                return True
    return False


def _cast(node: fx.Node, x: fx.Node) -> torch.dtype | None:
    if node.args[:1] != (x,):
        return None
    if node.op == "call_method" and node.target in _CAST_METHODS and len(node.args) == 1:
        return _CAST_METHODS[node.target]   # x.half() / x.float() / x.bfloat16()
    if node.op == "call_method" and node.target == "to":  # x.to(dtype) / x.to(dtype=dtype)
        # only a dtype (a device or memory_format given too is a move the kernel does not make:
        # x.to("cuda", dtype=...) / x.to(device=..., dtype=...) left the output where the layer ran)
        if set(node.kwargs) - {"dtype", "non_blocking", "copy"}:
            return None
        dtype = node.kwargs["dtype"] if len(node.args) == 1 and "dtype" in node.kwargs else (
            node.args[1] if len(node.args) == 2 and "dtype" not in node.kwargs else None)
        return dtype if dtype in _KERNEL_DTYPES else None
    if node.op == "call_function" and node.target == aten._to_copy.default and set(node.kwargs) == {"dtype"}:
        return node.kwargs["dtype"] if node.kwargs["dtype"] in _KERNEL_DTYPES else None  # export's .to(dtype)
    if (node.op == "call_function" and node.target == aten.to.dtype and len(node.args) == 2
            and not set(node.kwargs) - {"non_blocking", "copy"}):
        return node.args[1] if node.args[1] in _KERNEL_DTYPES else None  # export's .to(dtype), as torch 2.13 records it
    return None


def _interpreter_truncates(dtype: torch.dtype, module: FusedEpilogue, ctx: CompileContext) -> bool:
    """Whether a fused cast to `dtype` would run in the Triton CPU interpreter and round there unlike torch:
    its float32 -> bfloat16 conversion truncates (torch rounds to nearest even; 254 of 512 outputs of a
    float32 layer differed). Such a cast stays in the graph, after the kernel; a dumped kernel (emit_only)
    is for a GPU, which rounds as torch does."""
    return (dtype == torch.bfloat16 and not ctx.options.emit_only and interpreting()
            and module.packed.dtype_probe.device.type == "cpu")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users that read node's value: all but export's metadata checks."""
    return [user for user in node.users if not (user.op == "call_function" and user.target in _METADATA_CHECKS)]


def _regroups_rows(node: fx.Node, x: fx.Node, n: int) -> bool:
    """Whether `node` is a view / reshape of x that keeps its last dim (the n features). Every epilogue
    step is per element or per feature, so it commutes with such a view (GPT-2's Conv1D ends in one)."""
    is_view = (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
    if not is_view or node.args[:1] != (x,) or any(isinstance(a, torch.dtype) for a in node.args):
        return False
    before, after = get_meta(x), get_meta(node)
    return (before.shape is not None and after.shape is not None and before.dtype == after.dtype
            and tuple(before.shape[-1:]) == (n,) == tuple(after.shape[-1:]))


def _epilogue_vector(vector: torch.Tensor, n: int, module: FusedEpilogue) -> nn.Parameter:
    """The layer's own copy of a fused bias / scale: n elements in the layer's dtype (the kernel reads
    it as float32 either way; torch's promotion of `y + vector` rounded to the layer's dtype too)."""
    copy = vector.detach().reshape(-1).expand(n).to(module.packed.dtype_probe.dtype).clone()
    return nn.Parameter(copy, requires_grad=vector.requires_grad)


class _Next(enum.IntEnum):
    """The chain's steps in their order; each may be skipped, none taken after a later one."""
    BIAS = 0
    ACTIVATION = 1
    SCALE = 2
    CAST = 3
    DONE = 4


def _fuse_chain(gm: fx.GraphModule, ctx: CompileContext, layer_node: fx.Node, module: FusedEpilogue) -> None:
    cur, absorbed, views, ops = layer_node, [], [], []
    stage = _Next.BIAS
    n = module.packed.out_features
    # A conv's output channels are dim 1, not the last dim that a vector operand or a view's
    # last-dim check refers to: only its activation and cast are taken.
    features_last = isinstance(module, TritonSparseLinear)
    while stage < _Next.DONE and len(users := _value_users(cur)) == 1:
        user = users[0]
        if features_last and _regroups_rows(user, cur, n):  # stays in the graph; the steps after it move into the kernel
            views.append(user)
            cur = user
            continue
        if not features_last and stage <= _Next.ACTIVATION:
            stage = _Next.ACTIVATION
        if stage <= _Next.BIAS and module.bias is None and (b := _vector_operand(gm, user, cur, _ADD, n)) is not None:
            vector = attribute(gm, b.target)
            module.bias = _epilogue_vector(vector, n, module)
            module.fused_bias = True
            ops.append("bias")
            stage = _Next.ACTIVATION
        elif stage <= _Next.ACTIVATION and (act := _activation(gm, user, cur)):
            module.activation = act
            ops.append(act)
            stage = _Next.SCALE
        elif stage <= _Next.SCALE and features_last and (s := _vector_operand(gm, user, cur, _MUL, n)) is not None:
            vector = attribute(gm, s.target)  # a trainable scale (LayerScale's gamma) stays a parameter, as the bias
            module.out_scale = _epilogue_vector(vector, n, module)
            ops.append("scale")
            stage = _Next.CAST
        elif (dtype := _cast(user, cur)) is not None and not _interpreter_truncates(dtype, module, ctx):
            module.out_dtype = dtype
            ops.append(f"cast:{str(dtype).removeprefix('torch.')}")
            stage = _Next.DONE
        else:
            break
        absorbed.append((user, cur))
        cur = user
    if not absorbed:
        return
    # Each absorbed op hands its users to its input, last first, so they end at the layer or a view.
    dtype = get_meta(absorbed[-1][0]).dtype
    for node in [layer_node, *views, *(node for node, _ in absorbed)]:
        for check in set(node.users) - set(_value_users(node)):
            gm.graph.erase_node(check)
    for node, source in reversed(absorbed):
        node.replace_all_uses_with(source)
    update_meta(layer_node, dtype=dtype, fused=tuple(ops))
    for view in views:
        update_meta(view, dtype=dtype)
    reads = [a for node, _ in absorbed for a in node.all_input_nodes if a.op == "get_attr"]
    for node, _ in reversed(absorbed):
        gm.graph.erase_node(node)
    erase_unused_reads(gm, reads)  # the bias / scale vectors now live in the module
    for op in ops:
        ctx.counters[f"fused_{op.split(':')[0]}"] += 1


def fuse_epilogues(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FusedEpilogue):
            sites.setdefault(node.target, []).append(node)
    for target, nodes in sites.items():
        if len(nodes) == 1:
            _fuse_chain(gm, ctx, nodes[0], gm.get_submodule(target))
    return gm
