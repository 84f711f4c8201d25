"""DirectSparseConv2d: an unstructured (CSR) conv2d run by the direct sparse convolution Triton kernel
(method (d), Pietron & Zurek after Park et al. 2017; codegen/direct_conv.py): each output channel walks
its row's nonzeros and accumulates them against the zero-padded input at precomputed offsets, with no
im2col and no dense weight, the bias in its epilogue. Any groups (a nonzero's offset holds its group's
channels). Backward recomputes the plain-torch `reference`, as for the other kernel layers.

The kernel reads float values: an int8 layer keeps its int8 CSR values and scales as state and gives the
kernel a dequantized copy, built once (counted in the layer's runtime bytes). The nonzeros' offsets
depend on the input's spatial size and are kept per size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.errors import InvalidInputError
from sparsec.runtime import traced_call
from sparsec.runtime.layers import SparseConv2d, conv2d, run_kernel
from sparsec.runtime.packed import CSRPacked


OFFSET_SIZES_KEPT = 8  # input sizes whose nonzero offsets a layer keeps (each: 4 bytes per nonzero)


class DirectSparseConv2d(traced_call.OpaqueKernel, SparseConv2d):
    kernel_backend = "triton"

    def __init__(self, packed, *args, **kwargs):
        if not isinstance(packed, CSRPacked):
            raise TypeError(f"the direct sparse conv runs a CSR-packed (unstructured) weight, got {type(packed).__name__}")
        super().__init__(packed, *args, **kwargs)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.effective_weight(), self.bias, self.conv, self.explicit_pad)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self, x)

    def _padded_input(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(x, the padding the kernel applies): another padding mode than zeros is applied here, in torch."""
        if self.conv.padding_mode != "zeros":
            return F.pad(x, self.explicit_pad, mode=self.conv.padding_mode), 0
        return x, self.conv.padding

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from sparsec.codegen.direct_conv import direct_conv2d
        from sparsec.direct_conv import conv_padding, input_offsets

        if x.dim() not in (3, 4):
            raise InvalidInputError(f"layer {self.layer_name!r} (conv2d) takes a batched or unbatched input of 4 or 3 "
                                    f"dims, got shape {tuple(x.shape)}")
        channels = self.weight_shape[1] * self.conv.groups
        if x.shape[-3] != channels:
            # (as F.conv2d: the CSR columns only bound C/groups * R * S from above, so an input with more channels
            # ran, the extra ones ignored (groups=1) or the groups' channels misplaced, and one with fewer was
            # refused as a "corrupt CSR weight")
            raise RuntimeError(f"layer {self.layer_name!r} (conv2d, weight {tuple(self.weight_shape)}, groups="
                               f"{self.conv.groups}) expects an input with {channels} channels, got shape "
                               f"{tuple(x.shape)}")
        x, padding = self._padded_input(x.detach())
        packed, kernel_size = self.packed, tuple(self.weight_shape[2:])
        values = self.derived("kernel_values", lambda: packed.kept_values().contiguous())
        # (the offsets depend on the padded size alone; direct_conv2d checks the operands, once per call)
        top, bottom, left, right = self.derived("pads", lambda: conv_padding(padding, kernel_size, self.conv.stride,
                                                                             self.conv.dilation))
        padded = (x.shape[-2] + top + bottom, x.shape[-1] + left + right)
        key = f"offsets{padded}"
        if key in self._derived:  # most recently used last: a server cycling through the sizes it keeps rebuilds none
            self._derived[key] = self._derived.pop(key)
        else:  # a server fed many image sizes keeps the most recently used few, not one per size ever seen
            stale = [k for k in self._derived if k.startswith("offsets")]
            for k in stale[:max(0, len(stale) - OFFSET_SIZES_KEPT + 1)]:
                del self._derived[k]
        offsets = self.derived(key, lambda: input_offsets(
            packed.crow_indices, packed.col_indices, self.weight_shape[1], kernel_size, padded,
            self.conv.dilation, self.conv.groups).to(torch.int32))
        bias = self.bias.detach() if self.bias is not None else None
        return direct_conv2d(x, packed.crow_indices, packed.col_indices, values, bias, self.conv.stride, padding,
                             self.conv.dilation, self.conv.groups, kernel_size=kernel_size, offsets=offsets)

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        # F.conv2d's shape rules on meta operands of the layer's shapes: the reference on this layer's real
        # packed weight, run inside the tracer's fake mode, failed torch.compile ("convert all Tensors to
        # FakeTensors first")
        def meta(shape):
            return torch.empty(shape, dtype=x.dtype, device="meta")

        bias = meta(self.bias.shape) if self.bias is not None else None
        y = conv2d(meta(x.shape), meta(self.weight_shape), bias, self.conv, self.explicit_pad)
        return x.new_empty(y.shape)
