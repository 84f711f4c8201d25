"""Shrink's rewrite: fold removed constant channels into biases, slice every site, keep metadata true."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn

from sparsec.meta import get_meta, update_meta
from sparsec.passes.weight_reads import attribute, owner_of, reads_by_target
from sparsec.passes.weight_rewrites import erase_unused_reads, fold_shape_reads
from sparsec.reference import weight_to_rows
from sparsec.runtime.train_offset import TrainOffset
from sparsec.runtime.training import TrainableLayer
from sparsec.shrink.analysis import Analysis
from sparsec.shrink.decision import Decision
from sparsec.shrink.layers import Layer


def freeze_shape_reads(gm: fx.GraphModule) -> None:
    """Code reading a tensor's shape (`W.shape[0] ** -0.5`) computed with the shape it had when traced,
    and must go on doing so once channels are removed: each such read becomes its value."""
    left = []
    for target, reads in reads_by_target(gm).items():
        if isinstance(value := attribute(gm, target), torch.Tensor):
            left += fold_shape_reads(gm, reads, tuple(value.shape), value.dtype)
    erase_unused_reads(gm, left)
    gm.recompile()


def _set_tensor(gm: fx.GraphModule, path: str, value: torch.Tensor) -> None:
    owner, attr = owner_of(gm, path)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(owner, attr, value)


def _slice(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device)).clone()


def rewrite(gm: fx.GraphModule, a: Analysis, d: Decision) -> None:
    """Fold removed constant channels into consumer biases (eval mode's where both modes were analysed),
    then slice every site, then add a TrainOffset where training mode's fold differs."""
    offsets = {}  # consumer node -> (layer, what training mode adds to its output on top of the bias)
    for site in a.sites:
        layer = site.layer
        if site.kind != "consumer" or layer.bias_path is None:
            continue
        bias = attribute(gm, layer.bias_path).detach()
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
                _set_tensor(gm, site.layer.bias_path, _slice(attribute(gm, site.layer.bias_path), 0, keep))
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


def _add_train_offset(gm: fx.GraphModule, node: fx.Node, layer: Layer, offset: torch.Tensor) -> None:
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


def _slice_layer(gm: fx.GraphModule, layer: Layer, dim: int, keep: list[int]) -> None:
    _set_tensor(gm, layer.weight_path, _slice(layer.weight(gm), dim, keep))
    t = layer.trainable
    if t is not None and t.weight_mask is not None:
        t.weight_mask = _slice(t.weight_mask, dim, keep)
    m = layer.module
    if isinstance(m, nn.Linear):
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.in_channels, m.out_channels = m.weight.shape[1] * m.groups, m.weight.shape[0]


def _set_groups(layer: Layer, groups: int) -> None:
    """A depthwise conv left with `groups` channels: one group per channel still."""
    layer.conv = dataclasses.replace(layer.conv, groups=groups)
    m = layer.module
    if isinstance(m, TrainableLayer):
        m.conv = layer.conv
    else:
        m.groups = m.in_channels = m.out_channels = groups


def _update_meta(a: Analysis, d: Decision) -> None:
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

