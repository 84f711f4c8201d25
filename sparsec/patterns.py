"""Sparsity pattern strings: parsing, validation and the numbers derived from them.

Accepted forms (design.md, "Patterns"):
  "N:M"      1 <= N <= M: N kept of every M consecutive weights along the reduction dimension
  "fanin:S"  0 < S < 1: constant fan-in, every output row keeps k = max(1, floor(numel*(1-S)) // out)
  "unstructured:S"  0 < S < 1: the layer keeps its numel - round(S*numel) weights of largest magnitude,
             wherever they are (method (d), Pietron & Zurek); every reduction size fits
  "dense"    analysis and plan only
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from sparsec.errors import InvalidInputError, InvalidPatternTypeError

ACCEPTED_FORMS = ('"N:M" with 1 <= N <= M (e.g. "2:4", "1:4", "4:8"), "fanin:S" with 0 < S < 1 (e.g. "fanin:0.9"), '
                  '"unstructured:S" with 0 < S < 1 (e.g. "unstructured:0.95"), or "dense"')

_NM = re.compile(r"(\d+):(\d+)")
_FANIN = re.compile(r"fanin:(\S+)")
_UNSTRUCTURED = re.compile(r"unstructured:(\S+)")


@dataclass(frozen=True)
class NM:
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    def fits(self, reduction: int) -> bool:
        return reduction % self.m == 0


@dataclass(frozen=True)
class FanIn:
    sparsity: float

    def __str__(self) -> str:
        # repr: the shortest text that parses back to this very float. The plan stores this string and
        # the mask is computed from it: "%g" rounded to 6 digits (fanin:0.9999995 became the invalid
        # "fanin:1", and fanin:0.12345649 became 0.123456, keeping a different k on large layers).
        return f"fanin:{self.sparsity!r}"

    def k(self, numel: int, out_features: int) -> int:
        """Weights kept per output row (SRigL's constant fan-in), in floating point as SRigL's code
        computes it: where numel * (1 - S) is a whole number only in exact arithmetic, the float
        product can fall just below it (fanin:0.9 on 4 x 40: 15.999... -> floor 15, k = 3, not 4)."""
        return max(1, math.floor(numel * (1.0 - self.sparsity)) // out_features)


@dataclass(frozen=True)
class Unstructured:
    sparsity: float

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity!r}"  # (repr: the text parses back to this very float, as FanIn's)

    def kept(self, numel: int) -> int:
        """Weights the layer keeps: numel minus round(S * numel) pruned, halves rounding up (methods.md
        D.4: the zero count is round(S * numel)), in exact arithmetic on S as written: the float product
        0.7 * 45 is 31.4999..., which rounded to 31 where the user's 31.5 rounds to 32. It can be 0 on a
        tiny layer at high S: the layer then computes its bias alone, as its mask says."""
        # floor(S*numel + 1/2) in integers: numel may be a SymInt under torch.compile (a layer compiled on
        # its own sees its weight's shape made dynamic after a recompile), which Fraction cannot multiply
        exact = Fraction(repr(self.sparsity))
        pruned = (2 * exact.numerator * numel + exact.denominator) // (2 * exact.denominator)
        return numel - min(numel, pruned)

    @classmethod
    def keeping(cls, kept: int, numel: int) -> "Unstructured | None":
        """The pattern, in its shortest decimal, that keeps `kept` of `numel` weights (None: kept is 0 or
        numel, which no 0 < S < 1 names on this size)."""
        for digits in range(1, 18):
            sparsity = round(1.0 - kept / numel, digits)
            if 0.0 < sparsity < 1.0 and cls(sparsity).kept(numel) == kept:
                return cls(sparsity)
        return None


@dataclass(frozen=True)
class Dense:
    def __str__(self) -> str:
        return "dense"


Pattern = NM | FanIn | Unstructured | Dense


def parse_grad_pattern(text: object, label: str) -> NM:
    """A data-gradient pattern (SDGP groups dY N:M along output features): errors start with `label`."""
    try:
        pattern = parse_pattern(text)
    except ValueError as e:  # (the pattern errors): name the argument, not `pattern`
        raise type(e)(f"{label}: {e}") from None
    if not isinstance(pattern, NM):
        raise InvalidInputError(f"{label} {text!r}: data gradients are pruned N:M (e.g. '2:4'), or None for a "
                                f"dense gradient")
    return pattern


def parse_pattern(text: object) -> Pattern:
    """Parse a pattern string; raise a clear error naming the accepted forms otherwise."""
    if isinstance(text, (NM, FanIn, Unstructured, Dense)):
        return parse_pattern(str(text))  # checked as its text is: FanIn(1.5) or NM(3, 2) made by hand is refused
    if not isinstance(text, str):
        raise InvalidPatternTypeError(f"pattern must be a string, got {type(text).__name__} {text!r}; accepted: {ACCEPTED_FORMS}")
    s = text.strip()
    if s == "dense":
        return Dense()
    if match := _NM.fullmatch(s):
        n, m = int(match.group(1)), int(match.group(2))
        if 1 <= n <= m:
            return NM(n, m)
        raise InvalidInputError(f"invalid pattern {text!r}: N:M needs 1 <= N <= M; accepted: {ACCEPTED_FORMS}")
    for regex, form in ((_FANIN, FanIn), (_UNSTRUCTURED, Unstructured)):
        if match := regex.fullmatch(s):
            try:
                sparsity = float(match.group(1))
            except ValueError:
                sparsity = math.nan
            if 0.0 < sparsity < 1.0:
                return form(sparsity)
            raise InvalidInputError(f"invalid pattern {text!r}: {s.split(':')[0]}:S needs 0 < S < 1; accepted: {ACCEPTED_FORMS}")
    raise InvalidInputError(f"invalid pattern {text!r}; accepted: {ACCEPTED_FORMS}")
