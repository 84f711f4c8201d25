"""The ordered list of passes and the runner: timing, lint, history, errors, debug output.

This is the one place that says in which order passes run. Analysis passes must leave the graph
structure untouched (the runner checks); rewrite passes are followed by a graph lint.
SPARSEC_DEBUG=1 prints the plan, 2 adds a per-pass summary, 3 the graph after every pass,
4 also the generated kernel sources.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from sparsec.context import CompileContext
from sparsec.errors import PassError, SparsecError
from sparsec.passes.backend import choose_backend
from sparsec.passes.candidates import find_candidates
from sparsec.passes.eligibility import check_eligibility
from sparsec.passes.emit_kernels import emit_kernels
from sparsec.passes.fusion import fuse_epilogues
from sparsec.passes.grad_selection import choose_grad_sparsity
from sparsec.passes.plan_builder import build_plan
from sparsec.passes.quantization import choose_quantization
from sparsec.passes.selection import choose_sparsity
from sparsec.passes.shape_prop import propagate_shapes
from sparsec.passes.sparsify import sparsify_layers
from sparsec.passes.trainable import make_trainable
from sparsec.runtime.layers import held_weight_bytes

Pass = Callable[[fx.GraphModule, CompileContext], fx.GraphModule]

ANALYSIS_PASSES: list[Pass] = [
    propagate_shapes,      # output shapes / dtypes at the example inputs
    find_candidates,       # which nodes are Linear / Conv2d / matmul layers on a parameter
    check_eligibility,     # dtype, NaN/Inf, shared weights
    choose_sparsity,       # pattern per layer: policy, include/exclude, or the given plan
    choose_grad_sparsity,  # train=True: SDGP gradient pattern per layer
    choose_quantization,   # int8 or not, with the measured error
    choose_backend,        # torch / triton / cuSPARSELt / dense per sparse layer (measured on CUDA)
    build_plan,            # collect decisions into ctx.plan
]

REWRITE_PASSES: list[Pass] = [
    sparsify_layers,       # chosen layers -> packed runtime modules
    fuse_epilogues,        # bias / activation / scale / cast after a Triton layer -> its epilogue
    emit_kernels,          # one Triton kernel per distinct fused chain, through the kernel cache
]

TRAINING_REWRITE_PASSES: list[Pass] = [
    make_trainable,        # train=True: masked / STE weights and SDGP backward, as TrainableLayer modules
]


@dataclass(frozen=True)
class PassRecord:
    """One step of a compile: the pass, how long it took, and the graph it left behind."""
    name: str
    kind: str            # "analysis" | "rewrite"
    seconds: float
    code: str

    def __str__(self) -> str:
        return f"# after {self.name} ({self.kind} pass, {1000 * self.seconds:.1f} ms)\n{self.code.strip()}\n"


def debug_level() -> int:
    value = os.environ.get("SPARSEC_DEBUG", "0")
    try:
        return int(value)
    except ValueError:
        warnings.warn(f"SPARSEC_DEBUG={value!r} is not a level (0-4: plan, per-pass times, graphs, kernel sources); "
                      f"debug output stays off", stacklevel=3)
        return 0


def _structure(gm: fx.GraphModule) -> str:
    return str(gm.graph)


def run_pipeline(gm: fx.GraphModule, ctx: CompileContext) -> tuple[fx.GraphModule, list[PassRecord]]:
    opts = ctx.options
    if opts.train:
        rewrites = TRAINING_REWRITE_PASSES if opts.rewrite else []
    else:
        # also for pattern "dense": trained layers compiled again keep their learned masks
        rewrites = REWRITE_PASSES if opts.rewrite else []
    passes = [(p, "analysis") for p in ANALYSIS_PASSES] + [(p, "rewrite") for p in rewrites]
    history: list[PassRecord] = []
    debug = debug_level()
    for fn, kind in passes:
        name = fn.__name__
        before = _structure(gm) if kind == "analysis" else None
        start = time.perf_counter()
        try:
            gm = fn(gm, ctx)
            if kind == "analysis" and _structure(gm) != before:
                raise PassError(f"analysis pass '{name}' changed the graph; analysis passes must only write node.meta")
            if kind == "rewrite":
                gm.graph.lint()
            gm.recompile()  # also refreshes the per-layer annotations in gm.code
        except SparsecError:
            raise
        except Exception as e:  # noqa: BLE001 - name the pass, keep the cause
            done = ", ".join(r.name for r in history) or "none"
            raise PassError(f"sparsec pass '{name}' failed ({type(e).__name__}: {e}); passes completed before it: {done}") from e
        seconds = time.perf_counter() - start
        history.append(PassRecord(name=name, kind=kind, seconds=seconds, code=gm.code))
        if debug >= 2:
            print(f"[sparsec] {kind:8s} {name:22s} {1000 * seconds:8.1f} ms", file=sys.stderr)
        if debug >= 3:
            print(history[-1], file=sys.stderr)
    if debug >= 1 and ctx.plan is not None:
        # (as compile returns it: CompiledModel records what the runtime layers hold, which it prints here first)
        ctx.plan.record_held_bytes(held_weight_bytes(gm))
        print(ctx.plan, file=sys.stderr)
    if debug >= 4:
        for name, source in sorted(ctx.kernels.items()):
            print(f"# ---- kernel {name}\n{source}", file=sys.stderr)
    return gm, history
