"""The example inputs a compile runs the model on. The user gives positional arguments (example_inputs) and,
where the forward takes some by name, keyword arguments (example_kwargs); sparsec works with one tuple, the
one the traced graph takes: every parameter of the forward in order, keyword-only ones included (fx and
torch.export make them positional parameters of the graph). Calls of the model itself split it back."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from sparsec.errors import ExampleInputError, InvalidTypeError
from sparsec.plan import dtype_name

_ACCEPTED = ("example_inputs must be a tuple of the positional arguments the model's forward accepts; arguments "
             "it takes by keyword (keyword-only ones too) go in example_kwargs={name: value}")


def normalize_example_inputs(model: nn.Module, example_inputs: object, example_kwargs: object = None) -> tuple | None:
    """The example inputs as the traced graph takes them (a single tensor counts as (x,)); None where no
    example is given. They are checked against the forward's signature, as the model's call would check
    them (a traced graph silently ignores surplus arguments), and keyword arguments are placed where the
    signature has them, the defaults of the parameters between filled in."""
    if example_kwargs is not None and (not isinstance(example_kwargs, dict)
                                       or not all(isinstance(k, str) for k in example_kwargs)):
        raise InvalidTypeError(f"example_kwargs must be a dict {{argument name: value}}, got "
                               f"{type(example_kwargs).__name__} {example_kwargs!r:.80}")
    kwargs = example_kwargs or {}
    if example_inputs is None and not kwargs:
        return None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args = () if example_inputs is None else example_inputs
    if not isinstance(args, tuple):
        raise InvalidTypeError(
            f"example_inputs must be a tuple of the model's positional arguments, e.g. (x,), "
            f"got {type(args).__name__}; wrap a single tensor as (x,)")
    inputs = _in_graph_order(model, args, kwargs)
    # (torch's "Internal error: NestedTensorImpl doesn't support sizes" came out of the trace check)
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in tree_leaves(inputs)):
        raise ExampleInputError("an example input is a nested tensor (torch.nested), which sparsec cannot trace "
                                "or compare shapes of; pass a padded dense tensor (nested.to_padded_tensor(0.0)) "
                                "and its mask or lengths as inputs")
    return fresh_inputs(inputs)


def _in_graph_order(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    signature = _signature(model)
    if signature is None:  # (builtins without a Python signature: the run itself complains)
        if kwargs:
            raise ExampleInputError(f"{type(model).__name__}.forward has no Python signature to place example_kwargs "
                                    f"{sorted(kwargs)} by: pass every argument in example_inputs")
        return args
    params = list(signature.parameters.values())
    star = [p.name for p in params if p.kind is p.VAR_POSITIONAL]
    if star and kwargs:  # (the graph takes *args as separate inputs: where keyword-only ones go among them is not fixed)
        raise ExampleInputError(f"{type(model).__name__}.forward{signature} takes *{star[0]}: pass its arguments "
                                f"in example_inputs, without example_kwargs")
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        keywords = f" with keywords {sorted(kwargs)}" if kwargs else ""
        raise ExampleInputError(f"the example inputs do not fit the model: {type(model).__name__}.forward{signature} "
                                f"cannot take {describe_inputs(args)}{keywords}: {e}\n{_ACCEPTED}") from e
    if not kwargs:
        return args
    extra = [p.name for p in params if p.kind is p.VAR_KEYWORD and p.name in bound.arguments]
    if extra:
        raise ExampleInputError(
            f"example_kwargs {sorted(bound.arguments[extra[0]])} are taken by {type(model).__name__}.forward's "
            f"**{extra[0]}: a traced graph takes named parameters only; name them in the forward's signature")
    last = max(i for i, p in enumerate(params) if p.name in bound.arguments)
    return tuple(bound.arguments.get(p.name, p.default) for p in params[:last + 1])


def model_arguments(model: nn.Module, inputs: tuple) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) calling the model itself with the graph's `inputs`: its keyword-only parameters by name."""
    signature = _signature(model)
    if signature is None:
        return inputs, {}
    params = signature.parameters.values()
    keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    if not keyword_only or any(p.kind is p.VAR_POSITIONAL for p in params):
        return inputs, {}
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return inputs[:positional], dict(zip(keyword_only, inputs[positional:]))


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def fresh_inputs(example_inputs: tuple) -> tuple:
    """Copies of the tensors in the example inputs: sparsec runs the model on them several times, and a
    forward that changes its input in place (x.mul_(2)) must change neither the user's tensors nor
    what the next run sees."""
    return tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t,
                    example_inputs)


def describe_inputs(example_inputs: tuple | None) -> str:
    if example_inputs is None:
        return "no example inputs"

    def one(a: Any) -> str:
        if isinstance(a, torch.Tensor):
            return f"Tensor{list(a.shape)} {dtype_name(a.dtype)}"
        return type(a).__name__

    return "(" + ", ".join(one(a) for a in example_inputs) + ")"
