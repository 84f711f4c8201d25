"""Serving a compiled model on CPU: several threads calling it at once, compiles in other threads, and
the CPU kernels' numerics on awkward inputs, each against plain torch on the pruned weight."""
import inspect
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sparsec
from oracle import oracle_nm_mask, pruned_model
from sparsec.runtime import bitmask_cpu, condensed_cpu
from sparsec.shape_cache import remember


def _mlp(width: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2 * width), nn.ReLU(),
                         nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 4))


class _Gated(nn.Module):
    """An MLP whose forward, while torch.fx traces it (x is a Proxy), calls `on_trace` first: a test
    runs other threads' work exactly while fx's process-wide patches are in place."""

    def __init__(self, on_trace):
        super().__init__()
        self.body, self.on_trace = _mlp(), on_trace

    def forward(self, x):
        if isinstance(x, fx.Proxy):
            self.on_trace()
        return self.body(x)


def _errors(fn) -> list:
    try:
        fn()
        return []
    except Exception as e:  # noqa: BLE001 - the test reports what another thread raised
        return [repr(e)]


def test_other_threads_run_models_while_one_compiles():
    """fx's symbolic_trace patches nn.Module.__call__ for the whole process while it runs: a server's
    threads calling a compiled model while another thread compiled one got NameError ("module is not
    installed as a submodule") from the tracer."""
    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(3, 64)
    served = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="torch")
    expected = pruned_model(model, served.plan)(x)
    results, errors = [], []

    def serve_now():  # runs in another thread while the compile below traces
        def call():
            with torch.no_grad():
                results.append(served(x))
        worker = threading.Thread(target=lambda: errors.extend(_errors(call)))
        worker.start()
        worker.join(30)

    cm = sparsec.compile(_Gated(serve_now), pattern="2:4", example_inputs=(x,), backend="torch")
    assert not errors and results  # (one call per trace: a compile may trace more than once)
    assert all(torch.allclose(y, expected, atol=1e-5) for y in results)
    assert cm.plan.sparse_layers


def test_two_compiles_at_once_both_hold_and_leave_torch_unpatched():
    """Two traces at once: each took the other's patch of nn.Module.__call__ (and of
    torch.autograd.Function.apply) for the original, so the one finishing first broke the other's trace,
    and the last one could leave a patch installed for good (every module call of the process then went
    through a finished tracer). They take turns now."""
    original_call, original_apply = nn.Module.__call__, inspect.getattr_static(torch.autograd.Function, "apply")
    second_tracing, first_done, outcome = threading.Event(), threading.Event(), {}

    def compile_second():
        def on_trace():
            second_tracing.set()
            first_done.wait(5)  # (taking turns, the first compile is done before this one traces)
        outcome["second"] = _errors(lambda: outcome.setdefault(
            "second_cm", sparsec.compile(_Gated(on_trace), pattern="2:4", example_inputs=(torch.randn(3, 64),),
                                         backend="torch")))

    second = threading.Thread(target=compile_second)

    def start_second():  # the first compile, while it traces, lets the second one start (and trace, unless
        if second.ident is None:  # they take turns); once: it may trace again
            second.start()
        second_tracing.wait(1)

    first = _Gated(start_second)
    try:
        cm = sparsec.compile(first, pattern="2:4", example_inputs=(torch.randn(3, 64),), backend="torch")
    finally:
        first_done.set()
        second.join(60)
    assert outcome["second"] == []
    assert cm.plan.sparse_layers and outcome["second_cm"].plan.sparse_layers
    assert nn.Module.__call__ is original_call
    assert inspect.getattr_static(torch.autograd.Function, "apply") is original_apply  # (sparsec's trace notes patch it)
    assert nn.Linear(2, 2)(torch.randn(1, 2)).shape == (1, 2)


def test_shape_caches_filled_by_many_threads_at_once_stay_bounded():
    """Threads serving one model add new row counts to its bounded shape caches at once: two evicting
    the same oldest shape raised KeyError (and iterating the cache while another thread added to it can
    raise "dictionary changed size during iteration")."""
    cache, errors, limit = {"spec": "not a shape"}, [], 32

    def fill(thread):
        for i in range(2000):
            try:
                remember(cache, ("call", thread, i), i, limit=limit, counts=lambda key: key[0] == "call")
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch inside the eviction often, as a busy server's do now and then
    try:
        threads = [threading.Thread(target=fill, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert cache["spec"] == "not a shape" and len(cache) - 1 <= limit + len(threads)


def _on_kernel(model, x, pattern, backend, quantize=None, max_rows=None):
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), backend="torch", quantize=quantize)
    for lp in plan.sparse_layers:
        lp.backend, lp.launch = backend, {"max_rows": max_rows}
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    assert cm.plan.sparse_layers and all(lp.backend == backend for lp in cm.plan.sparse_layers)
    return cm, pruned_model(model, cm.plan).double()


@pytest.mark.parametrize("pattern, backend, quantize", [("2:4", "bitmask", None), ("2:4", "bitmask", "int8"),
                                                        ("fanin:0.9", "condensed", None)])
def test_threads_calling_one_model_with_new_shapes_get_the_pruned_models_outputs(pattern, backend, quantize):
    """A thread pool calls one compiled model with 3-D inputs of new shapes (some past the kernel's
    max_rows: the dense path), under no_grad and inference_mode, while the thread count changes: every
    result equals the pruned model's in float64."""
    torch.manual_seed(0)
    model = _mlp(96)
    cm, expected = _on_kernel(model, torch.randn(2, 5, 96), pattern, backend, quantize, max_rows=24)
    threads_before = torch.get_num_threads()

    def serve(worker):
        rng, wrong = random.Random(worker), []
        for call in range(12):
            x = torch.randn(rng.randint(0, 4), rng.randint(1, 12), 96)
            torch.set_num_threads(1 + call % 2)
            with torch.inference_mode() if call % 2 else torch.no_grad():
                y = cm(x)
            ref = expected(x.double())
            if y.shape != ref.shape or (ref.numel() and not (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()):
                wrong.append(tuple(x.shape))
        return wrong

    try:
        with ThreadPoolExecutor(4) as pool:
            wrong = [shape for shapes in pool.map(serve, range(8)) for shape in shapes]
    finally:
        torch.set_num_threads(threads_before)
    assert wrong == []


ISAS = ["scalar", "best"]


@pytest.mark.skipif(not (bitmask_cpu.is_available() and condensed_cpu.is_available()), reason="no C++ kernels here")
@pytest.mark.parametrize("pattern, backend, dtype, tol", [("2:4", "bitmask", torch.float32, 1e-5),
                                                          ("2:4", "bitmask", torch.bfloat16, 1e-2),
                                                          ("fanin:0.75", "condensed", torch.float16, 2e-3)])
def test_kernel_layers_take_any_input_layout(pattern, backend, dtype, tol):
    """Transposed, strided, offset, expanded (stride 0) and channels-last inputs, K not a multiple of 16
    and N = 1, batch 0 / 1 / odd / past max_rows, both ISAs: F.linear in float64 on the layer's weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 1)).to(dtype)
    x0 = torch.randn(3, 20, dtype=dtype)
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x0,), backend="torch", include=["1"])
    plan["1"].backend, plan["1"].launch = backend, {"max_rows": 5}
    cm = sparsec.compile(model, example_inputs=(x0,), plan=plan)
    layer = cm.sparse_module("1")
    weight, bias = cm.effective_weight("1").double(), layer.bias.double()
    image = torch.randn(2, 3, 4, 20, dtype=dtype)
    inputs = [torch.randn(0, 20, dtype=dtype), torch.randn(20, dtype=dtype), torch.randn(20, 7, dtype=dtype).t(),
              torch.randn(9, 60, dtype=dtype)[:, 1::3], torch.randn(201, dtype=dtype)[1:].view(10, 20),
              torch.randn(1, 20, dtype=dtype).expand(4, 20), image.permute(0, 3, 1, 2).contiguous(
                  memory_format=torch.channels_last).permute(0, 2, 3, 1)]
    try:
        for isa in ISAS:
            bitmask_cpu.set_isa(isa)
            condensed_cpu.set_isa(isa)
            for x in inputs:
                with torch.no_grad():
                    y = layer(x)
                ref = torch.nn.functional.linear(x.double(), weight, bias)
                assert y.dtype == dtype and y.shape == ref.shape
                assert not ref.numel() or (y.double() - ref).abs().max() <= tol * ref.abs().max(), (
                    isa, x.shape, x.stride())
    finally:
        bitmask_cpu.set_isa("best")
        condensed_cpu.set_isa("best")


@pytest.mark.skipif(not (bitmask_cpu.is_available() and condensed_cpu.is_available()), reason="no C++ kernels here")
def test_non_finite_inputs_as_documented_on_every_isa_and_layout():
    """README: the bitmask kernel gives what F.linear gives on the masked weight (inf * a pruned 0 = NaN);
    the condensed kernel skips pruned weights, so a NaN / inf feature reaches only the outputs that keep
    it. Both hold on every ISA, and for condensed on its small-batch (seg) and large-batch layouts."""
    torch.manual_seed(0)
    out, k = 24, 48
    w = torch.randn(out, k)
    mask = oracle_nm_mask(w, 2, 4)
    idx = w.abs().topk(6, 1).indices.sort(1).values
    fanin = torch.zeros(out, k).scatter_(1, idx, w.gather(1, idx))
    try:
        for isa in ["scalar", "avx2", "best"]:
            condensed_cpu.set_isa(isa)
            bitmask_cpu.set_isa("scalar" if isa == "scalar" else "best")
            nm, cond = bitmask_cpu.prepare(w[mask].view(out, -1), mask), condensed_cpu.prepare(w.gather(1, idx), idx)
            for batch in (1, 3, 8, 40):
                x = torch.randn(batch, k)
                x[:, 5], x[0, 9], x[-1, 30] = float("nan"), float("inf"), -0.0
                dense = torch.nn.functional.linear(x.double(), (w * mask).double())
                assert torch.equal(torch.isnan(bitmask_cpu.bitmask_linear(x, nm)), torch.isnan(dense))
                y = condensed_cpu.condensed_linear(x, cond)
                kept_only = torch.nan_to_num(x, nan=0.0, posinf=0.0).double() @ fanin.double().t()
                reads_inf = fanin[:, 9] != 0
                kept_only[0, reads_inf] = torch.where(fanin[reads_inf, 9] > 0, 1.0, -1.0).double() * float("inf")
                kept_only[:, fanin[:, 5] != 0] = float("nan")  # (a NaN beats the inf where a row reads both)
                assert torch.equal(torch.isnan(y), torch.isnan(kept_only))
                assert torch.equal(torch.isinf(y), torch.isinf(kept_only))
                finite = torch.isfinite(kept_only)
                assert torch.allclose(y.double()[finite], kept_only[finite], atol=1e-5)
    finally:
        bitmask_cpu.set_isa("best")
        condensed_cpu.set_isa("best")
