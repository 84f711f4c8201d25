"""Channel analysis for shrink: which channel elements go together, which are pinned and why, and the
constant each carries, for one train / eval mode (see the package docstring for the rules)."""
from __future__ import annotations

import collections
import dataclasses
import math
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsec.group_lasso import row_norms
from sparsec.meta import data_input, get_meta
from sparsec.passes.weight_reads import attribute
from sparsec.runtime.train_offset import TrainOffset
from sparsec.shrink.layers import Layer, customized, other_reader

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
# Ops whose result is always new memory. Any other op may return its input itself or a view of it
# (nn.Identity, .contiguous(), eval-mode dropout, flatten / view, an in-place op), which matters where
# something then writes in place: every name of that memory sees the write.
_FRESH_MODULES = tuple(m for m in _ELEMENTWISE_MODULES if m is not nn.Identity) + (
    nn.modules.batchnorm._BatchNorm,) + _POOL_MODULES
_FRESH_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | _BINARY_FUNCTIONS | _CAT_FUNCTIONS | set(_POOL_FUNCTIONS) | {torch.mean}
_FRESH_METHODS = (_ELEMENTWISE_METHODS - {"contiguous"}) | _BINARY_METHODS | {"mean"}


@dataclass(frozen=True)
class Value:
    """What sparsec knows about a tensor's channel dim."""
    elems: tuple[int, ...]             # channel element at each index of the channel dim
    consts: tuple[float | None, ...]   # that channel's value when it is the same everywhere, else None
    dim: int                           # which dim is the channel dim (non-negative)
    ndim: int


@dataclass
class Site:
    """A place whose parameters are indexed by channel: a producer's output rows, a consumer's input
    columns, a BatchNorm's features."""
    kind: str                  # "producer" | "consumer" | "batchnorm" | "depthwise" | "offset" (TrainOffset)
    name: str                  # layer name or module path
    node: fx.Node
    value: Value
    layer: Layer | None = None


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


class Analysis:
    """Channel elements, their constants and the sites indexed by them, for one mode: `mode` True /
    False treats every module as training / in eval, None takes each module's flag as it is."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, Layer], threshold: float, ragged_fanin: bool = False,
                 mode: bool | None = None):
        self.gm, self.layers, self.threshold, self.ragged_fanin, self.mode = gm, layers, threshold, ragged_fanin, mode
        self.graph = nx.Graph()                     # channel elements; an edge joins two that go together
        self.origin: list[tuple[str, int]] = []     # element -> (producing layer, output index)
        self.values: dict[fx.Node, Value] = {}
        self.pins: dict[int, str] = {}              # element -> why it cannot be removed
        self.sites: list[Site] = []
        self.output_elems: set[int] = set()          # elements the model returns
        self.module_calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.memory = nx.utils.UnionFind()          # nodes whose results may share memory
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        for node in gm.graph.nodes:
            if node.op != "output" and not self.fresh(node):
                self.memory.union(node, *node.all_input_nodes)
        for node in gm.graph.nodes:
            self.visit(node)

    # ---- helpers

    def training(self, m: nn.Module) -> bool:
        return m.training if self.mode is None else self.mode

    def pin(self, value: Value, why: str) -> None:
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

    def fresh(self, node: fx.Node) -> bool:
        """Whether `node`'s result is always new memory, never its input or a view of it."""
        if node in self.layers:
            return True
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            return isinstance(m, _FRESH_MODULES) and not getattr(m, "inplace", False)
        if node.kwargs.get("inplace"):
            return False
        return node.target in (_FRESH_METHODS if node.op == "call_method" else _FRESH_FUNCTIONS)

    def passthrough(self, node: fx.Node, x: fx.Node, consts: tuple[float | None, ...]) -> None:
        self.values[node] = dataclasses.replace(self.values[x], consts=consts)
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.kwargs.get("inplace") or getattr(module, "inplace", False):
            self.values[x] = self.values[node]  # x itself now holds the new values, for its later readers
            # So do other names of x's memory (h and h.contiguous(), nn.Identity()(h)): where one is read
            # after the write, its values here would be stale, so the channels are kept.
            memory, order = self.memory[x], self.order[node]
            if any(self.memory[o] == memory and any(self.order[u] > order for u in o.users)
                   for o in self.values if o is not x and o is not node):
                self.pin(self.values[x], f"is written in place at node {node.name} through one of several "
                                         f"names of the same tensor")

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

    def visit_layer(self, node: fx.Node, layer: Layer) -> None:
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
                self.sites.append(Site("consumer", layer.name, node, v, layer))
        out = weight.shape[layer.out_dim]
        shape = get_meta(node).shape
        ndim = len(shape) if shape is not None else 2 + layer.spatial_dims
        elems = tuple(range(len(self.origin), len(self.origin) + out))
        self.origin += [(layer.name, i) for i in range(out)]
        self.graph.add_nodes_from(elems)
        # A zero row outputs its bias at every position (zero padding times zero weights adds nothing).
        zero, bias = self.zero_rows(layer, layer.effective(self.gm))
        consts = tuple(b if z else None for b, z in zip(bias, zero))
        value = Value(elems, consts, ndim - 1 - layer.spatial_dims, ndim)
        self.values[node] = value
        if layer.blocker:
            self.pin(value, f"is produced by {layer.name}, which cannot change: {layer.blocker}")
        else:
            self.sites.append(Site("producer", layer.name, node, value, layer))

    def visit_module(self, node: fx.Node, m: nn.Module) -> None:
        x = node.args[0] if node.args else None
        if x not in self.values or len(node.all_input_nodes) != 1:
            self.pin_inputs(node)
            return
        if why := customized(m):
            self.pin_inputs(node, f"{_op_name(node, self.gm)} ({why})")
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
            self.sites.append(Site("offset", node.target, node, v))
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

    def zero_only(self, v: Value) -> Value:
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
        state = [f"{node.target}.{attr}" for attr in ("weight", "bias", "running_mean", "running_var")
                 if getattr(bn, attr) is not None]
        if (reader := other_reader(self.gm, node, state)) is not None:  # it would read the sliced tensors
            self.pin_inputs(node, f"{_op_name(node, self.gm)} whose parameters are also read at node {reader.name}")
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
        self.sites.append(Site("batchnorm", node.target, node, v))

    def zero_rows(self, layer: Layer, weight: torch.Tensor) -> tuple[list[bool], list[float]]:
        """Per output row: whether its norm is <= threshold, and its bias (0 without one)."""
        zero = (row_norms(weight, layer.op) <= self.threshold).tolist()
        bias = attribute(self.gm, layer.bias_path).detach().tolist() if layer.bias_path else [0.0] * len(zero)
        return zero, bias

    def depthwise(self, node: fx.Node, v: Value, layer: Layer) -> None:
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
        self.sites.append(Site("depthwise", layer.name, node, v, layer))

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
            self.values[node] = Value(sum((v.elems for v in values), ()), sum((v.consts for v in values), ()),
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
            out = Value(tuple(e for e in v.elems for _ in range(inner)),
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

