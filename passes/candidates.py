"""Analysis: find candidate layers and record their facts (`LayerInfo`) on the nodes that run them.

Candidates are matmul-like ops whose weight is a parameter of the model:
  * `call_module` of `nn.Linear` / `nn.Conv2d` (symbolic_trace keeps them as modules);
  * `F.linear` / `F.conv2d` / `aten.linear` / `aten.conv2d` with a parameter weight
    (torch.export graphs, or user code calling the functional form);
  * `x @ W`, `torch.matmul(x, W)`, `torch.mm(x, W)` with W a 2-D parameter on the right.

Naming: a module candidate is named by its module path; a functional one by its weight's path,
minus a trailing ".weight" (so `aten.linear(x, fc.weight)` from torch.export is named "fc", like
the module it came from).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsec.context import CompileContext, UnreachedLayer
from sparsec.frontend import own_hooks
from sparsec.meta import ConvParams, LayerInfo, update_meta
from sparsec.runtime.training import TrainableLayer

aten = torch.ops.aten

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
CONV2D_FUNCTIONS = {F.conv2d, torch.conv2d, aten.conv2d.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}

_CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _pair(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _parameter(gm: fx.GraphModule, node: object) -> tuple[str, nn.Parameter] | None:
    """(path, parameter) when `node` reads a parameter of the graph module directly."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return node.target, value


def _functional_name(weight_path: str) -> str:
    return weight_path.removesuffix(".weight") if weight_path.endswith(".weight") and weight_path != "weight" else weight_path


def _trained_candidate(node: fx.Node, module: TrainableLayer) -> LayerInfo:
    """A layer of a train=True model compiled again (for inference): named by its plan name, with
    its learned mask, which is state to keep, not something to recompute from magnitudes."""
    w = module.weight
    rows = w.t() if module.op == "matmul" else w.reshape(w.shape[0], -1)
    return LayerInfo(name=module.layer_name, op=module.op, site="module", weight_path=f"{node.target}.weight",
                     bias_path=f"{node.target}.bias" if module.bias is not None else None,
                     weight_shape=tuple(w.shape), dtype=w.dtype, out_features=rows.shape[0], reduction=rows.shape[1],
                     conv=module.conv, trained_pattern=str(module.pattern) if module.pattern is not None else None,
                     trained_mask_path=f"{node.target}.weight_mask" if module.weight_mask is not None else None)


def _customized(module: nn.Module) -> str | None:
    """What a module carries beyond its class's computation (hooks, a forward set on the instance)."""
    if hooks := own_hooks(module):
        return f"it has {' / '.join(hooks)} hooks, which a sparse replacement would drop"
    if "forward" in vars(module):
        return "its forward is set on the instance (module.forward = ...), which a sparse replacement would drop"
    return None


def _module_candidate(gm: fx.GraphModule, node: fx.Node) -> LayerInfo | None:
    module = gm.get_submodule(node.target)
    if isinstance(module, TrainableLayer):
        return _trained_candidate(node, module)
    # Subclasses with their own forward are traced into instead (or are leaves we cannot see into);
    # a module with its own hooks or an instance-level forward would lose them to a sparse replacement.
    if _customized(module):
        return None
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        w = module.weight
        return LayerInfo(name=node.target, op="linear", site="module", weight_path=f"{node.target}.weight",
                         bias_path=f"{node.target}.bias" if module.bias is not None else None,
                         weight_shape=tuple(w.shape), dtype=w.dtype, out_features=w.shape[0], reduction=w.shape[1])
    if type(module).forward is nn.Conv2d.forward and isinstance(module, nn.Conv2d):
        w = module.weight
        conv = ConvParams(stride=_pair(module.stride), padding=module.padding if isinstance(module.padding, str) else _pair(module.padding),
                          dilation=_pair(module.dilation), groups=module.groups, padding_mode=module.padding_mode)
        return LayerInfo(name=node.target, op="conv2d", site="module", weight_path=f"{node.target}.weight",
                         bias_path=f"{node.target}.bias" if module.bias is not None else None,
                         weight_shape=tuple(w.shape), dtype=w.dtype, out_features=w.shape[0],
                         reduction=w[0].numel(), conv=conv)
    return None


def _function_candidate(gm: fx.GraphModule, node: fx.Node) -> LayerInfo | None:
    target = node.target
    if node.op == "call_function" and target in LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * 3
        weight, bias = node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        found = _parameter(gm, weight)
        if found is None or found[1].dim() != 2:
            return None
        bias_found = _parameter(gm, bias)
        if bias is not None and bias_found is None:
            return None  # a bias computed at run time: leave the call alone
        path, w = found
        return LayerInfo(name=_functional_name(path), op="linear", site="function", weight_path=path,
                         bias_path=bias_found[0] if bias_found else None, weight_shape=tuple(w.shape),
                         dtype=w.dtype, out_features=w.shape[0], reduction=w.shape[1])
    if node.op == "call_function" and target in CONV2D_FUNCTIONS:
        values = dict(_CONV_DEFAULTS)
        values.update(zip(_CONV_ARG_NAMES, node.args))
        values.update(node.kwargs)
        found = _parameter(gm, values["weight"])
        if found is None or found[1].dim() != 4:
            return None
        bias_found = _parameter(gm, values["bias"])
        if values["bias"] is not None and bias_found is None:
            return None
        path, w = found
        padding = values["padding"]
        conv = ConvParams(stride=_pair(values["stride"]), padding=padding if isinstance(padding, str) else _pair(padding),
                          dilation=_pair(values["dilation"]), groups=int(values["groups"]))
        return LayerInfo(name=_functional_name(path), op="conv2d", site="function", weight_path=path,
                         bias_path=bias_found[0] if bias_found else None, weight_shape=tuple(w.shape),
                         dtype=w.dtype, out_features=w.shape[0], reduction=w[0].numel(), conv=conv)
    is_matmul = (node.op == "call_function" and target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and target in MATMUL_METHODS)
    if is_matmul and len(node.args) == 2 and not node.kwargs:
        found = _parameter(gm, node.args[1])
        if found is None or found[1].dim() != 2 or _parameter(gm, node.args[0]) is not None:
            return None
        path, w = found
        return LayerInfo(name=_functional_name(path), op="matmul", site="function", weight_path=path, bias_path=None,
                         weight_shape=tuple(w.shape), dtype=w.dtype, out_features=w.shape[1], reduction=w.shape[0])
    return None


def find_candidates(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    found = set()
    for node in gm.graph.nodes:
        layer = _module_candidate(gm, node) if node.op == "call_module" else _function_candidate(gm, node)
        if layer is not None:
            update_meta(node, layer=layer)
            found.add(layer.name)
            ctx.counters[f"candidate_{layer.op}"] += 1
    ctx.unreached = _unreached_layers(gm, ctx.model, found)
    return gm


def _unreached_layers(gm: fx.GraphModule, model: nn.Module, found: set[str]) -> dict[str, UnreachedLayer]:
    """Linear / Conv2d modules of the model that no candidate node runs, with the reason why."""
    leaves = {n.target: type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    readers: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, set()).update(_op_name(u) for u in n.users)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in found:
            continue
        op = "linear" if isinstance(module, nn.Linear) else "conv2d"
        parents = [p for p in leaves if name.startswith(p + ".")]
        if parents:
            why = f"inside module '{parents[0]}' ({leaves[parents[0]]}), which is called as a whole and not traced into"
        elif f"{name}.weight" in readers:
            why = (f"its weight is read directly (by {', '.join(sorted(readers[f'{name}.weight']))}), not through the "
                   f"layer's forward; sparsec rewrites only layers called as modules or F.linear / matmul on a parameter")
        elif name in leaves and (custom := _customized(module)):
            why = custom
        elif name in leaves:
            why = f"{type(module).__name__} overrides forward; sparsec only rewrites the standard Linear/Conv2d computation"
        else:
            why = "not called by the model's forward (on the traced path)"
        out[name] = UnreachedLayer(op=op, weight_shape=tuple(module.weight.shape), dtype=module.weight.dtype, why=why)
    return out


def _op_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)
