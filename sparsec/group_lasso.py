"""GroupLasso: SSL's group-lasso penalty over a compiled model's layers (FSSL, methods.md (c)).

    penalty = lam * sum over layers, over groups g of ||w_g||_2        (un-squared L2 norms)

Groups are defined on the layer's `[out, in, ...]` view, whatever the storage orientation:

* "rows" (alias "filters"): one group per output feature: Linear `W[o, :]`, Conv2d filter
  `W[o, :, :, :]`, matmul `y = x @ W` with `W [K, N]`: column `W[:, n]` (output n reads it).
* "cols" (alias "channels"): one group per input feature: Linear `W[:, i]`, Conv2d input channel
  `W[:, c, :, :]`, matmul: row `W[k, :]`. For a grouped conv, input channel `c` of conv group `j`
  is read only by that group's filters, so its group is `W[filters of j, c, :, :]`.
* a list such as ["rows", "cols"]: overlapping groups, their gradients add.

The gradient of ||w_g|| is w / ||w_g||, and exactly 0 for a group whose norm is 0 (Caffe SSL's
`caffe_div_checkzero`): a plain `torch.linalg.norm` backward gives NaN there, hence `_GroupNorm`.

The penalty reads the weight the layer computes with: a masked TrainableLayer ("fixed" masks)
contributes `weight * mask`, so pruned entries get no gradient. With SR-STE ("ste") the mask is
re-derived from the dense weight every step, so the penalty acts on the dense weight (a whole
group can only be removed once every entry, masked or not, is zero).
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from sparsec.distributed import check_whole, described, full, is_sharded, shard_like, unwrap_ddp
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.meta import get_meta, layer_nodes
from sparsec.numbers_check import is_real
from sparsec.options import name_list
from sparsec.passes.weight_reads import owner_of
from sparsec.runtime.training import TrainableLayer

GROUPS = {"rows": "rows", "filters": "rows", "cols": "cols", "channels": "cols"}


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _GroupNorm(torch.autograd.Function):
    """||t||_2 over `dims`; backward t / ||t|| per group, 0 where the norm is 0 (no NaN).

    The squares are summed in fp32 (fp64 for fp64) and the norms returned in that dtype: in fp16
    a weight below ~2.4e-4 squares to 0 (a nonzero group then reads as norm 0, and
    `freeze_zero_groups` / `sparsity` would treat it as removed) and one above ~256 squares to
    Inf. The gradient is returned in t's dtype."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(t)
        ctx.dims = dims
        return t.to(_acc_dtype(t)).square().sum(dims).sqrt()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (t,) = ctx.saved_tensors
        wide = t.to(_acc_dtype(t))
        norms = wide.square().sum(ctx.dims, keepdim=True).sqrt()
        for d in sorted(ctx.dims):
            grad = grad.unsqueeze(d)
        scale = torch.where(norms > 0, grad / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
        return (wide * scale).to(t.dtype), None


def group_view(weight: torch.Tensor, op: str, conv_groups: int = 1) -> torch.Tensor:
    """`[g, out/g, in/g, k]` view: rows reduce dims (2, 3), cols dims (1, 3); k = conv kernel size (1 else)."""
    w = weight.t() if op == "matmul" else weight  # matmul W [K, N] -> [N, K] = [out, in]
    out, cin = w.shape[0], w.shape[1]
    return w.reshape(conv_groups, out // conv_groups, cin, -1)


def row_norms(weight: torch.Tensor, op: str, conv_groups: int = 1) -> torch.Tensor:
    """One norm per output feature, in output order."""
    v = group_view(weight, op, conv_groups)
    return _GroupNorm.apply(v, (2, 3)).reshape(-1)


def col_norms(weight: torch.Tensor, op: str, conv_groups: int = 1) -> torch.Tensor:
    """One norm per input feature (conv: per real input channel, conv group by conv group)."""
    v = group_view(weight, op, conv_groups)
    return _GroupNorm.apply(v, (1, 3)).reshape(-1)


def _expand(keep: torch.Tensor, kind: str, weight: torch.Tensor, op: str, conv_groups: int) -> torch.Tensor:
    """Per-group bool `keep` (in `row_norms` / `col_norms` order) -> bool tensor of the weight's shape."""
    g, og, cin, k = group_view(weight, op, conv_groups).shape
    per_group = keep.reshape((g, og, 1, 1) if kind == "rows" else (g, 1, cin, 1))
    full = per_group.expand(g, og, cin, k).reshape(g * og, cin * k)  # the [out, in, ...] view, flattened
    return full.t().contiguous() if op == "matmul" else full.reshape(weight.shape)


@dataclass
class LayerWeight:
    """A weight-bearing layer of a compiled model, as the penalty sees it. The weight and mask are
    looked up on their module at each use, not kept: `.to(device)` and FSDP's `fully_shard` put new
    tensors in place, and a penalty on the old ones would silently train nothing."""
    name: str
    op: str                          # "linear" | "matmul" | "conv1d" | "conv2d"
    owner: nn.Module                 # the module holding the weight
    attr: str                        # its parameter's name there
    masked: bool                     # multiply by owner.weight_mask before use (fixed masks)
    shape: tuple[int, ...]           # the weight's shape, as compiled
    conv_groups: int = 1

    @property
    def weight(self) -> nn.Parameter:
        weight = getattr(self.owner, self.attr)
        check_whole(weight, self.shape, self.name, "GroupLasso")
        return weight

    def effective(self) -> torch.Tensor:
        w = self.weight
        return w * shard_like(self.owner.weight_mask, w) if self.masked else w

    def whole_effective(self) -> torch.Tensor:
        """`effective()` detached and whole (gathered from the ranks under FSDP: a collective)."""
        return full(self.effective().detach())

    def computed(self) -> torch.Tensor:
        """The whole weight the layer computes with. Unlike `effective()` this applies an SR-STE layer's
        mask too (derived from the weight now): what the model's sparsity is, and what shrink removes."""
        return self.owner.effective_weight() if isinstance(self.owner, TrainableLayer) else self.whole_effective()


def layer_weights(cm, layers: Iterable[str] | None = None) -> list[LayerWeight]:
    """The plan's layers present in cm's graph, optionally restricted to names / full-match regexes."""
    gm = cm.graph_module
    nodes = layer_nodes(gm)
    out = []
    modules = cm.sparse_modules()
    for lp in cm.plan:
        module = modules.get(lp.name)
        if module is not None and not isinstance(module, TrainableLayer):
            raise InvalidInputError(
                f"layer {lp.name!r} holds a packed inference weight ({type(module).__name__}), which cannot be "
                f"trained; compile with train=True (or pattern='dense') to use GroupLasso")
        if isinstance(module, TrainableLayer):
            masked = module.weight_mask is not None and module.weight_update == "fixed"
            groups = module.conv.groups if module.conv is not None else 1
            out.append(LayerWeight(lp.name, module.op, module, "weight", masked, lp.weight_shape, groups))
        elif lp.name in cm._dense_weights:
            path, op = cm._dense_weights[lp.name]
            info = get_meta(nodes[lp.name][0]).layer if lp.name in nodes else None
            groups = info.conv.groups if info is not None and info.conv is not None else 1
            out.append(LayerWeight(lp.name, op, *owner_of(gm, path), False, lp.weight_shape, groups))
    if layers is not None:
        patterns = name_list(layers, "layers", "layer names or full-match regular expressions")
        if not patterns:  # not "found no weight-bearing layer": the model has some
            raise InvalidInputError(f"layers is empty; pass None for every layer, or some of {[lw.name for lw in out]}")
        for p in patterns:
            if any(p == lw.name for lw in out):
                continue
            try:
                re.compile(p)
            except re.error as e:  # a name with regex metacharacters that is no valid regex
                raise InvalidInputError(f"layers entry {p!r} is neither a layer name nor a valid regular "
                                        f"expression ({e}); layers: {[lw.name for lw in out]}") from None
        chosen = [lw for lw in out if any(p == lw.name or re.fullmatch(p, lw.name) for p in patterns)]
        unmatched = [p for p in patterns if not any(p == lw.name or re.fullmatch(p, lw.name) for lw in out)]
        if unmatched:
            raise InvalidInputError(f"layers={unmatched} match no layer; layers: {[lw.name for lw in out]}")
        out = chosen
    computed = [lw.name for lw in out if parametrize.is_parametrized(lw.owner, lw.attr)]
    if computed:  # zero_small_ and freezing would write to a tensor the next forward recomputes
        who = f"layer {computed[0]!r} computes its" if len(computed) == 1 else f"layers {computed} compute their"
        raise InvalidInputError(
            f"{who} weight with a parametrization (torch.nn.utils.parametrize), which GroupLasso cannot zero or "
            f"freeze; leave {'it' if len(computed) == 1 else 'them'} out with layers=[...] (layers: "
            f"{[lw.name for lw in out]}), or remove the parametrization before compiling")
    if not out:
        raise InvalidInputError("GroupLasso found no weight-bearing layer (Linear / Conv2d / matmul) in the model")
    return out


def parse_groups(groups: str | Iterable[str]) -> tuple[str, ...]:
    names = name_list(groups, "groups", f"{sorted(GROUPS)}")
    if not names:
        raise InvalidInputError(f"groups is empty; accepted: {sorted(GROUPS)}")
    out = []
    for g in names:
        if g not in GROUPS:
            raise InvalidInputError(f"unknown group type {g!r}; accepted: {sorted(GROUPS)} or a list of them")
        if GROUPS[g] not in out:  # "rows" and "filters" are the same groups: count them once
            out.append(GROUPS[g])
    return tuple(out)


@dataclass
class _ZeroFrozenGradient:
    """The gradient hook of one weight with frozen entries: their gradient is 0."""
    keep: torch.Tensor
    owner: "FrozenGroups"  # held so that the FrozenGroups lives as long as the parameter (FrozenGroups.__init__)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:  # a tensor hook: returns the gradient to use
        return grad * self.keep

    def after_accumulation(self, param: nn.Parameter) -> None:  # a post-accumulate-grad hook (FSDP)
        if param.grad is not None:
            param.grad.mul_(self.keep)


def _reapply_after_step(frozen_ref):
    def after_step(optimizer, args, kwargs) -> None:
        frozen = frozen_ref()
        if frozen is not None:
            frozen._reapply({id(p) for group in optimizer.param_groups for p in group["params"]})
    return after_step


class FrozenGroups:
    """Zero groups held at exactly 0 while fine-tuning (SSL's DISCONNECTED_GRPWISE).

    Gradient hooks zero the gradient of every entry in a frozen group, so a fresh optimizer
    (SGD with momentum / weight decay, Adam, AdamW) never moves them: their gradient, momentum
    and decay terms are all 0. An optimizer that carried state from before freezing (momentum,
    Adam's moments) still moves them through that state, so after every optimizer step that
    updated a frozen weight its frozen entries are set back to 0 (a global step post-hook, which
    acts only on this object's weights). `remove()` ends both.

    Under DDP the hook runs on each rank's gradient before DDP averages it. Under FSDP
    (`fully_shard`, freeze after sharding) FSDP reduces the gradient outside autograd, so the hook
    runs after that instead (a post-accumulate-grad hook, which FSDP calls on each rank's slice).
    """

    def __init__(self, layers: list[LayerWeight], keep: dict[str, torch.Tensor]):
        self.masks = keep  # layer name -> bool, weight shape: True = trainable, False = frozen at 0
        self._layers = {lw.name: lw for lw in layers}
        self._handles = [h for name, k in keep.items() if (h := self._hook(self._layers[name].weight, k)) is not None]
        # The optimizer hook is global, so it must not keep the model alive: it holds this object weakly,
        # and each parameter holds it strongly (below), so an unbound `gl.freeze_zero_groups()` still holds
        # the groups at 0 for exactly as long as the parameters live.
        self._handles.append(register_optimizer_step_post_hook(_reapply_after_step(weakref.ref(self))))
        weakref.finalize(self, self._handles[-1].remove)  # (once the model is gone, so is its global hook)

    def _hook(self, param: nn.Parameter, keep: torch.Tensor):
        if not param.requires_grad:
            # A frozen layer (requires_grad=False, e.g. a fixed backbone) gets no gradient, so no optimizer
            # moves it, and torch refuses a hook on it. Unfreezing it later needs freeze_zero_groups() again.
            return None
        if is_sharded(param):
            return param.register_post_accumulate_grad_hook(
                _ZeroFrozenGradient(shard_like(keep, param), self).after_accumulation)
        return param.register_hook(_ZeroFrozenGradient(keep, self))

    @torch.no_grad()
    def reapply_(self) -> None:
        """Set every frozen entry back to 0 (what the optimizer step hook does after each step)."""
        self._reapply(None)

    @torch.no_grad()
    def _reapply(self, only: set[int] | None) -> None:
        for name, keep in self.masks.items():
            weight = self._layers[name].weight
            if only is None or id(weight) in only:
                weight.mul_(shard_like(keep, weight))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class GroupLasso:
    """`GroupLasso(cm, lam, groups)()`: the penalty to add to the loss (a scalar tensor).

    lam >= 0; groups "rows" | "cols" | "filters" | "channels" or a list of them; layers: names or
    full-match regexes (default: every plan layer the graph runs). Holds references to cm's live
    parameters, so each call reads their current values.
    """

    def __init__(self, cm, lam: float, groups: str | Iterable[str] = "rows", layers: Iterable[str] | None = None):
        from sparsec.compiled import CompiledModel

        given = cm
        cm, _ = unwrap_ddp(cm, None, "GroupLasso")  # (it runs no collectives: DDP's gradients agree already)
        if not isinstance(cm, CompiledModel):  # a plain model's weights are not the ones sparsec trains
            raise InvalidTypeError(f"GroupLasso needs a sparsec.CompiledModel, got {described(given, cm)}; pass the "
                                   f"compiled model, or the DistributedDataParallel wrapping it, or compile the model "
                                   f"first: sparsec.compile(model, pattern='dense', example_inputs=..., train=True)")
        self.lam = lam
        self.groups = parse_groups(groups)
        cm.check_whole_weights("GroupLasso")
        self.layers = layer_weights(cm, layers)

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, lam: float) -> None:
        # A property, so a schedule that sets `gl.lam = ...` each step is checked like the constructor:
        # a negative or NaN lam would silently reward larger groups or make the loss NaN.
        if not is_real(lam):  # (numpy scalars too)
            raise InvalidTypeError(f"lam must be a number, got {type(lam).__name__}")
        if not math.isfinite(lam) or lam < 0:
            raise InvalidInputError(f"lam must be a finite number >= 0, got {lam}")
        self._lam = float(lam)

    def _norms(self, lw: LayerWeight, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = lw.effective() if weight is None else weight
        return (row_norms if kind == "rows" else col_norms)(w, lw.op, lw.conv_groups)

    def __call__(self) -> torch.Tensor:
        # Under FSDP a layer's sum is a DTensor (its norms span the ranks' slices); `full` makes it
        # the plain scalar every rank adds to its loss.
        total = sum(full(self._norms(lw, kind).sum()) for lw in self.layers for kind in self.groups)
        return self.lam * total

    penalty = __call__

    # ---- SSL's thresholding, freezing and metrics

    @torch.no_grad()
    def zero_small_(self, threshold: float) -> int:
        """Set every group (of the configured types) whose norm is <= threshold, as the weights are at the
        call, to exactly 0. Returns how many groups were nonzero before and are zero now."""
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1 and not threshold.is_complex():
            threshold = threshold.item()  # e.g. a quantile of the norms
        if not is_real(threshold):  # "a" >= 0 says nothing useful
            raise InvalidTypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not threshold >= 0:
            raise InvalidInputError(f"threshold must be >= 0, got {threshold}")
        zeroed = 0
        for lw in self.layers:
            # Judge every group type on the norms before any zeroing. Zeroing rows first shrinks the column
            # norms; judging columns on those cascaded (one small row could take columns and then rows above
            # the threshold with it, down to the whole layer) and made the result depend on the order of `groups`.
            w = lw.whole_effective()
            before = {kind: self._norms(lw, kind, w) for kind in self.groups}
            keep = torch.ones_like(w, dtype=torch.bool)
            for kind, norms in before.items():
                keep &= _expand(~(norms <= threshold), kind, w, lw.op, lw.conv_groups)  # (a NaN group is kept: seen)
            lw.weight.mul_(shard_like(keep, lw.weight))
            after = lw.whole_effective()
            for kind, norms in before.items():
                zeroed += int(((norms > 0) & (self._norms(lw, kind, after) == 0)).sum())
        return zeroed

    @torch.no_grad()
    def freeze_zero_groups(self) -> FrozenGroups:
        """Freeze every all-zero group (of the configured types) at 0 for a fine-tune phase."""
        keep = {}
        for lw in self.layers:
            w = lw.whole_effective()
            k = torch.ones_like(w, dtype=torch.bool)
            for kind in self.groups:
                k &= _expand(self._norms(lw, kind, w) > 0, kind, w, lw.op, lw.conv_groups)
            keep[lw.name] = k
        return FrozenGroups(self.layers, keep)

    @torch.no_grad()
    def sparsity(self) -> dict[str, dict[str, float]]:
        """Percent zero per layer, as SSL's GetGroupSparsity counts them, plus a "total" entry:
        element (weights), row (output features / filters), column (columns of the `[out, K]` GEMM
        view: input features for Linear / matmul, (channel, kh, kw) shapes for conv) and channel
        (input features / channels). Counted on the weight each layer computes with (masked)."""
        counts: dict[str, dict[str, tuple[int, int]]] = {}
        for lw in self.layers:
            w = lw.computed()
            v = w.t() if lw.op == "matmul" else w
            gemm = v.reshape(v.shape[0], -1)
            counts[lw.name] = {
                "element": (int((w == 0).sum()), w.numel()),
                "row": (int((row_norms(w, lw.op, lw.conv_groups) == 0).sum()), v.shape[0]),
                "column": (int((gemm == 0).all(0).sum()), gemm.shape[1]),
                "channel": (int((col_norms(w, lw.op, lw.conv_groups) == 0).sum()), v.shape[1] * lw.conv_groups),
            }
        totals = {key: (sum(c[key][0] for c in counts.values()), sum(c[key][1] for c in counts.values()))
                  for key in ("element", "row", "column", "channel")}
        out = {name: {k: 100.0 * z / n for k, (z, n) in c.items()} for name, c in counts.items()}
        out["total"] = {k: 100.0 * z / n for k, (z, n) in totals.items()}
        return out

    def __repr__(self) -> str:
        return f"GroupLasso(lam={self.lam:g}, groups={list(self.groups)}, layers={[lw.name for lw in self.layers]})"
