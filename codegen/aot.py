"""Ahead-of-time builds of generated kernels for a GPU arch, without a GPU.

`triton.compile` with an explicit GPUTarget lowers a kernel all the way to PTX and cubin on a
CPU-only machine; that catches what the interpreter never checks (layouts, shared-memory limits,
unsupported conversions). Used by the tests for sm_80 and sm_90.
"""
from __future__ import annotations

from sparsec.codegen.cache import KernelCache
from sparsec.codegen.spec import MatmulSpec

# Largest dynamic shared memory a block may use (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "int8": "*i8"}


def matmul_signature(spec: MatmulSpec) -> dict[str, str]:
    act, weight = _PTR[spec.act_dtype], _PTR[spec.weight_dtype]
    return {"x_ptr": act, "stride_xm": "i32", "stride_xk": "i32",
            "values_ptr": weight, "stride_vn": "i32", "meta_ptr": "*i16", "stride_mn": "i32",
            "scales_ptr": "*fp32", "bias_ptr": act, "out_scale_ptr": act,
            "y_ptr": _PTR[spec.out_dtype], "stride_ym": "i32", "stride_yn": "i32",
            "M": "i32", "N": "i32", "K": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}


def condensed_signature(spec: MatmulSpec) -> dict[str, str]:
    act, weight = _PTR[spec.act_dtype], _PTR[spec.weight_dtype]
    return {"x_ptr": act, "stride_xm": "i32", "stride_xk": "i32",
            "values_ptr": weight, "stride_vn": "i32", "indices_ptr": "*i32", "stride_in": "i32",
            "scales_ptr": "*fp32", "bias_ptr": act, "out_scale_ptr": act,
            "y_ptr": _PTR[spec.out_dtype], "stride_ym": "i32", "stride_yn": "i32",
            "M": "i32", "N": "i32", "FANIN": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_J": "constexpr"}


def prune_signature(dtype: str) -> dict[str, str]:
    return {"x_ptr": _PTR[dtype], "stride_xr": "i32", "stride_xk": "i32", "values_ptr": _PTR[dtype], "stride_vr": "i32",
            "meta_ptr": "*i16", "stride_mr": "i32", "R": "i32", "K": "i32",
            "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}


def compile_for(capability: int, name: str, source: str, signature: dict[str, str], constexprs: dict[str, int],
                num_warps: int = 4, num_stages: int = 3, cache: KernelCache | None = None):
    """Build `name` from `source` for sm_<capability>; returns triton's CompiledKernel (asm has 'ptx', 'cubin')."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr((cache or KernelCache()).load(name, source), name)
    fn = getattr(fn, "fn", fn)  # under TRITON_INTERPRET the jit wrapper is an InterpretedFunction
    jit = triton.jit(fn) if not isinstance(fn, triton.runtime.JITFunction) else fn
    src = ASTSource(jit, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    limit = SHARED_MEMORY_LIMIT.get(capability)
    if limit is not None and compiled.metadata.shared > limit:
        raise ValueError(f"{name} with {constexprs}, {num_stages} stages needs {compiled.metadata.shared} bytes of "
                         f"shared memory; sm_{capability} allows {limit}")
    return compiled


# ---------------------------------------------------------------- a build check for the standard matrix

def standard_specs() -> list[MatmulSpec]:
    """One spec per dtype / weight / epilogue family the codegen emits."""
    return [MatmulSpec("float16", "float16", True, "relu", False, "float16"),
            MatmulSpec("float16", "int8", True, "gelu", True, "float32"),
            MatmulSpec("bfloat16", "bfloat16", False, "silu", False, "bfloat16"),
            MatmulSpec("float32", "float32", True, "gelu_tanh", False, "float32"),
            MatmulSpec("float32", "int8", False, None, False, "float16"),
            MatmulSpec("float16", "float16", True, "relu", False, "float16", format="fanin"),
            MatmulSpec("float32", "int8", True, "gelu", True, "float32", format="fanin")]


def check_standard_builds(capabilities=(80, 90)) -> dict[str, str]:
    """Build every standard kernel at its decode and large-batch configs for each arch.
    Returns {"<kernel>@sm_<cap>/M=<m>": "ok" | error text}. Must run where no kernel has been run in
    the Triton interpreter (the interpreter leaves triton.language patched in its process)."""
    from sparsec.codegen.builder import emit_matmul
    from sparsec.codegen.configs import condensed_config, matmul_config
    from sparsec.codegen.launch import prune_kernel_source

    results = {}
    for spec in standard_specs():
        name, source = emit_matmul(spec, [])
        for m in (1, 4096):
            if spec.format == "2:4":
                cfg, signature = matmul_config(m, 4096, 4096, spec.act_dtype), matmul_signature(spec)
            else:
                cfg, signature = condensed_config(m, 768, 307), condensed_signature(spec)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
            for cap in capabilities:
                key = f"{spec.short_name()}@sm_{cap}/M={m}"
                try:
                    ok = bool(compile_for(cap, name, source, signature, cfg, warps, stages).asm.get("cubin"))
                    results[key] = "ok" if ok else "no cubin"
                except Exception as e:  # noqa: BLE001 - reported, not raised: the caller checks every entry
                    results[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    name, source = prune_kernel_source()
    for cap in capabilities:
        try:
            compile_for(cap, name, source, prune_signature("float16"), {"BLOCK_R": 32, "BLOCK_W": 16})
            results[f"prune24@sm_{cap}"] = "ok"
        except Exception as e:  # noqa: BLE001
            results[f"prune24@sm_{cap}"] = f"{type(e).__name__}: {e}"
    return results


if __name__ == "__main__":
    import json
    import os

    os.environ["TRITON_INTERPRET"] = "0"
    print(json.dumps(check_standard_builds(), indent=1, sort_keys=True))
