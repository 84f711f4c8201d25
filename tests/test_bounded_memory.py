"""Masks, compression and quantization of a large layer run a slice of rows at a time
(reference.ROW_CHUNK_WEIGHTS), and unstructured masks by radix selection (sparsec/flat_top.py): the
same results as on the whole layer, without the whole layer's sort temporaries (a 32768 x 4096 bfloat16
layer took 8x its size at once for 2:4, 10x for unstructured, 15x with int8, 28x with log2 levels)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from sparsec import flat_top
from sparsec import reference as ref
from sparsec.errors import InvalidInputError
from sparsec.levels import quantize_levels
from sparsec.patterns import parse_pattern

SMALL = 37  # weights per slice: not a multiple of any row length below, so slices end mid-way


def _flat_top_oracle(t: torch.Tensor, keep: int) -> torch.Tensor:
    """The keep largest |t| in order of (NaN first, larger |t|, lower flat index), by numpy's lexsort."""
    a = t.detach().double().abs().reshape(-1).numpy()
    nan = np.isnan(a)
    order = np.lexsort((np.arange(a.size), -np.where(nan, 0.0, a), ~nan))  # the last key is the primary one
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:keep]] = True
    return torch.from_numpy(mask).reshape(t.shape)


_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), float("nan"), 1e-30, 3.0])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       st.lists(st.one_of(_SPECIAL, st.floats(-1e4, 1e4, width=16)), min_size=1, max_size=60),
       st.integers(0, 10**6), st.integers(1, 70))
def test_radix_selection_keeps_what_an_ordering_by_magnitude_keeps(dtype, values, seed, size):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    keep = seed % (t.numel() + 1)
    assert torch.equal(flat_top.largest_mask(t, keep, size), _flat_top_oracle(t, keep))


def test_radix_selection_ties_every_nan_payload():
    t = torch.zeros(6, dtype=torch.float32)
    t.view(torch.int32)[[1, 4]] = torch.tensor([0x7FC00001, 0x7F800001], dtype=torch.int32)  # two NaN payloads
    t.view(torch.int32)[3] = torch.tensor(-0x00400000, dtype=torch.int32)  # 0xFFC00000: a negative NaN
    t[0] = float("inf")
    assert torch.isnan(t[[1, 3, 4]]).all()
    assert flat_top.largest_mask(t, 2, 2).tolist() == [False, True, False, True, False, False]
    assert flat_top.largest_mask(t, 4, 4).tolist() == [True, True, False, True, True, False]


def _weights(dtype=torch.float32, rows=24, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[::3] = torch.randint(-2, 3, (len(range(0, rows, 3)), cols), generator=g).float()  # ties
    return w.to(dtype)


def _whole_and_sliced(monkeypatch, fn):
    whole = fn()
    monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", SMALL)
    sliced = fn()
    monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", 1 << 22)
    return whole, sliced


def _assert_same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) if not a.is_floating_point() else torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8", "fanin:0.7", "unstructured:0.85"])
def test_masks_and_compressed_forms_are_the_same_sliced(monkeypatch, dtype, pattern):
    w = _weights(dtype)
    w[5, 7] = float("nan")  # NaN ranks above every magnitude in each form
    p = parse_pattern(pattern)

    def run():
        mask = ref.pattern_mask(w, p)
        if pattern.startswith("fanin"):
            ragged = mask.clone()
            ragged[2, :] = False  # a row with nothing kept: the ragged form pads it
            return mask, ref.fanin_compress(w, mask), ref.fanin_compress_ragged(w, ragged), ref.kept_per_row(mask)
        if pattern.startswith("unstructured"):
            return mask, ref.kept_per_row(mask)
        return mask, ref.nm_compress_masked(w, mask, p.n, p.m), ref.kept_per_row(mask)

    whole, sliced = _whole_and_sliced(monkeypatch, run)
    _assert_same(whole, sliced)


def test_a_wrong_nm_mask_is_refused_naming_every_count_it_holds(monkeypatch):
    w = _weights()
    mask = ref.nm_mask(w, 2, 4)
    mask[0, 0:4] = True  # 4 kept in one group of the first slice
    mask[20, 0:4] = False  # 0 kept in one group of a later slice
    monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", SMALL)
    with pytest.raises(InvalidInputError, match=r"exactly 2 of every 4; found groups keeping \[0, 2, 4\]"):
        ref.nm_compress_masked(w, mask, 2, 4)


@pytest.mark.parametrize("bad", ["fewer rows", "more rows", "one row to broadcast", "narrower", "1-D"])
@pytest.mark.parametrize("compress", ["2:4", "fanin", "ragged"])
def test_a_mask_of_another_shape_is_refused_sliced_or_not(monkeypatch, compress, bad):
    """(Sliced, a mask with fewer rows left the last rows of the output uninitialized memory.)"""
    w = _weights(rows=7, cols=8)
    mask = ref.nm_mask(w, 2, 4)
    mask = {"fewer rows": mask[:6], "more rows": torch.cat([mask, mask]), "one row to broadcast": mask[:1],
            "narrower": mask[:, :4], "1-D": mask[0]}[bad]
    run = {"2:4": lambda: ref.nm_compress_masked(w, mask, 2, 4), "fanin": lambda: ref.fanin_compress(w, mask),
           "ragged": lambda: ref.fanin_compress_ragged(w, mask)}[compress]
    for size in (1 << 22, 3):
        monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", size)
        with pytest.raises(InvalidInputError, match=r"mask shape \(.*\) does not match rows shape \(7, 8\)"):
            run()


def test_a_wrong_nm_mask_names_every_count_even_from_rows_that_are_right(monkeypatch):
    w = _weights(rows=3, cols=4)
    mask = ref.nm_mask(w, 2, 4)
    mask[1] = False  # a row whose only group keeps 0; the others keep 2
    with pytest.raises(InvalidInputError, match=r"found groups keeping \[0, 2\]"):
        ref.nm_compress_masked(w, mask, 2, 4)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_rows_with_no_rows_compress_to_nothing_in_every_nm_form(nm):
    n, m = nm
    values, meta = ref.nm_compress_masked(torch.zeros(0, 16), torch.zeros(0, 16, dtype=torch.bool), n, m)
    assert values.shape == (0, 16 * n // m) and meta.shape[0] == 0


def test_unstructured_masks_under_vmap_fall_back_to_the_sort(monkeypatch):
    """torch.func.vmap over stacked weights (model ensembling with a train=True SR-STE layer): the radix
    selection's histograms are batched there, and failed; under any torch.func transform the sort runs."""
    stacked = _weights(rows=3 * 24).reshape(3, 24, 40)
    monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", 7)
    got = torch.func.vmap(lambda rows: ref.unstructured_mask(rows, 100))(stacked)
    for i in range(3):
        assert torch.equal(got[i], _flat_top_oracle(stacked[i], 100))


def test_row_wise_inputs_must_have_the_same_rows():
    with pytest.raises(InvalidInputError, match=r"shapes \(4, 2\), \(3, 2\) do not have the same number of rows"):
        ref.by_row_chunks(torch.add, torch.zeros(4, 2), torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantization_and_nonfinite_counts_are_the_same_sliced(monkeypatch, dtype):
    w = _weights(dtype) * ref.nm_mask(_weights(dtype), 2, 4)
    w[3] *= 1e3  # an outlier row

    def run():
        return (ref.quantize_int8(w), ref.fake_quant_int8(w), quantize_levels(w, "log2:4"), quantize_levels(w, "codebook:3"),
                torch.tensor(ref.count_nonfinite(w.clone().index_fill_(1, torch.tensor([1, 9]), float("inf")))))

    whole, sliced = _whole_and_sliced(monkeypatch, run)
    _assert_same(whole, sliced)
    assert int(whole[-1]) == 2 * w.shape[0]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 96), nn.Linear(96, 64), nn.Conv1d(8, 16, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.c(h.reshape(h.shape[0], 8, 8)).flatten(1)


@pytest.mark.parametrize("config", [dict(pattern="2:4"), dict(pattern="2:4", quantize="int8"), dict(pattern="2:4", quantize="auto"),
                                    dict(pattern="fanin:0.8", quantize="log2:4"), dict(pattern="unstructured:0.9"),
                                    dict(pattern="4:8", quantize="codebook:3"),
                                    dict(pattern="4:8", quantize="codebook:3", dtype=torch.bfloat16)])
def test_compile_sorts_no_more_than_a_slice_at_a_time_and_computes_the_same(monkeypatch, config):
    torch.manual_seed(0)
    config = dict(config)
    dtype = config.pop("dtype", torch.float32)
    model = _Net().to(dtype)
    x = torch.randn(5, 32, dtype=dtype)
    opts = dict(example_inputs=(x,), backend="torch", include=["a", "b", "c"], **config)
    whole = sparsec.compile(model, **opts)

    sorted_sizes, sorted_wide = [], []
    real_sort = torch.sort

    def spy(input, *args, **kwargs):
        # (a 16-bit codebook fit sorts the float64 distinct values, at most 65536 whatever the layer's size)
        (sorted_wide if input.dtype == torch.float64 and dtype != torch.float32 else sorted_sizes).append(input.numel())
        return real_sort(input, *args, **kwargs)

    monkeypatch.setattr(ref, "ROW_CHUNK_WEIGHTS", 64)
    monkeypatch.setattr(torch, "sort", spy)
    sliced = sparsec.compile(model, **opts)
    monkeypatch.setattr(torch, "sort", real_sort)

    assert [lp.sparsity for lp in sliced.plan] == [lp.sparsity for lp in whole.plan]
    assert [lp.reason for lp in sliced.plan] == [lp.reason for lp in whole.plan]
    assert torch.equal(sliced(x), whole(x))
    # (an unstructured mask is chosen by histograms (flat_top), with no sort at all)
    assert sorted_sizes or config["pattern"].startswith("unstructured"), "the spy saw no sort: it watches nothing"
    sorted_sizes.append(0)
    assert max(sorted_wide, default=0) <= 1 << 16
    # a float32 codebook fit sorts every kept value of a layer (k-means needs them in order): that one only
    largest_kept = max(lp.kept for lp in whole.plan if lp.sparsity) if "codebook" in str(config) and dtype == torch.float32 else 0
    longest_row = max(m.weight[0].numel() for m in (model.a, model.b, model.c))  # a slice holds one row at least
    assert max(sorted_sizes) <= max(64, longest_row, largest_kept), sorted_sizes
    assert max(sorted_sizes) < model.b.weight.numel()
