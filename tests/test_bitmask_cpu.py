"""N:M linear layers on the CPU bitmask kernel: exact against plain torch on awkward shapes, chosen by
measurement, bounded in rows, differentiable, saved, traced, and re-chosen when a plan is edited."""
import copy
import dataclasses
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import load_example, oracle_int8, oracle_nm_mask, output_error, pruned_model
from sparsec.codegen import measure
from sparsec.passes import backend as backend_pass
from sparsec.runtime import bitmask_cpu
from sparsec.runtime.bitmask_linear import BitmaskLinear

pytestmark = pytest.mark.skipif(not bitmask_cpu.is_available(), reason="the C++ bitmask kernel did not build here")
ISAS = ["scalar"] + (["avx512"] if bitmask_cpu.isa() == "avx512" else [])


def _layer(out: int, k: int, n: int, m: int, int8: bool, seed: int):
    """(kernel weight, the dense weight it stands for, computed independently): magnitude N:M rows,
    int8 per-row quantized when asked."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    mask = oracle_nm_mask(w, n, m)
    dense = w * mask
    values = w[mask].view(out, -1)
    if not int8:
        return bitmask_cpu.prepare(values, mask), dense
    scales = dense.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(values / scales[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q.float() * scales[:, None], oracle_int8(dense)[mask].view(out, -1))
    return bitmask_cpu.prepare(q, mask, scales), oracle_int8(dense)


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=60, deadline=None)
@given(out=st.sampled_from([1, 3, 17, 40]), groups=st.integers(1, 40), pattern=st.sampled_from([(2, 4), (1, 4), (4, 8), (3, 4), (1, 2)]),
       batch=st.sampled_from([(1,), (2,), (3,), (5,), (9,), (17,), (2, 3)]), int8=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_equals_f_linear_on_the_pruned_weight(isa, out, groups, pattern, batch, int8, bias, seed):
    """Every pattern (a fixed 8 per 16-column word, or a varying count), K not a multiple of 16, batch
    tiles of 8/4/2/1 and their remainders, leading dims, int8 scales and bias; and the densified weight
    (for batches past the kernel's rows) is the pruned weight exactly."""
    n, m = pattern
    k = groups * m
    weight, dense = _layer(out, k, n, m, int8, seed)
    x = torch.randn(*batch, k, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(out) if bias else None
    bitmask_cpu.calls.clear()
    bitmask_cpu.set_isa(isa)
    try:
        y = bitmask_cpu.bitmask_linear(x, weight, b)
        densified = bitmask_cpu.densify(weight)
    finally:
        bitmask_cpu.set_isa("best")
    assert torch.equal(densified, dense)
    assert bitmask_cpu.calls["fast"] == 1
    expected = F.linear(x.double(), dense.double(), None if b is None else b.double())
    assert y.shape == (*batch, out) and y.dtype == torch.float32
    assert output_error(y.double(), expected) <= 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int8", [False, True])
def test_each_word_form_equals_f_linear(isa, int8):
    """prepare tells the kernel what every mask word holds: 2 of every 4 columns (2:4, K a multiple of
    16: two permutes place the values), 8 per word otherwise (4:8: vexpandps of a fixed load), or any
    count (K not a multiple of 16). Each form, and the general ones run on data that allows a faster
    one, computes F.linear on the pruned weight, over every batch tile (8, 4, 2, 1) and its remainder."""
    cases = [((2, 4), 64, bitmask_cpu.FORM_TWO_OF_FOUR), ((4, 8), 64, bitmask_cpu.FORM_EIGHT),
             ((2, 4), 68, bitmask_cpu.FORM_ANY), ((1, 4), 64, bitmask_cpu.FORM_ANY)]
    x = torch.randn(15, 68, generator=torch.Generator().manual_seed(3))
    bitmask_cpu.set_isa(isa)
    try:
        for (n, m), k, form in cases:
            weight, dense = _layer(37, k, n, m, int8, seed=k + n)
            assert weight.form == form, ((n, m), k)
            expected = F.linear(x[:, :k].double(), dense.double())
            for slower in (f for f in (bitmask_cpu.FORM_EIGHT, bitmask_cpu.FORM_ANY) if f < form):
                assert output_error(bitmask_cpu.bitmask_linear(x[:, :k], dataclasses.replace(weight, form=slower)).double(),
                                    expected) <= 1e-5
            for rows in (1, 2, 3, 4, 7, 8, 15):
                assert output_error(bitmask_cpu.bitmask_linear(x[:rows, :k], weight).double(), expected[:rows]) <= 1e-5
            assert torch.equal(bitmask_cpu.densify(weight), dense)
    finally:
        bitmask_cpu.set_isa("best")


# 16-bit layers compute in float32 and round y once: fp16 / bf16 round to 2^-11 / 2^-8 relative
SIXTEEN_BIT = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("int8", [False, True])
def test_16_bit_layers_equal_f_linear(isa, dtype, int8):
    """bfloat16 / float16 layers: 16-bit values (or int8 with float32 scales) and 16-bit x and bias; y
    in x's dtype, within its rounding of F.linear in float64 on the weight the layer stores, for every
    word form and batch tile; densify gives that weight exactly in float32."""
    cases = [((2, 4), 64, bitmask_cpu.FORM_TWO_OF_FOUR), ((4, 8), 64, bitmask_cpu.FORM_EIGHT),
             ((2, 4), 68, bitmask_cpu.FORM_ANY), ((1, 4), 36, bitmask_cpu.FORM_ANY)]
    x = torch.randn(11, 68, generator=torch.Generator().manual_seed(5)).to(dtype)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(6)).to(dtype)
    bitmask_cpu.set_isa(isa)
    try:
        for (n, m), k, form in cases:
            weight, dense = _layer(37, k, n, m, int8, seed=k + n)
            if not int8:  # the layer's own values are 16-bit
                dense = dense.to(dtype).float()
                weight = bitmask_cpu.prepare(dense[dense != 0].view(37, -1).to(dtype), weight_mask(weight, k))
                assert weight.values.dtype == dtype
            assert weight.form == form, ((n, m), k)
            expected = F.linear(x[:, :k].double(), dense.double(), bias.double())
            for rows in (1, 2, 3, 4, 8, 11):
                bitmask_cpu.calls.clear()
                y = bitmask_cpu.bitmask_linear(x[:rows, :k], weight, bias)
                assert bitmask_cpu.calls["fast"] == 1 and y.dtype == dtype
                assert output_error(y.double(), expected[:rows]) <= SIXTEEN_BIT[dtype], ((n, m), k, rows)
            assert torch.equal(bitmask_cpu.densify(weight), dense)
    finally:
        bitmask_cpu.set_isa("best")


def weight_mask(weight, k: int) -> torch.Tensor:
    """The boolean mask a prepared weight stands for, read from its bit words independently."""
    words = weight.masks.to(torch.int32) & 0xFFFF
    bits = torch.stack([(words >> j) & 1 for j in range(16)], -1).bool()
    return bits.flatten(1)[:, :k]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int8", [False, True])
def test_inf_and_nan_in_x_give_what_f_linear_gives(isa, int8):
    """Every kernel counts the pruned zeros as the torch runtime's F.linear does: an inf / nan in x gives
    nan in every row that does not keep its column (0 * inf), inf or nan as F.linear's in the rows that
    keep it, and the finite rows are untouched. (The scalar kernel summed kept weights only: rows that
    pruned the column came out finite, so the answer depended on whether the CPU has AVX-512.)"""
    weight, dense = _layer(8, 36, 2, 4, int8, 0)  # K = 36: a last word of 4 columns
    kept = dense != 0
    # a column some rows keep and others prune, in a full word and in the last word
    mixed = [c for c in range(36) if 0 < int(kept[:, c].sum()) < 8]
    full, last = next(c for c in mixed if c < 32), next(c for c in mixed if c >= 32)
    x = torch.randn(5, 36, generator=torch.Generator().manual_seed(1))
    x[0, full], x[1, full], x[2, last], x[3, full] = float("inf"), float("-inf"), float("nan"), float("nan")
    expected = F.linear(x.double(), dense.double())
    bitmask_cpu.set_isa(isa)
    try:
        for rows in (5, 1, 2):  # batch tiles of 4 + 1, a lone row (its own blocking), 2
            y = bitmask_cpu.bitmask_linear(x[:rows], weight).double()
            want = expected[:rows]
            assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf()), rows
            assert torch.equal(y[y.isinf()], want[want.isinf()]), rows  # the same signs
            finite = want.isfinite()
            torch.testing.assert_close(y[finite], want[finite], rtol=1e-5, atol=1e-4)
    finally:
        bitmask_cpu.set_isa("best")
    assert bool(expected[0].isnan().any()) and bool(expected[0].isinf().any())  # both kinds of rows occur


def test_values_and_scales_that_require_grad_get_their_gradients():
    """prepare shares the values (and int8 scales) it is given: when they require grad, bitmask_linear
    runs the differentiable reference and they get F.linear's gradients. (The kernel ran, and they got
    none: torch only warned at backward that the operator had no autograd formula.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    mask = oracle_nm_mask(w, 2, 4)
    x, gy = torch.randn(3, 32, generator=g), torch.randn(3, 6, generator=g)
    values = w[mask].view(6, -1).requires_grad_()
    bitmask_cpu.calls.clear()
    (bitmask_cpu.bitmask_linear(x, bitmask_cpu.prepare(values, mask)) * gy).sum().backward()
    assert bitmask_cpu.calls["fallback"] == 1 and not bitmask_cpu.calls["fast"]
    # y = x W^T: dL/dW = gy^T x, read at the kept positions in row order
    assert values.grad is not None and torch.allclose(values.grad, (gy.T @ x)[mask].view(6, -1), atol=1e-5)
    q = torch.randint(-127, 128, (6, 16), dtype=torch.int8, generator=g)
    scales = torch.rand(6, generator=g).requires_grad_()
    (bitmask_cpu.bitmask_linear(x, bitmask_cpu.prepare(q, mask, scales)) * gy).sum().backward()
    dense_q = torch.zeros(6, 32).masked_scatter(mask, q.float())
    # y[b, o] = scales[o] * (x q^T)[b, o]: dL/dscales[o] = sum_b gy[b, o] (x q^T)[b, o]
    assert scales.grad is not None and torch.allclose(scales.grad, (gy * (x @ dense_q.T)).sum(0), atol=1e-4)
    with torch.no_grad():  # nothing to differentiate: the kernel runs
        bitmask_cpu.calls.clear()
        bitmask_cpu.bitmask_linear(x, bitmask_cpu.prepare(values, mask))
        assert bitmask_cpu.calls["fast"] == 1


def test_values_off_the_cpu_never_reach_the_cpu_operator():
    """Values on "meta" (a model built there, not yet materialized) with a CPU x: the operator dispatched
    to its shape-only version and returned uninitialised memory, and the reference a CPU zeros tensor
    the meta values never filled; now the call fails, as F.linear with a meta weight does."""
    mask = torch.tensor([[True, True, False, False] * 4] * 3)
    weight = bitmask_cpu.prepare(torch.ones(3, 8, device="meta"), mask)
    bitmask_cpu.calls.clear()
    with pytest.raises((NotImplementedError, RuntimeError)):
        bitmask_cpu.bitmask_linear(torch.ones(2, 16), weight)
    assert not bitmask_cpu.calls["fast"]


def test_fallbacks_and_bad_input():
    weight, dense = _layer(4, 16, 2, 4, False, 1)
    bitmask_cpu.calls.clear()
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    y = bitmask_cpu.bitmask_linear(x, weight)
    assert bitmask_cpu.calls["fallback"] == 1 and y.dtype == torch.float64
    assert output_error(y, F.linear(x, dense.double())) <= 1e-12
    y.sum().backward()
    assert torch.allclose(x.grad, dense.double().sum(0).expand(3, 16))
    with pytest.raises(ValueError, match="x has 12 features; the layer takes 16"):
        bitmask_cpu.bitmask_linear(torch.randn(2, 12), weight)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :4], mask[1, :2] = True, True
    with pytest.raises(ValueError, match="every row of the mask must keep values.shape\\[1\\] = 4 columns"):
        bitmask_cpu.prepare(torch.randn(2, 4), mask)
    with pytest.raises(ValueError, match="int8 values need per-row scales"):
        bitmask_cpu.prepare(torch.zeros(2, 4, dtype=torch.int8), mask[[0, 0]])
    # values the kernel cannot read are refused when prepared (they failed at the first float32 call)
    with pytest.raises(ValueError, match="values must be float32, bfloat16 or float16, or int8 with scales; got torch.float64"):
        bitmask_cpu.prepare(torch.randn(2, 4, dtype=torch.float64), mask[[0, 0]])
    # the operator itself names the word forms it accepts (prepare always passes one of them)
    with pytest.raises(RuntimeError, match="form must be 0, 8 or 24, got 5"):
        torch.ops.sparsec_bitmask.linear(torch.randn(1, 16), weight.values, weight.masks, None, None, 4, 5)


def _bitmask_plan(model, inputs, **kw):
    plan = sparsec.explain(model, example_inputs=inputs, backend="torch", **kw)
    for lp in plan.sparse_layers:
        lp.backend = "bitmask"
    return plan


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_layers_equal_the_oracle_and_train_through_the_reference(quantize):
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_bitmask_plan(model, (x,), quantize=quantize))
    assert all(isinstance(cm.sparse_module(lp.name), BitmaskLinear) for lp in cm.plan.sparse_layers)
    ref = pruned_model(model, cm.plan)
    bitmask_cpu.calls.clear()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = cm(xa), ref(xb)
    assert bitmask_cpu.calls["fast"] == len(cm.plan.sparse_layers) and not bitmask_cpu.calls["fallback"]
    assert output_error(ya, yb) <= 1e-5
    grad = torch.randn_like(ya)
    (ya * grad).sum().backward()
    (yb * grad).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("cast_after_compile", [False, True])
def test_16_bit_models_run_the_kernel(dtype, quantize, cast_after_compile):
    """A bfloat16 / float16 model compiled onto the kernel, or a float32 one cast after compiling
    (cm.to(dtype)): the kernel runs every layer in the model's dtype and equals the oracle's pruned
    model, past the kernel's rows too (the densified weight)."""
    model, (x,) = load_example("mlp").build_model()
    if cast_after_compile:
        cm = sparsec.compile(model, example_inputs=(x,), plan=_bitmask_plan(model, (x,), quantize=quantize)).to(dtype)
        expected = pruned_model(model, cm.plan).to(dtype)
    else:
        model = model.to(dtype)
        plan = _bitmask_plan(model, (x.to(dtype),), quantize=quantize)
        cm = sparsec.compile(model, example_inputs=(x.to(dtype),), plan=plan)
        expected = pruned_model(model, cm.plan)
    x = x.to(dtype)
    with torch.no_grad():
        for max_rows, kernel_calls in ((None, len(cm.plan.sparse_layers)), (1, 0)):
            for lp in cm.plan.sparse_layers:
                cm.sparse_module(lp.name).launch = {"max_rows": max_rows}
            bitmask_cpu.calls.clear()
            y = cm(x)
            assert y.dtype == dtype
            assert bitmask_cpu.calls["fast"] == kernel_calls and not bitmask_cpu.calls["fallback"]
            assert output_error(y.double(), expected(x).double()) <= 2 * SIXTEEN_BIT[dtype]


def test_more_rows_than_measured_run_a_densified_weight():
    model, (x,) = load_example("mlp").build_model()
    plan = _bitmask_plan(model, (x,))
    for lp in plan.sparse_layers:
        lp.launch = {"max_rows": 4}
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    expected = pruned_model(model, cm.plan)
    with torch.no_grad():
        for rows, fast in ((4, True), (5, False)):
            bitmask_cpu.calls.clear()
            xr = torch.randn(rows, x.shape[1])
            assert output_error(cm(xr), expected(xr)) <= 1e-5
            assert bool(bitmask_cpu.calls["fast"]) == fast
    plan["fc2"].launch = {"max_rows": 0}
    xa = torch.randn(5, x.shape[1], requires_grad=True)  # with autograd: the torch runtime
    xb = xa.detach().clone().requires_grad_(True)
    cm(xa).sum().backward()
    expected(xb).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    with pytest.raises(ValueError, match=r"backend 'bitmask' takes launch \{'max_rows': N\} \(N >= 1"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


@pytest.mark.parametrize("pattern, backend", [("2:4", "bitmask"), ("fanin:0.9", "condensed"), ("unstructured:0.9", "csr")])
def test_load_state_dict_reaches_the_kernel_layout(pattern, backend):
    """load_state_dict copies into the packed buffers in place: the kernels' layouts, derived from the
    old values, are built again, so the model computes with the loaded weights, as it reports."""
    model, (x,) = load_example("mlp").build_model()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    plans = []
    for m in (model, other):
        plan = sparsec.explain(m, pattern=pattern, example_inputs=(x,), backend="torch")
        for lp in plan.sparse_layers:
            lp.backend = backend
        plans.append(sparsec.compile(m, example_inputs=(x,), plan=plan))
    source, target = plans
    with torch.no_grad():
        target(x)  # the layouts are built (from the old weights)
        target.load_state_dict(source.state_dict())
        for lp in target.plan.sparse_layers:
            assert torch.equal(target.effective_weight(lp.name), source.effective_weight(lp.name))
        assert output_error(target(x), pruned_model(model, source.plan)(x)) <= 1e-5


def test_save_load_and_torch_compile(tmp_path):
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_bitmask_plan(model, (x,)))
    with torch.no_grad():
        expected = pruned_model(model, cm.plan)(x)
        sparsec.save(cm, tmp_path / "m")
        assert output_error(sparsec.load(tmp_path / "m")(x), expected) <= 1e-5
        compiled = torch.compile(copy.deepcopy(cm), backend="aot_eager")
        assert output_error(compiled(x), expected) <= 1e-5 and output_error(compiled(x), expected) <= 1e-5
        assert output_error(cm(x), expected) <= 1e-5  # eagerly: builds the layouts
        warm = torch._dynamo.explain(cm)(x)
    assert warm.graph_break_count == 0 and "sparsec_bitmask.linear" in warm.graphs[0].code
    exported = torch.export.export(cm, (x,))
    assert "sparsec_bitmask" not in str(exported.graph)
    with torch.no_grad():
        assert output_error(exported.module()(x), expected) <= 1e-5


def test_auto_picks_the_kernel_where_it_measures_faster():
    """A 2:4 1024 x 1024 layer at one row: the kernel reads half the weight bytes (measured 2-3x dense
    here); whichever wins, the plan says what was measured, and the model equals the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8))
    x = torch.randn(1, 1024)
    cm = sparsec.compile(model, example_inputs=(x,))
    lp = cm.plan["2"]
    assert lp.backend in ("bitmask", "dense") and "backend auto at M=1: " in lp.reason
    if lp.backend == "bitmask":
        assert isinstance(cm.sparse_module("2"), BitmaskLinear) and "kernel up to" in lp.reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_an_edited_pattern_is_run_by_what_fits_it():
    """A plan whose sparsity was edited after auto chose the bitmask kernel (N:M only) for it: the
    backend is chosen again, and the plan says so; a CPU kernel named for a conv is refused."""
    model, (x,) = load_example("mlp").build_model()
    plan = _bitmask_plan(model, (x,))
    plan["fc2"].sparsity = "fanin:0.9"
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    assert cm.plan["fc2"].backend in ("condensed", "dense")
    assert "the given plan's backend 'bitmask' runs N:M layers only, not fanin:0.9: chosen again" in cm.plan["fc2"].reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    model, inputs = load_example("cnn").build_model()
    plan = sparsec.explain(model, example_inputs=inputs)
    conv = next(lp for lp in plan.sparse_layers if lp.op == "conv2d")
    conv.backend = "bitmask"
    with pytest.raises(ValueError, match=rf"backend 'bitmask' on layer '{conv.name}': it runs N:M linear layers only"):
        sparsec.compile(model, example_inputs=inputs, plan=plan)


def test_cpu_candidates_take_turns_so_a_slow_moment_falls_on_one_round(monkeypatch):
    """Another process slowing the first measurement (dense's, timed first) 50x: timed to the end one
    after the other, dense measured slow and auto picked a kernel 10% slower than dense; taking turns
    over CPU_ROUNDS rounds, the median leaves the slow moment out and dense is kept."""
    calls = []

    def drifting(fn, **kw):  # dense and the kernel take turns: even calls time dense, odd the kernel
        calls.append(kw)
        k = len(calls) - 1
        return 1e-5 * (50 if k == 0 else 1) if k % 2 == 0 else 1.1e-5

    monkeypatch.setattr(measure, "time_cpu", drifting)
    monkeypatch.setattr(backend_pass, "CPU_MEASUREMENTS", {})  # an earlier test may have measured this shape
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    cm = sparsec.compile(model, example_inputs=(torch.randn(2, 64),), min_weights=0, include=["2"])
    assert len(calls) == 2 * measure.CPU_ROUNDS and all(kw["blocks"] == measure.CPU_BLOCKS for kw in calls)
    assert cm.plan["2"].backend == "dense", cm.plan["2"].reason
    assert "dense 10.0 us, bitmask 11.0 us -> dense" in cm.plan["2"].reason


def test_rows_limit_probes_until_the_kernel_loses_or_the_budget_ends(monkeypatch):
    """cpu_rows_limit on stand-in timings: the last row count the kernel won at (against what its layer
    runs above the limit), never one it lost at."""
    def at(rows, above_rows=False):
        assert above_rows
        return {"above": ("above", rows), "bitmask": ("bitmask", rows)}

    def timings(crossover, per_row=1e-6):  # above: per_row * rows; the kernel 2x faster below crossover
        return lambda fn, **kw: per_row * fn[1] * (1.0 if fn[0] == "above" else 0.5 if fn[1] < crossover else 2.0)

    monkeypatch.setattr(measure, "time_cpu", timings(crossover=100))
    assert measure.cpu_rows_limit(at, "bitmask", 1, 1e-6)[0] == 64  # won at 4, 16, 64; lost at 256
    monkeypatch.setattr(measure, "time_cpu", timings(crossover=10**9, per_row=1e-4))
    limit, note = measure.cpu_rows_limit(at, "bitmask", 1, 1e-4)
    assert limit == 256 and "not probed further" in note  # a dense call at 1024 rows would take 0.1 s
    monkeypatch.setattr(measure, "time_cpu", timings(crossover=10**9, per_row=1e-12))
    assert measure.cpu_rows_limit(at, "bitmask", 1, 1e-12)[0] is None


def test_without_a_compiler_layers_run_plain_torch(run_without_compiler):
    """No C++ compiler: the kernel is unavailable, backend auto keeps N:M layers' pruned weights dense
    (saying why in the plan), the torch runtime still runs, and results equal dense math."""
    code = ("import torch, torch.nn as nn, sparsec; from sparsec.runtime import bitmask_cpu as bc\n"
            "assert not bc.is_available() and bc.isa() == 'torch'\n"
            "m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))\n"
            "x = torch.randn(3, 64)\n"
            "cm = sparsec.compile(m, example_inputs=(x,))\n"
            "lp = cm.plan['2']\n"
            "assert lp.backend == 'dense' and 'bitmask kernel could not be built or loaded here' in lp.reason, lp\n"
            "w = cm.effective_weight('2')\n"
            "assert torch.equal(w, sparsec.compile(m, example_inputs=(x,), backend='torch').effective_weight('2'))\n"
            "with torch.no_grad():\n"
            "    h = torch.relu(m[0](x)); ref = m[4](torch.relu(nn.functional.linear(h, w, m[2].bias)))\n"
            "    assert torch.allclose(cm(x), ref, atol=1e-5)\n"
            "weight = bc.prepare(w[w != 0].view(64, -1), w != 0)\n"
            "assert torch.allclose(bc.bitmask_linear(x, weight), x @ w.t(), atol=1e-5)\n"
            "assert torch.equal(bc.densify(weight), w)\n")
    run_without_compiler(code)


# ---- both CPU kernel layers (bitmask for N:M, condensed for constant fan-in) against the oracle

KERNEL_LAYERS = [("2:4", "bitmask"), ("fanin:0.75", "condensed"), ("unstructured:0.9", "csr")]


def _kernel_calls(backend: str):
    from sparsec.runtime import condensed_cpu, csr_linear

    return {"bitmask": bitmask_cpu, "condensed": condensed_cpu, "csr": csr_linear}[backend].calls


def _on_kernel(model, x, pattern, backend, **kw):
    """`model` compiled with every sparse layer on the CPU kernel `backend`, and the oracle's pruned copy."""
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), backend="torch", **kw)
    for lp in plan.sparse_layers:
        lp.backend = backend
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    assert cm.plan.sparse_layers and all(lp.backend == backend for lp in cm.plan.sparse_layers)
    return cm, pruned_model(model, cm.plan)


def _smooth_mlp():
    """tanh between the layers: second derivatives through them are not zero, as they are past a relu."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 4))
    return model, torch.randn(5, 64)


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_second_derivatives_equal_the_dense_pruned_model(pattern, backend):
    """A gradient penalty (the input gradient taken with create_graph, then its norm's backward) through
    kernel layers gives every parameter the gradient the dense pruned model gives. (The backward used
    to call torch.autograd.grad without create_graph: the penalty's gradient stopped at the kernel
    layers, leaving their biases' gradients None and the first layer's wrong.)"""
    model, x = _smooth_mlp()
    cm, ref = _on_kernel(model, x, pattern, backend, min_weights=0)
    _kernel_calls(backend).clear()
    for m in (cm, ref):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xr).pow(2).sum(), xr, create_graph=True)
        g.pow(2).sum().backward()
    assert _kernel_calls(backend)["fast"] == len(cm.plan.sparse_layers)  # the forward ran the kernels
    expected = dict(ref.named_parameters())
    for name, p in cm.named_parameters():
        want = expected[name.removeprefix("graph_module.")].grad
        assert p.grad is not None and output_error(p.grad, want) <= 1e-4, name


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_torch_func_transforms_see_the_reference(pattern, backend):
    """vmap, jacrev, jacfwd and grad over a model with kernel layers equal the same transforms of the
    dense pruned model (vmap refused the kernels' Function; jacrev through it gave a wrong Jacobian)."""
    model, x = _smooth_mlp()
    cm, ref = _on_kernel(model, x, pattern, backend, min_weights=0)
    transforms = {"vmap": lambda m: torch.func.vmap(m)(x),
                  "jacrev": lambda m: torch.func.jacrev(m)(x[0]),
                  "jacfwd": lambda m: torch.func.jacfwd(m)(x[0]),
                  "grad": lambda m: torch.func.grad(lambda v: m(v).pow(2).sum())(x)}
    for name, transform in transforms.items():
        assert output_error(transform(cm), transform(ref)) <= 1e-5, name
    with torch.no_grad():  # outside a transform the kernels still run
        _kernel_calls(backend).clear()
        cm(x)
        assert _kernel_calls(backend)["fast"] == len(cm.plan.sparse_layers)


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_torch_compile_fullgraph_in_grad_mode(pattern, backend):
    """In grad mode (biases require grad, so autograd wraps the kernel even for an input that does not)
    torch.compile(fullgraph=True) traces the kernel into one graph; its outputs and gradients equal
    the oracle's. (The backward called torch.autograd.grad, which TorchDynamo refuses to trace.)"""
    model, (x,) = load_example("mlp").build_model()
    cm, ref = _on_kernel(model, x, pattern, backend)
    op = {"bitmask": "sparsec_bitmask.linear", "condensed": "sparsec_condensed.linear_", "csr": "sparsec_csr.linear"}[backend]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(cm)(x)
    # (the kernel's autograd.Function is a higher-order op: its forward is a subgraph of the one graph)
    code = "".join(g.code for g in explained.graphs[0].modules() if isinstance(g, torch.fx.GraphModule))
    assert explained.graph_count == 1 and explained.graph_break_count == 0 and code.count(op) >= len(cm.plan.sparse_layers)
    compiled = torch.compile(cm, fullgraph=True, backend="aot_eager")
    assert output_error(compiled(x), ref(x)) <= 1e-5
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad = torch.randn(x.shape[0], 10)
    (compiled(xa) * grad).sum().backward()
    (ref(xb) * grad).sum().backward()
    assert output_error(xa.grad, xb.grad) <= 1e-5
    assert output_error(cm.sparse_module("fc2").bias.grad, ref.fc2.bias.grad) <= 1e-5


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_cpu_autocast_sets_the_dtype_as_for_nn_linear(pattern, backend):
    """Under torch.autocast("cpu", bfloat16) a float32 kernel layer given a float32 input (the model's
    input here; in a transformer, a LayerNorm's output, which autocast keeps float32) computes and
    returns bfloat16, as nn.Linear does (the kernels returned float32); a bfloat16 model under it
    still runs the kernels."""
    model, (x,) = load_example("mlp").build_model()
    cm, ref = _on_kernel(model, x, pattern, backend, include=["fc1"])  # the first layer sees x itself
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first, y, expected = cm.sparse_module("fc1")(x), cm(x), ref(x)
    assert first.dtype == y.dtype == expected.dtype == torch.bfloat16
    assert output_error(y.double(), expected.double()) <= 2e-2
    bf16 = copy.deepcopy(cm).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _kernel_calls(backend).clear()
        assert bf16(x.to(torch.bfloat16)).dtype == torch.bfloat16
        assert _kernel_calls(backend)["fast"] == len(cm.plan.sparse_layers)


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_inputs_without_in_features_features_are_refused(pattern, backend):
    """An input with more or fewer features than the layer's in_features raises, naming the layer, its
    in_features and the input's shape, on every path: the kernel (a condensed layer read only the
    columns its indices name and computed on), past the measured rows, with autograd, and the
    reference (another dtype)."""
    model, (x,) = load_example("mlp").build_model()
    cm, _ = _on_kernel(model, x, pattern, backend)
    layer = cm.sparse_module("fc2")  # 512 -> 512
    for features in (520, 500):
        bad = torch.randn(3, features)
        message = (rf"layer 'fc2' takes inputs with 512 features in the last dimension \(its in_features\), got an "
                   rf"input of shape \(3, {features}\)")
        for max_rows, xb in ((None, bad), (1, bad), (None, bad.requires_grad_(True)), (None, bad.double())):
            layer.launch = {"max_rows": max_rows}
            with pytest.raises(RuntimeError, match=message):
                layer(xb)


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_half_keeps_int8_scales_float32(pattern, backend):
    """.half() of an int8 model leaves the per-channel scales float32 (cast to float16 they moved every
    weight of their row): the effective weights are the float32 ones rounded once, and the outputs
    equal the oracle's within float16's rounding."""
    model, (x,) = load_example("mlp").build_model()
    cm, ref = _on_kernel(model, x, pattern, backend, quantize="int8")
    half = copy.deepcopy(cm).half()
    for lp in cm.plan.sparse_layers:
        assert half.sparse_module(lp.name).packed.scales.dtype == torch.float32
        assert torch.equal(half.effective_weight(lp.name), cm.effective_weight(lp.name).half())
    with torch.no_grad():
        _kernel_calls(backend).clear()
        y = half(x.half())
        assert y.dtype == torch.float16 and _kernel_calls(backend)["fast"] == len(cm.plan.sparse_layers)
        assert output_error(y.double(), ref(x).double()) <= 4e-3


FRESH_COMPILE = """
import sys, torch, sparsec
case, folder = sys.argv[1], sys.argv[2]
x, expected = torch.load(folder + "/x.pt"), torch.load(folder + "/y.pt")
if case == "load":
    cm = sparsec.load(folder + "/m.sparsec")
else:
    plan = sparsec.Plan.from_json(open(folder + "/plan.json").read())
    cm = sparsec.compile(torch.load(folder + "/model.pt", weights_only=False), example_inputs=(x,), plan=plan)
with torch.no_grad():
    y = torch.compile(cm, fullgraph=True, backend="aot_eager")(x)
assert float((y - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), case
"""


@pytest.mark.parametrize("case", ["load", "plan"])
def test_torch_compile_fullgraph_in_a_fresh_process(tmp_path, case):
    """A fresh process whose first use of the bitmask kernel is a loaded model (or one compiled from a
    plan, which measures nothing): the layout build loads the library, so torch.compile(fullgraph=True)
    finds the operator. (The library was loaded on the first call, inside TorchDynamo's trace, which
    then failed.)"""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(3, 64)
    cm, ref = _on_kernel(model, x, "2:4", "bitmask", min_weights=0)
    sparsec.save(cm, tmp_path / "m.sparsec")
    (tmp_path / "plan.json").write_text(cm.plan.to_json())
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(ref(x), tmp_path / "y.pt")
    subprocess.run([sys.executable, "-c", FRESH_COMPILE, case, str(tmp_path)], check=True, timeout=300)


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS)
def test_plan_bytes_count_what_the_kernel_layers_hold(pattern, backend):
    """A compiled model's plan counts each kernel layer's memory: the stored form plus the layout its
    kernel built (condensed: a sorted float32 copy, int16 indices and on AVX-512 the segment layout,
    which made it 3x the 8 bytes per kept weight the plan said; bitmask: one bit word per 16 columns,
    its values shared). A compiled model compiled again names the packed layers' runtime."""
    model, (x,) = load_example("mlp").build_model()
    cm, _ = _on_kernel(model, x, pattern, backend)
    for lp in cm.plan.sparse_layers:
        module = cm.sparse_module(lp.name)
        packed, layout = module.packed, module._derived["layout"]
        if backend == "condensed":
            held = [packed.values, packed.indices, *layout.rows, *layout.seg]
        elif backend == "csr":  # int32 row pointers of its own; values and int32 columns shared
            crow, col, values, weight = layout
            assert weight.values().data_ptr() == values.data_ptr()  # the sparse tensor views the arrays
            assert values.data_ptr() == packed.values.data_ptr() and col.data_ptr() == packed.col_indices.data_ptr()
            held = [packed.values, packed.col_indices, packed.crow_indices, crow]
        else:
            assert layout.values.data_ptr() == packed.values.data_ptr()  # shared, counted once
            held = [packed.values, packed.meta, layout.masks]
        assert lp.runtime_bytes == sum(t.numel() * t.element_size() for t in held) > lp.stored_bytes()
    dense = [lp for lp in cm.plan if not lp.sparsity]
    assert cm.plan.totals()["bytes_after"] == (sum(lp.runtime_bytes for lp in cm.plan.sparse_layers)
                                               + sum(lp.dense_bytes() for lp in dense))
    reread = sparsec.Plan.from_json(cm.plan.to_json())
    assert [lp.runtime_bytes for lp in reread] == [lp.runtime_bytes for lp in cm.plan]
    assert sparsec.explain(model, pattern=pattern, example_inputs=(x,))["fc2"].runtime_bytes is None
    again = sparsec.compile(cm, example_inputs=(x,))
    for lp in cm.plan.sparse_layers:
        assert again.plan[lp.name].backend == backend and again.plan[lp.name].runtime_bytes == lp.runtime_bytes


@pytest.mark.parametrize("pattern, backend", KERNEL_LAYERS[:2])  # (csr runs float64 layers too)
def test_a_plan_naming_a_kernel_for_a_float64_layer_is_refused(pattern, backend):
    """The C++ kernels run float32 / bfloat16 / float16 layers: a plan asking for one on a float64 model
    is refused, naming the dtype (it was accepted and ran the torch reference as if it were the kernel)."""
    model, (x,) = load_example("mlp").build_model()
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), backend="torch")
    for lp in plan.sparse_layers:
        lp.backend = backend
    with pytest.raises(ValueError, match=rf"the given plan asks for backend '{backend}' on layer 'fc2', but the {backend} "
                                         r"CPU kernel runs float32 / bfloat16 / float16 layers \(this one is float64\)"):
        sparsec.compile(copy.deepcopy(model).double(), example_inputs=(x.double(),), plan=plan)


def test_a_built_kernel_library_is_readable_by_the_other_users_of_a_shared_extension_folder(tmp_path):
    """mkstemp's 0600 (the linker kept it as 0711) left the library unloadable by the other users of a
    shared TORCH_EXTENSIONS_DIR, who then fell back to plain torch without a word."""
    import stat
    import subprocess
    import sys

    # (the stand-in compiler copies into the file mkstemp made, keeping its mode, as the linker does)
    env = dict(os.environ, CXX=str(_stand_in_compiler(tmp_path)), TORCH_EXTENSIONS_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", "from sparsec.runtime.cpp_build import build_and_load; "
                    "build_and_load('bitmask.cpp')"], env=env, check=True, timeout=300)
    (lib,) = (tmp_path / "sparsec").glob("bitmask_*.so")
    mode = stat.S_IMODE(lib.stat().st_mode)
    assert mode & 0o044 == 0o044 and mode & 0o111 == 0o111, oct(mode)


# ---- the build (runtime/cpp_build.py), with a stand-in compiler that copies the library this process
# built, so no test compiles (~10-40 s a build here)

BUILD_AND_RUN = """
import sys, torch, torch.nn.functional as F
from sparsec.runtime import bitmask_cpu as bc, cpp_build
assert bc.is_available(), "the kernel did not load"
mask = torch.tensor([[True, False] * 8] * 3)
w = torch.randn(3, 16) * mask
x = torch.randn(2, 16)
assert torch.allclose(bc.bitmask_linear(x, bc.prepare(w[mask].view(3, 8), mask)), F.linear(x, w), atol=1e-5)
assert bc.calls["fast"] == 1
print(cpp_build.library_path("bitmask.cpp"))
"""


def _stand_in_compiler(tmp_path):
    """A script that 'compiles' by copying this process's bitmask library to the -o path, logging each call."""
    from sparsec.runtime import cpp_build

    built = cpp_build.library_path("bitmask.cpp")
    assert os.path.exists(built)
    script = tmp_path / "stand-in cxx"  # (a space in its path: $CXX is split into words, then quoted)
    script.write_text('#!/bin/sh\necho run >> "$0.log"\n'
                      f'while [ $# -gt 0 ]; do [ "$1" = -o ] && exec cp "{built}" "$2"; shift; done\nexit 1\n')
    script.chmod(0o755)
    return script


def _run(code, env):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cxx_with_a_launcher_or_options_builds(tmp_path):
    """$CXX as make and CMake take it, a command with words ("ccache g++", "g++ -m64"): it was looked up
    whole on PATH ("no C++ compiler 'ccache g++'"), and every layer ran plain torch."""
    import shlex

    script = _stand_in_compiler(tmp_path)
    cxx = f"env {shlex.quote(str(script))} -O2"
    _run(BUILD_AND_RUN, dict(os.environ, CXX=cxx, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    assert (tmp_path / "stand-in cxx.log").read_text() == "run\n"


def test_a_library_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    """A damaged library in the extension folder (truncated by a full disk, an interrupted copy): dlopen
    refused it and every later process ran plain torch until someone deleted the file; it is built again
    (once) and replaces it."""
    from sparsec.runtime import cpp_build

    script = _stand_in_compiler(tmp_path)
    env = dict(os.environ, CXX=str(script), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    for name in ("CXX", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.setenv(name, env[name])
    lib = cpp_build.library_path("bitmask.cpp")  # (where the process below looks)
    os.makedirs(os.path.dirname(lib))
    with open(lib, "wb") as f:
        f.write(b"\x7fELF truncated")
    proc = _run(BUILD_AND_RUN, env)
    assert proc.stdout.strip() == lib and "does not load" in proc.stderr and "building it again" in proc.stderr
    assert (tmp_path / "stand-in cxx.log").read_text() == "run\n" and os.path.getsize(lib) > 1000


def test_threads_making_their_first_call_together_share_one_build(monkeypatch):
    """A thread whose first call came while another thread was building the library was told
    "unavailable" (None): its condensed layers' layouts were prepared without the kernel and ran plain
    torch for good. It now waits for the one build and gets the operators."""
    import threading

    from sparsec.runtime import cpp_build

    building, release, builds = threading.Event(), threading.Event(), []

    def slow_build(filename):
        builds.append(filename)
        building.set()
        release.wait(10)

    monkeypatch.setattr(cpp_build, "build_and_load", slow_build)
    kernels = cpp_build.CppKernels("bitmask.cpp", "sparsec_bitmask", lambda: None, "test kernels")
    results = []
    first = threading.Thread(target=lambda: results.append(kernels.op()))
    second = threading.Thread(target=lambda: results.append(kernels.op()))
    first.start()
    assert building.wait(10)
    second.start()
    second.join(0.2)  # the second thread has asked while the first builds
    release.set()
    first.join(10)
    second.join(10)
    assert builds == ["bitmask.cpp"] and len(results) == 2
    assert all(r is not None and r.linear is torch.ops.sparsec_bitmask.linear for r in results)
