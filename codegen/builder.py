"""Build Triton kernel sources: fixed loops come from templates, the variable glue from an indented
buffer. Output is deterministic: the same spec and layers give byte-identical source (sorted names,
no ids or addresses, versions from the installed packages only).
"""
from __future__ import annotations

import hashlib
import inspect
import os
import string
from dataclasses import dataclass

from sparsec.codegen.spec import MatmulSpec, PruneSpec, has_prmt_expand

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


class IndentedBuffer:
    """Lines of code at a current indentation level."""

    def __init__(self, indent: int = 0, unit: str = "    "):
        self.lines: list[str] = []
        self.level, self.unit = indent, unit

    def line(self, text: str = "") -> IndentedBuffer:
        self.lines.append(self.unit * self.level + text if text else "")
        return self

    def indent(self) -> IndentedBuffer:
        self.level += 1
        return self

    def dedent(self) -> IndentedBuffer:
        self.level -= 1
        return self

    def getvalue(self) -> str:
        return "\n".join(self.lines)


def _template(name: str) -> string.Template:
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return string.Template(f.read())


def _dot_precision_kwarg() -> str:
    """fp32 must be true fp32 (IEEE), as torch's F.linear is by default, not TF32."""
    import triton.language as tl

    if "input_precision" in inspect.signature(tl.dot).parameters:
        return ', input_precision="ieee"'
    return ", allow_tf32=False"  # triton < 3.0


_TL_DTYPE = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32", "int8": "tl.int8"}
_BITS = {"int8": 8, "float16": 16, "bfloat16": 16, "float32": 32}


def _expand(spec: MatmulSpec) -> str:
    """Lines expanding each group's word `pairs` ([BLOCK_N, BLOCK_K/4]: its two kept values, `first`
    in the low half) and its metadata into the values at its four positions, p0..p3. The forms were
    chosen by sm_90 SASS instructions per weight (bench/kernel_stats.py)."""
    buf = IndentedBuffer(indent=2)
    if has_prmt_expand(spec.weight_dtype, spec.act_dtype):
        buf.line("if PRMT_EXPAND:")
        buf.indent()
        _prmt_expand(buf, spec)
        buf.dedent()
        buf.line("else:")
        buf.indent()
    bits, value = _BITS[spec.weight_dtype], _TL_DTYPE[spec.weight_dtype]
    mask = hex((1 << bits) - 1)
    if bits <= 16:
        # a whole group fits one integer (int32 for int8, int64 for 16-bit values): shift each kept
        # value to its position, then take the positions apart
        buf.line(f"wide = pairs.to(tl.int{4 * bits})")
        buf.line(f"group = (((wide & {mask}) << ((nibbles & 3) * {bits}).to(tl.int{4 * bits}))")
        buf.line(f"         | (((wide >> {bits}) & {mask}) << ((nibbles >> 2) * {bits}).to(tl.int{4 * bits})))")
        words = ["group"] + [f"(group >> {bits * i})" for i in range(1, 4)]
    else:
        # 32-bit values: two positions per 64-bit word, w01 (positions 0, 1) and w23 (2, 3), each one
        # select chain; i0 < i1 leaves at most three cases per word
        buf.line("i0 = nibbles & 3")
        buf.line("i1 = nibbles >> 2")
        buf.line(f"low = pairs & {mask}  # `first` alone, in the low half")
        buf.line(f"w01 = tl.where(i1 == 1, pairs, tl.where(i0 == 0, low, tl.where(i0 == 1, pairs << {bits}, 0)))")
        buf.line(f"w23 = tl.where(i0 == 2, pairs, tl.where(i1 == 2, (pairs >> {bits}) & {mask}, "
                 f"tl.where(i1 == 3, pairs - low, 0)))")
        words = ["w01", f"(w01 >> {bits})", "w23", f"(w23 >> {bits})"]
    for i, word in enumerate(words):
        buf.line(f"p{i} = {word}.to(tl.int{bits}).to({value}, bitcast=True)")
    return buf.getvalue()


def _asm_lines(buf: IndentedBuffer, statements: list[str], per_line: int) -> None:
    """A PTX block as adjacent string literals, `per_line` statements each."""
    for i in range(0, len(statements), per_line):
        text = " ".join(statements[i:i + per_line])
        buf.line(f'    "{"{ " if i == 0 else ""}{text}{" }" if i + per_line >= len(statements) else " "}"'
                 + ("," if i + per_line >= len(statements) else ""))


# PRMT_EXPAND (configs.py): the expansion by byte permutes in inline PTX. `prmt.b32 d, a, b, s` builds d
# from the 8 bytes {b, a} (a = bytes 0-3), result byte i being source byte (nibble i of s) & 7.
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
def _kept_positions() -> dict[int, tuple[int, int]]:
    """Gray code (low 3 bits) of each valid nibble -> its kept positions (i0, i1)."""
    codes = {}
    for i0 in range(4):
        for i1 in range(i0 + 1, 4):
            nibble = i0 | i1 << 2
            codes[(nibble ^ nibble >> 1) & 7] = (i0, i1)
    assert len(codes) == 6 and 0 not in codes
    return codes


def _source_of(code: int, position: int, first: int, second: int, zero: int) -> int:
    """What a group with this code holds at this position: `first`, `second` or `zero`."""
    kept = _kept_positions().get(code)
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


def _prmt_expand(buf: IndentedBuffer, spec: MatmulSpec) -> None:
    tables = _prmt_tables(spec)
    names, n = [f"t{i}" for i in range(len(tables))], len(tables)
    buf.line("# expansion by byte permutes (configs.py, PRMT_EXPAND; builder.py explains the tables)")
    buf.line(f"{', '.join(names)} = tl.inline_asm_elementwise(")
    _asm_lines(buf, [f".reg .b32 c, t; shr.u32 t, ${n}, 1; xor.b32 c, ${n}, t; and.b32 c, c, 0x7777;"]
               + [f"mov.b32 t, {low:#010x}; prmt.b32 ${i}, t, {high:#010x}, c;" for i, (low, high) in enumerate(tables)], 1)
    buf.line(f'    "{",".join(["=r"] * n)},r", [words.to(tl.int32)], dtype=({", ".join(["tl.int32"] * n)}), '
             "is_pure=True, pack=1)")
    buf.line("# per group: its word's lookups, and sel (group g of a word is group 4w + g of the block)")
    for t in names:
        buf.line(f"{t} = tl.reshape(tl.broadcast_to({t}[:, :, None], (BLOCK_N, BLOCK_K // 16, 4)), (BLOCK_N, BLOCK_K // 4))")
    buf.line("sel = tl.reshape(tl.broadcast_to((0x40 + 0x11 * tl.arange(0, 4))[None, None, :], (BLOCK_N, BLOCK_K // 16, 4)),")
    buf.line("                 (BLOCK_N, BLOCK_K // 4))")
    buf.line("q0, q1, q2, q3 = tl.inline_asm_elementwise(")
    _asm_lines(buf, _prmt_gather(spec, n), 3)
    int8 = spec.weight_dtype == "int8"
    constraints = ",".join(["=h"] * 4 + ["h" if int8 else "r"] + ["r"] * (n + 1))
    buf.line(f'    "{constraints}", [pairs, {", ".join(names)}, sel],')
    buf.line("    dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)")
    value = _TL_DTYPE[spec.act_dtype if int8 else spec.weight_dtype]
    for i in range(4):
        buf.line(f"p{i} = q{i}.to({value}, bitcast=True)")


def _dot(spec: MatmulSpec) -> str:
    """The K step's product: on tensor cores (tl.dot, every tile dimension >= 16), or for a BLOCK_M
    under 16 (a few rows: decode) as multiply-adds on CUDA cores into per-k partial sums (`acc_k`),
    which need no 16-row tensor-core tile and no trip of the expanded weights through shared memory
    into the dot's operand layout."""
    buf = IndentedBuffer(indent=2)
    if spec.weight_dtype == "int8":
        buf.line(f"# int8 values are exact in {spec.act_dtype}; their scales are applied once, to the accumulator")
    buf.line("if BLOCK_M < 16:")
    buf.line("    acc_k += x.to(tl.float32)[:, None, :] * tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(tl.float32)[None, :, :]")
    buf.line("else:")
    buf.line("    w = tl.trans(tl.reshape(dense, (BLOCK_N, BLOCK_K)))  # [BLOCK_K, BLOCK_N]: W^T for the dot")
    buf.line(f"    acc += tl.dot(x, w.to({_TL_DTYPE[spec.act_dtype]})"
             f"{_dot_precision_kwarg() if spec.act_dtype == 'float32' else ''})")
    return buf.getvalue()


# One entry per epilogue step, in the order they apply. The dequant scale multiplies the matmul
# result before the bias: it belongs to the weight (W = q * scale), so it must not scale the bias.
_ACTIVATIONS = {
    "relu": ["acc = tl.maximum(acc, 0.0)"],
    "gelu": ["acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # exact (erf) GELU"],
    "gelu_tanh": ["inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)",
                  "acc = 0.5 * acc * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1"],
    "silu": ["acc = acc / (1.0 + tl.exp(-acc))  # x * sigmoid(x)"],
}


def _epilogue(spec: MatmulSpec) -> str:
    buf = IndentedBuffer(indent=1)
    if spec.weight_dtype == "int8":
        buf.line("acc = acc * tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0)[None, :]  # int8 dequant, per output channel")
    if spec.bias:
        buf.line("acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
    for text in _ACTIVATIONS.get(spec.activation, []):
        buf.line(text)
    if spec.out_scale:
        buf.line("acc = acc * tl.load(out_scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]")
    if not buf.lines:
        buf.line("# no epilogue: the accumulator is stored as is")
    return buf.getvalue()


@dataclass(frozen=True)
class LayerUse:
    """A layer a kernel was made for, for the header and the manifest."""
    name: str
    m: int | None        # rows of x at the example inputs (None when unknown)
    n: int
    k: int


def header(title: str, spec_text: str, layers: list[LayerUse]) -> str:
    from sparsec.codegen.cache import versions

    buf = IndentedBuffer()
    buf.line(f"# {title}")
    buf.line("# Generated by sparsec; do not edit. Complete and importable on its own.")
    buf.line(f"# spec: {spec_text}")
    buf.line(f"# versions: {versions()}")
    if layers:
        buf.line("# made for (layer: x [M, K] @ W^T [K, N]):")
        for use in sorted(layers, key=lambda u: u.name):
            buf.line(f"#   {use.name}: M={use.m if use.m is not None else '?'}, N={use.n}, K={use.k}")
    return buf.getvalue()


def kernel_name(spec) -> str:
    """Readable and unique per spec: the spec's short name plus a hash of its full description."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:8]
    return f"{spec.short_name()}_{digest}"


def emit_matmul(spec: MatmulSpec, layers: list[LayerUse]) -> tuple[str, str]:
    """(kernel name, complete source) of a fused sparse matmul: 2:4 (decompress + tl.dot) or
    condensed constant fan-in (gather + reduce)."""
    name = kernel_name(spec)
    if spec.format == "2:4":
        body = _template("sparse24_matmul.py.tmpl").substitute(name=name, dot=_dot(spec), epilogue=_epilogue(spec),
                                                                expand=_expand(spec),
                                                                pair_int=f"tl.int{2 * _BITS[spec.weight_dtype]}")
        title = "sparsec 2:4 sparse matmul with fused epilogue, pattern 2:4"
    else:
        body = _template("condensed_matmul.py.tmpl").substitute(name=name, epilogue=_epilogue(spec))
        title = "sparsec condensed constant fan-in matmul with fused epilogue, pattern fanin"
    return name, header(title, spec.describe(), layers) + "\n" + body


def emit_prune(spec: PruneSpec) -> tuple[str, str]:
    """(kernel name, complete source) of the 2:4 prune+compress kernel."""
    name = kernel_name(spec)
    body = _template("prune24.py.tmpl").substitute(name=name)
    return name, header("sparsec 2:4 magnitude prune + compress (dense -> values + nibble metadata)", spec.describe(), []) + "\n" + body
