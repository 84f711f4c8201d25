"""`sparsec.compile` and `sparsec.explain`: the front door."""
from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from sparsec.compiled import CompiledModel
from sparsec.context import CompileContext
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.example_inputs import normalize_example_inputs
from sparsec.frontend import capture, check_not_a_wrapper
from sparsec.graph_module import follow_registration_order, registration_order
from sparsec.meta import get_meta
from sparsec.options import DEFAULT_MIN_WEIGHTS, DEFAULT_QUANT_BUDGET, CompileOptions
from sparsec.passes.weight_reads import owner_of
from sparsec.pipeline import run_pipeline
from sparsec.plan import Plan
from sparsec.state import read_quietly


def _run(model: nn.Module, example_inputs: Any, options: CompileOptions, example_kwargs: Any = None,
         capture_mode=contextlib.nullcontext):
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"sparsec compiles torch.nn.Module instances, got {type(model).__name__}")
    check_not_a_wrapper(model)
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise InvalidInputError(f"the model's {', '.join(on_meta[:3])}{' ...' if len(on_meta) > 3 else ''} "
                                f"{'is' if len(on_meta) == 1 else 'are'} on the meta device (shapes without values): "
                                f"sparsec prunes by weight magnitude, so materialize the model first "
                                f"(model.to_empty(device='cpu'), then load its state_dict)")
    if isinstance(model, CompiledModel):  # e.g. a train=True model compiled again for inference
        model = model.graph_module
    inputs = normalize_example_inputs(model, example_inputs, example_kwargs)
    # (made under inference mode, they would refuse the in-place ops of a forward run outside it)
    inputs = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v, inputs)
    try:
        private = _private_copy(model)  # the user's model is never modified
    except Exception as e:  # noqa: BLE001
        raise InvalidTypeError(f"sparsec works on a copy of the model, and copy.deepcopy(model) failed: "
                               f"{type(e).__name__}: {e}") from e
    with capture_mode():
        gm, method, notes = capture(private, inputs, options.leaf_modules, options.exclude, train=options.train)
    _clone_inference_tensors(gm)
    gm.registration_order = registration_order(private)
    follow_registration_order(gm, gm.registration_order)
    ctx = CompileContext(options=options, model=private, example_inputs=inputs, trace_method=method, notes=notes)
    gm, history = run_pipeline(gm, ctx)
    return gm, ctx, history


def _clone_inference_tensors(gm: nn.Module) -> None:
    """Replace the inference tensors a capture under torch.inference_mode() made (tensor constants,
    buffers export registers) by ordinary copies, shared ones shared again."""
    copies: dict[int, torch.Tensor] = {}

    def ordinary(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copy_ = t.clone()
            copies[id(t)] = nn.Parameter(copy_, t.requires_grad) if isinstance(t, nn.Parameter) else copy_
        return copies[id(t)]
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.is_inference():
                    table[name] = ordinary(t)
        for name, t in list(vars(module).items()):
            if isinstance(t, torch.Tensor) and t.is_inference():
                setattr(module, name, ordinary(t))


def _private_copy(model: nn.Module) -> nn.Module:
    """copy.deepcopy of the model, with every plain tensor attribute that is the result of an autograd
    computation copied detached: deepcopy refuses those, and hooks that recompute a weight before each
    call leave one behind (torch.nn.utils.prune's `weight = weight_orig * weight_mask`, the old
    torch.nn.utils.weight_norm). The hook computes it again on the copy's next call."""
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def compile(model: nn.Module, pattern: str | None = None, example_inputs: Any = None, *, quantize: str | None = None,
            include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, plan: Plan | None = None,
            min_weights: int = DEFAULT_MIN_WEIGHTS, quant_budget: float = DEFAULT_QUANT_BUDGET,
            leaf_modules: Sequence[Any] | None = None, backend: str = "auto", train: bool = False,
            grad_pattern: str | None = None, grad_mode: str | None = None, weight_update: str | None = None,
            ste_decay: float | None = None, timing: str = "eager", example_kwargs: dict | None = None) -> CompiledModel:
    """Trace `model`, decide per layer, rewrite chosen layers to packed sparse modules.

    pattern: "N:M" (e.g. "2:4"), "fanin:S" (e.g. "fanin:0.9"), "unstructured:S" (e.g. "unstructured:0.95")
        or "dense" (plan only); default "2:4", or
        the given plan's pattern (a different one with plan= is refused, as is quantize=: the plan says).
    example_inputs: tuple of positional arguments for model(*example_inputs); needed for shapes,
        FLOP estimates and the torch.export fallback.
    example_kwargs: the example's arguments given by name, model(*example_inputs, **example_kwargs) (a
        keyword-only one, or a mask= past defaulted ones); the compiled model takes them by name too.
    quantize: None, "int8" (per-output-channel symmetric int8 for sparse layers), "auto"
        (int8 only where the relative weight error stays within quant_budget), or "log2:B" / "codebook:B"
        (2 <= B <= 8: method (d)'s non-linear levels, one table of 2^B values per layer).
    include / exclude: module names or regexes (full match, also matching a containing module's
        path) forcing layers sparse / keeping them dense.
    plan: an (edited) Plan to apply exactly instead of the default policy (not with include / exclude / quantize / grad_pattern).
    min_weights: layers with fewer weights stay dense unless included.
    leaf_modules: module classes or names symbolic_trace must not trace into.
    backend: "auto" (CPU: float32 / bfloat16 / float16 linear layers on their C++ kernel, condensed for
        fan-in, bitmask for N:M, or dense, whichever measured faster; other layers dense; CUDA: per layer the fastest of Triton /
        cuSPARSELt / dense, measured at the compiled shape), "triton" (generated fused 2:4 / fan-in
        kernels; CUDA, or CPU under TRITON_INTERPRET=1) or "torch" (the compressed form everywhere,
        the dense weight rebuilt per call: smallest, not fastest).
    timing: how backend "auto" times each candidate on CUDA. "eager" (default): calls as an eager caller
        waits them, host time included, so the choice is never slower for a model run call by call.
        "graph": replayed in a CUDA graph, the GPU time alone, for models run under CUDA graphs or
        torch.compile(mode="reduce-overhead"), where the host's time per call is out of the picture (on
        an H100 a one-row 2:4 Triton layer waits ~45 us of host time against ~30 us for nn.Linear, more
        than its kernel saves; cuSPARSELt's per-call setup is ~0.6 ms).
    train: rewrite for training: dense weights with first-class masks (weight_update "fixed", the default:
        masks never change; "ste": SR-STE re-pruning every step with decay ste_decay on pruned weights, default
        DEFAULT_STE_DECAY; with plan=, the plan's, which a plan made with SR-STE records) and, with
        grad_pattern (e.g. "2:4"), SDGP: data gradients pruned N:M in backward (grad_mode "magnitude", the
        default, or "rescale"; with plan=, the plan's grad_mode); the last layer's dY, the loss gradient, stays dense
        unless include= names it. pattern="dense" with grad_pattern trains dense weights with SDGP only.
    """
    options = CompileOptions.from_user(pattern, quantize, include, exclude, plan, min_weights, quant_budget, leaf_modules,
                                       backend, train=train, grad_pattern=grad_pattern, grad_mode=grad_mode,
                                       weight_update=weight_update, ste_decay=ste_decay, timing=timing)
    return compile_with_options(model, example_inputs, options, example_kwargs)


@contextlib.contextmanager
def _caller_state_kept(model: Any):
    """What a compile (or explain) must leave to its caller as it was, and what it must not inherit:

    * the random streams: tracing runs the forward, whose `torch.randn(64)` (fixed shape: torch.fx draws it
      while tracing) took numbers from the caller's stream, which then drew others than without the compile;
    * inference mode: under torch.inference_mode() every tensor made is an inference tensor for good, so a
      model compiled in a server's start-up code failed when called in grad mode ("Inference tensors cannot
      be saved for backward") and could not be trained. It compiles as under torch.no_grad() instead,
      but for the capture (yielded: the context to capture in), which runs the forward in the caller's
      inference mode, as the caller runs it (a forward's own inference_mode() region is no change there).
      The copy of the model is made before, outside it, and the capture's tensor constants are cloned out."""
    params = [*model.parameters(), *model.buffers()] if isinstance(model, nn.Module) else []
    cuda = sorted({t.device.index or 0 for t in params if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as modes:
        if not torch.is_inference_mode_enabled():
            yield contextlib.nullcontext
            return
        modes.enter_context(torch.inference_mode(False))
        modes.enter_context(torch.no_grad())
        yield torch.inference_mode


def compile_with_options(model: nn.Module, example_inputs: Any, options: CompileOptions,
                         example_kwargs: dict | None = None) -> CompiledModel:
    with _caller_state_kept(model) as capture_mode:
        return _compiled(model, example_inputs, options, example_kwargs, capture_mode)


def _compiled(model: nn.Module, example_inputs: Any, options: CompileOptions, example_kwargs: dict | None,
              capture_mode) -> CompiledModel:
    gm, ctx, history = _run(model, example_inputs, options, example_kwargs, capture_mode)
    dense = {}
    for lp in ctx.plan:
        if lp.sparsity is None:
            path = _dense_weight_path(gm, ctx, lp.name)
            if path is not None:
                dense[lp.name] = (path, lp.op)
    cm = CompiledModel(gm, ctx.plan, history, ctx.counters, dense, ctx.trace_method)
    cm.kernels, cm.kernel_manifest = dict(ctx.kernels), dict(ctx.kernel_manifest)
    cm.example_input_spec = _input_spec(ctx.example_inputs)
    _warn_if_nothing_sparse(ctx.plan, options)
    _warn_if_quantize_unused(ctx.plan, options, [name for name, u in ctx.unreached.items() if u.sparsity is not None])
    return cm


def _warn_if_nothing_sparse(plan: Plan, options: CompileOptions) -> None:
    """A pattern that no layer could take gives a model as dense as the original: say so where a caller
    who does not print the plan sees it (a given plan's dense entries are the caller's own choice)."""
    if options.plan is not None or str(options.pattern) == "dense" or not plan.layers:
        return
    if any(lp.sparsity is not None or lp.grad_sparsity is not None for lp in plan.layers):
        return  # (a layer whose data gradient SDGP prunes is not computed as the original either)
    why = [f"{lp.name}: {lp.reason.removeprefix('kept dense: ').split(' (')[0].split(';')[0]}" for lp in plan.layers]
    more = f"; and {len(why) - 3} more" if len(why) > 3 else ""
    warnings.warn(f"sparsec.compile: no layer was made sparse with pattern {str(options.pattern)!r}, so the compiled "
                  f"model is as dense as the original ({'; '.join(why[:3])}{more}). print(cm.plan) gives "
                  f"every layer's reason; include= forces layers the size or position policy kept dense",
                  stacklevel=5)  # (the caller of sparsec.compile)


def _warn_if_quantize_unused(plan: Plan, options: CompileOptions, packed: list[str]) -> None:
    """quantize="int8" / levels that no layer took: the layers packed by an earlier compile (a compiled model
    compiled again) run as they are, and dense layers are not quantized. That was silent. ("auto" states per
    layer why it stayed float.)"""
    if options.quantize in (None, "auto") or options.plan is not None or not plan.layers:
        return
    if any(lp.quant is not None for lp in plan.layers):
        return
    # (packed: the layers an earlier compile packed, which this one runs as they are)
    if len(packed) < len(plan.sparse_layers):
        return  # (a layer made sparse now that stayed float says why in its reason: a weight int8 cannot store)
    why = (f"layers {packed} were packed by an earlier compile and run as they are (compile the original model to "
           f"quantize them)" if packed else "quantization applies to the layers made sparse, and none was")
    warnings.warn(f"sparsec.compile: quantize={options.quantize!r} was applied to no layer: {why}. print(cm.plan) "
                  f"gives every layer's reason", stacklevel=5)  # (the caller of sparsec.compile)


def _input_spec(inputs: tuple | None) -> list | None:
    """Shapes and dtypes of the example inputs (not the data), so a compiled model can make more."""
    if inputs is None:
        return None
    spec = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            spec.append(("tensor", tuple(value.shape), value.dtype, None))
        elif isinstance(value, (int, float, bool, str, type(None))):
            spec.append(("value", None, None, value))
        else:
            return None
    return spec


def _dense_weight_path(gm, ctx, name: str) -> str | None:
    """Where dense layer `name`'s weight is in the compiled graph module (None: not there, never called)."""
    for node in gm.graph.nodes:
        layer = get_meta(node).layer
        if layer is not None and layer.name == name:
            return layer.weight_path
    try:  # a layer inside a module that is called as a whole keeps its own path
        path = ctx.unreached[name].weight_path
        read_quietly(*owner_of(gm, path))  # (a parametrized weight is a computed tensor, not a Parameter)
        return path
    except (KeyError, AttributeError):
        return None


def explain(model: nn.Module, pattern: str | None = None, example_inputs: Any = None, *,
            example_kwargs: dict | None = None, **options) -> Plan:
    """The plan `compile` would apply, without rewriting anything; the model is untouched.
    Takes the same options as `compile`."""
    unknown = set(options) - _COMPILE_OPTIONS
    if unknown:
        raise InvalidTypeError(f"explain() got unknown options {sorted(unknown)}; it takes compile's: {sorted(_COMPILE_OPTIONS)}")
    with _caller_state_kept(model) as capture_mode:
        _, ctx, _ = _run(model, example_inputs, CompileOptions.from_user(pattern, rewrite=False, **options),
                         example_kwargs, capture_mode)
    return ctx.plan


_COMPILE_OPTIONS = set(inspect.signature(compile).parameters) - {"model", "pattern", "example_inputs", "example_kwargs"}
