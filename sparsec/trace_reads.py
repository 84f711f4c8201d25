"""Parameters the forward computes with while symbolic_trace runs it, outside the graph.

symbolic_trace hands the forward proxies for the parameters it reads as attributes (`self.fc.weight`),
so what is computed from them is recorded. A parameter reached another way (`self.parameters()`,
`dict(self.named_parameters())`) is the tensor itself: an op on it runs while tracing, and the graph
keeps the result as a constant (`reg = sum(p.pow(2).sum() for p in self.parameters())`). That constant
does not follow later changes of the parameter, pruning included, so its layer must stay dense.
"""
from __future__ import annotations

import inspect
import threading
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten

from sparsec.tracing import TRACE_LOCK
from sparsec.passes.weight_reads import owner_of

# Tensor methods and properties that read no values (shape, dtype, device, flags): computing with
# them bakes nothing pruning changes.
_METADATA = {"shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device", "layout",
             "requires_grad", "requires_grad_", "is_leaf", "grad", "grad_fn", "is_cuda", "is_cpu", "is_meta",
             "is_sparse", "is_quantized", "is_mkldnn", "is_floating_point", "is_complex", "element_size",
             "itemsize", "nbytes", "stride", "storage_offset", "is_contiguous", "get_device", "names", "__len__",
             "__hash__", "data_ptr", "untyped_storage", "__repr__", "__format__"}

# In-place operator methods besides the `name_` ones (`self.steps += 1` is Tensor.__iadd__).
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


def _name(func) -> str:
    """'Tensor.pow', 'torch.sum', 'Tensor.shape' for what __torch_function__ is given."""
    full = (resolve_name(func) or getattr(func, "__name__", repr(func))).removesuffix(".__get__")
    return full.removeprefix("torch.")


class TraceTimeReads(TorchFunctionMode):
    """Active while symbolic_trace runs the forward: records, for each parameter of `model`, the first
    op that computes with its values without a proxy among its arguments (so the op is not recorded
    in the graph, its result is). `reads`: parameter path -> 'op at file:line in func: code'.

    `updates`: buffer path -> the in-place ops ('op at file:line ...') that changed the buffer with no
    proxy among their arguments: they ran on the buffer while tracing and are not in the graph
    (`self.ema.mul_(0.9)`, `self.steps += 1`). Active during an eager run, it records every in-place
    update of a buffer, which tells an update made on every call from one made once (lazy init)."""

    def __init__(self, model: nn.Module, user_frame, parameters: bool = True):
        super().__init__()
        # parameters=False: buffer updates only (an eager run reads every parameter without a proxy)
        self._paths = {id(p): path for path, p in model.named_parameters(remove_duplicate=False)} if parameters else {}
        self._buffers = {id(b): path for path, b in model.named_buffers(remove_duplicate=False)}
        self._user_frame = user_frame  # picks the user's frame out of a stack summary
        self.reads: dict[str, str] = {}
        self.updates: dict[str, set[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if not any(isinstance(a, fx.Proxy) for a in flat):
            read = [self._paths[id(a)] for a in flat if isinstance(a, nn.Parameter) and id(a) in self._paths]
            new = [path for path in read if path not in self.reads]
            if new and _name(func).rpartition(".")[2] not in _METADATA:
                where = self._user_frame(traceback.extract_stack()[:-1])
                for path in new:
                    self.reads[path] = _name(func) + (f" at {where}" if where else "")
            updated = [self._buffers[id(t)] for t in _written(func, args, kwargs) if id(t) in self._buffers]
            if updated:
                where = self._user_frame(traceback.extract_stack()[:-1])
                for path in updated:
                    self.updates.setdefault(path, set()).add(_name(func) + (f" at {where}" if where else ""))
        return func(*args, **kwargs)


def _written(func, args, kwargs) -> list:
    """The tensors (and the tensors they view) an in-place op or an out= argument writes."""
    name = _name(func).rpartition(".")[2]
    targets = tree_flatten(kwargs.get("out"))[0]
    in_place = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_") and name not in _METADATA)
    if args and in_place:
        targets.append(args[0])
    return [b for t in targets if isinstance(t, torch.Tensor) for b in (t, t._base) if b is not None]


def detach_constants(gm: fx.GraphModule) -> None:
    """Make the graph's tensor constants plain tensors: one computed from a parameter while tracing
    keeps the autograd history of that one computation, which a second backward through it would
    refuse (and which copy.deepcopy refuses outright)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, attr = owner_of(gm, node.target)
            value = getattr(owner, attr)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                setattr(owner, attr, value.detach())


def describe(reads: dict[str, str]) -> str:
    """A plan note for the parameters computed with while tracing."""
    paths = list(reads)
    shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
    return (f"the forward computed with parameter{'s' if len(paths) > 1 else ''} {shown} while it was traced, where "
            f"torch.fx sees the tensor, not a proxy (first by {next(iter(reads.values()))}): the graph holds the result "
            f"as a constant of the values at compile time, which does not follow pruning, training or "
            f"load_state_dict, and passes no gradient to them. Their layers are kept dense; to let sparsec prune them, read the parameters as module "
            f"attributes (self.fc.weight) so the computation is recorded in the graph")


class InlinedFunctions:
    """Active while symbolic_trace runs the forward: records the torch.autograd.Function subclasses the
    forward applies to proxies. Function.apply runs their forward on the proxies, so the graph holds the
    ops of that forward and not the Function: its custom backward (a straight-through estimator, a
    gradient reversal) is gone, and gradients through the compiled graph are those of the forward's
    ops. `functions`: class name -> 'file:line in func: code' of its first call. `every_call`: record
    each Function applied, proxies or not (torch.export traces through them on its own tensors too)."""

    def __init__(self, user_frame, every_call: bool = False):
        self._user_frame, self._every_call = user_frame, every_call
        self.functions: dict[str, str] = {}

    def __enter__(self):
        # One patch at a time (see tracing.TRACE_LOCK): two compiles at once each saved the other's
        # patch as the original, and the last to finish left one installed for good.
        TRACE_LOCK.acquire()
        try:
            self._patch()
        except BaseException:
            TRACE_LOCK.release()
            raise
        return self

    def _patch(self) -> None:
        # (looked up along the MRO, not in Function's own dict: torch versions differ in where apply lives;
        # the GPU image runs an older one)
        self._own = "apply" in torch.autograd.Function.__dict__
        self._original = inspect.getattr_static(torch.autograd.Function, "apply")
        original, functions, user_frame, every_call = (self._original.__func__, self.functions, self._user_frame,
                                                        self._every_call)
        thread = threading.get_ident()  # other threads' Functions are theirs, not the traced forward's

        def apply(cls, *args, **kwargs):
            own = cls.__module__.split(".")[0] in ("torch", "sparsec")  # torch's own (checkpoint: noted apart)
            if not own and cls.__qualname__ not in functions and threading.get_ident() == thread and (
                    every_call or any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0])):
                functions[cls.__qualname__] = user_frame(traceback.extract_stack()[:-1]) or ""
            return original(cls, *args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)

    def __exit__(self, *exc):
        try:
            if self._own:
                torch.autograd.Function.apply = self._original
            else:
                del torch.autograd.Function.apply
        finally:
            TRACE_LOCK.release()
        return False


def describe_inlined(functions: dict[str, str]) -> str:
    """A plan note for autograd Functions symbolic_trace traced through (a training compile only)."""
    names = list(functions)
    where = next(iter(functions.values()))
    return (f"the forward applies torch.autograd.Function {', '.join(names)}{' (at ' + where + ')' if where else ''}, "
            f"which torch.fx traces through: the compiled graph runs {'their' if len(names) > 1 else 'its'} forward "
            f"ops but not {'their' if len(names) > 1 else 'its'} custom backward, so gradients through "
            f"{'them' if len(names) > 1 else 'it'} differ from the model's. To keep the backward, make the module "
            f"that applies it a leaf (leaf_modules=['its.name'])")
