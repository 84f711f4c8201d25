"""Rewrite (train=True): replace every layer with sparse weights or a pruned gradient by a
TrainableLayer (dense Parameter + first-class mask, optional SDGP backward). Reads decisions only."""
from __future__ import annotations

import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.meta import get_meta, layer_nodes
from sparsec.passes.sparsify import replace_layer
from sparsec.passes.weight_reads import reads_by_target
from sparsec.passes.weight_rewrites import erase_unused_reads
from sparsec.patterns import parse_pattern
from sparsec.reference import rows_to_weight
from sparsec.runtime.training import TrainableLayer


def make_trainable(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.options
    attr_reads, left = reads_by_target(gm), []
    for name, nodes in layer_nodes(gm).items():
        meta = get_meta(nodes[0])
        decision, layer = meta.decision, meta.layer
        if decision is None or (decision.sparsity is None and decision.grad_sparsity is None):
            continue
        weight = gm.get_parameter(layer.weight_path)
        bias = gm.get_parameter(layer.bias_path) if layer.bias_path else None
        pattern = mask = None
        if decision.sparsity is not None:
            pattern = parse_pattern(decision.sparsity)
            mask = rows_to_weight(ctx.layer_mask(gm, layer, decision.sparsity), layer.op, weight.shape)
        module = TrainableLayer(weight, bias, layer.op, name, decision.reason, pattern=pattern, mask=mask,
                                grad_pattern=parse_pattern(decision.grad_sparsity) if decision.grad_sparsity else None,
                                grad_mode=opts.grad_mode, weight_update=opts.weight_update, ste_decay=opts.ste_decay,
                                conv=layer.conv)
        module.train(gm.training)
        left += replace_layer(gm, name, nodes, module, attr_reads)
        ctx.masks.pop(name, None)
        ctx.counters[f"trainable_{layer.op}"] += 1
    erase_unused_reads(gm, left)
    return gm
