"""Capture a model with torch.fx.symbolic_trace: frontend.capture's first way, and the checks on its graph.

symbolic_trace runs forward on proxies and records the ops, keeping `nn.Linear` / `nn.Conv2d` as
`call_module` nodes named by module path (the nicest graph to rewrite). What it records is not always
what the model computes: Python state, buffer updates made in Python, a random draw on no traced value
and the train / eval mode are fixed at trace time. So the graph is run against the model on the example
inputs, and kept only where it computes the same; what it still does not keep (a counter, a buffer
update, hooks on the model, checkpointing) is said in a note.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from sparsec.errors import TraceError
from sparsec.example_inputs import fresh_inputs, model_arguments
from sparsec.export_mode import fixed_mode_note, in_other_mode, other_mode_note
from sparsec.fx_tracer import Tracer, modes_kept
from sparsec.graph_module import SparsecGraphModule
from sparsec.state import preserved_state
from sparsec.trace_reads import InlinedFunctions, TraceTimeReads, describe_inlined, detach_constants
from sparsec.trace_reads import describe as describe_trace_time_reads
from sparsec.user_code import user_code_frame


@dataclasses.dataclass
class SymbolicTrace:
    """What symbolic_trace made of a model: the graph module and its notes, or why there is none."""
    gm: SparsecGraphModule | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    failure: BaseException | None = None
    ran_model: bool = False  # the model ran on the example inputs (so they fit it)
    saw_checkpoint: bool = False  # a trace ran into a torch.utils.checkpoint call


def trace_symbolically(model: nn.Module, example_inputs: tuple | None, new_tracer: Callable[[], Tracer],
                       train: bool) -> SymbolicTrace:
    """The model traced by `new_tracer()`'s tracers, checked against the model on the example inputs."""
    concrete = _concrete_args(model, example_inputs)
    # None and bool arguments as graph inputs first: the graph then takes any value there (a mask
    # passed on to attention). Where that graph cannot be traced (`if flag:`) or does not compute what
    # the model does on the example inputs (`if mask is not None:` is always true of a graph input),
    # as the values they have: the graph follows the example's path and asserts each call passes the same.
    traced, eager, graph_run, failure = False, None, None, None
    # in-place buffer updates of the eager example run (see _lost_buffer_updates)
    eager_updates = TraceTimeReads(model, user_code_frame, parameters=False)
    # Python state the forward changes (`self.calls += 1`, `self.cache = y`): made while tracing and made
    # again by the eager run, it is made on every call, and the graph does not make it (see PythonAttributes)
    before_trace, traced_changes, eager_changes = PythonAttributes(model), set(), set()
    tracers = []  # (each attempt's: whether one traced into a torch.utils.checkpoint call)
    for values in ([{}, concrete] if concrete else [{}]):
        tracer, reads = new_tracer(), TraceTimeReads(model, user_code_frame)
        tracers.append(tracer)
        functions = InlinedFunctions(user_code_frame)
        try:
            try:
                with reads, functions, modes_kept():
                    graph = tracer.trace(model, concrete_args=values or None)
            finally:
                traced_changes |= before_trace.changed()
                before_trace.restore_proxies()  # a graph value left on the model would leak into later runs
            _keep_argument_names(graph, values)
            gm = SparsecGraphModule(tracer.root, graph, type(model).__name__)
            # the model's own flag only: its submodules (the model's, in the graph) keep theirs, such as
            # a BatchNorm frozen in eval inside a training model (gm.train() would set it training)
            gm.training = model.training
        except Exception as fx_error:  # noqa: BLE001 - any tracing failure means: try the next way
            failure = fx_error
            continue
        if example_inputs is not None:
            if eager is None:
                traced_state = PythonAttributes(model)
                with eager_updates:
                    eager = example_run(model, example_inputs)
                eager_changes = traced_state.changed()
                if eager_changes & traced_changes:  # on every call, or once (a lazy init): a second call tells
                    second = PythonAttributes(model)
                    example_run(model, example_inputs)
                    eager_changes &= second.changed()
                traced_state.restore()  # the model as the trace left it (a lazy initialisation kept)
            with PythonAttributes(model).kept():  # the graph calls leaf modules, which may change theirs
                graph_run = example_run(gm, example_inputs)
        last = values is concrete or not concrete
        # a graph that computes something else than the model on the example inputs is not the model
        # (a random draw or Python state fixed at trace time): torch.export, which records such ops, or
        # an error. Where the model itself fails on the example, the passes' shape run reports it.
        # (Python state changed on every call makes the eager run differ: the graph stays, with a note)
        per_call = traced_changes & eager_changes
        if example_inputs is None or _same_outputs(eager, graph_run) or (last and (eager is None or per_call)):
            traced = True
            break
        failure = TraceError(
            "the traced graph does not compute what the model does on the example inputs"
            + (" (it fails on them)" if graph_run is None else " (its outputs differ)")
            + ": the forward depends on something torch.fx fixes while tracing (a random op on no traced "
              "value, Python state, ...)")
    if not traced:
        return SymbolicTrace(failure=failure, ran_model=eager is not None,
                             saw_checkpoint=any(t.saw_checkpoint for t in tracers))

    notes = (_lost_buffer_updates(model, eager, graph_run, reads.updates,
                                  eager_updates.updates if example_inputs is not None else None)
             + _root_hooks(model) + _checkpoint_note(tracer)
             + lost_attribute_updates(per_call if example_inputs is not None else traced_changes))
    if train and functions.functions:  # inference runs the forward, which the graph computes exactly
        notes.append(describe_inlined(functions.functions))
    if getattr(model, "fixed_arguments", None) is not None:  # a compiled export graph's (see fixed_arguments.py)
        gm.fixed_arguments = model.fixed_arguments
    inherited = getattr(model, "fixed_training", None)  # a compiled graph compiled again keeps its mode
    if inherited is not None:
        gm.fixed_training = inherited
        if other_mode := getattr(model, "layers_in_other_mode", None):
            gm.layers_in_other_mode = other_mode
            notes.append(other_mode_note(inherited, other_mode))
        else:
            notes.append(fixed_mode_note(inherited, "the compiled graph it was traced from fixed it"))
    elif _reads_training_mode(model, new_tracer, values, graph, before_trace):
        gm.fixed_training = model.training
        notes.append(fixed_mode_note(model.training, "its forward reads self.training (F.dropout(training="
                                                     "self.training), ...), which symbolic_trace fixes"))
    # Parameters computed with outside the graph: its constants hold their values (see trace_reads);
    # a compiled graph compiled again holds the constants its own trace made.
    gm.trace_time_reads = {**getattr(model, "trace_time_reads", {}), **reads.reads}
    detach_constants(gm)
    if gm.trace_time_reads:
        notes.append(describe_trace_time_reads(gm.trace_time_reads))
    return SymbolicTrace(gm=gm, notes=notes, ran_model=eager is not None)


def _reads_training_mode(model: nn.Module, new_tracer, concrete: dict, graph: fx.Graph, start: PythonAttributes) -> bool:
    """Whether the traced graph depends on the model's train / eval mode: traced again in the other
    mode, its code differs (leaf modules such as nn.Dropout and BatchNorm read their own flag when
    called, and need nothing; a functional F.dropout(training=self.training) is fixed in the graph)."""
    # The first trace's code and tensor constants, read now: restoring the state it started from removes the
    # constants, and the second trace sets its own under the same names (compared after the state came back,
    # they were the first trace's on both sides, and a mode-dependent constant went unseen)
    first = _code_and_constants(model, graph)
    with in_other_mode(model), PythonAttributes(model).kept():
        start.restore()  # the Python state the first trace started from: a counter traced again would differ
        try:
            other = new_tracer().trace(model, concrete_args=concrete or None)
        except Exception:  # noqa: BLE001 - not traceable in the other mode: it does depend on it
            return True
        _keep_argument_names(other, concrete)
        return not _same_code(first, _code_and_constants(model, other))


# The names torch.fx gives the tensor constants a trace sets on the root: _tensor_constant0, 1, ...
_TENSOR_CONSTANT = re.compile(r"_tensor_constant\d+")


def _code_and_constants(root: nn.Module, graph: fx.Graph) -> tuple[str, list]:
    """A trace's code with its tensor constants numbered in the order it names them (each trace names
    its own afresh), and their values."""
    src = graph.python_code("self").src
    names = list(dict.fromkeys(_TENSOR_CONSTANT.findall(src)))
    code = _TENSOR_CONSTANT.sub(lambda m: f"_tensor_constant#{names.index(m.group())}", src)
    return code, [getattr(root, name) for name in names]


def _same_code(first: tuple[str, list], other: tuple[str, list]) -> bool:
    """Whether two traces (as _code_and_constants reads them) run the same code: constants by value."""
    (code, constants), (other_code, other_constants) = first, other
    return code == other_code and all(
        type(a) is type(b) and (not isinstance(a, torch.Tensor) or (a.shape == b.shape and torch.equal(a, b)))
        for a, b in zip(constants, other_constants))


def example_run(module: nn.Module, example_inputs: tuple) -> tuple[list, dict] | None:
    """The module's outputs (flattened) and its buffers after one run on the example inputs, with the
    same random draws every time; its state and the random streams are restored. None if it fails
    (bad inputs are reported with their context by the compile's own run)."""
    try:
        with torch.no_grad(), preserved_state(module):
            torch.manual_seed(0)
            # forward directly: GraphModule.__call__ prints a whole traceback to stderr when the graph fails,
            # which a probe run that may fail (a graph taking None as a tensor) must not; and the model's own
            # hooks are not part of the graph (see _root_hooks), so the model's run leaves them out too
            args, kwargs = model_arguments(module, fresh_inputs(example_inputs))
            outputs = tree_flatten(module.forward(*args, **kwargs))[0]
            return outputs, {name: buf.detach().clone() for name, buf in module.named_buffers()}
    except Exception:  # noqa: BLE001
        return None


def _same_outputs(eager, graph_run) -> bool:
    """Whether the graph computed what the model did on the example inputs (both `example_run`s)."""
    if eager is None or graph_run is None:
        return False
    expected, got = eager[0], graph_run[0]
    return len(expected) == len(got) and all(_same_value(a, b) for a, b in zip(expected, got))


def _same_value(a, b) -> bool:
    """One output leaf of each run: tensors by value (and dtype: autocast shows there); other values by ==,
    field by field for dataclasses (pytree keeps them whole), equal where they cannot be compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or (a.shape, a.dtype) != (b.shape, b.dtype):
            return False
        if a.device != b.device or a.device.type == "meta":  # (meta tensors hold no values to compare)
            return a.device == b.device
        if not (a.is_floating_point() or a.is_complex()):
            return bool(torch.equal(a, b))
        # rounding differs between runs (kernel paths, threads: 2e-7 on a TransformerEncoderLayer), so compare
        # at the outputs' own scale: what this looks for (a fixed random draw, a lost branch) is not that small
        scale = float(a.detach().abs().nan_to_num(0, 0, 0).max()) if a.numel() else 0.0
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), equal_nan=True))
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(_same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if type(a).__eq__ is object.__eq__:  # compared by identity: two runs never give the same object
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - not comparable: no sign of a difference
        return True


def _concrete_args(model: nn.Module, example_inputs: tuple | None) -> dict[str, Any]:
    """Arguments symbolic_trace can take as the values they have, not as graph inputs: None and
    bools, passed in the example inputs or left at their defaults (see capture)."""
    try:
        signature = inspect.signature(model.forward)
        args, kwargs = model_arguments(model, example_inputs or ())
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for name, p in signature.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = bound.arguments.get(name, p.default)
        if value is not p.empty and (value is None or isinstance(value, bool)):
            concrete[name] = value
    return concrete


def _keep_argument_names(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """symbolic_trace renames the inputs it takes as values (mask -> mask_1), so cm(x, mask=...)
    would be refused as an unknown keyword; give them back the forward's names."""
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target not in concrete:
            base = node.target.rpartition("_")[0]
            if base in concrete and base not in taken:
                node.target = base
                taken.add(base)


def own_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on `module` itself ("forward_pre", "forward", "backward_pre", "backward")."""
    return [kind for kind in ("forward_pre", "forward", "backward_pre", "backward")
            if getattr(module, f"_{kind}_hooks", None)]


def _checkpoint_note(tracer: Tracer) -> list[str]:
    """A note on the forward's torch.utils.checkpoint calls: kept (train=True), or not."""
    outermost = [p for p in dict.fromkeys(tracer.checkpointed)
                 if not any(p.startswith(q + ".") for q in tracer.checkpointed if q != p)]
    if not outermost and not tracer.checkpoint_tags.kept:
        return []
    modules = f"{', '.join(outermost[:4])}{' ...' if len(outermost) > 4 else ''}" or "its checkpointed code"
    if not tracer.keep_checkpoints:
        return [f"the forward runs {modules} under torch.utils.checkpoint, which an inference compile does not "
                f"keep: the compiled model computes the same but stores their activations for backward (more "
                f"memory if it is trained: compile with train=True, which keeps checkpointing)"]
    return [f"the forward runs {modules} under torch.utils.checkpoint: the compiled model does too (reentrant "
            f"where the call is, with its context_fn where it passes one), recomputing them in backward"]


def _root_hooks(model: nn.Module) -> list[str]:
    """A note for hooks on the model itself: tracing records forward only, so they do not run."""
    hooks = own_hooks(model)
    return [f"the model's own {' / '.join(hooks)} hooks are not part of the compiled model (tracing records forward "
            f"only); register them on the compiled model if they are still needed"] if hooks else []


def _lost_buffer_updates(model: nn.Module, eager, graph_run, traced_updates: dict[str, set[str]],
                         eager_updates: dict[str, set[str]] | None) -> list[str]:
    """A note when the model's forward updates buffers in Python code (`self.steps += 1`) that
    symbolic_trace does not record (updates inside leaf modules, like BatchNorm's running stats, are
    kept): the compiled model would never update them. Compares the buffers after the model's and the
    graph's example runs (`example_run`) with the model's own; and names a buffer an in-place op
    changed while tracing, outside the graph (trace_reads), where the eager example run makes the same
    update again (so it is made on every call, not once, as a lazy initialisation is): the values can
    agree after one run, `self.ema.mul_(0.9).add_(...)` from a zero ema loses the decay only from the
    second call on. Without example inputs every such update is named."""
    lost = []
    if eager is not None and graph_run is not None:
        before = dict(model.named_buffers())
        lost = [name for name, value in eager[1].items()
                if not _same(value, before.get(name)) and not _same(value, graph_run[1].get(name))]
    lost += [name for name, ops in traced_updates.items()
             if name not in lost and (eager_updates is None or ops & eager_updates.get(name, set()))]
    if not lost:
        return []
    # (the module whose forward makes the update is not known here, only the buffer's owner, which a parent may
    # update: the remedy names no module; a leaf is a submodule, so an update in the model's own forward can only
    # move out of it)
    remedy = ("make the module whose forward makes the update a leaf (leaf_modules=['its.path']) or move the update "
              "out of forward; an update in the model's own forward can only move out of it")
    return [f"the model's forward updates buffer{'s' if len(lost) > 1 else ''} {lost} in Python code that "
            f"torch.fx does not record: the compiled model does not make "
            f"{'those updates' if len(lost) > 1 else 'that update'}. To keep the update, {remedy}"]


# nn.Module's own attributes (hook dicts, flags): the rest of a module's __dict__ is the user's Python state
_MODULE_OWN = frozenset(vars(nn.Module())) | {"_parameters", "_buffers", "_modules", "training"}


class PythonAttributes:
    """A snapshot of the plain attributes of every module of a model (not parameters, buffers or
    submodules): Python state a forward may change, which a traced graph does not record."""

    def __init__(self, model: nn.Module):
        # (a graph module's attributes are fx's bookkeeping, `_lineno_map` set on every call: no user state)
        self._modules = [(path, m) for path, m in model.named_modules() if not isinstance(m, fx.GraphModule)]
        self._saved = self._now()
        self._buffers = {path: dict(m._buffers) for path, m in self._modules}  # (`self.buf = y` in a trace)

    def _now(self) -> dict:
        # (a list / dict / set by the identity of its items too: `self.history.append(y)` changes it in place)
        return {(path, key): (value, [(id(k), id(v)) for k, v in value.items()] if isinstance(value, dict) else
                              [id(v) for v in value] if isinstance(value, (list, set)) else None)
                for path, m in self._modules for key, value in vars(m).items() if key not in _MODULE_OWN}

    def changed(self) -> set[str]:
        now = self._now()
        return {f"{path}.{key}" if path else key for (path, key) in now.keys() | self._saved.keys()
                if not _same_attribute(self._saved.get((path, key)), now.get((path, key)))}

    def restore(self, proxies_only: bool = False) -> None:
        saved = {}  # path -> {key: value}: each module's own entries (a scan of all per module was quadratic)
        for (path, key), (value, _) in self._saved.items():
            saved.setdefault(path, {})[key] = value
        for path, m in self._modules:
            own = saved.get(path, {})
            for key in [k for k in vars(m) if k not in _MODULE_OWN and k not in own]:
                if not proxies_only or _has_proxy(vars(m)[key]):
                    delattr(m, key)
            for key, value in own.items():
                missing, now = key not in vars(m), vars(m).get(key)
                if (missing or now is not value) and (not proxies_only or _has_proxy(now)):
                    setattr(m, key, value)  # (a list changed in place comes back as the same changed list)
            for key, value in m._buffers.items():
                if isinstance(value, fx.Proxy):
                    m._buffers[key] = self._buffers[path].get(key)

    def restore_proxies(self) -> None:
        self.restore(proxies_only=True)

    @contextlib.contextmanager
    def kept(self):
        try:
            yield
        finally:
            self.restore()


def _same_attribute(a, b) -> bool:
    if a is None or b is None:
        return a is b
    (x, xs), (y, ys) = a, b
    return (x is y and xs == ys) or (type(x) is type(y) and isinstance(x, (int, float, str, bytes)) and x == y)


def _has_proxy(value) -> bool:
    return any(isinstance(v, fx.Proxy) for v in tree_flatten(value)[0])


def lost_attribute_updates(names: set[str], tracer: str = "torch.fx") -> list[str]:
    """A note for Python state the forward changes on every call, which the graph neither changes nor reads
    anew (it holds the value it had while traced). fx's own tensor constants (`torch.arange(64)` in forward
    sets _tensor_constant0 on the root while tracing) are not the model's state."""
    shown = sorted(name for name in names if not _TENSOR_CONSTANT.fullmatch(name))
    if not shown:
        return []
    owners = sorted({name.rpartition(".")[0] for name in shown} - {""})
    remedy = ("Keep such state out of forward" + (f", or make the module that keeps it a leaf "
                                                   f"(leaf_modules={owners!r})" if owners else ""))
    # ("where it reads them": a cache built lazily from the input is computed afresh by the graph, right)
    return [f"the model's forward changes {'attributes' if len(shown) > 1 else 'attribute'} {shown} in Python code "
            f"on every call (a counter, a cache): the graph {tracer} traced does not make "
            f"{'those changes' if len(shown) > 1 else 'that change'}, and where it reads "
            f"{'them' if len(shown) > 1 else 'it'} it holds the value{'s they' if len(shown) > 1 else ' it'} had "
            f"while traced. {remedy}"]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))

