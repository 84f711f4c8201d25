"""2:4 sparse matmul on a GPU: sparsec's Triton kernel vs dense cuBLAS vs cuSPARSELt, and what
backend="auto" picks. One call checks and times everything and writes
bench/results/<device>-<date>.json plus a printed table. On a machine without CUDA it says so
and exits 0.

Grid: M in {1, 16, 128, 2048, 8192} x (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)} x
{fp16 weights, int8 weights (fp16 activations)}. Every kernel result is checked against torch
first, and the pruned (and dequantized) weight it was given against the independent oracle of the
tests (tests/oracle.py) applied to the original weight. The kernel is timed at every launch config backend="auto" considers (the table shows the
fastest, the JSON all of them: tuning data for codegen/configs.py). Times are medians of
CUDA-event timings of the kernel replayed in a CUDA graph (launch overhead excluded, the same for
every contender, cuSPARSELt included where it captures) and, separately, of eager calls of the
compiled module against the original module (what a user sees). Every timed run follows an L2
flush: weights come from device memory, as in a model whose other layers evict them (an H100's
50 MB L2 holds a whole 4096 x 4096 fp16 weight). The flush reads a large buffer, leaving the L2
clean as a model's earlier layers do. Each row also times dense and the fastest kernel config
after a flush that overwrites the buffer (how the first H100 session flushed every run), whose
write-back then lands on the timed run: the "dirty_l2" entry (codegen/timing.py flush_l2).
GB/s and TFLOP/s are against ceilings measured in the same run: device read bandwidth (a
reduction over 1 GiB: what a kernel streaming its weights can reach), copy bandwidth (read +
write) and dense fp16 GEMM at 8192^3.

Targets (issue 4): memory-bound (M <= 16) fp16 2:4 >= 1.5x dense (limit ~1.78x); int8-weight
2:4 >= 2.8x dense fp16 (limit ~3.5x); backend="auto" >= 0.97x dense everywhere.

    python bench/bench_sparse24.py [--quick] [--ms 1,16] [--weights fp16|int8|both] [--budget-s S]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import (CaseRunner, add_budget_option, arg_parser, effective_weight_error, parse_args,  # noqa: E402
                        skip_without_cuda, write_results)

MS = [1, 16, 128, 2048, 8192]
# cm.effective_weight against the oracle, relative to the largest weight: exact in torch 2.13 on the CPU,
# fp16 and int8; the margin is for a division rounded otherwise on another device (one int8 step ~ 0.8%)
WEIGHT_TOLERANCE = 1e-2
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def median_time(fn, repeats: int = 50, graph: bool = True, l2_flush: str = "clean") -> float:
    """Median seconds per call; in a CUDA graph where it captures (kernel time without launch overhead)."""
    from sparsec.codegen.timing import time_cuda

    return time_cuda(fn, repeats=repeats, graph=graph, l2_flush=l2_flush)


def ceilings() -> dict:
    gib = 1 << 30
    x = torch.ones(gib // 4, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    t_read = median_time(lambda: x.sum(), repeats=20, graph=False)
    t_copy = median_time(lambda: y.copy_(x), repeats=20, graph=False)
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    tg = median_time(lambda: torch.mm(a, a), repeats=20, graph=False)
    return {"read_GBps": gib / t_read / 1e9, "copy_GBps": 2 * gib / t_copy / 1e9,
            "fp16_gemm_TFLOPs": 2 * 8192 ** 3 / tg / 1e12}


def row_counts(text: str) -> list[int]:
    """--ms: comma-separated positive row counts."""
    try:
        ms = [int(part) for part in text.split(",")]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (say 1,16), got {text!r}")
    return ms


def _default_config(m: int, n: int, k: int) -> dict:
    from sparsec.codegen.configs import matmul_config
    from sparsec.codegen.launch import sm_count

    return matmul_config(m, n, k, "float16", sm_count(torch.device("cuda")))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def sweep_configs(layer, x, expected) -> list[dict]:
    """Check, then time, the layer's kernel at every launch config backend="auto" may pick at this
    shape; a config whose result is wrong, or that fails to run, is recorded with its error and not timed."""
    from sparsec.codegen.configs import matmul_candidates
    from sparsec.codegen.launch import sm_count
    from sparsec.codegen.measure import run_poisoned
    from sparsec.errors import last_line

    m, k = x.shape
    n = layer.packed.out_features
    spec = layer.spec()
    results = []
    for cfg in matmul_candidates(m, n, k, spec.act_dtype, sm_count(x.device), spec.weight_dtype):
        run = functools.partial(kernel_call, layer, x, cfg)
        try:
            err = relative_error(run_poisoned(run, (m, n), x.dtype, x.device), expected)  # every element written?
        except Exception as e:  # noqa: BLE001 - recorded (say, a config this Triton cannot build); the rest still run
            results.append({"config": cfg, "error": last_line(e), "ok": False, "s": None})
            continue
        results.append({"config": cfg, "max_rel_err": err, "ok": err < 1e-2,
                        "s": median_time(run) if err < 1e-2 else None})
    return results


def kernel_call(layer, x, cfg: dict, out=None):
    """The layer's generated kernel on x at launch config `cfg`."""
    from sparsec.codegen.launch import sparse24_matmul

    packed = layer.packed
    return sparse24_matmul(x, packed.values, packed.meta, packed.scales, None, None, layer.spec(), layer.kernel_name,
                           layer.kernel_source, config=cfg, out=out)


def run_case(m: int, n: int, k: int, int8: bool, ceil: dict) -> dict:
    import sparsec
    from sparsec.runtime.triton_linear import TritonSparseLinear

    torch.manual_seed(m + n + k)
    layer = nn.Linear(k, n, bias=False).half().cuda()
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    model = nn.Sequential(layer)
    compile_kwargs = dict(include=[".*"], min_weights=0, quantize="int8" if int8 else None)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", **compile_kwargs)
    triton_layer = next(mod for mod in cm.modules() if isinstance(mod, TritonSparseLinear))
    w_eff = cm.effective_weight("0")  # pruned (and dequantized) fp16 weight
    weight_err = effective_weight_error(cm, model)  # that weight against the tests' oracle's pruning of the original
    with torch.no_grad():
        got = cm(x)
        expected = (x.double() @ w_eff.double().t())
        err = relative_error(got, expected)
    row = {"M": m, "N": n, "K": k, "weights": "int8" if int8 else "fp16", "max_rel_err": err,
           "weight_rel_err": weight_err, "ok": err < 1e-2 and weight_err <= WEIGHT_TOLERANCE}

    dense_w = layer.weight.detach()
    with torch.no_grad():
        row["dense_s"] = median_time(lambda: F.linear(x, dense_w))
        row["default_config"] = triton_layer.launch_config(m) or _default_config(m, n, k)
        row["default_s"] = median_time(lambda: triton_layer(x))
        row["configs"] = sweep_configs(triton_layer, x, expected)  # tuning data for codegen/configs.py
        row["ok"] = row["ok"] and all(c["ok"] for c in row["configs"])
        checked = [c for c in row["configs"] if c["ok"]] or [{"config": row["default_config"], "s": row["default_s"]}]
        best = min(checked, key=lambda c: c["s"])
        # the two expansions (Triton shifts, inline-PTX byte permutes) and, at one row, the GATHER form that
        # expands nothing, each at its fastest config
        row["best_s_by_prmt_expand"] = {prmt: min((c["s"] for c in checked if c["config"].get("PRMT_EXPAND") == prmt
                                                   and not c["config"].get("GATHER")), default=None) for prmt in (0, 1)}
        row["best_s_gather"] = min((c["s"] for c in checked if c["config"].get("GATHER")), default=None)
        row["sparsec_s"], row["best_config"] = best["s"], best["config"]
        # the flush that leaves the L2 dirty (see the docstring): how much of the time was write-back
        row["dirty_l2"] = {"dense_s": median_time(lambda: F.linear(x, dense_w), l2_flush="dirty"),
                           "sparsec_s": median_time(functools.partial(kernel_call, triton_layer, x, best["config"]),
                                                    l2_flush="dirty")}
        row["dirty_l2"]["vs_dense"] = row["dirty_l2"]["dense_s"] / row["dirty_l2"]["sparsec_s"]
        row["sparsec_eager_s"] = median_time(lambda: triton_layer(x), graph=False)
        row["dense_eager_s"] = median_time(lambda: model(x), graph=False)  # the module auto replaces
        try:
            semi = torch.sparse.to_sparse_semi_structured(w_eff)
            F.linear(x, semi)
            row["cusparselt_s"] = median_time(lambda: F.linear(x, semi))  # in a graph, as the kernels, where it captures
            row["cusparselt_eager_s"] = median_time(lambda: F.linear(x, semi), graph=False)
        except Exception as e:  # noqa: BLE001 - not available on this torch / shape
            row["cusparselt_s"] = None
            row["cusparselt_note"] = f"{type(e).__name__}: {str(e)[:120]}"
        auto = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="auto", **compile_kwargs)
        row["auto_backend"] = auto.plan["0"].backend
        row["auto_launch"] = auto.plan["0"].launch
        row["auto_reason"] = auto.plan["0"].reason
        row["auto_eager_s"] = median_time(lambda: auto(x), graph=False)
        row["auto_s"] = median_time(lambda: auto(x))  # the compiled model's GPU time, and the original's
        row["dense_model_s"] = median_time(lambda: model(x))
        # what auto picks for a model run under CUDA graphs (timing="graph"), and that model's GPU time
        graphed = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="auto", timing="graph",
                                  **compile_kwargs)
        row["auto_graph_backend"], row["auto_graph_reason"] = graphed.plan["0"].backend, graphed.plan["0"].reason
        row["auto_graph_s"] = median_time(lambda: graphed(x))

    weight_bytes = n * k // 2 * (1 if int8 else 2) + n * ((k + 15) // 16) * 2 + (n * 4 if int8 else 0)
    activation_bytes = m * k * 2 + m * n * 2
    row["sparsec_GBps"] = (weight_bytes + activation_bytes) / row["sparsec_s"] / 1e9
    row["dense_GBps"] = (n * k * 2 + activation_bytes) / row["dense_s"] / 1e9
    row["sparsec_TFLOPs_dense_equiv"] = 2 * m * n * k / row["sparsec_s"] / 1e12
    row["bandwidth_of_ceiling"] = row["sparsec_GBps"] / ceil["copy_GBps"]
    row["bandwidth_of_read_ceiling"] = row["sparsec_GBps"] / ceil["read_GBps"]
    row["dense_bandwidth_of_read_ceiling"] = row["dense_GBps"] / ceil["read_GBps"]
    row["flops_of_ceiling"] = row["sparsec_TFLOPs_dense_equiv"] / ceil["fp16_gemm_TFLOPs"]
    row["vs_dense"] = row["dense_s"] / row["sparsec_s"]
    row["vs_cusparselt"] = row["cusparselt_s"] / row["sparsec_s"] if row["cusparselt_s"] else None
    row["auto_vs_dense_eager"] = row["dense_eager_s"] / row["auto_eager_s"]
    row["auto_vs_dense"] = row["dense_model_s"] / row["auto_s"]
    row["auto_graph_vs_dense"] = row["dense_model_s"] / row["auto_graph_s"]
    return row


# issue 4's targets: (rows they apply to, the ratio that must reach the bound)
TARGETS = {"fp16 2:4 vs dense at M <= 16": (lambda r: r["weights"] == "fp16" and r["M"] <= 16, "vs_dense", 1.5),
           "int8 2:4 vs dense fp16 at M <= 16": (lambda r: r["weights"] == "int8" and r["M"] <= 16, "vs_dense", 2.8),
           "auto vs dense (GPU time), every shape": (lambda r: True, "auto_vs_dense", 0.97),
           "auto vs dense (eager calls, host time included), every shape": (lambda r: True, "auto_vs_dense_eager", 0.97),
           "auto with timing='graph' vs dense (GPU time), every shape": (lambda r: True, "auto_graph_vs_dense", 0.97)}


def check_targets(rows: list[dict]) -> dict:
    """Per target, the worst ratio over the rows it applies to and whether it reaches the bound."""
    results = {}
    for name, (applies, ratio, needs) in TARGETS.items():
        values = [r[ratio] for r in rows if applies(r)]
        if values:
            results[name] = {"worst": min(values), "needs": needs, "met": min(values) >= needs, "rows": len(values)}
    return results


def print_row(r: dict) -> None:
    cs = f"{1e6 * r['cusparselt_s']:8.1f}" if r["cusparselt_s"] else f"{'-':>8}"
    vc = f"{r['vs_cusparselt']:6.2f}" if r["vs_cusparselt"] else f"{'-':>6}"
    by = {prmt: f"{1e6 * s:6.1f}" if s else f"{'-':>6}" for prmt, s in r["best_s_by_prmt_expand"].items()}
    gather = f"{1e6 * r['best_s_gather']:6.1f}" if r["best_s_gather"] else f"{'-':>6}"
    print(f"{r['M']:5d} {r['N']:6d} {r['K']:6d} {r['weights']:>4} | {1e6 * r['sparsec_s']:10.1f} {1e6 * r['default_s']:8.1f} "
          f"{by[0]} {by[1]} {gather} {1e6 * r['dense_s']:9.1f} "
          f"{r['vs_dense']:7.2f} {r['dirty_l2']['vs_dense']:7.2f} {cs} {vc} | {r['sparsec_GBps']:6.0f} "
          f"{100 * r['bandwidth_of_read_ceiling']:3.0f}% {100 * r['dense_bandwidth_of_read_ceiling']:4.0f}% "
          f"{r['sparsec_TFLOPs_dense_equiv']:6.1f} {100 * r['flops_of_ceiling']:3.0f}% | "
          f"{r['auto_backend']:>10} {r['auto_vs_dense']:11.2f} {r['auto_vs_dense_eager']:5.2f} | "
          f"{r['auto_graph_backend']:>10} {r['auto_graph_vs_dense']:7.2f} | "
          f"{'yes' if r['ok'] else 'NO ' + str(r['max_rel_err']) + ', weights ' + str(r['weight_rel_err'])}",
          flush=True)


def results_prefix(quick: bool, weights: str, ms: list[int] | None) -> str:
    """The results file's name before the device and date: one per selection of rows, so a partial
    run (one weight format, some M) never overwrites the file of another run that day."""
    return ("sparse24" + ("-quick" if quick else "") + ("" if weights == "both" else f"-{weights}")
            + (f"-m{'-'.join(map(str, ms))}" if ms else ""))


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="M in {1, 2048}, first shape only")
    parser.add_argument("--ms", type=row_counts, default=None, metavar="M,M,...",
                        help=f"only these M (default {','.join(map(str, MS))}; with --quick 1,2048)")
    parser.add_argument("--weights", choices=["fp16", "int8", "both"], default="both",
                        help="which weight format's rows to run (a device call's time limit may not fit both)")
    add_budget_option(parser)
    args = parse_args(parser)
    if skip_without_cuda("bench_sparse24"):
        return 0
    import triton

    device = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"{device}: read {ceil['read_GBps']:.0f} GB/s, copy {ceil['copy_GBps']:.0f} GB/s, dense fp16 GEMM "
          f"{ceil['fp16_gemm_TFLOPs']:.0f} TFLOP/s (torch {torch.__version__}, triton {triton.__version__}).\n"
          f"dirty: x dense after a flush leaving the L2 dirty; %rd: sparsec's bytes / time against the read "
          f"ceiling, dns%: dense's")
    ms, shapes = ([1, 2048], SHAPES[:1]) if args.quick else (MS, SHAPES)
    ms = args.ms or ms
    weights = {"fp16": [False], "int8": [True], "both": [False, True]}[args.weights]
    prefix = results_prefix(args.quick, args.weights, args.ms)
    header = (f"{'M':>5} {'N':>6} {'K':>6} {'w':>4} | {'sparsec us':>10} {'default':>8} {'shift':>6} {'prmt':>6} {'gather':>6} {'dense us':>9} "
              f"{'x dense':>7} {'dirty':>7} {'cslt us':>8} {'x cslt':>6} | {'GB/s':>6} {'%rd':>4} {'dns%':>5} {'TF/s':>6} {'%fl':>4} | {'auto':>10} "
              f"{'x dense gpu':>11} {'eager':>5} | {'auto graph':>10} {'x dense':>7} | ok")
    print(header)
    runner = CaseRunner(args.budget_s)
    # M outermost: the memory-bound rows the targets are about come first, should the budget run out
    for int8 in weights:
        for m in ms:
            for n, k in shapes:
                r = runner.run({"M": m, "N": n, "K": k, "weights": "int8" if int8 else "fp16"}, run_case, m, n, k, int8, ceil)
                if r is not None:
                    print_row(r)
                # after every row: a run cut off by the device call's time limit keeps what it measured
                write_results(prefix, device, {"benchmark": "2:4 sparse matmul", "triton": triton.__version__,
                                               "ceilings": ceil, "complete": False, "rows": runner.rows}, announce=False)
    targets = check_targets(runner.measured)
    for name, result in targets.items():
        print(f"target {name}: {result['worst']:.2f} at worst (needs >= {result['needs']}) -> "
              f"{'met' if result['met'] else 'NOT met'}")
    complete = len(runner.measured) == len(runner.rows)
    write_results(prefix, device, {"benchmark": "2:4 sparse matmul", "triton": triton.__version__,
                                   "ceilings": ceil, "complete": complete, "targets": targets, "rows": runner.rows})
    return 0 if complete and all(r["ok"] for r in runner.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
