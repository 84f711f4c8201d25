"""Activation checkpointing kept through tracing.

torch.fx traces through `torch.utils.checkpoint.checkpoint` like any Python: the graph computes the
same, but keeps every activation for backward, which is what the user checkpointed to avoid. So the
tracers tag each node made inside a checkpoint call with that call (`SparsecMeta.checkpoint`,
`CheckpointTags`), and the graph stays flat: every pass, shrink and condense read it as before. Only
the code a graph module runs differs (`checkpointed_code`): each call's span of nodes becomes a
function run through `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` (`True` for a call
the model made reentrant, see _options), so backward recomputes it. A call's `context_fn` (selective
checkpointing: which ops' outputs are saved rather than recomputed) is passed on, read from the graph
module's CONTEXTS attribute. A pickled graph module keeps that code and that attribute (portable_contexts),
and loading traces it again, which finds the calls again. A graph torch.export captures is tagged from
annotations its ops get while export traces (ExportTags, tag_exported).
"""
from __future__ import annotations

import contextlib
import copy
import io
import operator
import os
import pickle
import sys
import threading
import types
import warnings

import networkx as nx
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils.checkpoint
from torch.fx.graph import PythonCode
from torch.overrides import TorchFunctionMode

from sparsec.meta import META_KEY, CheckpointRegion, get_meta, update_meta

_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")
CONTEXTS = "_sparsec_checkpoint_contexts"  # graph module attribute: the context_fn of each checkpoint call


def checkpoint_call() -> types.FrameType | None:
    """The frame of the outermost torch.utils.checkpoint.checkpoint call on the stack (a checkpoint
    nested in another is part of the outer one's recomputation), or None."""
    outermost, frame = None, sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "checkpoint" and code.co_filename.endswith(_CHECKPOINT_FILE):
            outermost = frame
        frame = frame.f_back
    return outermost


def in_reentrant_checkpoint() -> bool:
    """Whether a reentrant torch.utils.checkpoint call is running its function (CheckpointFunction.forward
    is on the stack): that runs it under torch.no_grad(), which is the checkpoint's, not the model's."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        # (by qualified name: checkpoint_sequential's segments are functions named `forward` too)
        if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE) and (
                code.co_qualname == "CheckpointFunction.forward" if hasattr(code, "co_qualname")
                else code.co_varnames[:1] == ("ctx",)):
            return True
        frame = frame.f_back
    return False


_GRAD_MODE_FILES = (os.path.join("torch", "autograd", "grad_mode.py"), os.path.join("torch", "utils", "_contextlib.py"))


def disabling_grad_by_hand() -> bool:
    """Called from torch._C._set_grad_enabled(False): whether code the checkpoint runs turns grad off
    (torch.no_grad(), set_grad_enabled(False), as a context or a decorator), rather than the checkpoint
    itself or a context manager's exit restoring the mode it found."""
    frame = sys._getframe(2)  # (past the function patched in, which calls this)
    while frame is not None and frame.f_code.co_filename.endswith(_GRAD_MODE_FILES):
        if frame.f_code.co_name == "__exit__":
            return False
        frame = frame.f_back
    return frame is not None and not frame.f_code.co_filename.endswith(_CHECKPOINT_FILE)


@contextlib.contextmanager
def reentrant_calls_through(wrap):
    """CheckpointFunction.apply (how checkpoint() makes a reentrant call) replaced by `wrap(apply)` while
    this runs, in its thread's turn (tracing.TRACE_LOCK, as every patch of sparsec's traces: a capture
    outside it, torch.export of the model in its other mode, patched over another thread's capture and
    removed that one's patch when it finished first, which then failed to remove its own)."""
    from sparsec.tracing import TRACE_LOCK  # (tracing imports this module)
    function_class = torch.utils.checkpoint.CheckpointFunction
    with TRACE_LOCK:
        own = function_class.__dict__.get("apply")  # (none: Function.apply)
        function_class.apply = staticmethod(wrap(function_class.apply))
        try:
            yield
        finally:
            if own is None:
                del function_class.apply
            else:
                function_class.apply = own


def reentrant_calls_run_plainly(untrained: list[str] | None = None):
    """While torch.export captures a model (in this thread): a reentrant checkpoint call runs its function
    as plain code. export records an autograd.Function's forward only, and a reentrant call's runs under
    no_grad: the graph computed the checkpointed code without gradients (its parameters never trained).
    Plainly, it records what the call computes: with gradients where an input requires grad, under no_grad
    where none does (as the reentrant call, whose output then requires none); a training compile then runs
    it checkpointed again (ExportTags). `untrained`: the functions run under no_grad so (the graph fixes
    that, where the model decides on each call: capture() notes it)."""
    exporting = threading.get_ident()

    def wrap(apply):
        def plainly(function, preserve_rng_state, *args):
            if threading.get_ident() != exporting:
                return apply(function, preserve_rng_state, *args)
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                return function(*args)
            if untrained is not None and torch.is_grad_enabled():
                untrained.append(getattr(function, "__qualname__", type(function).__qualname__))
            with torch.no_grad():
                return function(*args)
        return plainly

    return reentrant_calls_through(wrap)


def _options(frame: types.FrameType) -> tuple[tuple[str, object], ...]:
    """checkpoint()'s keyword arguments as the call gave them."""
    given = frame.f_locals
    options = [("preserve_rng_state", bool(given.get("preserve", True)))]  # (checkpoint() pops it as `preserve`)
    # A reentrant call is made reentrant again: where none of its inputs requires grad, its output requires
    # none and the parameters inside get no gradient (torch warns). Made non-reentrant, they trained, unlike
    # the model's. (`use_reentrant`: the value checkpoint() resolved a None to, read after it did.)
    if given.get("use_reentrant") is True:
        options.append(("use_reentrant", True))
    for name, default in (("determinism_check", "default"), ("debug", False), ("early_stop", True)):
        value = given.get(name, default)
        if value != default and isinstance(value, (bool, str)):
            options.append((name, value))
    # selective checkpointing: the object this call passed, called anew on every run as checkpoint() does
    context_fn = given.get("context_fn", torch.utils.checkpoint.noop_context_fn)
    if context_fn is not torch.utils.checkpoint.noop_context_fn:
        options.append(("context_fn", context_fn))
    return tuple(options)


class CheckpointTags:
    """While one trace runs: the checkpoint call each new node is made in."""

    def __init__(self):
        # id(frame) -> (frame, region); the frames are held until close() so that ids of finished calls
        # are never reused by later ones
        self._calls: dict[int, tuple[types.FrameType, CheckpointRegion]] = {}
        self.kept = 0  # calls found (read after close())

    def region(self) -> CheckpointRegion | None:
        frame = checkpoint_call()
        if frame is None:
            return None
        if id(frame) not in self._calls:
            self._calls[id(frame)] = (frame, CheckpointRegion(self.kept, _options(frame)))
            self.kept += 1
        return self._calls[id(frame)][1]

    def close(self) -> None:
        self._calls.clear()


def checkpoint_spans(graph: fx.Graph) -> list[tuple[CheckpointRegion, list[fx.Node]]]:
    """Each checkpoint call's nodes, as the contiguous span from its first tagged node to its last.
    Nodes a rewrite inserted inside a span belong to it (they replace or feed nodes of the call);
    spans that rewrites made overlap are merged. Only the grouping matters for correctness: any
    contiguous span computes the same, recomputed or not."""
    nodes = list(graph.nodes)
    bounds: dict[CheckpointRegion, list[int]] = {}
    for i, node in enumerate(nodes):
        region = get_meta(node).checkpoint
        if region is not None:
            bounds.setdefault(region, [i, i])[1] = i
    merged: list[list] = []
    for region, (first, last) in sorted(bounds.items(), key=lambda item: item[1][0]):
        if merged and first <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], last)
        else:
            merged.append([region, first, last])
    return [(region, nodes[first:last + 1]) for region, first, last in merged]


def checkpointed_code(graph: fx.Graph) -> tuple[PythonCode, tuple] | None:
    """The forward of `graph` with each checkpoint span run through torch.utils.checkpoint, and the
    context_fn objects it reads from the module's CONTEXTS attribute (None: the graph has no span). One
    source text: a function `_sparsec_checkpoint_<k>(self, inputs...)` per span, then `forward`, which
    calls each through checkpoint with the module itself, so parameters are read from the live module
    (after .to(), FSDP's sharding) both in forward and in the recomputation."""
    spans = checkpoint_spans(graph)
    if not spans:
        return None
    outer = fx.Graph()
    outer._codegen = copy.deepcopy(graph._codegen)  # (an export graph's pytree signature)
    env: dict[fx.Node, fx.Node] = {}
    starts = {span[0]: k for k, (_, span) in enumerate(spans)}
    inside = {node for _, span in spans for node in span}
    functions = []
    for node in graph.nodes:
        if node in starts:
            k = starts[node]
            region, span = spans[k]
            name = f"_sparsec_checkpoint_{k}"
            functions.append((name, _outline(outer, env, span, name, region)))
        elif node not in inside:
            env[node] = outer.node_copy(node, env.__getitem__)
    parent = outer.python_code(root_module="self")
    forward, merged, bodies = parent.src, dict(parent.globals), []
    for name, body in functions:
        code = body.python_code(root_module="self")
        clash = [g for g, value in code.globals.items() if merged.setdefault(g, value) is not value]
        if clash:  # two functions of one name from different modules: fx names them apart per graph only
            warnings.warn(f"the compiled graph runs without activation checkpointing: name {clash[0]!r} means two "
                          f"things in its generated code", stacklevel=2)
            return None
        bodies.append(code.src)
    # The functions' names are globals of the generated code: one a local of forward (a node named after a
    # submodule `_sparsec_checkpoint_0`) or a global of it (a function of that name the graph calls) shadowed
    # it or was shadowed (forward failed, and capture fell back to torch.export, losing the checkpointing).
    taken = set(merged) | {node.name for node in outer.nodes}
    defined = []
    for k, ((name, _), src) in enumerate(zip(functions, bodies)):
        unique, i = name, 0
        while unique in taken:
            i += 1
            unique = f"{name}_{i}"
        taken.add(unique)
        forward = forward.replace(repr(f"<{name}>"), f"{unique}, self")
        defined.append(src.replace("def forward(self", f"def {unique}(self", 1))
    # context_fn objects are read from an attribute, not made globals of the code: pickle keeps those as
    # import statements, which a lambda or functools.partial has none of (see portable_contexts)
    contexts = []
    for (name, _), (region, _) in zip(functions, spans):
        context_fn = dict(region.options).get("context_fn")
        if context_fn is not None:
            forward = forward.replace(repr(f"<{name} context>"), f"self.{CONTEXTS}[{len(contexts)}]")
            contexts.append(context_fn)
    return PythonCode("".join(defined) + forward, merged, None), tuple(contexts)


def _outline(outer: fx.Graph, env: dict[fx.Node, fx.Node], span: list[fx.Node], name: str,
             region: CheckpointRegion) -> fx.Graph:
    """Add to `outer` one checkpoint call computing `span`, and return the graph of the function it calls."""
    # attribute reads (parameters, buffers) stay in forward and are passed in: reading them is free,
    # and a value read in the span and used after it would otherwise be an output. A reentrant call's
    # function reads them itself as well: passed in, a parameter is an input that requires grad, and
    # the call's output required grad where the model's does not (see _options).
    reentrant = dict(region.options).get("use_reentrant", False)
    in_span = set(span)
    for node in span:
        if node.op == "get_attr" and (not reentrant or any(user not in in_span for user in node.users)):
            env[node] = outer.node_copy(node, env.__getitem__)
    computed = [n for n in span if n.op != "get_attr" or reentrant]
    members = set(computed)
    inputs = list(dict.fromkeys(a for n in computed for a in n.all_input_nodes if a not in members))
    outputs = [n for n in computed if n.op != "get_attr" and any(user not in members for user in n.users)]
    body = fx.Graph()
    inner = {a: body.placeholder(a.name) for a in inputs}
    for node in computed:
        inner[node] = body.node_copy(node, inner.__getitem__)
    body.output(tuple(inner[n] for n in outputs))
    # the function's name goes in as a unique string, replaced by `name, self` in the source (and the
    # context_fn by a read of the module's CONTEXTS)
    options = {"use_reentrant": False, **dict(region.options)}
    if "context_fn" in options:
        options["context_fn"] = f"<{name} context>"
    call = outer.create_node("call_function", torch.utils.checkpoint.checkpoint,
                             (f"<{name}>", *(env[a] for a in inputs)), options, name=f"{name}_outputs")
    for i, node in enumerate(outputs):
        env[node] = outer.create_node("call_function", operator.getitem, (call, i), name=node.name)
    return body


def _operator(qualified: str, overload: str | None):
    """A torch operator by name (`aten::mm`, `default`): how a pickled context_fn refers to the ops it names."""
    namespace, name = qualified.split("::")
    packet = getattr(getattr(torch.ops, namespace), name)
    return packet if overload is None else getattr(packet, overload)


class _OperatorsByName(pickle.Pickler):
    """Pickles torch operators by name: they do not pickle (selective checkpointing's usual context_fn,
    `functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])`, holds them)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch._ops.OpOverload):
            return _operator, (obj._schema.name, obj._overloadname)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            return _operator, (obj._qualified_op_name, None)
        # higher-order operators too (torch.ops.higher_order.flex_attention, which save lists of attention
        # models name): they did not pickle, and the saved model lost its selective checkpointing
        if isinstance(obj, torch._ops.HigherOrderOperator):
            return _operator, (f"{obj.namespace}::{obj.name()}", None)
        return NotImplemented


def _unpickled_context(data: bytes):
    """A context_fn as _PickledContext saved it, or none where this process cannot make it again: one that
    refers to a function of the script that saved the model (`__main__`) or of a module not importable
    here, or to an operator not registered here. The model itself loads without the saving script's code;
    its selective checkpointing failed the whole load."""
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - whatever unpickling the user's object raises
        warnings.warn(f"the context_fn of a torch.utils.checkpoint call cannot be loaded in this process "
                      f"({type(e).__name__}: {e}): the loaded model recomputes that call whole in backward (the same "
                      f"values; selective checkpointing saved some ops' outputs instead). Define the policy in a "
                      f"module this process imports to keep it", stacklevel=2)
        return torch.utils.checkpoint.noop_context_fn


class _PickledContext:
    """A context_fn pickled by _OperatorsByName: unpickling it gives back the context_fn itself."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return _unpickled_context, (self.data,)


def portable_contexts(contexts: tuple) -> tuple:
    """The graph module's context_fn objects as pickle keeps them. One that cannot be pickled (a lambda,
    a local function) is saved as none: the loaded model recomputes that checkpoint call whole, which
    computes the same values, in more time; a warning says so."""
    portable = []
    for context_fn in contexts:
        buffer = io.BytesIO()
        try:
            _OperatorsByName(buffer).dump(context_fn)
            portable.append(_PickledContext(buffer.getvalue()))
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as e:
            warnings.warn(f"the context_fn of a torch.utils.checkpoint call ({context_fn!r}) cannot be pickled "
                          f"({type(e).__name__}: {e}): the saved model recomputes that call whole in backward (the "
                          f"same values; selective checkpointing saved some ops' outputs instead). Pass a function "
                          f"defined at module level, or functools.partial of one, to keep it", stacklevel=3)
            portable.append(torch.utils.checkpoint.noop_context_fn)
    return tuple(portable)


class ExportTags(TorchFunctionMode):
    """While torch.export captures a model for training (in this thread): each op made inside a
    torch.utils.checkpoint call is annotated with the call. export copies fx's current node meta, its
    "custom" entry included (fx.traceback.annotate's), into the nodes it makes under preserve_node_meta;
    tag_exported() turns the annotations into SparsecMeta.checkpoint, and the graph module runs the spans
    checkpointed again, as it does a torch.fx graph's. export itself inlines the calls: the capture of a
    model only it can trace (no_grad or autocast inside the checkpointed code) kept none before."""

    KEY = "sparsec_checkpoint"

    def __init__(self):
        super().__init__()
        self.tags, self.regions, self._thread = CheckpointTags(), {}, threading.get_ident()
        self._interpreted: dict[int, tuple[CheckpointRegion, CheckpointRegion]] = {}  # id(graph's) -> (it, ours)

    @staticmethod
    def supported() -> bool:
        return hasattr(fx_traceback, "annotate") and isinstance(getattr(fx_traceback, "current_meta", None), dict)

    def __enter__(self):
        self._preserved = fx_traceback.preserve_node_meta()  # (restores fx's current meta on exit)
        self._preserved.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._preserved.__exit__(*exc)
            self.tags.close()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # (not while dynamo traces torch.cond's branches, which it would refuse: export failed)
        if not torch.compiler.is_dynamo_compiling() and threading.get_ident() == self._thread:
            region = self.tags.region() or self._region_of_interpreted_node()
            custom = dict(fx_traceback.current_meta.get("custom") or {})  # (a new dict: nodes may share the old)
            if region is not None:
                self.regions[region.index] = region
                custom[self.KEY] = region.index
            else:
                custom.pop(self.KEY, None)
            fx_traceback.current_meta["custom"] = custom
        return func(*args, **(kwargs or {}))

    def _region_of_interpreted_node(self) -> CheckpointRegion | None:
        """The checkpoint call of the graph node torch.export is running, where it runs a graph module (a
        compiled model compiled again): export runs those through fx.Interpreter, not their forward, so no
        checkpoint call is on the stack (the recompiled graph stored every activation); the interpreter's
        current meta is the node's, which carries the call (SparsecMeta.checkpoint). A new region per call,
        numbered after the ones found on the stack."""
        region = getattr(fx_traceback.current_meta.get(META_KEY), "checkpoint", None)
        if region is None:
            return None
        if id(region) not in self._interpreted:
            self._interpreted[id(region)] = (region, CheckpointRegion(self.tags.kept, region.options))
            self.tags.kept += 1
        return self._interpreted[id(region)][1]


def tag_exported(gm: fx.GraphModule, regions: dict[int, CheckpointRegion]) -> int:
    """Tag the nodes of an exported graph module with the checkpoint calls ExportTags annotated them with
    (a higher-order op, such as export's no_grad / autocast regions, with the call of the ops in its
    subgraph); the number of calls found."""
    def index(node: fx.Node) -> int | None:
        return (node.meta.get("custom") or {}).get(ExportTags.KEY)

    def inner(module: fx.GraphModule, node: fx.Node) -> set[int]:
        """The calls of the ops in a higher-order op's subgraphs, nested ones included (their placeholders
        carry the meta of the values passed in)."""
        found = set()
        for a in node.all_input_nodes:
            sub = getattr(module, a.target, None) if a.op == "get_attr" else None
            if isinstance(sub, fx.GraphModule):
                for n in sub.graph.nodes:
                    if n.op not in ("placeholder", "output"):
                        found |= {index(n)} | (inner(sub, n) if isinstance(n.target, torch._ops.HigherOrderOperator)
                                               else set())
        return found - {None}

    # A region export made around several calls (`with torch.autocast(...):` over a loop of checkpointed
    # blocks) cannot be split: its calls run as one, or, where their options differ, unchecked. A region
    # left untagged made a span of the getitems after it alone, which checkpointed nothing (and, reentrant,
    # got a tuple input, so its output required no grad: the model trained nothing and backward failed).
    calls_of = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if index(node) is not None:
            calls_of[node] = {index(node)} & set(regions)
        elif isinstance(node.target, torch._ops.HigherOrderOperator):
            calls_of[node] = inner(gm, node) & set(regions)
    together = nx.utils.UnionFind(regions)
    for calls in calls_of.values():
        together.union(*calls)
    one = {k: together[k] for group in together.to_sets()  # (options compared, not hashed: a context_fn may not be)
           if all(regions[m].options == regions[min(group)].options for m in group) for k in group}
    spans: dict[int, list[fx.Node]] = {}
    for node, calls in calls_of.items():
        if calls and min(calls) in one:
            spans.setdefault(one[min(calls)], []).append(node)
    # A call made under no_grad (the model's own, around it) is recorded as one no_grad region: torch runs
    # such a call plainly (none of its outputs requires grad), and a reentrant one checkpointed again failed
    # in backward ("none of output has requires_grad=True")
    kept = {k: nodes for k, nodes in spans.items() if not all(_under_no_grad(n) for n in nodes)}
    for k, nodes in kept.items():
        for node in nodes:
            update_meta(node, checkpoint=regions[k])
    return len(kept)


def _under_no_grad(node: fx.Node) -> bool:
    """Whether `node` is export's no_grad region (wrap_with_set_grad_enabled(False, ...)) or one of its outputs."""
    if node.target is operator.getitem:
        node = node.args[0]
    return (isinstance(node, fx.Node) and isinstance(node.target, torch._ops.HigherOrderOperator)
            and node.target.name() == "wrap_with_set_grad_enabled" and node.args[:1] == (False,))
