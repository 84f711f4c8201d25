"""sparsec.runtime.condensed_cpu against an independent dense reference, on every kernel family
this CPU can run (AVX-512 seg and transposed, AVX2 transposed, scalar) and on the torch fallback.

The first test to run compiles the C++ library (~10 s) unless it is cached.
"""
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.runtime import condensed_cpu as cc

ISAS = ["avx512", "avx2", "scalar"]


def families() -> list[str]:
    """Kernel families runnable here: "best" dispatches as in production; "avx512-seg" / "avx512-rows"
    force one AVX-512 kernel for every batch size; "avx2" / "scalar" lower the ISA."""
    if not cc.is_available():
        return []
    best = cc.set_isa("best")
    lower = ISAS[ISAS.index(best) + 1:]
    return ["best"] + (["avx512-seg", "avx512-rows"] if best == "avx512" else []) + lower


def use(family: str) -> None:
    cc.set_isa("best" if family == "best" else family.split("-")[0])


@pytest.fixture(params=families() or [pytest.param("none", marks=pytest.mark.skip("C++ kernels unavailable"))])
def family(request):
    use(request.param)
    yield request.param
    cc.set_isa("best")


def make(out: int, K: int, k: int, seed: int = 0, bias: bool = True):
    """values [out, k], ascending int32 indices [out, k] (distinct per row), bias [out] or None; fresh copies."""
    return tuple(None if t is None else t.clone() for t in _make(out, K, k, seed, bias))


@functools.lru_cache(maxsize=None)
def _make(out, K, k, seed, bias):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(out, K, generator=g).argsort(-1)[:, :k].sort(-1).values.to(torch.int32)
    values = torch.randn(out, k, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return values, indices, b


def prepare(values, indices, family: str):
    w = cc.prepare(values, indices)
    if family == "avx512-seg":
        assert w.seg
        return dataclasses.replace(w, seg_batch_limit=float("inf"))
    if family == "avx512-rows":
        return dataclasses.replace(w, seg=(), seg_batch_limit=0.0)
    return w


def dense_reference(x, values, indices, bias):
    """float64 F.linear with the weight scattered back to dense: shares no code with the module."""
    out, K = values.shape[0], x.shape[-1]
    dense = torch.zeros(out, K, dtype=torch.float64)
    dense[torch.arange(out)[:, None], indices.long()] = values.double()
    return F.linear(x.double(), dense, None if bias is None else bias.double()), dense


def check(y, x, values, indices, bias):
    ref, dense = dense_reference(x, values, indices, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    # fp32 sums of k products: error well under 1e-5 of the magnitude sum |x| @ |W|^T + |bias|.
    scale = (x.double().abs() @ dense.abs().T).max() if ref.numel() else torch.tensor(0.0)
    scale = scale + (0 if bias is None else bias.abs().max()) + 1e-30
    err = (y.double() - ref).abs().max() if ref.numel() else torch.tensor(0.0)
    assert err <= 1e-5 * scale, f"max error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 70])
def test_batches(family, batch):
    # 1..8 cover every seg batch group, 9..70 the transposed tiles (16 to 64 columns) and their tails.
    values, indices, bias = make(40, 300, 30, seed=batch)
    x = torch.randn(batch, 300)
    with torch.no_grad():
        check(cc.condensed_linear(x, prepare(values, indices, family), bias=bias), x, values, indices, bias)


def test_layer_3072_to_768(family):
    values, indices, bias = make(768, 3072, 307)
    w = prepare(values, indices, family)
    for batch in (1, 8, 64):
        x = torch.randn(batch, 3072)
        with torch.no_grad():
            check(cc.condensed_linear(x, w, bias=bias), x, values, indices, bias)


@pytest.mark.parametrize("shape", [(37,), (1, 37), (3, 5, 37), (2, 3, 2, 37), (0, 37), (4, 0, 37)])
def test_leading_dims(family, shape):
    values, indices, bias = make(21, 37, 6)
    x = torch.randn(shape)
    y = cc.condensed_linear(x, prepare(values, indices, family), bias=bias)
    assert y.shape == shape[:-1] + (21,)
    check(y, x, values, indices, bias)


@pytest.mark.parametrize("out,K,k", [
    (16, 64, 1),      # k = 1
    (13, 50, 50),     # fully dense, out not a multiple of 16 or 4
    (33, 100, 7),     # K not a multiple of 8 / 16 / 32
    (5, 31, 4),       # one partial segment
    (1, 1, 1),
    (50, 1000, 333),
    (17, 65, 64),     # last segment holds a single column
])
@pytest.mark.parametrize("batch", [1, 6, 20])
def test_edge_shapes(family, out, K, k, batch):
    values, indices, bias = make(out, K, k, seed=out + K + k)
    x = torch.randn(batch, K)
    check(cc.condensed_linear(x, prepare(values, indices, family), bias=bias), x, values, indices, bias)


@pytest.mark.parametrize("batch", [1, 20])
def test_no_bias_and_wider_x(family, batch):
    values, indices, _ = make(24, 40, 10)  # indices < 40, x has 70 features: the rest is unused
    x = torch.randn(batch, 70)
    check(cc.condensed_linear(x, prepare(values, indices, family)), x, values, indices, None)


@pytest.mark.parametrize("batch", [1, 20])
def test_int32_indices_beyond_65536(family, batch):
    values, indices, bias = make(3, 70_000, 5)
    indices[:, -1] = 69_999  # keep a column above the uint16 range
    x = torch.randn(batch, 70_000)
    check(cc.condensed_linear(x, prepare(values, indices, family), bias=bias), x, values, indices, bias)


@pytest.mark.parametrize("batch", [1, 20])
def test_non_contiguous_x(family, batch):
    values, indices, bias = make(20, 64, 8)
    x = torch.randn(64, batch).T  # a transposed view
    check(cc.condensed_linear(x, prepare(values, indices, family), bias=bias), x, values, indices, bias)
    x = torch.randn(batch, 128)[:, ::2]  # strided columns
    check(cc.condensed_linear(x, prepare(values, indices, family), bias=bias), x, values, indices, bias)


@settings(max_examples=60)
@given(out=st.integers(1, 40), K=st.integers(1, 120), k_frac=st.floats(0, 1), batch=st.integers(0, 20),
       extra=st.integers(0, 5), bias=st.booleans(), seed=st.integers(0, 2**16), which=st.integers(0, 4))
def test_random_shapes(out, K, k_frac, batch, extra, bias, seed, which):
    runnable = families()
    if not runnable:
        return
    family = runnable[which % len(runnable)]
    use(family)
    try:
        k = max(1, round(k_frac * K))
        values, indices, b = make(out, K, k, seed=seed, bias=bias)
        x = torch.randn(batch, K + extra, generator=torch.Generator().manual_seed(seed))
        check(cc.condensed_linear(x, prepare(values, indices, family), bias=b), x, values, indices, b)
    finally:
        cc.set_isa("best")


# ------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("batch", [1, 20])
def test_inf_reaches_only_rows_that_keep_the_column(family, batch):
    values, indices, bias = make(32, 96, 5)
    x = torch.randn(batch, 96)
    x[:, 40] = float("inf")
    y = cc.condensed_linear(x, prepare(values, indices, family), bias=bias)
    gathered = (x.double()[..., indices.long()] * values.double()).sum(-1) + bias.double()
    torch.testing.assert_close(y.double(), gathered, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert torch.isfinite(y[:, ~(indices == 40).any(1)]).all()


def test_fast_path_taken():
    if not cc.is_available():
        pytest.skip("C++ kernels unavailable")
    values, indices, bias = make(16, 32, 4)
    w = cc.prepare(values, indices)
    before = dict(cc.calls)
    with torch.no_grad():
        cc.condensed_linear(torch.randn(2, 32), w, bias=bias)
    cc.condensed_linear(torch.randn(32), w)  # grad enabled but nothing requires it: still fast
    assert cc.calls["fast"] == before.get("fast", 0) + 2
    assert cc.calls["fallback"] == before.get("fallback", 0)


def test_fallback_matches_fast_path():
    values, indices, bias = make(40, 100, 12)
    x = torch.randn(6, 100)
    w = cc.prepare(values, indices)
    fast = cc.condensed_linear(x, w, bias=bias)
    before = cc.calls["fallback"]
    y64 = cc.condensed_linear(x.double(), w, bias=bias)  # float64: fallback, float64 result
    assert y64.dtype == torch.float64 and cc.calls["fallback"] == before + 1
    torch.testing.assert_close(fast.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.reference(x, values, indices, bias), fast, rtol=1e-5, atol=1e-5)
    check(y64.float(), x, values, indices, bias)


def test_without_the_library_everything_falls_back(monkeypatch):
    monkeypatch.setattr(cc._kernels, "state", {"op": None})
    assert not cc.is_available() and cc.isa() == "torch"
    values, indices, bias = make(20, 50, 5)
    w = cc.prepare(values, indices)
    assert w.rows == () and w.seg == ()
    x = torch.randn(3, 50)
    check(cc.condensed_linear(x, w, bias=bias), x, values, indices, bias)


def test_autograd_falls_back_and_flows():
    values, indices, bias = make(12, 30, 4)
    values.requires_grad_()
    x = torch.randn(5, 30, requires_grad=True)
    w = cc.prepare(values, indices)
    cc.condensed_linear(x, w, bias=bias).square().sum().backward()
    x2, v2 = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    dense = torch.zeros(12, 30).index_put((torch.arange(12)[:, None], indices.long()), v2)
    F.linear(x2, dense, bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(values.grad, v2.grad)


def test_raw_tensors_without_prepare():
    values, indices, bias = make(18, 40, 9)
    x = torch.randn(4, 40)
    check(cc.condensed_linear(x, values, indices, bias), x, values, indices, bias)


def test_unsorted_indices():
    values, indices, bias = make(18, 40, 9)
    perm = torch.randperm(9)
    x = torch.randn(3, 40)
    check(cc.condensed_linear(x, values[:, perm], indices[:, perm], bias), x, values, indices, bias)


def test_bad_inputs():
    values, indices, _ = make(8, 40, 5)
    w = cc.prepare(values, indices)
    with pytest.raises(IndexError):
        cc.condensed_linear(torch.randn(2, int(indices.max())), w)
    with pytest.raises(ValueError):
        cc.prepare(values, indices[:, :3])
    with pytest.raises(ValueError):
        cc.prepare(values, indices.float())
    with pytest.raises(ValueError):
        cc.prepare(values, -indices - 1)
    with pytest.raises(TypeError):
        cc.condensed_linear(torch.randn(2, 40), values)


def test_failed_build_is_not_fatal(run_without_compiler):
    """No compiler: is_available() is False and results still come from torch."""
    code = ("import torch; from sparsec.runtime import condensed_cpu as cc\n"
            "assert not cc.is_available()\n"
            "v, i = torch.randn(4, 2), torch.tensor([[0, 3]] * 4)\n"
            "y = cc.condensed_linear(torch.ones(1, 5), v, i)\n"
            "assert torch.allclose(y, v.sum(-1)[None])\n")
    run_without_compiler(code)
