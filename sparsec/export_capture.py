"""Capture a model with torch.export(strict=False): frontend.capture's second way, where symbolic_trace fails.

torch.export runs the model on the example inputs and records every op it runs (data-dependent Python,
third-party code, grad / autocast regions, the module path of each op in `nn_module_stack`). The graph
holds for the inputs export's guards admit; sparsec puts its own picklable guard (InputGuard /
ShapeGuard) on the graph's inputs, keeps the torch.utils.checkpoint calls of a training compile, and
lets the graph follow cm.train() / cm.eval() where the model allows (export_mode.py).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
import traceback

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from sparsec.checkpointing import ExportTags, reentrant_calls_run_plainly, tag_exported
from sparsec.errors import TraceError
from sparsec.example_inputs import model_arguments
from sparsec.export_mode import fixed_mode_note, follow_mode, in_other_mode, layers_in_other_mode, other_mode_note
from sparsec.fixed_arguments import fixed_arguments
from sparsec.graph_module import SparsecGraphModule
from sparsec.runtime.guard import InputGuard, ShapeGuard
from sparsec.state import preserved_state
from sparsec.symbolic_capture import PythonAttributes, example_run, lost_attribute_updates
from sparsec.trace_reads import InlinedFunctions, describe_inlined
from sparsec.user_code import first_line, user_code_frame, user_frame, user_frame_summary


def capture_with_export(model: nn.Module, example_inputs: tuple, train: bool, fx_failure: BaseException,
                        saw_checkpoint: bool) -> tuple[SparsecGraphModule, list[str]]:
    """The model as torch.export captures it on the example inputs, and the notes on what the graph keeps.
    `fx_failure`: why symbolic_trace failed (both are named when export fails too); `saw_checkpoint`: the
    symbolic trace ran into a torch.utils.checkpoint call."""
    functions, untrained = InlinedFunctions(user_code_frame, every_call=True), []
    # a training compile keeps the checkpoint calls export inlines (annotated, then tagged below)
    tags = ExportTags() if train and ExportTags.supported() else contextlib.nullcontext()
    inference = _InferenceModeInside()
    per_call = _changed_on_every_call(model, example_inputs)
    try:
        with preserved_state(model), export_chatter_held(), functions, reentrant_calls_run_plainly(untrained), tags, \
                inference:
            exported = _export(model, example_inputs)
        module = exported.module()
    except Exception as export_error:  # noqa: BLE001
        if inference.where is not None:  # (e.g. "Inference tensors cannot be saved for backward" from a later op)
            raise TraceError(f"{_inference_mode_inside(inference.where)} (torch.export failed after it: "
                             f"{first_line(export_error)})") from export_error
        where_export = user_frame(export_error)
        raise TraceError(
            f"sparsec could not capture {type(model).__name__}.\n  1. {symbolic_failure_summary(fx_failure)}\n"
            f"  2. torch.export.export(strict=False) failed: {first_line(export_error)}"
            + (f"\n    at {where_export}" if where_export else "")
            + ("\n    (the graph torch.export traced before it failed: this error's __cause__.partial_fx_graph)"
               if hasattr(export_error, "partial_fx_graph") else "")
            + _unknown_type_remedy(export_error)
            + "\nWhat to do (either capture succeeding is enough): " + _fx_remedy(model, fx_failure)
            + "; for torch.export, make the control flow at its line independent of tensor values, or write a branch "
              "on a tensor's value as torch.cond(pred, true_fn, false_fn, operands), which torch.export captures "
              "(layers inside its branches stay dense); or check the example inputs.") from export_error
    if inference.where is not None:
        raise TraceError(_inference_mode_inside(inference.where))
    # torch.export's tracer class needs constructor arguments, which a pickled GraphModule cannot
    # supply when it is loaded again; the graph no longer needs it.
    module.graph._tracer_cls = None
    kept = tag_exported(module, tags.regions) if isinstance(tags, ExportTags) else 0
    gm = SparsecGraphModule(module, module.graph, type(model).__name__)
    gm.fixed_arguments = fixed_arguments(model.forward, *model_arguments(model, tuple(example_inputs)))
    guard = _guard_inputs(gm, exported.range_constraints)
    where = user_frame(fx_failure)
    notes = [f"traced with torch.export (symbolic_trace failed: {first_line(fx_failure)}"
             + (f" at {where}" if where else "") + f"); the graph holds for inputs {guard.describe()}"]
    if train and functions.functions:
        notes.append(describe_inlined(functions.functions))
    notes += lost_attribute_updates(per_call, "torch.export")
    # torch.export inlines torch.utils.checkpoint calls: kept from ExportTags' annotations, or lost, which
    # is said, as the symbolic_trace path does for the checkpointing it does not keep
    if kept:
        notes.append(f"the forward runs {kept} torch.utils.checkpoint call(s), captured by torch.export: the compiled "
                     f"model checkpoints them too, recomputing them in backward")
    elif saw_checkpoint:
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
    other_mode = layers_in_other_mode(gm, model)
    if other_mode:  # (cm.train() and cm.eval() alike would switch them: both are refused, CompiledModel.train)
        gm.fixed_training, gm.layers_in_other_mode = model.training, other_mode
        notes.append(other_mode_note(model.training, other_mode))
    elif (why_fixed := follow_mode(gm, _export_in_other_mode(model, example_inputs), model.training)) is not None:
        gm.fixed_training = model.training
        notes.append(fixed_mode_note(model.training, why_fixed))
    gm.train(model.training)
    return gm, notes


def _fx_remedy(model: nn.Module, fx_failure: BaseException) -> str:
    """What lets symbolic_trace through where it failed. leaf_modules / exclude make it call a submodule whole
    (torch.export has no such option): they help where the failing line is in a submodule's code, not in the
    model's own forward, which the error advised them for all the same."""
    frame = user_frame_summary(fx_failure)
    code = getattr(type(model).forward, "__code__", None)
    if frame is not None and code is not None and frame.filename == code.co_filename and frame.name == code.co_name:
        try:
            lines, first = inspect.getsourcelines(type(model).forward)
        except (OSError, TypeError):
            lines, first = [], 0
        if first <= (frame.lineno or 0) < first + len(lines):
            return ("for symbolic_trace, the failing line is in the model's own forward, which leaf_modules / "
                    "exclude cannot skip (they have a submodule called whole): make that line traceable, or move "
                    "it into a submodule and name that in leaf_modules=[...]")
    return ("for symbolic_trace, mark the submodule whose code failed as a leaf (leaf_modules=[ModuleClass] or "
            "['module.name']) or exclude it (exclude=['module.name']): it is then called whole, not traced into "
            "(these options apply to symbolic_trace only)")


def _changed_on_every_call(model: nn.Module, example_inputs: tuple) -> set[str]:
    """The Python attributes (a counter, a cache) that a run of the forward changes and a second run changes
    again: state changed on every call, which the exported graph holds at its value while exported (a lazy
    initialisation, changed on the first call only, is not). torch.export's own run leaves them as they were,
    so two runs of the model tell; the model's attributes are left as they were."""
    with PythonAttributes(model).kept():
        first = PythonAttributes(model)
        example_run(model, example_inputs)
        changed = first.changed()
        if changed:
            second = PythonAttributes(model)
            example_run(model, example_inputs)
            changed &= second.changed()
    return changed


def symbolic_failure_summary(fx_failure: BaseException) -> str:
    """'torch.fx.symbolic_trace failed: ...' with the line of the user's code it failed on."""
    where = user_frame(fx_failure)
    return f"torch.fx.symbolic_trace failed: {first_line(fx_failure)}" + (f"\n    at {where}" if where else "")


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


def _export_in_other_mode(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The model exported in the other train / eval mode (an empty graph where that fails)."""
    try:
        with in_other_mode(model), preserved_state(model), export_chatter_held(), reentrant_calls_run_plainly():
            return _export(model, example_inputs).module()
    except Exception:  # noqa: BLE001 - not exportable in the other mode: the graph stays fixed to this one
        return fx.GraphModule(nn.Module(), fx.Graph())



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
                with _dim_marks_kept(example_inputs), export_chatter_held():
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



@contextlib.contextmanager
def export_chatter_held():
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


