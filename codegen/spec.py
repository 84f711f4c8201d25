"""What a generated kernel computes: small frozen records the builder turns into source."""
from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")
ACT_DTYPES = ("float16", "bfloat16", "float32")
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "int8": "i8"}


FORMATS = ("2:4", "fanin")
LAYOUTS = ("matmul", "conv2d")  # conv2d: an implicit GEMM gathering x's receptive fields (2:4 only)


GATHER_APPLIES = "one row (BLOCK_M 1) of float16 / bfloat16 inputs, with weights of their dtype or int8"
PRMT_EXPAND_APPLIES = "float16 / bfloat16 weights, and to int8 weights with float16 / bfloat16 inputs"


def has_prmt_expand(weight_dtype: str, act_dtype: str) -> bool:
    """Whether the 2:4 kernel for these dtypes has a PRMT_EXPAND form (configs.py): 16-bit weights
    (bit patterns, any 16-bit type), and int8 weights for fp16 or bf16 inputs."""
    return weight_dtype in ("float16", "bfloat16") or (weight_dtype == "int8" and act_dtype in ("float16", "bfloat16"))


def gathers(weight_dtype: str, act_dtype: str) -> bool:
    """Whether the 2:4 matmul kernel has a GATHER form (configs.py) for these dtypes: one row of 16-bit x, whose
    group of four positions fits the 64-bit word the form shifts."""
    return act_dtype in ("float16", "bfloat16") and weight_dtype in (act_dtype, "int8")


@dataclass(frozen=True)
class MatmulSpec:
    """y = epilogue(x @ W^T) with W 2:4-compressed along K (format "2:4") or condensed constant
    fan-in (format "fanin": values + int32 indices per output row). layout "conv2d": the same with
    x's rows gathered from an image's receptive fields (an implicit-GEMM convolution).

    act_dtype: dtype of x (and of the dot's inputs); weight_dtype: act_dtype, or "int8" with fp32
    per-output-channel scales; then + bias, activation, * out_scale (a per-channel vector that
    followed the layer in the graph), cast to out_dtype.
    """
    act_dtype: str
    weight_dtype: str
    bias: bool
    activation: str | None
    out_scale: bool
    out_dtype: str
    format: str = "2:4"
    layout: str = "matmul"

    def __post_init__(self):
        if self.act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype {self.act_dtype!r} not in {ACT_DTYPES}")
        if self.weight_dtype not in (self.act_dtype, "int8"):
            raise ValueError(f"weight_dtype {self.weight_dtype!r} must be {self.act_dtype!r} or 'int8'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} not in {FORMATS}")
        if self.layout not in LAYOUTS or (self.layout == "conv2d" and self.format != "2:4"):
            raise ValueError(f"layout {self.layout!r} must be one of {LAYOUTS} (conv2d with format 2:4 only)")

    def epilogue_ops(self) -> list[str]:
        ops = ["dequant"] if self.weight_dtype == "int8" else []
        ops += ["bias"] if self.bias else []
        ops += [self.activation] if self.activation else []
        ops += ["scale"] if self.out_scale else []
        if self.out_dtype != self.act_dtype:
            ops.append(f"cast:{self.out_dtype}")
        return ops

    def short_name(self) -> str:
        prefix = "sparse24_conv" if self.layout == "conv2d" else "sparse24_mm" if self.format == "2:4" else "condensed_mm"
        parts = [prefix, _SHORT[self.act_dtype]] + (["w8"] if self.weight_dtype == "int8" else [])
        parts += [op.replace("cast:", "to_").replace("float", "f") for op in self.epilogue_ops() if op != "dequant"]
        return "_".join(parts)

    def describe(self) -> str:
        weight = "2:4" if self.format == "2:4" else "condensed fan-in"
        conv = "conv2d (implicit GEMM), " if self.layout == "conv2d" else ""
        return (f"{conv}x {self.act_dtype}, W {weight} {self.weight_dtype}, epilogue "
                f"[{', '.join(self.epilogue_ops()) or 'none'}], out {self.out_dtype}")


@dataclass(frozen=True)
class PruneSpec:
    """Dense [R, K] -> 2:4 values [R, K/2] + int16 nibble metadata; Triton specialises on the dtype."""

    def short_name(self) -> str:
        return "prune24"

    def describe(self) -> str:
        return "magnitude 2:4 along the last dimension, ties to the lower index"
