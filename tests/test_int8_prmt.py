"""INT8_PRMT: int8 weights converted to fp16 by an inline-PTX byte permute instead of `cvt`.

The interpreter cannot run inline PTX, so on CPU the conversion is checked by executing the emitted
PTX text with a small model of the PTX ISA's semantics for the few instructions it uses (xor, prmt,
mov, sub.f16x2), over every int8 value at every position of a group; the sm_80 / sm_90 builds are in
test_codegen.py's standard-build check; on a GPU the kernel itself is compared with torch.
"""
import ast
import random
import struct

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
MASK32 = 0xFFFFFFFF


def _inline_asm_calls(source: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "inline_asm_elementwise"]


def _half(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def _half_bits(value: float) -> int:
    return struct.unpack("<H", struct.pack("<e", value))[0]  # rounds to nearest even, as sub.rn does


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute straight-line PTX over 32-bit registers (16-bit outputs keep their low half), per the
    PTX ISA: xor.b32; prmt.b32 in its default mode (selector nibble i picks byte i of the result from
    the 8 bytes {b, a}, a = bytes 0-3; a selector's bit 3 replicates the picked byte's sign); mov.b32
    of an immediate, a register, or unpacking a register into {low half, high half}; sub.f16x2."""
    regs = dict(operands)

    def val(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0) & MASK32

    body = asm.strip()
    assert body.startswith("{") and body.endswith("}"), asm
    for statement in filter(None, (s.strip() for s in body[1:-1].split(";"))):
        op, _, rest = statement.partition(" ")
        if op == ".reg":
            continue
        if op == "mov.b32" and rest.startswith("{"):
            outs, source = rest.split("}")
            low, high = (o.strip() for o in outs.strip("{ ").split(","))
            word = val(source.strip(", "))
            regs[low], regs[high] = word & 0xFFFF, word >> 16
            continue
        args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
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
        elif op == "sub.f16x2":
            a, b = val(args[1]), val(args[2])
            regs[args[0]] = sum(_half_bits(_half(a >> s) - _half(b >> s)) << s for s in (0, 16))
        else:
            raise AssertionError(f"the PTX model does not know {op!r}: extend it from the PTX ISA before trusting it")
    return regs


def test_the_prmt_conversion_gives_every_int8_value_at_every_position():
    _, source = emit_matmul(INT8_FP16, [])
    (call,) = _inline_asm_calls(source)
    asm, constraints = call.args[0].value, call.args[1].value
    assert constraints == "=h,=h,=h,=h,r"  # four fp16 results from one 32-bit word (a group's four int8 positions)
    rng = random.Random(0)
    values = list(range(-128, 128))
    words = [[v, rng.choice(values), rng.choice(values), rng.choice(values)] for v in values]
    words += [[rng.choice(values) for _ in range(4)] for _ in range(200)] + [[0, 0, 0, 0], [-128, 127, -1, 1]]
    for group in words:
        for rotation in range(4):  # every value at every position
            positions = group[rotation:] + group[:rotation]
            word = int.from_bytes(bytes(v & 0xFF for v in positions), "little")
            regs = run_ptx(asm, {"$4": word})
            assert [_half(regs[f"${i}"]) for i in range(4)] == [float(v) for v in positions]


def test_the_ptx_model_is_not_vacuous():
    """The model reproduces documented prmt cases and refuses instructions it does not know."""
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x3210; }", {"$1": 0x44332211, "$2": 0x88776655})["$0"] == 0x44332211
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x7654; }", {"$1": 0x44332211, "$2": 0x88776655})["$0"] == 0x88776655
    assert run_ptx("{ prmt.b32 $0, $1, $2, 0x0008; }", {"$1": 0x80, "$2": 0})["$0"] == 0x808080FF  # sign replicate
    assert _half(run_ptx("{ sub.f16x2 $0, $1, $2; }", {"$1": 0x3C00_4000, "$2": 0x3C00_3C00})["$0"]) == 1.0
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx("{ add.s32 $0, $1, $1; }", {"$1": 1})


def test_only_int8_fp16_kernels_carry_it_and_only_as_a_candidate(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert matmul_config(1, 4096, 4096, "float16", 132)["INT8_PRMT"] == 0  # never by default: unmeasured
    plain = matmul_candidates(1, 4096, 4096, "float16", 132, "int8")
    assert {c["INT8_PRMT"] for c in plain} == {0, 1}
    assert sorted(map(str, (dict(c, INT8_PRMT=0) for c in plain if c["INT8_PRMT"]))) == \
        sorted(map(str, (c for c in plain if not c["INT8_PRMT"])))  # a twin of every config
    for act, weight in (("float16", "float16"), ("bfloat16", "int8"), ("float32", "int8")):
        assert all(not c["INT8_PRMT"] for c in matmul_candidates(1, 4096, 4096, act, 132, weight))
        assert not _inline_asm_calls(emit_matmul(MatmulSpec(act, weight, False, None, False, act), [])[1])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(not c["INT8_PRMT"] for c in matmul_candidates(1, 64, 64, "float16", None, "int8"))


def test_launch_and_plan_refuse_it_where_it_cannot_apply():
    assert "INT8_PRMT must be 0 or 1" in validate_launch(dict(matmul_config(1, 64, 64, "float16"), M=1, INT8_PRMT=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU runs under the interpreter)
    x = torch.randn(2, 64, device=device)
    w = torch.randn(32, 64)
    values, meta = ref.nm_compress_masked(w * oracle_nm_mask(w, 2, 4), oracle_nm_mask(w, 2, 4), 2, 4)
    spec = MatmulSpec("float32", "float32", False, None, False, "float32")
    name, source = emit_matmul(spec, [])
    cfg = dict(matmul_config(2, 32, 64, "float32"), INT8_PRMT=1)
    with pytest.raises(InvalidInputError, match="INT8_PRMT=1 converts int8 weights"):
        sparse24_matmul(x, values.to(device), meta.to(device), None, None, None, spec, name, source, config=cfg)

    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    plan["0"].launch = dict(cfg, M=2)
    with pytest.raises(ValueError, match="INT8_PRMT=1 converts int8 weights; this layer's quant is None"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


def _int8_operands(m, n, k, seed):
    """x (fp16), int8 2:4 values + metadata + per-row scales, bias, and the dequantized pruned weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = oracle_nm_mask(w, 2, 4)  # independent of the code under test
    pruned = oracle_int8(w * mask)
    values, meta = ref.nm_compress_masked(pruned, mask, 2, 4)
    values, scales = ref.quantize_int8(values)
    return torch.randn(m, k, generator=g).half(), values, meta, scales, torch.randn(n, generator=g).half(), pruned


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's refusal; a GPU runs the kernel instead")
def test_the_interpreter_refuses_it_clearly():
    x, values, meta, scales, bias, _ = _int8_operands(2, 32, 64, seed=1)
    name, source = emit_matmul(INT8_FP16, [])
    cfg = dict(matmul_config(2, 32, 64, "float16"), INT8_PRMT=1)
    with pytest.raises(InvalidInputError, match="interpreter cannot run"):
        sparse24_matmul(x, values, meta, scales, bias, None, INT8_FP16, name, source, config=cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on a GPU only")
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (5, 96, 160), (16, 256, 1024)])
def test_int8_prmt_kernel_matches_torch_on_gpu(m, n, k):
    x, values, meta, scales, bias, pruned = _int8_operands(m, n, k, seed=m + n + k)
    name, source = emit_matmul(INT8_FP16, [])
    expected = x.double() @ pruned.double().t() + bias.double()
    for prmt in (0, 1):
        cfg = dict(matmul_config(m, n, k, "float16", 132), INT8_PRMT=prmt)
        y = sparse24_matmul(*(t.cuda() for t in (x, values, meta, scales, bias)), None, INT8_FP16, name, source,
                            config=cfg)
        assert output_error(y.cpu().double(), expected) <= 2e-3, f"INT8_PRMT={prmt}"
