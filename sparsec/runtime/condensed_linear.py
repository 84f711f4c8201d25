"""CondensedLinear: a constant fan-in layer run by the CPU condensed kernel (runtime/condensed_cpu.py).

Chosen by backend="auto" on CPU where it measured faster than a dense GEMM at the compiled batch.
The kernel's weight layout is built on first use from the packed values / indices and is not
saved (it belongs to the process and CPU that built it).
"""
from __future__ import annotations

import torch

from sparsec.runtime import condensed_cpu
from sparsec.runtime.layers import SparseLinear, run_kernel


class CondensedLinear(SparseLinear):
    # (torch.compile: building the layout reads tensor values, which TorchDynamo cannot trace; it runs
    # eagerly, once. Once built, the call below traces into one graph, the kernel included.)
    @torch.compiler.disable
    def prepared(self):
        # int8 layers dequantize once: the kernel multiplies float32 values
        return self.derived("layout", lambda: condensed_cpu.prepare(self.packed.kept_values(torch.float32),
                                                                    self.packed.indices))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        layout = self._derived.get("layout") or self.prepared()
        return condensed_cpu.condensed_linear(x.detach(), layout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel is fp32 / CPU, and an exported program holds portable ops, not this process's
        # kernel: anything else runs the reference.
        if (x.dtype != torch.float32 or x.device.type != "cpu" or self.packed.dtype_probe.dtype != torch.float32
                or torch.compiler.is_exporting()):
            return self.reference(x)
        return run_kernel(self, x)
