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

from sparsec.runtime.layers import SparseLinear, autocast_changes, recording_portable_ops, torch_func_active


class CpuKernelLinear(SparseLinear):
    launch: dict | None = None  # {"max_rows": int | None}, from backend auto's measurement
    # the layer dtypes (= input dtypes) the kernels run, computing in float32 as torch's CPU GEMMs do
    kernel_dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)
    kernel_devices: tuple = ("cpu",)  # device types the kernel runs on (csr: torch's CSR product, CUDA too)

    def kernel_runs(self) -> bool:
        """Whether the kernel can run this layer as it now is (its dtype and device)."""
        return (self.packed.dtype_probe.dtype in self.kernel_dtypes
                and self.packed.values.device.type in self.kernel_devices)

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

    def layout(self):
        """The built layout (the per-call path: no TorchDynamo-disabled call once it exists). Tested against
        None, not for truth: a layout of any type reads as built (a tensor has no single truth value)."""
        layout = self._derived.get("layout")
        return layout if layout is not None else self.prepared()

    def build_now(self) -> None:
        """Build the layout now where the kernel can run the layer (kernel_runs): called when the layer
        is made, loaded, copied or moved, so that a torch.compile(fullgraph=True) right after finds it."""
        if self.kernel_runs():
            self.prepared()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rebuild_after_load()

    def _rebuild_after_load(self) -> None:
        # load_state_dict drops the layout (SparseLayer._load_from_state_dict: it was built from the old
        # values); the packed child is loaded after this module, so the layout is built again in a post
        # hook, once all are in. Left to the next call instead, it broke torch.compile(fullgraph=True).
        if _build_after_load not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_build_after_load)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._rebuild_after_load()  # (files saved before the hook existed)
        self.build_now()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.build_now()
        return module

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        layout = self.layout()
        return self.call_kernel(x.detach(), layout, bias)

    def max_rows(self) -> int | None:
        return (self.launch or {}).get("max_rows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here, not left to the kernels: a condensed kernel reads only the columns its indices
        # name, so extra features were silently ignored where nn.Linear raises. Not a tensor (None, a
        # list): F.linear's TypeError, as nn.Linear and the torch runtime give, not an AttributeError here.
        if not isinstance(x, torch.Tensor):
            return self.reference(x)
        if x.shape[-1] != self.packed.reduction:
            raise RuntimeError(f"layer {self.layer_name!r} takes inputs with {self.packed.reduction} features in "
                               f"the last dimension (its in_features), got an input of shape {tuple(x.shape)}")
        # The kernels run CPU layers of kernel_dtypes on inputs of the layer's dtype, and what torch.export /
        # torch.jit.trace record holds portable ops, not this process's kernel: anything else runs the
        # reference (an input of another dtype fails there as in the original layer), as do more rows than
        # the kernel measured faster at, a torch.func transform (the kernels have no batching rule) and CPU
        # autocast to another dtype (F.linear then computes and returns the autocast dtype).
        if (x.dtype != self.packed.dtype_probe.dtype or x.device != self.packed.values.device or not self.kernel_runs()
                or recording_portable_ops() or torch_func_active() or autocast_changes(x.device.type, x.dtype)):
            return self.reference(x)
        limit = self.max_rows()
        if limit is not None and x.numel() > limit * x.shape[-1]:
            return self.many_rows(x)
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            if torch.compiler.is_compiling():
                # torch.compile(dynamic=True) makes the feature dim symbolic too: the kernel wrapper's check
                # of it inside the autograd.Function then failed TorchDynamo with an internal
                # AssertionError. A view with the size checked above gives the Function a fixed one.
                x = x.view(*x.shape[:-1], self.packed.reduction)
            return LinearKernel.apply(x, self, self.bias)
        return self.kernel_forward(x)


def _build_after_load(module: CpuKernelLinear, incompatible_keys) -> None:
    module.build_now()


class LinearKernel(torch.autograd.Function):
    """y = layer.kernel_forward(x) = F.linear(x, W, bias), W the layer's packed rows, with F.linear's
    backward written out: dx = dy W, dbias = dy summed over rows. Plain ops, so the backward is itself
    differentiable (second derivatives: it records its graph when create_graph asks) and TorchDynamo
    traces it: torch.compile(fullgraph=True) holds in grad mode, where a backward calling
    torch.autograd.grad on the recomputed reference broke the graph (a bias requires grad by default)."""

    @staticmethod
    def forward(x, layer, bias):
        return layer.kernel_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        # (the rows are rebuilt from the packed weight, as the reference would: nothing is saved)
        dx = dy @ ctx.layer.packed.rows() if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, dbias
