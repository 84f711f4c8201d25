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
