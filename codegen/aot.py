"""Ahead-of-time builds of generated kernels for a GPU arch, without a GPU.

`triton.compile` with an explicit GPUTarget lowers a kernel all the way to PTX and cubin on a
CPU-only machine; that catches what the interpreter never checks (layouts, shared-memory limits,
unsupported conversions). Used by the tests for sm_80 and sm_90.
"""
from __future__ import annotations

import os

from sparsec.codegen.cache import KernelCache
from sparsec.codegen.spec import MatmulSpec
from sparsec.errors import last_line

# Largest dynamic shared memory a block may use (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "int8": "*i8"}


def matmul_signature(spec: MatmulSpec) -> dict[str, str]:
    act, weight = _PTR[spec.act_dtype], _PTR[spec.weight_dtype]
    return {"x_ptr": act, "stride_xm": "i32",
            "values_ptr": weight, "stride_vn": "i32", "meta_ptr": "*i16", "stride_mn": "i32",
            "scales_ptr": "*fp32", "bias_ptr": act, "out_scale_ptr": act,
            "y_ptr": _PTR[spec.out_dtype], "stride_ym": "i32",
            "partial_ptr": "*fp32", "count_ptr": "*i32",
            "M": "i32", "N": "i32", "K": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
            "SPLIT_K": "constexpr", "EVEN_K": "constexpr", "PRMT_EXPAND": "constexpr", "PREFETCH": "constexpr",
            "GATHER": "constexpr"}


def conv_signature(spec: MatmulSpec) -> dict[str, str]:
    act, weight = _PTR[spec.act_dtype], _PTR[spec.weight_dtype]
    return {"x_ptr": act, "stride_xb": "i32", "stride_xc": "i32", "stride_xh": "i32", "stride_xw": "i32",
            "values_ptr": weight, "stride_vn": "i32", "meta_ptr": "*i16", "stride_mn": "i32",
            "scales_ptr": "*fp32", "bias_ptr": act, "out_scale_ptr": act,
            "y_ptr": _PTR[spec.out_dtype], "stride_yb": "i32", "stride_yn": "i32", "stride_yh": "i32", "stride_yw": "i32",
            "H": "i32", "W": "i32", "OH": "i32", "OW": "i32", "M": "i32", "N": "i32", "K": "i32",
            **{key: "constexpr" for key in ("KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W",
                                            "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PRMT_EXPAND")}}


def kernel_signature(spec: MatmulSpec) -> dict[str, str]:
    if spec.layout == "conv2d":
        return conv_signature(spec)
    return matmul_signature(spec) if spec.format == "2:4" else condensed_signature(spec)


def condensed_signature(spec: MatmulSpec) -> dict[str, str]:
    act, weight = _PTR[spec.act_dtype], _PTR[spec.weight_dtype]
    return {"x_ptr": act, "stride_xm": "i32",
            "values_ptr": weight, "stride_vn": "i32", "indices_ptr": "*i32", "stride_in": "i32",
            "scales_ptr": "*fp32", "bias_ptr": act, "out_scale_ptr": act,
            "y_ptr": _PTR[spec.out_dtype], "stride_ym": "i32",
            "M": "i32", "N": "i32", "FANIN": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_J": "constexpr"}


def prune_signature(dtype: str) -> dict[str, str]:
    return {"x_ptr": _PTR[dtype], "stride_xr": "i32", "stride_xk": "i32", "values_ptr": _PTR[dtype], "stride_vr": "i32",
            "meta_ptr": "*i16", "stride_mr": "i32", "pruned_ptr": _PTR[dtype], "stride_pr": "i32", "R": "i32", "K": "i32",
            "BLOCK_R": "constexpr", "BLOCK_W": "constexpr", "COMPRESSED": "constexpr", "DENSE": "constexpr"}


def compile_for(capability: int, name: str, source: str, signature: dict[str, str], constexprs: dict[str, int],
                num_warps: int = 4, num_stages: int = 3, cache: KernelCache | None = None, aligned: bool = True):
    """Build `name` from `source` for sm_<capability>; returns triton's CompiledKernel (asm has 'ptx', 'cubin').
    Raises when the kernel needs more shared memory than the arch has, or spills registers.

    aligned: build as Triton's JIT specializes a launch on real layer shapes: every pointer 16-byte
    aligned and every integer but the ragged ones (rows; the condensed fan-in) a multiple of 16; that
    decides load widths."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr((cache or KernelCache()).load(name, source), name)
    fn = getattr(fn, "fn", fn)  # under TRITON_INTERPRET the jit wrapper is an InterpretedFunction
    jit = triton.jit(fn) if not isinstance(fn, triton.runtime.JITFunction) else fn
    attrs = {}
    if aligned:
        ragged = _ragged_integers(signature)
        attrs = {(jit.arg_names.index(arg),): [["tt.divisibility", 16]] for arg, kind in signature.items()
                 if kind.startswith("*") or (kind == "i32" and arg not in ragged)}
    src = ASTSource(jit, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    limit = SHARED_MEMORY_LIMIT.get(capability)
    if limit is not None and compiled.metadata.shared > limit:
        raise ValueError(f"{name} with {constexprs}, {num_stages} stages needs {compiled.metadata.shared} bytes of "
                         f"shared memory; sm_{capability} allows {limit}")
    usage = resource_usage(compiled.asm["cubin"])
    if usage and usage.get("STACK", 0) > 0:
        raise ValueError(f"{name} with {constexprs}, {num_warps} warps spills registers on sm_{capability}: "
                         f"{usage['REG']} registers and a {usage['STACK']}-byte stack frame")
    return compiled


def _ragged_integers(signature: dict[str, str]) -> set[str]:
    """Integer arguments that real launches do not give as multiples of 16, so an aligned build must
    not mark them (marked, the check built a variant such layers never launch): the rows (M, R)
    always; in the condensed kernel the fan-in and the value and index row strides that equal it (307
    of 768 inputs kept at 60% sparsity); in the conv kernel the image sizes and the strides made of
    them (7 x 7, 14 x 14 and 56 x 56 feature maps), and the unit strides along a row."""
    if "FANIN" in signature:
        return {"M", "FANIN", "stride_vn", "stride_in"}
    if "OH" in signature:
        return {"M", "H", "W", "OH", "OW", "stride_xc", "stride_xh", "stride_xw", "stride_yn", "stride_yh", "stride_yw"}
    return {"M", "R"}


def cuobjdump(cubin: bytes, *flags: str) -> str | None:
    """cuobjdump's output for a cubin, with the cuobjdump that ships with Triton's NVIDIA backend (or
    one on PATH); None where there is none."""
    import shutil
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """Registers, stack frame (register spills) and static shared memory of a cubin's kernel, read with
    the cuobjdump that ships with Triton's NVIDIA backend; None where there is none."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    if text is None:
        return None
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    usage[key] = int(value)
    return usage or None


# ---------------------------------------------------------------- a build check for the standard matrix

def standard_specs() -> list[MatmulSpec]:
    """One spec per dtype / weight / epilogue family the codegen emits."""
    return [MatmulSpec("float16", "float16", True, "relu", False, "float16"),
            MatmulSpec("float16", "int8", True, "gelu", True, "float32"),
            MatmulSpec("bfloat16", "bfloat16", False, "silu", False, "bfloat16"),
            MatmulSpec("bfloat16", "int8", True, None, False, "bfloat16"),
            MatmulSpec("float32", "float32", True, "gelu_tanh", False, "float32"),
            MatmulSpec("float32", "int8", False, None, False, "float16"),
            MatmulSpec("float16", "float16", True, "relu", False, "float16", format="fanin"),
            MatmulSpec("float32", "int8", True, "gelu", True, "float32", format="fanin")]


# (M, N, K) the configs are checked at: decode, mid batch, large batch. H100's SM count sizes split-K.
STANDARD_SHAPES = ((1, 4096, 4096), (64, 4096, 4096), (4096, 4096, 4096))
STANDARD_SMS = 132


def conv_specs() -> list[MatmulSpec]:
    return [MatmulSpec("float16", "float16", True, "relu", False, "float16", layout="conv2d"),
            MatmulSpec("bfloat16", "int8", True, None, False, "bfloat16", layout="conv2d"),
            MatmulSpec("float32", "float32", False, "silu", False, "float32", layout="conv2d")]


# Convolutions, as (M = batch x output pixels, N, K = in channels x taps): ResNet-50's 3x3 convs on
# 14 x 14 maps (batch 32) and on 7 x 7 maps (batch 1), and one on a 4 x 4 map (batch 1: the decode
# tiles); built as 3 x 3, stride 1, padding 1.
CONV_SHAPES = ((32 * 14 * 14, 256, 256 * 9), (7 * 7, 512, 512 * 9), (4 * 4, 512, 512 * 9))
CONV_GEOMETRY = dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1)
# The geometry is constexpr, so each is a build of its own: ResNet's other convs (a 3 x 3 that halves the
# map, the 1 x 1 projections, the stride-2 shortcut), built at each shape's default config
OTHER_CONV_GEOMETRIES = (dict(CONV_GEOMETRY, STRIDE_H=2, STRIDE_W=2),
                         dict(CONV_GEOMETRY, KH=1, KW=1, PAD_H=0, PAD_W=0),
                         dict(CONV_GEOMETRY, KH=1, KW=1, PAD_H=0, PAD_W=0, STRIDE_H=2, STRIDE_W=2))


def standard_builds() -> list[tuple[str, MatmulSpec | None, dict]]:
    """(key, spec, config) of every build the check makes: each spec's default config (and its
    PRMT_EXPAND twin, and at M = 1 the CUDA-core form's configs) at every standard shape, and every
    config backend="auto" may time for the specs with the heaviest
    epilogues (fp16 with bias + relu, int8 weights with bias + gelu + scale), deduplicated."""
    from sparsec.codegen.configs import condensed_config, matmul_candidates, prefetches

    builds, seen = [], set()
    for i, spec in enumerate(standard_specs()):
        for m, n, k in STANDARD_SHAPES:
            if spec.format == "fanin":
                configs = [condensed_config(m, 768, 307, spec.weight_dtype)]
            else:
                # EVEN_K (K a multiple of the K tile, true at the standard shapes) is what real layers
                # build with; the masked build for ragged K is checked at the decode config
                tuned = matmul_candidates(m, n, k, spec.act_dtype, STANDARD_SMS, spec.weight_dtype)
                default = [cfg for cfg in tuned if dict(cfg, PRMT_EXPAND=0) == tuned[0]]  # and its PRMT_EXPAND twin
                default += [cfg for cfg in tuned if cfg["BLOCK_M"] < 16]  # and the CUDA-core form's (M = 1)
                built = [(cfg, True) for cfg in (tuned if i < 2 else default)] + [(cfg, False) for cfg in default if m == 1]
                configs = [dict(cfg, EVEN_K=even, PREFETCH=prefetches(cfg)) for cfg, even in built]
            for cfg in configs:
                ident = (spec, tuple(sorted(cfg.items())))
                if ident not in seen:
                    seen.add(ident)
                    text = ",".join(f"{key}={value}" for key, value in cfg.items())
                    builds.append((f"{spec.short_name()}[{text}]", spec, cfg))
    for spec in conv_specs():
        for m, n, k in CONV_SHAPES:
            candidates = matmul_candidates(m, n, k, spec.act_dtype, None, spec.weight_dtype, conv=True)
            for cfg, geometry in ([(c, CONV_GEOMETRY) for c in candidates]
                                  + [(candidates[0], g) for g in OTHER_CONV_GEOMETRIES]):
                cfg = dict({key: value for key, value in cfg.items() if key not in ("SPLIT_K", "GATHER")}, **geometry)
                text = ",".join(f"{key}={value}" for key, value in cfg.items())
                key = f"{spec.short_name()}[{text}]"
                if key not in {b[0] for b in builds}:
                    builds.append((key, spec, cfg))
    for outputs in ({"COMPRESSED": 1, "DENSE": 0}, {"COMPRESSED": 0, "DENSE": 1}):  # what prune24 / prune24_dense launch
        builds.append((f"prune24[{','.join(k for k, v in outputs.items() if v)}]", None,
                       {"BLOCK_R": 32, "BLOCK_W": 16, **outputs, "num_warps": 4}))
    return builds


def check_standard_builds(capabilities=(80, 90)) -> dict[str, str]:
    """Build every `standard_builds` entry for each arch. Returns {"<key>@sm_<cap>": "ok" | error text}.
    Must run where no kernel has been run in the Triton interpreter (the interpreter leaves
    triton.language patched in its process)."""
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.prune_launch import prune_kernel_source

    results = {}
    for key, spec, cfg in standard_builds():
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
        if spec is None:
            (name, source), signature = prune_kernel_source(), prune_signature("float16")
        else:
            name, source = emit_matmul(spec, [])
            signature = kernel_signature(spec)
        for cap in capabilities:
            try:
                ok = bool(compile_for(cap, name, source, signature, cfg, warps, stages).asm.get("cubin"))
                results[f"{key}@sm_{cap}"] = "ok" if ok else "no cubin"
            except Exception as e:  # noqa: BLE001 - reported, not raised: the caller checks every entry
                results[f"{key}@sm_{cap}"] = last_line(e)
    return results


if __name__ == "__main__":
    import json

    os.environ["TRITON_INTERPRET"] = "0"
    print(json.dumps(check_standard_builds(), indent=1, sort_keys=True))
