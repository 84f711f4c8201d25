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
