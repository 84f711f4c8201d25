"""CompileOptions: what the user asked for, checked up front so that an error names the argument, not a
pass (sparsec.compile, sparsec.explain and the CLI build one)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.levels import is_levels
from sparsec.numbers_check import is_integer, is_real
from sparsec.patterns import NM, Dense, Pattern, parse_grad_pattern, parse_pattern
from sparsec.plan import GRAD_MODES, Plan


DEFAULT_PATTERN = "2:4"  # what compile / explain prune with when given neither pattern= nor plan=
# Layers with fewer weights than this stay dense by default: below it the savings are noise and
# the per-call overhead of a compressed layer dominates. Override per layer with include=.
DEFAULT_MIN_WEIGHTS = 1024
DEFAULT_STE_DECAY = 2e-4  # SR-STE's lambda_W

# quantize="auto" takes int8 only where the relative weight error ||Wq - W|| / ||W|| of the (pruned)
# weight stays under this. Per-channel int8 of well-behaved weights lands at 0.4-1%; rows with
# outliers blow past 2%.
DEFAULT_QUANT_BUDGET = 0.02

QUANTIZE_CHOICES = (None, "int8", "auto")  # and the levels of sparsec/levels.py, "log2:B" / "codebook:B"
WEIGHT_UPDATES = ("fixed", "ste")
BACKEND_OPTIONS = ("auto", "triton", "torch")
TIMINGS = ("eager", "graph")  # backend "auto" on CUDA: eager calls (host time included) or CUDA graph replays


@dataclass(frozen=True)
class CompileOptions:
    pattern: Pattern
    quantize: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    plan: Plan | None = None
    min_weights: int = DEFAULT_MIN_WEIGHTS
    quant_budget: float = DEFAULT_QUANT_BUDGET
    leaf_modules: tuple[Any, ...] = ()       # module types or names symbolic_trace must not enter
    backend: str = "auto"                    # "auto" | "triton" | "torch" (passes/backend.py)
    rewrite: bool = True                     # False: analysis only (explain)
    emit_only: bool = False                  # generate kernels without a device to run them (kernel dumps)
    train: bool = False                      # rewrite to trainable layers (masks, SDGP) instead of packed ones
    grad_pattern: NM | None = None           # SDGP: N:M pattern for data gradients (train only)
    grad_mode: str = "magnitude"             # "magnitude" | "rescale"
    weight_update: str = "fixed"             # "fixed" masks | "ste" (SR-STE re-pruning every step)
    ste_decay: float = DEFAULT_STE_DECAY     # SR-STE's decay on pruned weights
    timing: str = "eager"                    # how backend "auto" times candidates on CUDA: "eager" | "graph"

    @classmethod
    def from_user(cls, pattern: object, quantize: object = None, include: object = None, exclude: object = None,
                  plan: object = None, min_weights: object = DEFAULT_MIN_WEIGHTS,
                  quant_budget: object = DEFAULT_QUANT_BUDGET, leaf_modules: object = None,
                  backend: object = "auto", rewrite: bool = True, emit_only: bool = False, train: object = False,
                  grad_pattern: object = None, grad_mode: object = None, weight_update: object = None,
                  ste_decay: object = None, timing: object = "eager") -> CompileOptions:
        """Validate user arguments up front, so errors name the argument, not a pass."""
        grad, grad_mode, weight_update, ste_decay = _training_options(train, pattern, plan, grad_pattern, grad_mode,
                                                                      weight_update, ste_decay)
        _check_runtime_options(train, quantize, backend, timing)
        if plan is not None:
            _check_plan_agrees(plan, pattern, include, exclude, quantize, grad_pattern, backend, train)
        if not is_integer(min_weights) or min_weights < 0:
            raise InvalidInputError(f"min_weights must be a non-negative int, got {min_weights!r}")
        if not is_real(quant_budget) or not quant_budget > 0:
            raise InvalidInputError(f"quant_budget must be a positive number, got {quant_budget!r}")
        _check_options_apply(quantize, plan, quant_budget)
        if leaf_modules is not None and not isinstance(leaf_modules, (list, tuple)):  # (a str was split into letters)
            spelled = leaf_modules.__name__ if isinstance(leaf_modules, type) else repr(leaf_modules)
            hint = f": wrap it in a list, [{spelled}]" if isinstance(leaf_modules, (str, type)) else ""
            raise InvalidTypeError(f"leaf_modules takes a list of module classes or module names, got "
                                   f"{leaf_modules!r}{hint}")
        if pattern is None:
            pattern = plan.pattern if plan is not None else DEFAULT_PATTERN
        return cls(pattern=parse_pattern(pattern),
                   quantize=quantize, include=_names("include", include), exclude=_names("exclude", exclude),
                   plan=plan, min_weights=int(min_weights), quant_budget=float(quant_budget),
                   leaf_modules=tuple(leaf_modules or ()), backend=backend, rewrite=rewrite, emit_only=emit_only,
                   train=train, grad_pattern=grad, grad_mode=grad_mode, weight_update=weight_update,
                   ste_decay=float(ste_decay), timing=timing)

    @property
    def grad_default(self) -> str | None:
        """A training compile's default gradient pattern: grad_pattern=, or the one a given plan was made with
        (what the plan records, and what its grad_sparsity entries are compared with)."""
        if not self.train:
            return None
        if self.plan is not None:
            return self.plan.grad_pattern
        return str(self.grad_pattern) if self.grad_pattern is not None else None


def _training_options(train: object, pattern: object, plan: object, grad_pattern: object, grad_mode: object,
                      weight_update: object, ste_decay: object) -> tuple[NM | None, str, str, float]:
    """The gradient pattern and mode, weight update rule and SR-STE decay of a compile, its training options
    checked against each other; weight_update / ste_decay None: the given plan's, else fixed masks."""
    if not isinstance(train, bool):
        raise InvalidTypeError(f"train must be True or False, got {train!r}")
    grad = parse_grad_pattern(grad_pattern, "grad_pattern") if grad_pattern is not None else None
    if grad is not None and not train:
        raise InvalidInputError("grad_pattern prunes gradients in backward, which needs train=True")
    if grad_mode is not None and grad_mode not in GRAD_MODES:
        raise InvalidInputError(f"grad_mode={grad_mode!r} is not supported; accepted: {GRAD_MODES}")
    if isinstance(plan, Plan):  # (before reading its entries below: a bad entry is named, not an AttributeError)
        plan.validate()
    plan_prunes_grads = isinstance(plan, Plan) and any(lp.grad_sparsity is not None for lp in plan)
    plan_mode = plan.grad_mode if isinstance(plan, Plan) and train else None
    if None not in (grad_mode, plan_mode) and grad_mode != plan_mode:
        raise InvalidInputError(f"grad_mode={grad_mode!r} differs from the given plan's {plan_mode!r}: the plan "
                                f"says how its grad_sparsity entries prune (set plan.grad_mode); pass one or the other")
    if grad_mode not in (None, "magnitude", plan_mode) and grad is None and not plan_prunes_grads:
        raise InvalidInputError(f"grad_mode={grad_mode!r} says how grad_pattern prunes data gradients, and no "
                                f"gradient is pruned: pass grad_pattern (e.g. '2:4') with train=True, or drop grad_mode")
    # None: the mode the plan was made with (the one its reasons name), else magnitude
    grad_mode = grad_mode or plan_mode or "magnitude"
    weight_update, ste_decay = _plans_weight_update(plan if train else None, weight_update, ste_decay)
    if weight_update not in WEIGHT_UPDATES:
        raise InvalidInputError(f"weight_update={weight_update!r} is not supported; accepted: {WEIGHT_UPDATES}")
    if weight_update != "fixed" and not train:
        raise InvalidInputError(f"weight_update={weight_update!r} says how training updates masks, which needs "
                                f"train=True")
    if weight_update == "ste" and pattern is not None and isinstance(parse_pattern(pattern), Dense):
        raise InvalidInputError("weight_update='ste' re-derives each layer's mask from its weight, and "
                                "pattern='dense' prunes nothing: pass a pattern (e.g. '2:4')")
    if not is_real(ste_decay) or not (math.isfinite(ste_decay) and ste_decay >= 0):
        raise InvalidInputError(f"ste_decay must be a finite non-negative number, got {ste_decay!r}")
    if ste_decay != DEFAULT_STE_DECAY and weight_update != "ste":
        raise InvalidInputError(f"ste_decay={ste_decay!r} is SR-STE's decay on pruned weights, used with "
                                f"weight_update='ste' only (this compile has weight_update={weight_update!r})")
    return grad, grad_mode, weight_update, float(ste_decay)


def _plans_weight_update(plan: object, weight_update: object, ste_decay: object) -> tuple[object, object]:
    """weight_update / ste_decay where not given: a training plan's (made with SR-STE), else fixed masks. A given
    one that contradicts the plan is refused, as grad_mode is: resuming from cm.state_dict() and cm.plan ran
    fixed masks where the run had trained with SR-STE, silently."""
    said = (plan.weight_update, plan.ste_decay) if isinstance(plan, Plan) and plan.weight_update else (None, None)
    for name, given, planned in (("weight_update", weight_update, said[0]), ("ste_decay", ste_decay, said[1])):
        if None not in (given, planned) and given != planned:
            raise InvalidInputError(f"{name}={given!r} differs from the given plan's {planned!r} (the plan was made for "
                                    f"that training): pass one or the other")
    return (weight_update if weight_update is not None else said[0] or "fixed",
            ste_decay if ste_decay is not None else said[1] if said[1] is not None else DEFAULT_STE_DECAY)


def _check_runtime_options(train: bool, quantize: object, backend: object, timing: object) -> None:
    """quantize=, backend= and timing= are known values that agree with each other and with train=."""
    if train and quantize is not None:
        raise InvalidInputError("quantize is for inference: train with train=True, then compile the trained model "
                                "again with quantize=")
    if train and backend == "triton":
        raise InvalidInputError("train=True runs the torch training runtime (Triton prunes gradients on CUDA by "
                                "itself); use backend='auto' or 'torch'")
    if backend not in BACKEND_OPTIONS:
        raise InvalidInputError(f"backend={backend!r} is not supported; accepted: {BACKEND_OPTIONS}")
    if backend == "triton":
        from sparsec.codegen.configs import TRITON_MISSING, triton_installed

        if not triton_installed():  # (each layer fell back to torch, a kernel dump wrote no kernel)
            raise InvalidInputError(f"backend='triton' generates Triton kernels, but {TRITON_MISSING}; "
                                    f"backend='auto' or 'torch' need no Triton")
    if timing not in TIMINGS:
        raise InvalidInputError(f"timing={timing!r} is not supported; accepted: {TIMINGS}")
    if timing != "eager" and backend != "auto":
        raise InvalidInputError(f"timing={timing!r} says how backend='auto' measures; backend={backend!r} measures "
                                f"nothing (drop timing, or use backend='auto')")
    if quantize not in QUANTIZE_CHOICES and not (isinstance(quantize, str) and is_levels(quantize)):
        raise InvalidInputError(f"quantize={quantize!r} is not supported; accepted: None, 'int8', 'auto' (int8 "
                                f"where it stays within quant_budget), or method (d)'s non-linear levels "
                                f"'log2:B' / 'codebook:B' with 2 <= B <= 8 (e.g. 'codebook:4')")


def _check_options_apply(quantize: object, plan: object, quant_budget: object) -> None:
    """Options that would change nothing are refused, as a given plan with quantize= is: they were ignored.
    (Not min_weights with a plan: explain(**opts), edit, compile(plan=plan, **opts) is the plan workflow, and
    min_weights did its work in explain. Nor quantize= with pattern='dense': a train=True model compiled again
    keeps its learned masks under 'dense', as condense does, and quantize applies to those layers.)"""
    if plan is not None and quant_budget != DEFAULT_QUANT_BUDGET:
        raise InvalidInputError(f"pass either plan= or quant_budget={quant_budget!r}, not both: the plan's quant column "
                                f"already says which layers are quantized")
    if quant_budget != DEFAULT_QUANT_BUDGET and quantize != "auto":
        raise InvalidInputError(f"quant_budget={quant_budget!r} applies to quantize='auto' only (int8 where the "
                                f"weight error stays within it); got quantize={quantize!r}")


def _check_plan_agrees(plan: object, pattern: object, include: object, exclude: object, quantize: object,
                       grad_pattern: object, backend: object, train: bool) -> None:
    """A given plan already says what every layer gets: the arguments that would say it too must agree."""
    if not isinstance(plan, Plan):
        raise InvalidTypeError(f"plan must be a sparsec.Plan (e.g. Plan.from_json(text)), got {type(plan).__name__}")
    plan.validate()
    if include or exclude:
        raise InvalidInputError("pass either plan= or include=/exclude=, not both: a plan already says "
                                "what every layer gets (edit its entries instead)")
    if quantize is not None:
        raise InvalidInputError(f"pass either plan= or quantize={quantize!r}, not both: the plan's quant column "
                                f"already says which layers are quantized (set entries' quant to 'int8')")
    if grad_pattern is not None:
        raise InvalidInputError(f"pass either plan= or grad_pattern={grad_pattern!r}, not both: the plan's "
                                f"grad_sparsity column already says which layers prune data gradients (set "
                                f"entries' grad_sparsity, or make the plan with explain(..., train=True, "
                                f"grad_pattern={grad_pattern!r}))")
    if pattern is not None and parse_pattern(pattern) != parse_pattern(plan.pattern):
        raise InvalidInputError(f"pattern={pattern!r} differs from the given plan's {plan.pattern!r}: the plan "
                                f"already says what every layer gets (edit entries' sparsity); pass one or the other")
    set_apart = [lp.name for lp in plan if lp.backend is not None and lp.backend != backend]
    if backend != "auto" and set_apart:
        raise InvalidInputError(f"backend={backend!r} differs from the backend the given plan sets for "
                                f"{', '.join(set_apart[:4])}{' ...' if len(set_apart) > 4 else ''}: the plan "
                                f"already says each layer's backend (chosen when it was made); set those "
                                f"entries' backend to {backend!r}, or to None to let backend= decide, or make "
                                f"the plan with explain(..., backend={backend!r})")
    # (as quantize= with train=True above: trainable layers are never quantized, and the plan's quant
    # column was kept while the layer trained unquantized, so cm.plan said int8 where nothing was)
    quantized = [lp.name for lp in plan if lp.quant is not None]
    if quantized and train:
        raise InvalidInputError(f"the plan quantizes {quantized} (quant), which is for inference: train with "
                                f"train=True on a plan whose quant entries are None, then compile the trained "
                                f"model again with quantize= or a plan that sets them")
    pruned_grads = [lp.name for lp in plan if lp.grad_sparsity is not None]
    if pruned_grads and not train:
        raise InvalidInputError(f"the plan prunes data gradients (grad_sparsity) of {pruned_grads}, which "
                                f"happens in backward and needs train=True; pass train=True, or set their "
                                f"grad_sparsity to None to compile for inference")


def name_list(value: object, what: str, accepted: str) -> list[str]:
    """A str or an iterable of str as a list; anything else is an InvalidTypeError naming what is accepted
    (list(None) / list(5) would only say "object is not iterable"). For include= / exclude= and
    GroupLasso's groups / layers."""
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)
    except TypeError:
        names = None
    if names is None or not all(isinstance(v, str) for v in names):
        raise InvalidTypeError(f"{what} must be a str or a list of str ({accepted}), got {value!r}")
    return names


def _names(arg: str, value: object) -> tuple[str, ...]:
    return () if value is None else tuple(name_list(value, f"{arg}=", "module names or regular expressions"))
