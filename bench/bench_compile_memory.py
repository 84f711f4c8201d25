"""Peak memory of sparsec.compile on a model with one large layer, against the model's own size.

A model of three linear layers, the middle one OUT x 4096 (default 32768 x 4096: 256 MiB in bfloat16),
compiled with the largest layer included, backend "torch", under each pattern / quantization. Each case
runs in a fresh process that measures its resident memory's high-water mark (Linux VmHWM, reset
before the compile): the peak above what the process held before compile. The baseline is
copy.deepcopy of the model, measured the same way: compile works on a private copy, so that much it
takes at least. Prints peak / model size and writes bench/results/compile-memory-<host>-<date>.json.

    python bench/bench_compile_memory.py [--out DIR] [--out-features 32768] [--cases N]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import arg_parser, parse_args, positive_int, write_results  # noqa: E402

CASES = [("bfloat16", dict(pattern="2:4")), ("bfloat16", dict(pattern="2:4", quantize="int8")),
         ("bfloat16", dict(pattern="2:4", quantize="auto")), ("bfloat16", dict(pattern="2:4", quantize="log2:4")),
         ("bfloat16", dict(pattern="2:4", quantize="codebook:4")), ("bfloat16", dict(pattern="fanin:0.9")),
         ("bfloat16", dict(pattern="unstructured:0.9")), ("float32", dict(pattern="2:4")),
         ("float32", dict(pattern="2:4", quantize="int8"))]
REDUCTION = 4096


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _measure(work) -> dict:
    """Peak and retained resident memory (MiB) of work() above what the process held before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status_mib("VmRSS:")
    start = time.perf_counter()
    kept = work()
    seconds = time.perf_counter() - start
    gc.collect()
    result = {"peak_mib": _status_mib("VmHWM:") - base, "retained_mib": _status_mib("VmRSS:") - base, "seconds": seconds}
    del kept
    return result


def child(dtype_name: str, config: dict, out_features: int) -> dict:
    import sparsec

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.no_grad():
        model = nn.Sequential(nn.Linear(256, REDUCTION), nn.Linear(REDUCTION, out_features), nn.Linear(out_features, 256)).to(dtype)
    x = torch.randn(2, 256, dtype=dtype)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if config.get("baseline"):
        return {"model_mib": model_mib, **_measure(lambda: copy.deepcopy(model))}
    found = {}

    def compile_it():
        cm = sparsec.compile(model, example_inputs=(x,), backend="torch", include=["1"], **config)
        found["sparsity"], found["quant"] = cm.plan["1"].sparsity, cm.plan["1"].quant
        return cm

    row = _measure(compile_it)
    if found["sparsity"] is None:
        raise RuntimeError(f"the large layer stayed dense under {config}: nothing measured")
    return {"model_mib": model_mib, **row, **found}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--out-features", type=positive_int, default=32768, help="rows of the large layer")
    parser.add_argument("--cases", type=positive_int, default=len(CASES), help="run the first N cases only")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one case, run by the parent in a fresh process
    args = parse_args(parser)
    if args.child:
        dtype_name, config = json.loads(args.child)
        print(json.dumps(child(dtype_name, config, args.out_features)))
        return
    rows = []
    for dtype_name, config in [(d, {"baseline": True}) for d in ("bfloat16", "float32")] + CASES[:args.cases]:
        done = subprocess.run([sys.executable, __file__, "--out-features", str(args.out_features), "--out", args.out,
                               "--child", json.dumps([dtype_name, config])], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"case {dtype_name} {config} failed:\n{done.stderr[-3000:]}")
        row = {"dtype": dtype_name, "config": config, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        label = "copy.deepcopy (baseline)" if config.get("baseline") else ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"{dtype_name:9s} {label:34s} peak +{row['peak_mib']:7.0f} MiB = {row['peak_mib'] / row['model_mib']:5.2f}x "
              f"the model ({row['model_mib']:.0f} MiB); retained +{row['retained_mib']:6.0f} MiB; {row['seconds']:6.2f} s",
              flush=True)
    import sparsec

    write_results("compile-memory", f"cpu{os.cpu_count()}", {
        "benchmark": "peak resident memory of sparsec.compile (VmHWM above the pre-compile size), one large layer",
        "large_layer": [args.out_features, REDUCTION], "sparsec": sparsec.__version__, "rows": rows})


if __name__ == "__main__":
    main()
