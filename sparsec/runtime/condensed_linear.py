"""CondensedLinear: a constant fan-in linear layer run by the CPU condensed kernel
(runtime/condensed_cpu.py); see runtime/cpu_linear.py for when it runs and what it falls back to."""
from __future__ import annotations

import torch

from sparsec.runtime import condensed_cpu
from sparsec.runtime.cpu_linear import CpuKernelLinear


class CondensedLinear(CpuKernelLinear):
    kernel_backend = "condensed"

    def build_layout(self):
        # int8 and 16-bit layers' values become float32 once: the kernel multiplies float32 values
        return condensed_cpu.prepare(self.packed.kept_values(torch.float32), self.packed.indices)

    def call_kernel(self, x, layout, bias):
        if x.dtype == torch.float32:
            return condensed_cpu.condensed_linear(x, layout, bias=bias)
        # a 16-bit layer: its kept values are float32 in the layout, so x and bias go to float32 and y
        # comes back rounded once, as torch's CPU GEMMs compute 16-bit layers
        y = condensed_cpu.condensed_linear(x.float(), layout, bias=None if bias is None else bias.float())
        return y.to(x.dtype)
