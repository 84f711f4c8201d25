"""The decode kernel's launches for Nsight Compute to read: where a one-row 2:4 call spends its time.

The H100 runs of 2026-11-24 left the decode kernel at ~1e12 kept weights/s whatever its bytes (fp16 or
int8 values), its integer work (PRMT_EXPAND halves it) or its tile: no single unit explains it
(bench/gpu_notes.md). Stall reasons and achieved occupancy say which it is. This script launches the
kernel at 1 x 14336 x 4096 (one MLP up-projection of a decode step), fp16 and int8 values, at the
configs that won those rows, each checked against torch first and then launched `--launches` more
times, in a fixed order that it prints, so the profile's launches can be told apart.

    ncu -k regex:sparse24 --section WarpStateStats ... python bench/profile_decode.py   (gpu_session.sh ncu)
    python bench/profile_decode.py                                                       (runs it unprofiled)

Without CUDA it says so and exits 0; under TRITON_INTERPRET=1 it runs on the CPU instead (small --n / --k,
the interpreter cannot run PRMT_EXPAND's inline PTX), which is how tests/test_bench.py checks it.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import arg_parser, parse_args, positive_int  # noqa: E402

# the configs that won the M = 1 rows on the H100 (2026-11-24): the CUDA-core form, as it ran then (num_stages 1:
# each K block's loads waited for) and loading the next K block ahead (num_stages 3 since, configs.prefetches),
# and the 16-row tile; then the CUDA-core form's GATHER twins (new since, not yet run on a GPU)
CONFIGS = [dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, GATHER=0, num_warps=4, num_stages=1),
           dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, GATHER=0, num_warps=4, num_stages=3),
           dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, GATHER=0, num_warps=4, num_stages=4),
           dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, GATHER=1, num_warps=8, num_stages=1),
           dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=4, GATHER=1, num_warps=8, num_stages=3)]


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--n", type=positive_int, default=14336, help="output features")
    parser.add_argument("--k", type=positive_int, default=4096, help="input features")
    parser.add_argument("--launches", type=positive_int, default=1, help="launches per config after its check")
    args = parse_args(parser)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("profile_decode: no CUDA device; nothing to profile")
        return 0
    device = "cuda" if cuda else "cpu"
    import sparsec
    from bench_sparse24 import kernel_call, relative_error
    from sparsec.runtime.triton_linear import TritonSparseLinear

    torch.manual_seed(0)
    x = torch.randn(1, args.k, dtype=torch.float16, device=device)
    order = []
    for quantize in (None, "int8"):
        model = nn.Sequential(nn.Linear(args.k, args.n, bias=False)).half().to(device)
        cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="triton", include=[".*"],
                             min_weights=0, quantize=quantize)
        layer = next(m for m in cm.modules() if isinstance(m, TritonSparseLinear))
        expected = (x.double() @ cm.effective_weight("0").double().t())
        for cfg in CONFIGS:
            for prmt in ((0, 1) if cuda and not cfg["GATHER"] else (0,)):  # (GATHER expands nothing)
                config = dict(cfg, PRMT_EXPAND=prmt)
                with torch.no_grad():
                    error = relative_error(kernel_call(layer, x, config), expected)
                    if not error < 1e-2:
                        raise AssertionError(f"{quantize or 'fp16'} {config}: error {error:.2g} against torch")
                    for _ in range(args.launches):
                        kernel_call(layer, x, config)
                if cuda:
                    torch.cuda.synchronize()
                order.append(f"{quantize or 'fp16'} values, {config}: 1 check + {args.launches} launches")
    print("launch order (each line: its check, then its launches):")
    for i, line in enumerate(order):
        print(f"  {i}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
