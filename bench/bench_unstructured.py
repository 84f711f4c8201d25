"""Method (d), unstructured sparsity ("unstructured:S", CSR storage): where it is faster than dense.

CPU part (always runs): linear layers N x K in {1024 x 1024, 4096 x 4096, 4096 x 14336 (when the CPU
budget still covers it)}, float32, sparsity {0.5, 0.8, 0.9, 0.95, 0.99}, M {1, 8, 128} rows:
  dense  F.linear on the pruned weight, with its bias (what the original model costs: MKL / oneDNN sgemm)
  csr    sparsec's CsrLinear (runtime/csr_linear.py: torch's CSR product, MKL) called as a compiled model
         calls it (its forward, checks included), built as backend auto's CPU candidate is built
         (codegen/measure.py cpu_kernel_candidates); a one-layer model compiled with a plan whose backend
         is "csr" is checked to hold the same layer computing the same output
each checked against float64 F.linear on the pruned weight first, the mask against the oracle's rule
(tests/oracle.py: round(S * numel) pruned, every kept magnitude >= every pruned one, ties to the lower flat
index); then the two take turns in rounds (drift on a shared 2-core VM hits both alike) and the tables give
medians. Bandwidth: bytes a call must move (CSR values + int32 indices + row pointers, or the dense weight,
plus x and y) over its time, against a read ceiling measured in the same run; GFLOP/s are the useful
multiply-adds (2 M nnz for CSR, 2 M N K for dense) against the fp32 GEMM ceiling measured in the same run.
Also, for a few cases, a one-layer model compiled with backend="auto": which backend it picks, and the
compiled model against the same model with the pruned dense weight (>= 0.97x is auto's bar).

GPU part (only with CUDA; without, every GPU case is recorded as skipped and the script exits 0):
  conv   the direct sparse conv Triton kernel (codegen/direct_conv.py: CSR rows, precomputed input offsets,
         the zero padding done in torch before the launch, bias fused) vs cuDNN F.conv2d on the pruned dense
         weight (torch.backends.cudnn.benchmark on; NCHW and channels-last, the faster is the baseline), same
         dtype: fp16, and fp32 both with TF32 off (the same precision as the kernel's fp32 FMAs: the
         baseline) and with torch's default TF32 convs (reported beside it). ResNet-50 / VGG-16 layers
         3x3 64 @56, 3x3 128 @28, 3x3 256 @14, 3x3 512 @7, 1x1 256->64 @56, 1x1 1024->256 @14, batch {1, 8},
         sparsity {0.5, 0.8, 0.9, 0.95, 0.98, 0.99}. Each kernel output is checked against float64 F.conv2d
         on the pruned weight first, written where a NaN-filled block of its size was just freed (so that an
         element the kernel skips shows as NaN, not as a previous right answer). Times: medians of CUDA-event
         timings replayed from a CUDA graph (launch overhead excluded), warm-up excluded, each run after an
         L2 flush (codegen/timing.py time_cuda). GB/s: input + CSR arrays the kernel reads (row pointers,
         values, int32 offsets) + output, over the time, against the device's read and copy ceilings
         measured in the same run (bench_sparse24.ceilings).
  linear cuSPARSE CSR (torch.sparse.mm on a CUDA sparse_csr tensor, int32 indices) vs cuBLAS F.linear on the
         pruned weight, the CPU part's shapes and sparsities, M {1, 16}, fp32 and fp16; eager calls
         (host time included: cuSPARSE's per-call setup is part of its cost), after an L2 flush.
For every (shape, M or batch, dtype) the crossover is the lowest measured sparsity from which the sparse
path is faster than dense at it and at every higher one measured (with a log-linear estimate between the
two measured sparsities around it): methods.md D.4 item 4 asks for it to be reported, not asserted.

    python bench/bench_unstructured.py [--parts cpu,gpu] [--shapes full|small] [--rounds 5]
                                       [--cpu-budget-s 150] [--budget-s S]
writes bench/results/unstructured-<device>-<date>.json (device: the GPU's name where the GPU part ran, else
cpu<cores>; with --parts cpu or gpu alone: unstructured-cpu-... / unstructured-gpu-...). Exits 1 when a
check failed (that case's row holds the error), 0 otherwise, rows skipped for the budget included.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import (CaseRunner, Disturbance, arg_parser, cpu_ceilings, in_rounds, load_oracle,  # noqa: E402
                        parse_args, positive_int, write_results)
from sparsec import reference as ref  # noqa: E402
from sparsec.patterns import Unstructured  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
oracle = load_oracle()  # tests/oracle.py, written apart from sparsec.reference

SPARSITIES = {"full": (0.5, 0.8, 0.9, 0.95, 0.99), "small": (0.5, 0.8, 0.9, 0.95, 0.99)}
CPU_SHAPES = {"full": [(1024, 1024), (4096, 4096), (4096, 14336)], "small": [(256, 128)]}
CPU_ROWS = {"full": [1, 8, 128], "small": [1, 8]}
# backend="auto" compiles: (N, K, sparsity, M), a spread on both sides of the crossovers
AUTO_CASES = {"full": [(1024, 1024, 0.8, 8), (1024, 1024, 0.95, 1), (4096, 4096, 0.5, 1), (4096, 4096, 0.9, 128),
                       (4096, 4096, 0.99, 8)],
              "small": [(256, 128, 0.9, 1)]}
CONV_SPARSITIES = {"full": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99), "small": (0.5, 0.9, 0.99)}
# (name, in channels, out channels, kernel, spatial size); padding kernel // 2, stride 1
CONVS = {"full": [("3x3 64 @56", 64, 64, 3, 56), ("3x3 128 @28", 128, 128, 3, 28), ("3x3 256 @14", 256, 256, 3, 14),
                  ("3x3 512 @7", 512, 512, 3, 7), ("1x1 256->64 @56", 256, 64, 1, 56),
                  ("1x1 1024->256 @14", 1024, 256, 1, 14)]}
CONVS["small"] = CONVS["full"][:2]
CONV_BATCHES = {"full": [1, 8], "small": [1]}
GPU_DTYPES = {"full": (torch.float16, torch.float32), "small": (torch.float16,)}
GPU_LINEAR_SHAPES = {"full": CPU_SHAPES["full"], "small": [(1024, 1024)]}
GPU_LINEAR_ROWS = (1, 16)

# outputs against float64 on the same pruned weight, relative to the largest output
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
AUTO_BAR = 0.97
CPU_BUDGET_S = 150.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (NaN anywhere in got: NaN, which fails every check)."""
    return float((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def require_close(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    error = relative_error(got, expected)
    if not error <= tolerance:
        raise AssertionError(f"{what} differs from float64 on the pruned weight by {error:.2g} of the largest output "
                             f"(tolerance {tolerance:g})")
    return error


# ----------------------------------------------------------------------------------------------- pruning

def magnitude_order(w: torch.Tensor) -> torch.Tensor:
    """Flat indices of w by magnitude, largest first, equal magnitudes by the lower flat index (the rule of
    "unstructured:S"). One sort serves every sparsity of a layer: on the CPU a 4096 x 14336 sort takes ~7 s."""
    return torch.sort(w.abs().reshape(-1), descending=True, stable=True).indices


def mask_from_order(order: torch.Tensor, shape, sparsity: float) -> torch.Tensor:
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:Unstructured(sparsity).kept(order.numel())]] = True
    return mask.reshape(shape)


def check_mask(w: torch.Tensor, mask: torch.Tensor, sparsity: float) -> None:
    """The mask against the oracle's definition (tests/oracle.py): round(S * numel) weights pruned (halves
    up), every kept magnitude >= every pruned one, and among equal magnitudes at the boundary the kept ones
    at lower flat indices than the pruned ones; on a layer of at most 2^20 weights, also equal to the
    oracle's own mask (its numpy lexsort takes seconds on the larger ones)."""
    numel = w.numel()
    pruned = int((~mask).sum())
    expected = oracle.unstructured_pruned_count(numel, sparsity)
    if pruned != expected:
        raise AssertionError(f"mask prunes {pruned} of {numel} weights, the oracle {expected} (sparsity {sparsity})")
    mag, flat = w.detach().abs().reshape(-1), mask.reshape(-1)
    if 0 < pruned < numel:
        lowest_kept, highest_pruned = mag[flat].min(), mag[~flat].max()
        if lowest_kept < highest_pruned:
            raise AssertionError(f"a pruned weight ({float(highest_pruned):.3g}) outweighs a kept one "
                                 f"({float(lowest_kept):.3g})")
        if lowest_kept == highest_pruned:  # ties at the boundary go to the lower flat index
            index = torch.arange(numel, device=mag.device)
            tied = mag == lowest_kept
            if int(index[tied & flat].max()) > int(index[tied & ~flat].min()):
                raise AssertionError("a tie at the threshold kept a higher flat index than one it pruned")
    if numel <= 1 << 20:
        rows = w.detach().reshape(w.shape[0], -1).cpu()
        if not torch.equal(mask.reshape(rows.shape).cpu(), oracle.oracle_unstructured_mask(rows, sparsity)):
            raise AssertionError("mask differs from the oracle's")


def crossover(ratios: dict[float, float]) -> dict:
    """ratios: sparsity -> dense time / sparse time (> 1: the sparse path is faster). The crossover is the
    lowest measured sparsity from which the sparse path wins at it and at every higher measured one; `estimate`
    interpolates log(ratio) linearly between it and the measured sparsity below it; `wins_below` lists
    sparsities under the crossover where it also won (a non-monotone curve: noise, or a real dip)."""
    measured = sorted(ratios)
    result = {"x_dense": {str(s): ratios[s] for s in measured}, "crossover": None, "below": None, "estimate": None,
              "wins_below": []}
    if not measured:
        return {**result, "text": "nothing measured"}
    first = None
    for s in reversed(measured):
        if ratios[s] > 1:
            first = s
        else:
            break
    if first is None:
        return {**result, "text": f"none up to {measured[-1]}"}
    i = measured.index(first)
    result["crossover"] = first
    result["wins_below"] = [s for s in measured[:i] if ratios[s] > 1]
    if i == 0:
        return {**result, "text": f"<= {first}"}
    below = measured[i - 1]
    lo, hi = math.log(ratios[below]), math.log(ratios[first])
    estimate = below + (first - below) * (0 - lo) / (hi - lo) if hi > lo else first
    return {**result, "below": below, "estimate": estimate, "text": f"{below}-{first} (~{estimate:.2f})"}


def crossovers(rows: list[dict], keys: tuple[str, ...], ratio: str) -> list[dict]:
    """One crossover per combination of `keys` over the measured rows (rows with `ratio`)."""
    groups: dict[tuple, dict[float, float]] = {}
    for r in rows:
        if r.get(ratio) is not None:
            groups.setdefault(tuple(r[k] for k in keys), {})[r["sparsity"]] = r[ratio]
    return [{**dict(zip(keys, key)), **crossover(curve)} for key, curve in groups.items()]


def print_crossovers(title: str, table: list[dict], keys: tuple[str, ...], sparsities) -> None:
    print(f"\n{title}")
    width = {k: max([len(k)] + [len(str(c[k])) for c in table]) for k in keys}
    print(" ".join(f"{k:>{width[k]}}" for k in keys) + " | " + " ".join(f"{s:>6}" for s in sparsities) + " | crossover")
    for c in table:
        cells = " ".join(f"{c['x_dense'][str(s)]:5.2f}x" if str(s) in c["x_dense"] else f"{'-':>6}" for s in sparsities)
        print(" ".join(f"{str(c[k]):>{width[k]}}" for k in keys) + f" | {cells} | {c['text']}")


# ----------------------------------------------------------------------------------------------- CPU part

SETUP_S = [0.0]  # seconds the CPU part spent making weights, sorting and packing them (not timing)


@functools.lru_cache(maxsize=1)  # (rows run shape -> sparsity -> M: each shape's weight and sort made once)
def cpu_weight(n: int, k: int):
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1000 * n + k)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g) * 0.1
    order = magnitude_order(w)
    SETUP_S[0] += time.perf_counter() - start
    return w, bias, order


@functools.lru_cache(maxsize=1)
def cpu_layer(n: int, k: int, sparsity: float):
    """(CsrLinear module, the pruned dense weight, bias, ms to pack and build the layout)."""
    from sparsec.runtime.csr_linear import CsrLinear
    from sparsec.runtime.packed import CSRPacked

    w, bias, order = cpu_weight(n, k)
    setup = time.perf_counter()
    mask = mask_from_order(order, w.shape, sparsity)
    check_mask(w, mask, sparsity)
    start = time.perf_counter()
    pattern = Unstructured(sparsity)
    module = CsrLinear(CSRPacked.pack(w, mask, pattern, None), bias, "linear", (n, k), "0", str(pattern), "")
    module.build_now()
    build_ms = 1e3 * (time.perf_counter() - start)
    SETUP_S[0] += time.perf_counter() - setup
    return module.eval(), torch.where(mask, w, 0.0).contiguous(), bias, build_ms


def cpu_row(n: int, k: int, sparsity: float, m: int, rounds: int, ceilings: dict) -> dict:
    module, dense, bias, build_ms = cpu_layer(n, k, sparsity)
    torch.manual_seed(m)
    x = torch.randn(m, k)
    fns = {"dense": lambda: F.linear(x, dense, bias), "csr": lambda: module(x)}
    with torch.no_grad():
        expected = F.linear(x.double(), dense.double(), bias.double())
        errors = {name: require_close(name, fn(), expected, TOLERANCE[torch.float32]) for name, fn in fns.items()}
        start = time.perf_counter()
        for fn in fns.values():
            fn()
        if time.perf_counter() - start > 0.5:  # (seconds-long calls: 3 rounds tell the median as well)
            rounds = min(rounds, 3)
        best = {}
        times = in_rounds(fns, rounds, best)
    crow, col, values, _ = module.layout()  # (the fourth: the sparse tensor viewing them)
    nnz = values.numel()
    moved = {"csr": nbytes(crow, col, values, x, bias) + m * n * 4, "dense": nbytes(dense, x, bias) + m * n * 4}
    flops = {"csr": 2 * m * nnz, "dense": 2 * m * n * k}
    row = {"N": n, "K": k, "M": m, "sparsity": sparsity, "nnz": nnz, "rounds": rounds, "build_ms": build_ms,
           "us": {name: 1e6 * t for name, t in times.items()}, "x_dense": times["dense"] / times["csr"],
           "us_best_round": {name: 1e6 * t for name, t in best.items()},
           "bytes": moved, "max_rel_err": errors}
    row["gbs"] = {name: moved[name] / 1e9 / t for name, t in times.items()}
    row["of_read_ceiling"] = {name: gbs / ceilings["read_gbs"] for name, gbs in row["gbs"].items()}
    row["gflops"] = {name: flops[name] / 1e9 / t for name, t in times.items()}  # useful work
    row["of_gemm_ceiling"] = {name: v / ceilings["gemm_gflops"]["float32"] for name, v in row["gflops"].items()}
    row["csr_gbs"] = row["gbs"]["csr"]
    return row


def shape_estimate_s(rows: list[dict], setup_s: float, scale: float, rounds: int) -> float:
    """Seconds a larger shape's sweep should take, from a smaller one's rows (`scale`: the weight count ratio):
    each call's time and the setup (sort, packing) scaled by it; a timing round costs a ~30 ms block per
    method or one call where that is longer, plus a check call and a warm-up call per method."""
    total = setup_s * scale
    for r in rows:
        for us in r["us"].values():
            call = 1e-6 * us * scale
            total += rounds * max(0.03, call) + 2 * call
    return total


def plan_check(n: int, k: int, sparsity: float) -> dict:
    """A one-layer model compiled with a plan whose backend is "csr" holds a CsrLinear with the benchmark's
    CSR arrays and computes the benchmark layer's output: what the sweep times is what compile makes."""
    import sparsec
    from sparsec.runtime.csr_linear import CsrLinear

    module, dense, bias, _ = cpu_layer(n, k, sparsity)
    w, _, _ = cpu_weight(n, k)
    model = nn.Sequential(nn.Linear(k, n)).eval()
    with torch.no_grad():
        model[0].weight.copy_(w)
        model[0].bias.copy_(bias)
    x = torch.randn(3, k)
    plan = sparsec.explain(model, pattern=f"unstructured:{sparsity}", example_inputs=(x,), include=[".*"],
                           min_weights=0, backend="torch")
    for lp in plan:
        lp.backend = "csr"
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    layer = cm.sparse_module("0")
    if not isinstance(layer, CsrLinear):
        raise AssertionError(f"a plan with backend 'csr' compiled the layer to {type(layer).__name__}")
    same = all(torch.equal(a, b) for a, b in zip(layer.layout()[:3], module.layout()[:3]))  # (the arrays)
    with torch.no_grad():
        error = relative_error(cm(x), F.linear(x.double(), dense.double(), bias.double()))
        if not same or relative_error(cm(x), module(x).double()) > 1e-6 or error > TOLERANCE[torch.float32]:
            raise AssertionError(f"the compiled layer differs from the benchmark's (same CSR arrays: {same}, "
                                 f"error {error:.2g})")
    return {"N": n, "K": k, "sparsity": sparsity, "layer": type(layer).__name__, "same_layout": same,
            "max_rel_err": error}


def auto_row(n: int, k: int, sparsity: float, m: int, rounds: int) -> dict:
    """A one-layer model compiled with backend auto at M rows: what it picks, and its time against the
    same model with the pruned weight held dense."""
    import sparsec

    torch.manual_seed(n + k + m)
    model = nn.Sequential(nn.Linear(k, n)).eval()
    x = torch.randn(m, k)
    start = time.perf_counter()
    cm = sparsec.compile(model, pattern=f"unstructured:{sparsity}", example_inputs=(x,), include=[".*"],
                         min_weights=0)
    compile_s = time.perf_counter() - start
    lp = cm.plan["0"]
    w = model[0].weight.detach()
    check_mask(w, cm.mask("0"), sparsity)
    pruned = cm.effective_weight("0").detach()
    if not torch.equal(pruned, torch.where(cm.mask("0"), w, 0.0)):
        raise AssertionError("the compiled layer's weight is not the original's kept weights")
    dense_model = nn.Sequential(nn.Linear(k, n)).eval()
    with torch.no_grad():
        dense_model[0].weight.copy_(pruned)
        dense_model[0].bias.copy_(model[0].bias)
        expected = F.linear(x.double(), pruned.double(), model[0].bias.double())
        error = require_close("the compiled model", cm(x), expected, TOLERANCE[torch.float32])
        times = in_rounds({"dense": lambda: dense_model(x), "auto": lambda: cm(x)}, rounds)
    ratio = times["dense"] / times["auto"]
    return {"N": n, "K": k, "M": m, "sparsity": sparsity, "backend": lp.backend, "reason": lp.reason,
            "compile_s": compile_s, "us": {name: 1e6 * t for name, t in times.items()}, "auto_vs_dense": ratio,
            "meets_bar": ratio >= AUTO_BAR, "max_rel_err": error}


def run_cpu(args, deadline: float | None, save, part: dict) -> None:
    """The CPU part, filling `part` (the results file's "cpu" entry, saved after every case)."""
    shapes, ms, sparsities = CPU_SHAPES[args.shapes], CPU_ROWS[args.shapes], SPARSITIES[args.shapes]
    torch.set_num_threads(os.cpu_count() or 1)
    disturbance = Disturbance()
    ceilings = cpu_ceilings()
    budget = None if deadline is None else deadline - time.monotonic()
    print(f"CPU part: {os.cpu_count()} cores, {torch.get_num_threads()} threads; ceilings measured now: read "
          f"{ceilings['read_gbs']:.1f} GB/s, fp32 GEMM {ceilings['gemm_gflops']['float32']:.0f} GFLOP/s; medians of "
          f"{args.rounds} rounds" + (f"; budget {budget:.0f} s" if budget is not None else ""))
    print(f"{'N x K':>12} {'S':>5} {'M':>4} | {'dense us':>9} {'csr us':>9} {'x dense':>7} | {'csr GB/s':>8} {'%rd':>4} "
          f"{'GFLOP/s':>7} {'%fl':>4}", flush=True)
    part.update({"threads": torch.get_num_threads(), "rounds": args.rounds, "read_ceiling_gbs": ceilings["read_gbs"],
                 "gemm_ceiling_gflops": ceilings["gemm_gflops"], "budget_s": budget, "rows": [], "auto": [],
                 "plan_check": None})
    runner = CaseRunner(budget)
    part["rows"] = runner.rows

    def sweep(n, k, check_plan: bool):
        """Every row of one shape; returns the seconds it spent on setup (making, sorting, packing weights)."""
        setup_before = SETUP_S[0]
        for sparsity in sparsities:
            for m in ms:
                r = runner.run({"N": n, "K": k, "M": m, "sparsity": sparsity}, cpu_row, n, k, sparsity, m,
                               args.rounds, ceilings)
                if r is not None:
                    print(f"{n:>5} x {k:<5} {sparsity:5.2f} {m:4d} | {r['us']['dense']:9.1f} {r['us']['csr']:9.1f} "
                          f"{r['x_dense']:6.2f}x | {r['gbs']['csr']:8.1f} {100 * r['of_read_ceiling']['csr']:3.0f}% "
                          f"{r['gflops']['csr']:7.1f} {100 * r['of_gemm_ceiling']['csr']:3.0f}%", flush=True)
                save()
        if check_plan:
            try:
                part["plan_check"] = plan_check(n, k, sparsities[len(sparsities) // 2])
            except Exception as e:  # noqa: BLE001 - recorded as a failed check
                from sparsec.errors import last_line
                part["plan_check"] = {"N": n, "K": k, "error": last_line(e)}
                print(f"ERROR plan check: {part['plan_check']['error']}")
        cpu_layer.cache_clear()
        cpu_weight.cache_clear()
        return SETUP_S[0] - setup_before

    spent = {}
    auto_after = min(2, len(shapes))  # the auto compiles after the first two shapes, before the largest
    for i, (n, k) in enumerate(shapes):
        if i == auto_after:
            run_auto(args, runner, part, save)
        if spent and deadline is not None:  # a shape the rest of the budget would not cover: skipped whole
            (pn, pk), setup_s = max(spent.items(), key=lambda kv: kv[0][0] * kv[0][1])
            estimate = shape_estimate_s([r for r in runner.measured if (r["N"], r["K"]) == (pn, pk)], setup_s,
                                        n * k / (pn * pk), args.rounds)
            left = deadline - time.monotonic()
            if estimate > left:
                why = f"the CPU budget would not cover this shape (~{estimate:.0f} s estimated, {max(left, 0):.0f} s left)"
                for sparsity in sparsities:
                    for m in ms:
                        runner.rows.append({"N": n, "K": k, "M": m, "sparsity": sparsity, "skipped": why})
                print(f"skipped {n} x {k}: {why}", flush=True)
                save()
                continue
        spent[(n, k)] = sweep(n, k, check_plan=i == 0)
    if auto_after == len(shapes):
        run_auto(args, runner, part, save)
    part["crossover"] = crossovers(runner.measured, ("N", "K", "M"), "x_dense")
    for c in part["crossover"]:
        c["shape"] = f"{c['N']}x{c['K']}"
    print_crossovers("CPU: csr x dense (dense time / csr time) per sparsity, and the crossover", part["crossover"],
                     ("shape", "M"), sparsities)
    if part["auto"]:
        print(f"\nbackend auto, one-layer model vs the same model with the pruned weight dense (bar >= {AUTO_BAR}x):")
        for a in part["auto"]:
            if "backend" in a:
                print(f"  {a['N']:>5} x {a['K']:<5} S {a['sparsity']:<4} M {a['M']:<4} -> {a['backend']:6s} "
                      f"{a['auto_vs_dense']:5.2f}x dense {'(meets the bar)' if a['meets_bar'] else '(BELOW the bar)'}  "
                      f"compile {a['compile_s']:.1f} s")
            else:
                print(f"  {a['N']:>5} x {a['K']:<5} S {a['sparsity']:<4} M {a['M']:<4} -> "
                      f"{a.get('error') or a.get('skipped')}")
    measured = runner.measured
    if measured:
        part["largest_error"] = max(max(r["max_rel_err"].values()) for r in measured)
    part.update(disturbance.report())
    part["complete"] = all("skipped" not in r and "error" not in r for r in runner.rows + part["auto"])


def run_auto(args, runner: CaseRunner, part: dict, save) -> None:
    for n, k, sparsity, m in AUTO_CASES[args.shapes]:
        before = len(runner.rows)
        runner.run({"N": n, "K": k, "M": m, "sparsity": sparsity, "auto": True}, auto_row, n, k, sparsity, m,
                   args.rounds)
        part["auto"].append(runner.rows.pop(before))  # (kept apart from the sweep's rows)
        save()


# ----------------------------------------------------------------------------------------------- GPU part

def cuda_timer(repeats: int = 50, graph: bool = True):
    def timer(fn):
        from sparsec.codegen.timing import time_cuda
        return time_cuda(fn, repeats=repeats, graph=graph)
    return timer


class tf32_convs:
    """torch.backends.cudnn.allow_tf32 set for the block (torch's default for convs is True)."""

    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allow

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32 = self.old


def poisoned_call(fn, shape, dtype, device) -> torch.Tensor:
    """fn() right after a NaN-filled block of its output's size was freed: the caching allocator hands that
    block to the output fn allocates, so an element the kernel never writes reads NaN, not a right answer
    left there by an earlier call."""
    block = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del block
    return fn()


@functools.lru_cache(maxsize=1)  # (cases run layer -> sparsity -> batch, dtype: each weight pruned once)
def conv_weight(cin: int, cout: int, kernel: int, sparsity: float, device: str):
    """(pruned dense weight fp32 [cout, cin, k, k], crow, col, values fp32, bias fp32)."""
    g = torch.Generator().manual_seed(cin * 31 + cout * 7 + kernel)
    w = (torch.randn(cout, cin, kernel, kernel, generator=g) / (cin * kernel * kernel) ** 0.5).to(device)
    bias = (torch.randn(cout, generator=g) * 0.1).to(device)
    rows = w.reshape(cout, -1)
    mask = ref.unstructured_mask(rows, Unstructured(sparsity).kept(rows.numel()))  # sparsec's pruning
    check_mask(rows, mask, sparsity)
    crow, col, values = ref.csr_compress(rows, mask)
    return torch.where(mask, rows, 0.0).reshape(w.shape), crow, col, values, bias


def conv_case(name: str, cin: int, cout: int, kernel: int, size: int, batch: int, sparsity: float,
              dtype: torch.dtype, ceil: dict, device: str = "cuda", timer=None) -> dict:
    """Check, then time, the direct sparse conv kernel against cuDNN on the pruned dense weight."""
    from sparsec.codegen.direct_conv import direct_conv2d
    from sparsec.direct_conv import input_offsets

    timer = timer or cuda_timer()
    pad = kernel // 2
    dense32, crow, col, values32, bias32 = conv_weight(cin, cout, kernel, sparsity, device)
    weight, values, bias = dense32.to(dtype), values32.to(dtype), bias32.to(dtype)
    padded = (size + 2 * pad, size + 2 * pad)
    offsets = input_offsets(crow, col, cin, (kernel, kernel), padded).to(torch.int32)  # once, as the layer keeps them
    torch.manual_seed(batch * 1000 + cin + size)
    x = torch.randn(batch, cin, size, size, device=device).to(dtype)
    out_shape = (batch, cout, size, size)

    def direct():
        return direct_conv2d(x, crow, col, values, bias, 1, pad, kernel_size=(kernel, kernel), offsets=offsets)

    x_last, w_last = x.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
    dense = {"nchw": lambda: F.conv2d(x, weight, bias, padding=pad),
             "channels_last": lambda: F.conv2d(x_last, w_last, bias, padding=pad)}
    with torch.no_grad():
        expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=pad)
        error = require_close("the direct conv kernel", poisoned_call(direct, out_shape, dtype, device), expected,
                              TOLERANCE[dtype])
        t_direct = timer(direct)
        with tf32_convs(False):  # fp32: the kernel's precision (fp16: no TF32 involved either way)
            cudnn = {layout: timer(fn) for layout, fn in dense.items()}
        if dtype == torch.float32:
            with tf32_convs(True):
                cudnn.update({f"{layout}_tf32": timer(fn) for layout, fn in dense.items()})
    strict = {k: v for k, v in cudnn.items() if not k.endswith("_tf32")}
    layout = min(strict, key=strict.get)
    nnz = values.numel()
    moved = nbytes(x, crow, values, offsets) + batch * cout * size * size * x.element_size()
    pixels = batch * size * size
    row = {"layer": name, "C": cin, "N": cout, "kernel": kernel, "size": size, "batch": batch, "dtype": dtype_name(dtype),
           "sparsity": sparsity, "nnz": nnz, "max_rel_err": error, "direct_s": t_direct, "cudnn_s": strict[layout],
           "cudnn_layout": layout, "cudnn_all_s": cudnn, "vs_cudnn": strict[layout] / t_direct, "bytes": moved,
           "direct_GBps": moved / t_direct / 1e9, "useful_TFLOPs": 2 * nnz * pixels / t_direct / 1e12,
           "cudnn_TFLOPs_dense": 2 * cout * cin * kernel * kernel * pixels / strict[layout] / 1e12}
    row["of_read_ceiling"] = row["direct_GBps"] / ceil["read_GBps"]
    row["of_copy_ceiling"] = row["direct_GBps"] / ceil["copy_GBps"]
    if dtype == torch.float32:
        tf32 = min(cudnn["nchw_tf32"], cudnn["channels_last_tf32"])
        row["cudnn_tf32_s"], row["vs_cudnn_tf32"] = tf32, tf32 / t_direct
    return row


@functools.lru_cache(maxsize=1)
def linear_weight(n: int, k: int, sparsity: float, device: str):
    """(pruned dense weight fp32 [n, k], crow int32, col int32, values fp32)."""
    g = torch.Generator().manual_seed(1000 * n + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)
    mask = ref.unstructured_mask(w, Unstructured(sparsity).kept(w.numel()))
    check_mask(w, mask, sparsity)
    crow, col, values = ref.csr_compress(w, mask)
    return torch.where(mask, w, 0.0), crow.to(torch.int32), col, values


def linear_case(n: int, k: int, sparsity: float, m: int, dtype: torch.dtype, ceil: dict, device: str = "cuda",
                timer=None) -> dict:
    """Check, then time, cuSPARSE CSR (torch.sparse.mm) against cuBLAS F.linear on the pruned weight."""
    timer = timer or cuda_timer(repeats=30, graph=False)
    dense32, crow, col, values32 = linear_weight(n, k, sparsity, device)
    dense, values = dense32.to(dtype), values32.to(dtype)
    csr = torch.sparse_csr_tensor(crow, col, values, size=(n, k), check_invariants=True)  # (once, untimed)
    torch.manual_seed(m + n)
    x = torch.randn(m, k, device=device).to(dtype)
    fns = {"cublas": lambda: F.linear(x, dense), "cusparse": lambda: torch.sparse.mm(csr, x.t().contiguous()).t()}
    try:
        with torch.no_grad():
            fns["cusparse"]()
    except (RuntimeError, NotImplementedError) as e:  # a dtype this torch's CSR product lacks: not a failed check
        if "not implemented" not in str(e) and "not supported" not in str(e):
            raise
        return {"N": n, "K": k, "M": m, "dtype": dtype_name(dtype), "sparsity": sparsity,
                "unsupported": str(e).splitlines()[0][:200]}
    with torch.no_grad():
        expected = x.double() @ dense.double().t()
        errors = {name: require_close(name, fn(), expected, TOLERANCE[dtype]) for name, fn in fns.items()}
        times = {name: timer(fn) for name, fn in fns.items()}
    el = x.element_size()
    moved = {"cusparse": nbytes(crow, col, values, x) + m * n * el, "cublas": nbytes(dense, x) + m * n * el}
    row = {"N": n, "K": k, "M": m, "dtype": dtype_name(dtype), "sparsity": sparsity, "nnz": values.numel(),
           "s": times, "vs_cublas": times["cublas"] / times["cusparse"], "bytes": moved, "max_rel_err": errors,
           "GBps": {name: moved[name] / t / 1e9 for name, t in times.items()}}
    row["of_read_ceiling"] = {name: v / ceil["read_GBps"] for name, v in row["GBps"].items()}
    return row


def gpu_cases(shapes: str):
    conv = [(name, cin, cout, kernel, size, batch, s, dtype)
            for name, cin, cout, kernel, size in CONVS[shapes] for s in CONV_SPARSITIES[shapes]
            for batch in CONV_BATCHES[shapes] for dtype in GPU_DTYPES[shapes]]
    linear = [(n, k, s, m, dtype) for n, k in GPU_LINEAR_SHAPES[shapes] for s in SPARSITIES[shapes]
              for dtype in sorted(GPU_DTYPES[shapes], key=lambda d: d != torch.float32) for m in GPU_LINEAR_ROWS]
    return conv, linear


def conv_key(case) -> dict:
    name, cin, cout, kernel, size, batch, s, dtype = case
    return {"layer": name, "batch": batch, "dtype": dtype_name(dtype), "sparsity": s}


def linear_key(case) -> dict:
    n, k, s, m, dtype = case
    return {"N": n, "K": k, "M": m, "dtype": dtype_name(dtype), "sparsity": s}


def skipped_gpu_part(shapes: str, why: str) -> dict:
    conv, linear = gpu_cases(shapes)
    return {"skipped": why, "conv_rows": [{**conv_key(c), "skipped": why} for c in conv],
            "linear_rows": [{**linear_key(c), "skipped": why} for c in linear]}


def run_gpu(args, deadline: float | None, save, part: dict) -> None:
    """The GPU part, filling `part` (the results file's "gpu" entry, saved after every case)."""
    import triton

    from bench_sparse24 import ceilings

    torch.backends.cudnn.benchmark = True  # cuDNN at its fastest algorithm for each shape (picked in warm-up)
    ceil = ceilings()
    device = torch.cuda.get_device_name()
    print(f"\nGPU part: {device}, torch {torch.__version__}, triton {triton.__version__}; ceilings measured now: read "
          f"{ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s, fp16 GEMM {ceil['fp16_gemm_TFLOPs']:.0f} "
          f"TFLOP/s")
    conv, linear = gpu_cases(args.shapes)
    part.update({"device": device, "cudnn_benchmark": True, "ceilings": ceil})
    conv_runner, linear_runner = CaseRunner(None if deadline is None else deadline - time.monotonic()), None
    part["conv_rows"] = conv_runner.rows
    print("direct sparse conv vs cuDNN (fp32 baseline: TF32 off; GB/s: input + CSR arrays + output)")
    print(f"{'layer':>18} {'B':>2} {'dtype':>7} {'S':>5} | {'direct us':>9} {'cudnn us':>9} {'x cudnn':>7} | "
          f"{'GB/s':>6} {'%rd':>4} {'TF/s':>5}", flush=True)
    for case in conv:
        r = conv_runner.run(conv_key(case), conv_case, *case, ceil)
        if r is not None:
            print(f"{r['layer']:>18} {r['batch']:2d} {r['dtype']:>7} {r['sparsity']:5.2f} | {1e6 * r['direct_s']:9.1f} "
                  f"{1e6 * r['cudnn_s']:9.1f} {r['vs_cudnn']:6.2f}x | {r['direct_GBps']:6.0f} "
                  f"{100 * r['of_read_ceiling']:3.0f}% {r['useful_TFLOPs']:5.2f}", flush=True)
        save()
    conv_weight.cache_clear()
    linear_runner = CaseRunner(None if deadline is None else deadline - time.monotonic())
    part["linear_rows"] = linear_runner.rows
    print("\ncuSPARSE CSR vs cuBLAS, eager calls (host time included)")
    print(f"{'N x K':>12} {'M':>3} {'dtype':>7} {'S':>5} | {'cusparse us':>11} {'cublas us':>9} {'x cublas':>8} | "
          f"{'GB/s':>6} {'%rd':>4}", flush=True)
    for case in linear:
        r = linear_runner.run(linear_key(case), linear_case, *case, ceil)
        if r is not None and "unsupported" in r:
            print(f"{r['N']:>5} x {r['K']:<5} {r['M']:3d} {r['dtype']:>7} {r['sparsity']:5.2f} | unsupported here: "
                  f"{r['unsupported']}", flush=True)
        elif r is not None:
            print(f"{r['N']:>5} x {r['K']:<5} {r['M']:3d} {r['dtype']:>7} {r['sparsity']:5.2f} | "
                  f"{1e6 * r['s']['cusparse']:11.1f} {1e6 * r['s']['cublas']:9.1f} {r['vs_cublas']:7.2f}x | "
                  f"{r['GBps']['cusparse']:6.0f} {100 * r['of_read_ceiling']['cusparse']:3.0f}%", flush=True)
        save()
    linear_weight.cache_clear()
    part["conv_crossover"] = crossovers(conv_runner.measured, ("layer", "batch", "dtype"), "vs_cudnn")
    part["conv_crossover_vs_tf32"] = crossovers([r for r in conv_runner.measured if r["dtype"] == "float32"],
                                                ("layer", "batch", "dtype"), "vs_cudnn_tf32")
    part["linear_crossover"] = crossovers([r for r in linear_runner.measured if "vs_cublas" in r],
                                          ("N", "K", "M", "dtype"), "vs_cublas")
    for c in part["linear_crossover"]:
        c["shape"] = f"{c['N']}x{c['K']}"
    print_crossovers("direct conv x cuDNN (same dtype; fp32: TF32 off) per sparsity, and the crossover",
                     part["conv_crossover"], ("layer", "batch", "dtype"), CONV_SPARSITIES[args.shapes])
    if part["conv_crossover_vs_tf32"]:
        print_crossovers("fp32 direct conv x cuDNN with TF32 (torch's default for convs)", part["conv_crossover_vs_tf32"],
                         ("layer", "batch", "dtype"), CONV_SPARSITIES[args.shapes])
    print_crossovers("cuSPARSE x cuBLAS per sparsity, and the crossover", part["linear_crossover"],
                     ("shape", "M", "dtype"), SPARSITIES[args.shapes])
    part["complete"] = all("skipped" not in r and "error" not in r for r in conv_runner.rows + linear_runner.rows)


# ----------------------------------------------------------------------------------------------- main

def parts_option(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or set(parts) - {"cpu", "gpu"}:
        raise argparse.ArgumentTypeError(f"expected cpu, gpu or cpu,gpu, got {text!r}")
    return sorted(set(parts))


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--parts", type=parts_option, default=["cpu", "gpu"], metavar="cpu,gpu",
                        help="which parts to run (default both; the GPU part skips itself without CUDA)")
    parser.add_argument("--shapes", choices=sorted(CPU_SHAPES), default="full",
                        help="small: a 256 x 128 layer on the CPU, two conv layers at batch 1 in fp16 and one "
                             "linear shape on the GPU (a quick run, and the smoke test)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="CPU timing rounds (medians over them)")
    parser.add_argument("--cpu-budget-s", type=float, default=CPU_BUDGET_S, metavar="S",
                        help=f"the CPU part starts no new case after S seconds (default {CPU_BUDGET_S:.0f}), and skips "
                             f"a layer shape whole when the time its predecessors took says it would not fit")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="the whole run starts no new case after S seconds (the rest are recorded as skipped)")
    args = parse_args(parser)
    start = time.monotonic()
    run_gpu_part = "gpu" in args.parts and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if run_gpu_part else f"cpu{os.cpu_count()}"
    prefix = "unstructured" if args.parts == ["cpu", "gpu"] else f"unstructured-{args.parts[0]}"
    result = {"benchmark": "unstructured sparsity (method d): CSR linear on CPU; direct sparse conv and cuSPARSE on GPU",
              "shapes": args.shapes, "parts": args.parts, "budget_s": args.budget_s, "complete": False}

    def save(announce: bool = False):
        return write_results(prefix, device, result, announce=announce)

    if "cpu" in args.parts:
        cpu_budget = args.cpu_budget_s if args.budget_s is None else min(args.cpu_budget_s, args.budget_s)
        run_cpu(args, start + cpu_budget, save, result.setdefault("cpu", {}))
    if "gpu" in args.parts:
        if run_gpu_part:
            deadline = None if args.budget_s is None else start + args.budget_s
            run_gpu(args, deadline, save, result.setdefault("gpu", {}))
        else:
            print("\nGPU part skipped: no CUDA device")
            result["gpu"] = skipped_gpu_part(args.shapes, "no CUDA device")
    rows = [r for key in ("cpu", "gpu") for name in ("rows", "auto", "conv_rows", "linear_rows")
            for r in result.get(key, {}).get(name, [])]
    failed = [r for r in rows if "error" in r] + ([result["cpu"]["plan_check"]] if "error" in (
        result.get("cpu", {}).get("plan_check") or {}) else [])
    result["complete"] = not failed and all("skipped" not in r for r in rows) and run_gpu_part == ("gpu" in args.parts)
    result["wall_s"] = time.monotonic() - start
    save(announce=True)
    print(f"{len(rows)} rows, {sum('skipped' in r for r in rows)} skipped, {len(failed)} failed; {result['wall_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
