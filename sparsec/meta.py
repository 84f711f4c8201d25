"""The one metadata record sparsec writes on fx nodes: `node.meta["sparsec"]`.

Analysis passes fill it in stages (shapes, then layer facts, then eligibility, then decisions);
rewrite passes only read it. It is frozen so a pass replaces it (`update_meta`) instead of editing
a record another pass already looked at.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

META_KEY = "sparsec"


# The layer modules sparsec prunes, and the op each is in the plan.
LAYER_MODULES = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


def plain_layer_op(module: nn.Module) -> str | None:
    """The op of an nn.Linear / Conv1d / Conv2d running its class's own forward (None otherwise:
    a subclass with its own forward computes something else)."""
    for cls, op in LAYER_MODULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return op
    return None


@dataclass(frozen=True)
class ConvParams:
    """A convolution's settings, always as 2-D pairs: a conv1d runs as a conv2d of height 1, so its
    stride s is stored as (1, s), its padding p as (0, p), its dilation d as (1, d)."""
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @classmethod
    def build(cls, stride, padding, dilation, groups, padding_mode: str = "zeros", dims: int = 2) -> "ConvParams":
        """From a conv's settings as given to nn.Conv{dims}d / F.conv{dims}d: ints, or tuples of `dims` ints."""
        def pairs(value, fill: int) -> tuple[int, int]:
            value = tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims
            return value if dims == 2 else (fill, *value)
        return cls(pairs(stride, 1), padding if isinstance(padding, str) else pairs(padding, 0), pairs(dilation, 1),
                   int(groups), padding_mode)

    @classmethod
    def of_module(cls, m: nn.Module) -> "ConvParams | None":
        """A Conv1d / Conv2d module's settings (None for a Linear)."""
        if isinstance(m, nn.Linear):
            return None
        return cls.build(m.stride, m.padding, m.dilation, m.groups, m.padding_mode, dims=len(m.kernel_size))


@dataclass(frozen=True)
class LayerInfo:
    """Facts about a candidate layer, read off the graph and its weight (never decisions)."""
    name: str                   # user-facing name (module path, see passes/candidates.py)
    op: str                     # "linear" | "matmul" | "conv1d" | "conv2d"
    site: str                   # "module" (call_module) or "function" (F.linear / aten op on a parameter)
    weight_path: str            # attribute path of the weight in the graph module
    bias_path: str | None       # attribute path of the bias, if any
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    out_features: int           # rows of the [out, K] view
    reduction: int              # K: the reduction dimension the pattern groups run along
    conv: ConvParams | None = None
    trained_pattern: str | None = None   # a train=True layer's pattern: its learned mask is kept as is
    trained_module_path: str | None = None  # that layer's module: .mask() gives its mask now (original weight shape)
    data_arg: tuple[int, ...] = (0,)  # where the data operand is in a functional call's args: addmm(b, x, W): (1,),
                                      # einsum(eq, [x, W]) from torch.export: (1, 0)
    runtime_bias: bool = False  # F.linear's bias is computed at run time: the rewrite adds it after the layer
    weight_left: bool = False   # W @ x: features run along x's second-to-last dim; the rewrite runs the
                                # layer on x.mT and transposes its output back


@dataclass(frozen=True)
class Decision:
    """What the analysis chose for a layer, and why."""
    sparsity: str | None        # pattern string applied, None = dense
    quant: str | None           # None | "int8"
    grad_sparsity: str | None
    reason: str
    backend: str | None = None  # sparse layers: "torch" | "triton" | "cusparselt" | "dense" | "condensed" | "bitmask"
    launch: dict | None = None  # backend "triton", 2:4: the measured launch config and the rows "M" it is for
    mask_kept: int | None = None  # a kept learned mask's count of weights (None: the pattern's count holds)


@dataclass(frozen=True, eq=False)
class CheckpointRegion:
    """One torch.utils.checkpoint call of the traced forward: the nodes it computed carry it, and a
    train=True graph recomputes them in backward (sparsec/checkpointing.py). Compared by identity: one
    object per call, and its options may hold a context_fn that cannot be hashed."""
    index: int                                   # the call's order in the trace
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments for torch.utils.checkpoint.checkpoint


@dataclass(frozen=True)
class SparsecMeta:
    shape: tuple[int, ...] | None = None     # output shape at the example inputs
    dtype: torch.dtype | None = None
    layer: LayerInfo | None = None
    blocker: str | None = None               # why the layer cannot take the pattern (None: it can)
    decision: Decision | None = None
    fused: tuple[str, ...] = ()              # ops a rewrite folded into this node's kernel epilogue
    kernel: str | None = None                # generated kernel this node runs
    checkpoint: CheckpointRegion | None = None  # the torch.utils.checkpoint call the tracer found it in


def get_meta(node: fx.Node) -> SparsecMeta:
    return node.meta.get(META_KEY) or SparsecMeta()


def update_meta(node: fx.Node, **changes) -> SparsecMeta:
    meta = dataclasses.replace(get_meta(node), **changes)
    node.meta[META_KEY] = meta
    return meta


def data_input(node: fx.Node) -> object:
    """The activation a layer call multiplies: the first argument, but addmm's second, einsum's first
    or second operand (`LayerInfo.data_arg`); a call_module of a runtime layer always takes it first."""
    layer = get_meta(node).layer
    value: object = node.args
    for index in layer.data_arg if layer is not None and node.op != "call_module" else (0,):
        if not isinstance(value, (tuple, list)) or len(value) <= index:
            # F.linear / F.conv by keyword: the data is `input` wherever it stands (F.linear(weight=W,
            # input=x); its first keyword argument was taken, running the layer on W or on the bias)
            return node.kwargs.get("input")
        value = value[index]
    return value


def runtime_bias(node: fx.Node) -> object:
    """The bias operand of a functional linear call whose bias is computed at run time (else None)."""
    layer = get_meta(node).layer
    if layer is None or not layer.runtime_bias or node.op == "call_module":
        return None
    return node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)


def input_rows(node: fx.Node, reduction: int) -> int | None:
    """Rows of the [M, K] matrix a layer call multiplies: its data input's numel / K (None: unknown)."""
    data = data_input(node)
    shape = get_meta(data).shape if isinstance(data, fx.Node) else None
    if shape is None:
        return None
    return math.prod(shape) // reduction


def op_name(node: fx.Node) -> str:
    """A short name for what a node runs: `matmul` for operator.matmul, aten.mm.default and x.mm alike."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", None) or str(target)
    return name.split(".")[0].strip("_")


def layer_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Candidate layers by name, each with its call sites in graph order."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        layer = get_meta(node).layer
        if layer is not None:
            out.setdefault(layer.name, []).append(node)
    return out
