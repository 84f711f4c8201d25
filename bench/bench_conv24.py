"""2:4 sparse convolution on a GPU: sparsec's implicit-GEMM Triton conv kernel vs dense cuDNN on the
pruned weight, and what backend="auto" picks. One call checks and times everything and writes
bench/results/conv24-<device>-<date>.json plus a printed table; without CUDA it says so and exits 0.

Cases: ResNet-50's 3x3 convs (64 channels at 56 x 56, 128 at 28, 256 at 14, 512 at 7) and two of
its 1x1 convs, at batch 1 and 32, fp16 weights and int8 weights (fp16 activations), with the
bias + relu the kernel fuses. Every result is checked against torch first, and the pruned weight
the kernel was given against the tests' oracle (tests/oracle.py) applied to the original weight. Dense is timed NCHW and
channels-last (cuDNN's fast layout for fp16) and the faster is the baseline. Times are medians of
CUDA-event timings in a CUDA graph (launch overhead excluded) after an L2 flush, and of eager calls
of the compiled module against the original (what a user sees). The kernel is timed at every
launch config backend="auto" considers. Upstream Triton cannot issue mma.sp, so the kernel does
the dense amount of tensor-core work: expect it behind cuDNN at large batch, where auto must then
choose dense (>= 0.97x dense is the bar, as for the linear layers: in GPU time, the whole compiled
model replayed in a CUDA graph against the original, and in eager calls, host time included).

    python bench/bench_conv24.py [--quick] [--budget-s S]
"""
from __future__ import annotations

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

# (name, in channels, out channels, kernel, spatial size)
CONVS = [("3x3 64 @56", 64, 64, 3, 56), ("3x3 128 @28", 128, 128, 3, 28), ("3x3 256 @14", 256, 256, 3, 14),
         ("3x3 512 @7", 512, 512, 3, 7), ("1x1 256->64 @56", 256, 64, 1, 56), ("1x1 1024->256 @14", 1024, 256, 1, 14)]
BATCHES = [1, 32]


def median_time(fn, graph: bool = True) -> float:
    from sparsec.codegen.timing import time_cuda

    return time_cuda(fn, repeats=30, graph=graph)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def sweep_configs(layer, x, expected) -> list[dict]:
    """Check, then time, the layer's kernel at every launch config backend="auto" may pick."""
    from sparsec.codegen.configs import matmul_candidates
    from sparsec.codegen.launch import sparse24_conv2d
    from sparsec.codegen.measure import run_poisoned
    from sparsec.errors import last_line

    xk, geometry, _ = layer.kernel_input(x)
    m, n, k = geometry.gemm_rows(xk), layer.packed.out_features, layer.packed.reduction
    spec, packed = layer.spec(), layer.packed
    results = []
    for cfg in matmul_candidates(m, n, k, spec.act_dtype, None, spec.weight_dtype, conv=True):
        run = lambda cfg=cfg, out=None: sparse24_conv2d(xk, packed.values, packed.meta, packed.scales, layer.bias,  # noqa: E731
                                                        None, spec, layer.kernel_name, layer.kernel_source, geometry,
                                                        config=cfg, out=out)
        try:
            err = relative_error(run_poisoned(run, tuple(expected.shape), x.dtype, x.device), expected)
        except Exception as e:  # noqa: BLE001 - recorded; the other configs still run
            results.append({"config": cfg, "error": last_line(e), "ok": False, "s": None})
            continue
        results.append({"config": cfg, "max_rel_err": err, "ok": err < 1e-2, "s": median_time(run) if err < 1e-2 else None})
    return results


def run_case(name: str, cin: int, cout: int, kernel: int, size: int, batch: int, int8: bool) -> dict:
    import sparsec
    from sparsec.runtime.triton_conv import TritonSparseConv2d

    torch.manual_seed(cin + cout + size + batch)
    model = nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU()).half().cuda().eval()
    x = torch.randn(batch, cin, size, size, dtype=torch.float16, device="cuda")
    kwargs = dict(include=[".*"], min_weights=0, quantize="int8" if int8 else None)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", **kwargs)
    layer = next(mod for mod in cm.modules() if isinstance(mod, TritonSparseConv2d))
    w_eff = cm.effective_weight("0")
    weight_err = effective_weight_error(cm, model)  # that weight against the tests' oracle's pruning of the original
    bias = model[0].bias.detach()
    with torch.no_grad():
        expected = F.relu(F.conv2d(x.double(), w_eff.double(), bias.double(), padding=kernel // 2))
        err = relative_error(cm(x), expected)
        row = {"case": name, "batch": batch, "C": cin, "N": cout, "kernel": kernel, "size": size,
               "weights": "int8" if int8 else "fp16", "M": batch * size * size, "K": cin * kernel * kernel,
               "max_rel_err": err, "weight_rel_err": weight_err, "fused": list(layer.spec().epilogue_ops()),
               "ok": err < 1e-2 and weight_err <= 1e-2}  # (weights: as bench_sparse24's WEIGHT_TOLERANCE)
        x_last, w_last = x.contiguous(memory_format=torch.channels_last), w_eff.contiguous(memory_format=torch.channels_last)
        row["dense_nchw_s"] = median_time(lambda: F.relu(F.conv2d(x, w_eff, bias, padding=kernel // 2)))
        row["dense_channels_last_s"] = median_time(lambda: F.relu(F.conv2d(x_last, w_last, bias, padding=kernel // 2)))
        row["dense_s"] = min(row["dense_nchw_s"], row["dense_channels_last_s"])
        row["default_s"] = median_time(lambda: layer(x))
        row["default_channels_last_input_s"] = median_time(lambda: layer(x_last))
        row["configs"] = sweep_configs(layer, x, expected)
        row["ok"] = row["ok"] and all(c["ok"] for c in row["configs"])
        timed = [c["s"] for c in row["configs"] if c["ok"]] or [row["default_s"]]
        row["sparsec_s"] = min(timed)
        row["sparsec_eager_s"] = median_time(lambda: cm(x), graph=False)
        row["dense_eager_s"] = median_time(lambda: model(x), graph=False)
        auto = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="auto", **kwargs)
        row["auto_backend"], row["auto_reason"] = auto.plan["0"].backend, auto.plan["0"].reason
        row["auto_eager_s"] = median_time(lambda: auto(x), graph=False)
        row["auto_s"] = median_time(lambda: auto(x))  # the compiled model's GPU time, and the original's
        row["dense_model_s"] = median_time(lambda: model(x))
    flops = 2 * row["M"] * cout * row["K"]
    row["sparsec_TFLOPs_dense_equiv"] = flops / row["sparsec_s"] / 1e12
    row["vs_dense"] = row["dense_s"] / row["sparsec_s"]
    row["auto_vs_dense_eager"] = row["dense_eager_s"] / row["auto_eager_s"]
    row["auto_vs_dense"] = row["dense_model_s"] / row["auto_s"]
    return row


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32 of the first two cases, fp16 only")
    add_budget_option(parser)
    args = parse_args(parser)
    if skip_without_cuda("bench_conv24"):
        return 0
    import triton

    device = torch.cuda.get_device_name()
    print(f"{device} (torch {torch.__version__}, triton {triton.__version__})")
    convs, weights = (CONVS[:2], (False,)) if args.quick else (CONVS, (False, True))
    print(f"{'case':>18} {'B':>3} {'w':>4} | {'sparsec us':>10} {'dense us':>9} {'x dense':>7} {'TF/s':>6} | "
          f"{'auto':>8} {'x dense gpu':>11} {'eager':>5} | ok")
    runner = CaseRunner(args.budget_s)
    for int8 in weights:
        for name, cin, cout, kernel, size in convs:
            for batch in BATCHES:
                r = runner.run({"case": name, "batch": batch, "weights": "int8" if int8 else "fp16"},
                               run_case, name, cin, cout, kernel, size, batch, int8)
                if r is not None:
                    print(f"{name:>18} {batch:3d} {r['weights']:>4} | {1e6 * r['sparsec_s']:10.1f} {1e6 * r['dense_s']:9.1f} "
                          f"{r['vs_dense']:7.2f} {r['sparsec_TFLOPs_dense_equiv']:6.1f} | {r['auto_backend']:>8} "
                          f"{r['auto_vs_dense']:11.2f} {r['auto_vs_dense_eager']:5.2f} | "
                          f"{'yes' if r['ok'] else 'NO ' + str(r['max_rel_err']) + ', weights ' + str(r['weight_rel_err'])}",
                          flush=True)
                write_results("conv24", device, {"benchmark": "2:4 sparse conv2d", "triton": triton.__version__,
                                                 "complete": False, "rows": runner.rows}, announce=False)
    measured = runner.measured
    worst = min((r["auto_vs_dense"] for r in measured), default=None)
    worst_eager = min((r["auto_vs_dense_eager"] for r in measured), default=None)
    if worst is not None:
        for what, value in (("GPU time", worst), ("eager calls, host time included", worst_eager)):
            print(f"target auto vs dense ({what}), every case: {value:.2f} at worst (needs >= 0.97) -> "
                  f"{'met' if value >= 0.97 else 'NOT met'}")
    complete = len(measured) == len(runner.rows)
    write_results("conv24", device, {"benchmark": "2:4 sparse conv2d", "triton": triton.__version__, "complete": complete,
                                     "auto_vs_dense_worst": worst, "auto_vs_dense_eager_worst": worst_eager,
                                     "rows": runner.rows})
    return 0 if complete and all(r["ok"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
