"""DirectLaunch: a kernel's later calls skip the JIT's bookkeeping, never at the price of running a
kernel compiled for arguments that specialize differently."""
import os

import pytest
import torch

import sparsec.codegen.direct_launch as direct
from sparsec.codegen.direct_launch import DirectLaunch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Param:
    def __init__(self, name, is_constexpr=False):
        self.name, self.is_constexpr = name, is_constexpr


class FakeJit:
    """Triton's contract as DirectLaunch relies on it: `fn[grid](...)` compiles (once per
    specialization) and launches, returning the compiled kernel; `compiled[grid](*every parameter)`
    launches it again."""

    def __init__(self, interpreted=False):
        self.params = [Param("x_ptr"), Param("n"), Param("BLOCK", is_constexpr=True)]
        self.interpreted = interpreted
        self.jit_calls, self.direct_calls = [], []

    def run(self):  # what launch_passes_every_parameter reads: this JIT's launch convention
        return "kernel.run(..., *bound_args.values())"

    def __getitem__(self, grid):
        def jit_launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return None if self.interpreted else Compiled(self)
        return jit_launch


class Compiled:
    function = object()

    def __init__(self, jit):
        self.jit = jit

    def __getitem__(self, grid):
        return lambda *args: self.jit.direct_calls.append((grid, args))


def test_later_calls_launch_the_compiled_kernel_with_every_parameter_in_order():
    jit = FakeJit()
    launch = DirectLaunch(jit)
    x = torch.zeros(64)
    for _ in range(3):
        launch[(4, 2)](x, 32, BLOCK=16, num_warps=4)
    assert len(jit.jit_calls) == 1 and launch.direct_launches == 2
    assert jit.direct_calls == [((4, 2, 1), (x, 32, 16))] * 2  # grid made 3-D, constexpr in its place, options left out


@pytest.mark.parametrize("change", ["alignment", "dtype", "int divisible by 16", "constexpr", "grid", "option"])
def test_a_call_that_specializes_differently_goes_through_the_jit(change):
    jit = FakeJit()
    launch = DirectLaunch(jit)
    x = torch.zeros(64)
    launch[(4,)](x, 32, BLOCK=16, num_warps=4)
    other = {"alignment": ((4,), (x[1:], 32), dict(BLOCK=16, num_warps=4)),
             "dtype": ((4,), (x.double(), 32), dict(BLOCK=16, num_warps=4)),
             "int divisible by 16": ((4,), (x, 33), dict(BLOCK=16, num_warps=4)),
             "constexpr": ((4,), (x, 32), dict(BLOCK=32, num_warps=4)),
             "grid": ((8,), (x, 32), dict(BLOCK=16, num_warps=4)),
             "option": ((4,), (x, 32), dict(BLOCK=16, num_warps=8))}[change]
    grid, args, kwargs = other
    launch[grid](*args, **kwargs)
    assert len(jit.jit_calls) == 2 and launch.direct_launches == 0
    launch[grid](*args, **kwargs)  # ... and has its own entry from then on
    assert len(jit.jit_calls) == 2 and launch.direct_launches == 1


def test_jit_only_stops_direct_launches():
    jit = FakeJit()
    launch = DirectLaunch(jit)
    for _ in range(2):
        launch[(1,)](torch.zeros(4), 4, BLOCK=16)
    launch.jit_only()
    for _ in range(2):
        launch[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert len(jit.jit_calls) == 3 and launch.direct_launches == 1


def test_without_a_compiled_kernel_every_call_goes_through_the_jit():
    jit = FakeJit(interpreted=True)  # the interpreter's launch returns no compiled kernel
    launch = DirectLaunch(jit)
    for _ in range(3):
        launch[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert len(jit.jit_calls) == 3 and launch.direct_launches == 0


def test_a_jit_of_unknown_convention_is_never_launched_directly(monkeypatch):
    monkeypatch.setattr(direct, "launch_passes_every_parameter", lambda run: None)
    jit = FakeJit()
    launch = DirectLaunch(jit)
    for _ in range(2):
        launch[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert len(jit.jit_calls) == 2 and not jit.direct_calls


def test_the_installed_triton_launches_with_a_convention_this_module_knows():
    """If a Triton release changes how JITFunction.run passes arguments to the compiled kernel,
    this fails (and DirectLaunch would quietly stop skipping the JIT) instead of guessing."""
    from triton.runtime.jit import JITFunction

    assert direct.launch_passes_every_parameter(JITFunction.run) is not None


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter")
def test_direct_launches_compute_what_the_jit_launch_computes(monkeypatch):
    """The first call of a shape goes through the JIT, later ones (on a GPU) through the kept kernel:
    each on fresh inputs, into a NaN-poisoned output, against the plain-torch product."""
    from oracle import kernel_operands_24

    from sparsec.codegen import launch
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.spec import MatmulSpec

    monkeypatch.setattr(launch, "_LOADED", {})  # (a fresh kernel: its launch count is this test's)
    monkeypatch.setattr(launch, "_LAUNCHES", {})
    spec = MatmulSpec("float16", "float16", True, "relu", False, "float16")
    name, source = emit_matmul(spec, [])
    torch.manual_seed(0)
    for call in range(3):
        x = torch.randn(5, 64, device=DEVICE).half()
        values, meta, _, pruned = kernel_operands_24(torch.randn(48, 64), int8=False)
        bias = torch.randn(48, device=DEVICE).half()
        out = torch.full((5, 48), float("nan"), dtype=torch.float16, device=DEVICE)
        y = launch.sparse24_matmul(x, values.half().to(DEVICE), meta.to(DEVICE), None, bias, None, spec, name, source,
                                   out=out)
        expected = torch.relu(x.double() @ pruned.half().double().t().to(DEVICE) + bias.double())
        assert not y.isnan().any() and torch.allclose(y.double(), expected, rtol=2e-3, atol=2e-3), call
    kernel = launch.loaded_kernel(name, source, None, x.device)  # (cuda:0, as the launches saw it)
    assert kernel.direct_launches == (2 if DEVICE == "cuda" else 0)


def _span(t: torch.Tensor) -> int:
    """1 + the largest element offset into t: what a kernel indexing it from its data pointer reaches."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("kind", ["2:4 matmul", "fan-in matmul", "2:4 conv"])
def test_operands_past_int32_offsets_are_launched_in_blocks_that_fit(monkeypatch, kind):
    """The kernels compute offsets in int32: x or y past 2^31 elements (an output of M x N >= 2^31, as a
    128k-word vocabulary head at 17k rows gives) wrapped negative and crashed (or wrote elsewhere).
    With the limit set to 300 elements here, every launch must pass operands spanning at most that
    many, and the blocks together compute the whole product."""
    from oracle import kernel_operands_24, output_error

    import torch.nn.functional as F

    from sparsec import reference as ref
    from sparsec.codegen import launch
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.spec import MatmulSpec

    monkeypatch.setattr(launch, "MAX_OFFSET", 300)
    spans = []
    jit_launch = DirectLaunch.launch

    def spy(self, grid, args, kwargs):
        spans.append(max(_span(a) for a in args if isinstance(a, torch.Tensor)))
        return jit_launch(self, grid, args, kwargs)

    monkeypatch.setattr(DirectLaunch, "launch", spy)
    torch.manual_seed(0)
    if kind == "2:4 conv":
        spec = MatmulSpec("float32", "float32", True, None, False, "float32", layout="conv2d")
        w, x, bias = torch.randn(8, 4, 3, 3), torch.randn(5, 4, 5, 5, device=DEVICE), torch.randn(8, device=DEVICE)
        values, meta, _, pruned = kernel_operands_24(w.reshape(8, -1), int8=False)
        y = launch.sparse24_conv2d(x, values.to(DEVICE), meta.to(DEVICE), None, bias, None, spec,
                                   *emit_matmul(spec, []), launch.ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)))
        expected = F.conv2d(x, pruned.reshape(w.shape).to(DEVICE), bias, padding=1)  # x: 500 elements, y: 1000
    else:
        x, w, bias = torch.randn(13, 32, device=DEVICE), torch.randn(8, 32), torch.randn(8, device=DEVICE)
        if kind == "2:4 matmul":
            spec = MatmulSpec("float32", "float32", True, None, False, "float32")
            values, meta, _, pruned = kernel_operands_24(w, int8=False)
            y = launch.sparse24_matmul(x, values.to(DEVICE), meta.to(DEVICE), None, bias, None, spec,
                                       *emit_matmul(spec, []))
        else:
            spec = MatmulSpec("float32", "float32", True, None, False, "float32", format="fanin")
            mask = torch.zeros(8, 32, dtype=torch.bool)
            mask[:, 1::4] = True
            values, indices = ref.fanin_compress(w, mask)
            pruned = w * mask
            y = launch.condensed_matmul(x, values.to(DEVICE), indices.int().to(DEVICE), None, bias, None, spec,
                                        *emit_matmul(spec, []))
        expected = F.linear(x, pruned.to(DEVICE), bias)  # x: 416 elements
    assert len(spans) > 1 and max(spans) <= 300, spans
    assert output_error(y, expected) <= 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter's limitation")
def test_interpreted_kernels_can_be_launched_from_several_threads():
    """Each interpreted launch patches triton.language for its run: two threads launching at once
    failed ("Did you forget to add @triton.jit?") until interpreted launches took turns."""
    import threading

    from oracle import kernel_operands_24, output_error

    from sparsec.codegen import launch
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.spec import MatmulSpec

    spec = MatmulSpec("float32", "float32", False, "relu", False, "float32")
    name, source = emit_matmul(spec, [])
    values, meta, _, pruned = kernel_operands_24(torch.randn(16, 32), int8=False)
    failures = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(4):
            x = torch.randn(3, 32, generator=g)
            try:
                y = launch.sparse24_matmul(x, values, meta, None, None, None, spec, name, source)
                if output_error(y, torch.relu(x @ pruned.t())) > 1e-5:
                    failures.append("wrong numbers")
            except Exception as e:  # noqa: BLE001 (collected, asserted below)
                failures.append(repr(e)[:200])

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter")
def test_per_shape_launch_caches_stay_bounded(monkeypatch):
    """A server calls a layer at a new row count with every prompt length: the layer's bound calls and
    the process-wide launch and config tables keep at most SHAPES_KEPT / SHARED_SHAPES_KEPT row counts,
    and a row count dropped from them computes the right thing when it comes back."""
    import torch.nn as nn
    from oracle import output_error, pruned_model

    import sparsec
    import sparsec.shape_cache
    from sparsec.codegen import launch
    from sparsec.runtime.triton_linear import TritonSparseLinear

    monkeypatch.setattr(sparsec.shape_cache, "SHAPES_KEPT", 3)
    monkeypatch.setattr(sparsec.shape_cache, "SHARED_SHAPES_KEPT", 3)
    monkeypatch.setattr(launch, "_LAUNCHES", {})
    monkeypatch.setattr(launch, "_CONFIGS", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).to(DEVICE)
    cm = sparsec.compile(model, example_inputs=(torch.randn(2, 16, device=DEVICE),), backend="triton",
                         include=["2"])
    reference = pruned_model(model, cm.plan)
    layer = next(m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear))
    for rows in [1, 2, 3, 4, 5, 6, 1]:
        x = torch.randn(rows, 16, device=DEVICE)
        assert output_error(cm(x), reference(x)) < 1e-5, rows
        calls = [key for key in layer._derived if isinstance(key, tuple) and key[0] == "call"]
        assert len(calls) <= 3 and len(launch._LAUNCHES) <= 3 and len(launch._CONFIGS) <= 3
    assert ("call", 1, 16, x.device) in layer._derived  # (row count 1 came back: worked out again)
    assert "spec" in layer._derived  # what is derived once per layer is not dropped for shapes


def test_a_kernel_launches_on_its_operands_device(monkeypatch):
    """Triton launches on the current CUDA device: a kernel whose operands are on cuda:1 switches to
    it for the launch (as torch ops do) and back after; one whose device is current, or unknown
    (None), launches as is."""
    import contextlib

    current = [0]

    @contextlib.contextmanager
    def on(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", on)
    seen = []

    class Seen(list):  # (the device each launch, through the JIT or direct, ran on)
        def append(self, item):
            seen.append(current[0])
            super().append(item)

    class Recording(FakeJit):
        def __init__(self):
            super().__init__()
            self.jit_calls, self.direct_calls = Seen(), Seen()

    for index, expected in [(1, 1), (0, 0), (None, 0)]:
        seen.clear()
        jit = Recording()
        launch = DirectLaunch(jit, device_index=index)
        for _ in range(2):
            launch[(1,)](torch.zeros(4), 4, BLOCK=16)
        assert len(jit.jit_calls) == len(jit.direct_calls) == 1  # (the JIT launch, then the direct one)
        assert seen == [expected, expected] and current[0] == 0


def test_kept_kernels_are_bounded_by_shape(monkeypatch):
    """The direct-launch key holds integer arguments (the row count): one entry per row count, at
    most SHAPES_KEPT of them; a dropped one goes through the JIT again when it comes back."""
    import sparsec.shape_cache

    monkeypatch.setattr(sparsec.shape_cache, "SHAPES_KEPT", 2)
    jit = FakeJit()
    launch = DirectLaunch(jit)
    for rows in [1, 2, 3, 4, 1]:
        launch[(1,)](torch.zeros(4), rows, BLOCK=16)
        assert len(launch._runners) <= 2
    assert len(jit.jit_calls) == 5 and launch.direct_launches == 0
