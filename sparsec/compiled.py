"""CompiledModel: the nn.Module `sparsec.compile` returns.

It holds the transformed GraphModule, the Plan, generated kernel sources and the pass history,
and answers inspection questions per layer (`effective_weight`, `mask`).
"""
from __future__ import annotations

import collections
import inspect
import types

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from sparsec.distributed import FSDPModule, check_same_masks, check_whole, fsdp_groups, full, refuse_sharded
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.graph_module import restore
from sparsec.passes.weight_reads import owner_of
from sparsec.patterns import Unstructured
from sparsec.pipeline import PassRecord
from sparsec.plan import Plan, dtype_name
from sparsec.runtime.layers import RuntimeLayer, held_weight_bytes
from sparsec.runtime.training import TrainableLayer
from sparsec.state import read_quietly


# nn.Module's global hook registries (mutated in place by torch.nn.modules.module.register_*_hook)
_GLOBAL_HOOKS = [getattr(nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if hasattr(nn.modules.module, name)]


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks: its own, or global ones for every module."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or any(_GLOBAL_HOOKS))


def _copy_function(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own (same code)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _detached_copy(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`t`, copied when it shares memory with `module`'s parameters or buffers. A layer may hand out its
    stored tensor itself (a pruned weight kept dense returns its `values` buffer as the effective weight):
    a caller writing into what cm.effective_weight / cm.mask returned then changed the model silently."""
    try:
        held = {x.untyped_storage().data_ptr() for x in [*module.parameters(), *module.buffers()] if x.numel()}
        shared = bool(t.numel()) and t.untyped_storage().data_ptr() in held
    except (RuntimeError, NotImplementedError, TypeError):  # (a tensor subclass without storage: copy to be safe)
        shared = True
    return t.clone() if shared else t


def _unpickle_compiled_model(cls: type) -> "CompiledModel":
    return cls.__new__(cls)


_FIXED_ARGUMENTS = ("the graph takes the arguments the model was traced with: arguments left at their defaults, "
                    "and None / bool values, are fixed at the example's values (the graph follows the branches "
                    "they took); pass in example_inputs (or by name in example_kwargs) every argument you will "
                    "vary, with a tensor where you will pass one")


def _container_input_leaves(gm: fx.GraphModule) -> tuple[int, frozenset, int] | None:
    """(positional arguments, keyword names, values in all) of the example inputs, where an input is a
    container (list, dict, tuple) and the graph flattens calls by the example's structure (torch.export's
    pytree code): that flatten takes the first items of a longer list and ignores extra keys, so a call
    with [x, x, x] silently computed on [x, x]. None where every input is a tensor or value of its own."""
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if spec is None or spec.num_children != 2:
        return None
    args, kwargs = _children(spec)
    if all(child.is_leaf() for group in (args, kwargs) for child in _children(group)):
        return None
    return args.num_children, frozenset(kwargs.context or ()), spec.num_leaves


def _children(spec) -> list:
    # (TreeSpec.children() is newer torch's; children_specs, older torch's, warns there as deprecated)
    return spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs


def _check_container_inputs(expected: tuple[int, frozenset, int], args: tuple, kwargs: dict) -> None:
    """Refuse a call whose containers hold other numbers of values than the example's. (A call with other
    arguments altogether goes on to the graph, whose own error _call_error makes clearer.)"""
    positional, keywords, leaves = expected
    if len(args) == positional and set(kwargs) == keywords and len(tree_leaves((args, kwargs))) != leaves:
        raise InvalidInputError(f"this model was captured with torch.export for inputs holding {leaves} values "
                                f"in all (lists / dicts as in the example inputs); got {len(tree_leaves((args, kwargs)))}. "
                                f"Its graph takes containers of the example's length and keys only: compile "
                                f"again with example inputs of the structure you call it with")


def _call_error(gm: fx.GraphModule, args: tuple, kwargs: dict, error: Exception) -> Exception | None:
    """A clearer error for a call the traced graph cannot take (None: `error` is about something else).
    Only runs once a call has failed."""
    signature = inspect.signature(gm.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        return TypeError(f"this compiled model takes forward{signature}, and this call does not fit it ({e}): "
                         f"{_FIXED_ARGUMENTS}")
    if isinstance(error, AssertionError) and "specialized to have value" in str(error):
        return ValueError(f"{error}: {_FIXED_ARGUMENTS}")
    bound.apply_defaults()
    nones = [name for name, value in bound.arguments.items() if value is None]
    if isinstance(error, TypeError) and "NoneType" in str(error) and nones:
        return TypeError(f"{error} (passing None for {', '.join(nones)}): {_FIXED_ARGUMENTS}")
    return None


# The state dict keys (relative to a sparse layer) that tell how it stores its weight, and its values
_FORM_KEYS = ("packed.meta", "packed.indices", "packed.crow_indices", "packed.mask_bits", "weight", "packed.values",
              "packed.scales", "packed.table")


def _form_keys(keys, layers: dict[str, nn.Module]) -> dict[str, set[str]]:
    """layer path -> those of its keys in `keys` that tell its stored form (one pass over the keys)."""
    found: dict[str, set[str]] = {}
    for key in keys:
        for suffix in _FORM_KEYS:
            if isinstance(key, str) and key.endswith("." + suffix) and key[:-len(suffix) - 1] in layers:
                found.setdefault(key[:-len(suffix) - 1], set()).add(suffix)
    return found


def _stored_form(keys: set[str]) -> str | None:
    """How a sparse layer holds its weight, from its form keys (relative to the layer)."""
    if "packed.meta" in keys:
        return "N:M packed values (backend torch / bitmask / triton)"
    if "packed.indices" in keys:
        return "condensed fan-in values (backend torch / condensed / triton)"
    if "packed.crow_indices" in keys:
        return "CSR values (backend torch / csr / triton)"
    if "packed.mask_bits" in keys:
        return "the pruned weight kept dense (backend dense)"
    if "weight" in keys:
        return "a trainable dense weight with its mask (train=True)"
    return None


def _values_form(keys: set[str]) -> str | None:
    """What a packed layer's values are, from its form keys (None: the keys hold no values, or the layer keeps
    its pruned weight dense, quantized or not, in its weight's dtype)."""
    if "packed.values" not in keys or "packed.mask_bits" in keys:
        return None
    return ("int8 values with scales" if "packed.scales" in keys else "level codes with a table"
            if "packed.table" in keys else "float values")


_LOADED = "; the loaded state's mask keeps "  # the note a load appends to a layer's plan reason


def _patterns_from_loaded_masks(cm: "CompiledModel", incompatible_keys) -> None:
    """After a load, an unstructured train=True layer, and its plan entry, say the sparsity its mask holds: a
    state dict saved after GradualPruning raised a layer (unstructured:0.5 -> 0.9), loaded into a fresh compile
    at 0.5, left both at 0.5 (the plan's counts said 50% kept for 10%, and so did an inference compile's
    pattern). The mask is state, the pattern its description."""
    for module in cm.graph_module.modules():
        if not (isinstance(module, TrainableLayer) and isinstance(module.pattern, Unstructured)
                and module.weight_mask is not None and not module.weight_mask.is_meta):
            continue
        kept, numel = int(module.weight_mask.sum()), module.weight_mask.numel()
        if kept == module.pattern.kept(numel):
            continue
        pattern = Unstructured.keeping(kept, numel)
        if pattern is not None:
            module.pattern = pattern
        if module.layer_name in cm.plan.names:
            lp = cm.plan[module.layer_name]
            lp.sparsity = str(module.pattern)
            lp.mask_kept = kept  # (the count itself where no pattern names it: all or none kept)
            lp.reason = lp.reason.split(_LOADED)[0] + f"{_LOADED}{kept} of {numel} weights ({100 * kept / numel:.3g}%)"


# The plan note shrink(eval_only=True) leaves: train() reads it to say why the model stays in eval mode.
EVAL_ONLY_NOTE = "shrink(eval_only=True): constants folded for eval mode only; the model refuses train()"


class CompiledModel(nn.Module):
    def __new__(cls, *args, **kwargs):
        # Each compiled model gets a class of its own whose forward has its own code object, as each
        # fx GraphModule does. TorchDynamo keeps its compiled frames per code object, and every model's
        # graph module is of another class, so with one shared forward each model took an entry of
        # that one cache: past torch's recompile limit (8) torch.compile ran further models eagerly.
        if "forward" not in vars(cls):
            return super().__new__(cls)
        own = type(cls.__name__, (cls,), {"forward": _copy_function(cls.forward), "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__, "_named_class": cls})
        return super().__new__(own)

    def __reduce_ex__(self, protocol):
        # pickle cannot name the class of its own: it stores the class it was made from, and loading
        # makes a new one of its own
        return _unpickle_compiled_model, (getattr(type(self), "_named_class", type(self)),), self.__getstate__()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "graph_module":
            self._sign_forward()

    def __setstate__(self, state):
        super().__setstate__(state)
        # fx unpickles a plain GraphModule: this one's again (annotations, activation checkpointing)
        if self._modules.get("graph_module") is not None:
            self._modules["graph_module"] = restore(self._modules["graph_module"])
        self._sign_forward()
        self._follow_loaded_masks()  # (files saved before the hook existed)

    def _sign_forward(self) -> None:
        """Give this model's own forward the graph's signature (forward(self, x) rather than (*args,
        **kwargs)). torch.export binds dynamic_shapes by the forward's signature: with *args the usual
        export(cm, (x,), dynamic_shapes=({0: batch},)) was refused as a structure mismatch, and keyed by
        the model's argument names ({"x": ...}) too. Calls still go through *args / **kwargs."""
        own = type(self)
        gm = self._modules.get("graph_module")
        if "_named_class" not in vars(own) or gm is None:  # (a class shared with other models: leave it)
            return
        try:
            graph = inspect.signature(gm.forward)
        except (TypeError, ValueError):
            return
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        own.forward.__signature__ = graph.replace(parameters=[this, *graph.parameters.values()])

    def __init__(self, graph_module: fx.GraphModule, plan: Plan, history: list[PassRecord],
                 counters: collections.Counter, dense_weights: dict[str, tuple[str, str]], trace_method: str):
        super().__init__()
        self.graph_module = graph_module
        self.training = graph_module.training  # the mode the graph runs in (a new module says training)
        self.plan = plan
        self.history = history
        self.counters = collections.Counter(counters)
        self.kernels: dict[str, str] = {}              # kernel name -> Triton source
        self.kernel_manifest: dict[str, dict] = {}     # kernel name -> layers, shapes, dtypes, fused ops, launch config
        self.trace_method = trace_method
        self._dense_weights = dense_weights  # layer name -> (attribute path in graph_module, op)
        self.example_input_spec: list | None = None  # shapes / dtypes of the example inputs (see condense)
        self._input_leaves = _container_input_leaves(graph_module)
        plan.record_held_bytes(held_weight_bytes(graph_module))  # (a plan copied before shrink held the old sizes)
        self._follow_loaded_masks()

    def _follow_loaded_masks(self) -> None:
        if _patterns_from_loaded_masks not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_patterns_from_loaded_masks)

    def train(self, mode: bool = True):
        # a graph that fixed the train / eval mode it was traced in (frontend.capture), or one shrunk for
        # eval mode only, computes that mode's results whatever the flags say: switching is refused
        # instead of silently ignored
        fixed = getattr(self._modules.get("graph_module"), "fixed_training", None)
        if other_mode := getattr(self._modules.get("graph_module"), "layers_in_other_mode", None):
            raise InvalidInputError(
                f"this compiled model's graph holds layers {other_mode} in the other mode than the model's "
                f"({'training' if fixed else 'eval'}), as torch.export captured them: cm.{'train' if mode else 'eval'}() "
                f"would switch them too, as model.{'train' if mode else 'eval'}() does, and the graph cannot. Compile "
                f"the model with its layers in the modes you run it")
        if fixed is not None and bool(mode) != fixed:
            if not fixed and EVAL_ONLY_NOTE in self.plan.notes:
                raise InvalidInputError("this model was shrunk with eval_only=True: its folded constants hold for "
                                        "eval mode only, so cm.train() cannot switch it; shrink the unshrunk model "
                                        "without eval_only to train the result")
            raise InvalidInputError(
                f"this compiled model's graph was traced in {'training' if fixed else 'eval'} mode and fixes it "
                f"(see cm.plan's notes), so cm.{'train' if mode else 'eval'}() cannot switch it: compile the model "
                f"in the mode you run it, e.g. sparsec.compile(model.{'train' if mode else 'eval'}(), ...)")
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """.to(device) / .half() / .float() ...: a Triton kernel was generated for its layer's dtype and
        would compute with the old one (or fail) after a conversion, so one that changes the dtype of a
        Triton layer is refused before anything is converted."""
        from sparsec.runtime.direct_conv_layer import DirectSparseConv2d
        from sparsec.runtime.triton_linear import FusedEpilogue

        for m in self.modules():
            if isinstance(m, FusedEpilogue) and m.kernel_source is not None:
                before = m.packed.dtype_probe.dtype
                after = fn(torch.empty(0, dtype=before)).dtype
                if after != before:
                    raise InvalidInputError(
                        f"layer {m.layer_name!r} runs Triton kernel {m.kernel_name} generated for "
                        f"{dtype_name(before)}; converting the model to {dtype_name(after)} would need another "
                        f"kernel: convert the model "
                        f"first, then compile it (sparsec.compile(model.to({after}), ...)), or compile with "
                        f"backend='torch', whose layers convert")
            if isinstance(m, DirectSparseConv2d):  # (one kernel for every dtype it takes: the others are refused)
                from sparsec.codegen.direct_conv import dtype_problem

                after = fn(m.packed.dtype_probe)
                if problem := dtype_problem(after.dtype, after.device):
                    raise InvalidInputError(f"layer {m.layer_name!r} runs the direct sparse conv kernel, and converting "
                                            f"the model to {dtype_name(after.dtype)} on {after.device} would leave it "
                                            f"unable to run: {problem}. Compile the converted model instead "
                                            f"(sparsec.compile(model.to(...), ...))")

        self._refuse_dtypes_the_graph_fixed(fn)

        def keeping_non_float_dtypes(t: torch.Tensor) -> torch.Tensor:
            # Module.type(torch.float64) casts every tensor: masks (bool), 2:4 metadata (int16), int8 weights
            # and fan-in indices would become float (cm.mask() a float tensor, metadata unreadable). As .to(dtype)
            # and .double() do, only floating tensors change dtype; a device change applies to all. (Moved
            # as they are, not cast back: .type(torch.float16) rounds int16 metadata and indices above 2048.)
            out = fn(t)
            return out if t.is_floating_point() or out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keeping_non_float_dtypes, recurse)

    def _refuse_dtypes_the_graph_fixed(self, fn) -> None:
        """torch.export writes the example's dtypes into its graph (`x.to(x.dtype)` as a float32 constant, checks
        of each autocast region's input dtype): converted to another float dtype, such a graph failed with "Tensor
        dtype mismatch! Expected: Float, Got: double" or computed in the old dtype. Refused before converting."""
        gm = self._modules.get("graph_module")
        before = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        if gm is None or before is None:
            return
        after = fn(torch.empty(0, dtype=before)).dtype
        if after == before:
            return
        fixing = [node for module in gm.modules() if isinstance(module, fx.GraphModule) for node in module.graph.nodes
                  if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)  # (export's ops)
                  and before in tree_leaves((node.args, node.kwargs))]
        if fixing:
            node = fixing[0]
            where = (node.meta.get("stack_trace") or "").strip().splitlines()
            raise InvalidInputError(
                f"this compiled model's graph holds the dtype {dtype_name(before)} as a constant ({node.target} in "
                f"{node.name}{': ' + where[-1].strip() if where else ''}; {len(fixing)} such op(s)), as torch.export "
                f"writes the example's dtypes into it: converted to {dtype_name(after)} it would fail or compute in "
                f"{dtype_name(before)}. Convert the model first, then compile it "
                f"(sparsec.compile(model.to({after}), example inputs in {dtype_name(after)}))")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The checks run here, not in load_state_dict: a compiled model inside a larger one is loaded through
        # its parent's load_state_dict, which calls this with the parent's state dict and this model's prefix.
        keys = [k[len(prefix):] for k in state_dict if isinstance(k, str) and k.startswith(prefix)]
        own = self.state_dict(keep_vars=True)
        self._refuse_uncompiled_keys(keys, own)
        self._check_layer_forms(keys, own)
        for path, module in self.named_modules():  # every layer's incoming state, before any is copied
            if isinstance(module, RuntimeLayer):
                module.check_incoming(state_dict, f"{prefix}{path}.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _refuse_uncompiled_keys(self, keys: list[str], own: dict) -> None:
        # A state dict of the model before compiling (keys "fc2.weight", not "graph_module.fc2...") matches
        # none of this model's keys: torch's strict error did not say why, and strict=False loaded nothing
        # and returned, leaving the compiled weights as they were. Its sparse layers hold packed values
        # pruned from the weights compiled, so it cannot be mapped over either: refuse, naming the remedy.
        layer_weights = {f"{lp.name}.weight" for lp in self.plan}
        foreign = [k for k in keys if k not in own and (f"graph_module.{k}" in own or k in layer_weights)]
        if foreign:
            raise InvalidInputError(
                f"this state dict is keyed like the model before compiling ({', '.join(foreign[:4])}"
                f"{' ...' if len(foreign) > 4 else ''}): a compiled model's keys start with 'graph_module.' and its "
                f"sparse layers hold packed values pruned from the compiled weights, so it would load nothing "
                f"there. Load it into the uncompiled model and compile that (model.load_state_dict(sd); "
                f"sparsec.compile(model, ...)), or load a state dict saved from a compiled model (cm.state_dict())")

    def _check_layer_forms(self, keys: list[str], own: dict) -> None:
        """Refuse a state dict holding a sparse layer in another stored form than this model's. backend="auto"
        picks each layer's form by timing on the machine compiling (a kernel's packed values, or the pruned
        weight kept dense), so two compiles of one model can differ, and torch's error (missing mask_bits,
        unexpected meta, size mismatch) did not say why."""
        # (by layer path, in one pass over each dict's keys: a scan of all keys per layer was quadratic)
        layers = {path: m for path, m in self.named_modules() if isinstance(m, RuntimeLayer)}
        own_forms, their_forms = _form_keys(own, layers), _form_keys(keys, layers)
        for path, module in layers.items():
            ours, theirs = _stored_form(own_forms.get(path, set())), _stored_form(their_forms.get(path, set()))
            values = _values_form(own_forms.get(path, set())), _values_form(their_forms.get(path, set()))
            if ours == theirs and None not in values and values[0] != values[1]:
                # copied in place, level codes or int8 values became floats (or floats codes) silently with
                # strict=False, and strict loading said only "unexpected key(s) ...packed.table"
                raise InvalidInputError(
                    f"layer {module.layer_name!r} holds {values[0]} here and {values[1]} in this state dict: the "
                    f"state dict comes from a compile with another quantization (quantize=); compile with the saving "
                    f"model's plan (sparsec.compile(model, example_inputs=..., plan=saved.plan)), or save and load "
                    f"the whole model (sparsec.save / sparsec.load)")
            if ours and theirs and ours != theirs:
                raise InvalidInputError(
                    f"layer {module.layer_name!r} is stored here as {ours} and in this state dict as {theirs}: "
                    f"the state dict comes from a compile that ran it on another backend (backend='auto' chooses "
                    f"per layer by timing on the machine compiling, so two compiles can differ) or in another mode "
                    f"(train=True). Compile with the saving model's plan, whose entries record each layer's "
                    f"backend (sparsec.compile(model, example_inputs=..., plan=saved.plan)), or save and load the "
                    f"whole model (sparsec.save / sparsec.load)")

    def forward(self, *args, **kwargs):
        gm = self._modules["graph_module"]
        expected = self.__dict__.get("_input_leaves")  # (None for plain tensor inputs: nothing to check per call)
        if expected is not None:
            _check_container_inputs(expected, args, kwargs)
        if isinstance(self, FSDPModule) and not self.__dict__.get("_ranks_agree"):
            self._check_ranks_agree()
        fixed = getattr(gm, "fixed_arguments", None)
        if fixed is not None:
            cached = self.__dict__.get("_graph_parameters")  # (the graph's forward's, while it is that forward)
            if cached is None or cached[0] is not type(gm).forward:
                cached = self.__dict__["_graph_parameters"] = (type(gm).forward,
                                                               tuple(inspect.signature(gm.forward).parameters))
            args, kwargs = fixed.graph_call(cached[1], args, kwargs)
        try:
            if _hooked(gm):
                return gm(*args, **kwargs)
            # Calling forward directly skips nn.Module.__call__ and fx's error-reporting wrapper: about
            # 2.5 us of Python per call, a sizable part of a batch-1 layer on a GPU. Hooks still run (above).
            return gm.forward(*args, **kwargs)
        except (TypeError, AssertionError) as e:
            clearer = _call_error(gm, args, kwargs, e)
            if clearer is None:
                raise
            raise clearer from e

    def _check_ranks_agree(self) -> None:
        """At the first forward under fully_shard (every rank makes it: FSDP gathers weights in it), refuse
        fixed masks that differ between ranks. (SR-STE derives its masks from the gathered weight, the same
        on every rank; DDP copies rank 0's buffers, masks included, when it wraps the model.)"""
        fixed = {m.layer_name: m.weight_mask for m in self.graph_module.modules()
                 if isinstance(m, TrainableLayer) and m.weight_mask is not None and m.weight_update != "ste"}
        check_same_masks(fixed, "at the first forward under fully_shard", fsdp_groups(self))
        self.__dict__["_ranks_agree"] = True

    # ---- inspection

    def _layer_name(self, name: object) -> str:
        """`name`, checked to be a layer of the plan. A layer is named by its module path: an int used to
        reach plan[1] through the plan's indexing and was reported as a layer missing from the graph."""
        if not isinstance(name, str):
            raise InvalidTypeError(f"layers are named by their module path (a str), got {name!r}; "
                                   f"layers: {self.plan.names}")
        self.plan[name]  # KeyError listing the layers for an unknown name
        return name

    def packed_layers(self) -> list[str]:
        """The layers holding packed inference weights (every runtime layer but the trainable ones)."""
        return [m.layer_name for m in self._runtime_layers() if not isinstance(m, TrainableLayer)]

    def sparse_module(self, name: str) -> RuntimeLayer | None:
        """The module sparsec put in place of layer `name` (packed, Triton or trainable), if any."""
        return next((m for m in self._runtime_layers() if m.layer_name == name), None)  # (stops at it)

    def sparse_modules(self) -> dict[str, RuntimeLayer]:
        """Layer name -> the module sparsec put in its place, every one in one walk of the modules (for a loop
        over the plan: sparse_module per layer walked them all per layer, quadratic in the layer count)."""
        found = {}
        for module in self._runtime_layers():
            found.setdefault(module.layer_name, module)  # (the first, as sparse_module finds it)
        return found

    def _runtime_layers(self):
        return (m for m in self.graph_module.modules() if isinstance(m, RuntimeLayer))

    def _dense_weight(self, name: str, what: str) -> tuple[torch.Tensor, str]:
        """A dense layer's weight, checked whole for `what` (see `check_whole`)."""
        if name not in self._dense_weights:  # (self.plan[name] raises KeyError listing the layers for an unknown name)
            raise KeyError(f"layer {name!r} is in the plan but its weight is not in the compiled graph (never called, "
                           f"or computed inside the graph); its plan entry: {self.plan[name].reason}")
        path, op = self._dense_weights[name]
        owner, attr = owner_of(self.graph_module, path)
        weight = read_quietly(owner, attr)  # (not get_parameter: FSDP1 leaves a plain tensor)
        if not parametrize.is_parametrized(owner, attr):  # (a parametrization computes a plain tensor)
            check_whole(weight, self.plan[name].weight_shape, name, what)
        return weight, op

    def check_whole_weights(self, what: str) -> None:
        """Raise, naming the remedy, when a weight was flattened by FSDP1 (see `check_whole`)."""
        modules = self.sparse_modules()
        for lp in self.plan:
            module = modules.get(lp.name)
            if isinstance(module, TrainableLayer):
                check_whole(module.weight, lp.weight_shape, lp.name, what)
            elif module is None and lp.name in self._dense_weights:
                self._dense_weight(lp.name, what)

    def require_unsharded(self, what: str) -> None:
        """Raise, naming the remedy, unless this process holds every weight whole (`what` needs them):
        neither sharded by FSDP2 nor flattened by FSDP1."""
        refuse_sharded(self, what)
        self.check_whole_weights(what)

    @torch.no_grad()
    def effective_weight(self, name: str) -> torch.Tensor:
        """The dense weight layer `name` really computes with (decompressed, dequantized, masked),
        in the original weight's shape. Under FSDP (`fully_shard`) the whole weight, gathered from
        the ranks: every rank must call it."""
        module = self.sparse_module(self._layer_name(name))
        if isinstance(module, TrainableLayer):
            check_whole(module.weight, self.plan[name].weight_shape, name, "effective_weight")
        if module is not None:
            return _detached_copy(module.effective_weight(), module)
        weight, _ = self._dense_weight(name, "effective_weight")
        return full(weight.detach()).clone()

    @torch.no_grad()
    def mask(self, name: str) -> torch.Tensor:
        """Layer `name`'s sparsity mask (bool, original weight shape); all True for dense layers."""
        module = self.sparse_module(self._layer_name(name))
        if module is not None:
            return _detached_copy(module.mask(), module)
        weight, _ = self._dense_weight(name, "mask")
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    # ---- deployment after training

    def example_inputs_like(self) -> tuple:
        """Fresh inputs with the shapes and dtypes this model was compiled with (random floats, zeros)."""
        if self.example_input_spec is None:
            raise ValueError("this model was compiled without example inputs; pass example_inputs=(x,)")
        out = []
        for kind, shape, dtype, value in self.example_input_spec:
            if kind == "tensor":
                out.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
            else:
                out.append(value)
        return tuple(out)

    def condense(self, example_inputs=None, **options) -> CompiledModel:
        """After (SRigL) constant fan-in training: a new inference model with ablated neurons removed
        (their consumers adjusted: columns dropped, constant outputs folded into biases, see
        `sparsec.shrink`) and every fan-in layer condensed to values[n_active, k] + int32
        indices[n_active, k] from its learned mask; backend "auto" keeps a layer on the condensed
        kernel or a dense GEMM by measurement at the example batch. Outputs equal this model's.
        `options` go to `sparsec.compile` (e.g. backend="torch")."""
        from sparsec.api import compile as compile_model
        from sparsec.shrink import shrink

        packed = self.packed_layers()
        if packed:  # (shrink's refusal named shrink, which the caller never called)
            raise InvalidInputError(f"condense works on a model compiled with train=True (after fan-in / SRigL "
                                    f"training); layers {packed} of this one are already packed for inference")
        inputs = example_inputs if example_inputs is not None else self._condense_inputs()
        smaller = shrink(self, ragged_fanin=True)
        options.setdefault("pattern", "dense")  # layers not trained sparse stay dense
        condensed = compile_model(smaller, example_inputs=inputs, **options)
        condensed.shrink_report = smaller.shrink_report
        return condensed

    def _condense_inputs(self) -> tuple:
        """condense's example inputs when none are given: example_inputs_like(), converted as the model
        was after compiling. The recorded spec holds the compile-time dtype and no device, so a model
        compiled in float32 and then trained in bfloat16 (cm.to(torch.bfloat16)) got float32 inputs its
        layers refused ("the example inputs do not fit the model", though the caller passed none), and
        one moved to a GPU got CPU inputs."""
        weights = [p for p in self.parameters() if p.is_floating_point()]
        compiled = {lp.dtype for lp in self.plan}  # the layers' weight dtype when compiled
        dtypes, devices = {p.dtype for p in weights}, {p.device for p in weights}
        # Only a whole-model conversion is followed: with mixed dtypes, which input feeds which is unknown.
        old = compiled.pop() if len(compiled) == 1 else None
        new = dtypes.pop() if len(dtypes) == 1 else None
        device = devices.pop() if len(devices) == 1 else None

        def converted(t):
            if not isinstance(t, torch.Tensor):
                return t
            if new is not None and t.is_floating_point() and dtype_name(t.dtype) == old:
                t = t.to(new)
            return t if device is None else t.to(device)

        return tuple(converted(t) for t in self.example_inputs_like())

    def __repr__(self) -> str:
        return (f"CompiledModel(traced with {self.trace_method}, {len(self.plan.sparse_layers)} of {len(self.plan)} "
                f"layers sparse)\n{self.graph_module!r}")
