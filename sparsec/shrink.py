"""shrink: remove all-zero neurons / channels from a compiled model, keeping its outputs (FSSL step 4).

Group lasso (sparsec/group_lasso.py) drives whole rows / columns of weights to zero; `shrink` then
makes the model physically smaller. Removing output row c of a layer also removes channel c
everywhere that channel flows, so the analysis is a dependency graph (networkx) on the fx graph:

* A *channel element* is output channel i of a layer (Linear / matmul: last dim, Conv2d: dim 1).
  Each tensor value sparsec can follow carries one element per index of its channel dim.
* Channel-preserving ops pass the elements on: elementwise activations, Dropout, BatchNorm
  (its weight / bias / running stats are sliced along), a depthwise conv (groups = channels: its
  filter c, bias c and groups are sliced along; channel c out is the bias where filter c or
  input c is 0), 2-D pooling (modules and F.*pool2d), a mean over other dims, flatten (a conv channel becomes H*W
  consecutive Linear inputs; also `x.view(x.size(0), -1)`), scalar arithmetic.
* `a + b`, `a * b` (both followed) join element i of a with element i of b by a graph edge: they
  must be removed together (a residual add shares one channel set). `torch.cat` along the channel
  dim concatenates the element lists. A connected component of the graph is one *channel class*;
  the layers whose outputs it joins form a *channel space* (the unit the report prints).
* Any other use pins the elements it reads: the model output, reshape / view / transpose,
  LayerNorm, softmax, attention, an op with an operand sparsec does not follow (a model input
  in a residual add), a grouped conv other than depthwise, a layer called at several places or sharing its weight,
  and every op not listed above. Pinned channels are never removed; the report says why.

A class that is not pinned is removed when, for every layer that reads it (a *consumer*), each
input column it maps to is either all-zero (norm <= threshold), or the value it carries is a
known constant c that the consumer can absorb: c = 0, or c folded exactly into the consumer's
bias (bias += c * column sum): always for Linear, for Conv2d only without zero padding (a zero-
padded border would see 0 instead of c; reflect / replicate / circular padding copies c). The
constant comes from producers whose row is zero: such an output is the bias b everywhere, then
the chain maps it (relu(b <= 0) = 0, gelu(0) = 0, BatchNorm eval: (b - mean) / std * gamma + beta,
BatchNorm with batch statistics: beta, but only for b = 0, where the batch mean is exactly 0).
Producer rows of a removed class are dropped too: nothing reads them any more.

BatchNorm and Dropout modules compute differently in training and eval mode, so the constants are
worked out for both (the analysis runs once per mode) and a class goes only where its constants are
known in both: the shrunk model is exact in either mode, whichever it was shrunk in. The consumer's
bias takes the eval-mode fold; where training mode's differs (an all-zero channel leaves BatchNorm as
beta with batch statistics, beta - mean * gamma / sqrt(var + eps) with running ones) a TrainOffset
module after the consumer adds the difference while training (sparsec/runtime/train_offset.py).
`eval_only=True` works the constants out for eval mode alone (more goes: a constant BatchNorm input
other than 0 has no exact value under batch statistics) and fixes the result to eval mode.
A graph that fixes its mode (traced reading self.training) is worked out for that mode; modules
whose flags differ from the model's (a BatchNorm frozen in eval inside a training model) also for
the flags as they are, which must then agree with the model's mode.

Sparse layers (compile(..., train=True)) keep their structure:
* N:M weights group M consecutive inputs: input columns go only in whole aligned groups of M
  (the remaining groups, and their masks, are then unchanged); output rows are free.
* SDGP prunes the data gradient N:M along output features: output rows go only in whole aligned
  groups of M, so the backward groups the same features as before.
* Constant fan-in ("fixed" masks): rows are free, a column only if the mask keeps nothing in it
  (else some row would lose one of its k weights). SR-STE fan-in re-derives k from the shape every
  step, so such a layer is pinned.
* Every site keeps at least one channel (no zero-width layers).

`threshold` treats groups with norm <= threshold as zero: the result equals the model with exactly
the removed groups zeroed (with threshold 0 it equals the model itself, to rounding).
Packed inference models are refused: shrink first, then compile the smaller model for inference.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
import operator
import time
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sparsec.compiled import EVAL_ONLY_NOTE, CompiledModel
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.group_lasso import col_norms, row_norms
from sparsec.meta import ConvParams, data_input, get_meta, layer_nodes, plain_layer_op, update_meta
from sparsec.passes.weight_reads import attribute, erase_unused_reads, fold_shape_reads, owner_of
from sparsec.patterns import NM, FanIn
from sparsec.pipeline import PassRecord
from sparsec.reference import pattern_mask, rows_to_weight, weight_to_rows
from sparsec.runtime.layers import RuntimeLayer, explicit_padding
from sparsec.runtime.train_offset import TrainOffset
from sparsec.runtime.training import TrainableLayer

aten = torch.ops.aten

# Ops where output channel c depends only on input channel c at the same position (one tensor operand).
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.CELU,
                        nn.SELU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Softsign,
                        nn.Identity)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid,
                          F.leaky_relu, F.elu, F.celu, torch.selu, F.selu, F.hardtanh, F.hardswish, F.hardsigmoid,
                          F.mish, F.softplus, F.softsign, torch.clamp, torch.clip, torch.neg, operator.neg,
                          aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
                          aten.sigmoid.default, aten.clone.default}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clip", "neg", "contiguous", "clone"}
# Elementwise with two tensor operands (or one and a Python number).
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_PRODUCT_OPS = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d}
# 2-D pools: a constant channel stays that constant (max, adaptive) or, with padding, only 0 does (avg).
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Their functional forms, each with the position of its return_indices argument (None: it has none).
_POOL_FUNCTIONS = {F.max_pool2d: 6, F.adaptive_max_pool2d: 2, F.avg_pool2d: None, F.adaptive_avg_pool2d: None}
_HARMLESS_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad"}


# --------------------------------------------------------------------------- report


@dataclass
class SpaceReport:
    """One channel space: layers whose outputs share a channel set, and what shrink did to it.

    Channels are numbered in graph order of their producers: with one producer, channel i is its
    output i; producers joined by a residual add share the numbering of the first one."""
    producers: list[str]
    consumers: list[str]
    before: int
    after: int
    removed: list[int]
    kept: dict[str, list[int]] = field(default_factory=dict)  # reason -> channels kept for it
    feeds_output: bool = False   # the model returns these channels (so they are not hidden units)

    @property
    def name(self) -> str:
        return self.producers[0]


@dataclass
class ShrinkReport:
    spaces: list[SpaceReport]
    threshold: float

    @property
    def channels_before(self) -> int:
        return sum(s.before for s in self.spaces)

    @property
    def channels_after(self) -> int:
        return sum(s.after for s in self.spaces)

    @property
    def hidden_before(self) -> int:
        """Channels of spaces that do not reach the model output (hidden units)."""
        return sum(s.before for s in self.spaces if not s.feeds_output)

    @property
    def hidden_after(self) -> int:
        return sum(s.after for s in self.spaces if not s.feeds_output)

    def __getitem__(self, layer: str) -> SpaceReport:
        """The space a layer produces into."""
        for s in self.spaces:
            if layer in s.producers:
                return s
        raise KeyError(f"no channel space produced by {layer!r}; producers: {[p for s in self.spaces for p in s.producers]}")

    def __str__(self) -> str:
        header = ["space", "producers", "consumers", "before", "after", "removed"]
        rows = [[s.name, ",".join(s.producers), ",".join(s.consumers) or "-", str(s.before), str(s.after),
                 _ranges(s.removed) or "-"] for s in self.spaces]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [f"sparsec shrink (threshold {self.threshold:g}): hidden units {self.hidden_before} -> "
               f"{self.hidden_after}, all channels {self.channels_before} -> {self.channels_after}",
               line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
        notes = [f"  {s.name} [{_ranges(idx)}]: {why}" for s in self.spaces for why, idx in s.kept.items()]
        if notes:
            out += ["kept, and why:"] + notes
        return "\n".join(out)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


# --------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    name: str                        # plan name
    op: str                          # "linear" | "matmul" | "conv1d" | "conv2d"
    weight_path: str
    bias_path: str | None
    module: nn.Module | None         # nn.Linear / nn.Conv2d / TrainableLayer owning the weight; None: functional
    conv: ConvParams | None
    blocker: str | None = None       # why its channels cannot change at all
    depthwise: bool = False          # a conv with one filter per channel (groups = in = out channels)

    @property
    def out_dim(self) -> int:
        return 1 if self.op == "matmul" else 0

    @property
    def in_dim(self) -> int:
        return 0 if self.op == "matmul" else 1

    @property
    def spatial_dims(self) -> int:
        """Dims after the channel dim in the layer's input and output: 1 for conv1d, 2 for conv2d."""
        return {"conv1d": 1, "conv2d": 2}.get(self.op, 0)

    @property
    def trainable(self) -> TrainableLayer | None:
        return self.module if isinstance(self.module, TrainableLayer) else None

    def weight(self, gm: fx.GraphModule) -> torch.Tensor:
        return attribute(gm, self.weight_path)  # (a parametrized layer's is computed, not a Parameter)

    @torch.no_grad()
    def effective(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight the next forward computes with (SR-STE re-derives its mask from the weight)."""
        w = self.weight(gm).detach()
        t = self.trainable
        if t is None or t.weight_mask is None:
            return w
        if t.weight_update == "ste":
            return w * rows_to_weight(pattern_mask(weight_to_rows(w, t.op), t.pattern), t.op, w.shape)
        return w * t.weight_mask

    def zero_padded(self, gm: fx.GraphModule) -> bool:
        """A conv whose border outputs read zero padding (so a constant input channel is not constant there)."""
        if self.conv is None or self.conv.padding_mode != "zeros":
            return False
        return any(explicit_padding(self.conv, tuple(self.weight(gm).shape)))


def _find_layers(gm: fx.GraphModule) -> dict[fx.Node, _Layer]:
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    functional_sites = {name: len(nodes) for name, nodes in layer_nodes(gm).items()}
    owners = collections.Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
    layers = {}
    for node in gm.graph.nodes:
        layer = None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, TrainableLayer):
                layer = _Layer(m.layer_name, m.op, f"{node.target}.weight",
                               f"{node.target}.bias" if m.bias is not None else None, m, m.conv)
            elif (op := plain_layer_op(m)) is not None:
                layer = _Layer(node.target, op, f"{node.target}.weight",
                               f"{node.target}.bias" if m.bias is not None else None, m, ConvParams.of_module(m))
            if layer is not None and calls[node.target] > 1:
                layer.blocker = f"its module is called at {calls[node.target]} places"
        elif node.op == "call_function" and (info := get_meta(node).layer) is not None:
            layer = _Layer(info.name, info.op, info.weight_path, info.bias_path, None, info.conv)
            if functional_sites.get(info.name, 1) > 1:
                layer.blocker = f"it is called at {functional_sites[info.name]} places"
            elif info.runtime_bias:
                layer.blocker = "its bias is computed at run time (its length cannot change)"
            elif info.weight_left:
                layer.blocker = "it is W @ x (its features run along x's second-to-last dim)"
        if layer is None:
            continue
        paths = [layer.weight_path] + ([layer.bias_path] if layer.bias_path else [])
        computed = [path for path in paths if parametrize.is_parametrized(*owner_of(gm, path))]
        t = layer.trainable
        if computed:  # (its shape is the parametrization's to keep: weight_norm's g and v, a symmetric matrix)
            layer.blocker = f"its {computed[0].rpartition('.')[2]} is computed by a parametrization"
        elif any(owners[id(gm.get_parameter(path))] > 1 for path in paths):
            layer.blocker = "its weight is shared with another module"
        elif layer.conv is not None and layer.conv.groups != 1 and not _one_filter_per_channel(gm, layer):
            layer.blocker = f"grouped conv (groups={layer.conv.groups}), not handled (depthwise convs are)"
        elif t is not None and isinstance(t.pattern, FanIn) and t.weight_update == "ste":
            layer.blocker = "SR-STE fan-in re-derives k from the weight shape every step"
        elif get_meta(node).shape is None:
            layer.blocker = "its output shape is unknown (no shape metadata)"
        # channel c in, channel c out: passed through like BatchNorm (see _Analysis.depthwise)
        layer.depthwise = layer.blocker is None and layer.conv is not None and layer.conv.groups != 1
        layers[node] = layer
    return layers


def _one_filter_per_channel(gm: fx.GraphModule, layer: _Layer) -> bool:
    """A depthwise conv (groups = in = out channels), held by a module whose groups shrink can set."""
    w = layer.weight(gm)
    return w.shape[0] == layer.conv.groups and w.shape[1] == 1 and layer.module is not None


# --------------------------------------------------------------------------- channel analysis


@dataclass(frozen=True)
class _Value:
    """What sparsec knows about a tensor's channel dim."""
    elems: tuple[int, ...]             # channel element at each index of the channel dim
    consts: tuple[float | None, ...]   # that channel's value when it is the same everywhere, else None
    dim: int                           # which dim is the channel dim (non-negative)
    ndim: int


@dataclass
class _Site:
    """A place whose parameters are indexed by channel: a producer's output rows, a consumer's input
    columns, a BatchNorm's features."""
    kind: str                  # "producer" | "consumer" | "batchnorm" | "depthwise" | "offset" (TrainOffset)
    name: str                  # layer name or module path
    node: fx.Node
    value: _Value
    layer: _Layer | None = None


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", None) or str(node.target)


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analysis:
    """Channel elements, their constants and the sites indexed by them, for one mode: `mode` True /
    False treats every module as training / in eval, None takes each module's flag as it is."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, _Layer], threshold: float, ragged_fanin: bool = False,
                 mode: bool | None = None):
        self.gm, self.layers, self.threshold, self.ragged_fanin, self.mode = gm, layers, threshold, ragged_fanin, mode
        self.graph = nx.Graph()                     # channel elements; an edge joins two that go together
        self.origin: list[tuple[str, int]] = []     # element -> (producing layer, output index)
        self.values: dict[fx.Node, _Value] = {}
        self.pins: dict[int, str] = {}              # element -> why it cannot be removed
        self.sites: list[_Site] = []
        self.output_elems: set[int] = set()          # elements the model returns
        self.module_calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for node in gm.graph.nodes:
            self.visit(node)

    # ---- helpers

    def training(self, m: nn.Module) -> bool:
        return m.training if self.mode is None else self.mode

    def pin(self, value: _Value, why: str) -> None:
        for e in value.elems:
            self.pins.setdefault(e, f"channel space of {self.origin[e][0]} {why}")

    def pin_inputs(self, node: fx.Node, what: str | None = None) -> None:
        what = what or _op_name(node, self.gm)
        for x in node.all_input_nodes:
            if x in self.values:
                self.pin(self.values[x], f"feeds {what} at node {node.name}")

    def consts(self, node: fx.Node, operands: list[fx.Node]) -> tuple[float | None, ...]:
        """Run `node` on the constant channels of its tracked operands (1-D tensors, one entry per channel)."""
        length = len(self.values[operands[0]].elems)
        known = [i for i in range(length) if all(self.values[x].consts[i] is not None for x in operands)]
        out: list[float | None] = [None] * length
        if not known:
            return tuple(out)
        dtype = get_meta(node).dtype or torch.float32
        tensors = {x: torch.tensor([self.values[x].consts[i] for i in known], dtype=dtype) for x in operands}
        args = fx.node.map_arg(node.args, lambda n: tensors[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: tensors[n])
        try:
            with torch.no_grad():
                if node.op == "call_module":
                    result = self.gm.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    result = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that will not run on this stand-in: no constants, no harm
            return tuple(out)
        if not isinstance(result, torch.Tensor) or result.shape != (len(known),):
            return tuple(out)
        for i, v in zip(known, result.tolist()):
            out[i] = v if math.isfinite(v) else None
        return tuple(out)

    def passthrough(self, node: fx.Node, x: fx.Node, consts: tuple[float | None, ...]) -> None:
        self.values[node] = dataclasses.replace(self.values[x], consts=consts)
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.kwargs.get("inplace") or getattr(module, "inplace", False):
            self.values[x] = self.values[node]  # x itself now holds the new values, for its later readers

    # ---- visiting

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            return
        if node.op == "output":
            self.pin_inputs(node, "the model output")
            self.output_elems = {e for x in node.all_input_nodes if x in self.values for e in self.values[x].elems}
            return
        if node in self.layers:
            self.visit_layer(node, self.layers[node])
            return
        tracked = [x for x in node.all_input_nodes if x in self.values]
        if not tracked:
            return  # nothing sparsec follows goes in, so nothing comes out
        if node.op == "call_module":
            self.visit_module(node, self.gm.get_submodule(node.target))
        else:
            self.visit_function(node, tracked)

    def visit_layer(self, node: fx.Node, layer: _Layer) -> None:
        x = data_input(node)
        v = self.values.get(x)
        weight = layer.weight(self.gm)
        if layer.depthwise:
            if v is not None and v.dim == v.ndim - 1 - layer.spatial_dims and len(v.elems) == weight.shape[0]:
                self.depthwise(node, v, layer)
                return
            layer.blocker = "a depthwise conv whose input channels shrink does not follow"
        if v is not None:
            want = v.ndim - 1 - layer.spatial_dims
            if layer.blocker:
                self.pin(v, f"feeds {layer.name} ({layer.blocker}) at node {node.name}")
            elif v.dim != want or len(v.elems) != weight.shape[layer.in_dim]:
                self.pin(v, f"feeds {layer.name} along a dim that is not its input features at node {node.name}")
            else:
                self.sites.append(_Site("consumer", layer.name, node, v, layer))
        out = weight.shape[layer.out_dim]
        shape = get_meta(node).shape
        ndim = len(shape) if shape is not None else 2 + layer.spatial_dims
        elems = tuple(range(len(self.origin), len(self.origin) + out))
        self.origin += [(layer.name, i) for i in range(out)]
        self.graph.add_nodes_from(elems)
        # A zero row outputs its bias at every position (zero padding times zero weights adds nothing).
        zero, bias = self.zero_rows(layer, layer.effective(self.gm))
        consts = tuple(b if z else None for b, z in zip(bias, zero))
        value = _Value(elems, consts, ndim - 1 - layer.spatial_dims, ndim)
        self.values[node] = value
        if layer.blocker:
            self.pin(value, f"is produced by {layer.name}, which cannot change: {layer.blocker}")
        else:
            self.sites.append(_Site("producer", layer.name, node, value, layer))

    def visit_module(self, node: fx.Node, m: nn.Module) -> None:
        x = node.args[0] if node.args else None
        if x not in self.values or len(node.all_input_nodes) != 1:
            self.pin_inputs(node)
            return
        v = self.values[x]
        if isinstance(m, _ELEMENTWISE_MODULES):
            self.passthrough(node, x, self.consts(node, [x]))
        elif isinstance(m, _DROPOUT_MODULES):
            self.dropout(node, x, self.training(m) and m.p > 0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.batchnorm(node, x, m)
        elif isinstance(m, TrainOffset) and v.dim - v.ndim == m.dim and len(v.elems) == m.offset.numel() \
                and self.module_calls[node.target] == 1:  # an earlier shrink's: sliced along
            offset = m.offset.tolist() if self.training(m) else [0.0] * len(v.elems)
            self.passthrough(node, x, tuple(None if c is None else c + o for c, o in zip(v.consts, offset)))
            self.sites.append(_Site("offset", node.target, node, v))
        elif isinstance(m, _POOL_MODULES) and v.dim == v.ndim - 3 and not getattr(m, "return_indices", False):
            avg_padded = isinstance(m, nn.AvgPool2d) and (
                any(_as_tuple(m.padding)) or m.ceil_mode or m.divisor_override is not None)
            self.values[node] = v if not avg_padded else self.zero_only(v)
        elif isinstance(m, nn.Flatten):
            self.flatten(node, x, m.start_dim, m.end_dim)
        else:
            self.pin_inputs(node)

    def visit_function(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        target, method = node.target, node.op == "call_method"
        x = node.args[0] if node.args else None
        only_x = node.all_input_nodes == [x] and x in self.values
        if (target in _ELEMENTWISE_FUNCTIONS or (method and target in _ELEMENTWISE_METHODS)) and only_x:
            self.passthrough(node, x, self.consts(node, [x]))
        elif target in _BINARY_FUNCTIONS or (method and target in _BINARY_METHODS):
            self.binary(node, tracked)
        elif target in _CAT_FUNCTIONS:
            self.cat(node)
        elif target in _DROPOUT_FUNCTIONS and only_x:
            self.dropout(node, x, bool(_arg(node, 2, "training", True)) and _arg(node, 1, "p", 0.5) > 0)
        elif target in _POOL_FUNCTIONS and only_x and self.values[x].dim == self.values[x].ndim - 3:
            self.pool(node, x)
        elif (target is torch.flatten or (method and target == "flatten")) and only_x:
            self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif ((method and target in ("view", "reshape")) or target is torch.reshape) and tracked == [x] \
                and _keeps_batch_flattens_rest(node, x):
            self.flatten(node, x, 1, -1)
        elif (target is torch.mean or (method and target == "mean")) and only_x:
            self.mean(node, x)
        elif method and target == "size" and only_x:
            d = _arg(node, 1, "dim", None)
            v = self.values[x]
            if d is None or d % v.ndim == v.dim:  # the channel count itself is read: it must not change
                self.pin_inputs(node)
        elif (method and target == "dim") or (target is getattr and node.args[1] in _HARMLESS_ATTRS):
            pass  # reads nothing that shrinking changes
        elif target is getattr and node.args[1] == "shape" and only_x and self._reads_other_dims(node, x):
            pass  # x.shape[0]: the batch size, which shrinking leaves alone
        else:
            self.pin_inputs(node)

    def _reads_other_dims(self, shape: fx.Node, x: fx.Node) -> bool:
        """Every use of `x.shape` takes one dim by a constant index, never the channel dim."""
        v = self.values[x]
        return all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   and u.args[1] % v.ndim != v.dim for u in shape.users)

    # ---- op rules

    def zero_only(self, v: _Value) -> _Value:
        """An op that keeps a zero channel zero but may change any other constant."""
        return dataclasses.replace(v, consts=tuple(0.0 if c == 0 else None for c in v.consts))

    def dropout(self, node: fx.Node, x: fx.Node, random: bool) -> None:
        # Training-mode dropout scales or zeroes entries at random: only a zero channel stays constant.
        self.passthrough(node, x, self.zero_only(self.values[x]).consts if random else self.values[x].consts)

    def pool(self, node: fx.Node, x: fx.Node) -> None:
        """F.max_pool2d / F.avg_pool2d / adaptive ones, as their modules (visit_module)."""
        indices_at = _POOL_FUNCTIONS[node.target]
        if indices_at is not None and _arg(node, indices_at, "return_indices", False):
            self.pin_inputs(node)
            return
        avg_padded = node.target is F.avg_pool2d and (any(_as_tuple(_arg(node, 3, "padding", 0)))
                                                      or _arg(node, 4, "ceil_mode", False)
                                                      or _arg(node, 6, "divisor_override", None) is not None)
        self.values[node] = self.zero_only(self.values[x]) if avg_padded else self.values[x]

    def batchnorm(self, node: fx.Node, x: fx.Node, bn: nn.modules.batchnorm._BatchNorm) -> None:
        v = self.values[x]
        if v.dim != 1 or len(v.elems) != bn.num_features or self.module_calls[node.target] > 1:
            self.pin_inputs(node)
            return
        ones, zeros = torch.ones(bn.num_features), torch.zeros(bn.num_features)
        gamma = bn.weight.detach() if bn.weight is not None else ones
        beta = bn.bias.detach() if bn.bias is not None else zeros
        if self.training(bn) or bn.running_mean is None:
            # Batch statistics: a channel that is exactly 0 everywhere has mean 0 and var 0, so it
            # leaves as beta. Any other constant c leaves as (c - mean(c...)) * ..., where the
            # computed mean can differ from c in the last bit and is then amplified by 1/sqrt(eps).
            consts = tuple(float(beta[i]) if c == 0 else None for i, c in enumerate(v.consts))
        else:
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            consts = tuple(None if c is None else float((c - bn.running_mean[i]) * scale[i] + beta[i])
                           for i, c in enumerate(v.consts))
        self.values[node] = dataclasses.replace(v, consts=consts)
        self.sites.append(_Site("batchnorm", node.target, node, v))

    def zero_rows(self, layer: _Layer, weight: torch.Tensor) -> tuple[list[bool], list[float]]:
        """Per output row: whether its norm is <= threshold, and its bias (0 without one)."""
        zero = (row_norms(weight, layer.op) <= self.threshold).tolist()
        bias = attribute(self.gm, layer.bias_path).detach().tolist() if layer.bias_path else [0.0] * len(zero)
        return zero, bias

    def depthwise(self, node: fx.Node, v: _Value, layer: _Layer) -> None:
        """Output channel c is channel c's own filter applied to input channel c: the channel passes
        through (sliced along, like BatchNorm). It is constant where the filter is zero (the bias),
        or where the input is: 0 in gives the bias; c in gives c * sum(filter) + bias, except at
        zero-padded borders."""
        w = layer.effective(self.gm)
        zero, bias = self.zero_rows(layer, w)
        sums = w.reshape(w.shape[0], -1).sum(1).tolist()
        padded = layer.zero_padded(self.gm)
        consts = tuple(b if z or c == 0 else (None if c is None or padded else c * s + b)
                       for c, b, z, s in zip(v.consts, bias, zero, sums))
        self.values[node] = dataclasses.replace(v, consts=consts)
        self.sites.append(_Site("depthwise", layer.name, node, v, layer))

    def binary(self, node: fx.Node, tracked: list[fx.Node]) -> None:
        # Every tensor operand must be followed and agree on the channel dim; Python numbers are fine.
        operands = node.all_input_nodes
        others = [f"model input {o.name}" if o.op == "placeholder" else o.name
                  for o in operands if o not in self.values]
        if others:  # e.g. a residual add from the model input: its channels are fixed, so these are too
            self.pin_inputs(node, f"{_op_name(node, self.gm)} with {', '.join(others)} (not followed by shrink)")
            return
        first = self.values[operands[0]]
        if any((self.values[o].dim, self.values[o].ndim, len(self.values[o].elems)) !=
               (first.dim, first.ndim, len(first.elems)) for o in operands):
            self.pin_inputs(node, f"{_op_name(node, self.gm)} with operands whose channel dims do not line up")
            return
        for o in operands[1:]:
            self.graph.add_edges_from(zip(first.elems, self.values[o].elems))  # channel i goes with channel i
        consts = self.consts(node, operands)
        if node.target in _PRODUCT_OPS:  # 0 times anything (finite) is 0: a gate on a dead channel (SE blocks)
            zero = [any(self.values[o].consts[i] == 0 for o in operands) for i in range(len(consts))]
            consts = tuple(0.0 if z else c for c, z in zip(consts, zero))
        self.values[node] = dataclasses.replace(first, consts=consts)

    def cat(self, node: fx.Node) -> None:
        parts = _arg(node, 0, "tensors", [])
        values = [self.values.get(p) if isinstance(p, fx.Node) else None for p in parts]
        if not values or any(v is None for v in values) or len({(v.dim, v.ndim) for v in values}) != 1:
            self.pin_inputs(node)
            return
        v0 = values[0]
        dim = _arg(node, 1, "dim", 0) % v0.ndim
        if dim == v0.dim:  # along channels: the channel lists are concatenated
            self.values[node] = _Value(sum((v.elems for v in values), ()), sum((v.consts for v in values), ()),
                                       v0.dim, v0.ndim)
        elif len({len(v.elems) for v in values}) == 1:  # along another dim: channel i of each part is one channel
            for v in values[1:]:
                self.graph.add_edges_from(zip(v0.elems, v.elems))
            consts = tuple(cs[0] if len(set(cs)) == 1 else None for cs in zip(*(v.consts for v in values)))
            self.values[node] = dataclasses.replace(v0, consts=consts)
        else:
            self.pin_inputs(node)

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        v, shape = self.values[x], get_meta(x).shape
        if shape is None or len(shape) != v.ndim:
            self.pin_inputs(node)
            return
        start, end = start % v.ndim, end % v.ndim
        if v.dim < start:
            out = dataclasses.replace(v, ndim=v.ndim - (end - start))
        elif v.dim > end:
            out = dataclasses.replace(v, dim=v.dim - (end - start), ndim=v.ndim - (end - start))
        elif v.dim == start:  # channel c becomes `inner` consecutive features
            inner = math.prod(shape[start + 1:end + 1])
            out = _Value(tuple(e for e in v.elems for _ in range(inner)),
                         tuple(c for c in v.consts for _ in range(inner)), start, v.ndim - (end - start))
        else:
            self.pin_inputs(node)
            return
        self.values[node] = out

    def mean(self, node: fx.Node, x: fx.Node) -> None:
        v = self.values[x]
        dims = _arg(node, 1, "dim", None)
        if dims is None or "dtype" in node.kwargs:
            self.pin_inputs(node)
            return
        dims = {d % v.ndim for d in _as_tuple(dims)}
        if v.dim in dims:
            self.pin_inputs(node)
            return
        if _arg(node, 2, "keepdim", False):
            self.values[node] = v
        else:  # a mean of copies of c is c (to rounding), and exactly 0 for c = 0
            self.values[node] = dataclasses.replace(v, dim=v.dim - sum(d < v.dim for d in dims),
                                                    ndim=v.ndim - len(dims))


def _keeps_batch_flattens_rest(node: fx.Node, x: fx.Node) -> bool:
    """`x.view(x.size(0), -1)` / `x.reshape(b, -1)`: flatten(x, 1), as older CNN code writes it. Only
    with -1 last, so the code stays right when channels are removed (an explicit 512 would not)."""
    shape_args = list(node.args[1:])
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    before, after = get_meta(x).shape, get_meta(node).shape
    return (len(shape_args) == 2 and shape_args[1] == -1 and not node.kwargs and before is not None
            and after is not None and len(before) >= 2 and tuple(after) == (before[0], math.prod(before[1:])))


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


# --------------------------------------------------------------------------- decisions


_MODE_NAMES = {True: "training mode", False: "eval mode", None: "the modules' current train / eval flags"}


class _Decision:
    """Which channel classes go, and the bias folds that make removing them exact in every mode analysed.

    `analyses` maps a mode to its analysis (the same graph, elements and sites; only constants differ);
    `current` is the model's own mode, which the modules' flags as they are (mode None) must agree with."""

    def __init__(self, analyses: dict[bool | None, _Analysis], current: bool):
        self.analyses, self.current = analyses, current
        self.a = a = next(iter(analyses.values()))
        assert all(len(other.sites) == len(a.sites) for other in analyses.values()), "modes differ only in constants"
        comps = sorted(nx.connected_components(a.graph), key=min)
        self.cls = {e: k for k, comp in enumerate(comps) for e in comp}
        self.classes = comps
        self.reasons: dict[int, str] = {}
        # consumer layer -> (class, input column, {mode: constant c}): bias += c * column, if the class goes
        self.folds: dict[str, list[tuple[int, int, dict]]] = collections.defaultdict(list)
        for e, why in a.pins.items():
            self.reasons.setdefault(self.cls[e], why)
        for i, site in enumerate(a.sites):
            if site.kind == "consumer":
                self.check_consumer(site, {mode: other.sites[i].value.consts for mode, other in analyses.items()})
        self.enforce_structure()

    def keep(self, k: int, why: str) -> bool:
        if k in self.reasons:
            return False
        self.reasons[k] = why
        return True

    def check_consumer(self, site: _Site, consts: dict[bool | None, tuple]) -> None:
        layer = site.layer
        col_zero = (col_norms(layer.effective(self.a.gm), layer.op) <= self.a.threshold).tolist()
        columns: dict[int, list[int]] = collections.defaultdict(list)
        for j, e in enumerate(site.value.elems):
            columns[self.cls[e]].append(j)
        for k, cols in columns.items():
            if k in self.reasons:
                continue
            why, folds = self.consumer_blocks(site, cols, col_zero, consts)
            if why is None:
                self.folds[layer.name] += [(k, j, c) for j, c in folds]
            else:
                self.keep(k, why)

    def consumer_blocks(self, site: _Site, cols: list[int], col_zero: list[bool], consts: dict[bool | None, tuple]):
        """(why class cannot leave this consumer, None if it can; the (column, {mode: constant}) bias folds
        it needs)."""
        layer, t = site.layer, site.layer.trainable
        if t is not None and isinstance(t.pattern, FanIn) and not self.a.ragged_fanin and \
                t.weight_mask.index_select(layer.in_dim, torch.tensor(cols)).any():
            return (f"{layer.name} has constant fan-in sparsity and keeps weights in this input column "
                    f"(removing it would leave some rows with fewer than k weights)"), []
        folds = []
        for j in cols:
            cs = {mode: values[j] for mode, values in consts.items()}
            if col_zero[j] or all(c == 0 for c in cs.values()):
                continue
            unknown = [mode for mode, c in cs.items() if c is None]
            if unknown:
                where = "" if len(unknown) == len(cs) else " in " + " or ".join(_MODE_NAMES[m] for m in unknown)
                return f"{layer.name} reads it (nonzero input column) and its value is not a known constant{where}", []
            if None in cs and cs[None] != cs[self.current]:
                return (f"its constant under {_MODE_NAMES[None]} ({cs[None]:.4g}) is not the one of "
                        f"{_MODE_NAMES[self.current]} ({cs[self.current]:.4g}), which a fold must also hold (cm.train() "
                        f"or cm.eval() before shrinking sets one mode throughout)"), []
            value = (f"{next(iter(cs.values())):.4g}" if len(set(cs.values())) == 1 else
                     "(" + ", ".join(f"{c:.4g} in {_MODE_NAMES[m]}" for m, c in cs.items()) + ")")
            if layer.bias_path is None:
                return f"its constant value {value} cannot be folded into {layer.name}: no bias", []
            if layer.zero_padded(self.a.gm):
                return (f"its constant value {value} cannot be folded into {layer.name}: zero padding changes it "
                        f"at the borders"), []
            folds.append((j, cs))
        return None, folds

    def enforce_structure(self) -> None:
        """Aligned N:M groups (weights along inputs, SDGP along outputs) and at least one channel per site.
        Each rule only keeps more classes, so repeating until nothing changes terminates."""
        changed = True
        while changed:
            changed = False
            for site in self.a.sites:
                t = site.layer.trainable if site.layer is not None else None
                if t is not None and site.kind == "consumer" and isinstance(t.pattern, NM) and t.pattern.n < t.pattern.m:
                    kernel = math.prod(t.weight.shape[2:]) if t.conv is not None else 1
                    changed |= self.aligned(site, t.pattern.m, kernel,
                                            f"{site.name} is {t.pattern}-sparse along its inputs: removing this "
                                            f"channel alone would break its aligned groups of {t.pattern.m}")
                if t is not None and site.kind in ("producer", "depthwise") and t.grad_pattern is not None \
                        and t.grad_pattern.n < t.grad_pattern.m:
                    changed |= self.aligned(site, t.grad_pattern.m, 1,
                                            f"{site.name} prunes its data gradient {t.grad_pattern} along its outputs "
                                            f"(SDGP): removing this channel alone would break its aligned groups of "
                                            f"{t.grad_pattern.m}")
                elems = site.value.elems
                if all(self.cls[e] not in self.reasons for e in elems):
                    changed |= self.keep(self.cls[elems[0]], f"kept so that {site.name} keeps at least one channel")

    def aligned(self, site: _Site, m: int, kernel: int, why: str) -> bool:
        """Keep every class with an index in a group of m (along the weight's K) that is only partly removed."""
        removed = torch.tensor([self.cls[e] not in self.reasons for e in site.value.elems])
        groups = removed.repeat_interleave(kernel).reshape(-1, m)
        partial = (groups.any(1) & ~groups.all(1)).repeat_interleave(m).reshape(-1, kernel).any(1)
        changed = False
        for j in partial.nonzero().flatten().tolist():
            changed |= self.keep(self.cls[site.value.elems[j]], why)
        return changed

    def removed(self, k: int) -> bool:
        return k not in self.reasons

    def kept_indices(self, value: _Value) -> list[int]:
        return [i for i, e in enumerate(value.elems) if not self.removed(self.cls[e])]


# --------------------------------------------------------------------------- rewriting


def _fold_shape_reads(gm: fx.GraphModule) -> None:
    """Code reading a tensor's shape (`W.shape[0] ** -0.5`) computed with the shape it had when traced,
    and must go on doing so once channels are removed: each such read becomes its value."""
    for target in {n.target for n in gm.graph.nodes if n.op == "get_attr"}:
        if isinstance(value := attribute(gm, target), torch.Tensor):
            erase_unused_reads(gm, fold_shape_reads(gm, target, tuple(value.shape), value.dtype))
    gm.recompile()


def _set_tensor(gm: fx.GraphModule, path: str, value: torch.Tensor) -> None:
    owner, attr = owner_of(gm, path)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, attr, value)


def _slice(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device)).clone()


def _rewrite(gm: fx.GraphModule, a: _Analysis, d: _Decision) -> None:
    """Fold removed constant channels into consumer biases (eval mode's where both modes were analysed),
    then slice every site, then add a TrainOffset where training mode's fold differs."""
    offsets = {}  # consumer node -> (layer, what training mode adds to its output on top of the bias)
    for site in a.sites:
        layer = site.layer
        if site.kind != "consumer" or layer.bias_path is None:
            continue
        bias = gm.get_parameter(layer.bias_path).detach()
        w, delta = layer.effective(gm), {mode: torch.zeros_like(bias) for mode in d.analyses}
        for k, j, cs in d.folds[layer.name]:
            if d.removed(k):  # column j reads the constant c everywhere: it adds c * (sum of column j) per output
                column = w.select(layer.in_dim, j).reshape(bias.shape[0], -1).sum(1)
                for mode, c in cs.items():
                    delta[mode] += c * column
        base = delta[False] if False in delta else delta[d.current]
        if base.any():
            _set_tensor(gm, layer.bias_path, bias + base)
        if True in delta and not torch.equal(delta[True], base):
            offsets[site.node] = (layer, delta[True] - base)
    for site in a.sites:
        keep = d.kept_indices(site.value)
        if site.kind == "consumer":
            _slice_layer(gm, site.layer, site.layer.in_dim, keep)
        elif site.kind in ("producer", "depthwise"):
            _slice_layer(gm, site.layer, site.layer.out_dim, keep)
            if site.layer.bias_path is not None:
                _set_tensor(gm, site.layer.bias_path, _slice(gm.get_parameter(site.layer.bias_path), 0, keep))
            if site.kind == "depthwise":
                _set_groups(site.layer, len(keep))
        elif site.kind == "offset":
            gm.get_submodule(site.name).offset = _slice(gm.get_submodule(site.name).offset, 0, keep)
        else:
            bn = gm.get_submodule(site.name)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(bn, attr) is not None:
                    _set_tensor(gm, f"{site.name}.{attr}", _slice(getattr(bn, attr), 0, keep))
            bn.num_features = len(keep)
    _update_meta(a, d)
    for node, (layer, offset) in offsets.items():
        _add_train_offset(gm, node, layer, _slice(offset, 0, d.kept_indices(a.values[node])))
    if offsets:
        gm.recompile()


def _add_train_offset(gm: fx.GraphModule, node: fx.Node, layer: _Layer, offset: torch.Tensor) -> None:
    """Run the layer's output at `node` through TrainOffset(offset) before anything reads it."""
    base = "shrink_train_offset_" + layer.name.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    module = TrainOffset(offset, dim=-1 - layer.spatial_dims)
    module.train(gm.training)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        added = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
    meta = get_meta(node)
    update_meta(added, shape=meta.shape, dtype=meta.dtype)


def _slice_layer(gm: fx.GraphModule, layer: _Layer, dim: int, keep: list[int]) -> None:
    _set_tensor(gm, layer.weight_path, _slice(layer.weight(gm), dim, keep))
    t = layer.trainable
    if t is not None and t.weight_mask is not None:
        t.weight_mask = _slice(t.weight_mask, dim, keep)
    m = layer.module
    if isinstance(m, nn.Linear):
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.in_channels, m.out_channels = m.weight.shape[1] * m.groups, m.weight.shape[0]


def _set_groups(layer: _Layer, groups: int) -> None:
    """A depthwise conv left with `groups` channels: one group per channel still."""
    layer.conv = dataclasses.replace(layer.conv, groups=groups)
    m = layer.module
    if isinstance(m, TrainableLayer):
        m.conv = layer.conv
    else:
        m.groups = m.in_channels = m.out_channels = groups


def _update_meta(a: _Analysis, d: _Decision) -> None:
    """Keep sparsec's own shape / layer metadata true for the smaller graph (torch's keys are left alone)."""
    for node, v in a.values.items():
        shape = get_meta(node).shape
        if shape is not None and len(shape) == v.ndim:
            shape = tuple(shape[:v.dim]) + (len(d.kept_indices(v)),) + tuple(shape[v.dim + 1:])
            update_meta(node, shape=shape)
    for node, layer in a.layers.items():
        info = get_meta(node).layer
        if info is not None:
            w = layer.weight(a.gm)
            rows = weight_to_rows(w, layer.op)
            update_meta(node, layer=dataclasses.replace(info, weight_shape=tuple(w.shape), out_features=rows.shape[0],
                                                        reduction=rows.shape[1], conv=layer.conv))


# --------------------------------------------------------------------------- report building


def _report(a: _Analysis, d: _Decision, threshold: float) -> ShrinkReport:
    spaces = nx.Graph()
    for name, _ in a.origin:
        spaces.add_node(name)
    for comp in d.classes:
        names = list(dict.fromkeys(a.origin[e][0] for e in sorted(comp)))
        spaces.add_edges_from(zip(names, names[1:]))
    first = {}
    for e, (name, _) in enumerate(a.origin):
        first.setdefault(name, e)
    consumers_of: dict[int, list[str]] = collections.defaultdict(list)
    for site in a.sites:
        if site.kind == "consumer":
            for k in {d.cls[e] for e in site.value.elems}:
                consumers_of[k].append(site.name)
    reports = []
    for names in sorted(nx.connected_components(spaces), key=lambda c: min(first[n] for n in c)):
        producers = sorted(names, key=first.get)
        classes = sorted({d.cls[e] for e in range(len(a.origin)) if a.origin[e][0] in names})  # channel order
        kept: dict[str, list[int]] = collections.defaultdict(list)
        removed = []
        for i, k in enumerate(classes):
            if d.removed(k):
                removed.append(i)
            else:
                kept[d.reasons[k]].append(i)
        consumers = list(dict.fromkeys(c for k in classes for c in consumers_of[k]))
        feeds_output = any(a.origin[e][0] in names for e in a.output_elems)
        reports.append(SpaceReport(producers, consumers, len(classes), len(classes) - len(removed), removed,
                                   dict(kept), feeds_output))
    return ShrinkReport(reports, threshold)


# --------------------------------------------------------------------------- entry point


def _modes(gm: fx.GraphModule, eval_only: bool, training: bool) -> tuple[list[bool | None], bool]:
    """(the modes the shrunk model must be exact in, the model's own mode). The modes: those the model
    can be switched to (train / eval, or the one its graph fixes, or eval for eval_only), and the
    modules' flags as they are where they differ from one another."""
    fixed = getattr(gm, "fixed_training", None)
    if eval_only and fixed:
        raise InvalidInputError("eval_only=True, but this model's graph was traced in training mode and fixes it "
                                "(see cm.plan's notes): compile the model in eval mode, then shrink it")
    modes = [False] if eval_only else [fixed] if fixed is not None else [False, True]
    if not eval_only and len({m.training for m in gm.modules()}) > 1:
        modes.append(None)
    return modes, False if eval_only else training if fixed is None else fixed


def shrink(cm: CompiledModel, threshold: float = 0.0, *, ragged_fanin: bool = False,
           eval_only: bool = False) -> CompiledModel:
    """A new, smaller CompiledModel computing the same outputs: all-zero neurons / channels removed.

    ragged_fanin: also remove input columns of constant fan-in layers where their mask keeps weights
    (what those weights multiplied is 0, or a constant folded into the bias, so the result is
    exact); the rows then keep different counts. For deployment after training (`condense`), not
    for further SRigL training, which needs exactly k per row.

    The result is exact in training and in eval mode (a TrainOffset module adds what training mode's
    BatchNorm statistics change). eval_only: exact in eval mode only, which can remove more (channels
    whose constant is known only with BatchNorm's running statistics); the result is in eval mode and
    refuses train().

    `cm` is never modified. The result carries `shrink_report` (ShrinkReport: per channel space,
    producers, consumers, channels before / after, removed indices and why the rest was kept);
    its plan has the new weight shapes and a "shrink: ..." note in each changed layer's reason.
    """
    if not isinstance(cm, CompiledModel):
        raise InvalidTypeError(f"shrink takes a CompiledModel (from sparsec.compile), got {type(cm).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
            or not math.isfinite(threshold):
        raise InvalidInputError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if not isinstance(eval_only, bool):
        raise InvalidTypeError(f"eval_only must be True or False, got {eval_only!r}")
    cm.require_unsharded("shrink (and condense)")
    packed = [m.layer_name for m in cm.graph_module.modules() if isinstance(m, RuntimeLayer)
              and not isinstance(m, TrainableLayer)]
    if packed:
        raise InvalidInputError(
            f"shrink works on dense or train=True models; layers {packed} hold packed inference weights. "
            f"Compile with pattern='dense' or train=True, shrink, then compile the smaller model for inference")
    start = time.perf_counter()
    gm = copy.deepcopy(cm.graph_module)
    _fold_shape_reads(gm)
    layers = _find_layers(gm)
    before = {layer.name: tuple(layer.weight(gm).shape) for layer in layers.values()}
    modes, current = _modes(gm, eval_only, cm.training)
    analyses = {mode: _Analysis(gm, layers, float(threshold), ragged_fanin, mode) for mode in modes}
    decision = _Decision(analyses, current)
    analysis = decision.a
    _rewrite(gm, analysis, decision)
    report = _report(analysis, decision, float(threshold))

    plan = copy.deepcopy(cm.plan)
    after = {layer.name: (layer, tuple(layer.weight(gm).shape)) for layer in layers.values()}
    for lp in plan:
        if lp.name not in after or after[lp.name][1] == before[lp.name]:
            continue
        layer, new_shape = after[lp.name]
        old_shape = before[lp.name]
        rows, cols = old_shape[layer.out_dim], old_shape[layer.in_dim]
        if lp.flops is not None:  # FLOPs scale with the weight's size at fixed batch / spatial shape
            lp.flops = round(lp.flops * math.prod(new_shape) / math.prod(old_shape))
        lp.weight_shape = new_shape
        lp.reason = (f"{lp.reason}; shrink: removed {rows - new_shape[layer.out_dim]} of {rows} output rows, "
                     f"{cols - new_shape[layer.in_dim]} of {cols} input columns")
    history = list(cm.history) + [PassRecord("shrink", "rewrite", time.perf_counter() - start, gm.code)]
    counters = collections.Counter(cm.counters)
    counters["shrink_channels_removed"] += report.channels_before - report.channels_after
    out = CompiledModel(gm, plan, history, counters, dict(cm._dense_weights), cm.trace_method)
    out.kernels, out.kernel_manifest = dict(cm.kernels), dict(cm.kernel_manifest)
    out.training = cm.training  # only the top-level flag: submodules keep their own (BN eval vs train)
    if eval_only:
        out.eval()
        gm.fixed_training = False  # the folds hold for eval mode only: train() is refused (CompiledModel.train)
        plan.notes.append(EVAL_ONLY_NOTE)
    out.shrink_report = report
    return out
