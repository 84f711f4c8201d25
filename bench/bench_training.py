"""Training step of a transformer MLP block on a GPU: dense vs SDGP (2:4 data gradients) vs 2:4
weights + SDGP. One call checks and times everything and writes
bench/results/training-<device>-<date>.json plus a printed table; without CUDA it says so and exits 0.

Block: LayerNorm -> Linear(d, h) -> GELU -> Linear(h, d) (the LayerNorm is trainable, so fc1's data
gradient is needed, as inside a real network). Widths (768, 3072) and (4096, 14336), 8192 tokens,
fp16 and bf16 (parameters in that dtype, as in a pure low-precision step). A step is forward +
backward + SGD update. Before timing, fc2's data gradient (SDGP alone, and with 2:4 weights) is
checked against prune(dY) @ W in plain torch (dY pruned by the tests' oracle) and the 2:4 weights
against the oracle's pruning; a failed check exits 1. Target (issue 5): SDGP step >= 10% faster than dense on an H100 (the
paper projects 15-25% with 2:4 hardware for the data-gradient GEMM).

    python bench/bench_training.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from results_io import (arg_parser, effective_weight_error, load_oracle, parse_args, skip_without_cuda,  # noqa: E402
                        write_results)

TOLERANCE = 1e-2  # dgrad, relative to its largest element: fp16 / bf16 GEMMs (H100, 2026-11-23: 2e-4 / 2e-3)


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def loss_of(y: torch.Tensor) -> torch.Tensor:
    """Mean square, scaled by 2^16 for fp16 as torch.amp.GradScaler starts: unscaled, this loss's
    gradients (2 y / 6M to 34M elements) sit under fp16's normal range, where every fp16 backward, dense
    included, loses most of their bits."""
    return y.float().square().mean() * (2.0 ** 16 if y.dtype == torch.float16 else 1.0)


def time_step(model: nn.Module, x: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = loss_of(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from sparsec.codegen.timing import time_cuda

    return time_cuda(step)


def check_dgrad(model_sdgp, x: torch.Tensor) -> float:
    """Relative gap between SDGP's fc2 data gradient and prune(dY) @ W computed in plain torch, dY
    pruned 2:4 along the output features by the tests' independent oracle (tests/oracle.py)."""
    oracle = load_oracle()
    fc2 = model_sdgp.sparse_module("fc2")
    captured = {}
    h = fc2.register_full_backward_hook(lambda mod, gin, gout: captured.update(dx=gin[0], dy=gout[0]))
    loss_of(model_sdgp(x)).backward()
    h.remove()
    model_sdgp.zero_grad(set_to_none=True)
    dy = captured["dy"].reshape(-1, captured["dy"].shape[-1]).float()
    mask = oracle.oracle_nm_mask(dy.cpu(), 2, 4).to(dy.device)  # (the oracle ranks on the CPU)
    expected = (dy * mask) @ fc2.effective_weight().float()  # float32 GEMM on the device, as sparsec's is checked
    got = captured["dx"].reshape(-1, expected.shape[-1]).float()
    return float((got - expected).abs().max() / expected.abs().max())


def run_case(d: int, h: int, dtype: torch.dtype, device: str = "cuda", tokens: int = 8192, timer=time_step) -> dict:
    """One row; the smoke test (tests/test_bench.py) runs it small on a CPU in float32, timer a counter."""
    import sparsec

    torch.manual_seed(0)
    dense = Block(d, h).to(device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    # (the block stands for one inside a transformer, where fc2 is not the model's last layer: included, its
    # data gradient is pruned, which SDGP's default leaves dense on the last layer)
    sdgp = sparsec.compile(dense, pattern="dense", example_inputs=(x,), train=True, grad_pattern="2:4",
                           include=["fc1", "fc2"])
    both = sparsec.compile(dense, pattern="2:4", example_inputs=(x,), train=True, grad_pattern="2:4",
                           include=["fc1", "fc2"])
    err, err_both = check_dgrad(sdgp, x), check_dgrad(both, x)
    weight_err = effective_weight_error(both, dense)  # 2:4 weights, against the oracle's pruning
    ok = err <= TOLERANCE and err_both <= TOLERANCE and weight_err <= 1e-6
    t_dense, t_sdgp, t_both = timer(dense, x), timer(sdgp, x), timer(both, x)
    return {"d": d, "h": h, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
            "dense_s": t_dense, "sdgp_s": t_sdgp, "sparse_weights_sdgp_s": t_both,
            "sdgp_speedup": t_dense / t_sdgp, "sparse_weights_sdgp_speedup": t_dense / t_both,
            "dgrad_rel_err": err, "dgrad_rel_err_sparse_weights": err_both, "weight_rel_err": weight_err, "ok": ok,
            "plan_grad": {lp.name: lp.grad_sparsity for lp in sdgp.plan}}


def main() -> int:
    parse_args(arg_parser(__doc__))
    if skip_without_cuda("bench_training"):
        return 0
    from bench_sparse24 import ceilings

    device = torch.cuda.get_device_name()
    ceil = ceilings()
    rows = []
    print(f"{device}, torch {torch.__version__}; dense step's TFLOP/s (its 6 GEMMs, 12 tokens d h) against the "
          f"fp16 GEMM ceiling measured now, {ceil['fp16_gemm_TFLOPs']:.0f} TFLOP/s")
    print(f"{'d':>5} {'h':>6} {'dtype':>9} | {'dense ms':>9} {'TF/s':>5} {'%fl':>4} {'SDGP ms':>8} {'x':>5} "
          f"{'2:4+SDGP ms':>11} {'x':>5} | dgrad err (SDGP, 2:4+SDGP) | ok")
    for d, h in [(768, 3072), (4096, 14336)]:
        for dtype in (torch.float16, torch.bfloat16):
            row = run_case(d, h, dtype)
            row["dense_TFLOPs"] = 12 * row["tokens"] * d * h / row["dense_s"] / 1e12  # 2 layers x 3 GEMMs x 2 t d h
            row["dense_of_gemm_ceiling"] = row["dense_TFLOPs"] / ceil["fp16_gemm_TFLOPs"]
            rows.append(row)
            print(f"{d:5d} {h:6d} {row['dtype']:>9} | {1e3 * row['dense_s']:9.2f} {row['dense_TFLOPs']:5.0f} "
                  f"{100 * row['dense_of_gemm_ceiling']:3.0f}% {1e3 * row['sdgp_s']:8.2f} "
                  f"{row['sdgp_speedup']:5.2f} {1e3 * row['sparse_weights_sdgp_s']:11.2f} "
                  f"{row['sparse_weights_sdgp_speedup']:5.2f} | {row['dgrad_rel_err']:.1e}, "
                  f"{row['dgrad_rel_err_sparse_weights']:.1e} | {'yes' if row['ok'] else 'NO'}", flush=True)
    write_results("training", device, {"benchmark": "MLP block training step", "ceilings": ceil, "rows": rows})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
