"""What sparsec's options accept as a number: numbers.Integral / numbers.Real, so numpy scalars pass (a
sweep's np.float32 was refused), and never a bool (True is an int to Python: min_weights=True would
read as 1)."""
from __future__ import annotations

import numbers


def is_integer(value: object) -> bool:
    """An int or integer numpy scalar, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (int, float, numpy scalar), not a bool; NaN and inf included (callers check ranges)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
