"""The arguments a torch.export graph fixed at the example's values, and calls that pass them again.

torch.export takes the example's None / bool arguments as constants (the graph follows the branches they
took) and an argument left at its default (None, a bool, a number, a string) not at all, so its graph module's forward takes the example's
arguments alone: `cm(x, mask=None)` was refused ("unexpected keyword argument 'mask'") when the example left
mask at its default None, and `cm(x)` ("missing a required argument: 'mask'") when the example passed it,
though the model takes both calls and computes the same. symbolic_trace's graph takes them with their
defaults and checks each call passes the example's value; this does the same for an export graph.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from sparsec.errors import InvalidInputError


@dataclass(frozen=True)
class FixedArguments:
    order: tuple[str, ...]   # the model's forward parameters that may be passed by position, in order
    values: dict             # name -> the example's None / bool value, or the default it left in place
    keyword_only: tuple[str, ...] = ()  # the parameters passed by name only

    def graph_call(self, takes: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """(args, kwargs) for the graph (taking parameters `takes`) of a call of the model: a fixed argument
        passed with the example's value is passed on where the graph takes it and dropped where it does not;
        one not passed gets the example's value; one passed with another value is refused. A call that does
        not fit the model's parameters goes to the graph as it is (its own error says how)."""
        if len(args) > len(self.order):  # (more than the model takes by position: its own TypeError)
            return args, kwargs
        call = dict(zip(self.order, args))
        if any(name in call or name not in self.order + self.keyword_only for name in kwargs):
            return args, kwargs
        call.update(kwargs)
        for name, value in self.values.items():
            if name not in call:
                call[name] = value
            elif not _same_value(call[name], value):
                raise InvalidInputError(
                    f"argument {name!r} is {_describe(call[name])} in this call, but the graph was captured with "
                    f"{value!r} (the example's value, or its default) and follows the branches that value took: "
                    f"compile with example inputs that pass {name} as you will call the model")
        if any(name not in call for name in takes) or set(call) - set(takes) - set(self.values):
            return args, kwargs
        return (), {name: call[name] for name in takes}


def _same_value(given, fixed) -> bool:
    if fixed is None or isinstance(fixed, bool):
        return given is fixed if fixed is None else type(given) is bool and given == fixed
    numbers = (int, float)
    same_kind = type(given) is type(fixed) or (isinstance(given, numbers) and isinstance(fixed, numbers)
                                               and not isinstance(given, bool))
    return same_kind and given == fixed


# defaults a call may pass again, compared by value (a tensor's default could not be)
_PLAIN = (type(None), bool, int, float, str)


def _describe(value) -> str:
    return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else f"a {type(value).__name__}"


def fixed_arguments(forward, args: tuple, kwargs: dict) -> FixedArguments | None:
    """What the example call `forward(*args, **kwargs)` fixes (None: nothing, or a signature without names
    for every argument, *args)."""
    try:
        signature = inspect.signature(forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = signature.parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    given = set(bound.arguments)
    bound.apply_defaults()
    order = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keyword_only = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
    # the example's None / bool values, and the defaults it left in place (export takes neither as an input)
    values = {name: value for name, value in bound.arguments.items() if name in order + keyword_only
              and (value is None or isinstance(value, bool) or (name not in given and isinstance(value, _PLAIN)))}
    return FixedArguments(order, values, keyword_only) if values else None
