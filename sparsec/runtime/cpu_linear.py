"""CpuKernelLinear: a sparse linear layer run by one of sparsec's C++ CPU kernels, chosen by
backend="auto" where it measured faster than a dense GEMM at the compiled batch.

`launch["max_rows"]` is the most input rows the kernel measured faster at: above them the layer
runs `many_rows` (a dense weight made for the call, then F.linear), since a dense GEMM's blocking
wins at many rows. The kernel's layout is built on first use from the packed weight and is
not saved (it belongs to the process and CPU that built it). Subclasses say how to build it and call
the kernel.
"""
from __future__ import annotations

import torch

from sparsec.runtime.layers import SparseLinear, run_kernel


class CpuKernelLinear(SparseLinear):
    launch: dict | None = None  # {"max_rows": int | None}, from backend auto's measurement
    # the layer dtypes (= input dtypes) the kernels run, computing in float32 as torch's CPU GEMMs do
    kernel_dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)

    def kernel_runs(self) -> bool:
        """Whether the kernel can run this layer as it now is (its dtype and device)."""
        return self.packed.dtype_probe.dtype in self.kernel_dtypes and self.packed.values.device.type == "cpu"

    def build_layout(self):
        raise NotImplementedError

    def call_kernel(self, x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def many_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on more rows than the kernel measured faster at (default: the torch runtime)."""
        return self.reference(x)

    # (torch.compile: building the layout reads tensor values, which TorchDynamo cannot trace, so it is
    # built eagerly, by build_now() or else on the first call. Once built, the call below traces into
    # one graph, the kernel included.)
    @torch.compiler.disable
    def prepared(self):
        return self.derived("layout", self.build_layout)

    def build_now(self) -> None:
        """Build the layout now where the kernel can run the layer (kernel_runs): called when the layer
        is made, loaded, copied or moved, so that a torch.compile(fullgraph=True) right after finds it."""
        if self.kernel_runs():
            self.prepared()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.build_now()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.build_now()
        return module

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        layout = self._derived.get("layout") or self.prepared()
        return self.call_kernel(x.detach(), layout, bias)

    def max_rows(self) -> int | None:
        return (self.launch or {}).get("max_rows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels run CPU layers of kernel_dtypes on inputs of the layer's dtype, and an exported
        # program holds portable ops, not this process's kernel: anything else runs the reference (an
        # input of another dtype fails there as in the original layer), as do more rows than the kernel
        # measured faster at.
        if (x.dtype != self.packed.dtype_probe.dtype or x.device.type != "cpu" or not self.kernel_runs()
                or torch.compiler.is_exporting()):
            return self.reference(x)
        limit = self.max_rows()
        if limit is not None and x.numel() > limit * x.shape[-1]:
            return self.many_rows(x)
        return run_kernel(self, x)
