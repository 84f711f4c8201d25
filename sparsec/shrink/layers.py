"""The layers shrink can resize (producers of channels, consumers of them), and why some cannot change."""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from sparsec.meta import ConvParams, get_meta, layer_nodes, plain_layer_op
from sparsec.passes.weight_reads import attribute, owner_of, readers, reads_metadata
from sparsec.patterns import FanIn, Unstructured
from sparsec.reference import pattern_mask, rows_to_weight, weight_to_rows
from sparsec.runtime.layers import explicit_padding
from sparsec.runtime.training import TrainableLayer
from sparsec.symbolic_capture import own_hooks


@dataclass
class Layer:
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


def find_layers(gm: fx.GraphModule) -> dict[fx.Node, Layer]:
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    functional_sites = {name: len(nodes) for name, nodes in layer_nodes(gm).items()}
    # (a weight or bias may be a buffer: a frozen bias registered with register_buffer)
    owners = collections.Counter(id(t) for named in (gm.named_parameters(remove_duplicate=False),
                                                     gm.named_buffers(remove_duplicate=False)) for _, t in named)
    layers = {}
    for node in gm.graph.nodes:
        layer = None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, TrainableLayer):
                layer = Layer(m.layer_name, m.op, f"{node.target}.weight",
                               f"{node.target}.bias" if m.bias is not None else None, m, m.conv)
            elif (op := plain_layer_op(m)) is not None:
                layer = Layer(node.target, op, f"{node.target}.weight",
                               f"{node.target}.bias" if m.bias is not None else None, m, ConvParams.of_module(m))
            if layer is not None and calls[node.target] > 1:
                layer.blocker = f"its module is called at {calls[node.target]} places"
            elif layer is not None and (why := customized(m)):
                layer.blocker = why
        elif node.op == "call_function" and (info := get_meta(node).layer) is not None:
            layer = Layer(info.name, info.op, info.weight_path, info.bias_path, None, info.conv)
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
        elif any(owners[id(attribute(gm, path))] > 1 for path in paths):
            layer.blocker = "its weight is shared with another module"
        elif layer.blocker is None and (reader := other_reader(gm, node, paths)) is not None:
            layer.blocker = f"its weight or bias is also read at node {reader.name}"
        elif layer.conv is not None and layer.conv.groups != 1 and not _one_filter_per_channel(gm, layer):
            layer.blocker = f"grouped conv (groups={layer.conv.groups}), not handled (depthwise convs are)"
        elif t is not None and isinstance(t.pattern, FanIn) and t.weight_update == "ste":
            layer.blocker = "SR-STE fan-in re-derives k from the weight shape every step"
        elif t is not None and isinstance(t.pattern, Unstructured) and t.weight_update == "ste":
            # (removing all-zero rows or columns made the next forward keep round(S * numel) of fewer weights:
            # a layer that kept 192 kept 129 and the outputs changed)
            layer.blocker = "SR-STE unstructured sparsity re-derives its kept count from the weight shape every step"
        elif get_meta(node).shape is None:
            layer.blocker = "its output shape is unknown (no shape metadata)"
        # channel c in, channel c out: passed through like BatchNorm (see Analysis.depthwise)
        layer.depthwise = layer.blocker is None and layer.conv is not None and layer.conv.groups != 1
        layers[node] = layer
    return layers


def customized(m: nn.Module) -> str | None:
    """Why a module may compute with its width in ways shrink cannot see (None: it does not): hooks
    (a forward hook scaling the output by a per-channel tensor, torch.nn.utils.prune's pre-hook
    rebuilding the weight from weight_orig), or a forward set on the instance."""
    if hooks := own_hooks(m):
        return f"it has {' / '.join(hooks)} hooks, which may read its channels"
    if "forward" in vars(m):
        return "its forward is set on the instance (module.forward = ...)"
    return None


def other_reader(gm: fx.GraphModule, node: fx.Node, paths: list[str]) -> fx.Node | None:
    """A node other than `node` that reads the values of one of the tensors at `paths`: a get_attr of it
    used for more than its dtype / device (shape reads were frozen to numbers), or a call of a module
    holding it (nn.Embedding whose weight a functional output layer also multiplies by). Slicing the
    tensor would change what that node computes: `W.mean()`, a tied embedding's output width."""
    for n in gm.graph.nodes:
        if n is node:
            continue
        if n.op == "call_module" and any(path.startswith(f"{n.target}.") for path in paths):
            return n
        if n.op == "get_attr" and n.target in paths:
            for user in readers(n):
                if user is not node and not reads_metadata(user):
                    return user
    return None


def _one_filter_per_channel(gm: fx.GraphModule, layer: Layer) -> bool:
    """A depthwise conv (groups = in = out channels), held by a module whose groups shrink can set."""
    w = layer.weight(gm)
    return w.shape[0] == layer.conv.groups and w.shape[1] == 1 and layer.module is not None

