"""Host time per call of a compiled 2:4 Triton layer at one row, next to nn.Linear in the same run.

At batch 1 a layer's GPU work takes microseconds, so the Python on the way to the launch decides
what an eager caller waits. This measures it under torch.no_grad(), calls back to back with no
synchronization inside the timed loop (the GPU only has to keep up):
  * GPU: the real launches; the host time per call of the sparsec layer, the compiled model (its
    fx GraphModule around the layer) and nn.Linear (cuBLAS). Where the host is slower than the
    GPU, this time is the layer's eager latency.
  * CPU: Triton's JIT and compiled kernel replaced by no-ops behind sparsec's DirectLaunch (the
    interpreter would time numpy), so the figure is sparsec's own per-call Python: checks, config
    lookup, output allocation, the direct launch's specialization key and argument packing.
    nn.Linear's figure includes its (small) CPU matmul.
The layer's output is checked against plain torch first. Medians of 7 blocks; writes
call-overhead-<device>-<date>.json.

    python bench/bench_call_overhead.py [--features N]
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# Without CUDA the kernel is compiled for the interpreter (its launch is stubbed below). Set before anything
# imports triton, which reads it then: results_io imports sparsec, and set in main() it came too late
# ("Cannot call @triton.jit'd outside of the scope of a kernel").
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from results_io import arg_parser, parse_args, positive_int, write_results  # noqa: E402


def per_call_us(fn, calls: int, blocks: int = 7) -> float:
    for _ in range(min(calls, 200)):
        fn()
    times = []
    for _ in range(blocks):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


class _Param:
    def __init__(self, name: str, is_constexpr: bool):
        self.name, self.is_constexpr = name, is_constexpr


class _CompiledStub:
    """A compiled kernel whose launch does nothing."""
    function = None

    def __getitem__(self, grid):
        return lambda *args: None


class _JitStub:
    """Triton's JIT function as sparsec's DirectLaunch calls it (the 2:4 matmul kernel's parameters, the
    launch convention of triton >= 3.0), compiling and launching nothing: so the CPU figure includes
    DirectLaunch's per-call Python, as a GPU launch does."""

    def __init__(self, signature: dict[str, str]):
        self.params = [_Param(name, kind == "constexpr") for name, kind in signature.items()]

    def run(self):  # (what DirectLaunch reads to learn the launch convention)
        return "kernel.run(..., *bound_args.values())"

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _CompiledStub()


def where_the_time_goes(fn, calls: int, top: int = 15) -> list[dict]:
    """The functions fn() spends its host time in: cProfile's own time per call, largest first. (On the H100
    host the layer took 2x nn.Linear's host time per call while on a CPU, with the launch stubbed, they
    were level: what differs is on the CUDA path.)"""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [{"function": f"{os.path.basename(file)}:{line} {func}", "calls_per_call": n / calls,
             "own_us": own / calls * 1e6} for (file, line, func), (n, _, own, _, _) in rows]


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--features", type=positive_int, default=None,
                        help="in = out features of the layer (default 4096 on a GPU, 256 on a CPU, where nn.Linear "
                             "computes on the host)")
    parser.add_argument("--calls", type=positive_int, default=2000, help="calls per timed block")
    args = parse_args(parser)
    cuda = torch.cuda.is_available()
    import sparsec
    from sparsec.codegen import launch
    from sparsec.runtime.triton_linear import TritonSparseLinear

    device = "cuda" if cuda else "cpu"
    d = args.features or (4096 if cuda else 256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d)).half().to(device).eval()
    x = torch.randn(1, d, dtype=torch.float16, device=device)
    options = dict(example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    with torch.no_grad():  # the layer computes the right thing; on a CPU in the interpreter, on a compile of its own
        checked = sparsec.compile(model, **options)  # (a layer keeps the launcher of its first call: not the stub's)
        expected = F.linear(x.double(), checked.effective_weight("0").double(), model[0].bias.double())
        error = float((checked(x).double() - expected).abs().max() / expected.abs().max())
    if not error < 1e-2:
        raise AssertionError(f"the sparsec layer differs from plain torch by {error:.2g} of its largest output")
    cm = sparsec.compile(model, **options)
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseLinear))
    if not cuda:
        launch._LOADED.clear()
        launch._LAUNCHES.clear()
        from sparsec.codegen.aot import matmul_signature
        from sparsec.codegen.direct_launch import DirectLaunch

        stub = DirectLaunch(_JitStub(matmul_signature(layer.spec())))
        launch.loaded_kernel = lambda *a, **k: stub
    with torch.no_grad():
        results = {"sparsec layer": per_call_us(lambda: layer(x), args.calls),
                   "compiled model": per_call_us(lambda: cm(x), args.calls),
                   "nn.Linear": per_call_us(lambda: model(x), args.calls)}
        profile = where_the_time_goes(lambda: layer(x), args.calls)
        if cuda:  # the same layer with every launch through Triton's JIT (what DirectLaunch skips)
            for kernel in launch._LOADED.values():
                kernel.jit_only()
            results["sparsec layer, JIT launch"] = per_call_us(lambda: layer(x), args.calls)
    name = torch.cuda.get_device_name() if cuda else "cpu-launch-stubbed"
    print(f"{name}: host time per call at 1 x {d} fp16 (median of 7 blocks)")
    for label, us in results.items():
        print(f"  {label:15s} {us:7.1f} us")
    print("sparsec layer under cProfile (which adds its own cost per Python call): us per call, own time")
    for row in profile:
        print(f"  {row['own_us']:6.2f}  {row['function']}")
    write_results("call-overhead", name, {"benchmark": "host time per call, batch 1", "features": d,
                                          "launch": "real" if cuda else "stubbed behind DirectLaunch (its Python timed, no kernel)",
                                          "us_per_call": results, "profile_own_us_per_call": profile})
    return 0


if __name__ == "__main__":
    sys.exit(main())
