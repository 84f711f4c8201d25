"""Which two-operand einsum equations are a linear layer on one operand.

`einsum("bsd,hd->bsh", x, W)` computes `F.linear(x, W)`, and `einsum("...d,dh->...h", x, W)` computes
`x @ W`: the data operand's subscripts end in the contracted index k, the weight's are k and one
output index n, and the output is the data's subscripts with k replaced by n, in the same order.
`einsum("hk,bkl->bhl", W, x)` is `W @ x`: the same with k second to last in the data.
Anything else (a contraction over another dim of the data, a permuted output, a diagonal, a batch
index shared with the weight) is not a layer and stays as the user wrote it.
"""
from __future__ import annotations

import re
from collections import Counter

_TERM = re.compile(r"(?:\.\.\.|[A-Za-z])*")


def _tokens(term: str) -> list[str] | None:
    """Subscripts of one operand as a list, "..." as one token (None when not valid einsum syntax)."""
    if not _TERM.fullmatch(term):
        return None
    tokens = re.findall(r"\.\.\.|[A-Za-z]", term)
    return tokens if tokens.count("...") <= 1 else None


def _implicit_output(terms: list[list[str]]) -> list[str]:
    """torch's output without "->": the broadcast dims, then the indices used once, in alphabetical order."""
    counts = Counter(t for term in terms for t in term if t != "...")
    ellipsis = ["..."] if any("..." in term for term in terms) else []
    return ellipsis + sorted(t for t, c in counts.items() if c == 1)


def linear_operands(equation: object) -> list[tuple[int, bool, bool]]:
    """Each way the equation is a layer on one operand: (index of the weight operand, whether the
    weight is written [out, in], whether it is on the left: features along the data's dim -2, as in
    `W @ x`). Empty when it is not a layer."""
    if not isinstance(equation, str):
        return []
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = [_tokens(t) for t in lhs.split(",")]
    if len(terms) != 2 or any(t is None for t in terms):
        return []
    out = _tokens(rhs) if arrow else _implicit_output(terms)
    if out is None:
        return []
    found = []
    for w in (1, 0):
        data, weight = terms[1 - w], terms[w]
        if len(weight) != 2 or "..." in weight or weight[0] == weight[1] or len(set(data)) != len(data):
            continue
        # features last (x @ W.T), or second to last with one more dim after them (W @ x)
        for left, tail in ((False, []), (True, data[-1:])):
            if len(data) < 1 + len(tail) or "..." in tail:
                continue
            k, prefix = data[-1 - len(tail)], data[:-1 - len(tail)]
            if k == "..." or k not in weight:
                continue
            n = weight[0] if weight[1] == k else weight[1]
            if n not in data and out == prefix + [n] + tail:
                found.append((w, weight == [n, k], left))
    return found
