"""SRigL: dynamic sparse training with constant fan-in (Lasby et al., ICLR 2024).

    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=(x,), train=True)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9)
    srigl = sparsec.SRigL(cm, opt, total_steps=len(loader) * epochs, sparse_init=True)  # from scratch
    for x, y in loader:
        loss_fn(cm(x), y).backward(); opt.step(); opt.zero_grad(); srigl.step()

Every `delta_t` steps before `t_end * total_steps`, each constant fan-in layer (`update_layer`):
  1. scores: |W| to keep, |dense gradient| to grow (averaged over `grad_accumulation` steps and,
     under torch.distributed, over the ranks training this model, so every one decides the same masks:
     a fully_shard model's mesh; DDP's group when given the DDP wrapper or `process_group=`, as DDP over
     a subgroup needs; else the whole world);
  2. neuron ablation (not for the last layer): a weight is salient if it is in the layer's top
     n_keep by |W| or top n_prune by |grad|; rows with fewer than max(1, int(gamma_sal * k0))
     salient weights are ablated (all weights off). The ablated set is recomputed each update, so
     a neuron can come back (the paper's code; sparsimony instead makes ablation permanent). The
     update record gives the threshold and the fewest salient weights of any active neuron;
  3. new fan-in k = floor(floor(numel * (1 - S)) / n_active): the ablated rows' budget goes to the rest;
  4. prune: keep the layer-wise top n_keep = n_active_weights * (1 - drop) by |W|, at most k per row
     (capped by magnitude, not arbitrarily as the original code did);
  5. regrow every active row back to exactly k by the largest |dense gradient| among its positions
     not kept (a weight dropped in this update may come back);
  6. weights new to the mask start at exactly 0 with fresh optimizer state (0; Adagrad's sum its
     initial_accumulator_value, Rprop's step size lr); every weight in both
     the old and the new mask keeps its value and optimizer state, including one dropped in step 4
     and regrown in step 5 (the paper's code: new_connections = ~old_mask & grow, momentum * new
     mask); dropped and ablated weights become 0 with fresh optimizer state, so masked weights stay 0.
drop = alpha / 2 * (1 + cos(pi * t / T_end)). Ties in any ranking go to the lower index.

An update leaves alone a layer whose weight is frozen (requires_grad False: it has no dense gradient
to regrow by, and the user asked it not to change), and skips every layer when a dense gradient is
not finite (GradScaler skips that optimizer step; regrowing by inf / nan scores would pick the lowest
indices). The gradient of a weight an update drops is zeroed, so an optimizer step run after
`srigl.step()` cannot move it.

The dense gradient of a step is the sum over every backward pass run in it (micro-batches, as p.grad
sums them; a closure that runs backward several times per step, LBFGS's or SAM's, adds each
evaluation's gradient too), as the loss made it: under GradScaler it carries the loss scale, which
ranks alike within a step, but with grad_accumulation > 1 a scale that changes inside the window
weighs its steps unequally.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import torch

from sparsec.distributed import (broadcast_from_rank0, check_same_masks, check_same_over_ranks, described, full,
                                 mean_over_ranks, scheduler_groups, shard_like, unwrap_ddp)
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.numbers_check import is_integer, is_real
from sparsec.patterns import FanIn
from sparsec.reference import rows_to_weight, weight_to_rows
from sparsec.runtime.training import TrainableLayer


def _top_flat(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest entries of the whole tensor; ties to the lower (flat) index."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        mask[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    return mask.reshape(scores.shape)


def _top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the counts[r] largest entries of each row r; ties to the lower index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < counts.unsqueeze(1)


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores rank in float32, or float64 for a float64 layer: demoted to float32, its weights that differ below
    float32's resolution tied, and the tie (to the lower index) dropped larger weights than it kept."""
    return torch.promote_types(t.dtype, torch.float32)


@dataclass
class LayerUpdate:
    """What one update did to one layer."""
    mask: torch.Tensor          # new mask [out, fan_in]
    kept: torch.Tensor          # weights that survived the update unchanged
    regrown: torch.Tensor       # weights (re)grown this update: those new to the mask start at 0
    ablated: torch.Tensor       # [out] rows switched off
    k: int                      # fan-in of every active row
    pruned: int                 # weights of the old mask not kept
    # Why ablation did or did not happen (None / 0 when not checked): salient weights per row, and the
    # threshold they were compared with after the min_neurons lowering (a row is ablated below it).
    salient: torch.Tensor | None = None
    threshold: int = 0


def update_layer(weight: torch.Tensor, mask: torch.Tensor, dense_grad: torch.Tensor, sparsity: float,
                 drop_fraction: float, gamma_sal: float, ablation: bool) -> LayerUpdate:
    """One SRigL update of a layer viewed as rows [out, fan_in] (see the module doc for the steps)."""
    out, fan_in = weight.shape
    # The pattern's budget on this shape, or the weights the mask keeps where that is more: a layer shrink took
    # ablated rows out of keeps the budget ablation gave the others, and the pattern's count on its smaller shape
    # cut fc3 from 1593 weights to 708 in one update whose drop fraction allowed about 457, silently.
    budget = max(math.floor(out * fan_in * (1.0 - sparsity)), int(mask.sum()))
    k0 = max(1, budget // out)
    magnitude = torch.where(mask, weight.abs(), torch.full_like(weight, -1.0))  # inactive below any active
    grad = dense_grad.abs()
    n_active_weights = int(mask.sum())
    n_prune = int(n_active_weights * drop_fraction)
    n_keep = n_active_weights - n_prune

    ablated = torch.zeros(out, dtype=torch.bool, device=weight.device)
    counts, threshold = None, 0
    if ablation:
        salient = _top_flat(magnitude, n_keep) | _top_flat(grad, n_prune)
        counts = salient.sum(1)
        threshold = int(gamma_sal) if gamma_sal >= 1 else max(1, int(gamma_sal * k0))
        # Enough neurons must stay for k <= fan_in: lower the threshold to the count of the
        # min_neurons-th best neuron when it would ablate more than that. (ceil, not methods.md's
        # floor: with floor(budget / fan_in) neurons left, budget // n_active can exceed fan_in.)
        min_neurons = max(1, -(-budget // fan_in))
        nth_best = int(torch.sort(counts, descending=True).values[min(min_neurons, out) - 1])
        threshold = min(threshold, nth_best)
        ablated = counts < threshold

    n_active = out - int(ablated.sum())
    k = min(fan_in, max(1, budget // n_active))
    active_rows = ~ablated
    kept = _top_flat(torch.where(active_rows.unsqueeze(1), magnitude, torch.full_like(magnitude, -2.0)), n_keep)
    kept &= mask & active_rows.unsqueeze(1)
    kept &= _top_per_row(torch.where(kept, weight.abs(), torch.full_like(weight, -1.0)),
                         torch.full((out,), k, device=weight.device))
    need = (k - kept.sum(1)).clamp_min(0) * active_rows
    regrown = _top_per_row(torch.where(kept, torch.full_like(grad, -1.0), grad), need) & ~kept
    return LayerUpdate(mask=kept | regrown, kept=kept, regrown=regrown, ablated=ablated, k=k,
                       pruned=int((mask & ~kept).sum()), salient=counts, threshold=threshold)


@dataclass
class UpdateRecord:
    step: int
    drop_fraction: float
    # name -> k, active_neurons, pruned, regrown; where ablation was checked also ablation_threshold
    # and fewest_salient (the fewest salient weights of a neuron that was active)
    layers: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why its masks did not change


def _fresh_state(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> dict[str, float]:
    """The per-weight optimizer state entries that a weight new to the optimizer does not start at 0:
    Adagrad's sum starts at initial_accumulator_value and Rprop's step size at lr (zeroed, a regrown weight
    took full lr-sized Adagrad steps, and an Rprop one was frozen at step_size_min)."""
    group = next((g for g in optimizer.param_groups if any(p is weight for p in g["params"])), {})
    if isinstance(optimizer, torch.optim.Adagrad):
        return {"sum": float(group.get("initial_accumulator_value", 0))}
    if isinstance(optimizer, torch.optim.Rprop):
        return {"step_size": float(group["lr"])}
    return {}


def _checked_hyperparameters(total_steps, delta_t, grad_accumulation, t_end, alpha, gamma_sal, ablation,
                             sparse_init) -> tuple[int, int, int]:
    """SRigL's arguments checked up front, each error naming the argument; the step counts as ints."""
    for name, value in (("total_steps", total_steps), ("delta_t", delta_t), ("grad_accumulation", grad_accumulation)):
        if not is_integer(value) or value < 1:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    if grad_accumulation > delta_t:
        raise InvalidInputError(f"grad_accumulation={grad_accumulation} cannot exceed delta_t={delta_t}")
    # Checked here, not at the first update: a string raised a bare comparison TypeError naming no
    # argument, and gamma_sal nan / inf passed (nan <= 0 is False) and crashed the first update
    # mid-training in int() (ValueError / OverflowError).
    for name, value in (("t_end", t_end), ("alpha", alpha), ("gamma_sal", gamma_sal)):
        if not is_real(value):
            raise InvalidTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(gamma_sal) and 0 < t_end <= 1 and 0 <= alpha <= 1 and gamma_sal > 0):
        raise InvalidInputError(f"need 0 < t_end <= 1, 0 <= alpha <= 1, gamma_sal > 0 and finite; got t_end={t_end}, "
                                f"alpha={alpha}, gamma_sal={gamma_sal}")
    if gamma_sal >= 1 and gamma_sal != int(gamma_sal):
        # >= 1 is an absolute count of salient weights (methods.md B.3.2); int() silently turned 1.5
        # into 1, while the paper's code compares counts < 1.5 (ablating count 1 too).
        raise InvalidInputError(f"gamma_sal={gamma_sal}: a value >= 1 is an absolute count of salient weights "
                                f"per neuron and must be a whole number; below 1 it is a fraction of the fan-in")
    for name, value in (("ablation", ablation), ("sparse_init", sparse_init)):
        if not isinstance(value, bool):  # ablation='no' was truthy: ablation ran
            raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return int(total_steps), int(delta_t), int(grad_accumulation)


class SRigL:
    def __init__(self, cm, optimizer: torch.optim.Optimizer, total_steps: int, delta_t: int = 100, alpha: float = 0.3,
                 t_end: float = 0.75, gamma_sal: float = 0.3, ablation: bool = True, grad_accumulation: int = 1,
                 sparse_init: bool = False, *, process_group=None):
        from sparsec.compiled import CompiledModel
        from sparsec.passes.selection import layer_positions

        given = cm
        cm, process_group = unwrap_ddp(cm, process_group, "SRigL")
        if not isinstance(cm, CompiledModel):  # a plain model has no fan-in layers sparsec owns the masks of
            raise InvalidTypeError(f"SRigL needs a sparsec.CompiledModel, got {described(given, cm)}; pass the compiled "
                                   f"model, or the DistributedDataParallel wrapping it, or compile the model first: "
                                   f"sparsec.compile(model, pattern='fanin:0.9', example_inputs=..., train=True)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidTypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        total_steps, delta_t, grad_accumulation = _checked_hyperparameters(
            total_steps, delta_t, grad_accumulation, t_end, alpha, gamma_sal, ablation, sparse_init)
        cm.check_whole_weights("SRigL")
        self.layers = {m.layer_name: m for m in cm.graph_module.modules()
                       if isinstance(m, TrainableLayer) and isinstance(m.pattern, FanIn)}
        if not self.layers:
            layers = cm.plan.layers
            why = ("; this model has none: " + "; ".join(f"{lp.name}: {lp.reason}" for lp in layers[:3])
                   + (" ..." if len(layers) > 3 else "")) if layers else ""
            raise InvalidInputError(f"SRigL needs constant fan-in layers: compile with pattern='fanin:S' and train=True{why}")
        bad = [n for n, m in self.layers.items() if m.weight_update != "fixed"]
        if bad:
            raise InvalidInputError(f"SRigL owns the masks; layers {bad} were compiled with weight_update='ste'")
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, m in self.layers.items() if m.weight.requires_grad and id(m.weight) not in params]
        if missing:
            raise InvalidInputError(f"the optimizer does not hold the weights of {missing}; build it from the "
                                    f"trainable cm.parameters() (frozen layers are left alone)")
        _, last = layer_positions(cm.graph_module)
        self.never_ablate = set(last)
        self.optimizer, self.total_steps, self.delta_t = optimizer, total_steps, delta_t
        self.alpha, self.gamma_sal, self.ablation, self.grad_accumulation = alpha, gamma_sal, ablation, grad_accumulation
        self.t_end = int(t_end * total_steps)
        if self.t_end <= delta_t:  # (updates run at multiples of delta_t below t_end: none would)
            warnings.warn(f"SRigL will never update the masks: the first update is at step delta_t={delta_t}, and "
                          f"updates stop at t_end * total_steps = {self.t_end}; lower delta_t or raise t_end / "
                          f"total_steps", stacklevel=2)
        self.steps = 0
        self.history: list[UpdateRecord] = []
        self._dense_grads: dict[str, torch.Tensor] = {}
        # Collectives over the ranks that train this model: under fully_shard the mesh's, else DDP's group
        # (other ranks may run other models: pipeline stages, a mesh or a DDP group per replica), else the whole
        # world. Every one of them must start from the same masks: each decides its own from averaged scores, and
        # under fully_shard nothing makes them agree (FSDP broadcasts no weights: ranks that compiled different
        # initial models had different masks, and trained different models silently). (Not state: the group
        # is the caller's, and a resumed run passes its own.)
        self._groups = scheduler_groups(cm, process_group, "SRigL")
        check_same_masks({name: layer.weight_mask for name, layer in self.layers.items()}, "when SRigL starts",
                         self._groups)
        # Each layer's weight version right after sparse_init redrew it (until the first step): loading a
        # resumed run's state while the weights are still those draws means the checkpoint's trained weights,
        # loaded before this scheduler was built, were overwritten (see load_state_dict).
        self._drawn: dict[str, int] = {}
        if sparse_init:
            self._sparse_init()
            self._drawn = {name: layer.weight._version for name, layer in self.layers.items()}
        # The newest scheduler owns each layer's mask and dense-gradient sink; an older one on the same layers
        # refuses to step (its updates would regrow by gradients it no longer receives, and its arming would
        # take the sink back). Refusing the new one instead would fail a notebook cell run again.
        for layer in self.layers.values():
            layer.mask_scheduler = weakref.ref(self)
        self._arm(1)

    @torch.no_grad()
    def _sparse_init(self) -> None:
        """Training from scratch: redraw kept weights as He-normal for the *sparse* fan-in k
        (variance 2 / k, as Evci et al.; the SRigL code passes 2 / fan_in as the std). A dense init
        scaled for the full fan-in shrinks activations by sqrt(k / fan_in) per layer, which at 90%+
        sparsity leaves deep nets with a vanishing signal."""
        for layer in self.layers.values():
            mask = weight_to_rows(layer.weight_mask, layer.op)
            k = mask.sum(1).clamp_min(1).unsqueeze(1).float()
            draw = broadcast_from_rank0(torch.randn(mask.shape, device=mask.device), self._groups)
            fresh = draw * (2.0 / k).sqrt() * mask
            fresh = rows_to_weight(fresh.to(layer.weight.dtype), layer.op, layer.weight.shape)
            layer.weight.copy_(shard_like(fresh, layer.weight))

    # ---- schedule

    def drop_fraction(self, step: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end))

    def is_update_step(self, step: int) -> bool:
        return step % self.delta_t == 0 and step < self.t_end

    def _require_ownership(self) -> None:
        lost = [name for name, layer in self.layers.items()
                if (owner := getattr(layer, "mask_scheduler", None)) is None or owner() is not self]
        if lost:
            raise InvalidInputError(
                f"this SRigL no longer schedules layers {lost}: a newer SRigL was built on the same model and took "
                f"over their masks and dense gradients (one scheduler per layer: with two, the older one regrew by "
                f"gradients it never received). Step the newer one; to resume this one's run, build a new SRigL "
                f"and load_state_dict(this.state_dict())")

    def _arm(self, step: int) -> None:
        """Capture dense gradients in the backward of `step` when it is among the last
        `grad_accumulation` steps before an update (callers check ownership first: once a newer scheduler
        is built, the sinks are its)."""
        next_update = -(-step // self.delta_t) * self.delta_t
        capture = next_update < self.t_end and next_update - step < self.grad_accumulation
        for name, layer in self.layers.items():
            layer.dense_grad_sink = (lambda g, name=name: self._accumulate(name, g)) if capture else None

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        g = grad.detach().to(_score_dtype(grad)) / self.grad_accumulation
        self._dense_grads[name] = self._dense_grads[name] + g if name in self._dense_grads else g

    def step(self) -> UpdateRecord | None:
        """Call after optimizer.step(); returns the update record when this step updated masks."""
        self._require_ownership()
        self.steps += 1
        self._drawn = {}
        record = self._update() if self.is_update_step(self.steps) else None
        self._arm(self.steps + 1)
        return record

    # ---- the update

    @torch.no_grad()
    def _update(self) -> UpdateRecord:
        # ranks at steps that differ by a multiple of delta_t update together (no hang) but each with its own
        # drop fraction and end: their masks would diverge without a word (one rank resumed, the other not)
        check_same_over_ranks(self.steps, "SRigL step", next(iter(self.layers.values())).weight_mask.device,
                              groups=self._groups)
        drop = self.drop_fraction(self.steps)
        record = UpdateRecord(step=self.steps, drop_fraction=drop)
        scores = {}
        for name, layer in self.layers.items():
            grad = self._dense_grads.pop(name, None)
            if not layer.weight.requires_grad:
                record.skipped[name] = "weight frozen (requires_grad=False): its mask and weights are left alone"
                continue
            rows = weight_to_rows(full(layer.weight.detach()), layer.op)
            rows = rows.to(_score_dtype(rows))
            grad = weight_to_rows(grad, layer.op) if grad is not None else torch.zeros_like(rows)
            scores[name] = mean_over_ranks(rows, self._groups), mean_over_ranks(grad, self._groups)  # all decide alike
        bad = [name for name, (_, grad) in scores.items() if not torch.isfinite(grad).all()]
        if bad:
            why = (f"dense gradient not finite in {bad} (an optimizer step GradScaler skips, or a diverging "
                   f"run): no mask changed at this update")
            record.skipped.update({name: why for name in scores})
            warnings.warn(f"sparsec SRigL step {self.steps}: {why}", stacklevel=3)
            scores = {}
        for name, (rows, grad) in scores.items():
            layer = self.layers[name]
            mask = weight_to_rows(layer.weight_mask, layer.op)  # (a view: the copy_ below overwrites it)
            result = update_layer(rows, mask, grad, layer.pattern.sparsity, drop, self.gamma_sal,
                                  self.ablation and name not in self.never_ablate)
            record.layers[name] = {"k": result.k, "active_neurons": int((~result.ablated).sum()),
                                   "pruned": result.pruned, "regrown": int(result.regrown.sum())}
            if result.salient is not None:
                # Why neurons were or were not ablated: the fewest salient weights of a neuron active
                # before this update, against the threshold it must stay at or above. Every active
                # weight outside the layer's n_prune smallest is salient, so with gamma_sal = 0.3 (and
                # k = k0) a neuron goes only when over 70% of its weights are among those (n_prune <=
                # 0.3 of the layer's) and none of its positions is in the top n_prune by gradient.
                was_active = mask.any(1)
                fewest = int(result.salient[was_active].min()) if bool(was_active.any()) else 0
                record.layers[name].update(ablation_threshold=result.threshold, fewest_salient=fewest)
            shape = layer.weight.shape
            new_mask = rows_to_weight(result.mask, layer.op, shape)
            # In the old mask and in the new one: keeps its value and optimizer state. That includes a
            # weight dropped by magnitude and regrown by gradient in this same update: the paper's code
            # zeroes only new connections (~old_mask & grow) and masks momentum with the new mask
            # (methods.md B.3.6). Zeroing it too (result.kept alone) restarted such weights at 0.
            survived = rows_to_weight(result.mask & mask, layer.op, shape)
            layer.weight_mask.copy_(new_mask)
            layer.weight.mul_(shard_like(survived, layer.weight))  # new connections start at 0, dropped and ablated become 0
            fresh = _fresh_state(self.optimizer, layer.weight)
            for key, value in self.optimizer.state.get(layer.weight, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == shape:
                    # momentum / Adam moments only for weights that survived; the others start afresh
                    keep = shard_like(survived, value)
                    value.mul_(keep)
                    if fresh.get(key, 0) != 0:
                        value.add_(fresh[key] * ~keep)
            if layer.weight.grad is not None:  # an optimizer step still to come must not move dropped weights
                layer.weight.grad.mul_(shard_like(survived, layer.weight.grad))
        self.history.append(record)
        return record

    # ---- checkpoints

    def _schedule(self) -> dict:
        return {"total_steps": self.total_steps, "delta_t": self.delta_t, "alpha": self.alpha, "t_end": self.t_end,
                "gamma_sal": self.gamma_sal, "ablation": self.ablation, "grad_accumulation": self.grad_accumulation,
                "layers": sorted(self.layers)}

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model's and the optimizer's state: the step, the
        dense gradients accumulated so far for the next update (a checkpoint can fall inside the window),
        the update history, and the schedule the state belongs to. Plain tensors, dicts and lists, so
        torch.load(weights_only=True) reads it. Under torch.distributed those gradients are this
        rank's own (the ranks average them at the update): with grad_accumulation > 1, save and load
        one state per rank, else ranks resuming from rank 0's state inside a window decide from rank
        0's gradients for the rest of it."""
        return {"steps": self.steps, "dense_grads": {k: v.clone() for k, v in self._dense_grads.items()},
                "history": [asdict(r) for r in self.history], "schedule": self._schedule()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "steps" not in state:
            raise InvalidInputError("not an SRigL state: missing 'steps' (expected what SRigL.state_dict() returns)")
        self._require_ownership()  # (it arms the sinks below)
        saved = state.get("schedule", {})  # (absent in states saved before it was recorded)
        differ = [f"{k}: saved {saved[k]!r}, this scheduler {v!r}" for k, v in self._schedule().items()
                  if k in saved and saved[k] != v]
        if differ:
            raise InvalidInputError("this SRigL state belongs to another schedule or model (" + "; ".join(differ)
                                    + "); construct SRigL with the saved settings to resume")
        redrawn = [name for name, version in self._drawn.items() if self.layers[name].weight._version == version]
        if int(state["steps"]) > 0 and redrawn:
            raise InvalidInputError(
                f"this SRigL was built with sparse_init=True, which redrew the kept weights of {redrawn} when it was "
                f"built, and they have not been loaded since: resuming at step {int(state['steps'])} would train "
                f"those draws instead of the checkpoint's weights. Load the model's state_dict again, and build "
                f"the resuming SRigL with sparse_init=False (the checkpoint's weights were initialized already)")
        self.steps = int(state["steps"])
        self._drawn = {}
        self._dense_grads = {k: v.clone() for k, v in state.get("dense_grads", {}).items()}
        self.history = [UpdateRecord(**r) for r in state.get("history", [])]
        self._arm(self.steps + 1)
