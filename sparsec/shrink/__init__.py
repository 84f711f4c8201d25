"""shrink: remove all-zero neurons / channels from a compiled model, keeping its outputs (FSSL step 4).

Group lasso (sparsec/group_lasso.py) drives whole rows / columns of weights to zero; `shrink` then
makes the model physically smaller. Removing output row c of a layer also removes channel c
everywhere that channel flows, so the analysis is a dependency graph (networkx) on the fx graph:

* A *channel element* is output channel i of a layer (Linear / matmul: last dim, Conv2d: dim 1).
  Each tensor value sparsec can follow carries one element per index of its channel dim.
* Channel-preserving ops pass the elements on: elementwise activations, Dropout, BatchNorm
  (its weight / bias / running stats are sliced along), a depthwise conv (groups = channels: its
  filter c, bias c and groups are sliced along; channel c out is the bias where filter c or
  input c is 0), 2-D pooling (modules and F.*pool2d), a mean over other dims, flatten (a conv channel becomes H*W
  consecutive Linear inputs; also `x.view(x.size(0), -1)`), scalar arithmetic.
* `a + b`, `a * b` (both followed) join element i of a with element i of b by a graph edge: they
  must be removed together (a residual add shares one channel set). `torch.cat` along the channel
  dim concatenates the element lists. A connected component of the graph is one *channel class*;
  the layers whose outputs it joins form a *channel space* (the unit the report prints).
* Any other use pins the elements it reads: the model output, reshape / view / transpose,
  LayerNorm, softmax, attention, an op with an operand sparsec does not follow (a model input
  in a residual add), a grouped conv other than depthwise, a layer called at several places or sharing its weight,
  a layer or BatchNorm whose tensors something else also reads (`W.mean()`, a tied embedding), a module with
  hooks, an in-place write (relu_) to a tensor that another name (nn.Identity, .contiguous(), a view) reads
  after it, and every op not listed above. Pinned channels are never removed; the report says why.

A class that is not pinned is removed when, for every layer that reads it (a *consumer*), each
input column it maps to is either all-zero (norm <= threshold), or the value it carries is a
known constant c that the consumer can absorb: c = 0, or c folded exactly into the consumer's
bias (bias += c * column sum): always for Linear, for Conv2d only without zero padding (a zero-
padded border would see 0 instead of c; reflect / replicate / circular padding copies c). The
constant comes from producers whose row is zero: such an output is the bias b everywhere, then
the chain maps it (relu(b <= 0) = 0, gelu(0) = 0, BatchNorm eval: (b - mean) / std * gamma + beta,
BatchNorm with batch statistics: beta, but only for b = 0, where the batch mean is exactly 0).
Producer rows of a removed class are dropped too: nothing reads them any more.

BatchNorm and Dropout modules compute differently in training and eval mode, so the constants are
worked out for both (the analysis runs once per mode) and a class goes only where its constants are
known in both: the shrunk model is exact in either mode, whichever it was shrunk in. The consumer's
bias takes the eval-mode fold; where training mode's differs (an all-zero channel leaves BatchNorm as
beta with batch statistics, beta - mean * gamma / sqrt(var + eps) with running ones) a TrainOffset
module after the consumer adds the difference while training (sparsec/runtime/train_offset.py).
`eval_only=True` works the constants out for eval mode alone (more goes: a constant BatchNorm input
other than 0 has no exact value under batch statistics) and fixes the result to eval mode.
A graph that fixes its mode (traced reading self.training) is worked out for that mode; modules
whose flags differ from the model's (a BatchNorm frozen in eval inside a training model) also for
the flags as they are, which must then agree with the model's mode.
Exactness is of the model as it is when shrunk: a removed channel's eval-mode constant uses its
BatchNorm's running statistics of that moment, which training-mode forwards of the original would
go on updating (a zero channel's running mean decays towards 0), and its beta / bias are no longer
trained; later training makes the two models differ, as it does for any change of parameters.

Sparse layers (compile(..., train=True)) keep their structure:
* N:M weights group M consecutive inputs: input columns go only in whole aligned groups of M
  (the remaining groups, and their masks, are then unchanged); output rows are free.
* SDGP prunes the data gradient N:M along output features: output rows go only in whole aligned
  groups of M, so the backward groups the same features as before.
* Constant fan-in ("fixed" masks): rows are free, a column only if the mask keeps nothing in it
  (else some row would lose one of its k weights). SR-STE fan-in re-derives k from the shape every
  step, so such a layer is pinned.
* Unstructured ("fixed" masks): rows and columns are free (the mask keeps nothing in a removed one).
  SR-STE unstructured re-derives its kept count, numel - round(S * numel), from the shape every step,
  so such a layer is pinned too.
* Every site keeps at least one channel (no zero-width layers).

`threshold` treats groups with norm <= threshold as zero: the result equals the model with exactly
the removed groups zeroed (with threshold 0 it equals the model itself, to rounding).
Packed inference models are refused: shrink first, then compile the smaller model for inference.
"""
from __future__ import annotations

import collections
import copy
import math
import time

import torch.fx as fx

from sparsec.compiled import EVAL_ONLY_NOTE, CompiledModel
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.numbers_check import is_real
from sparsec.pipeline import PassRecord
from sparsec.plan import Plan
from sparsec.shrink.analysis import Analysis
from sparsec.shrink.decision import Decision
from sparsec.shrink.layers import Layer, find_layers
from sparsec.shrink.report import ShrinkReport, SpaceReport, build_report
from sparsec.shrink.rewrite import freeze_shape_reads, rewrite

__all__ = ["shrink", "ShrinkReport", "SpaceReport"]


def _modes(gm: fx.GraphModule, eval_only: bool, training: bool) -> tuple[list[bool | None], bool]:
    """(the modes the shrunk model must be exact in, the model's own mode). The modes: those the model
    can be switched to (train / eval, or the one its graph fixes, or eval for eval_only), and the
    modules' flags as they are where they differ from one another."""
    fixed = getattr(gm, "fixed_training", None)
    if eval_only and fixed:
        raise InvalidInputError("eval_only=True, but this model's graph was traced in training mode and fixes it "
                                "(see cm.plan's notes): compile the model in eval mode, then shrink it")
    modes = [False] if eval_only else [fixed] if fixed is not None else [False, True]
    if not eval_only and len({m.training for m in gm.modules()}) > 1:
        modes.append(None)
    return modes, False if eval_only else training if fixed is None else fixed


def _shrunk_plan(plan: Plan, layers: dict[fx.Node, Layer], before: dict[str, tuple], gm: fx.GraphModule) -> Plan:
    """A copy of `plan` with each resized layer's new weight shape, FLOPs and a "shrink: ..." reason, and each
    trained layer's kept weights counted from its mask where the pattern's count is not it."""
    plan = copy.deepcopy(plan)
    after = {layer.name: (layer, tuple(layer.weight(gm).shape)) for layer in layers.values()}
    for lp in plan:
        if lp.name not in after:
            continue
        layer, new_shape = after[lp.name]
        old_shape = before[lp.name]
        resized = new_shape != old_shape
        if resized:
            rows, cols = old_shape[layer.out_dim], old_shape[layer.in_dim]
            if lp.flops is not None:  # FLOPs scale with the weight's size at fixed batch / spatial shape
                lp.flops = round(lp.flops * math.prod(new_shape) / math.prod(old_shape))
            lp.weight_shape = new_shape
            lp.reason = (f"{lp.reason}; shrink: removed {rows - new_shape[layer.out_dim]} of {rows} output rows, "
                         f"{cols - new_shape[layer.in_dim]} of {cols} input columns")
        trained = layer.trainable
        if lp.sparsity is not None and trained is not None and trained.weight_mask is not None:
            # the mask lost what the removed rows / columns held, not what the pattern keeps on the new shape
            # (unstructured:0.9 on 43 x 64 keeps 275; the mask shrunk from 64 x 64 keeps its own count); a layer
            # shrink left as it was keeps what training left (SRigL's ablation moved budget between its rows)
            kept = int(trained.mask().sum())
            if resized or kept != lp.kept:
                lp.mask_kept = kept
                lp.reason += f"; its mask keeps {kept} of {lp.numel} weights ({100 * kept / lp.numel:.3g}%)"
    return plan


def shrink(cm: CompiledModel, threshold: float = 0.0, *, ragged_fanin: bool = False,
           eval_only: bool = False) -> CompiledModel:
    """A new, smaller CompiledModel computing the same outputs: all-zero neurons / channels removed.

    ragged_fanin: also remove input columns of constant fan-in layers where their mask keeps weights
    (what those weights multiplied is 0, or a constant folded into the bias, so the result is
    exact); the rows then keep different counts. For deployment after training (`condense`), not
    for further SRigL training, which needs exactly k per row.

    The result is exact in training and in eval mode (a TrainOffset module adds what training mode's
    BatchNorm statistics change). eval_only: exact in eval mode only, which can remove more (channels
    whose constant is known only with BatchNorm's running statistics); the result is in eval mode and
    refuses train().

    `cm` is never modified, and the result has parameters of its own: build the optimizer (and any
    GroupLasso / frozen groups) for it anew. The result carries `shrink_report` (ShrinkReport: per channel space,
    producers, consumers, channels before / after, removed indices and why the rest was kept);
    its plan has the new weight shapes and a "shrink: ..." note in each changed layer's reason.
    """
    if not isinstance(cm, CompiledModel):
        raise InvalidTypeError(f"shrink takes a CompiledModel (from sparsec.compile), got {type(cm).__name__}")
    if not is_real(threshold) or not threshold >= 0 or not math.isfinite(threshold):
        raise InvalidInputError(f"threshold must be a finite number >= 0, got {threshold!r}")
    threshold = float(threshold)
    for name, flag in (("ragged_fanin", ragged_fanin), ("eval_only", eval_only)):  # ("no" turned ragged_fanin on)
        if not isinstance(flag, bool):
            raise InvalidTypeError(f"{name} must be True or False, got {flag!r}")
    cm.require_unsharded("shrink (and condense)")
    packed = cm.packed_layers()
    if packed:
        raise InvalidInputError(
            f"shrink works on dense or train=True models; layers {packed} hold packed inference weights. "
            f"Compile with pattern='dense' or train=True, shrink, then compile the smaller model for inference")
    start = time.perf_counter()
    gm = copy.deepcopy(cm.graph_module)
    freeze_shape_reads(gm)
    layers = find_layers(gm)
    before = {layer.name: tuple(layer.weight(gm).shape) for layer in layers.values()}
    modes, current = _modes(gm, eval_only, cm.training)
    analyses = {mode: Analysis(gm, layers, float(threshold), ragged_fanin, mode) for mode in modes}
    decision = Decision(analyses, current)
    analysis = decision.a
    rewrite(gm, analysis, decision)
    report = build_report(analysis, decision, float(threshold))

    plan = _shrunk_plan(cm.plan, layers, before, gm)
    history = list(cm.history) + [PassRecord("shrink", "rewrite", time.perf_counter() - start, gm.code)]
    counters = collections.Counter(cm.counters)
    counters["shrink_channels_removed"] += report.channels_before - report.channels_after
    out = CompiledModel(gm, plan, history, counters, dict(cm._dense_weights), cm.trace_method)
    out.kernels, out.kernel_manifest = dict(cm.kernels), dict(cm.kernel_manifest)
    # the model's inputs are unchanged (shrink removes channels inside it): condense() without example inputs
    # said "this model was compiled without example inputs"
    out.example_input_spec = cm.example_input_spec
    out.training = cm.training  # only the top-level flag: submodules keep their own (BN eval vs train)
    if eval_only:
        out.eval()
        gm.fixed_training = False  # the folds hold for eval mode only: train() is refused (CompiledModel.train)
        plan.notes.append(EVAL_ONLY_NOTE)
    out.shrink_report = report
    return out
