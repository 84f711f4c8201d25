"""Condensed constant fan-in layer on a GPU: sparsec's Triton gather kernel vs dense cuBLAS vs
torch CSR, for the SRigL benchmark layer 3072->768 at sparsity 0.8 / 0.9 / 0.95, batch 1..256,
fp16 and fp32. Checks each result against torch first; medians of CUDA-event timings (in a CUDA
graph where it captures); bandwidth against a read ceiling measured in the same run. Writes
bench/results/condensed-gpu-<device>-<date>.json and exits 1 if a result was wrong; without CUDA
it says so and exits 0. (SRigL's own GPU figure: 1.67x over dense at batch 256, 0.71x at batch 1.)

    python bench/bench_condensed_gpu.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main() -> int:
    from results_io import arg_parser, parse_args, skip_without_cuda, write_results

    parse_args(arg_parser(__doc__))
    if skip_without_cuda("bench_condensed_gpu"):
        return 0
    from bench_sparse24 import ceilings, median_time

    from sparsec import reference as ref
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.launch import condensed_matmul
    from sparsec.codegen.measure import run_poisoned
    from sparsec.codegen.spec import MatmulSpec

    device = torch.cuda.get_device_name()
    ceil = ceilings()
    rows, ok = [], True
    print(f"{device}, torch {torch.__version__}; GB/s: sparsec's bytes (values, int32 indices, x, y, bias) / time, "
          f"against the read ceiling measured now, {ceil['read_GBps']:.0f} GB/s")
    print(f"{'dtype':>8} {'S':>5} {'batch':>5} | {'sparsec us':>10} {'dense us':>9} {'x dense':>7} {'csr us':>8} {'x csr':>6} | "
          f"{'GB/s':>6} {'%rd':>4} | err")
    for dtype in (torch.float16, torch.float32):
        act = str(dtype).removeprefix("torch.")
        spec = MatmulSpec(act, act, True, None, False, act, format="fanin")
        name, source = emit_matmul(spec, [])
        for sparsity in (0.8, 0.9, 0.95):
            torch.manual_seed(0)
            w = torch.randn(768, 3072, device="cuda")
            k = max(1, int(w.numel() * (1 - sparsity)) // 768)
            mask = ref.fanin_mask(w, k)
            values, indices = ref.fanin_compress(w, mask)
            dense = (w * mask).to(dtype)
            values, bias = values.to(dtype), torch.randn(768, device="cuda", dtype=dtype)
            csr = dense.float().to_sparse_csr() if dtype == torch.float32 else None
            for batch in (1, 8, 64, 256):
                x = torch.randn(batch, 3072, device="cuda", dtype=dtype)
                y = run_poisoned(lambda out: condensed_matmul(x, values, indices, None, bias, None, spec, name, source,
                                                              out=out), (batch, 768), dtype, "cuda")  # all written?
                expected = x.double() @ dense.double().t() + bias.double()
                err = float((y.double() - expected).abs().max() / expected.abs().max())
                ok &= err < (2e-3 if dtype == torch.float16 else 1e-4)
                t_sparse = median_time(lambda: condensed_matmul(x, values, indices, None, bias, None, spec, name, source))
                t_dense = median_time(lambda: F.linear(x, dense, bias))
                t_csr = median_time(lambda: torch.sparse.mm(csr, x.t()), graph=False) if csr is not None else None
                moved = sum(t.numel() * t.element_size() for t in (values, indices, x, bias)) + batch * 768 * x.element_size()
                row = {"dtype": act, "sparsity": sparsity, "k": k, "batch": batch, "sparsec_s": t_sparse,
                       "dense_s": t_dense, "csr_s": t_csr, "vs_dense": t_dense / t_sparse,
                       "vs_csr": t_csr / t_sparse if t_csr else None, "max_rel_err": err,
                       "sparsec_GBps": moved / t_sparse / 1e9, "of_read_ceiling": moved / t_sparse / 1e9 / ceil["read_GBps"]}
                rows.append(row)
                csr_text = f"{1e6 * t_csr:8.1f} {row['vs_csr']:6.2f}" if t_csr else f"{'-':>8} {'-':>6}"
                print(f"{act:>8} {sparsity:5.2f} {batch:5d} | {1e6 * t_sparse:10.1f} {1e6 * t_dense:9.1f} "
                      f"{row['vs_dense']:7.2f} {csr_text} | {row['sparsec_GBps']:6.0f} {100 * row['of_read_ceiling']:3.0f}% "
                      f"| {err:.1e}", flush=True)
    write_results("condensed-gpu", device, {"benchmark": "condensed fan-in 3072->768 on GPU", "ceilings": ceil,
                                            "rows": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
