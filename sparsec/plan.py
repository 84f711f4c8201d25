"""Plan / LayerPlan: what sparsec decided for every candidate layer, and why.

A Plan is plain data: it prints as a table, round-trips through JSON, and can be edited and handed
back to `sparsec.compile(..., plan=...)`, which applies it exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from sparsec.errors import CorruptFileError, InvalidInputError, InvalidTypeError
from sparsec.levels import is_levels, parse_levels
from sparsec.numbers_check import is_real
from sparsec.patterns import NM, FanIn, Unstructured, parse_grad_pattern, parse_pattern

PLAN_FORMAT = "sparsec.plan"
# 2 adds "grad_pattern", 3 "weight_update" / "ste_decay". A plan is written as the lowest version holding what
# it has (a sparsec reading older versions only reads it; given a newer one, it says the plan is from a newer
# sparsec, not that it is damaged).
PLAN_VERSION = 3
QUANT_CHOICES = (None, "int8")  # and method (d)'s levels, "log2:B" / "codebook:B" (sparsec/levels.py)
QUANT_FORMS = 'None, "int8", "log2:B" or "codebook:B" (2 <= B <= 8)'
GRAD_MODES = ("magnitude", "rescale")  # how SDGP picks the data-gradient values it keeps
BACKEND_CHOICES = (None, "torch", "triton", "cusparselt", "dense", "condensed", "bitmask", "csr")
_PLAN_KEYS = {"format", "version", "pattern", "grad_pattern", "grad_mode", "weight_update", "ste_decay", "notes",
              "layers"}  # what Plan.to_json writes

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32: how plans and messages spell dtypes."""
    return str(dtype).removeprefix("torch.")


def valid_quant(quant: object) -> bool:
    """Whether a plan entry's quant is one sparsec stores (QUANT_FORMS), as the plan writes it (a str: a Levels
    object passed here, then failed inside a pass with "expected str instance, Levels found")."""
    return quant is None or isinstance(quant, str) and (quant in QUANT_CHOICES or is_levels(quant))


@dataclass
class LayerPlan:
    name: str                          # module path, as in model.named_modules()
    op: str                            # "linear" | "matmul" | "conv1d" | "conv2d"
    weight_shape: tuple[int, ...]
    sparsity: str | None               # pattern applied ("2:4", "fanin:0.9", "unstructured:0.95"), None = dense
    quant: str | None                  # None | "int8" | "log2:B" | "codebook:B"
    grad_sparsity: str | None          # pattern applied to the data gradient in backward
    reason: str                        # why chosen, or why not
    dtype: str | None = None           # weight dtype ("float32", ...), for byte counts
    flops: int | None = None           # dense FLOPs of the layer at the example inputs
    backend: str | None = None         # what runs a sparse layer: torch | triton | cusparselt | dense | condensed | bitmask | csr
    launch: dict | None = None         # backend triton, 2:4: the launch config timed fastest at M rows (tiles,
                                       # SPLIT_K, warps, stages, "M"); None = sparsec's shape table.
                                       # condensed / bitmask: {"max_rows": the most rows the kernel runs}.
                                       # With backend None, sparsec chooses both again
    # Bytes the compiled layer holds for its weight, counted from its module: the stored form plus a
    # kernel's layout (the condensed kernel's sorted float32 copy, int16 indices and segment layout; the
    # bitmask kernel's bit words). Written by compile; None in explain's plan (the totals then count
    # stored_bytes). A measurement of the compiled model, not a decision: a given plan's value is not
    # read, and plans compare equal without it (explain's plan is the one compile applies).
    runtime_bytes: int | None = field(default=None, compare=False)
    # Weights the layer's mask keeps, counted from the mask, where compile kept a mask it did not compute
    # from the pattern just now: a train=True model compiled again (its learned masks: shrunk, gradually
    # pruned), a packed layer compiled again, a train=True model after shrink. `kept` (and so the byte and
    # FLOP counts) reads it: a fixed-mask layer shrunk from 64 x 64 to 43 x 64 keeps the 285 weights its
    # mask holds, where "unstructured:0.9" on 43 x 64 says 275. None: the pattern's count. A measurement,
    # like runtime_bytes: not read when a plan is applied, plans compare equal without it, and setting
    # `sparsity` to another pattern (an edit, GradualPruning raising it) drops it (a new mask then).
    mask_kept: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.weight_shape = tuple(int(d) for d in self.weight_shape)

    def __setattr__(self, name, value) -> None:
        if name == "sparsity" and self.__dict__.get("mask_kept") is not None and value != self.__dict__.get("sparsity"):
            object.__setattr__(self, "mask_kept", None)  # counted under the old pattern: not this one's mask
        object.__setattr__(self, name, value)

    # ---- derived numbers (never stored, so an edited plan cannot disagree with itself)

    @property
    def out_features(self) -> int:
        return self.weight_shape[1] if self.op == "matmul" else self.weight_shape[0]

    @property
    def reduction(self) -> int:
        return self.weight_shape[0] if self.op == "matmul" else math.prod(self.weight_shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def kept(self) -> int:
        """Weights the layer computes with after pruning: its mask's count where the plan has it (mask_kept),
        else the pattern's."""
        if self.sparsity and self.mask_kept is not None:
            return self.mask_kept
        pattern = parse_pattern(self.sparsity) if self.sparsity else None
        if isinstance(pattern, NM):
            return self.numel * pattern.n // pattern.m
        if isinstance(pattern, FanIn):
            return self.out_features * min(self.reduction, pattern.k(self.numel, self.out_features))
        if isinstance(pattern, Unstructured):
            return pattern.kept(self.numel)
        return self.numel

    def dense_bytes(self) -> int:
        return self.numel * _ITEMSIZE.get(self.dtype or "float32", 4)

    def stored_bytes(self) -> int:
        """Bytes of the stored weight: values + metadata/indices + int8 scales; with backend "dense", the
        pruned weight kept dense plus its mask as bits (and, with levels, the table its values come from; with
        int8, the scales)."""
        if self.backend == "dense":
            record = (parse_levels(self.quant).table_size * 4 if is_levels(self.quant)
                      else self.out_features * 4 if self.quant == "int8" else 0)
            return self.dense_bytes() + self.out_features * math.ceil(self.reduction / 8) + record
        value_bytes = 1 if self.quant is not None else _ITEMSIZE.get(self.dtype or "float32", 4)  # int8 / uint8 codes
        pattern = parse_pattern(self.sparsity) if self.sparsity else None
        total = self.kept * value_bytes
        if isinstance(pattern, NM):
            if (pattern.n, pattern.m) == (2, 4):  # int16 nibble words, 4 groups each
                total += self.out_features * math.ceil(self.reduction / 16) * 2
            else:  # int16 in-group position per kept value
                total += self.kept * 2
        elif isinstance(pattern, FanIn):
            total += self.kept * 4  # int32 column indices
        elif isinstance(pattern, Unstructured):
            total += self.kept * 4 + (self.out_features + 1) * 8  # int32 column indices, int64 row pointers
        if self.quant == "int8":
            total += self.out_features * 4  # fp32 per-output-channel scales
        elif self.quant is not None:
            total += parse_levels(self.quant).table_size * 4  # the layer's fp32 level table
        return total


@dataclass
class Plan:
    layers: list[LayerPlan]
    pattern: str = "2:4"
    notes: list[str] = field(default_factory=list)
    # how entries' grad_sparsity prunes data gradients ("magnitude" | "rescale"; None: not said, compile's
    # grad_mode= decides): compile(plan=...) runs the mode explain made the plan with (before, a plan made
    # with grad_mode="rescale" ran magnitude)
    grad_mode: str | None = None
    # the grad_pattern the plan was made with (None: none given): the default its grad_sparsity entries were
    # chosen by, so that compile(plan=...) says where an entry departs from it, as for the weights' pattern
    grad_pattern: str | None = None
    # how training updates the masks, where the plan was made with SR-STE ("ste", with its decay; None: fixed
    # masks): a training compile from the plan (resuming from cm.state_dict() and cm.plan) runs the same rule,
    # where it ran fixed masks, silently
    weight_update: str | None = None
    ste_decay: float | None = None

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, key: object) -> bool:
        # plan["fc2"] looks layers up by name, so `"fc2" in plan` must too: without this, `in` fell back
        # to iterating and compared the name with each LayerPlan, always False
        if isinstance(key, str):
            return self.get(key) is not None
        return key in self.layers

    def __getitem__(self, key: int | str) -> LayerPlan:
        if isinstance(key, str):
            layer = self.get(key)
            if layer is None:
                raise KeyError(f"no layer named {key!r} in the plan; layers: {self.names}")
            return layer
        return self.layers[key]

    def get(self, name: str, default: LayerPlan | None = None) -> LayerPlan | None:
        """The entry named `name` (the first, should a hand-edited plan list it twice), else `default`.
        From an index by name, checked on every hit against the list as it is now (entries may be edited,
        renamed or replaced in place), rebuilt when it misses: a scan per lookup made a loop over the
        layers quadratic (cm.mask / effective_weight of each of 1,600 layers: 4 s)."""
        for rebuild in (False, True):
            index = self.__dict__.get("_by_name")
            if rebuild or index is None or index[0] is not self.layers:
                index = self.__dict__["_by_name"] = (self.layers, {})
                for position, layer in enumerate(self.layers):
                    index[1].setdefault(layer.name, position)
            position = index[1].get(name)
            if position is not None and position < len(self.layers) and self.layers[position].name == name:
                return self.layers[position]
        return default

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def record_held_bytes(self, held: dict[str, int]) -> None:
        """Each sparse layer's runtime_bytes from `held` (layer name -> bytes its runtime layer holds)."""
        for lp in self.layers:
            if lp.sparsity is not None and lp.name in held:
                lp.runtime_bytes = held[lp.name]

    @property
    def sparse_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.sparsity]

    def totals(self) -> dict[str, float]:
        # (a layer with no weights computes nothing: a hand-written plan may still give it FLOPs)
        flops = [(lp.flops, lp.kept / lp.numel) for lp in self.layers if lp.flops is not None and lp.numel]
        dense_flops = sum(f for f, _ in flops)
        sparse_flops = sum(f * density for f, density in flops)
        return {
            "layers": len(self.layers),
            "sparse_layers": len(self.sparse_layers),
            "weights": sum(lp.numel for lp in self.layers),
            "weights_kept": sum(lp.kept for lp in self.layers),
            "bytes_before": sum(lp.dense_bytes() for lp in self.layers),
            "bytes_after": sum(lp.stored_bytes() if lp.runtime_bytes is None else lp.runtime_bytes for lp in self.layers),
            "flops_dense": dense_flops,
            "flops_saved": dense_flops - sparse_flops,
        }

    # ---- printing

    def __str__(self) -> str:
        show_grad = any(lp.grad_sparsity for lp in self.layers)
        header = ["layer", "op", "weight shape", "sparsity", "quant"] + (["grad"] if show_grad else []) + ["reason"]
        rows = [
            [lp.name, lp.op, "x".join(map(str, lp.weight_shape)), lp.sparsity or "-", lp.quant or "-"]
            + ([lp.grad_sparsity or "-"] if show_grad else []) + [lp.reason]
            for lp in self.layers
        ]
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header) - 1)]

        def line(cells: list[str]) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + str(cells[-1])

        existing = sorted({lp.sparsity for lp in self.layers if lp.sparsity and lp.mask_kept is not None})
        # (condense and a recompile keep masks learned in training or packed by an earlier compile whatever
        # `pattern` says, which then only decides the other layers: "pattern dense" alone read as a dense model)
        kept = f"; layers keep their existing masks: {', '.join(existing)}" if existing else ""
        out = [f"sparsec plan (pattern {self.pattern}{kept})", line(header), line(["-" * w for w in widths] + ["-" * 6])]
        out += [line(r) for r in rows]
        out.append(self.summary())
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"Plan(pattern={self.pattern!r}, layers={len(self.layers)}, sparse={len(self.sparse_layers)})"

    def summary(self) -> str:
        t = self.totals()
        if not self.layers:
            return "totals: no candidate layer (Linear / Conv2d / F.linear / matmul with a parameter) in this model"
        text = (f"totals: {t['sparse_layers']} of {t['layers']} layers sparse; "
                f"weights kept {t['weights_kept']:,} of {t['weights']:,} ({100 * t['weights_kept'] / max(t['weights'], 1):.1f}%); "
                f"weight bytes {_fmt_bytes(t['bytes_before'])} -> {_fmt_bytes(t['bytes_after'])} "
                f"({100 * t['bytes_after'] / max(t['bytes_before'], 1):.1f}% of dense)")
        held_dense = [lp.name for lp in self.sparse_layers if lp.backend == "dense"]
        if held_dense and t["bytes_after"] >= t["bytes_before"]:
            # a user who compiled for memory reads "2:4" and gets a larger model: say why, and what stores less
            many = len(held_dense) > 1
            text += (f" because {len(held_dense)} sparse layer{'s' if many else ''} "
                     f"({', '.join(held_dense[:3])}{', ...' if len(held_dense) > 3 else ''}) "
                     f"{'hold their' if many else 'holds its'} pruned weight dense (plan backend 'dense', which backend "
                     f"auto picks where dense measured faster; backend='torch', or a sparse backend in "
                     f"{'their plan entries' if many else 'its plan entry'}, stores {'them' if many else 'it'} compressed)")
        if t["flops_dense"]:
            text += (f"; est. FLOPs saved {_fmt_count(t['flops_saved'])} of {_fmt_count(t['flops_dense'])} "
                     f"({100 * t['flops_saved'] / t['flops_dense']:.1f}%) at the example inputs")
        if not t["sparse_layers"]:
            text += "; no layer was made sparse (see reasons)"
        return text

    # ---- JSON

    def to_json(self, indent: int | None = 2) -> str:
        newer = {"grad_pattern": self.grad_pattern} if self.grad_pattern is not None else {}
        updates = ({"weight_update": self.weight_update, "ste_decay": self.ste_decay}
                   if self.weight_update is not None else {})
        version = 3 if updates else 2 if newer else 1
        return json.dumps({"format": PLAN_FORMAT, "version": version, "pattern": self.pattern, **newer, **updates,
                           "grad_mode": self.grad_mode, "notes": list(self.notes),
                           "layers": [dataclasses.asdict(lp) for lp in self.layers]}, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        from sparsec.codegen.configs import upgrade_launch

        if not isinstance(text, (str, bytes, bytearray)):  # (json.loads raised a bare TypeError)
            raise InvalidTypeError(f"Plan.from_json takes the JSON text (str or bytes, as Plan.to_json() writes it), "
                                   f"got {type(text).__name__}; for a file: Plan.from_json(Path(f).read_text())")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"plan is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise CorruptFileError(f"not a sparsec plan: expected an object with \"format\": \"{PLAN_FORMAT}\"")
        version = data.get("version")
        if isinstance(version, bool) or version not in range(1, PLAN_VERSION + 1):  # (True == 1: a bool read as 1)
            # (a plan from a newer sparsec said only what was wrong, not what to do about it)
            newer = isinstance(version, (int, float)) and version > PLAN_VERSION
            raise CorruptFileError(f"unsupported plan version {version!r}; this sparsec reads versions 1 to {PLAN_VERSION}"
                                   + (" (the plan was written by a newer sparsec: upgrade sparsec here, or make the "
                                      "plan again with this one: sparsec.explain(...) or `sparsec inspect ... --json`)"
                                      if newer else ""))
        # Unknown keys are refused here as in layers: a misspelt "grad_mod" was ignored, and the plan ran
        # compile's default gradient mode instead of the "rescale" it was edited to say
        if unknown := sorted(set(data) - _PLAN_KEYS):
            close = {k: difflib.get_close_matches(k, _PLAN_KEYS, n=1) for k in unknown}
            raise CorruptFileError(f"plan has unknown keys {unknown}"
                                   + "".join(f" ({k!r}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
                                   + f"; a plan holds {sorted(_PLAN_KEYS)}")
        fields = {f.name for f in dataclasses.fields(LayerPlan)}
        required = {f.name for f in dataclasses.fields(LayerPlan) if f.default is dataclasses.MISSING}
        # ("layers" is required: a plan without it applied as "every layer dense, not listed in the given
        # plan"; a string was read entry by entry, its characters reported as layers missing fields)
        if not isinstance(data.get("layers"), list):
            raise CorruptFileError(f"plan \"layers\" must be a list of layer objects, got {data.get('layers')!r}")
        layers = []
        for i, entry in enumerate(data["layers"]):
            if not isinstance(entry, dict):
                raise CorruptFileError(f"plan layer #{i} must be an object of a layer's fields, got {entry!r}")
            if not required <= entry.keys():
                raise CorruptFileError(f"plan layer #{i} is missing fields {sorted(required - set(entry))}")
            unknown = set(entry) - fields
            if unknown:
                raise CorruptFileError(f"plan layer #{i} ({entry.get('name')!r}) has unknown fields {sorted(unknown)}")
            if problem := _field_types_problem(entry):
                raise CorruptFileError(f"plan layer #{i} ({entry.get('name')!r}): {problem}")
            if "launch" in entry:
                entry = dict(entry, launch=upgrade_launch(entry["launch"]))
            layers.append(LayerPlan(**entry))
        pattern, notes = data.get("pattern", "2:4"), data.get("notes", [])
        if not isinstance(pattern, str) or not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise CorruptFileError(f"plan \"pattern\" must be a string and \"notes\" a list of strings, got "
                                   f"{pattern!r} and {notes!r}")
        plan = cls(layers=layers, pattern=pattern, notes=notes, grad_mode=data.get("grad_mode"),
                   grad_pattern=data.get("grad_pattern"), weight_update=data.get("weight_update"),
                   ste_decay=data.get("ste_decay"))
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check every entry names a valid pattern / quantization; raise naming the bad layer."""
        # (the plan's own pattern too: a bad one was refused later by compile as if passed as pattern=)
        try:
            parse_pattern(self.pattern)
        except ValueError as e:
            raise InvalidInputError(f"plan pattern: {e}") from e
        if self.grad_mode is not None and self.grad_mode not in GRAD_MODES:
            raise InvalidInputError(f"plan grad_mode {self.grad_mode!r} not in {GRAD_MODES} (or None)")
        if self.grad_pattern is not None:
            parse_grad_pattern(self.grad_pattern, "plan grad_pattern")
        if self.weight_update not in (None, "ste"):
            raise InvalidInputError(f"plan weight_update {self.weight_update!r} is not 'ste' (or None: fixed masks)")
        if (self.ste_decay is None) != (self.weight_update is None) or self.ste_decay is not None and not (
                is_real(self.ste_decay) and math.isfinite(self.ste_decay) and self.ste_decay >= 0):
            raise InvalidInputError(f"plan ste_decay {self.ste_decay!r}: a finite number >= 0 where weight_update is "
                                    f"'ste', else None")
        seen = set()
        for lp in self.layers:
            if not isinstance(lp, LayerPlan):  # (a dict here failed later with an AttributeError)
                raise InvalidTypeError(f"plan layers must be sparsec.LayerPlan entries (Plan.from_json builds them "
                                       f"from JSON objects), got {type(lp).__name__}: {lp!r}")
            if lp.name in seen:
                raise InvalidInputError(f"plan lists layer {lp.name!r} twice")
            seen.add(lp.name)
            for what, value in (("sparsity", lp.sparsity), ("grad_sparsity", lp.grad_sparsity)):
                if value is not None:
                    try:
                        parse_pattern(value)
                    except ValueError as e:
                        raise InvalidInputError(f"plan layer {lp.name!r}: bad {what}: {e}") from e
                    if value == "dense":
                        raise InvalidInputError(f"plan layer {lp.name!r}: {what} 'dense' is spelled None in a plan")
            if lp.mask_kept is not None and not (type(lp.mask_kept) is int and 0 <= lp.mask_kept <= lp.numel):
                raise InvalidInputError(f"plan layer {lp.name!r}: mask_kept {lp.mask_kept!r} is not a count of its "
                                        f"{lp.numel} weights (0 to {lp.numel}, or None)")
            dtype = getattr(torch, str(lp.dtype), None)
            if lp.dtype is not None and not isinstance(dtype, torch.dtype):
                raise InvalidInputError(f"plan layer {lp.name!r}: dtype {lp.dtype!r} is not a torch dtype (a layer's "
                                        f"weight dtype, spelled 'float32', 'bfloat16', 'float16', ...)")
            # (compile leaves an integer or empty weight dense and says so: its plan must read back, a file load)
            kept_dense = lp.sparsity is None and lp.quant is None and lp.grad_sparsity is None
            if lp.dtype is not None and not dtype.is_floating_point and not kept_dense:
                raise InvalidInputError(f"plan layer {lp.name!r}: its weight dtype {lp.dtype!r} is not floating-point, so "
                                        f"it is left dense (sparsity, quant and grad_sparsity None): patterns and "
                                        f"quantization need a floating-point weight")
            if 0 in lp.weight_shape and not kept_dense:
                raise InvalidInputError(f"plan layer {lp.name!r}: its weight of shape {list(lp.weight_shape)} has no "
                                        f"elements, so it is left dense (sparsity, quant and grad_sparsity None)")
            if not valid_quant(lp.quant):
                raise InvalidInputError(f"plan layer {lp.name!r}: quant {lp.quant!r} is not one of {QUANT_FORMS}")
            if lp.backend not in BACKEND_CHOICES:
                raise InvalidInputError(f"plan layer {lp.name!r}: backend {lp.backend!r} not in {BACKEND_CHOICES}")
            # (with backend None sparsec chooses again, and a launch left from the old choice is replaced)
            if lp.launch is not None and lp.backend is not None and (problem := _launch_problem(lp)):
                raise InvalidInputError(f"plan layer {lp.name!r}: {problem}")


def _field_types_problem(entry: dict) -> str | None:
    """What is wrong with the JSON types of a plan layer's fields (None: nothing). Values are checked
    by Plan.validate; this catches what would otherwise pass as something else (a float dim cut to an
    int, a string taken as a list of characters) or fail later without naming the layer."""
    def is_int(v) -> bool:
        return type(v) is int

    shape = entry["weight_shape"]
    # (a name may be "": the model itself when it is an nn.Linear / Conv, as model.named_modules() names it)
    checks = [("name", isinstance(entry["name"], str), "a string (the layer's module path)"),
              ("op", isinstance(entry["op"], str), "a string"),
              ("weight_shape", isinstance(shape, list) and len(shape) > 0 and all(is_int(d) and d >= 0 for d in shape),
               "a list of non-negative ints, e.g. [128, 64]"),
              ("reason", isinstance(entry["reason"], str), "a string")]
    for key in ("sparsity", "quant", "grad_sparsity", "dtype", "backend"):
        checks.append((key, entry.get(key) is None or isinstance(entry.get(key), str), "a string or null"))
    for key in ("flops", "runtime_bytes", "mask_kept"):  # (counts: a negative one turned the totals negative)
        checks.append((key, entry.get(key) is None or (is_int(entry.get(key)) and entry.get(key) >= 0),
                       "a non-negative int or null"))
    checks.append(("launch", entry.get("launch") is None or isinstance(entry.get("launch"), dict), "an object or null"))
    bad = [(key, wanted) for key, ok, wanted in checks if not ok]
    return "; ".join(f"{key} must be {wanted}, got {entry.get(key)!r}" for key, wanted in bad) or None


def _launch_problem(lp: LayerPlan) -> str | None:
    """Why a layer's recorded launch entry cannot be applied (None: it can)."""
    from sparsec.codegen.configs import form_problem, validate_launch

    if lp.backend in ("condensed", "bitmask", "csr"):
        rows = lp.launch.get("max_rows") if isinstance(lp.launch, dict) else None
        if not isinstance(lp.launch, dict) or set(lp.launch) != {"max_rows"} or not (
                rows is None or (type(rows) is int and rows >= 1)):
            return f"backend {lp.backend!r} takes launch {{'max_rows': N}} (N >= 1, or null: any rows), got {lp.launch}"
        return None
    if lp.backend != "triton" or lp.sparsity != "2:4":
        return (f"a launch config applies to 2:4 layers on backend 'triton' (and 'max_rows' to the CPU kernels "
                f"'condensed', 'bitmask' and 'csr') only (this one is {lp.sparsity} on {lp.backend}); set it to null")
    if problem := validate_launch(lp.launch):
        return f"bad launch config {lp.launch}: {problem}"
    if lp.op in ("conv1d", "conv2d") and (lp.launch["SPLIT_K"] != 1 or lp.launch["GATHER"]):
        return (f"layer op {lp.op!r} runs the conv kernel, which neither splits K nor has a GATHER form (one row); "
                f"set SPLIT_K to 1 and GATHER to 0, got {lp.launch['SPLIT_K']} and {lp.launch['GATHER']}")
    weight_dtype = "int8" if lp.quant == "int8" else lp.dtype
    return form_problem(lp.launch, weight_dtype, lp.dtype, "this layer")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"
