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
