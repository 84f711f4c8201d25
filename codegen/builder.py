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

from sparsec.codegen.prmt import prmt_expand_lines
from sparsec.codegen.spec import MatmulSpec, PruneSpec, gathers, has_prmt_expand

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
        for text in prmt_expand_lines(spec):
            buf.line(text)
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


def _gather(spec: MatmulSpec) -> str:
    """Lines of the GATHER form's K step turning each group's word `pairs` into its two kept values in fp32,
    `first` and `second`."""
    buf = IndentedBuffer(indent=2)
    if not gathers(spec.weight_dtype, spec.act_dtype):
        buf.line(f'tl.static_assert(False, "no GATHER form for {spec.weight_dtype} weights and {spec.act_dtype} inputs")')
        buf.line("first = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)")
        buf.line("second = first")
    elif spec.weight_dtype == "int8":
        # (a conversion is an eighth-rate instruction, but one per kept value, not per position, and bit tricks
        # around it took more instructions: 5.4 per weight position against 4.2, bench/kernel_stats.py)
        buf.line("first = pairs.to(tl.int8).to(tl.float32)")
        buf.line("second = (pairs >> 8).to(tl.int8).to(tl.float32)")
    else:
        value = _TL_DTYPE[spec.weight_dtype]
        buf.line(f"first = pairs.to(tl.int16).to({value}, bitcast=True).to(tl.float32)")
        buf.line(f"second = (pairs >> 16).to(tl.int16).to({value}, bitcast=True).to(tl.float32)")
    return buf.getvalue()


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
    # NaN-propagating: tl.maximum's default ignores a NaN operand, so a NaN product came out as 0 where
    # torch's relu (the chain this replaces) keeps it, hiding the NaN from the caller
    "relu": ["acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)"],
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


def ordered_uses(uses) -> list[LayerUse]:
    """Distinct uses sorted on every field, not the name alone: a layer called at two row counts has two
    uses with one name, which came in set order (PYTHONHASHSEED), so the source, its cache key and the
    dump's manifest varied between processes."""
    return sorted(set(uses), key=lambda u: (u.name, u.m is not None, u.m or 0, u.n, u.k))


def header(title: str, spec_text: str, layers: list[LayerUse]) -> str:
    from sparsec.codegen.cache import versions

    buf = IndentedBuffer()
    buf.line(f"# {title}")
    buf.line("# Generated by sparsec; do not edit. Complete and importable on its own.")
    buf.line(f"# spec: {spec_text}")
    buf.line(f"# versions: {versions()}")
    if layers:
        buf.line("# made for (layer: x [M, K] @ W^T [K, N]" + (", M = output pixels, K = in channels x taps):"
                                                                 if "conv2d" in spec_text else "):"))
        for use in ordered_uses(layers):
            buf.line(f"#   {use.name}: M={use.m if use.m is not None else '?'}, N={use.n}, K={use.k}")
    return buf.getvalue()


def kernel_name(spec) -> str:
    """Readable and unique per spec: the spec's short name plus a hash of its full description."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:8]
    return f"{spec.short_name()}_{digest}"


def emit_matmul(spec: MatmulSpec, layers: list[LayerUse]) -> tuple[str, str]:
    """(kernel name, complete source) of a fused sparse matmul: 2:4 (decompress + tl.dot; as an
    implicit-GEMM conv2d for layout "conv2d") or condensed constant fan-in (gather + reduce)."""
    name = kernel_name(spec)
    if spec.format == "2:4":
        template = "sparse24_conv2d.py.tmpl" if spec.layout == "conv2d" else "sparse24_matmul.py.tmpl"
        body = _template(template).substitute(name=name, dot=_dot(spec), epilogue=_epilogue(spec), expand=_expand(spec),
                                              pair_int=f"tl.int{2 * _BITS[spec.weight_dtype]}", gather=_gather(spec),
                                              act=_TL_DTYPE[spec.act_dtype])
        title = f"sparsec 2:4 sparse {'conv2d' if spec.layout == 'conv2d' else 'matmul'} with fused epilogue, pattern 2:4"
    else:
        body = _template("condensed_matmul.py.tmpl").substitute(name=name, epilogue=_epilogue(spec))
        title = "sparsec condensed constant fan-in matmul with fused epilogue, pattern fanin"
    return name, header(title, spec.describe(), layers) + "\n" + body


def emit_prune(spec: PruneSpec) -> tuple[str, str]:
    """(kernel name, complete source) of the 2:4 prune+compress kernel."""
    name = kernel_name(spec)
    body = _template("prune24.py.tmpl").substitute(name=name)
    return name, header("sparsec 2:4 magnitude prune + compress (dense -> values + nibble metadata)", spec.describe(), []) + "\n" + body
