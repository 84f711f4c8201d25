"""Masks, compressed formats and int8 quantization against the independent oracle."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import oracle_fanin_mask, oracle_int8, oracle_nm_mask
from sparsec import nm_compress, nm_decompress
from sparsec import reference as ref
from sparsec.errors import InvalidInputError

NM_PATTERNS = [(2, 4), (1, 4), (4, 8), (1, 2), (3, 8), (4, 4)]


def _weights(seed: int, rows: int, cols: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct magnitudes and both signs: exercises the lower-index tie rule
        w = torch.randint(-2, 3, (rows, cols), generator=g).float()
    return w


@given(st.sampled_from(NM_PATTERNS), st.integers(1, 9), st.integers(1, 6), st.integers(0, 10**6), st.booleans())
def test_nm_mask_invariants_and_oracle(nm, rows, groups, seed, ties):
    n, m = nm
    w = _weights(seed, rows, groups * m, ties)
    mask = ref.nm_mask(w, n, m)
    g = mask.reshape(rows, groups, m)
    assert (g.sum(-1) == n).all(), "exactly N kept of every M"
    a = w.abs().reshape(rows, groups, m)
    kept_min = torch.where(g, a, torch.inf).amin(-1)
    dropped_max = torch.where(~g, a, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all(), "kept are the largest"
    assert torch.equal(mask, oracle_nm_mask(w, n, m))


@given(st.integers(1, 8), st.integers(1, 40), st.floats(0.01, 0.99), st.integers(0, 10**6), st.booleans())
def test_fanin_mask_exactly_k_per_row(rows, cols, sparsity, seed, ties):
    w = _weights(seed, rows, cols, ties)
    k = max(1, int(w.numel() * (1 - sparsity)) // rows)
    mask = ref.fanin_mask(w, k)
    assert (mask.sum(1) == k).all()
    assert torch.equal(mask, oracle_fanin_mask(w, k))


def test_ties_go_to_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert ref.nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]


@given(st.sampled_from(NM_PATTERNS), st.integers(1, 6), st.integers(1, 9), st.integers(0, 10**6),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_nm_compress_round_trip(nm, rows, groups, seed, dtype):
    n, m = nm
    w = _weights(seed, rows, groups * m, False).to(dtype)
    mask = ref.nm_mask(w, n, m)
    values, meta = ref.nm_compress_masked(w, mask, n, m)
    assert values.shape == (rows, groups * n) and values.dtype == dtype
    assert torch.equal(ref.nm_decompress(values, meta, n, m), w * mask)
    assert torch.equal(ref.nm_mask_from_meta(meta, n, m, groups * m), mask)
    if (n, m) == (2, 4):
        assert meta.dtype == torch.int16 and meta.shape == (rows, -(-groups // 4))


def test_nibble_layout_is_the_documented_one():
    # groups: keep (0,1) (1,3) (2,3) (0,3) (1,2): nibble = i0 | i1 << 2 at bits 4*(g % 4) of word g // 4
    w = torch.tensor([[1., 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0]])
    values, meta = nm_compress(w)
    nib = [0 | 1 << 2, 1 | 3 << 2, 2 | 3 << 2, 0 | 3 << 2, 1 | 2 << 2]
    word0 = nib[0] | nib[1] << 4 | nib[2] << 8 | nib[3] << 12
    expected0 = word0 - 65536 if word0 >= 32768 else word0
    assert meta.tolist() == [[expected0, nib[4]]]
    assert values.tolist() == [[1.0] * 10]


def test_nm_compress_fills_sparse_groups_and_rejects_dense_ones():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    values, meta = nm_compress(w, 2, 4)
    assert torch.equal(nm_decompress(values, meta, 2, 4), w)
    with pytest.raises(InvalidInputError, match="not 2:4 sparse"):
        nm_compress(torch.ones(1, 4), 2, 4)
    with pytest.raises(InvalidInputError, match="multiple of M=4"):
        nm_compress(torch.zeros(1, 6), 2, 4)


def test_nm_decompress_refuses_metadata_that_would_drop_values():
    values = torch.randn(4, 8)  # K = 16: one int16 word of four nibbles per row
    with pytest.raises(InvalidInputError, match=r"must have 1 entries per row, got shape \(4, 3\)"):
        nm_decompress(values, torch.zeros(4, 3, dtype=torch.int16))
    with pytest.raises(InvalidInputError, match=r"corrupt 2:4 metadata: kept positions must lie in \[0, 4\) and increase"):
        nm_decompress(values, torch.zeros(4, 1, dtype=torch.int16))  # nibble 0: i0 == i1 == 0
    with pytest.raises(InvalidInputError, match="corrupt 4:8 metadata"):
        nm_decompress(torch.randn(2, 4), torch.tensor([[0, 3, 3, 5], [0, 1, 2, 3]], dtype=torch.int16), 4, 8)
    with pytest.raises(InvalidInputError, match="corrupt 1:4 metadata"):
        nm_decompress(torch.randn(1, 2), torch.tensor([[4, 0]], dtype=torch.int16), 1, 4)
    w = torch.randn(8, 16)
    w_values, w_meta = ref.nm_compress(w * ref.nm_mask(w, 2, 4))
    with pytest.raises(InvalidInputError, match=r"metadata of shape \(4, 1\) does not match values of shape \(8, 8\)"):
        nm_decompress(w_values, w_meta[:4])  # the rows without metadata came back as zeros


@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 10**6))
def test_fanin_compress_round_trip(rows, cols, seed):
    w = _weights(seed, rows, cols, False)
    k = max(1, cols // 3)
    mask = ref.fanin_mask(w, k)
    values, indices = ref.fanin_compress(w, mask)
    assert indices.dtype == torch.int32 and indices.shape == (rows, k)
    assert (indices[:, 1:] > indices[:, :-1]).all(), "indices ascending and unique per row"
    assert torch.equal(ref.fanin_decompress(values, indices, cols), w * mask)
    assert torch.equal(ref.fanin_mask_from_indices(indices, cols), mask)


def test_regrown_zero_weight_keeps_its_mask():
    w = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    mask = torch.tensor([[True, False, True, False]])  # position 0 kept although its value is 0
    values, meta = ref.nm_compress_masked(w, mask, 2, 4)
    assert torch.equal(ref.nm_mask_from_meta(meta, 2, 4, 4), mask)


@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 10**6))
def test_int8_matches_oracle_and_keeps_zeros(rows, cols, seed):
    w = _weights(seed, rows, cols, False)
    w[:, ::3] = 0
    fq = ref.fake_quant_int8(w)
    assert torch.equal(fq, oracle_int8(w))
    assert (fq[w == 0] == 0).all()
    q, scales = ref.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert ((fq - w).abs() <= scales.unsqueeze(1) / 2 + 1e-6).all(), "error within half a step"
    assert torch.equal(ref.fake_quant_int8(fq), fq), "idempotent"


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_int8_scales_are_correctly_rounded_on_every_device(device):
    """scale = max|row| / 127 rounded once to float32 (float64 division then rounding is exact here),
    so a model quantizes to the same int8 weights wherever it is compiled. (CUDA divides by a Python
    number through its reciprocal, one bit off for some rows: on an H100 4 of 8 layers of the example
    transformer got other scales than on the CPU, one of them another int8 value.)"""
    torch.manual_seed(0)
    w = torch.randn(4096, 64, device=device)
    _, scales = ref.quantize_int8(w)
    expected = (w.abs().amax(-1).double() / 127).float()
    assert torch.equal(scales, expected)
    assert torch.equal(ref.fake_quant_int8(w).cpu(), ref.fake_quant_int8(w.cpu()))


def test_int8_all_zero_row():
    fq = ref.fake_quant_int8(torch.zeros(2, 8))
    assert torch.equal(fq, torch.zeros(2, 8)) and torch.isfinite(fq).all()


def test_relative_error():
    assert ref.relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    assert ref.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0


# --------------------------------------------------------------------------- special values, every dtype
#
# The oracle here ranks in plain Python, on the explicit rule: NaN above every number (torch.sort's order,
# which SDGP relies on to keep a NaN gradient visible to a loss scaler), then larger |x| (Python's abs:
# exact for every integer, int8 -128 included), then the lower index. -0.0 and 0.0 tie.

FLOAT_SPECIALS = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, float("nan"), float("inf"), -float("inf")]
INT8_SPECIALS = [-128, 127, -127, 0, 1, -1, 5, -5]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64, torch.int8: torch.int8}


def _specials(dtype: torch.dtype) -> list:
    if dtype == torch.int8:
        return INT8_SPECIALS
    info = torch.finfo(dtype)
    return FLOAT_SPECIALS + [info.smallest_normal, info.smallest_normal / 4, -info.smallest_normal / 4, info.max,
                             -info.max, info.tiny * info.eps]  # (the last: the smallest denormal)


def special_tensor(draw, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    pool = _specials(dtype)
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor([pool[i] for i in picks], dtype=torch.float64).to(dtype).reshape(rows, cols)


def python_keep(values: list, keep: int) -> list[int]:
    """Indices kept, ascending: NaN first, then larger |x|, then the lower index."""
    order = sorted(range(len(values)), key=lambda i: (not math.isnan(values[i]), -abs(values[i]), i))
    return sorted(order[:keep])


def python_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for r, row in enumerate(w.tolist()):
        for g in range(0, len(row), m):
            for i in python_keep(row[g:g + m], n):
                mask[r, g + i] = True
    return mask


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 is not 0.0), NaN matching any NaN: torch's CPU bfloat16 gather and
    float -> bfloat16 cast turn NaN 0x7FC0 into 0xFFFF, so NaN payloads are not part of the format."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    same = a.view(BITS[a.dtype]) == b.view(BITS[b.dtype])
    if a.dtype.is_floating_point:
        same |= a.isnan() & b.isnan()
    return bool(same.all())


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8]


@given(st.data(), st.sampled_from(NM_PATTERNS), st.integers(1, 4), st.integers(1, 5), st.sampled_from(DTYPES))
def test_nm_mask_and_round_trip_at_special_values(data, nm, rows, groups, dtype):
    """Ties, +-0, NaN, +-inf, denormals, int8 -128: the mask follows the documented rule, and
    compress -> decompress gives the masked tensor bit for bit (dropped entries +0, kept ones as they were)."""
    n, m = nm
    w = special_tensor(data.draw, dtype, rows, groups * m)
    mask = ref.nm_mask(w, n, m)
    assert torch.equal(mask, python_nm_mask(w, n, m))
    values, meta = ref.nm_compress_masked(w, mask, n, m)
    masked = torch.where(mask, w, torch.zeros((), dtype=dtype))
    assert same_bits(ref.nm_decompress(values, meta, n, m), masked)
    assert same_bits(ref.nm_decompress_own(values, meta, n, m), masked)
    assert torch.equal(ref.nm_mask_from_meta(meta, n, m, groups * m), mask)
    # the format helper, from the masked tensor alone: the same values (a -0.0 may come back +0.0)
    values2, meta2 = nm_compress(masked, n, m)
    back = nm_decompress(values2, meta2, n, m)
    assert bool(((back == masked) | (back.isnan() & masked.isnan()) if dtype.is_floating_point else back == masked).all())


def test_int_minimum_is_the_largest_magnitude():
    """abs() of int8 -128 is -128: ranked by it, the largest weight of the group was the first pruned."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
        w = torch.tensor([[1, low, 2, 3, high, -high, low, 0]], dtype=dtype)
        assert ref.nm_mask(w, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]], dtype
        assert ref.nm_mask(w, 1, 8).tolist() == [[False, True] + [False] * 6], dtype
        assert ref.fanin_mask(w, 3).tolist() == [[False, True, False, False, True, False, True, False]], dtype


def test_nan_ranks_above_inf_and_ties_among_nans():
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[1.0, inf, inf, nan, nan, 1.0, nan, -inf]])
    assert ref.nm_mask(w, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]


def test_positions_beyond_int16_are_refused():
    """M > 32768: positions up to M-1 wrapped to negative int16 and only decompress failed, unclearly."""
    w = torch.zeros(1, 40000)
    w[0, 39000] = 1.0
    mask = ref.nm_mask(w, 1, 40000)
    with pytest.raises(InvalidInputError, match="M=40000 is too large: in-group positions are stored as int16"):
        ref.nm_compress_masked(w, mask, 1, 40000)
    w = torch.zeros(1, 32768)
    w[0, 32767] = 1.0  # the largest M that fits: position 32767
    values, meta = ref.nm_compress_masked(w, ref.nm_mask(w, 1, 32768), 1, 32768)
    assert meta.tolist() == [[32767]] and torch.equal(nm_decompress(values, meta, 1, 32768), w)


@given(st.data(), st.integers(1, 5), st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_int8_scales_at_special_rows(data, cols, dtype):
    """Per-output-channel scales: max|row| / 127 when that is a positive number, else 1 (never 0); q in
    [-127, 127]; zeros stay 0. Rows: all zero, one huge value among small ones, denormals only."""
    info = torch.finfo(dtype)
    tiny = [0.0, -0.0, info.tiny * info.eps, -info.tiny * info.eps, info.smallest_normal / 8]
    huge = min(info.max, torch.finfo(torch.float32).max) / 2  # (scales are float32: float64 beyond is refused)
    rows = [data.draw(st.lists(st.sampled_from(pool), min_size=cols, max_size=cols))
            for pool in ([0.0, -0.0], [1e-3, -1.0, 0.0, huge], tiny)]
    w = torch.tensor(rows, dtype=torch.float64).to(dtype)
    q, scales = ref.quantize_int8(w)
    absmax = w.double().abs().amax(-1)
    expected = (absmax / 127).float()  # one rounding of the exact quotient
    expected = torch.where(expected > 0, expected, torch.ones_like(expected))
    assert torch.equal(scales, expected)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert (q[w == 0] == 0).all()
    error = (ref.dequantize_int8(q, scales, torch.float64) - w.double()).abs()
    assert (error <= scales.double().unsqueeze(-1) * (0.5 + 1e-5)).all(), "within half a step (+ float32 rounding)"


def test_int8_row_whose_scale_underflows_gets_scale_one():
    """max|row| / 127 underflowed to 0 in float32: the row divided by 0, its zeros became 0/0 = NaN cast
    to int8 and its other weights +-127 against a scale of 0."""
    w = torch.tensor([[1e-44, 0.0, -1e-44, 0.0]])
    q, scales = ref.quantize_int8(w)
    assert scales.tolist() == [1.0] and q.tolist() == [[0, 0, 0, 0]]


# --------------------------------------------------------------------------- the Triton prune kernel
# (codegen/prune_launch.py; under TRITON_INTERPRET=1 without a GPU, see conftest.py: keep shapes small)

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def python_prune24(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, int16 nibble meta, pruned dense) of rows x [R, K] by python_keep, the meta words built
    as design.md states them: group g's nibble i0 | i1 << 2 at bits 4 * (g % 4) of word g // 4."""
    rows, k = x.shape
    mask = python_nm_mask(x, 2, 4) if k else torch.zeros(rows, 0, dtype=torch.bool)
    words = []
    for r in range(rows):
        kept = mask[r].reshape(-1, 4).nonzero()[:, 1].reshape(-1, 2).tolist()
        row = [0] * -(-k // 16)
        for g, (i0, i1) in enumerate(kept):
            row[g // 4] |= (i0 | i1 << 2) << (4 * (g % 4))
        words.append([w - 65536 if w >= 32768 else w for w in row])
    values = x[mask].reshape(rows, k // 2)
    return values, torch.tensor(words, dtype=torch.int16).reshape(rows, -1), torch.where(mask, x, torch.zeros((), dtype=x.dtype))


def _check_prune_kernel(x: torch.Tensor) -> None:
    from sparsec.codegen.prune_launch import prune24, prune24_dense

    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).cpu()
    values, meta, pruned = python_prune24(rows)
    got_values, got_meta = prune24(x.to(KERNEL_DEVICE))
    got_pruned = prune24_dense(x.to(KERNEL_DEVICE))
    assert got_values.shape == (*x.shape[:-1], x.shape[-1] // 2) and got_pruned.shape == x.shape
    assert same_bits(got_values.cpu().reshape(values.shape), values)
    assert torch.equal(got_meta.cpu().reshape(meta.shape), meta)
    assert same_bits(got_pruned.cpu().reshape(pruned.shape), pruned)
    ref_values, ref_meta = ref.nm_compress_masked(rows, ref.nm_mask(rows, 2, 4), 2, 4)  # the reference agrees
    assert same_bits(ref_values, values) and torch.equal(ref_meta, meta)


@settings(max_examples=25)
@given(st.data(), st.integers(1, 37), st.integers(0, 9),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_prune_kernel_is_bit_exact_at_special_values(data, rows, groups, dtype):
    """Ties, +-0, NaN, +-inf, denormals; odd row counts, K not a multiple of 16 (a last word with fewer
    than four groups), K = 0. NaN ranks above inf: before, comparisons with NaN were all false, so the
    dense output kept three of [NaN, 1, 2, 3] and the compressed one dropped the NaN of [1, 2, 3, NaN]."""
    _check_prune_kernel(special_tensor(data.draw, dtype, rows, 4 * groups))


def test_prune_kernel_nan_groups():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1, 2, 3, 1, 2, 3, nan, 1, inf, inf, nan, nan, nan, nan, 1, 2, 1, nan, nan]])
    _check_prune_kernel(x)
    from sparsec.codegen.prune_launch import prune24_dense
    kept = prune24_dense(x.to(KERNEL_DEVICE)).cpu().reshape(-1, 4)
    assert ((kept != 0) | kept.isnan()).sum(-1).tolist() == [2] * 5, "exactly 2 of every 4"


def test_prune_kernel_multi_block_and_strided_inputs():
    """Past one program in both grid dims (32 rows, 512 columns in the interpreter's config), and
    inputs whose rows or columns are not contiguous."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (33, 528), generator=g).float()  # few magnitudes: ties everywhere
    _check_prune_kernel(x)
    base = torch.randn(40, 24, generator=g)
    _check_prune_kernel(base.t())                       # [24, 40], column stride 24
    _check_prune_kernel(base[:, ::2].half())            # strided last dim
    _check_prune_kernel(torch.randn(4, 3, 20, generator=g).transpose(0, 1))  # leading dims kept


def test_prune_kernel_refusals():
    from sparsec.codegen.prune_launch import prune24, prune24_dense

    for prune in (prune24, prune24_dense):
        with pytest.raises(InvalidInputError, match="takes float16, bfloat16, float32 or float64 tensors, got torch.int8"):
            prune(torch.tensor([[-128, 1, 2, 3]], dtype=torch.int8, device=KERNEL_DEVICE))  # abs(-128) is -128
        with pytest.raises(InvalidInputError, match="0-dim"):
            prune(torch.tensor(1.0, device=KERNEL_DEVICE))
        with pytest.raises(InvalidInputError, match="last dimension 6 is not a multiple of 4"):
            prune(torch.zeros(2, 6, device=KERNEL_DEVICE))
    # no rows, or no columns: empty results of the right shapes (reshape(-1, 0) raised)
    values, meta = prune24(torch.zeros(3, 0, device=KERNEL_DEVICE))
    assert values.shape == (3, 0) and meta.shape == (3, 0)
    assert prune24_dense(torch.zeros(2, 0, 8, device=KERNEL_DEVICE)).shape == (2, 0, 8)


# --------------------------------------------------------------------------- packed storage (runtime/packed.py)


def test_dense_packed_masked_weights_are_exactly_zero():
    """The dense-stored layer pruned by rows * mask: a masked inf or NaN times 0 is NaN, so the layer
    computed NaN from weights its mask drops (the compressed layer of the same mask had zeros)."""
    from sparsec.patterns import NM
    from sparsec.runtime.packed import DensePacked, NMPacked

    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[inf, 1.0, 2.0, -inf], [nan, 3.0, nan, -1.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, True]])
    expected = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 0.0, -1.0]])
    for cls in (DensePacked, NMPacked):
        packed = cls.pack(w, mask, NM(2, 4), None)
        assert same_bits(packed.rows(), expected), cls.__name__
        assert torch.equal(packed.mask(), mask)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "fanin:0.5"])
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("dense", [False, True])
def test_packed_storage_round_trips(pattern, quant, dense):
    """state_dict into a layer packed from other weights, deepcopy, pickle, torch.save / load: the same
    rows and mask. .half() / .to(bfloat16): rows in that dtype, int8 scales still float32 (so the
    dequantized weights are the float32 ones, rounded once)."""
    import copy
    import io
    import pickle

    from sparsec.patterns import parse_pattern
    from sparsec.runtime.packed import DensePacked, PackedWeight

    pat = parse_pattern(pattern)
    cls = DensePacked if dense else PackedWeight
    g = torch.Generator().manual_seed(0)
    w, other = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    mask = ref.pattern_mask(w, pat)
    packed = cls.pack(w, mask, pat, quant)
    rows = packed.rows()
    expected = torch.where(mask, w, 0.0)
    assert torch.equal(rows, ref.fake_quant_int8(expected) if quant else expected)

    def saved(module):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    fresh = cls.pack(other, ref.pattern_mask(other, pat), pat, quant)
    fresh.load_state_dict(packed.state_dict())
    for copied in (fresh, copy.deepcopy(packed), pickle.loads(pickle.dumps(packed)), saved(packed)):
        assert torch.equal(copied.rows(), rows) and torch.equal(copied.mask(), mask)
    for dtype, cast in ((torch.float16, lambda m: m.half()), (torch.bfloat16, lambda m: m.to(torch.bfloat16))):
        moved = cast(copy.deepcopy(packed))
        assert moved.rows().dtype == dtype and torch.equal(moved.rows(), rows.to(dtype)), dtype
        assert torch.equal(moved.mask(), mask)
        if quant and not dense:
            assert moved.scales.dtype == torch.float32 and torch.equal(moved.scales, packed.scales)
