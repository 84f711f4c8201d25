"""Decode steps as a server runs them: a Llama-sized MLP block under torch.compile with CUDA graphs
(mode="reduce-overhead"), the original model against sparsec's 2:4 compile of it (backend auto with
timing="graph", fp16 and int8 weights), both also without torch.compile. Without CUDA it says so and
exits 0.

Block: y = down(silu(gate(x)) * up(x)), d = 4096, h = 14336, fp16, every layer 2:4. Rows M in {1,
16}: one decode step of 1 or 16 sequences. A step's time is CUDA-event time per call over blocks of
back-to-back calls (a decode loop: each call's weights, 352 MB dense, are long gone from the 50 MB L2
by its next call), median of 7 blocks. Every output is checked against the block in float64 on the
weights sparsec computes with (cm.effective_weight) before anything is timed, and those weights
against the tests' oracle (tests/oracle.py) applied to the original ones.

    python bench/bench_decode_compile.py [--ms 1,16]
"""
from __future__ import annotations

import copy
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import arg_parser, effective_weight_error, parse_args, skip_without_cuda, write_results  # noqa: E402

D, H = 4096, 14336
LAYERS = ("gate", "up", "down")


class MLPBlock(nn.Module):
    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def per_call_s(fn, calls: int = 50, blocks: int = 7) -> float:
    """Median over blocks of CUDA-event seconds per call of back-to-back calls."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


def reference(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """The block in float64 on the given weights."""
    xd = x.double()
    w = {name: weights[name].double() for name in LAYERS}
    return (F.silu(xd @ w["gate"].t()) * (xd @ w["up"].t())) @ w["down"].t()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def run_case(m: int, quantize: str | None, device: str = "cuda", d: int = D, h: int = H,
             dtype: torch.dtype = torch.float16) -> dict:
    """One row; a CPU, small widths and float32 only for the smoke test (tests/test_bench.py)."""
    import sparsec

    torch.manual_seed(m)
    block = MLPBlock(d, h).to(device, dtype).eval()
    x = torch.randn(m, d, dtype=dtype, device=device)
    cm = sparsec.compile(block, pattern="2:4", example_inputs=(x,), include=[".*"], min_weights=0,
                         backend="auto", timing="graph", quantize=quantize)
    row = {"M": m, "weights": quantize or "fp16", "backends": {name: cm.plan[name].backend for name in LAYERS},
           "reasons": {name: cm.plan[name].reason for name in LAYERS}}
    variants = {"original": block, "sparsec": cm,
                "original, torch.compile": torch.compile(copy.deepcopy(block), mode="reduce-overhead"),
                "sparsec, torch.compile": torch.compile(cm, mode="reduce-overhead")}
    dense_expected = reference({name: getattr(block, name).weight for name in LAYERS}, x)
    sparse_expected = reference({name: cm.effective_weight(name) for name in LAYERS}, x)
    row["max_rel_err"], row["s"] = {}, {}
    with torch.no_grad():
        for name, model in variants.items():
            for _ in range(3):  # torch.compile: compile, record the CUDA graph, replay
                y = model(x)
            expected = dense_expected if name.startswith("original") else sparse_expected
            row["max_rel_err"][name] = relative_error(y, expected)
        row["weight_rel_err"] = effective_weight_error(cm, block)  # vs the tests' oracle's pruning of the original
        row["ok"] = all(err < 1e-2 for err in row["max_rel_err"].values()) and row["weight_rel_err"] <= 1e-2
        for name, model in variants.items():
            row["s"][name] = per_call_s(lambda model=model: model(x))
    row["vs_original"] = row["s"]["original"] / row["s"]["sparsec"]
    row["vs_original_compiled"] = row["s"]["original, torch.compile"] / row["s"]["sparsec, torch.compile"]
    weight_bytes = 3 * d * h * block.gate.weight.element_size()
    row["original_compiled_GBps"] = weight_bytes / row["s"]["original, torch.compile"] / 1e9
    # the 2:4 form's bytes (values, 4 bits of metadata per group, int8 scales), as in bench_sparse24
    value_size = 1 if quantize == "int8" else block.gate.weight.element_size()
    sparse_bytes = sum(n * k // 2 * value_size + n * ((k + 15) // 16) * 2 + (4 * n if quantize == "int8" else 0)
                       for n, k in ((h, d), (h, d), (d, h)))
    row["sparsec_compiled_GBps"] = sparse_bytes / row["s"]["sparsec, torch.compile"] / 1e9
    return row


def main() -> int:
    from bench_sparse24 import ceilings, row_counts

    parser = arg_parser(__doc__)
    parser.add_argument("--ms", type=row_counts, default=[1, 16], metavar="M,M,...", help="rows per step (default 1,16)")
    args = parse_args(parser)
    if skip_without_cuda("bench_decode_compile"):
        return 0
    import triton

    device = torch.cuda.get_device_name()
    ceil = ceilings()
    print(f"{device} (torch {torch.__version__}, triton {triton.__version__}): MLP block {D} -> {H} -> {D}, fp16, "
          f"us per decode step; measured read ceiling {ceil['read_GBps']:.0f} GB/s (%rd: weight bytes / time under "
          f"torch.compile against it)")
    print(f"{'M':>3} {'w':>4} | {'original':>9} {'sparsec':>9} {'x':>5} | {'orig+tc':>9} {'sparsec+tc':>10} {'x':>5} "
          f"{'orig GB/s':>9} {'%rd':>4} {'sparsec GB/s':>12} {'%rd':>4} | backends (gate, up, down) | ok")
    rows = []
    for m in args.ms:
        for quantize in (None, "int8"):
            try:
                r = run_case(m, quantize)
            except Exception as e:  # noqa: BLE001 - one failed case is recorded; the rest still run
                rows.append({"M": m, "weights": quantize or "fp16", "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"{m:3d} {quantize or 'fp16':>4} | ERROR {rows[-1]['error']}", flush=True)
                continue
            r["original_compiled_of_read_ceiling"] = r["original_compiled_GBps"] / ceil["read_GBps"]
            r["sparsec_compiled_of_read_ceiling"] = r["sparsec_compiled_GBps"] / ceil["read_GBps"]
            rows.append(r)
            s = {k: 1e6 * v for k, v in r["s"].items()}
            print(f"{m:3d} {r['weights']:>4} | {s['original']:9.1f} {s['sparsec']:9.1f} {r['vs_original']:5.2f} | "
                  f"{s['original, torch.compile']:9.1f} {s['sparsec, torch.compile']:10.1f} "
                  f"{r['vs_original_compiled']:5.2f} {r['original_compiled_GBps']:9.0f} "
                  f"{100 * r['original_compiled_of_read_ceiling']:3.0f}% {r['sparsec_compiled_GBps']:12.0f} "
                  f"{100 * r['sparsec_compiled_of_read_ceiling']:3.0f}% | "
                  f"{', '.join(r['backends'].values())} | {'yes' if r['ok'] else 'NO ' + str(r['max_rel_err']) + ', weights ' + str(r['weight_rel_err'])}",
                  flush=True)
    write_results("decode-compile", device, {"benchmark": "decode steps of an MLP block under torch.compile",
                                             "triton": triton.__version__, "ceilings": ceil, "d": D, "h": H,
                                             "rows": rows})
    return 0 if rows and all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
