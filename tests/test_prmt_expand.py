"""PRMT_EXPAND: 2:4 groups expanded (int8 converted to fp16) by inline-PTX byte permutes.

The interpreter cannot run inline PTX, so on CPU the expansion is checked by executing the emitted
PTX text with a small model of the PTX ISA's semantics for the few instructions it uses (shr, and,
xor, prmt, mov, sub.f16x2): every kept-position pair at every group of a metadata word, every int8
value, 16-bit bit patterns including NaN and -0, and whole rows against the reference decompress.
The sm_80 / sm_90 builds are in test_codegen.py's standard-build check; on a GPU the kernel itself
is compared with torch.
"""
import ast
import random
import re
import struct

import numpy as np
import pytest
import torch

import sparsec
from oracle import oracle_int8, oracle_nm_mask, output_error
from sparsec import reference as ref
from sparsec.codegen.builder import emit_matmul
from sparsec.codegen.configs import matmul_candidates, matmul_config, validate_launch
from sparsec.codegen.launch import sparse24_matmul
from sparsec.codegen.spec import MatmulSpec
from sparsec.errors import InvalidInputError

INT8_FP16 = MatmulSpec("float16", "int8", True, None, False, "float16")
INT8_BF16 = MatmulSpec("bfloat16", "int8", True, None, False, "bfloat16")
FP16 = MatmulSpec("float16", "float16", False, None, False, "float16")
BF16 = MatmulSpec("bfloat16", "bfloat16", False, None, False, "bfloat16")
MASK32 = 0xFFFFFFFF
KEPT_POSITIONS = [(i0, i1) for i0 in range(4) for i1 in range(i0 + 1, 4)]


def _inline_asm_calls(source: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "inline_asm_elementwise"]


def _half(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def _half_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]  # rounds to nearest even, as sub.rn does


def _bfloat(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits & MASK32), dtype=np.float32)[0]


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute straight-line PTX over 32-bit registers (16-bit outputs keep their low half), per the
    PTX ISA: shr.u32 (logical), and.b32, xor.b32, sub.f32 (0f immediates are fp32 bits); prmt.b32 in its default mode (selector nibble i, of
    the selector's low 16 bits, picks byte i of the result from the 8 bytes {b, a}, a = bytes 0-3; a
    nibble's bit 3 replicates the picked byte's sign); mov.b32 of an immediate, a register, packing
    {low half, high half} into a register or unpacking one into them; sub.f16x2."""
    regs = dict(operands)

    def val(token: str) -> int:
        token = token.strip()
        if token in regs:
            return regs[token]
        if token.lower().startswith("0f"):  # an fp32 immediate, as its bits in hex
            return int(token[2:], 16)
        return int(token, 0) & MASK32

    body = asm.strip()
    assert body.startswith("{") and body.endswith("}"), asm
    for statement in filter(None, (s.strip() for s in body[1:-1].split(";"))):
        op, _, rest = statement.partition(" ")
        if op == ".reg":
            continue
        if op == "mov.b32" and rest.startswith("{"):  # unpack: {low, high} = 32-bit source
            outs, source = rest.split("}")
            low, high = (o.strip() for o in outs.strip("{ ").split(","))
            word = val(source.strip(", "))
            regs[low], regs[high] = word & 0xFFFF, word >> 16
            continue
        if op == "mov.b32" and rest.rstrip().endswith("}"):  # pack: 32-bit destination = {low, high}
            out, halves = rest.split("{")
            low, high = (val(h) & 0xFFFF for h in halves.strip("} ").split(","))
            regs[out.strip(", ")] = low | high << 16
            continue
        args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "shr.u32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "xor.b32":
            regs[args[0]] = val(args[1]) ^ val(args[2])
        elif op == "prmt.b32":
            pool = (val(args[2]) << 32 | val(args[1])).to_bytes(8, "little")
            selector, out = val(args[3]), 0
            for i in range(4):
                nibble = selector >> (4 * i) & 0xF
                byte = pool[nibble & 7]
                if nibble & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
            regs[args[0]] = out
        elif op == "sub.f32":  # IEEE single, round to nearest even
            difference = np.subtract(_f32(val(args[1])), _f32(val(args[2])), dtype=np.float32)
            regs[args[0]] = struct.unpack("<I", difference.tobytes())[0]
        elif op == "sub.f16x2":
            a, b = val(args[1]), val(args[2])
            regs[args[0]] = sum(_half_bits(_half(a >> s) - _half(b >> s)) << s for s in (0, 16))
        else:
            raise AssertionError(f"the PTX model does not know {op!r}: extend it from the PTX ISA before trusting it")
    return regs


class PtxExpansion:
    """The kernel's PRMT_EXPAND step, read from its source: per metadata word the lookup asm, per
    group the gather asm with its word's lookups and its group's `sel` constant."""

    def __init__(self, source: str):
        word_call, group_call = _inline_asm_calls(source)
        self.word_asm, self.group_asm = (ast.literal_eval(c.args[0]) for c in (word_call, group_call))
        word_constraints = ast.literal_eval(word_call.args[1]).split(",")
        self.lookups = len(word_constraints) - 1  # lookup words from one metadata word
        assert word_constraints == ["=r"] * self.lookups + ["r"] and self.lookups in (2, 4), word_constraints
        # four positions from the pair (int16 for int8 values, int32 for 16-bit ones), the lookups and sel
        constraints = ast.literal_eval(group_call.args[1]).split(",")
        assert constraints[:4] == ["=h"] * 4 and constraints[5:] == ["r"] * (self.lookups + 1), constraints
        self.pair_mask = 0xFFFF if constraints[4] == "h" else MASK32
        found = re.search(r"\((0x[0-9a-f]+) \+ (0x[0-9a-f]+) \* tl\.arange\(0, 4\)\)", source)
        self.sel = [int(found.group(1), 16) + int(found.group(2), 16) * g for g in range(4)]

    def expand_word(self, word: int, pairs: list[int]) -> list[list[int]]:
        """The 16-bit results at positions 0..3 of the word's four groups. `word` is the int16 metadata
        (the kernel sign-extends it to int32) and `pairs` the groups' kept-value pairs as integers."""
        tables = run_ptx(self.word_asm, {f"${self.lookups}": word & MASK32})
        out = []
        for g, pair in enumerate(pairs):
            operands = {"$4": pair & self.pair_mask, f"${5 + self.lookups}": self.sel[g],
                        **{f"${5 + i}": tables[f"${i}"] for i in range(self.lookups)}}
            regs = run_ptx(self.group_asm, operands)
            out.append([regs[f"${p}"] for p in range(4)])
        return out

    def expand_rows(self, values: torch.Tensor, meta: torch.Tensor, k: int) -> list[list[int]]:
        """Every row of a compressed weight (values + metadata, as the kernel loads them) expanded
        word by word: the 16-bit results at its k positions. Past K (a last word with fewer than four
        groups) the kernel's masked loads give zero values, and zeros must come out."""
        pair_words = values.view(torch.int16 if values.dtype == torch.int8 else torch.int32).to(torch.int32)
        rows = []
        for row in range(values.shape[0]):
            got = []
            for word_index in range(meta.shape[1]):
                pairs = pair_words[row, 4 * word_index:4 * word_index + 4].tolist()
                pairs += [0] * (4 - len(pairs))  # masked loads past K
                got += [bits for group in self.expand_word(int(meta[row, word_index]), pairs) for bits in group]
            assert not any(got[k:])
            rows.append(got[:k])
        return rows


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def _word(positions: list[tuple[int, int]]) -> int:
    """int16 metadata word of four groups: nibble i0 | i1 << 2 of group g at bits 4g (design.md)."""
    return _signed(sum((i0 | i1 << 2) << (4 * g) for g, (i0, i1) in enumerate(positions)), 16)


def _expected(i0: int, i1: int, first: int, second: int) -> list[int]:
    return [first if p == i0 else second if p == i1 else 0 for p in range(4)]


@pytest.mark.parametrize("spec, decode", [(INT8_FP16, _half), (INT8_BF16, _bfloat)], ids=["float16", "bfloat16"])
def test_int8_groups_expand_to_every_value_at_every_position(spec, decode):
    expansion = PtxExpansion(emit_matmul(spec, [])[1])
    rng = random.Random(0)
    values = list(range(-128, 128))
    for g in range(4):  # the group's place in its word
        for i0, i1 in KEPT_POSITIONS:
            for first in values:
                second = rng.choice(values)
                positions = [rng.choice(KEPT_POSITIONS) for _ in range(4)]
                positions[g] = (i0, i1)
                pairs = [_signed((rng.choice(values) & 0xFF) | (rng.choice(values) & 0xFF) << 8, 16) for _ in range(4)]
                pairs[g] = _signed((first & 0xFF) | (second & 0xFF) << 8, 16)  # `first` in the low byte
                got = expansion.expand_word(_word(positions), pairs)[g]
                assert [decode(bits) for bits in got] == [float(v) for v in _expected(i0, i1, first, second)], \
                    (g, i0, i1, first, second)
                assert 0x8000 not in got  # zeros are +0


@pytest.mark.parametrize("spec", [FP16, BF16], ids=["float16", "bfloat16"])
def test_16bit_groups_expand_bit_exactly(spec):
    expansion = PtxExpansion(emit_matmul(spec, [])[1])
    rng = random.Random(1)
    patterns = [0x0000, 0x8000, 0x7E00, 0x7FFF, 0xFFFF, 0x0001, 0x3C00, 0xBC00, 0x00FF, 0xFF00]
    for g in range(4):
        for i0, i1 in KEPT_POSITIONS:
            for _ in range(40):
                first, second = rng.choice(patterns + [rng.getrandbits(16)]), rng.choice(patterns + [rng.getrandbits(16)])
                positions = [rng.choice(KEPT_POSITIONS) for _ in range(4)]
                positions[g] = (i0, i1)
                pairs = [_signed(rng.getrandbits(32), 32) for _ in range(4)]
                pairs[g] = _signed(first | second << 16, 32)
                assert expansion.expand_word(_word(positions), pairs)[g] == _expected(i0, i1, first, second)


@pytest.mark.parametrize("spec", [INT8_FP16, INT8_BF16, FP16], ids=["int8-float16", "int8-bfloat16", "float16"])
def test_padding_groups_expand_to_zeros(spec):
    """Trailing groups past K have nibble 0 (and masked-out values): all four positions are +0."""
    expansion = PtxExpansion(emit_matmul(spec, [])[1])
    for g in range(4):
        positions = [(0, 1), (1, 3), (2, 3), (0, 2)]
        word = _signed(sum((i0 | i1 << 2) << (4 * h) for h, (i0, i1) in enumerate(positions) if h < g), 16)
        assert expansion.expand_word(word, [0x1234, -1, 0x7F7F, 0x0180])[g:] == [[0, 0, 0, 0]] * (4 - g)


@pytest.mark.parametrize("k", [16, 36, 48, 4096])
def test_whole_rows_match_the_reference_decompress(k):
    """Rows compressed by the reference and expanded word by word by the emitted PTX give the
    reference's dense rows, and zeros past K."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(3, k, generator=g)
    mask = oracle_nm_mask(w, 2, 4)
    for spec, dense in ((FP16, (w * mask).half()), (INT8_FP16, oracle_int8(w * mask)), (INT8_BF16, oracle_int8(w * mask))):
        values, meta = ref.nm_compress_masked(dense, mask, 2, 4)
        if spec.weight_dtype == "int8":
            values, _ = ref.quantize_int8(values)
        expected = ref.nm_decompress(values, meta)
        rows = PtxExpansion(emit_matmul(spec, [])[1]).expand_rows(values, meta, k)
        for row, got in enumerate(rows):
            got = torch.tensor([_signed(b, 16) for b in got], dtype=torch.int16).view(getattr(torch, spec.act_dtype))
            assert torch.equal(got.float(), expected[row].float()), (spec.describe(), row)


def _check_int8_rows(source: str, decode) -> None:
    """A fast whole-row check of an int8 kernel source against the reference decompress."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, 256, generator=g)
    mask = oracle_nm_mask(w, 2, 4)
    values, meta = ref.nm_compress_masked(oracle_int8(w * mask), mask, 2, 4)
    values, _ = ref.quantize_int8(values)
    values[0, :8] = torch.tensor([-128, 127, 0, -1, 1, 64, -64, 5], dtype=torch.int8)
    expected = ref.nm_decompress(values, meta)
    for row, got in enumerate(PtxExpansion(source).expand_rows(values, meta, 256)):
        assert [decode(b) for b in got] == expected[row].float().tolist()


@pytest.mark.parametrize("spec, decode, old, new", [
    (INT8_FP16, _half, "0x7777", "0xffff"), (INT8_FP16, _half, "0x40 + 0x11", "0x40 + 0x10"),
    (INT8_FP16, _half, "0x64806480", "0x64006400"), (INT8_FP16, _half, "0x80808080", "0x00000000"),
    (INT8_FP16, _half, "0x54505454", "0x54505054"), (INT8_FP16, _half, "shr.u32 t, $4, 1", "shr.u32 t, $4, 2"),
    (INT8_BF16, _bfloat, "0f4B000080", "0f4B000000"), (INT8_BF16, _bfloat, "0x7632", "0x5410"),
    (INT8_BF16, _bfloat, "0x04404444", "0x04404044"), (INT8_BF16, _bfloat, "0x7541", "0x7540")])
def test_the_check_fails_on_a_mutated_kernel(spec, decode, old, new):
    """The check is not vacuous: it passes the emitted source and fails small changes to its constants."""
    source = emit_matmul(spec, [])[1]
    _check_int8_rows(source, decode)
    assert old in source
    with pytest.raises(AssertionError):
        _check_int8_rows(source.replace(old, new), decode)


def test_the_ptx_model_is_not_vacuous():
    """The model reproduces documented prmt cases and refuses instructions it does not know."""
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x3210; }", {"$1": 0x44332211, "$2": 0x88776655})["$0"] == 0x44332211
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x7654; }", {"$1": 0x44332211, "$2": 0x88776655})["$0"] == 0x88776655
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x0008; }", {"$1": 0x80, "$2": 0})["$0"] == 0x808080FF  # sign replicate
    # only the selector's low 16 bits count (CUDA's __byte_perm: "the upper 16-bits of the selector are not used")
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0xFFFF3210; }", {"$1": 0x44332211, "$2": 0})["$0"] == 0x44332211
    assert run_ptx("{ shr.u32 $0, $1, 1; }", {"$1": 0x80000000})["$0"] == 0x40000000  # logical: no sign fill
    assert run_ptx("{ and.b32 $0, $1, 0x7777; }", {"$1": 0xFFFF8888})["$0"] == 0
    assert run_ptx("{ sub.f32 $0, $1, 0f3F800000; }", {"$1": 0x40400000})["$0"] == 0x40000000  # 3 - 1 == 2
    assert run_ptx("{ sub.f32 $0, $1, $2; }", {"$1": 0x3F800000, "$2": 0xB3800000})["$0"] == 0x3F800000  # 1 + 2^-24: tie, to even
    packed = run_ptx("{ .reg .b32 d; mov.b32 d, {$1, $2}; mov.b32 {$3, $4}, d; }", {"$1": 0xBEEF, "$2": 0x1234})
    assert (packed["d"], packed["$3"], packed["$4"]) == (0x1234BEEF, 0xBEEF, 0x1234)
    assert _half(run_ptx("{ sub.f16x2 $0, $1, $2; }", {"$1": 0x3C00_4000, "$2": 0x3C00_3C00})["$0"]) == 1.0
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx("{ add.s32 $0, $1, $1; }", {"$1": 1})


def test_kernels_with_a_prmt_form_get_it_as_a_candidate_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for act, weight in (("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "int8"), ("bfloat16", "int8")):
        assert matmul_config(1, 4096, 4096, act, 132)["PRMT_EXPAND"] == 0  # never by default: unmeasured
        plain = matmul_candidates(1, 4096, 4096, act, 132, weight)
        assert {c["PRMT_EXPAND"] for c in plain} == {0, 1}
        assert sorted(map(str, (dict(c, PRMT_EXPAND=0) for c in plain if c["PRMT_EXPAND"]))) == \
            sorted(map(str, (c for c in plain if not c["PRMT_EXPAND"] and not c["GATHER"])))  # a twin of every
        # config but the GATHER form's, which expands nothing
        assert len(_inline_asm_calls(emit_matmul(MatmulSpec(act, weight, False, None, False, act), [])[1])) == 2
    for act, weight in (("float32", "float32"), ("float32", "int8")):
        assert all(not c["PRMT_EXPAND"] for c in matmul_candidates(1, 4096, 4096, act, 132, weight))
        assert not _inline_asm_calls(emit_matmul(MatmulSpec(act, weight, False, None, False, act), [])[1])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(not c["PRMT_EXPAND"] for c in matmul_candidates(1, 64, 64, "float16", None, "int8"))


def test_launch_and_plan_refuse_it_where_it_cannot_apply():
    assert "PRMT_EXPAND must be 0 or 1" in validate_launch(dict(matmul_config(1, 64, 64, "float16"), M=1, PRMT_EXPAND=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU runs under the interpreter)
    x = torch.randn(2, 64, device=device)
    w = torch.randn(32, 64)
    values, meta = ref.nm_compress_masked(w * oracle_nm_mask(w, 2, 4), oracle_nm_mask(w, 2, 4), 2, 4)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    cfg = dict(matmul_config(2, 32, 64, "float32"), PRMT_EXPAND=1)
    with pytest.raises(InvalidInputError, match="PRMT_EXPAND=1 applies to float16 / bfloat16 weights, and to int8 weights with float16 / bfloat16 inputs; kernel"):
        sparse24_matmul(x, values.to(device), meta.to(device), None, None, None, spec, name, source, config=cfg)

    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    plan["0"].launch = dict(cfg, M=2)
    with pytest.raises(ValueError, match="this layer has float32 weights and float32 inputs. Set PRMT_EXPAND to 0"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


def _operands(m, n, k, spec, seed):
    """x, 2:4 values + metadata (+ int8 scales), bias, and the (dequantized) pruned weight."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.act_dtype)
    w = torch.randn(n, k, generator=g)
    mask = oracle_nm_mask(w, 2, 4)  # independent of the code under test
    pruned = oracle_int8(w * mask) if spec.weight_dtype == "int8" else (w * mask).to(dtype)
    values, meta = ref.nm_compress_masked(pruned, mask, 2, 4)
    scales = None
    if spec.weight_dtype == "int8":
        values, scales = ref.quantize_int8(values)
    bias = torch.randn(n, generator=g).to(dtype) if spec.bias else None
    return torch.randn(m, k, generator=g).to(dtype), values, meta, scales, bias, pruned


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's refusal; a GPU runs the kernel instead")
def test_the_interpreter_refuses_it_clearly():
    x, values, meta, scales, bias, _ = _operands(2, 32, 64, INT8_FP16, seed=1)
    name, source = emit_matmul(INT8_FP16, [])
    cfg = dict(matmul_config(2, 32, 64, "float16"), PRMT_EXPAND=1)
    with pytest.raises(InvalidInputError, match="interpreter cannot run"):
        sparse24_matmul(x, values, meta, scales, bias, None, INT8_FP16, name, source, config=cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("spec", [INT8_FP16, INT8_BF16, FP16, BF16], ids=["int8-f16", "int8-bf16", "float16", "bfloat16"])
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (5, 96, 164), (16, 256, 1024), (130, 256, 1036)])
def test_prmt_expand_kernel_matches_torch_on_gpu(spec, m, n, k):
    x, values, meta, scales, bias, pruned = _operands(m, n, k, spec, seed=m + n + k)
    name, source = emit_matmul(spec, [])
    expected = x.double() @ pruned.double().t() + (bias.double() if bias is not None else 0)
    tol = 2e-2 if spec.act_dtype == "bfloat16" else 2e-3
    for prmt in (0, 1):
        cfg = dict(matmul_config(m, n, k, spec.act_dtype, 132), PRMT_EXPAND=prmt)
        operands = [t.cuda() if t is not None else None for t in (x, values, meta, scales, bias)]
        y = sparse24_matmul(*operands, None, spec, name, source, config=cfg)
        assert output_error(y.cpu().double(), expected) <= tol, f"PRMT_EXPAND={prmt}"
