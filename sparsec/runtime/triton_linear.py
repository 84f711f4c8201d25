"""TritonSparseLinear: a 2:4 or condensed constant fan-in linear layer that runs a generated,
fused Triton kernel (2:4: decompress in registers + tl.dot; fan-in: gather + reduce).

The fusion pass may fold what followed the layer in the graph into its epilogue: a bias add, an
activation (relu / gelu / gelu_tanh / silu), a per-channel scale and a dtype cast. The codegen
pass then attaches the kernel (name + source). Forward always runs the kernel; the same math in
plain torch (`reference`) is recomputed in backward when gradients are needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.errors import InvalidInputError
from sparsec.runtime import traced_call
from sparsec.runtime.layers import SparseLinear, run_kernel
from sparsec.runtime.packed import FanInPacked
from sparsec.shape_cache import remember

_ACTIVATION_FNS = {
    None: lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


class FusedEpilogue(traced_call.OpaqueKernel):
    """What the fusion pass folded into a Triton layer's kernel after the product (activation, per-channel
    scale, cast; the bias is the layer's own), the kernel the codegen pass attached, and the same
    epilogue in plain torch for `reference`."""

    kernel_backend = "triton"

    def init_epilogue(self) -> None:
        self.activation: str | None = None
        # True when the bias was a `y + vector` of the graph the fusion pass folded in (not the layer's own):
        # the reference then adds it after the product, as the graph did, so that under autocast it keeps
        # the vector's dtype (F.linear's bias is cast to the autocast dtype; `bf16 + float32` is float32)
        self.fused_bias = False
        self.register_buffer("out_scale", None)
        self.out_dtype: torch.dtype | None = None
        self.kernel_name: str | None = None
        self.kernel_source: str | None = None
        self.launch: dict | None = None  # measured launch config and the rows "M" it was measured at

    def kernel_spec(self, layout: str = "matmul"):
        from sparsec.codegen.spec import MatmulSpec

        act = str(self.packed.dtype_probe.dtype).removeprefix("torch.")
        return MatmulSpec(act_dtype=act, weight_dtype="int8" if self.packed.quant == "int8" else act,
                          bias=self.bias is not None, activation=self.activation, out_scale=self.out_scale is not None,
                          out_dtype=str(self.out_torch_dtype()).removeprefix("torch."),
                          format="fanin" if isinstance(self.packed, FanInPacked) else "2:4", layout=layout)

    def reference_epilogue(self, y: torch.Tensor) -> torch.Tensor:
        """Activation, scale and cast on the product plus bias (the scale runs along the last dim)."""
        y = _ACTIVATION_FNS[self.activation](y)
        if self.out_scale is not None:
            y = y * self.out_scale
        return y.to(self.out_dtype) if self.out_dtype is not None else y

    def launch_config(self, rows: int) -> dict | None:
        """The measured config at the rows it was measured for; None elsewhere (the shape table decides)."""
        from sparsec.codegen.configs import LAUNCH_KEYS

        launch = getattr(self, "launch", None)  # absent in layers saved before launch configs existed
        if launch is None or launch["M"] != rows:
            return None
        return {key: launch[key] for key in LAUNCH_KEYS}

    def require_kernel(self) -> None:
        if self.kernel_source is None:
            raise RuntimeError(f"layer {self.layer_name!r} has no generated kernel; the codegen pass did not run")
        self.derived("kernel_fits", self._check_kernel_fits)

    def _check_kernel_fits(self) -> bool:
        """Refuse a kernel generated for another spec than the layer's now. The codegen pass names each
        kernel after its spec; converting the layer itself (layer.half(), cm.graph_module.float(): only
        CompiledModel refuses conversions) or replacing its bias or activation changes the spec, not the
        kernel, which then ran with operands it was not written for: an interpreter error for a dtype
        change, and with the bias set to None the kernel added the weight values as the bias."""
        from sparsec.codegen.builder import kernel_name

        spec = self.derived("spec", self.spec)
        if kernel_name(spec) != self.kernel_name:
            made_for = next((line.removeprefix("# spec: ") for line in self.kernel_source.splitlines()
                             if line.startswith("# spec: ")), "another spec")
            raise InvalidInputError(
                f"layer {self.layer_name!r} now computes {spec.describe()}, but its Triton kernel {self.kernel_name} "
                f"was generated for {made_for}: the layer was converted (.half(), .to(dtype)) or its bias or "
                f"activation replaced after compiling. Compile the model again after such a change "
                f"(sparsec.compile(model.to(dtype), ...)), or compile with backend='torch', whose layers convert")
        return True

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, x)

    def out_torch_dtype(self) -> torch.dtype:
        return self.out_dtype or self.packed.dtype_probe.dtype

    def extra_repr(self) -> str:
        fused = [op for op in self.spec().epilogue_ops() if op != "dequant"]
        return super().extra_repr() + f", triton kernel {self.kernel_name}" + (f", fused {'+'.join(fused)}" if fused else "")


class TritonSparseLinear(FusedEpilogue, SparseLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_epilogue()

    def spec(self):
        return self.kernel_spec()

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped as the kernel's output on x (for tracers)."""
        return x.new_empty(*x.shape[:-1], self.packed.out_features, dtype=self.out_torch_dtype())

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "fused_bias", False) and self.bias is not None:  # (absent in layers saved before it)
            return self.reference_epilogue(F.linear(x, self.packed.rows()) + self.bias)
        return self.reference_epilogue(F.linear(x, self.packed.rows(), self.bias))

    def kernel_forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel on x; written into `out` ([rows, N]) when given (backend auto checks candidates so)."""
        # Per-call Python time is what a single-row call waits for: everything but x and out (the kernel,
        # config and grid for this row count, the operand tensors) is worked out once per shape and device.
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        key = ("call", rows, k, x.device)
        call = self._derived.get(key)
        if call is None:  # (bounded: a server sees a new row count with every prompt length)
            call = remember(self._derived, key, self._kernel_call(rows, k, x.device), counts=_is_call_key)
        return call(x, out)

    def _kernel_call(self, rows: int, k: int, device: torch.device):
        """call(x, out): the kernel with this layer's operands bound. (The tensors are bound, not copied:
        in-place updates reach the kernel; assigning a new parameter or buffer drops the binding,
        see SparseLayer.__setattr__.)"""
        self.require_kernel()
        # checked for both formats: the fan-in kernel gathers x's columns by index, so a shorter x was read out
        # of bounds and a longer one silently cut
        if k != self.packed.reduction:
            raise InvalidInputError(f"layer {self.layer_name!r} takes inputs with {self.packed.reduction} features in "
                                    f"the last dimension, got {k}")
        # as F.linear refuses it: the kernel would read one device's addresses on the other (free per call: this
        # runs once per shape and device)
        if device != self.packed.values.device:
            raise InvalidInputError(f"layer {self.layer_name!r} holds its weight on {self.packed.values.device}, got "
                                    f"an input on {device}")
        packed, bias, out_scale, spec = self.packed, self.bias, self.out_scale, self.derived("spec", self.spec)
        if spec.format == "fanin":
            from sparsec.codegen.launch import condensed_matmul

            values, indices, scales = packed.values, packed.indices, packed.scales
            name, source = self.kernel_name, self.kernel_source
            return lambda x, out: condensed_matmul(x, values, indices, scales, bias, out_scale, spec, name, source,
                                                   out=out)
        launch = self._sparse24_launch(rows, k, device, spec)
        values, meta, scales = packed.values, packed.meta, packed.scales
        return lambda x, out: launch(x, values, meta, scales, bias, out_scale, out)

    def _sparse24_launch(self, rows: int, k: int, device: torch.device, spec):
        from sparsec.codegen.launch import check_weight_dtype, sparse24_launch

        check_weight_dtype(self.packed.values, spec, self.kernel_name)  # (the launch itself checks no operand)
        return sparse24_launch(rows, self.packed.out_features, k, spec, self.kernel_name, self.kernel_source, device,
                               self.launch_config(rows))


def _is_call_key(key) -> bool:
    return isinstance(key, tuple) and key[0] == "call"
