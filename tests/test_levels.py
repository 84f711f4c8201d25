"""Non-linear quantization (method (d), "log2:B" / "codebook:B") against numpy reasoning written here:
log-domain rounding by np.log2, nearest centroids by brute-force distances to every centroid, and
k-means by a brute-force Lloyd (argmin over an [n, k] distance matrix), not by the sorted-prefix-sum
and searchsorted code under test."""
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires_cuda
from sparsec import reference
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.levels import (Levels, _value_counts, dequantize_levels, fake_quant_levels, is_levels,
                            parse_levels, quantize_levels)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LEVELS = [f"{kind}:{bits}" for kind in ("log2", "codebook") for bits in range(2, 9)]
# smallest / largest exponent e with 2**e finite and nonzero in float32 (the table) and the dtype
E_RANGE = {torch.float32: (-149, 127), torch.float64: (-149, 127), torch.float16: (-24, 15), torch.bfloat16: (-133, 127)}


def _pruned(seed: int, shape: tuple, sparsity: float, dtype: torch.dtype, scale_exp: int = 0) -> torch.Tensor:
    """Gaussian weights times 2**scale_exp, a fraction `sparsity` set to exactly 0 (some to -0.0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** scale_exp
    drop = torch.rand(shape, generator=g) < sparsity
    w = torch.where(drop, torch.where(torch.rand(shape, generator=g) < 0.5, 0.0, -0.0).double(), w)
    return w.to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


weights = st.tuples(st.integers(0, 10**6), st.sampled_from([(7,), (3, 5), (4, 33), (2, 3, 8), (1, 1)]),
                    st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from(DTYPES), st.integers(-12, 12))


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text", LEVELS)
def test_parse_round_trips(text):
    levels = parse_levels(text)
    assert str(levels) == text and is_levels(text)
    assert levels.kind == text.split(":")[0] and levels.bits == int(text.split(":")[1])
    assert parse_levels(levels) is levels
    assert levels == Levels(levels.kind, levels.bits)


@pytest.mark.parametrize("text", ["log2", "log2:1", "log2:9", "log2:0", "codebook:x", "codebook:-3", "int4", "int8",
                                  "", "log2:04", "log2:4.0", " log2:4", "LOG2:4", "codebook:4:2", "log:4", None, 4])
def test_bad_strings_raise_naming_the_accepted_forms(text):
    with pytest.raises(InvalidInputError, match=r'"log2:B".*"codebook:B"') as info:
        parse_levels(text)
    assert isinstance(info.value, ValueError)
    assert not is_levels(text)
    with pytest.raises(InvalidInputError):
        quantize_levels(torch.ones(3), text)


def test_bits_out_of_range_says_so():
    with pytest.raises(InvalidInputError, match=r"B must be in \[2, 8\]"):
        parse_levels("codebook:9")


# --------------------------------------------------------------------------- shared invariants


@given(weights, st.sampled_from(LEVELS))
def test_storage_form_support_and_dtype(weight, text):
    seed, shape, sparsity, dtype, scale_exp = weight
    w = _pruned(seed, shape, sparsity, dtype, scale_exp)
    codes, table = quantize_levels(w, text)
    bits = int(text.split(":")[1])
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert table.dtype == torch.float32 and table.shape == (2 ** bits,)
    assert table[0].item() == 0.0
    assert torch.equal(codes == 0, w == 0), "code 0 is the code of zeros and only of zeros"
    q = fake_quant_levels(w, text)
    assert q.dtype == dtype and q.shape == w.shape
    assert torch.equal(q == 0, w == 0), "zeros stay zero, nonzeros stay nonzero"
    assert torch.isfinite(q).all()
    assert torch.equal(q, dequantize_levels(codes, table, dtype))
    assert torch.equal(q, table[codes.long()].to(dtype))
    assert torch.equal(table.to(dtype).float(), table), "every table entry is exact in the input dtype"


@given(weights, st.sampled_from(LEVELS))
def test_idempotent(weight, text):
    w = _pruned(*weight)
    codes, table = quantize_levels(w, text)
    q = dequantize_levels(codes, table, w.dtype)
    codes2, table2 = quantize_levels(q, text)
    assert torch.equal(dequantize_levels(codes2, table2, w.dtype), q)
    assert torch.equal(codes2, codes) and torch.equal(table2, table)


@pytest.mark.parametrize("text", LEVELS)
def test_deterministic(text):
    w = _pruned(7, (64, 96), 0.8, torch.float32)
    c1, t1 = quantize_levels(w, text)
    c2, t2 = quantize_levels(w.clone(), text)
    assert torch.equal(c1, c2) and torch.equal(t1, t2)


@pytest.mark.parametrize("text", ["log2:4", "codebook:4"])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (4, 5)])
def test_empty_and_all_zero(text, shape):
    w = torch.zeros(shape)
    w.view(-1)[::2] = -0.0
    codes, table = quantize_levels(w, text)
    assert codes.shape == shape and not codes.any() and not table.any() and table.numel() == 16
    assert torch.equal(fake_quant_levels(w, text), torch.zeros(shape))


@pytest.mark.parametrize("text", ["log2:4", "codebook:4"])
@pytest.mark.parametrize("bad, words", [(math.nan, "1 NaN and 0 infinite"), (math.inf, "0 NaN and 1 infinite"),
                                        (-math.inf, "0 NaN and 1 infinite")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_input_raises(text, bad, words, dtype):
    w = torch.tensor([0.5, 0.0, bad, -2.0], dtype=dtype)
    with pytest.raises(InvalidInputError, match=f"{text} needs finite weights.*{words}"):
        quantize_levels(w, text)


def test_non_float_input_raises():
    with pytest.raises(InvalidTypeError, match="floating-point"):
        quantize_levels(torch.tensor([1, 0, -3]), "log2:4")


def test_requires_grad_is_fine():
    w = torch.tensor([0.3, 0.0, -1.7], requires_grad=True)
    assert fake_quant_levels(w, "log2:4").tolist() == [0.25, 0.0, -2.0]


def test_dequantize_rejects_corrupt_storage():
    table = torch.zeros(16)
    with pytest.raises(InvalidInputError, match="uint8"):
        dequantize_levels(torch.zeros(3, dtype=torch.int64), table, torch.float32)
    with pytest.raises(InvalidInputError, match="2\\*\\*B entries"):
        dequantize_levels(torch.zeros(3, dtype=torch.uint8), torch.zeros(10), torch.float32)
    with pytest.raises(InvalidInputError, match="code 16 does not index a table of 16"):
        dequantize_levels(torch.tensor([0, 16], dtype=torch.uint8), table, torch.float32)


# --------------------------------------------------------------------------- log2


@given(weights, st.integers(2, 8))
def test_log2_levels_against_numpy(weight, bits):
    seed, shape, sparsity, dtype, scale_exp = weight
    w = _pruned(seed, shape, sparsity, dtype, scale_exp)
    codes, table = quantize_levels(w, f"log2:{bits}")
    q = _np(dequantize_levels(codes, table, dtype))
    a = np.abs(_np(w))
    nz = a > 0
    if not nz.any():
        return
    per_sign = 2 ** (bits - 1) - 1
    lowest, highest = E_RANGE[dtype]
    e_max = int(np.clip(np.floor(np.log2(a.max()) + 0.5), lowest, highest))
    e_min = max(e_max - per_sign + 1, lowest)
    mantissa, exponent = np.frexp(np.abs(q[nz]))
    assert (mantissa == 0.5).all(), "every nonzero is exactly +-2**e"
    e = exponent - 1
    assert e.min() >= e_min and e.max() <= e_max
    assert e.max() == e_max, "the largest weight sets the top level"
    assert (np.sign(q[nz]) == np.sign(_np(w)[nz])).all()
    log_w = np.log2(a[nz])
    inside = (log_w >= e_min - 0.5) & (log_w < e_max + 0.5)
    assert (np.abs(e[inside] - log_w[inside]) <= 0.5 + 1e-12).all(), "nearest level in the log domain"
    assert (e[log_w < e_min - 0.5] == e_min).all(), "below the smallest level: rounds up to it, never to 0"
    # layout: code i = +2**(e_min + i - 1), code L + i = its negative, the rest 0.0
    n = e_max - e_min + 1
    powers = [2.0 ** k for k in range(e_min, e_max + 1)]
    expected = [0.0] + powers + [0.0] * (per_sign - n) + [-p for p in powers] + [0.0] * (per_sign - n + 1)
    assert table.double().tolist() == expected
    c = codes.numpy()
    pos, neg = _np(w) > 0, _np(w) < 0
    assert ((c[pos] >= 1) & (c[pos] <= per_sign)).all() and ((c[neg] > per_sign) & (c[neg] <= 2 * per_sign)).all()


def test_log2_worked_example():
    # log2:3: L = 3 levels per sign; max |w| = 4.0 -> e_max = 2, levels 2**0 .. 2**2
    w = torch.tensor([3.0, -0.75, 1.5, 0.01, 0.0, -4.0, 2.8284])
    codes, table = quantize_levels(w, "log2:3")
    assert table.tolist() == [0.0, 1.0, 2.0, 4.0, -1.0, -2.0, -4.0, 0.0]
    # 3.0 -> log2 1.58 -> 2**2; -0.75 -> log2 -0.42 -> -2**0; 1.5 -> 0.58 -> 2**1; 0.01 -> clamped up to 2**0;
    # 2.8284 < 2**1.5 -> 2**1
    assert codes.tolist() == [3, 4, 2, 1, 0, 6, 2]


def test_log2_rounds_in_the_log_domain_at_the_sqrt2_boundary():
    below = np.nextafter(np.float32(math.sqrt(2)), np.float32(0))  # float32 values either side of 2**0.5
    above = np.nextafter(np.float32(math.sqrt(2)), np.float32(2))
    w = torch.tensor([2.0, float(below), float(above)])
    assert fake_quant_levels(w, "log2:4").tolist() == [2.0, 1.0, 2.0]


@pytest.mark.parametrize("dtype, w, expected", [
    (torch.float16, [65504.0, 1.0], [2.0 ** 15, 1.0]),                # 2**16 would be inf in float16
    (torch.float16, [2.0 ** -24, 3 * 2.0 ** -24], [2.0 ** -24, 2.0 ** -22]),  # subnormals stay nonzero
    (torch.bfloat16, [3.0e38, 1.0], [2.0 ** 127, 2.0]),  # e_min = 127 - 126
    (torch.float64, [1e300, 1e-300, -1e-310], [2.0 ** 127, 2.0, -2.0]),
    (torch.float64, [1e-300, -1e-320], [2.0 ** -149, -2.0 ** -149]),
])
def test_log2_saturates_at_the_dtype_range(dtype, w, expected):
    q = fake_quant_levels(torch.tensor(w, dtype=dtype), "log2:8")
    assert q.dtype == dtype and q.double().tolist() == expected


# --------------------------------------------------------------------------- codebook


def _nearest_distance_ok(values: np.ndarray, assigned: np.ndarray, centroids: np.ndarray) -> bool:
    dist = np.abs(values[:, None] - centroids[None, :])
    return bool((np.abs(values - assigned) == dist.min(axis=1)).all())


def _brute_lloyd(x: np.ndarray, k: int) -> np.ndarray:
    """Lloyd with linear initialisation over each sign's range (centroids split between the signs in proportion
    to the ranges' widths, half up, at least one each), nearest centroid (lower on ties), empty
    clusters keep their centroid and are dropped at the end; stops when no assignment changes."""
    def grid(lo, hi, count):
        return np.array([(lo + hi) / 2]) if count == 1 else lo + (hi - lo) * np.arange(count) / (count - 1)

    neg, pos = x[x < 0], x[x > 0]
    if neg.size and pos.size:
        wn, wp = neg.max() - neg.min(), pos.max() - pos.min()
        kn = min(k - 1, max(1, int(np.floor(k * (wn / (wn + wp) if wn + wp else 0.5) + 0.5))))
        centroids = np.concatenate([grid(neg.min(), neg.max(), kn), grid(pos.min(), pos.max(), k - kn)])
    else:
        centroids = grid(x.min(), x.max(), k)
    labels = None
    for _ in range(300):
        # the nearest of the sorted centroids, a value on a midpoint joining the lower one: the number of
        # midpoints it lies above (argmin of the distances rounds the two sides of a tie differently)
        order = np.argsort(centroids, kind="stable")
        mids = (centroids[order][:-1] + centroids[order][1:]) / 2
        new = order[(x[:, None] > mids[None, :]).sum(axis=1)]
        if labels is not None and (new == labels).all():
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centroids[j] = x[labels == j].mean()
    return np.unique(centroids[np.isin(np.arange(k), labels)])


@given(weights, st.integers(2, 8))
def test_codebook_nearest_and_count(weight, bits):
    seed, shape, sparsity, dtype, scale_exp = weight
    w = _pruned(seed, shape, sparsity, dtype, scale_exp)
    codes, table = quantize_levels(w, f"codebook:{bits}")
    x, q = _np(w), _np(dequantize_levels(codes, table, dtype))
    nz = x != 0
    used = np.unique(q[nz])
    assert used.size <= 2 ** bits - 1
    centroids = table.double().numpy()[1:]
    assert np.array_equal(centroids[: used.size], used), "shared values ascending from code 1, the rest 0.0"
    assert not centroids[used.size:].any()
    if nz.any():
        assert _nearest_distance_ok(x[nz], q[nz], used), "each weight maps to its nearest shared value"


@given(st.integers(0, 10**6), st.integers(2, 8), st.sampled_from(DTYPES), st.integers(1, 400))
def test_codebook_lossless_with_few_distinct_values(seed, bits, dtype, size):
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randn(2 ** bits - 1, generator=g).to(dtype)
    distinct = distinct[distinct != 0]
    pick = torch.randint(0, distinct.numel() + 1, (size,), generator=g)
    w = torch.cat([distinct, torch.zeros(1, dtype=dtype)])[pick]
    codes, table = quantize_levels(w, f"codebook:{bits}")
    assert torch.equal(dequantize_levels(codes, table, dtype), w)
    nonzero_table = table[table != 0]
    assert torch.equal(nonzero_table, torch.unique(w[w != 0]).float())


@given(st.integers(0, 10**6), st.integers(2, 6), st.integers(70, 300), st.booleans())
def test_codebook_matches_brute_force_lloyd(seed, bits, size, integers):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-9, 10, (size,), generator=g).double() if integers else torch.randn(size, generator=g).double()
    w = w[w != 0]
    if np.unique(w.numpy()).size <= 2 ** bits - 1:
        return  # the lossless path, tested above
    codes, table = quantize_levels(w, f"codebook:{bits}")
    expected = _brute_lloyd(w.numpy(), 2 ** bits - 1).astype(np.float32)
    got = table.numpy()[1:1 + expected.size]
    # (a cluster straddling 0 with mean 0 is stored as the smallest subnormal, never as 0: atol covers that)
    assert np.allclose(got, expected, rtol=1e-6, atol=2e-45), (got, expected)
    assert not table.numpy()[1 + expected.size:].any()


def _stored(centroids: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """What a table keeps of float64 centroids in a 16-bit dtype: magnitudes held inside its nonzero
    finite range (a cluster straddling 0 keeps the smallest subnormal, never 0), rounded, distinct."""
    info = torch.finfo(dtype)
    c = torch.from_numpy(centroids)
    kept = torch.sign(c) * c.abs().clamp(info.smallest_normal * info.eps, info.max)
    kept = torch.where(c == 0, info.smallest_normal * info.eps, kept)
    return np.unique(kept.to(dtype).double().numpy())


@given(st.integers(0, 10**6), st.integers(2, 6), st.integers(70, 300), st.booleans(),
       st.sampled_from([torch.float16, torch.bfloat16]))
def test_16_bit_codebook_matches_brute_force_lloyd_exactly(seed, bits, size, integers, dtype):
    """A 16-bit layer is fitted from its distinct values and their counts, never sorted whole; its sums
    are exact in float64, so the table is the brute-force one rounded to the dtype, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-9, 10, (size,), generator=g) if integers else torch.randn(size, generator=g)
    w = w.to(dtype)
    x = w[w != 0].double().numpy()
    if np.unique(x).size <= 2 ** bits - 1:
        return  # the lossless path, tested above
    with mock.patch.object(reference, "ROW_CHUNK_WEIGHTS", 16):  # counted a slice at a time
        codes, table = quantize_levels(w, f"codebook:{bits}")
    expected = _stored(_brute_lloyd(x, 2 ** bits - 1), dtype)
    got = table.double().numpy()[1:]
    assert np.array_equal(got[:expected.size], expected), (got, expected)
    assert not got[expected.size:].any()
    q = dequantize_levels(codes, table, dtype)
    assert torch.equal(q == 0, w == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_value_counts_cover_every_bit_pattern(dtype):
    """Every finite value of the dtype, each held a different number of times, both zeros among them:
    the distinct nonzero values ascending and their counts, as numpy counts them."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = patterns[torch.isfinite(patterns)]
    repeats = torch.arange(finite.numel()) % 3 + 1
    w = finite.repeat_interleave(repeats)[torch.randperm(int(repeats.sum()), generator=torch.Generator().manual_seed(0))]
    with mock.patch.object(reference, "ROW_CHUNK_WEIGHTS", 1000):
        values, counts = _value_counts(w)
    x = w.double().numpy()
    want_values, want_counts = np.unique(x[x != 0], return_counts=True)
    assert np.array_equal(values.numpy(), want_values) and np.array_equal(counts.numpy(), want_counts)


def test_codebook_ties_go_to_the_lower_centroid():
    # codebook:2, k = 3: linear init 1, 3, 5 -> midpoints 2, 4; the 2 sits on a midpoint and joins 1:
    # clusters {1, 2} {3} {5} -> 1.5, 3, 5 (it would be {1} {2, 3} {5} -> 1, 2.5, 5 the other way)
    codes, table = quantize_levels(torch.tensor([1.0, 2.0, 3.0, 5.0]), "codebook:2")
    assert table.tolist() == [0.0, 1.5, 3.0, 5.0] and codes.tolist() == [1, 1, 2, 3]


def test_nearest_shared_value_ties_go_to_the_lower_one():
    from sparsec.levels import _nearest  # the final assignment; after a converged Lloyd a tie needs rounding

    centroids = torch.tensor([-1.0, 1.0, 4.0], dtype=torch.float64)
    x = torch.tensor([0.0, 2.5, -3.0, 9.0, 2.4, 2.6], dtype=torch.float64)
    assert _nearest(x, centroids).tolist() == [0, 1, 0, 2, 1, 2]


def test_codebook_empty_cluster_is_dropped():
    # k = 3: init 1, 3, 5; nothing lies near 3, so the middle cluster is empty and leaves no entry
    codes, table = quantize_levels(torch.tensor([1.0, 1.5, 5.0, 4.5, 0.0]), "codebook:2")
    assert table.tolist() == [0.0, 1.25, 4.75, 0.0] and codes.tolist() == [1, 1, 2, 2, 0]


def test_codebook_centroids_start_in_each_signs_band():
    """A pruned layer's weights lie in two bands away from 0: the grid starts over each band, not over the gap
    between them. 90% pruned uniform weights: all 15 shared values of codebook:4 are used (4 before)."""
    w = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w = w[w.abs() > 0.9]
    _, table = quantize_levels(w, "codebook:4")
    assert int((table != 0).sum()) == 15
    # k = 3 over bands of widths 1 and 2: one centroid for the negatives, two for the positives
    _, table = quantize_levels(torch.tensor([-4.0, -3.5, -3.0, 3.0, 3.4, 4.0, 4.6, 5.0]), "codebook:2")
    assert table[1] < 0 and (table[2:4] > 0).all()


def test_codebook_centroid_near_zero_stays_nonzero_in_float16():
    # a cluster straddling zero has a mean of ~0: it becomes the smallest float16, not 0
    w = torch.tensor([-1e-4, 1e-4, -5.0, -4.0, 4.0, 5.0], dtype=torch.float16)
    q = fake_quant_levels(w, "codebook:2")
    assert (q != 0).all()


def test_codebook_layer_sized_input():
    w = _pruned(3, (512, 1024), 0.9, torch.bfloat16)
    codes, table = quantize_levels(w, "codebook:8")
    q = dequantize_levels(codes, table, w.dtype)
    assert torch.equal(q == 0, w == 0)
    assert 200 < torch.unique(q[q != 0]).numel() <= 255
    err = (q.double() - w.double()).norm() / w.double().norm()
    assert err < 0.02, "255 shared values on thousands of distinct bfloat16 weights"


@requires_cuda
@pytest.mark.parametrize("text", ["log2:4", "codebook:4", "codebook:8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gives_the_cpu_result(text, dtype):
    w = _pruned(5, (96, 160), 0.85, dtype)
    codes, table = quantize_levels(w, text)
    codes_cuda, table_cuda = quantize_levels(w.cuda(), text)
    assert codes_cuda.is_cuda and table_cuda.is_cuda
    assert torch.equal(codes_cuda.cpu(), codes) and torch.equal(table_cuda.cpu(), table)


@given(weights, st.sampled_from(LEVELS), st.integers(0, 10**6))
def test_a_fitted_table_gives_the_same_codes(weight, text, seed):
    """The compile fits a layer's table once, on its kept values in row-major order, and packs the layer's
    stored values (with or without the pruned zeros, in another order) against that table: the codes must be
    the ones a fit of the stored values gives."""
    w = _pruned(*weight)
    kept = w[w != 0]
    _, fitted = quantize_levels(kept, text)
    order = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(seed))
    stored = w.reshape(-1)[order]
    codes, table = quantize_levels(stored, text, fitted)
    expected_codes, expected_table = quantize_levels(stored, text)
    assert torch.equal(table, expected_table) and torch.equal(codes, expected_codes)


def test_a_fitted_table_of_another_form_is_refused():
    w = _pruned(0, (8, 16), 0.5, torch.float32)
    _, log2_table = quantize_levels(w, "log2:4")
    with pytest.raises(InvalidInputError, match="log2:4"):
        quantize_levels(w, "codebook:4", log2_table)
