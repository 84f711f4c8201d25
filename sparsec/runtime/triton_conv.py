"""TritonSparseConv2d / TritonSparseConv1d: a 2:4 convolution that runs a generated Triton kernel, an
implicit GEMM: each K block gathers the input's receptive fields in registers (no unfolded copy of
the input in memory), expands the 2:4 weight tile and runs tl.dot; the bias and a following
activation or cast run in its epilogue. groups=1 only (a grouped conv's rows read different
channels per output channel, which is not one GEMM). Padding modes other than zeros, and 'same'
padding that is not symmetric, pad the input with torch first. Backward recomputes the plain-torch
`reference`, as for the linear layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.errors import InvalidInputError
from sparsec.runtime.layers import SparseConv2d, conv2d
from sparsec.runtime.triton_linear import FusedEpilogue


class TritonSparseConv2d(FusedEpilogue, SparseConv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_epilogue()

    def spec(self):
        return self.kernel_spec("conv2d")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        return self.reference_epilogue(conv2d(x, weight, self.bias, self.conv, self.explicit_pad))

    def kernel_input(self, x: torch.Tensor):
        """(x as the kernel reads it: [B, C, H, W], padded here when the kernel cannot pad it; the kernel's
        geometry; whether x was unbatched)."""
        spatial = 1 if self.op == "conv1d" else 2
        if x.dim() not in (spatial + 1, spatial + 2):
            raise InvalidInputError(f"layer {self.layer_name!r} ({self.op}) takes a batched or unbatched input of "
                                    f"{spatial + 2} or {spatial + 1} dims, got shape {tuple(x.shape)}")
        unbatched = x.dim() == spatial + 1
        x = x.unsqueeze(0) if unbatched else x
        x = x.unsqueeze(-2) if spatial == 1 else x  # a conv1d runs as a conv2d of height 1
        if x.shape[1] != self.weight_shape[1]:
            raise InvalidInputError(f"layer {self.layer_name!r} takes inputs with {self.weight_shape[1]} channels, "
                                    f"got {x.shape[1]}")
        geometry, pad_first = self.derived("geometry", self._geometry)
        if pad_first:
            x = F.pad(x, self.explicit_pad, mode="constant" if self.conv.padding_mode == "zeros" else self.conv.padding_mode)
        return x, geometry, unbatched

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped as the kernel's output on x (for tracers)."""
        x, geometry, unbatched = self.kernel_input(x)
        y = x.new_empty(x.shape[0], self.weight_shape[0], *geometry.output_size(*x.shape[2:]),
                        dtype=self.out_torch_dtype())
        y = y.squeeze(-2) if self.op == "conv1d" else y
        return y.squeeze(0) if unbatched else y

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from sparsec.codegen.launch import sparse24_conv2d

        self.require_kernel()
        x, geometry, unbatched = self.kernel_input(x.detach())
        bias = self.bias.detach() if self.bias is not None else None
        y = sparse24_conv2d(x, self.packed.values, self.packed.meta, self.packed.scales, bias, self.out_scale,
                            self.derived("spec", self.spec), self.kernel_name, self.kernel_source, geometry,
                            config=self.launch_config(geometry.gemm_rows(x)))
        y = y.squeeze(-2) if self.op == "conv1d" else y
        return y.squeeze(0) if unbatched else y

    def _kernel_size(self) -> tuple[int, int]:
        return (1, self.weight_shape[2]) if self.op == "conv1d" else tuple(self.weight_shape[2:])

    def _geometry(self):
        """(the kernel's geometry, whether to pad the input with torch first: another padding mode, or
        'same' padding that is uneven; the kernel then pads nothing)."""
        from sparsec.codegen.launch import ConvGeometry

        conv = self.conv
        left, right, top, bottom = self.explicit_pad
        pad_first = conv.padding_mode != "zeros" or (isinstance(conv.padding, str) and (left != right or top != bottom))
        padding = (0, 0) if pad_first else (top, left) if isinstance(conv.padding, str) else tuple(conv.padding)
        return ConvGeometry(self._kernel_size(), tuple(conv.stride), padding, tuple(conv.dilation)), pad_first


class TritonSparseConv1d(TritonSparseConv2d):
    """A Conv1d layer (weight [out, in, k]): its kernel runs as a conv2d of height 1."""
    kind = "conv1d"
