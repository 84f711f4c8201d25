"""CompileContext: what the passes share (the options, the private model copy, the plan, masks, kernels).

Every pass parameter lives here rather than in pass signatures: a pass is `(gm, ctx) -> gm`.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from sparsec.options import CompileOptions
from sparsec.patterns import Pattern, parse_pattern
from sparsec.plan import Plan
from sparsec.reference import pattern_mask, weight_to_rows
from sparsec.runtime.packed import DensePacked, PackedWeight


@dataclass
class CompileContext:
    options: CompileOptions
    model: nn.Module                          # sparsec's private copy of the user's model
    example_inputs: tuple | None
    trace_method: str = ""                    # "symbolic_trace" | "torch.export"
    plan: Plan | None = None                  # built by the analysis passes
    notes: list[str] = field(default_factory=list)
    counters: collections.Counter = field(default_factory=collections.Counter)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)   # layer name -> [out, K] mask, computed once
    # (layer name, "log2:B" / "codebook:B") -> the level table the analysis fitted to its kept weights (to
    # state its cost), which packing reuses: fitting a codebook is most of its time
    level_tables: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)          # generated kernel name -> source
    kernel_manifest: dict[str, dict] = field(default_factory=dict) # kernel name -> layers, shapes, config
    measurements: dict[tuple, tuple] = field(default_factory=dict) # backend auto: shape key -> (backend, note, layer)
    unreached: dict[str, UnreachedLayer] = field(default_factory=dict)  # weights no candidate runs
    last_layers: dict[str, str] = field(default_factory=dict)  # layer -> why it is a last one (choose_sparsity)

    def mask_for(self, name: str, rows: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        """The layer's mask, computed once and shared by the analysis that measures it and the
        rewrite that applies it."""
        if name not in self.masks:
            self.masks[name] = pattern_mask(rows, pattern)
        return self.masks[name]

    def layer_mask(self, gm, layer, sparsity: str) -> torch.Tensor:
        """[out, K] mask of `layer` under `sparsity`: a trained layer's learned mask when the pattern
        is the one it was trained with (state, never recomputed), else by magnitude (`mask_for`)."""
        if layer.trained_module_path is not None and sparsity == layer.trained_pattern:
            # asked of the layer, not read from its buffer: SR-STE's stored mask is a step old after an
            # optimizer step, its mask is the one the weight now implies
            return weight_to_rows(gm.get_submodule(layer.trained_module_path).mask(), layer.op)
        rows = weight_to_rows(gm.get_parameter(layer.weight_path).detach(), layer.op)
        return self.mask_for(layer.name, rows, parse_pattern(sparsity))

    def packed_weight(self, gm, layer, decision, dense: bool = False) -> PackedWeight:
        """`layer`'s weight pruned as `decision` says, in its pattern's format, or with `dense` as backend
        "dense" keeps it (DensePacked). Levels reuse the table the analysis fitted (level_tables)."""
        rows = weight_to_rows(gm.get_parameter(layer.weight_path).detach(), layer.op)
        mask = self.layer_mask(gm, layer, decision.sparsity)
        fitted = self.level_tables.get((layer.name, decision.quant))
        form = DensePacked if dense else PackedWeight
        return form.pack(rows, mask, parse_pattern(decision.sparsity), decision.quant, fitted)


@dataclass(frozen=True)
class UnreachedLayer:
    """A weight matrix of the model that the traced graph does not run as a candidate layer."""
    op: str
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    weight_path: str    # its parameter's path in the model (for a packed layer: the packed module's)
    why: str
    # A layer an earlier compile packed (a compiled model compiled again): it runs as it was packed.
    sparsity: str | None = None
    quant: str | None = None
    backend: str | None = None  # what runs it (the packed module's runtime: "bitmask", "torch", ...)
