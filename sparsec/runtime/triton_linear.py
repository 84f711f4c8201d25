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
        return self.reference_epilogue(F.linear(x, self.packed.rows(), self.bias))

    def kernel_forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel on x; written into `out` ([rows, N]) when given (backend auto checks candidates so)."""
        # Per-call Python time is what a single-row call waits for: everything but x and out (the kernel,
        # config and grid for this row count, the operand tensors) is worked out once per shape and device.
        k = x.shape[-1]
        rows = x.numel() // k if k else 0
        key = ("call", rows, k, x.device)
        call = self._derived.get(key) or self.derived(key, lambda: self._kernel_call(rows, k, x.device))
        return call(x, out)

    def _kernel_call(self, rows: int, k: int, device: torch.device):
        """call(x, out): the kernel with this layer's operands bound. (The tensors are bound, not copied:
        in-place updates reach the kernel; assigning a new parameter or buffer drops the binding,
        see SparseLayer.__setattr__.)"""
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
        self.require_kernel()
        from sparsec.codegen.launch import sparse24_launch

        if k != self.packed.reduction:
            raise InvalidInputError(f"layer {self.layer_name!r} takes inputs with {self.packed.reduction} features in "
                                    f"the last dimension, got {k}")
        return sparse24_launch(rows, self.packed.out_features, k, spec, self.kernel_name, self.kernel_source, device,
                               self.launch_config(rows))
