"""Non-linear weight quantization of method (d) (Pietron & Zurek; methods.md D.2): power-of-two levels
("log2:B") and a shared-value codebook ("codebook:B"), B an integer bit width with 2 <= B <= 8.

Applied after pruning to a layer's kept values, one table per layer (per tensor). Storage is
`codes` (uint8, the input's shape) plus `table` (float32, exactly 2**B entries); a weight is
`table[code]`. Code 0 is always exactly 0.0, and it is the code of every zero and only of zeros:
zeros stay zero and a nonzero weight never becomes zero (nor infinite), so the quantized tensor has
exactly the original's support. Every table entry is representable in float32 and in the input
dtype, so dequantizing into the input dtype is exact and quantizing that again gives it back
(idempotence, D.4 item 2).

Table layouts (unused codes hold 0.0):
  log2:B      L = 2**(B-1) - 1 levels per sign, exponents e_min .. e_max (ascending):
              code i   (1 <= i <= L) = +2**(e_min + i - 1)
              code L+i (1 <= i <= L) = -2**(e_min + i - 1)
              code 2**B - 1 is never used (2L + 1 = 2**B - 1 codes suffice). When the input dtype
              cannot hold L powers of two below 2**e_max, e_min is raised and the top codes of each
              sign's block stay unused.
  codebook:B  codes 1..n (n <= 2**B - 1) = the shared values in ascending order, all nonzero.

Everything is computed in float64: it holds every float16 / bfloat16 / float32 value exactly (so
the exponent decision below is exact), and the k-means prefix sums over a 4096 x 4096 layer keep
~1e-16 relative error where float32 would keep 1e-7.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sparsec import reference
from sparsec.errors import InvalidInputError, InvalidTypeError

ACCEPTED_FORMS = ('"log2:B" (signed powers of two) or "codebook:B" (k-means shared values), B an integer '
                  'with 2 <= B <= 8 (e.g. "log2:4", "codebook:4")')

MIN_BITS, MAX_BITS = 2, 8

_LEVELS = re.compile(r"(log2|codebook):([1-9][0-9]*)")  # no leading zeros: str() must give the text back

# 1-D Lloyd converges in tens of iterations on weight-like data; the cap only bounds pathological
# inputs (each iteration costs O(k log n): a searchsorted of k midpoints into the sorted values).
LLOYD_MAX_ITERATIONS = 300

# round(log2 m) for a frexp mantissa m in [0.5, 1) is 0 when m >= sqrt(1/2), else -1. The float64
# constant lies above the true sqrt(1/2) by less than one ulp and no float64 lies between the two,
# so the comparison is the exact log-domain rounding for every float64 input (ties cannot occur:
# sqrt(1/2) is irrational).
_SQRT_HALF = math.sqrt(0.5)


@dataclass(frozen=True)
class Levels:
    kind: str   # "log2" | "codebook"
    bits: int   # 2..8

    def __str__(self) -> str:
        return f"{self.kind}:{self.bits}"

    @property
    def table_size(self) -> int:
        return 2 ** self.bits

    @property
    def per_sign(self) -> int:
        """log2 levels per sign, L = (2**B - 2) // 2: code 0 and L codes for each sign fit in 2**B."""
        return (self.table_size - 2) // 2


def parse_levels(text: object) -> Levels:
    """Parse "log2:B" / "codebook:B"; raise naming the accepted forms otherwise."""
    if isinstance(text, Levels):
        return text
    if not isinstance(text, str):
        raise InvalidInputError(f"quantization must be a string, got {type(text).__name__} {text!r}; accepted: {ACCEPTED_FORMS}")
    match = _LEVELS.fullmatch(text)
    if match is None:
        raise InvalidInputError(f"invalid quantization {text!r}; accepted: {ACCEPTED_FORMS}")
    bits = int(match.group(2))
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidInputError(f"invalid quantization {text!r}: B must be in [{MIN_BITS}, {MAX_BITS}] "
                                f"(codes are uint8, and one bit leaves no nonzero level); accepted: {ACCEPTED_FORMS}")
    return Levels(match.group(1), bits)


def is_levels(text: object) -> bool:
    """True exactly when `parse_levels(text)` succeeds (well-formed, B in range)."""
    try:
        parse_levels(text)
    except InvalidInputError:
        return False
    return True


# --------------------------------------------------------------------------- shared helpers


def _check_values(values: torch.Tensor, levels: Levels) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        what = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise InvalidTypeError(f"{levels} quantizes floating-point tensors, got {what}")
    nonfinite = reference.count_nonfinite(values)  # (by slices: isfinite of a bfloat16 layer took 1.5x its size)
    if nonfinite:
        nan = int(torch.isnan(values).sum())
        inf = nonfinite - nan
        raise InvalidInputError(f"{levels} needs finite weights; the tensor holds {nan} NaN and {inf} infinite "
                                f"entries (a diverged or corrupt layer: levels fitted to it would be meaningless)")


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every table entry must be exact in: the table's float32, narrowed to the input dtype
    when that is smaller, so that dequantizing into the input dtype rounds nothing."""
    return dtype if torch.finfo(dtype).bits <= 32 else torch.float32


def _exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents e for which 2**e is finite and nonzero in the storage dtype: float16 [-24, 15],
    bfloat16 [-133, 127], float32 / float64 [-149, 127] (subnormals included, so a tiny weight is
    never flushed to zero)."""
    info = torch.finfo(_storage_dtype(dtype))
    smallest = info.smallest_normal * info.eps  # the smallest subnormal: a power of two, math.log2 is exact
    return round(math.log2(smallest)), math.floor(math.log2(info.max))


def _round_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """round(log2 a) for float64 a > 0, exactly: a = m * 2**x with m in [0.5, 1), log2 a = x + log2 m,
    log2 m in [-1, 0). frexp rounds nothing; round(torch.log2(a)) would inherit log2's last-bit error
    right where it matters, at a = 2**(k + 1/2)."""
    mantissa, exponent = torch.frexp(magnitude)
    return exponent.long() - (mantissa < _SQRT_HALF).long()


def _empty_result(values: torch.Tensor, levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    return codes, torch.zeros(levels.table_size, dtype=torch.float32, device=values.device)


# --------------------------------------------------------------------------- log2


def _quantize_log2(values: torch.Tensor, levels: Levels, fitted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """sign(w) * 2**e, e = round(log2 |w|) clamped to [e_min, e_max]: e_max = round(log2 max|w|) (the
    largest weight is represented to within a factor sqrt(2)), e_min = e_max - L + 1. Weights below
    2**e_min round up to it, never to 0; both ends are also kept inside the storage dtype's range, so
    huge float64 weights saturate at 2**127 and tiny ones at 2**-149 (2**15 / 2**-24 for float16).
    Each weight's code depends on it and e_max alone, so the codes are computed a slice at a time (the
    whole layer's float64 temporaries were 28x a bfloat16 layer at once). A `fitted` table gives e_min and
    e_max instead of the values' max |w|."""
    codes, table = _empty_result(values, levels)
    flat = values.detach().reshape(-1)
    size = reference.ROW_CHUNK_WEIGHTS
    per_sign = levels.per_sign
    if fitted is not None:
        powers = fitted[1:per_sign + 1]
        powers = powers[powers != 0]
        if powers.numel() == 0:
            return codes, table
        e_min = int(torch.frexp(powers[:1].double())[1]) - 1  # (a power of two 2**e is 0.5 * 2**(e + 1))
        e_max = e_min + powers.numel() - 1
    else:
        absmax = max((float(part.abs().amax()) for part in flat.split(size) if part.numel()), default=0.0)
        if absmax == 0:
            return codes, table
        lowest, highest = _exponent_range(values.dtype)
        e_max = int(_round_log2(torch.tensor(absmax, dtype=torch.float64)).clamp(lowest, highest))
        e_min = max(e_max - per_sign + 1, lowest)
    flat_codes = codes.view(-1)
    for start in range(0, flat.numel(), size):
        x = flat[start:start + size].double()
        step = _round_log2(x.abs()).clamp(e_min, e_max) - e_min + 1          # 1..n within each sign's block
        code = torch.where(x > 0, step, step + per_sign)
        flat_codes[start:start + x.numel()] = torch.where(x != 0, code, torch.zeros_like(code)).to(torch.uint8)
    # math.ldexp: exact powers of two (exp2 of an integer is exact only if libm says so)
    powers = torch.tensor([math.ldexp(1.0, e) for e in range(e_min, e_max + 1)], dtype=torch.float32, device=values.device)
    table[1:1 + powers.numel()] = powers
    table[per_sign + 1:per_sign + 1 + powers.numel()] = -powers
    return codes, table


# --------------------------------------------------------------------------- codebook


def _spread(low: float, high: float, k: int) -> torch.Tensor:
    """k points evenly from low to high (one: their middle). min + (max - min) * i / (k - 1), written out:
    torch.linspace's float formula is unspecified."""
    if k == 1:
        return torch.tensor([(low + high) / 2], dtype=torch.float64)
    return low + (high - low) * torch.arange(k, dtype=torch.float64) / (k - 1)


def _linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """Deep Compression's linear initialisation, over the values' support: a pruned layer's weights lie in
    two bands, [-max, -t] and [t, max], and one grid over [min, max] put most centroids in the empty gap
    between them (codebook:4 on a layer pruned to 90% used 4 of its 15 values). Each sign gets a grid over
    its own range, the k centroids split in proportion to the two ranges' widths (at least one each).
    `values`: the distinct nonzero values, ascending."""
    negative, positive = values[values < 0], values[values > 0]
    if negative.numel() == 0 or positive.numel() == 0:
        return _spread(float(values[0]), float(values[-1]), k)
    widths = float(negative[-1] - negative[0]), float(positive[-1] - positive[0])
    share = widths[0] / (widths[0] + widths[1]) if widths[0] + widths[1] > 0 else 0.5
    k_negative = max(1, min(k - 1, math.floor(k * share + 0.5)))
    return torch.cat([_spread(float(negative[0]), float(negative[-1]), k_negative),
                      _spread(float(positive[0]), float(positive[-1]), k - k_negative)])


def _lloyd(values: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """1-D k-means (Deep Compression's weight sharing) on the layer's distinct nonzero values (float64,
    ascending) each weighted by how many weights hold it, linear initialisation over each sign's range
    (_linear_init). In 1-D every cluster is a run of the sorted values, so an iteration finds the k - 1
    boundaries by searchsorted of the centroid midpoints and the cluster sizes and sums from prefix sums:
    O(k log n), not O(n k). A value exactly on a midpoint joins the lower centroid (right=True). An empty
    cluster keeps its centroid (it may win values back later); the caller drops centroids no value is
    nearest to. Stops when no boundary moved (the centroids are then a fixed point) or after the
    iteration cap. Returns the k centroids, ascending (non-strictly)."""
    n = values.numel()
    zero = counts.new_zeros(1)
    sizes = torch.cat([zero, torch.cumsum(counts, 0)])
    sums = torch.cat([zero.double(), torch.cumsum(counts * values, 0)])
    centroids = _linear_init(values, k)
    bounds = None
    for _ in range(LLOYD_MAX_ITERATIONS):
        ends = torch.searchsorted(values, (centroids[:-1] + centroids[1:]) / 2, right=True)
        if bounds is not None and torch.equal(ends, bounds):
            break
        bounds = ends
        starts = torch.cat([ends.new_zeros(1), ends])
        stops = torch.cat([ends, ends.new_full((1,), n)])
        members = sizes[stops] - sizes[starts]
        means = (sums[stops] - sums[starts]) / members.clamp(min=1)
        # prefix-sum differences cancel: clamp into the cluster's own range, which keeps a one-signed
        # cluster's centroid one-signed and the centroids sorted
        means = torch.minimum(torch.maximum(means, values[starts.clamp(max=n - 1)]), values[(stops - 1).clamp(min=0)])
        centroids = torch.where(members > 0, means, centroids)
    return centroids


def _value_counts(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct nonzero values of a flat CPU tensor (float64, ascending) and how many entries hold
    each (int64). A 16-bit dtype has at most 65536 values, so they are counted by bit pattern a slice at a
    time, with memory of the slice; a wider one sorts its nonzero values."""
    if flat.element_size() == 2:
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for part in flat.split(reference.ROW_CHUNK_WEIGHTS):
            counts += torch.bincount(part.view(torch.int16).to(torch.int32) & 0xFFFF, minlength=1 << 16)
        patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(flat.dtype).double()
        held = (counts > 0) & (patterns != 0)           # (both zeros, +0 and -0, are code 0, not values)
        values, order = torch.sort(patterns[held])      # (no two bit patterns of a finite value are equal)
        return values, counts[held][order]
    values, counts = torch.unique_consecutive(torch.sort(flat[flat != 0]).values, return_counts=True)
    return values.double(), counts


def _representable(centroids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 centroids to the storage dtype, magnitudes clamped into its nonzero finite range
    first (a cluster straddling zero may have a mean of ~0; float64 weights may exceed float32), so no
    shared value is 0 or inf. Returns the distinct results ascending, as float64."""
    info = torch.finfo(_storage_dtype(dtype))
    sign = torch.where(centroids < 0, -1.0, 1.0).to(torch.float64)
    magnitude = centroids.abs().clamp(info.smallest_normal * info.eps, info.max)
    return torch.unique((sign * magnitude).to(_storage_dtype(dtype)).double(), sorted=True)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending centroids for each value, ties to the lower one. In 1-D the
    nearest is one of the two centroids bracketing x, so compare just those two distances."""
    above = torch.searchsorted(centroids, x)                       # first centroid >= x
    hi = above.clamp(max=centroids.numel() - 1)
    lo = (above - 1).clamp(min=0)
    return torch.where((centroids[hi] - x).abs() < (x - centroids[lo]).abs(), hi, lo)


def _quantize_codebook(values: torch.Tensor, levels: Levels, fitted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most 2**B - 1 shared nonzero values. When the nonzero weights have no more distinct values
    than that, the table holds exactly those values (lossless, hence idempotent); otherwise k-means.
    Computed on the CPU whatever the device, so a model gets the same table on every device. The
    fit works on the distinct values and their counts (_value_counts: for 16-bit dtypes without sorting
    the layer); the codes are assigned a slice at a time. A `fitted` table's shared values are the
    centroids: no fit (three quarters of the time on a float32 layer: the counting sort and k-means)."""
    codes, table = _empty_result(values, levels)
    flat = values.detach().reshape(-1).cpu()
    if fitted is not None:
        centroids = fitted[1:].double().cpu()
        centroids = centroids[centroids != 0]
        if centroids.numel() == 0:
            return codes, table
    else:
        distinct, counts = _value_counts(flat)
        if distinct.numel() == 0:
            return codes, table
        k = levels.table_size - 1
        centroids = _representable(distinct if distinct.numel() <= k else _lloyd(distinct, counts, k), values.dtype)
        del distinct, counts
    size = reference.ROW_CHUNK_WEIGHTS
    flat_codes = torch.zeros(flat.shape, dtype=torch.uint8)  # 1 + the nearest centroid's index; 0 for a zero
    used = torch.zeros(centroids.numel(), dtype=torch.bool)
    for start in range(0, flat.numel(), size):
        part = flat[start:start + size]
        nonzero = part != 0
        assigned = _nearest(part[nonzero].double(), centroids)
        used |= torch.bincount(assigned, minlength=centroids.numel()) > 0
        flat_codes[start:start + part.numel()][nonzero] = (assigned + 1).to(torch.uint8)
    if not bool(used.all()):  # empty clusters, and any the iteration cap left with no nearest value: renumber
        renumbered = torch.cat([used.new_zeros(1, dtype=torch.long), torch.cumsum(used.long(), 0)]).to(torch.uint8)
        for start in range(0, flat.numel(), size):
            part = flat_codes[start:start + size]
            part.copy_(renumbered[part.long()])
        centroids = centroids[used]
    table[1:1 + centroids.numel()] = centroids.float().to(table.device)
    return flat_codes.reshape(values.shape).to(values.device), table


# --------------------------------------------------------------------------- public API


def quantize_levels(values: torch.Tensor, levels: Levels | str,
                    fitted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's values (any shape, any float dtype) -> (codes uint8 [values.shape], table float32
    [2**B]), one table for the whole tensor. Zeros get code 0; raises InvalidInputError on NaN / inf.

    `fitted`: the table this function returned for the same nonzero values (in any order, with any zeros
    beside them): only the codes are computed, the same ones (the compile's analysis fits a layer's table
    to state its cost; packing the layer then reuses it). A table fitted to other values gives codes for
    that table, not these values' own levels."""
    levels = parse_levels(levels)
    _check_values(values, levels)
    if fitted is not None:
        check_levels(torch.zeros(0, dtype=torch.uint8), fitted)
        check_table_form(fitted, levels)
    if levels.kind == "log2":
        return _quantize_log2(values, levels, fitted)
    return _quantize_codebook(values, levels, fitted)


def check_levels(codes: torch.Tensor, table: torch.Tensor, values: bool = True) -> None:
    """Refuse a storage form that does not decode: codes not uint8, a table not of 2**B entries, and with
    `values` (a corrupt file), a code past the table, or a table whose code 0 is not 0 or that holds inf / NaN.
    The value checks read the tensors (a device sync)."""
    if codes.dtype != torch.uint8:
        raise InvalidInputError(f"level codes must be uint8, got {codes.dtype}")
    size = table.numel()
    if table.dim() != 1 or size not in [2 ** b for b in range(MIN_BITS, MAX_BITS + 1)]:
        raise InvalidInputError(f"level table must be 1-D with 2**B entries, 2 <= B <= 8; got shape {tuple(table.shape)}")
    if values:
        _check_codes_index(codes, size)
        if float(table[0]) != 0.0 or not bool(torch.isfinite(table).all()):
            raise InvalidInputError(f"corrupt level table: code 0 must be exactly 0 and every level finite, got "
                                    f"{table.tolist()}")


def _check_codes_index(codes: torch.Tensor, size: int) -> None:
    if codes.numel() and int(codes.max()) >= size:
        raise InvalidInputError(f"corrupt level codes: code {int(codes.max())} does not index a table of {size}")


def dequantize_levels(codes: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[codes] in `dtype`. Checks the storage form, so corrupt codes raise instead of indexing past
    the table (a device-side assert on CUDA); not the codes while torch.compile / torch.export trace: a check
    reading them is data-dependent, which failed both on every levels layer (a packed layer's codes and table
    are checked when loaded instead, PackedWeight._load_from_state_dict)."""
    check_levels(codes, table, values=False)
    if not torch.compiler.is_compiling():
        _check_codes_index(codes, table.numel())
    return lookup_levels(codes, table, dtype)


def lookup_levels(codes: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[codes] in `dtype`, unchecked: for storage checked when it was made or loaded (a packed layer's),
    whose per-call check read every code (a device sync on CUDA) on each forward of the torch runtime."""
    return table[codes.long()].to(dtype)


def fake_quant_levels(values: torch.Tensor, levels: Levels | str) -> torch.Tensor:
    """What a non-linearly quantized layer really computes with, in the values' dtype."""
    codes, table = quantize_levels(values, levels)
    return dequantize_levels(codes, table, values.dtype)


# --------------------------------------------------------------------------- the form a table is laid out in
#
# A table says which form made it: a log2:B table holds the same consecutive powers of two for each sign
# (codes 1.. positive, ascending; codes L+1.. their negatives; the last code 0), a codebook:B table its
# shared values in ascending order from code 1, zeros after. Both forms write their whole layout whatever
# the weights' signs, so every table with a nonzero level is one of the two or neither; only the all-zero
# table (a layer with no nonzero weight, which decodes to zeros either way) is both. The form of a loaded
# state dict is read from its table, before anything is copied: a log2 table is a valid codebook (a table
# and codes decoding to its weights), so without this a log2 state dict loaded silently into a codebook layer.

LAYOUTS = {"log2": "signed powers of two: consecutive powers for the positive codes, their negatives after",
           "codebook": "shared values in ascending order, zeros after"}


def table_form(table: torch.Tensor, bits: int) -> str | None:
    """"log2" / "codebook": the form whose layout `table` (2**bits entries) has; "zero" for the all-zero table
    (either form's); None for neither (a corrupt table)."""
    t = table.detach().double().cpu()
    if t.dim() != 1 or t.numel() != 2 ** bits or float(t[0]) != 0.0 or not bool(torch.isfinite(t).all()):
        return None
    levels = t[1:]
    if not bool(levels.any()):
        return "zero"
    per_sign = Levels("log2", bits).per_sign
    positive, negative = t[1:per_sign + 1], t[per_sign + 1:2 * per_sign + 1]
    n = int((positive != 0).sum())
    powers = positive[:n]
    if (n and bool((powers > 0).all()) and not bool(positive[n:].any()) and torch.equal(negative, -positive)
            and not bool(t[2 * per_sign + 1:].any())):
        mantissa, _ = torch.frexp(powers)
        if bool((mantissa == 0.5).all()) and bool((powers[1:] == 2 * powers[:-1]).all()):
            return "log2"
    m = int((levels != 0).sum())
    if bool((levels[:m] != 0).all()) and bool((levels[1:m] > levels[:m - 1]).all()):
        return "codebook"
    return None


def check_table_form(table: torch.Tensor, levels: Levels | str) -> None:
    """Refuse a level table that is not laid out as `levels`' form (see table_form), naming both forms where
    it is the other one's. Shapes and the table's code 0 / finiteness are check_levels'."""
    levels = parse_levels(levels)
    form = table_form(table, levels.bits)
    if form in (levels.kind, "zero"):
        return
    t = table.detach().double()
    nonzero = t[t != 0].abs()
    powers = bool((torch.frexp(nonzero)[0] == 0.5).all())
    if form is None:
        problem = ("holds values that are not powers of two" if levels.kind == "log2" and not powers
                   else f"is not laid out as {levels} levels ({LAYOUTS[levels.kind]})")
        raise InvalidInputError(f"level table loaded into a {levels} layer {problem}: the state dict comes from "
                                f"another quantization or is corrupt")
    other = Levels(form, levels.bits)
    problem = ("holds values that are not powers of two" if levels.kind == "log2" and not powers
               else f"is a {other} table")
    raise InvalidInputError(
        f"level table loaded into a {levels} layer {problem}: the state dict comes from another quantization, "
        f"{other} ({LAYOUTS[form]}), not {levels} ({LAYOUTS[levels.kind]}). Load it into a model compiled with "
        f"quantize={str(other)!r} (sparsec.compile(model, example_inputs=..., plan=saved.plan)), or save and load "
        f"the whole model (sparsec.save / sparsec.load)")


def check_codes_in_table(codes: torch.Tensor, table: torch.Tensor, levels: Levels | str) -> None:
    """Refuse codebook codes that point past the table's shared values (at its unused zero entries: a kept
    weight would decode to 0). log2 codes may point at any level of either sign."""
    levels = parse_levels(levels)
    if levels.kind != "codebook" or codes.numel() == 0:
        return
    used = int((table != 0).sum())
    top = int(codes.max())
    if top > used:
        raise InvalidInputError(f"corrupt level codes: code {top} points past the {used} shared values of the "
                                f"{levels} table (an unused entry, 0: a kept weight would decode to zero)")
