"""Gradual magnitude pruning with retraining (method (d), methods.md D.1; Zhu & Gupta 2017's schedule).

    cm = sparsec.compile(model, pattern="unstructured:0.5", example_inputs=(x,), train=True)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9)
    pruner = sparsec.GradualPruning(cm, 0.95, start_step=0, end_step=1000, every=100, optimizer=opt)
    for x, y in loader:
        loss_fn(cm(x), y).backward(); opt.step(); opt.zero_grad(); pruner.step()

Each unstructured layer (a TrainableLayer compiled with pattern "unstructured:S", weight_update
"fixed") goes from its compiled sparsity s_i to its target s_f. At optimizer step t (the count of
`pruner.step()` calls) with start_step <= t <= end_step and (t - start_step) % every == 0, and at
end_step itself (so s_f is always reached), its sparsity becomes

    s_t = s_f + (s_i - s_f) * (1 - (t - start_step) / (end_step - start_step)) ** 3

(s_i exactly at start_step), and its mask keeps the Unstructured(s_t).kept(numel) weights of largest
magnitude among those it kept so far (round(s_t * numel) pruned, halves up; ties to the lower flat
index of the [out, K] rows view, as `reference.unstructured_mask`). Masks only shrink: a pruned weight
never comes back, however its zero ties with kept ones. Newly pruned weights become exactly 0, with their
gradient and optimizer state (momentum, Adam's moments). Between updates the mask is fixed: the
training in between is the retraining. After an update the layer's pattern (and its plan entry) says
unstructured:s_t, so after end_step it is exactly unstructured:s_f, and an inference compile of the
trained model keeps the learned masks (`sparsec.compile(cm, example_inputs=...)`).

Without `optimizer=`, nothing clears the optimizer state of pruned weights: momentum or Adam moments
left there keep moving those entries of the raw weight Parameter for a while. The layer computes with
`weight * mask`, so outputs, `cm.mask`, `cm.effective_weight` and an inference compile stay exact; only
`layer.weight` itself (and its state_dict entry) then holds nonzeros under the mask.

A layer whose weight is frozen (requires_grad False) is left alone at every update (as SRigL does: the
user asked it not to change); the record says so. Under torch.distributed (DDP, or FSDP2 fully_shard)
every rank decides from the same magnitudes (weights gathered when sharded, then averaged over the
ranks training this model: see process_group), so all take the same masks; the ranks must start from
the same masks and call step() equally often, which is checked.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from sparsec.distributed import (check_same_masks, check_same_over_ranks, described, full, local_part, mean_over_ranks,
                                 scheduler_groups, shard_like, unwrap_ddp)
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.numbers_check import is_integer, is_real
from sparsec.patterns import Unstructured
from sparsec.reference import magnitude, rows_to_weight, weight_to_rows
from sparsec.runtime.training import TrainableLayer

_RAISED = "; GradualPruning raised it to "  # the suffix an update appends to a layer's plan reason


def cubic_sparsity(initial: float, final: float, step: int, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's s_t: `initial` up to start_step, `final` from end_step on, cubic in between."""
    if step <= start_step:
        return initial
    if step >= end_step:
        return final
    return final + (initial - final) * (1 - (step - start_step) / (end_step - start_step)) ** 3


def shrink_mask(rows: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` weights of largest |w| among those `mask` holds (rows view [out, K]); ties to the lower
    flat index. A weight outside `mask` ranks below every one inside it, a zero included: it never comes back."""
    if not 0 <= keep <= int(mask.sum()):
        raise InvalidInputError(f"cannot keep {keep} weights of a mask holding {int(mask.sum())}: masks only shrink")
    scores = torch.where(mask, magnitude(rows), torch.full_like(rows, -math.inf)).reshape(-1)
    chosen = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, chosen, True).reshape(mask.shape)


@dataclass
class PruningRecord:
    step: int
    # name -> sparsity (s_t), kept (weights in the mask now), pruned (weights this update removed)
    layers: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why its mask did not change


class GradualPruning:
    """Raise unstructured layers' sparsity by magnitude on a cubic schedule; call step() after each
    optimizer step (see the module doc).

    final_sparsity: a float for every unstructured layer, or a dict {layer name or regex: float}; a key
        matches a layer as include= does (full match of its name or of a module path containing it), and the
        first matching key in the dict's order sets the layer's target. Layers no key matches keep their
        compiled sparsity and are left alone. Each target lies in [the layer's compiled sparsity, 1).
    start_step, end_step, every: updates at start_step, start_step + every, ... up to end_step, and at
        end_step (counted in step() calls); 0 <= start_step < end_step, every >= 1.
    optimizer: the optimizer training the layers, whose state for pruned weights is zeroed (optional).
    process_group: the ranks training this model, over which magnitudes are averaged and step counts checked
        (default: a fully_shard model's mesh, else the whole world). Give DDP's group where DDP runs over a
        subgroup, or pass the DistributedDataParallel wrapper as `cm`, which gives both.
    """

    def __init__(self, cm, final_sparsity, *, end_step: int, start_step: int = 0, every: int = 100,
                 optimizer: torch.optim.Optimizer | None = None, process_group=None):
        from sparsec.compiled import CompiledModel

        given = cm
        cm, process_group = unwrap_ddp(cm, process_group, "GradualPruning")
        if not isinstance(cm, CompiledModel):
            raise InvalidTypeError(f"GradualPruning needs a sparsec.CompiledModel, got {described(given, cm)}; pass the "
                                   f"compiled model, or the DistributedDataParallel wrapping it, or compile the model "
                                   f"first: sparsec.compile(model, pattern='unstructured:0.5', example_inputs=..., train=True)")
        for name, value in (("start_step", start_step), ("end_step", end_step), ("every", every)):
            if not is_integer(value):
                raise InvalidTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        start_step, end_step, every = int(start_step), int(end_step), int(every)
        if not (0 <= start_step < end_step and every >= 1):
            raise InvalidInputError(f"need 0 <= start_step < end_step and every >= 1 (steps counted in step() calls); "
                                    f"got start_step={start_step}, end_step={end_step}, every={every}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidTypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        cm.check_whole_weights("GradualPruning")
        unstructured = {m.layer_name: m for m in cm.graph_module.modules()
                        if isinstance(m, TrainableLayer) and isinstance(m.pattern, Unstructured)}
        if not unstructured:
            layers = cm.plan.layers
            why = ("; this model has none: " + "; ".join(f"{lp.name}: {lp.sparsity or 'dense'} ({lp.reason})"
                                                         for lp in layers[:3])
                   + (" ..." if len(layers) > 3 else "")) if layers else ""
            raise InvalidInputError(f"GradualPruning needs unstructured layers: compile with pattern='unstructured:S' "
                                    f"and train=True{why}")
        bad = [n for n, m in unstructured.items() if m.weight_update != "fixed"]
        if bad:
            raise InvalidInputError(f"GradualPruning owns the masks; layers {bad} were compiled with weight_update='ste'")
        targets = _targets(final_sparsity, unstructured, cm.plan)
        self.layers = {name: unstructured[name] for name in targets}
        self.final = targets
        self.initial = {name: layer.pattern.sparsity for name, layer in self.layers.items()}
        low = {n: (f, self.initial[n]) for n, f in targets.items() if f < self.initial[n]}
        if low:
            raise InvalidInputError("final_sparsity below a layer's compiled sparsity (masks only shrink): "
                                    + "; ".join(f"layer {n!r}: {f} < unstructured:{s}" for n, (f, s) in low.items())
                                    + "; give each layer a target in [its compiled sparsity, 1)")
        if optimizer is not None:
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, m in self.layers.items() if m.weight.requires_grad and id(m.weight) not in params]
            if missing:
                raise InvalidInputError(f"the optimizer does not hold the weights of {missing}; build it from the "
                                        f"trainable cm.parameters() (frozen layers are left alone)")
        self.optimizer, self.start_step, self.end_step, self.every = optimizer, start_step, end_step, every
        self._plan = cm.plan
        self.steps = 0
        self.history: list[PruningRecord] = []
        # The ranks that train this model (as SRigL: the fully_shard mesh's, else DDP's group, else the world)
        # must start alike: each decides its own masks from the averaged weights, and nothing else would make
        # them agree. (The group is not state: a resumed run passes its own.)
        self._groups = scheduler_groups(cm, process_group, "GradualPruning")
        check_same_masks({name: layer.weight_mask for name, layer in self.layers.items()},
                         "when GradualPruning starts", self._groups)

    # ---- schedule

    def sparsity(self, name: str, step: int) -> float:
        """Layer `name`'s sparsity from update `step` on (its initial one before start_step)."""
        return cubic_sparsity(self.initial[name], self.final[name], step, self.start_step, self.end_step)

    def is_update_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.every == 0 or step == self.end_step)

    def step(self) -> PruningRecord | None:
        """Call after optimizer.step(); returns the update record when this step pruned."""
        self.steps += 1
        return self._update() if self.is_update_step(self.steps) else None

    # ---- the update

    @torch.no_grad()
    def _update(self) -> PruningRecord:
        # ranks at different steps would prune to different sparsities: their masks would diverge silently
        check_same_over_ranks(self.steps, "GradualPruning step", next(iter(self.layers.values())).weight_mask.device,
                              groups=self._groups)
        record = PruningRecord(step=self.steps)
        todo = {}
        for name, layer in self.layers.items():
            if not layer.weight.requires_grad:
                record.skipped[name] = "weight frozen (requires_grad=False): its mask and weights are left alone"
                continue
            pattern = Unstructured(self.sparsity(name, self.steps))
            keep, had = pattern.kept(layer.weight_mask.numel()), int(layer.weight_mask.sum())
            if keep > had:  # (checked for every layer before any changes: no half-done update)
                raise InvalidInputError(
                    f"GradualPruning step {self.steps}: layer {name!r} is to keep {keep} weights ({pattern}) but its mask "
                    f"holds {had}: the model's masks come from elsewhere than this schedule (a checkpoint's model state "
                    f"loaded without the pruner's: call pruner.load_state_dict with the state saved alongside it)")
            todo[name] = pattern, keep, had
        if todo:
            # Magnitudes of a diverged run rank nothing (NaN compares false: the lowest indices would go): skip
            # the update, as SRigL does; the next one prunes to its own step's sparsity. (Averaged over the
            # ranks, so every rank skips together; each checks its own slice of a sharded weight, gathering nothing.)
            finite = torch.stack([torch.isfinite(local_part(self.layers[name].weight.detach())).all() for name in todo])
            finite = mean_over_ranks(finite.float(), self._groups).tolist()
            bad = [name for name, fraction in zip(todo, finite) if fraction < 1]
            if bad:
                why = f"weights not finite in {bad} (a diverging run): no mask changed at this update"
                record.skipped.update({name: why for name in todo})
                warnings.warn(f"sparsec GradualPruning step {self.steps}: {why}", stacklevel=3)
                todo = {}
        for name, (pattern, keep, had) in todo.items():
            layer = self.layers[name]
            rows = weight_to_rows(full(layer.weight.detach()), layer.op)  # gathered when FSDP shards it (a collective)
            rows = mean_over_ranks(rows.to(torch.promote_types(rows.dtype, torch.float32)), self._groups)  # all decide alike
            shape = layer.weight.shape
            new_mask = rows_to_weight(shrink_mask(rows, weight_to_rows(layer.weight_mask, layer.op), keep), layer.op, shape)
            layer.weight_mask.copy_(new_mask)
            layer.weight.mul_(shard_like(new_mask, layer.weight))  # newly pruned weights become exactly 0
            if self.optimizer is not None:
                for value in self.optimizer.state.get(layer.weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == shape:
                        value.mul_(shard_like(new_mask, value))  # momentum / Adam moments of pruned weights
            if layer.weight.grad is not None:  # an optimizer step still to come must not move pruned weights
                layer.weight.grad.mul_(shard_like(new_mask, layer.weight.grad))
            self._set_pattern(name, pattern)
            record.layers[name] = {"sparsity": pattern.sparsity, "kept": keep, "pruned": had - keep}
        self.history.append(record)
        return record

    def _set_pattern(self, name: str, pattern: Unstructured) -> None:
        """The layer and its plan entry say the sparsity its mask has now (an inference compile reads the
        layer's pattern as the one it was trained to, and keeps its mask)."""
        self.layers[name].pattern = pattern
        if name in self._plan.names:
            lp = self._plan[name]
            lp.sparsity = str(pattern)
            lp.reason = lp.reason.split(_RAISED)[0] + (f"{_RAISED}{pattern} by magnitude"
                                                       if pattern.sparsity != self.initial[name] else "")

    # ---- checkpoints

    def _schedule(self) -> dict:
        return {"start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                "final": dict(sorted(self.final.items()))}

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model's (its masks) and the optimizer's state: the step, each
        layer's initial sparsity, the history and the schedule the state belongs to. Plain data, so
        torch.load(weights_only=True) reads it. Load the model's state first, then this."""
        return {"steps": self.steps, "initial": dict(self.initial), "history": [asdict(r) for r in self.history],
                "schedule": self._schedule()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "steps" not in state or "schedule" not in state:
            raise InvalidInputError("not a GradualPruning state: missing 'steps' or 'schedule' (expected what "
                                    "GradualPruning.state_dict() returns)")
        saved = state["schedule"]
        differ = [f"{k}: saved {saved.get(k)!r}, this pruner {v!r}" for k, v in self._schedule().items()
                  if saved.get(k) != v]
        initial = state.get("initial", {})
        if set(initial) != set(self.layers):
            differ.append(f"layers: saved {sorted(initial)}, this pruner {sorted(self.layers)}")
        if differ:
            raise InvalidInputError("this GradualPruning state belongs to another schedule or model (" + "; ".join(differ)
                                    + "); construct GradualPruning with the saved settings to resume")
        steps = int(state["steps"])
        history = [PruningRecord(**r) for r in state.get("history", [])]
        now = {n: float(initial[n]) for n in self.layers}  # each layer's sparsity after its latest update
        for r in history:
            now.update({n: float(info["sparsity"]) for n, info in r.layers.items() if n in now})
        wrong = []
        for name, layer in self.layers.items():
            keep = Unstructured(now[name]).kept(layer.weight_mask.numel())
            held = int(layer.weight_mask.sum())
            if held != keep:
                wrong.append(f"{name!r} holds {held}, unstructured:{now[name]} keeps {keep}")
        if wrong:
            raise InvalidInputError(f"the model's masks do not match this state at step {steps} ({'; '.join(wrong)}): "
                                    f"load the model's state saved with it first (cm.load_state_dict), then the pruner's")
        self.steps, self.initial = steps, {n: float(initial[n]) for n in self.layers}
        self.history = history
        for name in self.layers:
            self._set_pattern(name, Unstructured(now[name]))


def _targets(final_sparsity, layers: dict[str, TrainableLayer], plan) -> dict[str, float]:
    """layer name -> its final sparsity, from a float or a {name or regex: float} dict (see GradualPruning)."""
    from sparsec.passes.selection import first_match

    def checked(value, where: str) -> float:
        if isinstance(value, torch.optim.Optimizer):  # (SRigL takes its optimizer second)
            raise InvalidTypeError(f"final_sparsity must be a float in (0, 1) or a dict, got the optimizer "
                                   f"{type(value).__name__}: pass it as optimizer=")
        if not is_real(value):
            raise InvalidTypeError(f"final_sparsity{where} must be a float in (0, 1), got {type(value).__name__} {value!r}")
        if not 0 < value < 1:  # (nan fails this too)
            raise InvalidInputError(f"final_sparsity{where} must lie in (0, 1) (the fraction of weights pruned), got {value!r}")
        return float(value)

    if not isinstance(final_sparsity, dict):
        value = checked(final_sparsity, "")
        return {name: value for name in layers}
    if not final_sparsity:
        raise InvalidInputError(f"final_sparsity is an empty dict: give {{layer name or regex: sparsity}} for some of "
                                f"the unstructured layers {sorted(layers)}")
    for key in final_sparsity:
        if not isinstance(key, str):
            raise InvalidTypeError(f"final_sparsity's keys are layer names or regexes (str), got {key!r}")
    values = {key: checked(value, f"[{key!r}]") for key, value in final_sparsity.items()}
    targets, used = {}, set()
    for name in layers:
        key = first_match(tuple(final_sparsity), name)
        if key is not None:
            targets[name] = values[key]
            used.add(key)
    for key in final_sparsity:
        if key in used:
            continue
        matched = [n for n in layers if first_match((key,), n) is not None]
        if matched:
            raise InvalidInputError(f"final_sparsity[{key!r}] sets no layer: every layer it matches ({matched}) is "
                                    f"taken by an earlier key (the first matching key sets a layer's target)")
        others = [lp for lp in plan if first_match((key,), lp.name) is not None]
        why = ("; it names " + ", ".join(f"{lp.name!r} ({lp.sparsity or 'dense'}: {lp.reason})" for lp in others[:3])
               if others else "")
        raise InvalidInputError(f"final_sparsity[{key!r}] matches no unstructured layer; those are {sorted(layers)}{why}")
    return targets
