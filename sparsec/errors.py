"""Exceptions sparsec raises on purpose.

Errors caused by the user's input subclass both `SparsecError` and the builtin a caller would
expect (`ValueError`, `TypeError`), so `except ValueError` keeps working. The pipeline runner lets
these through unchanged and wraps anything else in `PassError`, which names the failing pass.
"""
from __future__ import annotations


class SparsecError(Exception):
    """Base class of every error sparsec raises deliberately."""


class InvalidInputError(SparsecError, ValueError):
    """A value the user passed is not accepted (pattern, names, plan, options)."""


class InvalidTypeError(SparsecError, TypeError):
    """An argument the user passed has the wrong type."""


class InvalidPatternTypeError(InvalidInputError, InvalidTypeError):
    """A pattern that is not a string: a ValueError like every unaccepted pattern (design.md), and a
    TypeError since its type is what is wrong."""


class ParameterWriteError(InvalidInputError):
    """The model's forward writes its own parameters in place, which a compile cannot follow."""


class ExampleInputError(SparsecError, ValueError):
    """The example inputs do not fit the model (wrong shape, dtype or type)."""


class TraceError(SparsecError, RuntimeError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model."""


class PassError(SparsecError, RuntimeError):
    """A compiler pass failed on an input it should have handled: a bug in sparsec."""


class CorruptFileError(SparsecError, ValueError):
    """A saved plan / model / cache entry is unreadable or inconsistent."""


class MissingCodeError(SparsecError, ImportError):
    """An intact saved file holds objects of classes this process cannot import."""


def last_line(error: BaseException, limit: int = 300) -> str:
    """"Type: last line of the message", for reports that name a failure in one line: compiler
    errors (Triton, ptxas) print pages of context before their cause, which comes last."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1][:limit] if text else ''}"
