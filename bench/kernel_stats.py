"""Static cost of the generated 2:4 kernels, without a GPU: registers, stack frame (spills), shared
memory, and the machine instructions the main K loop issues per weight, read from the sm_90 / sm_80
cubins Triton builds on this machine (cuobjdump from Triton's NVIDIA backend).

Why instructions per weight: at decode sizes (M <= 16) the kernel must expand 2:4 tiles in registers
as fast as HBM delivers them (about 3 TB/s on an H100: 6.3 us for a 4096 x 4096 fp16 2:4 weight,
3.5 us with int8 values). The model counts the K loop's SASS per weight by the unit that runs it
(per SM and clock on sm_80 / sm_90, CUDA programming guide throughput table): any instruction
issues at 128 threads/clk; integer ALU work (LOP3, SHF, PRMT, ISETP, SEL, IADD3, LEA, ...) and IMAD
at 64; fp16x2 / fp32 arithmetic at 128; conversions (I2F, F2F, ...) at 16. The slowest unit sets the
expansion time, assuming perfect overlap with memory: a lower bound, not a timing. bench_sparse24.py
on a GPU measures. Also per weight: the bytes the K loop moves through shared memory (cp.async
landing zones, the expanded tile's trip into the dot's operand layout, ldmatrix), at 128 bytes per
SM and clock. (On the H100, 2026-11-23, neither bound ordered the decode configs' measured times:
1x32x128 moves 4.3 B/w, 16x32x128 11.6 B/w, and the second was the faster by 12%.)

    python bench/kernel_stats.py [--out DIR]   # writes <DIR or bench/results>/kernel-stats-static-sm80-sm90-<date>.json
"""
from __future__ import annotations

import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ["TRITON_INTERPRET"] = "0"

SPECS = [("float16", "float16", 0), ("float16", "float16", 1), ("float16", "int8", 0), ("float16", "int8", 1),
         ("bfloat16", "bfloat16", 0), ("bfloat16", "bfloat16", 1), ("bfloat16", "int8", 0), ("bfloat16", "int8", 1),
         ("float32", "float32", 0)]
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (4096, 4096, 4096)]
H100_SMS, H100_CLOCK_HZ = 132, 1.755e9
# threads per SM and clock of each unit (sm_80 / sm_90); an opcode not listed only costs issue
UNIT_RATE = {"issue": 128, "alu": 64, "imad": 64, "fp": 128, "convert": 16}
UNIT_OF = {**{op: "alu" for op in ("LOP3", "SHF", "PRMT", "ISETP", "SEL", "IADD3", "LEA", "VIADD", "MOV", "IMNMX",
                                   "VIMNMX", "PLOP3", "FSEL", "SGXT", "BMSK", "LOP")},
           "IMAD": "imad", **{op: "fp" for op in ("FFMA", "FADD", "FMUL", "HADD2", "HFMA2", "HMUL2")},
           **{op: "convert" for op in ("I2F", "F2F", "F2I", "I2FP", "F2FP", "I2I")}}


def unit_instructions(opcodes: dict[str, int], threads: int, weights: int) -> dict[str, float]:
    """Per unit: thread instructions per weight it runs, for a loop of `opcodes` run by `threads`
    threads per iteration over `weights` weights. Every instruction costs issue; uniform-datapath
    (U*) instructions are not in UNIT_OF (they run once per warp)."""
    per_weight = {unit: 0.0 for unit in UNIT_RATE}
    for op, count in opcodes.items():
        per_weight["issue"] += count * threads / weights
        if op in UNIT_OF:
            per_weight[UNIT_OF[op]] += count * threads / weights
    return per_weight


def loop_instructions(cubin: bytes) -> list[str] | None:
    """The SASS instructions (without predicates) inside the longest backward-branch loop of the
    kernel (the K loop)."""
    from sparsec.codegen.aot import cuobjdump

    sass = cuobjdump(cubin, "-sass")
    if sass is None:
        return None
    instructions = []
    loops = []
    for line in sass.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not found:
            continue
        address = int(found.group(1), 16)
        instructions.append((address, found.group(2)))
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", found.group(2))
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    if not loops:
        return None
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [re.sub(r"^@!?U?P\w+\s+", "", text) for a, text in instructions if start <= a <= end]


def opcode_counts(loop: list[str]) -> dict[str, int]:
    """Opcode counts, without modifiers."""
    return dict(collections.Counter(text.split()[0].split(".")[0] for text in loop))


def shared_bytes(loop: list[str]) -> int:
    """Bytes one thread moves through shared memory per K step: loads (LDS, LDSM: ldmatrix moves 4 bytes
    a thread per 8 x 8 matrix), stores (STS) and asynchronous copies into it (LDGSTS, cp.async).
    At 128 bytes per SM and clock this is the third thing besides HBM and the ALUs that a K step
    can wait on."""
    total = 0
    for text in loop:
        op = text.split()[0]
        if not op.startswith(("LDS", "STS", "LDGSTS")):
            continue
        matrices = re.search(r"\.M88\.(\d)", op)
        if op.startswith("LDSM"):
            total += 4 * int(matrices.group(1)) if matrices else 4
        else:
            total += next((size for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1),
                                                       (".S8", 1)) if suffix in op), 4)
    return total


def finite_path(source: str) -> str:
    """The 2:4 kernel's source with its GATHER form's test for a finite x answered yes: the loop that then runs is
    the one to count, and the other (0 times x at pruned positions too, for an inf / NaN x) is longer, so
    loop_instructions would take it. (Registers and spills are read from the whole kernel.)"""
    test = "if _all_finite(x_row, k_start, k_end, 1024):"
    if test not in source:
        raise RuntimeError("kernel_stats: the 2:4 template's finite-x test changed; update finite_path")
    return source.replace(test, "if True:")


def configs_at(m: int, n: int, k: int, act: str, weight: str, prmt: int) -> list[dict]:
    """The shape table's config, and at M = 1 every other tile backend="auto" times (the K loop does
    not depend on the split, so each tile once)."""
    from sparsec.codegen.configs import matmul_candidates, matmul_config

    configs = [dict(matmul_config(m, n, k, act, sms=H100_SMS), PRMT_EXPAND=prmt)]
    if m == 1:
        for cfg in matmul_candidates(m, n, k, act, H100_SMS, weight):
            if dict(cfg, PRMT_EXPAND=prmt) == cfg and all(dict(cfg, SPLIT_K=c["SPLIT_K"]) != c for c in configs):
                configs.append(cfg)
    return configs


def main() -> int:
    import triton

    from results_io import arg_parser, parse_args, write_results

    parse_args(arg_parser(__doc__))

    from sparsec.codegen.aot import compile_for, matmul_signature, resource_usage
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.configs import derived_constexprs
    from sparsec.codegen.spec import MatmulSpec

    rows = []
    print(f"{'kernel':<30} {'M':>5} {'tiles/stages':>14} {'split':>5} {'warps':>5} | {'arch':>5} {'regs':>4} {'stack':>5} "
          f"{'smem KB':>7} {'instr/w':>7} {'alu/w':>5} {'cvt/w':>5} {'bound':>7} {'expand us':>9} {'smem B/w':>8} {'smem us':>7}")
    for act, weight, prmt in SPECS:
        spec = MatmulSpec(act, weight, True, "gelu", False, act)
        name, source = emit_matmul(spec, [])
        label = spec.short_name() + ("+prmt" if prmt else "")
        for m, n, k, cfg in [(m, n, k, cfg) for m, n, k in SHAPES for cfg in configs_at(m, n, k, act, weight, prmt)]:
            constexprs = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "PRMT_EXPAND",
                                                    "GATHER")}
            constexprs.update(derived_constexprs(cfg, k))
            for cap in (90, 80):
                launch = (matmul_signature(spec), constexprs, cfg["num_warps"], cfg["num_stages"])
                compiled = compile_for(cap, name, source, *launch)
                counted = compile_for(cap, name, finite_path(source), *launch) if cfg["GATHER"] else compiled
                usage = resource_usage(compiled.asm["cubin"]) or {}
                loop = loop_instructions(counted.asm["cubin"]) or []
                opcodes = opcode_counts(loop)
                per_weight = unit_instructions(opcodes, 32 * cfg["num_warps"], cfg["BLOCK_N"] * cfg["BLOCK_K"])
                shared_per_weight = shared_bytes(loop) * 32 * cfg["num_warps"] / (cfg["BLOCK_N"] * cfg["BLOCK_K"])
                clocks = {unit: per_weight[unit] / rate for unit, rate in UNIT_RATE.items()}  # SM clocks per weight
                bound = max(clocks, key=clocks.get)
                # every M tile re-expands its weights; the slowest unit across all SMs sets the time
                tiles_m = -(-m // cfg["BLOCK_M"])
                expand_s = clocks[bound] * n * k * tiles_m / (H100_SMS * H100_CLOCK_HZ) if opcodes else None
                row = {"kernel": label, "M": m, "N": n, "K": k, "config": cfg, "arch": f"sm_{cap}",
                       "registers": usage.get("REG"), "stack_bytes": usage.get("STACK"),
                       "shared_bytes": compiled.metadata.shared, "loop_opcodes": opcodes,
                       "instructions_per_weight": per_weight["issue"] if opcodes else None,
                       "alu_per_weight": per_weight["alu"], "convert_per_weight": per_weight["convert"],
                       "bound_unit": bound,
                       "expand_us_h100_model": expand_s * 1e6 if expand_s and cap == 90 else None,
                       "shared_memory_bytes_per_weight": shared_per_weight,
                       # shared memory moves 128 bytes per SM and clock (32 banks of 4 bytes), conflicts aside
                       "shared_memory_us_h100_model": shared_per_weight * n * k * tiles_m / (128 * H100_SMS * H100_CLOCK_HZ)
                       * 1e6 if cap == 90 else None}
                rows.append(row)
                tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}/{cfg['num_stages']}"
                print(f"{label:<30} {m:5d} {tiles:>14} {cfg['SPLIT_K']:5d} {cfg['num_warps']:5d} | "
                      f"{'sm_' + str(cap):>5} {usage.get('REG', '?'):>4} {usage.get('STACK', '?'):>5} "
                      f"{compiled.metadata.shared / 1024:7.1f} {row['instructions_per_weight'] or float('nan'):7.2f} "
                      f"{per_weight['alu']:5.2f} {per_weight['convert']:5.2f} {bound:>7} "
                      f"{row['expand_us_h100_model'] or float('nan'):9.2f} {shared_per_weight:8.2f} "
                      f"{row['shared_memory_us_h100_model'] or float('nan'):7.2f}", flush=True)
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
        loop = len(loop_instructions(compiled.asm["cubin"]) or [])
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
