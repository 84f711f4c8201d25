"""TrainableLayer: what `compile(..., train=True)` puts in place of a Linear / Conv1d / Conv2d / matmul layer.

The weight stays a dense Parameter (in the original shape) and the mask is separate, first-class
state. Forward computes with `weight * mask`:

* weight_update="fixed": the mask never changes. Pruned weights are zeroed once, get zero gradient
  (d(w*mask)/dw = mask), so an optimizer that moves no entry whose gradient and state are 0 (SGD,
  Adam / AdamW with weight decay, RMSprop, Adafactor, LBFGS) leaves them exactly 0. Exceptions: state
  that is nonzero there already (momentum / Adam moments loaded from a dense phase's checkpoint), and
  an optimizer whose update mixes entries (torch.optim.Muon orthogonalizes the whole momentum matrix,
  a dense update: 62-94% of the pruned entries of 2:4 layers were nonzero after 3 steps), still move
  the stored Parameter at masked positions. The layer computes with `weight * mask`, so outputs,
  `effective_weight()` and recompiles stay exact; only the raw Parameter (and `state_dict()`) then
  holds nonzeros under the mask.
* weight_update="ste": SR-STE (Zhou et al., ICLR 2021). The weight stays dense (pruned weights keep
  their values, so they can win their place back) and the mask is derived from it, on every forward
  and whenever it is read (`mask()`, `effective_weight()`, `state_dict()`, an inference compile of the
  trained model: the stored buffer is written by each forward and by `state_dict()`, so right after an
  optimizer step it is a step old); the gradient passes straight through to all weights, and pruned ones
  also get `ste_decay * w` (the "sparse-refined" term, lambda_W = 2e-4 in the paper), which pulls
  weights that keep flipping in and out of the mask towards 0. As in the paper's code the term is added
  in backward, once per backward through the layer: k accumulated micro-batches (or a layer called k
  times) add k * ste_decay * w per step (pass ste_decay / k to keep the paper's rate), and a
  GradScaler's unscale divides it by the loss scale, which backward cannot see (under fp16 loss scaling
  the decay is all but off).

With a gradient pattern (SDGP), the data gradient dX is computed from dY pruned N:M along the
output features (channels for conv); dW and db use the unpruned dY (sparsec/runtime/sdgp.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.distributed import full
from sparsec.errors import InvalidInputError
from sparsec.meta import ConvParams
from sparsec.options import DEFAULT_STE_DECAY
from sparsec.patterns import NM, Pattern
from sparsec.reference import nm_group_counts, pattern_mask, rows_to_weight, weight_to_rows
from sparsec.runtime.layers import RuntimeLayer, conv2d, explicit_padding
from sparsec.runtime.sdgp import sdgp_conv2d, sdgp_linear


class _SparseRefinedSTE(torch.autograd.Function):
    """forward: w * mask; backward: g + decay * (~mask) * w (straight through, plus SR-STE's term).
    The "new style" (setup_context, a vmap rule), as SDGP's Functions: torch.func (per-sample gradients
    by vmap of grad) refuses a Function whose forward takes ctx."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask, decay):
        return weight * mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, mask, decay = inputs
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight * (~mask), None, None


_TAP_REASON = ("SRigL captures each layer's dense gradient with a Python hook that writes to its own state on the "
               "steps before a mask update; torch.compile cannot put that in one graph: compile without "
               "fullgraph=True (the hook then runs between two graphs, and training is exact)")


def _tap_dense_grad(effective: torch.Tensor, sink) -> None:
    effective.register_hook(sink)


try:  # run eagerly under torch.compile: traced, the hook's write was refused as an "unsafe side effect" of a HOP
    _tap_dense_grad = torch._dynamo.disable(_tap_dense_grad, reason=_TAP_REASON)
except TypeError:  # (torch before 2.7 names no reason)
    _tap_dense_grad = torch._dynamo.disable(_tap_dense_grad)


class TrainableLayer(RuntimeLayer):
    weight_probe = "weight"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, op: str, layer_name: str, reason: str,
                 pattern: Pattern | None = None, mask: torch.Tensor | None = None, grad_pattern: NM | None = None,
                 grad_mode: str = "magnitude", weight_update: str = "fixed", ste_decay: float = DEFAULT_STE_DECAY,
                 conv: ConvParams | None = None):
        super().__init__()
        if (pattern is None) != (mask is None):
            raise ValueError("a weight pattern needs its mask and a mask needs its pattern")
        self.op, self.layer_name, self.reason = op, layer_name, reason
        self.pattern, self.grad_pattern, self.grad_mode = pattern, grad_pattern, grad_mode
        self.weight_update, self.ste_decay = weight_update, ste_decay
        self.conv = conv
        self.explicit_pad = explicit_padding(conv, tuple(weight.shape)) if conv is not None else None
        keep_dense = mask is None or weight_update == "ste"
        masked = weight.detach() if keep_dense else weight.detach() * mask
        # A frozen parameter stays frozen (fine-tuning part of a model is the usual reason to freeze).
        self.weight = nn.Parameter(masked.clone(), requires_grad=weight.requires_grad)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None
        self.register_buffer("weight_mask", mask.clone() if mask is not None else None)
        # Set by a scheduler that needs dL/d(weight * mask) at every position, masked ones included
        # (SRigL regrows by dense-gradient magnitude); autograd alone only yields the masked gradient.
        self.dense_grad_sink = None
        # A weak reference to the scheduler that owns the mask and the sink (SRigL): one per layer at a time
        self.mask_scheduler = None

    # ---- the weight the layer computes with

    def weight_bytes(self) -> int:
        """The dense weight and its mask: what a trainable layer holds (not the packed form, 0.64x the dense
        bytes for an MLP holding 1.19x)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_mask) if t is not None)

    @torch.no_grad()
    def current_mask(self, whole_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The mask the next forward computes with: SR-STE's derived from the weight now, a fixed one as
        stored. Reads only. `whole_weight`: the weight, when the caller has gathered it already
        (outside forward, an FSDP-sharded weight is gathered here otherwise: a collective)."""
        if self.weight_mask is not None and self.weight_update == "ste":
            w = whole_weight if whole_weight is not None else full(self.weight.detach())
            return rows_to_weight(pattern_mask(weight_to_rows(w, self.op), self.pattern), self.op, self.weight_mask.shape)
        return self.weight_mask

    def _current(self) -> torch.Tensor:
        if self.weight_mask is None:
            return self.weight
        if self.weight_update == "ste":
            mask = self.current_mask()  # SR-STE: re-prune from the dense weight every step
            # A plain buffer, whole on every rank. Not written under a torch.func transform (functional_call
            # inside vmap / grad: the weight is a functorch wrapper): torch refuses the write into a tensor the
            # transformed function captured, and the buffer is only a record (every read re-derives the mask).
            # (TorchDynamo cannot trace that check: under torch.compile the buffer is written, as before.)
            if torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(self.weight):
                self.weight_mask.copy_(mask)
            # Backward gets this call's own mask, not the buffer: a layer called twice in one forward
            # (shared weights) would otherwise find the buffer overwritten by the later call.
            return _SparseRefinedSTE.apply(self.weight, mask, self.ste_decay)
        effective = self.weight * self.weight_mask
        if self.dense_grad_sink is not None and effective.requires_grad:
            _tap_dense_grad(effective, self.dense_grad_sink)
        return effective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._current()
        g = self.grad_pattern
        if self.conv is not None:  # conv1d / conv2d
            if g is None:
                return conv2d(x, w, self.bias, self.conv, self.explicit_pad)
            sdgp = lambda x_, w_, b_, s, p, d, groups: sdgp_conv2d(x_, w_, b_, s, p, d, groups, g.n, g.m, self.grad_mode)  # noqa: E731
            return conv2d(x, w, self.bias, self.conv, self.explicit_pad, fn=sdgp)
        rows = w.t() if self.op == "matmul" else w
        if g is None:
            return F.linear(x, rows, self.bias)
        return sdgp_linear(x, rows, self.bias, g.n, g.m, self.grad_mode)

    # ---- inspection

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        w = full(self.weight.detach())  # gathered when FSDP shards it (a collective then)
        mask = self.current_mask(w)
        return w.clone() if mask is None else w * mask

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        mask = self.current_mask()
        return torch.ones_like(self.weight, dtype=torch.bool) if mask is None else mask.clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # SR-STE: the buffer holds the mask of the last forward, a step old after opt.step(). A state dict of it
        # loaded into a fixed-mask compile of the model (SR-STE, then fine-tuning with fixed masks) computed with
        # that stale mask, silently, while cm.mask() had reported the one the weight implies. Refresh it first.
        # Under FSDP that gathers the weight (a collective, as the state dict's own get_model_state_dict is:
        # every rank calls state_dict(), and sharded and one-process state dicts hold the same masks).
        if self.weight_mask is not None and self.weight_update == "ste":
            with torch.no_grad():
                self.weight_mask.copy_(self.current_mask())
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def check_incoming(self, state_dict, prefix: str) -> None:
        # An N:M layer's mask keeps exactly N of every M, in training too: a fan-in or unstructured mask loaded
        # here (state dicts of one model's compiles have the same keys and shapes) trained it as neither,
        # silently, until the inference compile refused it without naming the layer
        mask = state_dict.get(prefix + "weight_mask")
        if not isinstance(self.pattern, NM) or not isinstance(mask, torch.Tensor) or self.weight_mask is None \
                or mask.shape != self.weight_mask.shape or mask.dtype != torch.bool:
            return
        rows = weight_to_rows(mask, self.op)
        if rows.shape[-1] % self.pattern.m == 0:
            found = nm_group_counts(rows, self.pattern.m)
            if found != [self.pattern.n]:
                raise InvalidInputError(
                    f"layer {self.layer_name!r} trains {self.pattern} weights, but this state dict's mask at "
                    f"{prefix}weight_mask keeps {found} of every {self.pattern.m}: it comes from a compile with another "
                    f"pattern; compile with the saving model's plan (sparsec.compile(model, example_inputs=..., "
                    f"plan=saved.plan, train=True)), or save and load the whole model (sparsec.save / sparsec.load)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.check_incoming(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["dense_grad_sink"] = state["mask_scheduler"] = None  # a scheduler's callback is not part of the model
        return state

    def extra_repr(self) -> str:
        parts = [f"{self.layer_name!r}: {self.op} {tuple(self.weight.shape)}",
                 f"weights {self.pattern} ({self.weight_update})" if self.pattern else "dense weights"]
        if self.grad_pattern:
            parts.append(f"SDGP {self.grad_pattern} ({self.grad_mode})")
        return ", ".join(parts)
