"""Analysis: find candidate layers and record their facts (`LayerInfo`) on the nodes that run them.

Candidates are matmul-like ops whose weight is a parameter of the model:
  * `call_module` of `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` (symbolic_trace keeps them as modules);
  * `F.linear` / `F.conv1d` / `F.conv2d` and their aten forms with a parameter weight
    (torch.export graphs, or user code calling the functional form); F.linear's bias may be computed
    at run time (the rewrite adds it after the layer); `F.linear(x, W.t())` is `x @ W`;
  * `x @ W`, `torch.matmul(x, W)`, `torch.mm(x, W)` with W a 2-D parameter on the right;
  * `W @ x` (W on the left, features along x's second-to-last dim): the layer runs on x.mT;
  * the same with `W.T` (`W.t()`, `W.transpose(0, 1)`, ...) on the right: that is `F.linear(x, W)`,
    so it is a linear layer (see passes/weight_reads.py);
  * `torch.einsum` equations that are one of those (`"bsd,hd->bsh"`, `"...k,kn->...n"`,
    `"nk,bkl->bnl"`; see passes/einsum_forms.py);
  * `torch.addmm(b, x, W)` / `addmm(b, x, W.T)` with a 1-D parameter bias b (HF GPT-2's Conv1D):
    x @ W + b, a matmul / linear layer with a bias whose data operand is the second argument.

Weight matrices no candidate runs are listed as unreached layers, dense, with the reason: Linear /
Conv modules the graph does not run as candidates, layer types sparsec does not prune (Conv3d,
LSTM, ...), and parameters a matmul-like op reads in another form (other einsums, `bmm`).

Naming: a module candidate is named by its module path; a functional one by its weight's path,
minus a trailing ".weight" (so `aten.linear(x, fc.weight)` from torch.export is named "fc", like
the module it came from). A model that is itself an nn.Linear / Conv names its layer "", as
model.named_modules() names the model.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from sparsec.context import CompileContext, UnreachedLayer
from sparsec.meta import LAYER_MODULES, ConvParams, LayerInfo, op_name, plain_layer_op, update_meta
from sparsec.passes.einsum_forms import linear_operands
from sparsec.passes.weight_reads import parameter_read, transposed_input
from sparsec.runtime.layers import SparseLayer
from sparsec.runtime.training import TrainableLayer
from sparsec.state import read_quietly
from sparsec.symbolic_capture import own_hooks

aten = torch.ops.aten

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
CONV_FUNCTIONS = {F.conv2d: 2, torch.conv2d: 2, aten.conv2d.default: 2,   # -> spatial dims
                  F.conv1d: 1, torch.conv1d: 1, aten.conv1d.default: 1}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}  # addmm(b, x, W) = x @ W + b (GPT-2's Conv1D)
EINSUM_FUNCTIONS = {torch.einsum, aten.einsum.default}

_CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _parameter(gm: fx.GraphModule, node: object) -> tuple[str, nn.Parameter] | None:
    """(path, parameter) when `node` reads a parameter of the graph module as it is (no transpose)."""
    found = parameter_read(gm, node)
    return found[:2] if found is not None and not found[2] else None


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
                     trained_module_path=node.target if module.weight_mask is not None else None)


def _customized(module: nn.Module) -> str | None:
    """Why a Linear / Conv1d / Conv2d module cannot be swapped for a sparse one: what it carries beyond its
    class's computation (a parametrized weight, hooks, a forward set on the instance), or weights
    held as buffers. None: it can."""
    held = [name for name in ("weight", "bias") if name in module._buffers]
    if held:
        return (f"its {' and '.join(held)} {'is a buffer' if len(held) == 1 else 'are buffers'}, not "
                f"nn.Parameter{'s' if len(held) > 1 else ''}: sparsec prunes parameters")
    if parametrize.is_parametrized(module):
        names = sorted(module.parametrizations)
        kinds = sorted({type(p).__name__ for name in names for p in module.parametrizations[name]})
        return (f"its {' and '.join(names)} {'is' if len(names) == 1 else 'are'} computed by a parametrization "
                f"({', '.join(kinds)}), which a sparse replacement would drop (for inference, "
                f"torch.nn.utils.parametrize.remove_parametrizations(module, {names[0]!r}) first lets sparsec "
                f"prune the computed value)")
    if recomputed := _recomputed_weight(module):
        return recomputed
    if overridden := _overridden_conv_forward(module):
        return overridden
    if hooks := own_hooks(module):
        return f"it has {' / '.join(hooks)} hooks, which a sparse replacement would drop"
    if "forward" in vars(module):
        return "its forward is set on the instance (module.forward = ...), which a sparse replacement would drop"
    return None


def _overridden_conv_forward(module: nn.Module) -> str | None:
    """Why a Conv1d / Conv2d subclass that keeps the class's forward but overrides _conv_forward (which
    that forward calls to compute) stays dense: its calls are leaves of the trace (sparsec/fx_tracer.py), and
    the sparse replacement, running plain conv math, silently dropped what the override computes."""
    for cls in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, cls) and type(module)._conv_forward is not cls._conv_forward:
            return (f"its class {type(module).__name__} overrides _conv_forward, which a sparse replacement "
                    f"would drop; sparsec only rewrites the standard Conv1d / Conv2d computation")
    return None


# Forward pre-hooks of torch utilities that compute a weight from other parameters before each call:
# (what the hook does, how to make its result a plain weight sparsec can prune).
_WEIGHT_HOOKS = (
    (prune.BasePruningMethod, "torch.nn.utils.prune", "{name}_orig * {name}_mask",
     "torch.nn.utils.prune.remove(module, {name!r}) first makes that pruning permanent (sparsec then prunes on "
     "top of its zeros)"),
    (WeightNorm, "torch.nn.utils.weight_norm", "{name}_g and {name}_v",
     "torch.nn.utils.remove_weight_norm(module, {name!r}) first (for inference) lets sparsec prune the computed weight"),
    (SpectralNorm, "torch.nn.utils.spectral_norm", "{name}_orig",
     "torch.nn.utils.remove_spectral_norm(module, {name!r}) first (for inference) lets sparsec prune the computed "
     "weight"),
)


def _recomputed_weight(module: nn.Module) -> str | None:
    """Why a module whose weight a torch utility's forward pre-hook recomputes before each call stays dense."""
    for hook in module._forward_pre_hooks.values():
        for cls, utility, source, remedy in _WEIGHT_HOOKS:
            if isinstance(hook, cls):
                name = getattr(hook, "_tensor_name", None) or hook.name
                return (f"its {name} is computed from {source.format(name=name)} by {utility}'s forward pre-hook, "
                        f"which a sparse replacement would drop; {remedy.format(name=name)}")
    return None


def _module_candidate(gm: fx.GraphModule, node: fx.Node) -> LayerInfo | None:
    module = gm.get_submodule(node.target)
    if isinstance(module, TrainableLayer):
        return _trained_candidate(node, module)
    # Subclasses with their own forward are traced into instead (or are leaves we cannot see into);
    # a module with its own hooks or an instance-level forward would lose them to a sparse replacement.
    if _customized(module):
        return None
    if (op := plain_layer_op(module)) is not None:
        w = module.weight
        return LayerInfo(name=node.target, op=op, site="module", weight_path=f"{node.target}.weight",
                         bias_path=f"{node.target}.bias" if module.bias is not None else None,
                         weight_shape=tuple(w.shape), dtype=w.dtype, out_features=w.shape[0],
                         reduction=math.prod(w.shape[1:]), conv=ConvParams.of_module(module))
    return None


@dataclass(frozen=True)
class Refused:
    """A functional call on a parameter weight that is not taken as a layer, and why (for the plan)."""
    weight_path: str
    why: str


def _holds_node(value: object) -> bool:
    """Whether an argument is, or contains, a value computed at run time (a graph node)."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _function_candidate(gm: fx.GraphModule, node: fx.Node) -> LayerInfo | Refused | None:
    target = node.target
    if node.op == "call_function" and target in LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * 3
        data = node.kwargs.get("input", args[0])
        weight, bias = node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        bias_found = _parameter(gm, bias)
        runtime_bias = isinstance(bias, fx.Node) and bias_found is None  # e.g. cat(q_bias, 0, v_bias) in BEiT
        if bias is not None and bias_found is None and not runtime_bias:
            return None
        # F.linear(x, W.t()) is x @ W: a matmul layer on W [K, N]
        return _matmul_candidate(gm, data, weight, written_out_by_in=True, bias_path=bias_found[0] if bias_found else None,
                                 runtime_bias=runtime_bias)
    if node.op == "call_function" and target in CONV_FUNCTIONS:
        dims = CONV_FUNCTIONS[target]
        values = dict(_CONV_DEFAULTS)
        values.update(zip(_CONV_ARG_NAMES, node.args))
        values.update(node.kwargs)
        found = _parameter(gm, values["weight"])
        if found is None or found[1].dim() != 2 + dims:
            return None
        path, w = found
        # The runtime conv layers hold their settings and bias: ones computed at run time cannot be held
        # (F.conv2d(x, W, None, 1, x.shape[-1] // 8) crashed the compile in int(node)).
        run_time = [k for k in ("stride", "padding", "dilation", "groups") if _holds_node(values[k])]
        if run_time:
            return Refused(path, f"F.conv{dims}d's {' and '.join(run_time)} {'is' if len(run_time) == 1 else 'are'} "
                                 f"computed at run time, and sparsec's convolution layers hold fixed settings")
        bias_found = _parameter(gm, values["bias"])
        if values["bias"] is not None and bias_found is None:
            return Refused(path, f"F.conv{dims}d's bias is computed at run time, not a parameter, and sparsec's "
                                 f"convolution layers hold their bias; add it after F.conv{dims}d(x, W) to let sparsec "
                                 f"prune the weight")
        conv = ConvParams.build(values["stride"], values["padding"], values["dilation"], values["groups"], dims=dims)
        return LayerInfo(name=_functional_name(path), op=f"conv{dims}d", site="function", weight_path=path,
                         bias_path=bias_found[0] if bias_found else None, weight_shape=tuple(w.shape),
                         dtype=w.dtype, out_features=w.shape[0], reduction=math.prod(w.shape[1:]), conv=conv)
    is_matmul = (node.op == "call_function" and target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and target in MATMUL_METHODS)
    if is_matmul and node.kwargs:
        weights = [found for v in (*node.args, *node.kwargs.values()) if (found := parameter_read(gm, v))]
        if len(weights) == 1 and weights[0][1].dim() == 2:
            return Refused(weights[0][0], f"{op_name(node)}'s operands are passed by keyword; sparsec rewrites the "
                                          f"positional forms torch.matmul(x, W), x @ W and W @ x")
        return None
    if is_matmul and len(node.args) == 2:
        x, w = node.args
        # W @ x = (x.mT @ W.T).mT: a linear layer on x.mT (W.T @ x: a matmul one)
        return _matmul_candidate(gm, x, w) or _matmul_candidate(gm, w, x, written_out_by_in=True, weight_left=True,
                                                                data_arg=(1,))
    if node.op == "call_function" and target in EINSUM_FUNCTIONS:
        return _einsum_candidate(gm, node)
    is_addmm = (node.op == "call_function" and target in ADDMM_FUNCTIONS) or (
        node.op == "call_method" and target == "addmm")
    if is_addmm and len(node.args) == 3 and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")) and \
            set(node.kwargs) <= {"beta", "alpha"}:
        bias = _parameter(gm, node.args[0])
        if bias is None or bias[1].dim() != 1:
            return None  # a bias computed at run time, or one that is not per output feature
        layer = _matmul_candidate(gm, node.args[1], node.args[2], bias_path=bias[0], data_arg=(1,))
        return layer if layer is not None and bias[1].numel() == layer.out_features else None
    return None


def _einsum_candidate(gm: fx.GraphModule, node: fx.Node) -> LayerInfo | None:
    """einsum("bsd,hd->bsh", x, W) and the other equations passes/einsum_forms.py takes as a layer;
    operands as varargs (symbolic_trace) or as one list (aten.einsum from torch.export)."""
    if not node.args or set(node.kwargs) - {"path"}:
        return None
    listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    operands = list(node.args[1]) if listed else list(node.args[1:])
    if len(operands) != 2:
        return None
    for w, out_by_in, left in linear_operands(node.args[0]):
        data_arg = (1, 1 - w) if listed else (2 - w,)
        layer = _matmul_candidate(gm, operands[1 - w], operands[w], written_out_by_in=out_by_in, data_arg=data_arg,
                                  weight_left=left)
        if layer is not None:
            return layer
    return None


def _matmul_candidate(gm: fx.GraphModule, data: object, weight: object, *, written_out_by_in: bool = False,
                      bias_path: str | None = None, runtime_bias: bool = False,
                      data_arg: tuple[int, ...] = (0,), weight_left: bool = False) -> LayerInfo | None:
    """A layer multiplying `data` by a 2-D parameter W, read as it is or transposed: a linear layer
    when the product is data @ W.T (W [N, K]), a matmul one when it is data @ W (W [K, N]).
    `written_out_by_in`: the op takes its weight operand as [out, in] (F.linear, einsum "..k,nk"),
    not [in, out] (matmul)."""
    found = parameter_read(gm, weight)
    if found is None or found[1].dim() != 2 or parameter_read(gm, data) is not None:
        return None
    path, w, transposed = found
    linear = transposed != written_out_by_in
    out_features, reduction = (w.shape[0], w.shape[1]) if linear else (w.shape[1], w.shape[0])
    return LayerInfo(name=_functional_name(path), op="linear" if linear else "matmul", site="function",
                     weight_path=path, bias_path=bias_path, weight_shape=tuple(w.shape), dtype=w.dtype,
                     out_features=out_features, reduction=reduction, data_arg=data_arg, runtime_bias=runtime_bias,
                     weight_left=weight_left)


def _root_layer_name(layer: LayerInfo, model: nn.Module) -> LayerInfo:
    """`layer`, named "" when it is the model itself: an nn.Linear / Conv compiled on its own traces to
    F.linear(x, self.weight, ...), whose weight path "weight" named it "weight" (no module of the model is
    called that), and the root module, which named_modules() calls "", was listed as a second layer, "not
    called by the model's forward". design.md names a layer by its module path."""
    if layer.weight_path == "weight" and plain_layer_op(model) == layer.op and read_quietly(model, "weight").shape == layer.weight_shape:
        return dataclasses.replace(layer, name="")
    return layer


def find_candidates(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    found, refused, read_by_candidates = set(), {}, set()
    for node in gm.graph.nodes:
        layer = _module_candidate(gm, node) if node.op == "call_module" else _function_candidate(gm, node)
        if isinstance(layer, Refused):
            refused.setdefault(layer.weight_path, layer.why)
        elif layer is not None:
            layer = _root_layer_name(layer, ctx.model)
            read_by_candidates.add(layer.weight_path)
            update_meta(node, layer=layer)
            found.add(layer.name)
            ctx.counters[f"candidate_{layer.op}"] += 1
    ctx.unreached = _unreached_layers(gm, ctx.model, found, refused, read_by_candidates)
    ctx.notes.extend(_unexamined_weights(gm, {u.weight_path for u in ctx.unreached.values()}))
    return gm


def _unexamined_weights(gm: fx.GraphModule, listed: set[str]) -> list[str]:
    """A note per module the graph calls whole (excluded, a leaf) holding weight matrices that no plan
    entry names: an F.linear(x, self.w) in there is never seen as a layer, so it is said here rather
    than passed over silently (the plan lists the Linear / Conv modules inside such modules)."""
    notes = []
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"):  # (each module once)
        module = gm.get_submodule(target)
        if isinstance(module, (*LAYER_MODULES, *_UNPRUNED_LAYERS, SparseLayer, TrainableLayer, nn.Embedding)):
            continue
        hidden = [f"{target}.{path} {list(w.shape)}" for path, w in module.named_parameters()
                  if w.dim() >= 2 and f"{target}.{path}" not in listed]
        if hidden:
            notes.append(f"module '{target}' ({type(module).__name__}) is called as a whole, not traced into: "
                         f"its weight matrices {', '.join(hidden)} are not examined and stay as they are")
    return notes


def _unreached_layers(gm: fx.GraphModule, model: nn.Module, found: set[str],
                      refused: dict[str, str], candidate_weights: set[str] = frozenset()
                      ) -> dict[str, UnreachedLayer]:
    """Weight matrices of the model that no candidate node runs, with the reason why: Linear / Conv
    modules, modules of layer types sparsec does not prune (Conv3d, LSTM, ...), and parameters that a
    matmul-like op reads in a form that is not a candidate (an einsum that is not a layer, `bmm`). Listed so that
    no weight matrix is passed over silently."""
    leaves = {n.target: type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    read_by = _read_by(gm)
    by_id: dict[int, list[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(path)
    tied_to = {path: [o for o in paths if o != path] for paths in by_id.values() for path in paths}
    out = {}
    for name, module in model.named_modules():
        op = next((op for cls, op in LAYER_MODULES.items() if isinstance(module, cls)), None)  # subclasses too
        if op is not None and name not in found:
            w = read_quietly(module, "weight")
            why = _inside_leaf(name, leaves) or _why_not_run(name, module, leaves, read_by, refused, tied_to)
            out[name] = UnreachedLayer(op=op, weight_shape=tuple(w.shape), dtype=w.dtype, weight_path=f"{name}.weight",
                                       why=why)
        elif isinstance(module, _UNPRUNED_LAYERS):
            why = _inside_leaf(name, leaves) or f"{type(module).__name__} layers are not pruned by sparsec ({_REWRITTEN})"
            for pname, w in module.named_parameters(recurse=False):
                entry = name if pname == "weight" else f"{name}.{pname}"
                if w.dim() >= 2 and entry not in found:
                    out[entry] = UnreachedLayer(
                        op=type(module).__name__.lower(), weight_shape=tuple(w.shape), dtype=w.dtype,
                        weight_path=f"{name}.{pname}", why=why)
    for path, module in gm.named_modules():
        if isinstance(module, SparseLayer) and module.layer_name not in found:  # a compiled model compiled again
            out[module.layer_name] = UnreachedLayer(
                op=module.op, weight_shape=tuple(module.weight_shape), dtype=module.packed.dtype_probe.dtype,
                weight_path=f"{path}.packed", sparsity=module.pattern, quant=module.packed.quant,
                backend=module.backend,
                why=(f"{module.pattern}{' ' + module.packed.quant if module.packed.quant else ''}, packed by an earlier "
                     f"compile and run as it is: sparsec does not decide again for packed layers (to change them, "
                     f"compile the original model, with plan=cm.plan to keep the other choices)"))
    covered = {u.weight_path for u in out.values()}
    for path, ops in read_by.items():
        name = _functional_name(path)
        # (a candidate's own weight, by path: the root layer's "weight" is named "", not after its path)
        if path in covered or path in candidate_weights or name in found or not ops & _MATMUL_LIKE:
            continue
        w = gm.get_parameter(path)
        if path in refused:
            why = refused[path]
        elif sliced := ops & _SLICING:
            why = (f"only parts of it are read ({', '.join(sorted(sliced))}, then {', '.join(sorted(ops - sliced))}): "
                   f"sparsec prunes weight matrices read whole; hold each part as a parameter (or layer) of its "
                   f"own to let sparsec prune it")
        else:
            why = (f"read by {', '.join(sorted(ops))} in a form sparsec does not rewrite ({_REWRITTEN}); "
                   f"write it as one of those to let sparsec prune it")
        out[name] = UnreachedLayer(op=sorted(ops & _MATMUL_LIKE)[0], weight_shape=tuple(w.shape), dtype=w.dtype,
                                   weight_path=path, why=why)
    return out


def _inside_leaf(name: str, leaves: dict[str, str]) -> str | None:
    """The reason for a module inside a module the graph calls as a whole (None: not inside one)."""
    parent = next((p for p in leaves if name.startswith(p + ".")), None)
    return (f"inside module '{parent}' ({leaves[parent]}), which is called as a whole and not traced into"
            if parent is not None else None)


def _why_not_run(name: str, module: nn.Module, leaves: dict[str, str], read_by: dict[str, set[str]],
                 refused: dict[str, str], tied_to: dict[str, list[str]]) -> str:
    """Why a Linear / Conv1d / Conv2d module outside any whole-called module is not a candidate."""
    if custom := _customized(module):
        return custom
    if why := refused.get(f"{name}.weight"):
        return why
    if read_by.get(f"{name}.weight"):  # (torch.export reads every parameter, used or not: an empty set)
        return (f"its weight is read directly (by {', '.join(sorted(read_by[f'{name}.weight']))}), not through the "
                f"layer's forward, in a form sparsec does not rewrite ({_REWRITTEN})")
    if name in leaves:
        return (f"{type(module).__name__} overrides forward; sparsec only rewrites the standard Linear / Conv1d / "
                f"Conv2d computation")
    # torch.export reads a tied Parameter under one of its names only: this layer's calls read the other one
    # (they were said not to run at all)
    if tied := [p for p in tied_to.get(f"{name}.weight", []) if read_by.get(p)]:
        return (f"its weight is tied to {', '.join(tied)} (one Parameter), under which name the traced graph reads "
                f"it: pruning it would change that layer too")
    return "not called by the model's forward (on the traced path)"


# Matmul-like layer types sparsec leaves dense (listed in the plan, so no weight is passed over silently).
_UNPRUNED_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                    nn.RNNBase)
_REWRITTEN = ("it rewrites Linear / Conv1d / Conv2d modules, F.linear(x, W), F.conv1d / F.conv2d(x, W), x @ W, "
              "x @ W.T, W @ x and einsums that are one of those, such as einsum('bsd,hd->bsh', x, W)")
_MATMUL_LIKE = {"matmul", "mm", "bmm", "einsum", "linear", "conv1d", "conv2d", "conv3d", "addmm", "baddbmm", "addbmm",
                "tensordot", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "dot", "mv"}


def _read_by(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Parameter path -> names of the ops that use it, for parameters of two or more dimensions read
    by get_attr nodes; looking through views, transposes and casts, so that `W.unsqueeze(0) @ x` is
    named as read by matmul, not by unsqueeze."""
    out: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        found = _parameter(gm, node)
        if found is None or found[1].dim() < 2:
            continue
        names, todo = out.setdefault(found[0], set()), [node]
        while todo:
            value = todo.pop()
            for user in value.users:
                name = op_name(user)
                if transposed_input(user) is value or (name in _RESHAPING | _SLICING and user.args[:1] == (value,)):
                    todo.append(user)
                    if name in _SLICING:
                        names.add(name)
                else:
                    names.add(name)
    return out


# Ops that hand on the weight's values reshaped, transposed or cast (followed to the op that uses them).
_RESHAPING = {"view", "reshape", "unsafe_view", "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "contiguous",
              "clone", "detach", "to", "to_copy", "type", "half", "float", "double", "bfloat16", "transpose", "permute",
              "swapaxes", "swapdims", "movedim", "t"}

# Ops that hand on part of the weight (followed too, and named: sparsec prunes weights read whole).
_SLICING = {"getitem", "narrow", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "select", "slice",
            "index_select"}
