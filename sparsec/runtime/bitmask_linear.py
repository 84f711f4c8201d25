"""BitmaskLinear: an N:M linear layer run by the CPU bitmask kernel (runtime/bitmask_cpu.py), straight
from its packed values (float32 / bfloat16 / float16, or int8 with scales) plus one bit per weight;
see runtime/cpu_linear.py for when it runs and what it falls back to."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.runtime import bitmask_cpu
from sparsec.runtime.cpu_linear import CpuKernelLinear


class BitmaskLinear(CpuKernelLinear):
    kernel_backend = "bitmask"

    def build_layout(self):
        return bitmask_cpu.prepare(self.packed.values, self.packed.mask(), self.packed.scales)

    def call_kernel(self, x, layout, bias):
        return bitmask_cpu.bitmask_linear(x, layout, bias)

    def many_rows(self, x):
        # the weight densified by the C++ code: a memory-speed pass, ~4x faster than the torch
        # runtime's decoding of the nibble metadata (4096 x 4096: 19 ms against 75 ms here)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self.reference(x)
        layout = self.layout()
        return F.linear(x, bitmask_cpu.densify(layout).to(x.dtype), self.bias)
