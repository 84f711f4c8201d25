"""Differential fuzzing of the fusion pass (passes/fusion.py) and backend="triton", against the oracle
(tests/oracle.py) and an independent prediction of what the pass may fuse.

Random small models (MLPs on [B, d] / [B, T, d] inputs; CNNs on [B, C, H, W]) whose layers (nn.Linear,
F.linear, `x @ W`, a linear called twice, nn.Conv2d) are followed by chains of the steps the fusion
pass reads, in every spelling, and steps that must stop it:
* + a vector (bias), * a vector (per-channel scale): a parameter or buffer of the layer's size, a
  0-dim / 1-element one, a float16 buffer on a float32 layer; and vectors it must leave in the graph:
  a trainable 1-element parameter, one that promotes the dtype, one read again elsewhere, a [1, n] one;
* relu / gelu (approximate none and tanh) / silu as modules (inplace=True too), functions
  (F.*(inplace=True) too), torch.relu and tensor methods (relu_ too), applied once or twice, and an
  in-place activation used as a statement (the value it modified read after it: two users);
* casts: .half() / .float() / .bfloat16() / .to(dtype) / .to(dtype=...), a no-op cast to the layer's
  own dtype, and casts the kernel cannot produce (.double(), .to(torch.float64));
* views that keep the features (looked through) and views that split them (end the chain), as a
  step or after the chain;
* an intermediate value with a second user (a residual reading the pre-activation, or any value of
  the chain), which must stop the chain there;
* sometimes a Python branch on a shape, so that torch.export captures the model (aten ops).
Each model is compiled with backend="triton", pattern 2:4, without and with quantize="int8", every
layer included (kernels under TRITON_INTERPRET=1 without a GPU: tiny shapes).

Each case checks:
* outputs against the oracle's pruned (and fake-quantized) model, at the example batch and another,
  within the error the reference itself makes against float64 (floors per the lowest precision the
  model computes in: a float16 / bfloat16 cast in the chain rounds there);
* for every layer, the ops the pass says it fused (the layer node's meta, the kernel manifest's
  fused_ops, the module's bias / activation / out_scale / out_dtype, the kernel source's epilogue)
  are exactly the predicted ones: an op whose input has another user is never fused away;
* the compiled graph no longer calls the fused ops and still calls every other one (op counts by
  kind: the captured graph's minus the fused), and the fused_* counters say as much.

A failure prints a one-line reproducer: `check_case(spec, options)`. CI runs a few derandomized
examples; SPARSEC_FUZZ_FUSION_EXAMPLES=N (or SPARSEC_FUZZ_EXAMPLES=N) runs N random ones (a local sweep).
"""
from __future__ import annotations

import collections
import copy
import operator
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsec
from oracle import pruned_model
from sparsec.frontend import capture
from sparsec.meta import get_meta
from sparsec.runtime.triton_linear import FusedEpilogue

aten = torch.ops.aten
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
KERNEL_DTYPES = ("float16", "bfloat16", "float32")
# the dtypes a fused cast may write here: without a GPU the kernels run in Triton's CPU interpreter, whose
# float32 -> bfloat16 conversion truncates, so a bfloat16 cast stays in the graph there
FUSED_CASTS = KERNEL_DTYPES if torch.cuda.is_available() else ("float16", "float32")
# error floor (relative to the output's scale) per the lowest precision the model rounds to
BASE_TOL = {"float64": 2e-5, "float32": 2e-5, "float16": 6e-3, "bfloat16": 4e-2}
ACTS = ["relu", "gelu", "gelu_tanh", "silu"]
# spellings of each activation (module: nn.ReLU() etc.; F: F.relu(h); torch: torch.relu(h); method: h.relu())
ACT_SPELLINGS = {
    "relu": ["module", "module_inplace", "F", "F_inplace", "torch", "method", "method_inplace"],
    "gelu": ["module", "F", "F_default"],
    "gelu_tanh": ["module", "F"],
    "silu": ["module", "module_inplace", "F", "F_inplace"],
}
INPLACE_SPELLINGS = {"module_inplace", "F_inplace", "method_inplace"}
# vector operands of + / *: whether the kernel may take a copy of it (for a layer of dtype float32 / float16)
VECTORS = ["param", "buffer", "scalar", "one", "half", "norm_unused", "one_param", "wide", "shared", "row", "norm_used"]
CASTS = {"half": "float16", "float": "float32", "bfloat16": "bfloat16", "to": "float16", "to_kw": "bfloat16",
         "to_f32": "float32", "double": "float64", "to_f64": "float64"}
WIDTHS = [8, 12, 16, 24]


# ---------------------------------------------------------------- models


def vector_fusable(kind: str, dtype: str = "float32") -> bool:
    """Whether a vector of this kind may become the layer's own copy (the pass's rule, stated per kind), on a
    layer of `dtype`."""
    # param / buffer: n elements in the layer's dtype; scalar: a 0-dim float32 buffer (no promotion: 0-dim), but
    # only on a float32 layer (torch multiplies by it unrounded on CPU and rounded on CUDA: no copy agrees);
    # one: a [1] buffer in the layer's dtype (broadcast to n); half: a float16 [n] buffer (a float32 layer
    # promotes it, a float16 one is its dtype). Not: one_param (a trainable scalar would become n values),
    # wide (promotes the result to a wider dtype), shared (read again after the chain), row ([1, n]: not a vector)
    # norm_unused: a LayerNorm's bias / weight, the LayerNorm never called; norm_used: called after the chain
    return kind in ("param", "buffer", "one", "half", "norm_unused") or (kind == "scalar" and dtype == "float32")


def make_vector(kind: str, n: int, dtype: torch.dtype, g: torch.Generator, scale: bool):
    """(tensor, is a parameter) of a vector operand."""
    def values(*shape):
        v = torch.randn(*shape, generator=g)
        return (v.abs() * 0.5 + 0.75) if scale else v * 0.3
    if kind in ("param", "shared"):
        return values(n).to(dtype), True
    if kind == "buffer":
        return values(n).to(dtype), False
    if kind == "scalar":
        return values(1).reshape(()), False       # 0-dim float32
    if kind == "one":
        return values(1).to(dtype), False
    if kind == "half":
        return values(n).half(), False
    if kind == "one_param":
        return values(1).to(dtype), True
    if kind == "wide":
        return values(n).to(torch.float32 if dtype == torch.float16 else torch.float64), False
    if kind == "row":
        return values(1, n).to(dtype), False
    raise AssertionError(kind)


class Block(nn.Module):
    """A layer and the chain after it. `block` is a dict: layer kind, out features (channels), bias, steps
    (tuples, see draw_steps), and `state` the input's (d, rank, t / dtype) when built."""

    def __init__(self, block: dict, state: dict, index: int):
        super().__init__()
        # (one tuple, not dict attributes: sparsec's frontend fingerprints a dict attribute by the ids of its
        # items() tuples, made anew on every call, and warned that forward changes it)
        self.spec = (block, dict(state))
        d, n, kind = state["d"], block["n"], block["layer"]
        dtype = DTYPES[state["dtype"]]
        g = torch.Generator().manual_seed(1000 + index)
        if kind == "linear":
            self.lin = nn.Linear(d, n, bias=block["bias"])
        elif kind == "twice":
            assert n == d, block
            self.lin = nn.Linear(d, n, bias=block["bias"])
        elif kind == "flinear":
            self.w = nn.Parameter(torch.randn(n, d, generator=g) / d ** 0.5)
            self.b = nn.Parameter(torch.randn(n, generator=g) * 0.1) if block["bias"] else None
        elif kind == "matmul":
            self.w = nn.Parameter(torch.randn(d, n, generator=g) / d ** 0.5)
        elif kind == "conv":
            self.lin = nn.Conv2d(d, n, 3, padding=1, bias=block["bias"])
        self.to(dtype)
        self.acts = nn.ModuleList()
        for i, step in enumerate(block["steps"]):
            if step[0] in ("bias", "scale") and step[2].startswith("norm"):
                norm = nn.LayerNorm(n).to(dtype)
                with torch.no_grad():
                    norm.weight.copy_(make_vector("param", n, dtype, g, True)[0])
                    norm.bias.copy_(make_vector("param", n, dtype, g, False)[0])
                self.add_module(f"norm{i}", norm)
            elif step[0] in ("bias", "scale"):
                value, param = make_vector(step[2], n, dtype, g, step[0] == "scale")
                if kind == "conv" and value.numel() == n:  # [C, 1, 1]: per channel of [B, C, H, W]
                    value = value.reshape(n, 1, 1)
                if param:
                    self.register_parameter(f"v{i}", nn.Parameter(value))
                else:
                    self.register_buffer(f"v{i}", value)
            if step[0] in ("act", "act_stmt"):
                self.acts.append(_act_module(step[1], step[2]))
        self.dtypes = tuple(chain_dtypes(block, state))  # (as built: the float64 truth model reads these too)

    @property
    def block(self) -> dict:
        return self.spec[0]

    @property
    def state(self) -> dict:
        return self.spec[1]

    def forward(self, x):
        block, kind = self.block, self.block["layer"]
        if kind in ("linear", "conv"):
            h = self.lin(x)
        elif kind == "twice":  # the layer's two call sites share its module: nothing is fused, not even this relu
            h = self.lin(F.relu(self.lin(x)))
        elif kind == "flinear":
            h = F.linear(x, self.w, self.b)
        else:
            h = x @ self.w
        layout, converted, acts, taps = "base", False, iter(self.acts), []
        for i, step in enumerate(block["steps"]):
            what = step[0]
            if what == "tap":
                taps.append((h, layout, converted, step[1]))
            elif what in ("bias", "scale"):
                v, spell = (getattr(self, f"v{i}") if not step[2].startswith("norm") else
                            getattr(getattr(self, f"norm{i}"), "bias" if what == "bias" else "weight")), step[1]
                fn = {"add": operator.add, "mul": operator.mul, "torch": torch.add if what == "bias" else torch.mul,
                      "alpha": lambda a, b: torch.add(a, b, alpha=0.5)}
                h = fn[spell[1:]](v, h) if spell.startswith("r") else fn[spell](h, v)
                converted |= self.dtypes[i] != self.state["dtype"]
            elif what == "act":
                h = _act_call(next(acts), step[1], step[2], h)
            elif what == "act_stmt":  # in place, as a statement: h is read after it (two users)
                _act_call(next(acts), step[1], step[2], h)
            elif what == "cast":
                h = _cast_call(step[1], h)
                converted = True
            elif what == "view":
                h, layout = self._view(h, step[1], layout)
        out = self._restore(h, layout, converted, x)
        for tap, tap_layout, tap_converted, how in taps:
            out = out + self._restore(tap, tap_layout, tap_converted, x) * (0.5 if how == "scaled" else 1.0)
        for i, step in enumerate(block["steps"]):
            if step[0] in ("bias", "scale") and step[2] == "shared":  # the same parameter read again
                out = out - getattr(self, f"v{i}")
            if step[0] in ("bias", "scale") and step[2] == "norm_used":  # the module holding the vector runs
                out = getattr(self, f"norm{i}")(out)
        return out

    def _view(self, h, how: str, layout: str):
        """keep: regroup rows, the features last ("base" <-> "flat"); split: split the features; flat
        (conv): [B, C, H, W] -> [B, C, H * W]. Returns (view, its layout)."""
        n, t = self.block["n"], self.state.get("t", 1)
        if how == "flat":
            return h.flatten(2), "split"
        if how == "split":
            return h.view(-1, 2, n // 2), "split"
        if self.state["rank"] == 3:  # [B, T, n] <-> [B * T, n]
            return (h.view(-1, t, n), "base") if layout == "flat" else (h.reshape(-1, n), "flat")
        return (h.reshape(-1, n), "base") if layout == "flat" else (h.view(-1, 1, n), "flat")

    def _restore(self, h, layout: str, converted: bool, x):
        """h back to the block's output layout and the model's dtype (the next layer's input) after a cast
        (a cast always ends a chain: this one is never fused)."""
        n, s = self.block["n"], self.state
        if layout != "base":
            if self.block["layer"] == "conv":
                h = h.view(-1, n, *s["size"])
            else:
                h = h.reshape(-1, s["t"], n) if s["rank"] == 3 else h.reshape(-1, n)
        if converted:  # (the dtype x has at run time: the float64 truth model casts to float32 on the way too)
            h = h.to(x.dtype)
        return h


def chain_dtypes(block: dict, state: dict) -> list[str]:
    """The dtype of the value after each step of the block's chain (vectors promote as make_vector builds them)."""
    dtype, out = state["dtype"], []
    for step in block["steps"]:
        if step[0] in ("bias", "scale"):
            wide = "float32" if state["dtype"] == "float16" else "float64"
            vector = {"scalar": "float32", "half": "float16", "wide": wide}
            v = torch.empty((1,) if step[2] != "scalar" else (), dtype=DTYPES[vector.get(step[2], state["dtype"])])
            dtype = str(torch.result_type(torch.empty(2, dtype=DTYPES[dtype]), v)).removeprefix("torch.")
        elif step[0] == "cast":
            dtype = CASTS[step[1]]
        out.append(dtype)
    return out


def _act_module(name: str, spelling: str):
    if not spelling.startswith("module"):
        return nn.Identity()
    inplace = spelling == "module_inplace"
    return {"relu": lambda: nn.ReLU(inplace=inplace), "silu": lambda: nn.SiLU(inplace=inplace),
            "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh")}[name]()


def _act_call(module, name: str, spelling: str, h):
    if spelling.startswith("module"):
        return module(h)
    if name == "relu":
        return {"F": lambda: F.relu(h), "F_inplace": lambda: F.relu(h, inplace=True), "torch": lambda: torch.relu(h),
                "method": lambda: h.relu(), "method_inplace": lambda: h.relu_()}[spelling]()
    if name == "silu":
        return F.silu(h, inplace=spelling == "F_inplace")
    if name == "gelu":
        return F.gelu(h) if spelling == "F_default" else F.gelu(h, approximate="none")
    return F.gelu(h, approximate="tanh")


def _cast_call(how: str, h):
    return {"half": lambda: h.half(), "float": lambda: h.float(), "bfloat16": lambda: h.bfloat16(),
            "to": lambda: h.to(torch.float16), "to_kw": lambda: h.to(dtype=torch.bfloat16),
            "to_f32": lambda: h.to(torch.float32), "double": lambda: h.double(),
            "to_f64": lambda: h.to(torch.float64)}[how]()


class FusionNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        torch.manual_seed(spec["seed"])
        self.export = spec.get("export", False)
        self.blocks = nn.ModuleList()
        for i, (block, state) in enumerate(zip(spec["blocks"], block_states(spec))):
            self.blocks.append(Block(block, state, i))

    def forward(self, x):
        if self.export:  # Python control flow on a shape: symbolic_trace fails, torch.export takes over
            x = x if x.shape[1] > 0 else -x
        for block in self.blocks:
            x = block(x)
        return x


def block_states(spec: dict) -> list[dict]:
    states, s = [], dict(spec["state"], dtype=spec["dtype"])
    for block in spec["blocks"]:
        states.append(dict(s))
        s["d"] = block["n"]
    return states


def input_shape(spec: dict, batch: int) -> tuple:
    s = spec["state"]
    if spec["family"] == "conv":
        return (batch, s["d"], *s["size"])
    return (batch, s["t"], s["d"]) if s["rank"] == 3 else (batch, s["d"])


# ---------------------------------------------------------------- prediction


def as_exported(steps: list[tuple], dtypes: list[str], dtype: str) -> list[tuple]:
    """The chain as torch.export records it. Export follows tensor objects, not values: an in-place op
    (and a no-op cast, which returns its input) leaves the object's later reads reading its result, so
    an in-place statement is an activation like any other, and a tap (read at the block's end) reads
    the last op that returned the tapped object."""
    out, held = [], []
    for step, after in zip(steps, dtypes):
        same_object = (step[0] == "act_stmt" or (step[0] == "act" and step[2] in INPLACE_SPELLINGS)
                       or (step[0] == "cast" and after == dtype))
        if step[0] == "tap":
            held.append(step)
            continue
        if not same_object:
            out += held
            held = []
        out.append(("act", *step[1:]) if step[0] == "act_stmt" else step)
        dtype = after
    return out + held


def predict(block: dict, state: dict, quant: str | None, export: bool = False) -> tuple[list[str], list[str]]:
    """(ops the pass absorbs from the graph, in order, as it names them; the kernel's epilogue ops).

    Written from the rules, not from the pass: the chain is bias -> activation -> scale -> cast, each
    optional, in this order; views keeping the features are looked through (linear layers); a conv
    takes only the activation and the cast; a layer called twice takes nothing; a step is taken only
    when the value before it has no other user."""
    dtype, conv = state["dtype"], block["layer"] == "conv"
    has_bias, stage, absorbed = block["bias"] and block["layer"] != "matmul", 0 if not conv else 1, []
    steps = block["steps"] if block["layer"] != "twice" else []
    if export:
        steps = as_exported(steps, chain_dtypes(block, state), dtype)
    for step in steps:
        what = step[0]
        if what in ("tap", "act_stmt"):
            break  # the value has a second user: the tap's residual, or the statement's next reader
        if what == "view":
            if step[1] == "keep" and not conv:
                continue
            break
        if what == "bias" and stage == 0 and not has_bias and vector_fusable(step[2], dtype) and step[1] != "alpha":
            absorbed.append("bias")
            has_bias, stage = True, 1
        elif what == "act" and stage <= 1:
            absorbed.append(step[1])
            stage = 2
        elif what == "scale" and stage <= 2 and not conv and vector_fusable(step[2], dtype):
            absorbed.append("scale")
            stage = 3
        elif what == "cast" and CASTS[step[1]] in FUSED_CASTS:
            absorbed.append(f"cast:{CASTS[step[1]]}")
            break
        else:
            break
    kernel = (["dequant"] if quant == "int8" else []) + (["bias"] if has_bias else [])
    kernel += [op for op in absorbed if op != "bias" and not op.startswith("cast:")]
    casts = [op for op in absorbed if op.startswith("cast:")]
    if casts and casts[0] != f"cast:{dtype}":
        kernel.append(casts[0])
    return absorbed, kernel


def layer_name(block: dict, index: int) -> str:
    return f"blocks.{index}.{'w' if block['layer'] in ('flinear', 'matmul') else 'lin'}"


# ---------------------------------------------------------------- graph op counts

_RELU_FNS = {F.relu, torch.relu, torch.relu_, aten.relu.default, aten.relu_.default}
_GELU_FNS = {F.gelu, aten.gelu.default, aten.gelu_.default}
_SILU_FNS = {F.silu, aten.silu.default, aten.silu_.default}
_ADD_FNS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_MUL_FNS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul_.Tensor}
_CAST_FNS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


def op_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The kind of op a node calls, in the fusion pass's terms (an independent table)."""
    t = node.target
    if node.op == "call_module":
        m = gm.get_submodule(t)
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.SiLU):
            return "silu"
        if isinstance(m, nn.GELU):
            return "gelu_tanh" if m.approximate == "tanh" else "gelu"
        return None
    if node.op == "call_method":
        return {"relu": "relu", "relu_": "relu", "half": "cast", "float": "cast", "bfloat16": "cast",
                "double": "cast", "to": "cast", "add": "add", "mul": "mul"}.get(t)
    if node.op != "call_function":
        return None
    if t in _RELU_FNS:
        return "relu"
    if t in _SILU_FNS:
        return "silu"
    if t in _GELU_FNS:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if t in _ADD_FNS:
        return "add"
    if t in _MUL_FNS:
        return "mul"
    if t in _CAST_FNS:
        return "cast"
    return None


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(k for node in gm.graph.nodes if (k := op_kind(gm, node)))


def absorbed_kind(op: str) -> str:
    return {"bias": "add", "scale": "mul"}.get(op, "cast" if op.startswith("cast:") else op)


# ---------------------------------------------------------------- generator


def draw_step(pick, what: str, conv: bool, fusable: bool | None = None) -> tuple | None:
    """One step of kind `what`; fusable=True / False: a vector or cast the kernel can / cannot take."""
    if what in ("bias", "scale"):
        kinds = [v for v in VECTORS if not (conv and "norm" in v)]
        kinds = kinds[:6] * 2 + kinds[6:] if fusable is None else [v for v in kinds if vector_fusable(v) == fusable]
        spellings = ["add", "radd", "torch", "alpha"] if what == "bias" else ["mul", "rmul", "torch"]
        return (what, pick(spellings), pick(kinds))  # radd / rmul: vector on the left; alpha: torch.add(h, v, alpha=)
    if what == "act":
        name = pick(ACTS)
        return ("act", name, pick(ACT_SPELLINGS[name]))
    if what == "act_stmt":
        name = pick(["relu", "silu"])
        return ("act_stmt", name, pick([s for s in ACT_SPELLINGS[name] if s in INPLACE_SPELLINGS]))
    if what == "cast":
        return ("cast", pick([c for c in CASTS if fusable is None or (CASTS[c] in KERNEL_DTYPES) == fusable]))
    if what == "view":
        return ("view", "flat" if conv else pick(["keep", "keep", "split"] if fusable is None else ["keep"]))
    return ("tap", pick(["plain", "scaled"]))


def draw_steps(pick, conv: bool) -> list[tuple]:
    if pick([True, False]):
        # the order the kernel applies (bias, activation, scale, cast), each maybe, a view keeping the
        # features somewhere, and maybe one step that stops the chain where it stands
        steps = [draw_step(pick, what, conv, fusable=True) for what in ("bias", "act", "scale", "cast")
                 if pick([True, False]) and not (conv and what == "scale")]
        if not conv and pick([True, False]):
            steps.insert(pick(range(len(steps) + 1)), ("view", "keep"))
        if pick([True, True, False]):
            stop = pick(["tap", "act_stmt", "act", "bias", "scale", "cast", "view"])
            stop = draw_step(pick, stop, conv, fusable=False if stop in ("bias", "scale", "cast", "view") else None)
            steps.insert(pick(range(len(steps) + 1)), stop)
    else:
        steps = []
        for _ in range(pick([0, 1, 2, 2, 3, 3, 4, 5])):
            what = pick(["bias", "act", "act", "scale", "cast", "view", "tap", "act_stmt"] if not conv
                        else ["bias", "act", "act", "cast", "view", "tap", "act_stmt"])
            steps.append(draw_step(pick, what, conv))
    views = [i for i, st in enumerate(steps) if st[0] == "view"]
    steps = [st for i, st in enumerate(steps) if st[0] != "view" or i == (views or [0])[0]]  # one view a chain
    # after a split or a conv's flatten, only elementwise steps (a per-feature vector no longer broadcasts)
    for i, s in enumerate(steps):
        if s[0] == "view" and (s[1] in ("split", "flat")):
            steps = steps[:i + 1] + [t for t in steps[i + 1:] if t[0] not in ("bias", "scale", "view")]
            break
    return steps


def draw_model(pick, seed: int) -> dict:
    family = pick(["mlp", "mlp", "mlp", "conv"])
    dtype = pick(["float32", "float32", "float16"])
    if family == "mlp":
        state = {"d": pick(WIDTHS), "rank": pick([2, 2, 3])}
        if state["rank"] == 3:
            state["t"] = 2
    else:
        state = {"d": pick([4, 8]), "rank": 4, "size": (pick([2, 3]), pick([2, 4]))}
    blocks, d = [], state["d"]
    for _ in range(pick([1, 2, 2, 3])):
        if family == "conv":
            blocks.append({"layer": "conv", "n": pick([4, 8]), "bias": pick([True, False]),
                           "steps": draw_steps(pick, conv=True)})
        else:
            layer = pick(["linear", "linear", "flinear", "matmul", "twice"])
            blocks.append({"layer": layer, "n": d if layer == "twice" else pick([8, 12, 16]),
                           "bias": pick([True, False, False]), "steps": draw_steps(pick, conv=False)})
        d = blocks[-1]["n"]
    return {"seed": seed, "family": family, "dtype": dtype, "state": state, "blocks": blocks,
            "export": pick([False, False, False, True])}


def draw_options(pick) -> dict:
    return {"quantize": pick([None, "int8"])}


# ---------------------------------------------------------------- checks


def make_input(spec: dict, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape(spec, batch), generator=g).to(DTYPES[spec["dtype"]])


def rel_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    a, truth = a.detach().double(), truth.detach().double()
    return float((a - truth).abs().max() / truth.abs().max().clamp_min(1e-6))


def lowest_precision(spec: dict) -> str:
    """The least precise dtype the model's values pass through (the model's, or a cast's)."""
    order = ["bfloat16", "float16", "float32", "float64"]
    seen = {spec["dtype"]} | {CASTS[s[1]] for b in spec["blocks"] for s in b["steps"] if s[0] == "cast"}
    return min(seen, key=order.index)


def compare_outputs(cm, reference, spec: dict, batch: int, seed: int) -> None:
    x = make_input(spec, batch, seed)
    truth_model = copy.deepcopy(reference).double()
    with torch.no_grad():
        got, want, truth = cm(x.clone()), reference(x.clone()), truth_model(x.double())
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    assert torch.isfinite(truth).all()
    tol = max(BASE_TOL[lowest_precision(spec)], 4 * rel_error(want, truth))
    err = rel_error(got, truth)
    assert err <= tol, f"batch {batch}: error {err:.3g} > {tol:.3g} (reference's own: {rel_error(want, truth):.3g})"


def check_fusion(cm, captured, spec: dict, options: dict) -> None:
    nodes = {get_meta(n).layer.name: n for n in cm.graph_module.graph.nodes
             if n.op == "call_module" and isinstance(cm.graph_module.get_submodule(n.target), FusedEpilogue)}
    fused_total = collections.Counter()
    for i, (block, state) in enumerate(zip(spec["blocks"], block_states(spec))):
        name = layer_name(block, i)
        lp = cm.plan[name]
        assert lp.sparsity == "2:4" and lp.backend == "triton" and lp.quant == options.get("quantize"), lp
        absorbed, kernel_ops = predict(block, state, options.get("quantize"), spec.get("export", False))
        module = cm.sparse_module(name)
        assert isinstance(module, FusedEpilogue), (name, type(module))
        node = nodes[name]
        fused_total.update(absorbed_kind(op) for op in absorbed)
        assert list(get_meta(node).fused) == absorbed, f"{name}: fused {get_meta(node).fused}, expected {absorbed}"
        entry = cm.kernel_manifest[module.kernel_name]
        assert entry["fused_ops"] == kernel_ops, f"{name}: kernel fuses {entry['fused_ops']}, expected {kernel_ops}"
        assert name in {u["name"] for u in entry["layers"]}
        acts = [op for op in absorbed if op in ACTS]
        assert module.activation == (acts[0] if acts else None), (name, module.activation)
        assert (module.out_scale is not None) == ("scale" in absorbed), name
        assert (module.bias is not None) == ("bias" in kernel_ops), name
        casts = [op for op in absorbed if op.startswith("cast:")]
        assert module.out_dtype == (DTYPES[casts[0][5:]] if casts else None), (name, module.out_dtype)
        source = cm.kernels[module.kernel_name]
        assert ("tl.erf" in source) == (module.activation == "gelu"), name
        assert ("tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)" in source) == (module.activation == "relu"), name
        assert ("out_scale_ptr + offs_n" in source) == ("scale" in absorbed), name
    # the graph no longer calls what was fused, and still calls everything else
    before, after = op_counts(captured), op_counts(cm.graph_module)
    expected = before - fused_total
    assert +after == +expected, f"ops in the compiled graph {dict(after)}, expected {dict(expected)} " \
                                f"(captured {dict(before)}, fused {dict(fused_total)})"
    for kind in ("bias", "scale", "relu", "gelu", "gelu_tanh", "silu", "cast"):
        want = sum(1 for b, s in zip(spec["blocks"], block_states(spec))
                   for op in predict(b, s, None, spec.get("export", False))[0] if op.split(":")[0] == kind)
        assert cm.counters[f"fused_{kind}"] == want, (kind, cm.counters[f"fused_{kind}"], want)


def check_case(spec: dict, options: dict) -> None:
    """Compile the model `spec` describes with backend="triton", pattern 2:4 and `options`; check what the
    module docstring lists."""
    model = FusionNet(spec).eval()
    x = make_input(spec, 2, 0)
    captured = capture(copy.deepcopy(model), (x.clone(),))[0]
    cm = sparsec.compile(model, example_inputs=(x,), pattern="2:4", backend="triton", include=[".*"],
                         min_weights=0, **options)
    assert cm.trace_method == ("torch.export" if spec.get("export") else "symbolic_trace"), cm.trace_method
    check_fusion(cm, captured, spec, options)
    reference = pruned_model(model, cm.plan)
    compare_outputs(cm, reference, spec, 2, 1)
    compare_outputs(cm, reference, spec, 3 if spec.get("export") else 1, 2)  # (an exported graph holds for batch >= 2)
    if lowest_precision(spec) in ("float32", "float64"):
        check_input_gradient(cm, reference, spec)


def check_input_gradient(cm, reference, spec: dict) -> None:
    """The input gradient through the fused layers (their backward recomputes the epilogue in torch) is the
    reference's."""
    x = make_input(spec, 2, 3)
    xc, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr = reference(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4)).to(yr.dtype)
    try:
        (yr * g).sum().backward()
    except RuntimeError as e:  # an in-place op on a value autograd saved: plain torch cannot differentiate it either
        if "inplace" in str(e):
            return
        raise
    (cm(xc) * g).sum().backward()
    scale = xr.grad.abs().max().clamp_min(1e-6)
    err = float((xc.grad - xr.grad).abs().max() / scale)
    assert err <= 1e-4, f"input gradient differs from the reference's: {err:.3g}"


@st.composite
def cases(draw):
    pick = lambda options: draw(st.sampled_from(options))  # noqa: E731
    return draw_model(pick, draw(st.integers(0, 2**16))), draw_options(pick)


_EXAMPLES = os.environ.get("SPARSEC_FUZZ_FUSION_EXAMPLES", os.environ.get("SPARSEC_FUZZ_EXAMPLES"))


@settings(max_examples=int(_EXAMPLES or 20), deadline=None, derandomize=_EXAMPLES is None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fused_chains_compute_like_the_oracle_and_fuse_what_they_should(case):
    spec, options = case
    check_case(spec, options)


# ---------------------------------------------------------------- hand-picked cases

def _mlp(steps: list[tuple], *, layer: str = "linear", bias: bool = False, dtype: str = "float32", export: bool = False,
         rank: int = 2) -> dict:
    state = {"d": 16, "rank": rank, **({"t": 2} if rank == 3 else {})}
    return {"seed": 0, "family": "mlp", "dtype": dtype, "state": state, "export": export,
            "blocks": [{"layer": layer, "n": 16 if layer == "twice" else 8, "bias": bias, "steps": steps},
                       {"layer": "linear", "n": 8, "bias": True, "steps": []}]}


# name -> (spec, options, what the first layer's node says it fused): each a rule the random cases may
# not draw in CI, and the regressions of what the fuzz found
CASES = {
    "the whole chain, through a view": (
        _mlp([("bias", "add", "param"), ("view", "keep"), ("act", "gelu_tanh", "module"), ("scale", "mul", "buffer"),
              ("cast", "half")], rank=3), {}, ["bias", "gelu_tanh", "scale", "cast:float16"]),
    "int8 with a bias, silu and a bfloat16 cast": (
        _mlp([("act", "silu", "F_inplace"), ("cast", "to_kw")], bias=True, dtype="float16"), {"quantize": "int8"},
        ["silu"] + (["cast:bfloat16"] if "bfloat16" in FUSED_CASTS else [])),
    "a residual reads the pre-activation": (
        _mlp([("bias", "torch", "buffer"), ("tap", "plain"), ("act", "relu", "method_inplace")]), {}, ["bias"]),
    "an activation applied twice": (
        _mlp([("act", "silu", "module_inplace"), ("act", "relu", "method")]), {}, ["silu"]),
    "a cast the kernel cannot produce": (
        _mlp([("act", "gelu", "F_default"), ("cast", "to_f64")], dtype="float16"), {}, ["gelu"]),
    "a view splitting the features ends the chain": (
        _mlp([("act", "relu", "torch"), ("view", "split"), ("act", "silu", "F")]), {}, ["relu"]),
    "an in-place statement: the value is read after it": (
        _mlp([("act_stmt", "relu", "F_inplace"), ("scale", "rmul", "param")]), {}, []),
    "a layer called twice fuses nothing": (_mlp([("act", "relu", "module")], layer="twice"), {}, []),
    "a vector read elsewhere, or by a module that runs, stays": (
        _mlp([("bias", "add", "shared"), ("act", "relu", "F")]), {}, []),
    "a conv takes its activation and cast, no vector": (
        {"seed": 0, "family": "conv", "dtype": "float32", "state": {"d": 8, "rank": 4, "size": (2, 4)}, "export": False,
         "blocks": [{"layer": "conv", "n": 8, "bias": False, "steps": [("act", "relu", "F"), ("cast", "half")]},
                    {"layer": "conv", "n": 4, "bias": True,
                     "steps": [("bias", "add", "buffer"), ("act", "silu", "F")]}]},
        {"quantize": "int8"}, ["relu", "cast:float16"]),
    # fx records `buffer + h` / `buffer * h` (a tensor on the left) as the method calls buffer.add(h) /
    # buffer.mul(h), which the pass did not read: a model's own shift / scale buffers were never fused
    "regression: a buffer on the left of + and *": (
        _mlp([("bias", "radd", "buffer"), ("act", "relu", "F"), ("scale", "rmul", "one")]), {},
        ["bias", "relu", "scale"]),
    # torch.export (2.6 on) records .half() / .to(dtype) as aten.to.dtype, after a metadata check of its
    # input: the pass read only aten._to_copy, and the check was a second user of the cast's input, so no
    # cast was ever fused there
    "regression: casts in a graph torch.export captured": (
        _mlp([("act", "relu", "module"), ("cast", "half")], export=True), {"quantize": "int8"},
        ["relu", "cast:float16"]),
    "regression: a cast after a view, torch.export captured": (
        _mlp([("view", "keep"), ("act", "silu", "F"), ("cast", "to")], export=True, rank=3), {},
        ["silu", "cast:float16"]),
    "regression: a no-op cast torch.export captured": (
        _mlp([("bias", "add", "param"), ("cast", "float")], export=True), {}, ["bias", "cast:float32"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_chain(name):
    spec, options, fused = CASES[name]
    assert predict(spec["blocks"][0], block_states(spec)[0], None, spec["export"])[0] == fused  # the rules say so
    check_case(spec, options)


class InPlaceAfterLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(16, 8), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.lin(x)
        return self.act(h) + h  # h has a second user: the relu stays in the graph, in place on the layer's output


def test_an_in_place_op_on_a_triton_layers_3d_output_under_autograd():
    """nn.ReLU(inplace=True) on the output of a layer that runs a Triton kernel, with gradients on and a
    [B, T, d] input: it raised in forward ("Output 0 of KernelForward is a view and is being modified
    inplace": the kernel's [rows, N] output reshaped is a view); with a [B, d] input, and on backend
    "torch", it ran. Found by the gradient check above."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    model = InPlaceAfterLayer()
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    ref = pruned_model(model, cm.plan)
    xc, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cm(xc).sum().backward()
    ref(xr).sum().backward()
    assert float((xc.grad - xr.grad).abs().max()) <= 1e-5
