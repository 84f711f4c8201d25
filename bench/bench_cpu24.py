"""2:4 linear layers on the CPU: the bitmask kernel (sparsec/runtime/bitmask_cpu.py) against dense.

Per layer shape (N x K), batch M and weight format (fp32; int8 + scales with fp32 x; bf16 with bf16 x):
  dense    F.linear on the pruned weight (what the original model costs: oneDNN / MKL sgemm)
  torch    sparsec's torch runtime: rebuild the dense weight from values + metadata, then F.linear
           (what backend="torch" runs, and what auto ran on CPU before the kernel)
  bitmask  the C++ kernel on the packed values plus one bit per weight
and whole models compiled with backend="auto" against the original: 12 blocks of a GPT-2-small MLP
(768 -> 3072 -> 768, ReLU; the first and last layers stay dense, as the plan says; float32, and
bfloat16 at the two smaller batches), and a 9-conv CNN
(64 / 128 / 256 channels on 32 x 32 images), whose 2:4 convs auto keeps dense (no CPU conv kernel).
Every method is checked first against plain torch: each layer against float64 on its pruned (and
dequantized) weight, itself checked on 256 rows against the independent oracle of the tests
(tests/oracle.py); each model against the original model on weights the oracle pruned. Then methods take turns in rounds (drift on a shared
2-core VM hits them alike) and the tables give medians. Bandwidth is weight bytes read per call over
the time, against a read ceiling measured in the same run (sum of a 256 MB tensor); FLOP rates are
dense-equivalent (2 M N K), against dense GEMM rates measured in the same run (2048^3, fp32 and bf16).
The run records how much CPU time other processes took meanwhile, and warns when they disturbed it.

    python bench/bench_cpu24.py [--rounds 7] [--shapes small]
writes bench/results/cpu24-cpu<cores>-<date>.json
"""
from __future__ import annotations

import functools
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sparsec  # noqa: E402
from results_io import (Disturbance, arg_parser, cpu_ceilings, in_rounds, load_oracle, parse_args,  # noqa: E402
                        positive_int, write_results)
from sparsec import reference as ref  # noqa: E402
from sparsec.runtime import bitmask_cpu  # noqa: E402
from sparsec.runtime.packed import NMPacked  # noqa: E402
from sparsec.patterns import NM  # noqa: E402

oracle = load_oracle()  # tests/oracle.py: the plain-torch reference, written apart from sparsec.reference

SHAPES = {"full": [(3072, 768), (768, 3072), (4096, 4096), (14336, 4096)], "small": [(256, 128)]}
BATCHES = {"full": [1, 16, 256], "small": [1, 5]}


def checked(fns: dict, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Every method's output against `expected` (plain torch on weights checked against the oracle)."""
    for name, fn in fns.items():
        error = float((fn().float() - expected.float()).abs().max()) / max(float(expected.abs().max()), 1e-30)
        if not error <= tolerance:
            raise AssertionError(f"{name} differs from plain torch on the pruned weight by {error:.2g} "
                                 f"of its largest output")


def check_against_oracle(w: torch.Tensor, dense: torch.Tensor, quant: str | None, rows: int = 256) -> None:
    """`dense` (sparsec's pruned, dequantized weight) against tests/oracle.py's 2:4 pruning (and int8
    fake quantization) of `w`, on `rows` rows spread over the layer: both are per row, and the oracle's
    row-by-row int8 takes minutes on a whole 14336 x 4096 weight."""
    pick = torch.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).round().long().unique()
    expected = oracle.pruned_weight(w[pick], "linear", "2:4", quant).double()
    error = float((dense[pick].double() - expected).abs().max() / expected.abs().max())
    if not error <= 1e-6:
        raise AssertionError(f"sparsec's pruned weight differs from the oracle's by {error:.2g} of its largest weight")


# weight formats: (layer dtype, quantization); bf16 layers take bf16 inputs and round y to bf16 (2^-8)
FORMATS = {"fp32": (torch.float32, None), "int8": (torch.float32, "int8"), "bf16": (torch.bfloat16, None)}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.lru_cache(maxsize=len(FORMATS))  # (rows run shape -> batch -> format: each shape's weights built once)
def layer_weights(n: int, k: int, weights: str):
    """(packed, the bitmask kernel's layout, the baseline's dense weight) of one seeded N x K layer."""
    dtype, quant = FORMATS[weights]
    torch.manual_seed(0)
    w = torch.randn(n, k).to(dtype)
    packed = NMPacked.pack(w, ref.nm_mask(w, 2, 4), NM(2, 4), quant)
    dense = packed.rows(dtype).contiguous()  # the baseline's weight, checked against the oracle's pruning
    check_against_oracle(w, dense, quant)
    return packed, bitmask_cpu.prepare(packed.values, packed.mask(), packed.scales), dense


def layer_rows(n: int, k: int, m: int, weights: str, rounds: int, ceilings: dict) -> dict:
    dtype, quant = FORMATS[weights]
    packed, layout, dense = layer_weights(n, k, weights)
    torch.manual_seed(m)
    x = torch.randn(m, k).to(dtype)
    fns = {"dense": lambda: F.linear(x, dense), "torch": lambda: F.linear(x, packed.rows()),
           "bitmask": lambda: bitmask_cpu.bitmask_linear(x, layout)}
    with torch.no_grad():
        checked(fns, F.linear(x.double(), dense.double()), TOLERANCE[dtype])
        times = in_rounds(fns, rounds)
    # weight bytes each method reads per call (the torch runtime reads the packed form it rebuilds from)
    weight_bytes = {"dense": nbytes(dense), "bitmask": nbytes(layout.values, layout.masks, layout.scales),
                    "torch": nbytes(packed.values, packed.meta, packed.scales)}
    flop_ceiling = ceilings["gemm_gflops"]["bfloat16" if dtype == torch.bfloat16 else "float32"]
    row = {"N": n, "K": k, "M": m, "weights": weights,
           "us": {name: 1e6 * t for name, t in times.items()},
           "x_dense": {name: times["dense"] / t for name, t in times.items()},
           "weight_gbs": {name: weight_bytes[name] / 1e9 / t for name, t in times.items()},
           "gflops": {name: 2 * m * n * k / 1e9 / t for name, t in times.items()},  # dense-equivalent FLOPs
           "read_ceiling_gbs": ceilings["read_gbs"], "gemm_ceiling_gflops": flop_ceiling}
    row["of_read_ceiling"] = {name: gbs / ceilings["read_gbs"] for name, gbs in row["weight_gbs"].items()}
    row["of_gemm_ceiling"] = {name: gf / flop_ceiling for name, gf in row["gflops"].items()}
    return row


def mlp_stack(blocks: int, d: int, hidden: int) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.ReLU()]
    return nn.Sequential(*layers)


def cnn_stack(width: int) -> nn.Module:
    """A small ResNet-like CNN without the skips: 3 stages of 3x3 convs (width, 2x, 4x channels, the
    image halved between stages), a pooled linear head. Its sparse layers are convs, which no C++
    kernel runs: backend auto keeps their pruned weights dense."""
    def stage(c_in: int, c: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*stage(3, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def model_rows(name: str, model: nn.Module, input_of, batches: list[int], rounds: int,
               dtype: torch.dtype = torch.float32) -> list[dict]:
    """The model compiled with backend auto at each batch, against the original and the torch runtime."""
    model = model.eval().to(dtype)
    rows, references = [], {}
    for m in batches:
        x = input_of(m).to(dtype)
        start = time.perf_counter()
        cm = sparsec.compile(model, example_inputs=(x,))
        compile_s = time.perf_counter() - start
        torch_rt = sparsec.compile(model, example_inputs=(x,), backend="torch")
        fns = {"original": lambda: model(x), "auto": lambda: cm(x), "torch": lambda: torch_rt(x)}
        with torch.no_grad():
            # the reference: the original model, each layer the plan makes sparse pruned by the oracle
            decisions = tuple((lp.name, lp.sparsity, lp.quant) for lp in cm.plan)  # (the same at every batch)
            if decisions not in references:
                references[decisions] = oracle.pruned_model(model, cm.plan)
            checked({"auto": fns["auto"], "torch": fns["torch"]}, references[decisions](x), TOLERANCE[dtype])
            times = in_rounds(fns, rounds)
        backends = sorted({lp.backend for lp in cm.plan.sparse_layers})
        rows.append({"model": name, "M": m, "compile_s": compile_s, "backends": backends,
                     "us": {k: 1e6 * t for k, t in times.items()},
                     "x_original": {k: times["original"] / t for k, t in times.items()}})
    return rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="full")
    args = parse_args(parser)
    if not bitmask_cpu.is_available():
        print("bench_cpu24: the C++ bitmask kernel is not available here (no compiler?); nothing to time.")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    disturbance = Disturbance()
    ceilings = cpu_ceilings()
    print(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} threads, kernel isa {bitmask_cpu.isa()}; ceilings "
          f"measured now: read {ceilings['read_gbs']:.1f} GB/s, GEMM fp32 {ceilings['gemm_gflops']['float32']:.0f} / "
          f"bf16 {ceilings['gemm_gflops']['bfloat16']:.0f} GFLOP/s")
    print(f"medians of {args.rounds} rounds; bitmask's weight GB/s and dense-equivalent GFLOP/s, each with its share "
          f"of the ceiling (GEMM ceiling of the layer's dtype)")
    print(f"{'N x K':>12} {'M':>4} {'weights':>7} {'dense us':>10} {'torch us':>10} {'bitmask us':>10} "
          f"{'x dense':>8} {'GB/s':>6} {'%rd':>4} {'GFLOP/s':>8} {'%fl':>4}")
    layers = []
    for n, k in SHAPES[args.shapes]:
        for m in BATCHES[args.shapes]:
            for weights in FORMATS:
                r = layer_rows(n, k, m, weights, args.rounds, ceilings)
                layers.append(r)
                print(f"{n:>5} x {k:<5} {m:>4} {r['weights']:>7} {r['us']['dense']:>10.1f} {r['us']['torch']:>10.1f} "
                      f"{r['us']['bitmask']:>10.1f} {r['x_dense']['bitmask']:>7.2f}x "
                      f"{r['weight_gbs']['bitmask']:>6.1f} {100 * r['of_read_ceiling']['bitmask']:>3.0f}% "
                      f"{r['gflops']['bitmask']:>8.1f} {100 * r['of_gemm_ceiling']['bitmask']:>3.0f}%", flush=True)
    small = args.shapes == "small"
    blocks, d, hidden, width, image = (2, 64, 128, 8, 8) if small else (12, 768, 3072, 64, 32)
    torch.manual_seed(0)
    models = model_rows(f"{blocks} x MLP {d}->{hidden}->{d}", mlp_stack(blocks, d, hidden),
                        lambda m: torch.randn(m, d), BATCHES[args.shapes], args.rounds)
    torch.manual_seed(0)
    models += model_rows(f"{blocks} x MLP {d}->{hidden}->{d} bf16", mlp_stack(blocks, d, hidden),
                         lambda m: torch.randn(m, d), BATCHES[args.shapes][:2], args.rounds, torch.bfloat16)
    models += model_rows(f"CNN {width}/{2 * width}/{4 * width} channels on {image}x{image}", cnn_stack(width),
                         lambda m: torch.randn(m, 3, image, image), [1, 16] if not small else [1, 2], args.rounds)
    for r in models:
        print(f"{r['model']}, M={r['M']}: original {r['us']['original']:.0f} us, auto {r['us']['auto']:.0f} us "
              f"({r['x_original']['auto']:.2f}x, {'/'.join(r['backends'])}), torch runtime {r['us']['torch']:.0f} us "
              f"({r['x_original']['torch']:.2f}x); compile {r['compile_s']:.1f} s")
    write_results("cpu24", f"cpu{os.cpu_count()}", {"threads": torch.get_num_threads(), "isa": bitmask_cpu.isa(),
                                                    "rounds": args.rounds, "read_ceiling_gbs": ceilings["read_gbs"],
                                                    "gemm_ceiling_gflops": ceilings["gemm_gflops"],
                                                    **disturbance.report(), "layers": layers, "models": models})


if __name__ == "__main__":
    main()
