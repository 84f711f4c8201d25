"""sparsec's fx tracers and the lock their traces take turns under.

torch.fx patches process-wide state while it traces (nn.Module.__call__ / __getattr__; rebuilding a
pickled graph module sets its code on a class the whole process shares), so traces take turns
(TRACE_LOCK) and a tracer runs other threads' calls as if unpatched (ThreadTracer). RetraceTracer rebuilds
a pickled graph module with the ops it had."""
from __future__ import annotations

import builtins
import contextlib
import threading

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx import _symbolic_trace
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sparsec.checkpointing import CheckpointTags
from sparsec.fork_safe import fork_safe_rlock
from sparsec.meta import update_meta


# torch.fx's tracing patches nn.Module.__call__ / __getattr__ for the whole process while it runs (and
# InlinedFunctions patches torch.autograd.Function.apply). A server compiling or loading a model in one
# thread while others ran models saw their module calls go through the tracer ("NameError: module is not
# installed as a submodule"), and two traces at once each took the other's patch for the original. So
# sparsec's traces take turns (TRACE_LOCK), and a tracer runs other threads' calls as if unpatched.
TRACE_LOCK = fork_safe_rlock()


def drop_unresolvable_fx_wraps() -> None:
    """Remove the entries of fx's table of functions to patch while tracing that name nothing. A pickled graph
    module whose code calls a wrapped function of torch's own (torch.fx._symbolic_trace._assert_is_none, for
    an argument traced as its None value) registers that dotted name on load, in the loaded code's globals,
    which hold no such key: every symbolic_trace in the process after it failed with a KeyError on it (torch
    issue 130701), sparsec's next compile of any model included. They patch nothing: dropping them is safe."""
    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if isinstance(table, dict):
        for key, frame in list(table.items()):
            name = key[1] if isinstance(key, tuple) else None
            if isinstance(name, str) and isinstance(frame, dict) and name not in frame and not hasattr(builtins, name):
                table.pop(key, None)


class ThreadTracer(fx.Tracer):
    """fx.Tracer that traces its own thread only: other threads' module calls and attribute reads,
    which fx's process-wide patches route here while it traces, run as they would unpatched."""

    _thread: int | None = None
    # Tag the nodes made inside torch.utils.checkpoint calls with the call, so that the graph module
    # runs them checkpointed again (sparsec/checkpointing.py). A graph compiled for inference does not:
    # it is not trained, and recomputing saves nothing there.
    keep_checkpoints = True
    checkpoint_tags: CheckpointTags | None = None

    def trace(self, root, concrete_args=None):
        with TRACE_LOCK:
            drop_unresolvable_fx_wraps()  # (left by a graph module unpickled elsewhere than sparsec.load too)
            outer, self._thread = self._thread, threading.get_ident()
            self.checkpoint_tags = CheckpointTags()
            try:
                return super().trace(root, concrete_args)
            finally:
                self._thread = outer
                self.checkpoint_tags.close()

    def tracing_here(self) -> bool:
        return self._thread == threading.get_ident()

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if self.keep_checkpoints and kind not in ("placeholder", "output") and self.tracing_here():
            region = self.checkpoint_tags.region()
            if region is not None:
                update_meta(proxy.node, checkpoint=region)
        return proxy

    def call_module(self, m, forward, args, kwargs):
        if not self.tracing_here():
            return forward(*args, **kwargs)  # (fx's `forward` is the unpatched nn.Module.__call__)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if not self.tracing_here():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class RetraceTracer(ThreadTracer):
    """The tracer fx rebuilds a pickled graph module with (pickle keeps the code, and loading traces it
    again). fx's own runs every op that reads no graph input at trace time, once, and keeps its result:
    a torch.export graph's buffer updates (`aten.add_.Tensor(steps, 1)`, BatchNorm-free EMA updates)
    were applied to the buffer on load and dropped from the graph, and a random op of fixed shape
    (`aten.randn.default([64])`) became one constant draw. This one records such ops as the graph had
    them: buffers are traced as graph values, and every operator call is recorded."""

    proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None):
        with RecordOperators(self):
            return super().trace(root, concrete_args)


class RecordOperators(TorchFunctionMode):
    """While retracing: an aten / custom operator called on no graph value is recorded, not run."""

    def __init__(self, tracer: fx.Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and not any(
                isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
            return self.tracer.create_proxy("call_function", func, args, kwargs)
        return func(*args, **kwargs)


class _RecordedHigherOrder:
    """A higher-order operator that a tracer records when its trace calls it on a graph value, and runs otherwise
    (another thread's eager call made while the trace runs)."""

    def __init__(self, operator, tracer: ThreadTracer):
        self.operator, self.tracer = operator, tracer

    def __call__(self, *args, **kwargs):
        if self.tracer.tracing_here() and any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
            return self.tracer.create_proxy("call_function", self.operator, args, kwargs)
        return self.operator(*args, **kwargs)


@contextlib.contextmanager
def higher_order_calls_recorded(tracer: ThreadTracer, root: nn.Module):
    """While tracing generated code (a compiled graph compiled again): the higher-order operators its graph
    calls (torch.export's `wrap_with_set_grad_enabled(False, submod, x)` for a no_grad region, autocast's)
    are recorded as the graph has them, not run. Run, they ran their region under its own grad mode, which
    the trace refuses: the compile fell back to torch.export, which inlined the packed and trainable layers,
    and a model trained sparse compiled again for inference came out dense. Generated code looks them up in
    torch.ops.higher_order on each call, so they are swapped there for the trace (under TRACE_LOCK)."""
    graph = getattr(root, "graph", None)
    operators = {node.target for node in (graph.nodes if isinstance(graph, fx.Graph) else ())
                 if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)}
    namespace = torch.ops.higher_order
    swapped = {}
    try:
        for operator in operators:
            if getattr(namespace, operator.__name__, None) is operator:
                swapped[operator.__name__] = operator
                setattr(namespace, operator.__name__, _RecordedHigherOrder(operator, tracer))
        yield
    finally:
        for name, operator in swapped.items():
            setattr(namespace, name, operator)
