"""Static cost of the generated 2:4 kernels, without a GPU: registers, stack frame (spills), shared
memory, and the machine instructions the main K loop issues per weight, read from the sm_90 / sm_80
cubins Triton builds on this machine (cuobjdump from Triton's NVIDIA backend).

Why instructions per weight: at decode sizes (M <= 16) the kernel must expand 2:4 tiles in registers
as fast as HBM delivers them. An H100 issues about 132 SMs x 128 lanes x 1.75 GHz = 30 T thread
instructions/s and streams about 3 TB/s, i.e. roughly 11 instructions per weight (1.125 bytes of
2:4 fp16) before the expansion, not the memory, sets the time. This is a model, not a timing:
bench_sparse24.py on a GPU measures.

    python bench/kernel_stats.py      # writes bench/results/kernel-stats-<date>.json
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ["TRITON_INTERPRET"] = "0"

SPECS = [("float16", "float16"), ("float16", "int8"), ("bfloat16", "bfloat16")]
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (4096, 4096, 4096)]
SM90_THREAD_INSTR_PER_S = 132 * 128 * 1.75e9


def loop_instructions(cubin: bytes) -> int | None:
    """Instructions inside the longest backward-branch loop of the kernel's SASS (the K loop)."""
    from sparsec.codegen.aot import cuobjdump

    sass = cuobjdump(cubin, "-sass")
    if sass is None:
        return None
    addresses = []
    loops = []
    for line in sass.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not found:
            continue
        address = int(found.group(1), 16)
        addresses.append(address)
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", found.group(2))
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        return None
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return sum(1 for a in addresses if start <= a <= end)


def main() -> int:
    import triton

    from sparsec.codegen.aot import compile_for, matmul_signature, resource_usage
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.configs import matmul_config
    from sparsec.codegen.spec import MatmulSpec
    from results_io import write_results

    rows = []
    print(f"{'kernel':<28} {'M':>5} {'tiles':>14} {'split':>5} {'warps':>5} | {'arch':>5} {'regs':>4} {'stack':>5} "
          f"{'smem KB':>7} {'instr/weight':>12} {'expand us':>9}")
    for act, weight in SPECS:
        spec = MatmulSpec(act, weight, True, "gelu", False, act)
        name, source = emit_matmul(spec, [])
        for m, n, k in SHAPES:
            cfg = matmul_config(m, n, k, act, sms=132)
            constexprs = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K")}
            constexprs["EVEN_K"] = k % cfg["BLOCK_K"] == 0
            for cap in (90, 80):
                compiled = compile_for(cap, name, source, matmul_signature(spec), constexprs, cfg["num_warps"],
                                       cfg["num_stages"])
                usage = resource_usage(compiled.asm["cubin"]) or {}
                loop = loop_instructions(compiled.asm["cubin"])
                threads = 32 * cfg["num_warps"]
                per_weight = loop * threads / (cfg["BLOCK_N"] * cfg["BLOCK_K"]) if loop else None
                # time to issue the expansion of every weight once (every M tile re-expands its weights)
                tiles_m = -(-m // cfg["BLOCK_M"])
                expand_s = per_weight * n * k * tiles_m / SM90_THREAD_INSTR_PER_S if per_weight else None
                row = {"kernel": spec.short_name(), "M": m, "N": n, "K": k, "config": cfg, "arch": f"sm_{cap}",
                       "registers": usage.get("REG"), "stack_bytes": usage.get("STACK"),
                       "shared_bytes": compiled.metadata.shared, "loop_instructions": loop,
                       "instructions_per_weight": per_weight,
                       "expand_issue_us_h100_model": expand_s * 1e6 if expand_s and cap == 90 else None}
                rows.append(row)
                tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
                print(f"{spec.short_name():<28} {m:5d} {tiles:>14} {cfg['SPLIT_K']:5d} {cfg['num_warps']:5d} | "
                      f"{'sm_' + str(cap):>5} {usage.get('REG', '?'):>4} {usage.get('STACK', '?'):>5} "
                      f"{compiled.metadata.shared / 1024:7.1f} {per_weight or float('nan'):12.2f} "
                      f"{(expand_s or float('nan')) * 1e6 if cap == 90 else float('nan'):9.2f}", flush=True)
    # condensed constant fan-in (values + int32 indices, gather + reduce): per kept weight and row of x
    from sparsec.codegen.aot import condensed_signature
    from sparsec.codegen.configs import condensed_config

    spec = MatmulSpec("float16", "float16", True, "relu", False, "float16", format="fanin")
    name, source = emit_matmul(spec, [])
    for m, n, fanin in ((1, 768, 307), (8, 768, 307)):
        cfg = condensed_config(m, n, fanin)
        constexprs = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_J")}
        compiled = compile_for(90, name, source, condensed_signature(spec), constexprs, cfg["num_warps"], 3)
        usage = resource_usage(compiled.asm["cubin"]) or {}
        loop = loop_instructions(compiled.asm["cubin"])
        per_weight_row = loop * 32 * cfg["num_warps"] / (cfg["BLOCK_N"] * cfg["BLOCK_J"] * cfg["BLOCK_M"]) if loop else None
        rows.append({"kernel": spec.short_name(), "M": m, "N": n, "fanin": fanin, "config": cfg, "arch": "sm_90",
                     "registers": usage.get("REG"), "stack_bytes": usage.get("STACK"),
                     "shared_bytes": compiled.metadata.shared, "loop_instructions": loop,
                     "instructions_per_kept_weight_and_row": per_weight_row})
        print(f"{spec.short_name():<28} {m:5d} {'fan-in ' + str(fanin):>14} {'':>5} {cfg['num_warps']:5d} | {'sm_90':>5} "
              f"{usage.get('REG', '?'):>4} {usage.get('STACK', '?'):>5} {compiled.metadata.shared / 1024:7.1f} "
              f"{per_weight_row or float('nan'):12.2f}   (per kept weight and row)")
    write_results("kernel-stats", "static-sm80-sm90",
                  {"benchmark": "static kernel cost (no GPU): registers, spills, shared memory, SASS per weight",
                   "triton": triton.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
