"""Kernel layers under torch.compile: each layer's kernel call as one custom operator.

TorchDynamo cannot trace a Triton layer's launch (Triton's launcher, and sparsec's direct launch,
read raw pointers and per-process Python state on every call), and a cuSPARSELt layer's
semi-structured weight is a tensor subclass whose tracing depends on the torch version. Under
torch.compile such a layer therefore calls `torch.ops.sparsec.kernel_layer(x, handle)`, a custom
operator whose implementation runs the layer's `kernel_forward` and whose shape-only version (the
layer's `output_like`) gives the tracer the output's shape and dtype, so a compiled model traces
into one graph with one call per layer (and CUDA graphs capture the kernels). Eager calls go
straight to the kernel: a custom operator costs host time on every call, which a one-row call
cannot spare. With gradients wanted, the layer runs its plain-torch reference instead (the same
math, differentiable), as eager calls do in backward.

`handle` names the layer: every kernel layer registers itself when it is built or unpickled, and
the registry holds it weakly.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from sparsec.runtime.layers import autocast_changes, recording_portable_ops

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (a deleted layer's entry goes with it)
_HANDLES = itertools.count(1)


def register(layer) -> None:
    """Give `layer` a handle the operator can find it by (a new one per object: a handle stored in a
    pickle names another object)."""
    layer._traced_handle = next(_HANDLES)
    _LAYERS[layer._traced_handle] = layer


def _layer(handle: int):
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"sparsec::kernel_layer: no live kernel layer has handle {handle} (was the layer "
                           f"deleted while a compiled graph still calls it?)")
    return layer


@torch.library.custom_op("sparsec::kernel_layer", mutates_args=())
def kernel_layer(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _layer(handle).kernel_forward(x)


@kernel_layer.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _layer(handle).output_like(x)


def traced_call(layer, x: torch.Tensor) -> torch.Tensor:
    """What a kernel layer computes while TorchDynamo traces it."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return layer.reference(x)
    return torch.ops.sparsec.kernel_layer(x, layer._traced_handle)


class OpaqueKernel:
    """Mixin for a runtime layer whose kernel tracers cannot see into: it registers a handle when built
    or unpickled, and its forward is the operator while TorchDynamo traces, `eager_forward(x)`
    otherwise. The layer gives kernel_forward(x), output_like(x), reference(x) and eager_forward(x)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self)

    def autocast_elsewhere(self, x: torch.Tensor) -> bool:
        """Whether autocast is on for x's device and would compute this layer's op in another dtype than its
        kernel's, or cast x: the reference runs then, following autocast as nn.Linear / nn.Conv2d do. (The
        kernel, generated for the compiled dtype, refused the autocast dtype's inputs the layers before it
        produced, and returned the compiled dtype where the model returns the autocast one.)"""
        return autocast_changes(x.device.type, x.dtype, self.packed.dtype_probe.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recording_portable_ops() or self.autocast_elsewhere(x):
            return self.reference(x)
        if torch.compiler.is_compiling():
            return traced_call(self, x)
        return self.eager_forward(x)
