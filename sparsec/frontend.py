"""Capture a model as a torch.fx graph: symbolic_trace first, torch.export(strict=False) second.

symbolic_trace (symbolic_capture.py, with sparsec's tracer in fx_tracer.py) keeps `nn.Linear` /
`nn.Conv2d` as `call_module` nodes named by module path, which is the nicest graph to rewrite. It fails
on data-dependent Python, iteration or item assignment on proxies and much third-party code;
torch.export (export_capture.py) runs the model on the example inputs instead and records the module
path of every op in `nn_module_stack`. When both fail, the error names each call, the line of the
user's code it failed on, and what to do about it.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from sparsec.distributed import GATHER_RECIPE, any_sharded
from sparsec.errors import ExampleInputError, InvalidInputError, InvalidTypeError, ParameterWriteError, TraceError
from sparsec.example_inputs import describe_inputs, model_arguments
from sparsec.export_capture import capture_with_export, symbolic_failure_summary
from sparsec.fx_tracer import Tracer
from sparsec.graph_module import SparsecGraphModule
from sparsec.state import buffer_values, preserved_state, restore_buffers
from sparsec.symbolic_capture import PythonAttributes, trace_symbolically
from sparsec.user_code import first_line, user_frame


def capture(model: nn.Module, example_inputs: tuple | None, leaf_modules: tuple = (),
            exclude: tuple[str, ...] = (), train: bool = False) -> tuple[SparsecGraphModule, str, list[str]]:
    """Trace `model` (sparsec's own copy). Returns (graph module, method, notes). `train`: the graph is
    compiled for training (a note names autograd Functions whose custom backward the trace drops)."""
    _check_root_is_traceable_as_called(model)
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaf_names = tuple(t for t in leaf_modules if isinstance(t, str))
    bad = [t for t in leaf_modules if not (isinstance(t, str) or isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise InvalidTypeError(f"leaf_modules= takes module classes (nn.Module subclasses) or module names, got {bad!r}")
    names = {name for name, _ in model.named_modules()} if leaf_names else set()
    if unknown := [name for name in leaf_names if name not in names]:  # (a misspelt name had no effect, silently)
        raise InvalidInputError(f"leaf_modules names {unknown} match no module of the model; its modules are named "
                                f"as model.named_modules() names them, e.g. {sorted(names - {''})[:8]}")
    # An excluded module is not traced into either: that is the remedy for untraceable submodules.
    # (a compiled graph compiled again is generated code: see Tracer.generated)
    generated = isinstance(model, fx.GraphModule)
    buffers_before, attributes_before = buffer_values(model), PythonAttributes(model)
    symbolic = trace_symbolically(
        model, example_inputs, lambda: Tracer(leaf_types, leaf_names, _regexes(exclude), generated, train), train)
    if symbolic.gm is not None:
        for note in symbolic.notes:
            warnings.warn(f"sparsec: {note}", stacklevel=3)
        return symbolic.gm, "symbolic_trace", symbolic.notes

    if example_inputs is None:
        raise TraceError(
            f"{symbolic_failure_summary(symbolic.failure)}\nsparsec falls back to torch.export, which needs example "
            f"inputs: pass example_inputs=(x,), or mark the offending module as a leaf (leaf_modules=[...]) or exclude "
            f"it (exclude=['name'])") from symbolic.failure
    # Tell wrong example inputs apart from untraceable code: run the model eagerly first (unless a
    # traced graph was checked against it already).
    if not symbolic.ran_model:
        _check_example_inputs(model, example_inputs)
    # fx ran the forward's Python on the model's real buffers and attributes, and the check above ran the model:
    # a graph fx traced keeps what that did (a table filled on the first call, which its graph reads), but
    # torch.export records the forward's updates itself, and captured a step counter (`self.steps += 1`, or a
    # Python `self.calls += 1` it holds as a constant) two steps ahead of the model's
    restore_buffers(model, buffers_before)
    attributes_before.restore()
    gm, notes = capture_with_export(model, example_inputs, train, symbolic.failure, symbolic.saw_checkpoint)
    return gm, "torch.export", notes


def _check_example_inputs(model: nn.Module, example_inputs: tuple) -> None:
    """ExampleInputError where the model itself fails on the example inputs."""
    try:
        with torch.no_grad(), preserved_state(model):
            args, kwargs = model_arguments(model, example_inputs)
            model(*args, **kwargs)
    except ParameterWriteError:  # (preserved_state's: not a problem of the inputs)
        raise
    except Exception as eager_error:  # noqa: BLE001
        raise ExampleInputError(_example_input_message(eager_error, example_inputs)) from eager_error


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
            f"{describe_inputs(example_inputs)} raised {first_line(error)}"
            + (f"\n  at {where}" if where else "")
            + "\nexample_inputs must be a tuple of the positional arguments the model's forward accepts, "
              "example_kwargs a dict of those it takes by name, with the shapes and dtypes it expects")
