"""Capture a model as a torch.fx graph: symbolic_trace first, torch.export(strict=False) second.

symbolic_trace keeps `nn.Linear` / `nn.Conv2d` as `call_module` nodes named by module path, which
is the nicest graph to rewrite. It fails on data-dependent Python, iteration or item assignment on
proxies and much third-party code; torch.export runs the model on the example inputs instead and
records the module path of every op in `nn_module_stack`. When both fail, the error names each
call, the line of the user's code it failed on, and what to do about it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import io
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from sparsec.distributed import GATHER_RECIPE, any_sharded
from sparsec.errors import ExampleInputError, InvalidTypeError, ParameterWriteError, TraceError
from sparsec.example_inputs import describe_inputs, fresh_inputs, model_arguments
from sparsec.export_mode import ModeFlag, follow_mode
from sparsec.checkpointing import (ExportTags, checkpoint_call, disabling_grad_by_hand, in_reentrant_checkpoint,
                                   reentrant_calls_run_plainly, reentrant_calls_through, tag_exported)
from sparsec.graph_module import TRACE_LOCK, RecordOperators, SparsecGraphModule, ThreadTracer
from sparsec.runtime.guard import InputGuard, ShapeGuard
from sparsec.runtime.layers import RuntimeLayer
from sparsec.runtime.train_offset import TrainOffset
from sparsec.state import preserved_state
from sparsec.trace_reads import InlinedFunctions, TraceTimeReads, describe_inlined, detach_constants
from sparsec.trace_reads import describe as describe_trace_time_reads

_TORCH_DIR = os.path.dirname(torch.__file__)
# sparsec's own code: the package and its passes / codegen subpackages (separate folders in the source tree)
_SPARSEC_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (
    __file__, importlib.util.find_spec("sparsec.passes").origin, importlib.util.find_spec("sparsec.codegen").origin))


def user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the traceback that is the user's code, as 'file:line in func: code'."""
    return user_code_frame(traceback.extract_tb(exc.__traceback__))


def user_code_frame(frames: traceback.StackSummary) -> str | None:
    """The innermost of `frames` that is the user's code (not torch's, not sparsec's), as 'file:line in func: code'."""
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_SPARSEC_DIRS) or "<" in frame.filename):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text[:400]}"


class _Tracer(ThreadTracer):
    """fx tracer that also treats user-named modules (types, names, excluded names) as leaves."""

    # Defaults matter: a pickled GraphModule re-creates its tracer class with no arguments on load.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: tuple[str, ...] = (), leaf_regexes: tuple[str, ...] = (),
                 generated: bool = False, keep_checkpoints: bool = False):
        super().__init__()
        self.keep_checkpoints = keep_checkpoints  # train=True: the graph runs its checkpoint calls again
        self.leaf_types, self.leaf_names, self.leaf_regexes = leaf_types, leaf_names, leaf_regexes
        self.checkpointed: list[str] = []  # modules the forward ran under torch.utils.checkpoint
        self.saw_checkpoint = False  # any op traced inside a torch.utils.checkpoint call
        # generated: tracing a compiled graph's own code (compiled again). There, ops reading no graph
        # input (an export graph's buffer updates `aten.add_(steps, 1)`, a fixed-shape `aten.randn`) are
        # graph ops to record, not Python to run once while tracing (they were: updates lost, noise
        # a constant). A user's model keeps plain tracing: `self.steps += 1` would assign a proxy to a
        # proxied buffer.
        self.generated = generated
        self.proxy_buffer_attributes = generated

    def trace(self, root, concrete_args=None):
        self.modes = _grad_and_autocast()
        with RecordOperators(self) if self.generated else contextlib.nullcontext(), self._no_grad_in_reentrant_checkpoints():
            return super().trace(root, concrete_args)

    @contextlib.contextmanager
    def _no_grad_in_reentrant_checkpoints(self):
        """Refuse torch.no_grad() of the model's own inside a reentrant checkpoint, where it is set. The
        checkpoint runs its function under no_grad already, so ops see no mode change (create_proxy), and
        the graph dropped it: the recomputation in backward sent gradients through, unlike the model's.
        Likewise a reentrant checkpoint called under the model's own no_grad: its ops saw the no_grad they
        expect inside a reentrant call, and the graph dropped the model's (the frozen branch trained)."""
        setting = []

        def watched(mode: bool):
            # (`setting`: torch function modes (TraceTimeReads) get the call and make it again, from their code)
            if not self.tracing_here() or setting:
                return set_grad_enabled(mode)
            if not mode and in_reentrant_checkpoint() and disabling_grad_by_hand():
                self.saw_checkpoint = True  # (the export fallback says it drops the checkpointing)
                raise TraceError("the forward calls torch.no_grad() (or set_grad_enabled(False)) inside a reentrant "
                                 "torch.utils.checkpoint call, which runs it under no_grad already, so torch.fx "
                                 "cannot tell the two apart")
            setting.append(mode)
            try:
                return set_grad_enabled(mode)
            finally:
                setting.pop()

        def checked(apply):
            def call(function, preserve_rng_state, *args):
                # grad is on where a reentrant call is made, but inside another one (which turned it off)
                if self.tracing_here() and torch.is_grad_enabled() != (self.modes[0] and not in_reentrant_checkpoint()):
                    self.saw_checkpoint = True
                    raise TraceError("the forward makes a reentrant torch.utils.checkpoint call under a grad mode of "
                                     "its own (torch.no_grad()), and the call runs its function under no_grad itself, "
                                     "so torch.fx cannot tell the two apart")
                return apply(function, preserve_rng_state, *args)
            return call

        # (one trace at a time, from before it reads the original: a trace waiting for its turn that had patched
        # already saw the running trace's patch as the original, and put it back for good when it finished,
        # after the running trace had restored the real one, so that this trace ran without the patch)
        with TRACE_LOCK, reentrant_calls_through(checked):
            set_grad_enabled = torch._C._set_grad_enabled
            torch._C._set_grad_enabled = watched
            try:
                yield
            finally:
                torch._C._set_grad_enabled = set_grad_enabled

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        # fx records ops, not the grad / autocast mode they ran in: an op under `with torch.no_grad():`
        # became one that trains (a frozen branch's weights got gradients) and one under autocast ran in
        # float32. Refuse, so that torch.export (which records those regions) captures the model instead.
        # (Also for train=False: a compiled model computes gradients, e.g. for its inputs or other modules.)
        # (Reentrant torch.utils.checkpoint runs its function under no_grad, and recomputes it with grad:
        # that grad mode only is expected there. Any mode change inside a checkpoint was let through
        # before, and a non-reentrant call's own `with torch.no_grad():` was dropped from the graph,
        # which then sent gradients through it; autocast inside a checkpoint is never the checkpoint's.)
        expected = self.modes
        if checkpoint_call() is not None:
            self.saw_checkpoint = True  # (the export fallback, which inlines them, says so: capture())
            if in_reentrant_checkpoint():
                expected = (False, *self.modes[1:])
        modes = _grad_and_autocast()
        if kind not in ("placeholder", "get_attr", "output") and modes != expected:
            where = user_code_frame(traceback.extract_stack()[:-1])
            mode = ("torch.inference_mode() of its own" if modes[1] and not expected[1] else
                    "a grad or autocast mode of its own (torch.no_grad(), torch.autocast(...))")
            raise TraceError(f"the forward calls {getattr(target, '__name__', target)} under {mode}, which torch.fx "
                             f"does not record" + (f" (at {where})" if where else ""))
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # Tracing runs through torch.utils.checkpoint like any Python (the nodes are tagged with the call,
        # see ThreadTracer): note which modules it checkpoints.
        if self.tracing_here() and checkpoint_call() is not None:
            self.checkpointed.append(self.path_of_module(m))
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_names:
            return True
        if module_qualified_name and any(re.fullmatch(p, module_qualified_name) for p in self.leaf_regexes):
            return True
        # sparsec's own modules in a compiled graph compiled again: its layers, the input check of a
        # torch.export graph (which would raise on proxies if traced into, and must keep checking), and
        # modules that read self.training at run time (traced into, the trace would fix the mode)
        if isinstance(m, (nn.Linear, nn.Conv2d, RuntimeLayer, InputGuard, ModeFlag, TrainOffset)):
            return True
        # fx treats every torch.nn module as a leaf. Built-ins that contain layers of their own
        # (MultiheadAttention, TransformerEncoderLayer, ...) are traced into instead, so their
        # Linear layers become candidates; where their Python is untraceable, torch.export takes over.
        if super().is_leaf_module(m, module_qualified_name):
            return not any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in m.modules() if c is not m)
        return False


class _InferenceModeInside(TorchFunctionMode):
    """While torch.export captures: where the forward first runs an op under a torch.inference_mode() of its
    own, which export does not record (the compiled model trained the code inside)."""

    def __init__(self):
        super().__init__()
        self.outer, self.where = torch.is_inference_mode_enabled(), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # (not while dynamo traces torch.cond's branches: it refuses the query, and the export failed)
        if not torch.compiler.is_dynamo_compiling() and self.where is None and not self.outer and torch.is_inference_mode_enabled():
            self.where = user_code_frame(traceback.extract_stack()[:-1]) or f"at {getattr(func, '__name__', func)}"
        return func(*args, **(kwargs or {}))


def _inference_mode_inside(where: str) -> str:
    return (f"the forward runs ops under torch.inference_mode() ({where}), which neither torch.fx nor torch.export "
            f"records (the graph computed them with gradients): use torch.no_grad() there, which torch.export "
            f"records, or call the whole model under torch.inference_mode()")


@contextlib.contextmanager
def _modes_kept():
    """The grad and autocast modes as they were, after a trace too. A trace that fails inside a region a
    graph sets (torch.export's wrap_with_set_grad_enabled(False, ...) in a compiled graph compiled again,
    whose exit is not in a finally) left grad off for the whole process, and the export fallback traced
    every op under no_grad: the compiled model dropped the region, and training after it computed nothing."""
    grad, _, autocast = _grad_and_autocast()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        for device, (enabled, dtype) in zip(_autocast_devices(), autocast):
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


def _autocast_devices() -> list[str]:
    return [d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d)]


def _grad_and_autocast() -> tuple:
    """The grad mode and the autocast state that ops run under (see _Tracer.create_proxy)."""
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices())
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


def capture(model: nn.Module, example_inputs: tuple | None, leaf_modules: tuple = (),
            exclude: tuple[str, ...] = (), train: bool = False) -> tuple[SparsecGraphModule, str, list[str]]:
    """Trace `model` (sparsec's own copy). Returns (graph module, method, notes). `train`: the graph is
    compiled for training (a note names autograd Functions whose custom backward the trace drops)."""
    _check_root_is_traceable_as_called(model)
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaf_names = tuple(t for t in leaf_modules if isinstance(t, str))
    bad = [t for t in leaf_modules if not isinstance(t, (type, str))]
    if bad:
        raise InvalidTypeError(f"leaf_modules= takes module classes or module names, got {bad!r}")
    # An excluded module is not traced into either: that is the remedy for untraceable submodules.
    concrete = _concrete_args(model, example_inputs)
    # None and bool arguments as graph inputs first: the graph then takes any value there (a mask
    # passed on to attention). Where that graph cannot be traced (`if flag:`) or does not compute what
    # the model does on the example inputs (`if mask is not None:` is always true of a graph input),
    # as the values they have: the graph follows the example's path and asserts each call passes the same.
    traced, eager, graph_run = False, None, None
    # in-place buffer updates of the eager example run (see _lost_buffer_updates)
    eager_updates = TraceTimeReads(model, user_code_frame, parameters=False)
    # (a compiled graph compiled again is generated code: see _Tracer.generated)
    generated = isinstance(model, fx.GraphModule)
    new_tracer = lambda: _Tracer(leaf_types, leaf_names, _regexes(exclude), generated, train)  # noqa: E731
    # Python state the forward changes (`self.calls += 1`, `self.cache = y`): made while tracing and made
    # again by the eager run, it is made on every call, and the graph does not make it (see _Attributes)
    before_trace, traced_changes, eager_changes = _Attributes(model), set(), set()
    tracers = []  # (each attempt's: whether one traced into a torch.utils.checkpoint call)
    for values in ([{}, concrete] if concrete else [{}]):
        tracer, reads = new_tracer(), TraceTimeReads(model, user_code_frame)
        tracers.append(tracer)
        functions = InlinedFunctions(user_code_frame)
        try:
            try:
                with reads, functions, _modes_kept():
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
            symbolic_failure = fx_error
            continue
        if example_inputs is not None:
            if eager is None:
                traced_state = _Attributes(model)
                with eager_updates:
                    eager = _example_run(model, example_inputs)
                eager_changes = traced_state.changed()
                if eager_changes & traced_changes:  # on every call, or once (a lazy init): a second call tells
                    second = _Attributes(model)
                    _example_run(model, example_inputs)
                    eager_changes &= second.changed()
                traced_state.restore()  # the model as the trace left it (a lazy initialisation kept)
            with _Attributes(model).kept():  # the graph calls leaf modules, which may change theirs
                graph_run = _example_run(gm, example_inputs)
        last = values is concrete or not concrete
        # a graph that computes something else than the model on the example inputs is not the model
        # (a random draw or Python state fixed at trace time): torch.export, which records such ops, or
        # an error. Where the model itself fails on the example, the passes' shape run reports it.
        # (Python state changed on every call makes the eager run differ: the graph stays, with a note)
        per_call = traced_changes & eager_changes
        if example_inputs is None or _same_outputs(eager, graph_run) or (last and (eager is None or per_call)):
            traced = True
            break
        symbolic_failure = TraceError(
            "the traced graph does not compute what the model does on the example inputs"
            + (" (it fails on them)" if graph_run is None else " (its outputs differ)")
            + ": the forward depends on something torch.fx fixes while tracing (a random op on no traced "
              "value, Python state, ...)")
    if traced:
        notes = (_lost_buffer_updates(model, eager, graph_run, reads.updates,
                                      eager_updates.updates if example_inputs is not None else None)
                 + _root_hooks(model) + _checkpoint_note(tracer)
                 + _lost_attribute_updates(per_call if example_inputs is not None else traced_changes))
        if train and functions.functions:  # inference runs the forward, which the graph computes exactly
            notes.append(describe_inlined(functions.functions))
        inherited = getattr(model, "fixed_training", None)  # a compiled graph compiled again keeps its mode
        if inherited is not None:
            gm.fixed_training = inherited
            notes.append(_fixed_mode_note(inherited, "the compiled graph it was traced from fixed it"))
        elif _reads_training_mode(model, new_tracer, values, graph, before_trace):
            gm.fixed_training = model.training
            notes.append(_fixed_mode_note(model.training, "its forward reads self.training (F.dropout(training="
                                                             "self.training), ...), which symbolic_trace fixes"))
        # Parameters computed with outside the graph: its constants hold their values (see trace_reads);
        # a compiled graph compiled again holds the constants its own trace made.
        gm.trace_time_reads = {**getattr(model, "trace_time_reads", {}), **reads.reads}
        detach_constants(gm)
        if gm.trace_time_reads:
            notes.append(describe_trace_time_reads(gm.trace_time_reads))
        for note in notes:
            warnings.warn(f"sparsec: {note}", stacklevel=3)
        return gm, "symbolic_trace", notes

    where = user_frame(symbolic_failure)
    fx_summary = f"torch.fx.symbolic_trace failed: {_first_line(symbolic_failure)}" + (f"\n    at {where}" if where else "")
    if example_inputs is None:
        raise TraceError(
            f"{fx_summary}\nsparsec falls back to torch.export, which needs example inputs: pass "
            f"example_inputs=(x,), or mark the offending module as a leaf (leaf_modules=[...]) or exclude it "
            f"(exclude=['name'])") from symbolic_failure

    # Tell wrong example inputs apart from untraceable code: run the model eagerly first (unless a
    # traced graph was checked against it already).
    if eager is None:
        try:
            with torch.no_grad(), preserved_state(model):
                args, kwargs = model_arguments(model, example_inputs)
                model(*args, **kwargs)
        except ParameterWriteError:  # (preserved_state's: not a problem of the inputs)
            raise
        except Exception as eager_error:  # noqa: BLE001
            raise ExampleInputError(_example_input_message(eager_error, example_inputs)) from eager_error

    functions, untrained = InlinedFunctions(user_code_frame, every_call=True), []
    # a training compile keeps the checkpoint calls export inlines (annotated, then tagged below)
    tags = ExportTags() if train and ExportTags.supported() else contextlib.nullcontext()
    inference = _InferenceModeInside()
    try:
        with preserved_state(model), _export_chatter_held(), functions, reentrant_calls_run_plainly(untrained), tags, \
                inference:
            exported = _export(model, example_inputs)
        module = exported.module()
    except Exception as export_error:  # noqa: BLE001
        if inference.where is not None:  # (e.g. "Inference tensors cannot be saved for backward" from a later op)
            raise TraceError(f"{_inference_mode_inside(inference.where)} (torch.export failed after it: "
                             f"{_first_line(export_error)})") from export_error
        where_export = user_frame(export_error)
        raise TraceError(
            f"sparsec could not capture {type(model).__name__}.\n  1. {fx_summary}\n"
            f"  2. torch.export.export(strict=False) failed: {_first_line(export_error)}"
            + (f"\n    at {where_export}" if where_export else "")
            + ("\n    (the graph torch.export traced before it failed: this error's __cause__.partial_fx_graph)"
               if hasattr(export_error, "partial_fx_graph") else "")
            + _unknown_type_remedy(export_error)
            + "\nWhat to do: mark the offending submodule as a leaf (leaf_modules=[ModuleClass] or ['module.name']) "
              "or exclude it (exclude=['module.name']) so it is not traced into; make the control flow there "
              "independent of tensor values; or check the example inputs.") from export_error
    if inference.where is not None:
        raise TraceError(_inference_mode_inside(inference.where))
    # torch.export's tracer class needs constructor arguments, which a pickled GraphModule cannot
    # supply when it is loaded again; the graph no longer needs it.
    module.graph._tracer_cls = None
    kept = tag_exported(module, tags.regions) if isinstance(tags, ExportTags) else 0
    gm = SparsecGraphModule(module, module.graph, type(model).__name__)
    guard = _guard_inputs(gm, exported.range_constraints)
    notes = [f"traced with torch.export (symbolic_trace failed: {_first_line(symbolic_failure)}"
             + (f" at {where}" if where else "") + f"); the graph holds for inputs {guard.describe()}"]
    if train and functions.functions:
        notes.append(describe_inlined(functions.functions))
    # torch.export inlines torch.utils.checkpoint calls: kept from ExportTags' annotations, or lost, which
    # is said, as the symbolic_trace path does for the checkpointing it does not keep
    if kept:
        notes.append(f"the forward runs {kept} torch.utils.checkpoint call(s), captured by torch.export: the compiled "
                     f"model checkpoints them too, recomputing them in backward")
    elif any(t.saw_checkpoint for t in tracers):
        notes.append("the forward runs code under torch.utils.checkpoint, which a graph captured with torch.export "
                     "does not keep" + ("" if train else " in an inference compile") + ": the compiled model computes "
                     "the same but stores those activations for backward (more memory in training)")
    # a reentrant call trains the code inside where one of its inputs requires grad, decided on each call;
    # the graph fixed the example's decision (a pipeline stage's input, x.requires_grad_(): nothing trained)
    if train and untrained:
        names = ", ".join(dict.fromkeys(untrained))
        notes.append(f"no input of the reentrant torch.utils.checkpoint call(s) running {names} requires grad on the "
                     f"example inputs, so the model trains nothing inside them there, and torch.export fixes that for "
                     f"every call: called with inputs that make them require grad (a pipeline stage's), the compiled "
                     f"model still trains nothing inside, where the model would. Pass example inputs with "
                     f"requires_grad=True if it is called so")
    # export writes the mode into the graph (dropout, batch norm): read it instead where the model allows
    if not follow_mode(gm, _export_in_other_mode(model, example_inputs), model.training):
        gm.fixed_training = model.training
        notes.append(_fixed_mode_note(model.training, "torch.export traces every layer as it runs in the mode of the "
                                                      "model it is given, and its forward depends on the mode in other "
                                                      "ways than dropout and batch norm"))
    gm.train(model.training)
    return gm, "torch.export", notes


def _export_in_other_mode(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The model exported in the other train / eval mode (an empty graph where that fails)."""
    try:
        with _in_other_mode(model), preserved_state(model), _export_chatter_held(), reentrant_calls_run_plainly():
            return _export(model, example_inputs).module()
    except Exception:  # noqa: BLE001 - not exportable in the other mode: the graph stays fixed to this one
        return fx.GraphModule(nn.Module(), fx.Graph())


@contextlib.contextmanager
def _in_other_mode(model: nn.Module):
    """The model switched to the other train / eval mode, every module's own flag restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(not model.training)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _reads_training_mode(model: nn.Module, new_tracer, concrete: dict, graph: fx.Graph, start: _Attributes) -> bool:
    """Whether the traced graph depends on the model's train / eval mode: traced again in the other
    mode, its code differs (leaf modules such as nn.Dropout and BatchNorm read their own flag when
    called, and need nothing; a functional F.dropout(training=self.training) is fixed in the graph)."""
    # The first trace's code and tensor constants, read now: restoring the state it started from removes the
    # constants, and the second trace sets its own under the same names (compared after the state came back,
    # they were the first trace's on both sides, and a mode-dependent constant went unseen)
    first = _code_and_constants(model, graph)
    with _in_other_mode(model), _Attributes(model).kept():
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


def _fixed_mode_note(training: bool, why: str) -> str:
    mode, other = ("training", "eval") if training else ("eval", "training")
    return (f"the graph holds for {mode} mode only: {why}; cm.{'eval' if training else 'train'}() is refused "
            f"rather than computing {mode}-mode results (compile the model in {other} mode for {other})")


def _unknown_type_remedy(export_error: BaseException) -> str:
    """What to do when torch.export met a class it cannot flatten in the model's inputs or outputs (a plain
    dataclass returned by forward: symbolic_trace returns it as is, export must take it apart)."""
    found = re.search(r"Found <class '([^']+)'> in (\w+), which is not a known type", str(export_error))
    if found is None:
        return ""
    name, where = found.group(1).rpartition(".")[2], found.group(2)
    return (f"\nWhat to do first: torch.export flattens the model's {where} and does not know {found.group(1)}: "
            f"register it before compiling, torch.utils._pytree.register_dataclass({name}) for a dataclass (else "
            f"torch.utils._pytree.register_pytree_node), or have forward return a tuple or dict.")


def _export(model: nn.Module, example_inputs: tuple):
    """torch.export with every input dim left to Dim.AUTO: export keeps dynamic what the model's code
    allows and fixes the rest, so one compile serves other batch sizes and sequence lengths. Static
    shapes where this torch has no Dim.AUTO or the dynamic export fails; before those, the batch dim
    (dim 0) alone dynamic: where export cannot reason about some dim (a strided conv's length pooled and
    flattened into a Linear: sympy gives up on the guard), the graph still serves other batch sizes
    (it was fixed at the example's batch)."""
    args, kwargs = model_arguments(model, tuple(example_inputs))
    positional = list(inspect.signature(model.forward).parameters)[:len(args)] if kwargs else []
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is not None:
        for dims in (lambda v: range(v.dim()), lambda v: range(min(1, v.dim()))):
            # (keyed as export binds the inputs: the positional ones in order, keyword-only ones by name)
            dynamic = tree_map(lambda v: {d: auto for d in dims(v)} if isinstance(v, torch.Tensor) else None,
                               (args, kwargs))
            dynamic = {**dict(zip(positional, dynamic[0])), **dynamic[1]} if kwargs else dynamic[0]
            try:  # (each attempt's failure dump held by itself: they differ, and only the last one's is raised)
                with _dim_marks_kept(example_inputs), _export_chatter_held():
                    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
            except Exception:  # noqa: BLE001 - the static export below reports what is really wrong
                pass
    with _dim_marks_kept(example_inputs):
        return torch.export.export(model, args, kwargs, strict=False)


# Attributes torch.export sets on each input tensor to mark its dims for dynamo (dynamic_shapes=Dim.AUTO).
_DIM_MARKS = ("_dynamo_weak_dynamic_indices", "_dynamo_dynamic_indices", "_dynamo_dynamic_range",
              "_dynamo_static_indices", "_dynamo_unbacked_indices", "_dynamo_propagated_dynamic_indices",
              "_has_dynamo_dim_marking")


@contextlib.contextmanager
def _dim_marks_kept(example_inputs: tuple):
    """The example tensors' dynamo dim marks as they were before an export. torch.export removes the marks
    it sets when it succeeds, not when it fails: a failed dynamic export (sympy could not solve a guard
    such as `Eq(16*((s/2)//4) - 16, 0)`, a max-pooled length flattened into a Linear) left every dim marked
    dynamic on the user's tensors, so the static export after it traced them dynamic again and failed the
    same way (compile raised TraceError for a model that exports fine with static shapes), and the user's
    tensors kept the marks for their own torch.compile."""
    tensors = [t for t in tree_flatten(example_inputs)[0] if isinstance(t, torch.Tensor)]
    before = [{k: t.__dict__[k] for k in _DIM_MARKS if k in t.__dict__} for t in tensors]
    try:
        yield
    finally:
        for t, marks in zip(tensors, before):
            for k in _DIM_MARKS:
                t.__dict__.pop(k, None)
            t.__dict__.update(marks)


def _example_run(module: nn.Module, example_inputs: tuple) -> tuple[list, dict] | None:
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
    """Whether the graph computed what the model did on the example inputs (both `_example_run`s)."""
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


def _check_root_is_traceable_as_called(model: nn.Module) -> None:
    """torch.fx traces the class's forward: a forward set on the instance would be silently replaced."""
    if "forward" in vars(model):
        cls = type(model).__name__
        raise TraceError(f"model.forward is set on the instance (model.forward = ...), but tracing records the "
                         f"class's forward ({cls}.forward), which computes something else. Define the forward in a "
                         f"module class (class Wrapped(nn.Module) whose forward calls your function) and compile that")


def check_not_a_wrapper(model: nn.Module) -> None:
    """Wrappers sparsec cannot see through, or whose behaviour a traced graph would drop: name what to pass."""
    name = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidTypeError(f"model is a TorchScript module ({name}, from torch.jit.script / torch.jit.trace), "
                               f"which has no Python forward to trace: pass the nn.Module you scripted")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InvalidTypeError(f"model is wrapped in {name}, whose input scatter and gradient synchronisation a traced "
                               f"graph cannot keep: pass model.module, and wrap the compiled model in {name} afterwards")
    if any_sharded(model):
        raise InvalidTypeError(f"model ({name}) is sharded by FSDP (fully_shard): compile the unsharded model, then "
                               f"shard the compiled model (fully_shard(cm)), as with DistributedDataParallel. To "
                               f"compile a model trained sharded for inference, {GATHER_RECIPE}")
    if name == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise InvalidTypeError("model is a torch.compile wrapper (OptimizedModule), whose forward runs TorchDynamo: "
                               "pass the module inside (model._orig_mod)")


def own_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on `module` itself ("forward_pre", "forward", "backward_pre", "backward")."""
    return [kind for kind in ("forward_pre", "forward", "backward_pre", "backward")
            if getattr(module, f"_{kind}_hooks", None)]


def _checkpoint_note(tracer: _Tracer) -> list[str]:
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
    graph's example runs (`_example_run`) with the model's own; and names a buffer an in-place op
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
    return [f"the model's forward updates buffer{'s' if len(lost) > 1 else ''} {lost} in Python code that "
            f"torch.fx does not record: the compiled model does not make "
            f"{'those updates' if len(lost) > 1 else 'that update'}. "
            f"To keep the update, make the module that does it a leaf (leaf_modules=['its.name']) or move the "
            f"update out of forward"]


# nn.Module's own attributes (hook dicts, flags): the rest of a module's __dict__ is the user's Python state
_MODULE_OWN = frozenset(vars(nn.Module())) | {"_parameters", "_buffers", "_modules", "training"}


class _Attributes:
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


def _lost_attribute_updates(names: set[str]) -> list[str]:
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
            f"on every call (a counter, a cache): the graph torch.fx traced does not make "
            f"{'those changes' if len(shown) > 1 else 'that change'}, and where it reads "
            f"{'them' if len(shown) > 1 else 'it'} it holds the value{'s they' if len(shown) > 1 else ' it'} had "
            f"while traced. {remedy}"]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


@contextlib.contextmanager
def _export_chatter_held():
    """Hold what torch.export writes to stderr while it runs, and give it back after, less the noise
    of a failure: on data-dependent control flow it logs a warning and prints the partial traced
    graph (thousands of lines for a large model), which would bury the TraceError that says what
    failed and where. The partial graph stays on the exception (`partial_fx_graph`); the message
    says so. Everything else written meanwhile is given back as it was."""
    held = io.StringIO()
    guards = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = guards.level
    guards.setLevel(logging.ERROR)
    failure = None
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception as error:
        failure = error
        raise
    finally:
        guards.setLevel(level)
        text, graph = held.getvalue(), getattr(failure, "partial_fx_graph", None)
        sys.stderr.write(text.replace(f"{graph}\n", "") if graph is not None else text)


def _guard_inputs(gm: fx.GraphModule, ranges: dict):
    """Put sparsec's InputGuard (picklable, see sparsec/runtime/guard.py) on the graph's inputs, in
    place of torch.export's guard where it has one (older torch checks inputs in a pre-hook that
    the graph module does not keep)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = [_input_spec(n.meta["val"], ranges) if "val" in n.meta else None for n in inputs]
    conditions = _size_conditions([n.meta.get("val") for n in inputs], shapes)
    guard = ShapeGuard(shapes, conditions) if conditions else InputGuard(shapes)
    setattr(gm, "_guards_fn", guard)
    if inputs:
        with gm.graph.inserting_after(inputs[-1]):
            gm.graph.call_module("_guards_fn", tuple(inputs))
    gm.recompile()
    return guard


def _size_conditions(values: list, shapes: list) -> list[str]:
    """torch.export's guards on the input sizes that are not ranges (`x.shape[0] % 2 == 0`, `x.shape[0] >
    y.shape[0]`, a dim that is not 1), as Python over the dims' symbols: the graph holds only where they do,
    and InputGuard checks ranges alone (a branch on an even batch silently ran for an odd one)."""
    env = next((v.fake_mode.shape_env for v in values if isinstance(v, torch.Tensor)
                and getattr(getattr(v, "fake_mode", None), "shape_env", None) is not None), None)
    bound = {want[0] for spec in shapes if isinstance(spec, tuple) for want in spec if isinstance(want, tuple)}
    if env is None or not bound:
        return []
    from torch.utils._sympy.printers import PythonPrinter
    conditions = []
    for guard in env.guards:
        expr = env.simplify(guard.expr)
        # (a symbol no input dim is: every dim it is in was fixed at the example's size, see _input_spec)
        if expr is not sympy.true and {str(s) for s in expr.free_symbols} <= bound:
            conditions.append(PythonPrinter().doprint(expr))
    return list(dict.fromkeys(conditions))


def _input_spec(value, ranges: dict):
    """A non-tensor input's value; else one entry per dim of its traced value: its size where export fixed it,
    (symbol, low, high) where it left it dynamic; an expression of other dims (say 2 * s0) is held
    at the example's size, which is never wrong, only stricter."""
    from sparsec.runtime.guard import Constant

    if not isinstance(value, torch.Tensor):
        return Constant(value)
    spec = []
    for size in value.shape:
        expr = size.node.expr if isinstance(size, torch.SymInt) else None
        if expr is not None and expr.is_Symbol:  # a dynamic dim
            bounds = ranges.get(expr)
            low, high = (_bound(bounds.lower), _bound(bounds.upper)) if bounds is not None else (None, None)
            spec.append((str(expr), low or 0, high))
        elif expr is not None and not expr.is_number:  # an expression of dynamic dims
            spec.append(int(size.node.hint))
        else:
            spec.append(int(size))
    return tuple(spec)


def _bound(value) -> int | None:
    """A range end as an int; None for an infinite one (torch's integer infinity claims to be finite,
    so ask int() instead)."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _regexes(names: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for name in names:
        try:
            re.compile(name)
            out.append(name)
        except re.error:
            out.append(re.escape(name))
    return tuple(out)


def _example_input_message(error: BaseException, example_inputs: tuple) -> str:
    where = user_frame(error)
    return (f"the example inputs do not fit the model: calling model(*example_inputs, **example_kwargs) with "
            f"{describe_inputs(example_inputs)} raised {_first_line(error)}"
            + (f"\n  at {where}" if where else "")
            + "\nexample_inputs must be a tuple of the positional arguments the model's forward accepts, "
              "example_kwargs a dict of those it takes by name, with the shapes and dtypes it expects")
