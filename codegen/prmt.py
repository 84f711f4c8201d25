"""PRMT_EXPAND (configs.py): expanding 2:4 groups in registers with PTX byte permutes, driven by
table lookups on the metadata, instead of Triton's shifts (and `cvt` for int8). Emits kernel lines;
the builder places them under `if PRMT_EXPAND:` in the 2:4 template. tests/test_prmt_expand.py
executes the emitted PTX in a model of the ISA.
"""
from __future__ import annotations

from sparsec.codegen.spec import MatmulSpec


def _asm_lines(statements: list[str], per_line: int) -> list[str]:
    """A PTX block as adjacent string literals, `per_line` statements each: argument lines of a call."""
    lines = []
    for i in range(0, len(statements), per_line):
        last = i + per_line >= len(statements)
        text = " ".join(statements[i:i + per_line])
        lines.append(f'    "{"{ " if i == 0 else ""}{text}{" }" if last else " "}"' + ("," if last else ""))
    return lines


# How it works. `prmt.b32 d, a, b, s` builds d from the 8 bytes {b, a} (a = bytes 0-3), result byte i
# being source byte (nibble i of s) & 7.
#
# 1. Per metadata word, lookups. Each nibble i0 | i1 << 2 (i0 < i1) has its own 3-bit code, the low
#    bits of its Gray code n ^ (n >> 1) (6 codes for 6 nibbles; the padding nibble 0 gets code 0),
#    and (w ^ (w >> 1)) & 0x7777 makes them for all four groups of a word at once. Used as a prmt
#    selector into an 8-byte table (two immediates), the codes look up four bytes at once: byte g of
#    each lookup word t<i> is group g's table byte.
# 2. Per group, prmt(t<i>, t<i+1>, sel[g]) joins two of its table bytes into a 16-bit selector that
#    gathers kept values and zero bytes from {constant, pair}. sel[g] = 0x40 + 0x11 * g picks byte g
#    of each word.
# 16-bit values: tables t0..t3 (positions 0..3) of selector bytes, two per 32-bit result.
# int8 for fp16: the same, and the gather also converts. A biased byte u = v ^ 0x80 under the fp16
#   pattern 0x64 (1024 + u, exact) minus 1152 (0x6480; sub.f16x2, exact) is v; zero is u = 0x80.
# int8 for bf16 (no such fp16 trick: bf16 holds 8 significant bits): tables t0, t1 gather the four
#   biased bytes in position order; each goes under the fp32 pattern 0x4B0000 (2^23 + u, exact),
#   minus 2^23 + 128 (sub.f32, exact) is v, whose top 16 bits are v in bf16 (exact: |v| <= 128).
def _positions_of_code() -> dict[int, tuple[int, int]]:
    """Gray code (low 3 bits) of each valid nibble -> its kept positions (i0, i1)."""
    codes = {}
    for i0 in range(4):
        for i1 in range(i0 + 1, 4):
            nibble = i0 | i1 << 2
            codes[(nibble ^ nibble >> 1) & 7] = (i0, i1)
    assert len(codes) == 6 and 0 not in codes
    return codes


_POSITIONS = _positions_of_code()


def _source_of(code: int, position: int, first: int, second: int, zero: int) -> int:
    """What a group with this code holds at this position: `first`, `second` or `zero`."""
    kept = _POSITIONS.get(code)
    return first if kept and kept[0] == position else second if kept and kept[1] == position else zero


def _table(byte_of_code) -> tuple[int, int]:
    """An 8-byte lookup table, code -> byte, as its two immediates (bytes 0-3, bytes 4-7)."""
    table = bytes(byte_of_code(code) for code in range(8))
    return int.from_bytes(table[:4], "little"), int.from_bytes(table[4:], "little")


def _prmt_tables(spec: MatmulSpec) -> list[tuple[int, int]]:
    """The lookup tables of this kernel's expansion (see above), one lookup word each."""
    if spec.weight_dtype != "int8":  # a value's selector byte: low nibble = source of its low byte, high = of its high
        return [_table(lambda c, p=p: _source_of(c, p, 0x10, 0x32, 0x44)) for p in range(4)]
    if spec.act_dtype == "float16":  # the value's byte (first 0, second 1, zero: 4 of the constant) under 0x64 (5)
        return [_table(lambda c, p=p: _source_of(c, p, 0x50, 0x51, 0x54)) for p in range(4)]
    # bf16: the source byte of positions (0, 1), then of (2, 3), one nibble each
    return [_table(lambda c, p=p: _source_of(c, p, 0, 1, 4) | _source_of(c, p + 1, 0, 1, 4) << 4) for p in (0, 2)]


def _prmt_gather(spec: MatmulSpec, lookups: int) -> list[str]:
    """PTX statements of one group: $4 its pair, $5.. its word's lookups, then its sel; out $0..$3."""
    t, sel = [f"${5 + i}" for i in range(lookups)], f"${5 + lookups}"
    if spec.weight_dtype != "int8":
        return [".reg .b32 s, lo, hi;", f"prmt.b32 s, {t[0]}, {t[1]}, {sel};", "prmt.b32 lo, $4, 0, s;",
                f"prmt.b32 s, {t[2]}, {t[3]}, {sel};", "prmt.b32 hi, $4, 0, s;",
                "mov.b32 {$0, $1}, lo;", "mov.b32 {$2, $3}, hi;"]
    # the int16 pair ("h") as a 32-bit word, its bytes biased (zero: 0x80)
    widen = ["mov.b32 d, {$4, $4};", "xor.b32 d, d, 0x80808080;"]
    if spec.act_dtype == "float16":
        return ([".reg .b32 s, lo, hi, d, c;"] + widen
                + [f"prmt.b32 s, {t[0]}, {t[1]}, {sel};", "prmt.b32 lo, d, 0x64646480, s;",
                   f"prmt.b32 s, {t[2]}, {t[3]}, {sel};", "prmt.b32 hi, d, 0x64646480, s;",
                   "mov.b32 c, 0x64806480;", "sub.f16x2 lo, lo, c;", "sub.f16x2 hi, hi, c;",
                   "mov.b32 {$0, $1}, lo;", "mov.b32 {$2, $3}, hi;"])
    statements = [".reg .b32 s, lo, hi, d, f0, f1, f2, f3;"] + widen
    statements += [f"prmt.b32 s, {t[0]}, {t[1]}, {sel};", "prmt.b32 d, d, 0x80808080, s;"]
    for p in range(4):  # byte p under 0x4B0000, minus 2^23 + 128 (0f4B000080: fp32 bits)
        statements += [f"prmt.b32 f{p}, d, 0x4b000000, {0x7540 + p:#06x};", f"sub.f32 f{p}, f{p}, 0f4B000080;"]
    return statements + ["prmt.b32 lo, f0, f1, 0x7632;", "prmt.b32 hi, f2, f3, 0x7632;",
                         "mov.b32 {$0, $1}, lo;", "mov.b32 {$2, $3}, hi;"]


def prmt_expand_lines(spec: MatmulSpec) -> list[str]:
    """The kernel lines (relative indentation) that expand a block's groups into p0..p3 by byte
    permutes: the per-word lookups, their broadcast to groups, the per-group gather."""
    tables = _prmt_tables(spec)
    names, n = [f"t{i}" for i in range(len(tables))], len(tables)
    lines = ["# expansion by byte permutes (configs.py, PRMT_EXPAND; codegen/prmt.py explains the tables)",
             f"{', '.join(names)} = tl.inline_asm_elementwise("]
    lines += _asm_lines([f".reg .b32 c, t; shr.u32 t, ${n}, 1; xor.b32 c, ${n}, t; and.b32 c, c, 0x7777;"]
                        + [f"mov.b32 t, {low:#010x}; prmt.b32 ${i}, t, {high:#010x}, c;"
                           for i, (low, high) in enumerate(tables)], 1)
    lines.append(f'    "{",".join(["=r"] * n)},r", [words.to(tl.int32)], dtype=({", ".join(["tl.int32"] * n)}), '
                 "is_pure=True, pack=1)")
    lines.append("# per group: its word's lookups, and sel (group g of a word is group 4w + g of the block)")
    lines += [f"{t} = tl.reshape(tl.broadcast_to({t}[:, :, None], (BLOCK_N, BLOCK_K // 16, 4)), (BLOCK_N, BLOCK_K // 4))"
              for t in names]
    lines += ["sel = tl.reshape(tl.broadcast_to((0x40 + 0x11 * tl.arange(0, 4))[None, None, :], (BLOCK_N, BLOCK_K // 16, 4)),",
              "                 (BLOCK_N, BLOCK_K // 4))",
              "q0, q1, q2, q3 = tl.inline_asm_elementwise("]
    lines += _asm_lines(_prmt_gather(spec, n), 3)
    int8 = spec.weight_dtype == "int8"
    constraints = ",".join(["=h"] * 4 + ["h" if int8 else "r"] + ["r"] * (n + 1))
    lines += [f'    "{constraints}", [pairs, {", ".join(names)}, sel],',
              "    dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)"]
    value = spec.act_dtype if int8 else spec.weight_dtype  # float16 or bfloat16: the bit patterns' type
    return lines + [f"p{i} = q{i}.to(tl.{value}, bitcast=True)" for i in range(4)]
