"""The torch.fx tracer sparsec traces models with (frontend.capture's first way).

Beyond fx's own: user-named leaf modules (types, names, excluded names), sparsec's own modules as
leaves (a compiled graph compiled again), built-in modules with layers inside traced into, a refusal
of ops that run under a grad / autocast / inference mode of the model's own (fx would drop the mode),
and a record of the torch.utils.checkpoint calls the forward makes.
"""
from __future__ import annotations

import contextlib
import re
import traceback

import torch
import torch.nn as nn

from sparsec.checkpointing import checkpoint_call, disabling_grad_by_hand, in_reentrant_checkpoint, reentrant_calls_through
from sparsec.errors import TraceError
from sparsec.export_mode import ModeFlag
from sparsec.runtime.guard import InputGuard
from sparsec.runtime.layers import RuntimeLayer
from sparsec.runtime.train_offset import TrainOffset
from sparsec.tracing import TRACE_LOCK, RecordOperators, ThreadTracer, higher_order_calls_recorded
from sparsec.user_code import user_code_frame

class Tracer(ThreadTracer):
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
        self.modes = grad_and_autocast()
        with contextlib.ExitStack() as stack:
            if self.generated:
                stack.enter_context(RecordOperators(self))
                stack.enter_context(higher_order_calls_recorded(self, root))
            stack.enter_context(self._no_grad_in_reentrant_checkpoints())
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
        modes = grad_and_autocast()
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


@contextlib.contextmanager
def modes_kept():
    """The grad and autocast modes as they were, after a trace too. A trace that fails inside a region a
    graph sets (torch.export's wrap_with_set_grad_enabled(False, ...) in a compiled graph compiled again,
    whose exit is not in a finally) left grad off for the whole process, and the export fallback traced
    every op under no_grad: the compiled model dropped the region, and training after it computed nothing."""
    grad, _, autocast = grad_and_autocast()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        for device, (enabled, dtype) in zip(autocast_devices(), autocast):
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


def autocast_devices() -> list[str]:
    return [d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d)]


def grad_and_autocast() -> tuple:
    """The grad mode and the autocast state that ops run under (see Tracer.create_proxy)."""
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in autocast_devices())
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast

