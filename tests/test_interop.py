"""to_cutlass equals torch's own CUTLASS conversion of the same pruned dense matrix."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from sparsec import nm_compress, to_cutlass
from sparsec import reference as ref
from sparsec.errors import InvalidInputError, InvalidTypeError


@given(st.sampled_from([(32, 32), (64, 32), (32, 64), (96, 96), (16, 64)]), st.integers(0, 10**6),
       st.sampled_from([torch.float16, torch.bfloat16, torch.int8]), st.booleans())
def test_to_cutlass_matches_torch(shape, seed, dtype, degenerate):
    rows, k = shape
    if dtype == torch.int8 and k % 64:
        k *= 2
    if dtype != torch.int8 and rows % 32:
        rows *= 2
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    if degenerate:  # groups with fewer than two nonzeros exercise torch's filler choices
        w[torch.rand(rows, k, generator=g) < 0.6] = 0
    dense = (w * ref.nm_mask(w, 2, 4))
    dense = (dense * 20).round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else dense.to(dtype)
    values, meta = nm_compress(dense, 2, 4)
    sparse, meta_cutlass = to_cutlass(values, meta)
    expected_sparse, expected_meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(sparse, expected_sparse)
    assert meta_cutlass.dtype == expected_meta.dtype
    assert torch.equal(meta_cutlass, expected_meta)


def test_to_cutlass_errors():
    values, meta = nm_compress(torch.zeros(32, 32), 2, 4)
    with pytest.raises(InvalidInputError, match="float16, bfloat16 and int8"):
        to_cutlass(values, meta)  # float32
    values, meta = nm_compress(torch.zeros(8, 32, dtype=torch.float16), 2, 4)
    with pytest.raises(InvalidInputError, match="rows % 32"):
        to_cutlass(values, meta)
    values, meta = nm_compress(torch.zeros(32, 16, dtype=torch.float16), 2, 4)
    with pytest.raises(InvalidInputError, match="K % 32"):
        to_cutlass(values, meta)


def test_to_cutlass_refuses_metadata_that_does_not_match_the_values():
    # a meta of fewer rows than the values was decoded for its rows only: the other rows came back as
    # zeros and torch's conversion of the real matrix disagreed, silently
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    dense = (w * ref.nm_mask(w, 2, 4)).to(torch.float16)
    values, meta = nm_compress(dense, 2, 4)
    expected_sparse, expected_meta = sparse_semi_structured_from_dense_cutlass(dense)
    sparse, meta_cutlass = to_cutlass(values, meta)
    assert torch.equal(sparse, expected_sparse) and torch.equal(meta_cutlass, expected_meta)
    for bad in (meta[:32], meta[:, :2], meta.to(torch.int32), meta.float()):
        with pytest.raises(InvalidInputError, match=r"int16 of shape \(64, 4\)"):
            to_cutlass(values, bad)
    with pytest.raises(InvalidTypeError, match="torch tensors"):
        to_cutlass(values.numpy(), meta)


_SPECIALS = {torch.float16: [0.0, -0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), -float("inf"), 6e-8, 65504.0],
             torch.bfloat16: [0.0, -0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), -float("inf"), 1e-40, 3e38],
             torch.int8: [0, 0, -128, 127, -127, 1, -1, 2]}


@given(st.sampled_from([torch.float16, torch.bfloat16, torch.int8]), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 10**6), st.booleans())
def test_to_cutlass_matches_torch_at_special_values(dtype, row_blocks, col_blocks, seed, strided):
    """+-0, NaN, +-inf, denormals, int8 -128, groups of fewer than two nonzeros; values and meta that
    are not contiguous. Compared bit for bit (a -0.0 kept is -0.0), NaN matching any NaN."""
    rows = row_blocks * (16 if dtype == torch.int8 else 32)
    k = col_blocks * (64 if dtype == torch.int8 else 32)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(_SPECIALS[dtype], dtype=torch.float64).to(dtype)
    w = pool[torch.randint(0, len(pool), (rows, k), generator=g)]
    dense = torch.where(ref.nm_mask(w, 2, 4), w, torch.zeros((), dtype=dtype))
    values, meta = nm_compress(dense, 2, 4)
    if strided:
        values, meta = values.t().contiguous().t(), meta.t().contiguous().t()
        assert not values.is_contiguous()
    sparse, meta_cutlass = to_cutlass(values, meta)
    expected_sparse, expected_meta = sparse_semi_structured_from_dense_cutlass(dense)
    bits = torch.int8 if dtype == torch.int8 else torch.int16
    same = sparse.view(bits) == expected_sparse.view(bits)
    if dtype.is_floating_point:
        same |= sparse.isnan() & expected_sparse.isnan()
    assert sparse.shape == expected_sparse.shape and bool(same.all())
    assert meta_cutlass.dtype == expected_meta.dtype and torch.equal(meta_cutlass, expected_meta)


def test_to_cutlass_refuses_what_torch_cannot_lay_out():
    """torch's own conversion checks K % 16 (16-bit) / K % 32 (int8), but an odd number of metadata
    columns then fails inside it ("index ... is out of bounds"): sparsec asks for an even number, clearly."""
    for dtype, rows, k in ((torch.float16, 32, 16), (torch.float16, 32, 48), (torch.int8, 16, 32), (torch.int8, 16, 96)):
        dense = torch.zeros(rows, k, dtype=dtype)
        with pytest.raises(RuntimeError, match="out of bounds"):
            sparse_semi_structured_from_dense_cutlass(dense)
        with pytest.raises(InvalidInputError, match=f"K % {64 if dtype == torch.int8 else 32} == 0"):
            to_cutlass(*nm_compress(dense, 2, 4))
