"""Which channel classes shrink removes, and the bias folds that keep the result exact in every mode."""
from __future__ import annotations

import collections
import math

import networkx as nx
import torch

from sparsec.group_lasso import col_norms
from sparsec.patterns import NM, FanIn
from sparsec.shrink.analysis import Analysis, Site, Value


MODE_NAMES = {True: "training mode", False: "eval mode", None: "the modules' current train / eval flags"}


class Decision:
    """Which channel classes go, and the bias folds that make removing them exact in every mode analysed.

    `analyses` maps a mode to its analysis (the same graph, elements and sites; only constants differ);
    `current` is the model's own mode, which the modules' flags as they are (mode None) must agree with."""

    def __init__(self, analyses: dict[bool | None, Analysis], current: bool):
        self.analyses, self.current = analyses, current
        self.a = a = next(iter(analyses.values()))
        assert all(len(other.sites) == len(a.sites) for other in analyses.values()), "modes differ only in constants"
        comps = sorted(nx.connected_components(a.graph), key=min)
        self.cls = {e: k for k, comp in enumerate(comps) for e in comp}
        self.classes = comps
        self.reasons: dict[int, str] = {}
        # consumer layer -> (class, input column, {mode: constant c}): bias += c * column, if the class goes
        self.folds: dict[str, list[tuple[int, int, dict]]] = collections.defaultdict(list)
        for e, why in a.pins.items():
            self.reasons.setdefault(self.cls[e], why)
        for i, site in enumerate(a.sites):
            if site.kind == "consumer":
                self.check_consumer(site, {mode: other.sites[i].value.consts for mode, other in analyses.items()})
        self.enforce_structure()

    def keep(self, k: int, why: str) -> bool:
        if k in self.reasons:
            return False
        self.reasons[k] = why
        return True

    def check_consumer(self, site: Site, consts: dict[bool | None, tuple]) -> None:
        layer = site.layer
        col_zero = (col_norms(layer.effective(self.a.gm), layer.op) <= self.a.threshold).tolist()
        columns: dict[int, list[int]] = collections.defaultdict(list)
        for j, e in enumerate(site.value.elems):
            columns[self.cls[e]].append(j)
        for k, cols in columns.items():
            if k in self.reasons:
                continue
            why, folds = self.consumer_blocks(site, cols, col_zero, consts)
            if why is None:
                self.folds[layer.name] += [(k, j, c) for j, c in folds]
            else:
                self.keep(k, why)

    def consumer_blocks(self, site: Site, cols: list[int], col_zero: list[bool], consts: dict[bool | None, tuple]):
        """(why class cannot leave this consumer, None if it can; the (column, {mode: constant}) bias folds
        it needs)."""
        layer, t = site.layer, site.layer.trainable
        if t is not None and isinstance(t.pattern, FanIn) and not self.a.ragged_fanin and \
                t.weight_mask.index_select(layer.in_dim, torch.tensor(cols)).any():
            return (f"{layer.name} has constant fan-in sparsity and keeps weights in this input column "
                    f"(removing it would leave some rows with fewer than k weights)"), []
        folds = []
        for j in cols:
            cs = {mode: values[j] for mode, values in consts.items()}
            if col_zero[j] or all(c == 0 for c in cs.values()):
                continue
            unknown = [mode for mode, c in cs.items() if c is None]
            if unknown:
                where = "" if len(unknown) == len(cs) else " in " + " or ".join(MODE_NAMES[m] for m in unknown)
                return f"{layer.name} reads it (nonzero input column) and its value is not a known constant{where}", []
            if None in cs and cs[None] != cs[self.current]:
                return (f"its constant under {MODE_NAMES[None]} ({cs[None]:.4g}) is not the one of "
                        f"{MODE_NAMES[self.current]} ({cs[self.current]:.4g}), which a fold must also hold (cm.train() "
                        f"or cm.eval() before shrinking sets one mode throughout)"), []
            value = (f"{next(iter(cs.values())):.4g}" if len(set(cs.values())) == 1 else
                     "(" + ", ".join(f"{c:.4g} in {MODE_NAMES[m]}" for m, c in cs.items()) + ")")
            if layer.bias_path is None:
                return f"its constant value {value} cannot be folded into {layer.name}: no bias", []
            if layer.zero_padded(self.a.gm):
                return (f"its constant value {value} cannot be folded into {layer.name}: zero padding changes it "
                        f"at the borders"), []
            folds.append((j, cs))
        return None, folds

    def enforce_structure(self) -> None:
        """Aligned N:M groups (weights along inputs, SDGP along outputs) and at least one channel per site.
        Each rule only keeps more classes, so repeating until nothing changes terminates."""
        changed = True
        while changed:
            changed = False
            for site in self.a.sites:
                t = site.layer.trainable if site.layer is not None else None
                if t is not None and site.kind == "consumer" and isinstance(t.pattern, NM) and t.pattern.n < t.pattern.m:
                    kernel = math.prod(t.weight.shape[2:]) if t.conv is not None else 1
                    changed |= self.aligned(site, t.pattern.m, kernel,
                                            f"{site.name} is {t.pattern}-sparse along its inputs: removing this "
                                            f"channel alone would break its aligned groups of {t.pattern.m}")
                if t is not None and site.kind in ("producer", "depthwise") and t.grad_pattern is not None \
                        and t.grad_pattern.n < t.grad_pattern.m:
                    changed |= self.aligned(site, t.grad_pattern.m, 1,
                                            f"{site.name} prunes its data gradient {t.grad_pattern} along its outputs "
                                            f"(SDGP): removing this channel alone would break its aligned groups of "
                                            f"{t.grad_pattern.m}")
                elems = site.value.elems
                if all(self.cls[e] not in self.reasons for e in elems):
                    changed |= self.keep(self.cls[elems[0]], f"kept so that {site.name} keeps at least one channel")

    def aligned(self, site: Site, m: int, kernel: int, why: str) -> bool:
        """Keep every class with an index in a group of m (along the weight's K) that is only partly removed."""
        removed = torch.tensor([self.cls[e] not in self.reasons for e in site.value.elems])
        groups = removed.repeat_interleave(kernel).reshape(-1, m)
        partial = (groups.any(1) & ~groups.all(1)).repeat_interleave(m).reshape(-1, kernel).any(1)
        changed = False
        for j in partial.nonzero().flatten().tolist():
            changed |= self.keep(self.cls[site.value.elems[j]], why)
        return changed

    def removed(self, k: int) -> bool:
        return k not in self.reasons

    def kept_indices(self, value: Value) -> list[int]:
        return [i for i, e in enumerate(value.elems) if not self.removed(self.cls[e])]

