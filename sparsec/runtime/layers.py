"""The nn.Modules the rewritten graph calls in place of chosen Linear / Conv1d / Conv2d / matmul layers.

The torch runtime is plain torch: rebuild the dense weight from the packed form, then run the same
F.linear / F.conv2d the original layer ran. That is exactly "the original model with the pruned
(and fake-quantized) weights", and keeps no dense copy between calls. (With a DensePacked weight,
backend "dense", the rebuild is the stored dense weight itself.)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.errors import InvalidInputError
from sparsec.meta import ConvParams
from sparsec.reference import rows_to_weight
from sparsec.runtime.packed import DensePacked, PackedWeight


class RuntimeLayer(nn.Module):
    """A layer sparsec put into the graph: it knows its plan name and answers inspection questions."""

    layer_name: str
    # Attribute path of a tensor with the original weight's dtype and device, kept through .to() / .half():
    # the model's reads of `weight.dtype` / `weight.device` read it instead.
    weight_probe: str

    def effective_weight(self) -> torch.Tensor:
        """The dense weight the layer computes with, in the original weight's shape."""
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        """The layer's sparsity mask (bool, original weight shape)."""
        raise NotImplementedError

    def check_incoming(self, state_dict, prefix: str) -> None:
        """Refuse what `state_dict` would load into this layer when it is not a form of this layer (a corrupt
        file, another compile's state dict), before anything is copied; names the layer. CompiledModel runs it
        for every layer before its load copies anything."""

    def weight_bytes(self) -> int:
        """Bytes this layer holds for its weight now (the plan's runtime_bytes)."""
        raise NotImplementedError


def held_weight_bytes(module: nn.Module) -> dict[str, int]:
    """Layer name -> what its runtime layer in `module` holds for its weight now (weight_bytes): the plan's
    totals count the memory the compiled model really takes, a kernel's layout or a trainable layer's dense
    weight and mask included, not the stored form alone."""
    return {m.layer_name: m.weight_bytes() for m in module.modules() if isinstance(m, RuntimeLayer)}


def explicit_padding(conv: ConvParams, weight_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) for a non-"zeros" padding_mode, as nn.Conv2d computes them
    (a conv1d weight [out, in, k] as the conv2d of height 1 it runs as)."""
    kh, kw = (1, weight_shape[2]) if len(weight_shape) == 3 else weight_shape[2:]
    if conv.padding == "same":
        pads = []
        for d, k in ((conv.dilation[1], kw), (conv.dilation[0], kh)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    return (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: ConvParams,
           explicit_pad: tuple[int, int, int, int] | None, fn=F.conv2d) -> torch.Tensor:
    """F.conv2d with nn.Conv2d's handling of padding modes; `fn` may be a drop-in (e.g. SDGP's).
    A conv1d (3-D weight) runs as a conv2d of height 1, so SDGP's conv backward serves it too."""
    if weight.dim() == 3:
        return conv2d(x.unsqueeze(-2), weight.unsqueeze(-2), bias, conv, explicit_pad, fn).squeeze(-2)
    if conv.padding_mode != "zeros":
        x = F.pad(x, explicit_pad, mode=conv.padding_mode)
        return fn(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class KernelForward(torch.autograd.Function):
    """Forward through a layer's fast kernel, backward through its plain-torch `reference`
    (recomputed): inference speed by default, and gradients still right when someone asks. The
    backward is itself differentiable (create_graph when grad mode is on in backward), so second
    derivatives (a gradient penalty, a Hessian-vector product) equal the reference's."""

    @staticmethod
    def forward(x, layer, *params):
        y = layer.kernel_forward(x)
        # Autograd refuses an in-place op (relu_ / inplace=True after the layer, not fused) on a view made
        # inside a Function: a kernel output that is a view becomes a tensor of its own (one copy, on this
        # differentiable path only; the linear kernels allocate their output in its final shape, no copy)
        return y if y._base is None else y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, layer, *params = inputs
        ctx.layer = layer
        ctx.save_for_backward(x, *params)

    @staticmethod
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        needs_x, needs_params = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        # grad mode is on in backward exactly when the caller asked for create_graph: then the gradient
        # is built from x itself (not a detached copy), so its own graph reaches x, dy and the params
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xd = x if create_graph else x.detach().requires_grad_(needs_x)
            y = ctx.layer.reference(xd)
            targets = ([xd] if needs_x else []) + [p for p, need in zip(params, needs_params) if need]
            grads = iter(torch.autograd.grad(y, targets, dy, allow_unused=True, create_graph=create_graph))
        return (next(grads) if needs_x else None, None, *[next(grads) if need else None for need in needs_params])


def torch_func_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is running. Kernels are opaque to
    them (vmap found no batching rule; jacrev through KernelForward, whose backward calls
    torch.autograd.grad, gave a wrong Jacobian without an error), so kernel layers run their plain-torch
    reference then. (torch._C._functorch.peek_interpreter_stack() read "active" while TorchDynamo
    traced a plain call; this reads False there.)"""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and active()


def autocast_changes(device: str, *dtypes: torch.dtype) -> bool:
    """Whether autocast on `device` is on and would run F.linear in another dtype than one of `dtypes` (an
    input's, a weight's)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4: per-device functions
        on, dtype = torch.is_autocast_enabled(device), (lambda: torch.get_autocast_dtype(device))
    elif device == "cuda":
        on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype
    else:
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype
    return on and any(d != dtype() for d in dtypes)


def recording_portable_ops() -> bool:
    """Whether torch.export or torch.jit.trace is recording the call. What they record is saved and run in
    other processes, so kernel layers record their plain-torch reference there: a custom operator names
    this process's layer by handle (a reloaded exported program failed, or silently ran another model's
    layer that took the same handle), and a saved jit trace holding a C++ kernel's operator failed to load
    ("Unknown builtin op")."""
    return _exporting() or torch.jit.is_tracing()


def _exporting() -> bool:
    """torch.compiler.is_exporting(), read from the flag torch.export sets: TorchDynamo before pytorch#176499
    (torch 2.11 on the H100 image) replaced that call by a constant True while it traced anything, so every
    kernel layer under torch.compile ran its reference (4x slower than the original model at decode)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


def run_kernel(layer, x: torch.Tensor) -> torch.Tensor:
    """layer.kernel_forward(x), differentiable through layer.reference when autograd needs it; the
    reference itself under a torch.func transform."""
    if torch_func_active():
        return layer.reference(x)
    if not torch.is_grad_enabled():  # inference: no parameter scan on the per-call path
        return layer.kernel_forward(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    if x.requires_grad or params:
        return KernelForward.apply(x, layer, *params)
    return layer.kernel_forward(x)


class SparseLayer(RuntimeLayer):
    """Common part: the packed weight, the bias, and what the plan said about this layer."""

    weight_probe = "packed.dtype_probe"
    kernel_backend = "torch"  # the plan's name for what runs this layer (a DensePacked weight: "dense")

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, op: str, weight_shape: tuple[int, ...],
                 layer_name: str, pattern: str, reason: str):
        super().__init__()
        self.packed = packed
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None
        self.op, self.weight_shape = op, tuple(weight_shape)
        self.layer_name, self.pattern, self.reason = layer_name, pattern, reason
        self._derived: dict = {}

    @property
    def backend(self) -> str:
        """What runs this layer, as the plan names it: torch, dense, triton, cusparselt, condensed, bitmask."""
        return "dense" if isinstance(self.packed, DensePacked) else self.kernel_backend

    def weight_bytes(self) -> int:
        """Bytes this layer holds for its weight now: the packed buffers plus what a kernel derived from
        them (a CPU kernel's layout: sorted float32 copies, narrower indices, a segment layout), each
        storage counted once (a layout sharing the packed values adds nothing for them). The bias is
        not a weight, as in the plan's dense bytes."""
        storages = {}

        def visit(value):
            if type(value) is torch.Tensor and value.layout == torch.sparse_csr:  # (csr's: a view of its arrays)
                visit((value.crow_indices(), value.col_indices(), value.values()))
            elif type(value) is torch.Tensor:  # (not cuSPARSELt's semi-structured subclass: CUDA only, not counted)
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                for f in dataclasses.fields(value):
                    visit(getattr(value, f.name))
            elif isinstance(value, (tuple, list)):
                for item in value:
                    visit(item)

        for buffer in self.packed.buffers():
            visit(buffer)
        for value in self._derived.values():
            visit(value)
        storages.pop(0, None)  # empty tensors (the dtype probe) have no storage
        return sum(storages.values())

    def derived(self, key: str, build):
        """A value computed from the packed weight once and reused per call (a kernel layout, a spec).
        Dropped when .to() / .half() change the module, and never pickled: it is rebuilt on use."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def _apply(self, fn, recurse=True):
        self._derived = {}
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        # what was derived may have read the attribute being replaced (a bias, the packed weight, a
        # launch config): build it again on next use. Not for `training`, which cm.eval() / cm.train() set
        # on every module and nothing derived reads: dropping a CPU kernel's layout there left it to be
        # built inside the next call, where torch.compile(fullgraph=True) cannot trace it.
        super().__setattr__(name, value)
        if name not in ("_derived", "training") and "_derived" in self.__dict__:
            self.__dict__["_derived"] = {}

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_derived"] = {}
        return state

    def check_incoming(self, state_dict, prefix: str) -> None:
        for name, own in self.packed.named_buffers():
            theirs = state_dict.get(f"{prefix}packed.{name}")
            if own is not None and isinstance(theirs, torch.Tensor) and theirs.shape != own.shape:
                # (torch's "size mismatch for ...packed.values" did not say that the pattern differs)
                raise InvalidInputError(
                    f"layer {self.layer_name!r} ({self.pattern}) holds packed.{name} of shape {tuple(own.shape)} here and "
                    f"{tuple(theirs.shape)} in this state dict: it comes from a compile with another pattern (or of "
                    f"another model); compile with the saving model's plan (sparsec.compile(model, example_inputs=..., "
                    f"plan=saved.plan)), or save and load the whole model (sparsec.save / sparsec.load)")
        try:
            self.packed.check_incoming(state_dict, f"{prefix}packed.")
        except InvalidInputError as e:
            raise InvalidInputError(f"layer {self.layer_name!r} ({self.pattern}): {e}") from None

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict copies into the packed buffers in place (this runs just before it does for
        # the children): what was derived from the old values must be built again from the new ones
        self._derived = {}
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer computes with, in the original shape (rebuilt on each access)."""
        return self.effective_weight()

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return rows_to_weight(self.packed.rows(dtype), self.op, self.weight_shape)

    def mask(self) -> torch.Tensor:
        return rows_to_weight(self.packed.mask(), self.op, self.weight_shape)

    def extra_repr(self) -> str:
        quant = f", {self.packed.quant}" if self.packed.quant else ""
        return f"{self.layer_name!r}: {self.op} {tuple(self.weight_shape)}, {self.pattern}{quant}"


class SparseLinear(SparseLayer):
    """y = x W^T + b for op "linear" (W [out, in]); y = x @ W for op "matmul" (W [K, N])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed rows are [out, K] for both ops, which is exactly F.linear's weight layout.
        return F.linear(x, self.packed.rows(), self.bias)


class SparseConv2d(SparseLayer):
    kind = "conv2d"

    def __init__(self, packed, bias, weight_shape, layer_name, pattern, reason, conv: ConvParams):
        super().__init__(packed, bias, self.kind, weight_shape, layer_name, pattern, reason)
        self.conv = conv
        self.explicit_pad = explicit_padding(conv, self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = rows_to_weight(self.packed.rows(), self.op, self.weight_shape)
        return conv2d(x, weight, self.bias, self.conv, self.explicit_pad)


class SparseConv1d(SparseConv2d):
    """A Conv1d layer (weight [out, in/groups, k]): runs as a conv2d of height 1."""
    kind = "conv1d"
