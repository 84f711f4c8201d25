"""Activation checkpointing kept where torch.export captures the model (a forward torch.fx cannot record:
no_grad or autocast inside the checkpointed code, data-dependent shapes, ...). The capture annotates each op
made inside a torch.utils.checkpoint call with the call (sparsec/checkpointing.py ExportTags), and the
compiled graph runs those spans through checkpoint again, as for torch.fx graphs (tests/test_checkpointing.py).

Recomputation is observed as the ops backward runs: the checkpointed code's products (aten.addmm) run again
in backward, as many times as in the eager model's backward (the reference), and not at all without
checkpointing."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import sparsec
from oracle import pruned_model
from test_checkpointing import CountOps


class Inside(nn.Module):
    """Code torch.fx cannot record, run under torch.utils.checkpoint: `how` picks what."""

    def __init__(self, how="no_grad", reentrant=False):
        super().__init__()
        self.how, self.reentrant = how, reentrant
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def part(self, h):
        if self.how == "no_grad":
            with torch.no_grad():
                g = self.b(h)
            return torch.relu(self.c(h * g))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = self.b(h)
        return torch.relu(self.c(h * g.float()))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return ckpt.checkpoint(self.part, h, use_reentrant=self.reentrant) + 1


def _compile(model, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsec.compile(model, example_inputs=(x,), **options)


def _products_in_backward(model, x) -> int:
    loss = model(x).square().sum()
    with CountOps() as ops:
        loss.backward()
    return ops.counts[torch.ops.aten.addmm.default]


def _grads(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_trains_as(model, cm, x):
    want_x, want = _grads(model, x)
    got_x, _ = _grads(cm, x)
    torch.testing.assert_close(got_x, want_x)
    for name, grad in want.items():
        got = cm.graph_module.get_parameter(name).grad
        assert (got is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(got, grad)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("how", ["no_grad", "autocast"])
def test_a_model_torch_export_captures_keeps_its_checkpointing(how, reentrant):
    torch.manual_seed(0)
    model, x = Inside(how, reentrant), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.plan.notes[0].startswith("traced with torch.export")
    assert "1 torch.utils.checkpoint call(s), captured by torch.export: the compiled model checkpoints them too" \
        in cm.plan.notes[1]
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    assert ("use_reentrant = True" in cm.graph_module.code) == reentrant
    recomputed = _products_in_backward(model, x)
    assert recomputed > 0 and _products_in_backward(cm, x) == recomputed
    _assert_trains_as(model, cm, x)


def test_without_checkpointing_backward_runs_no_product_again():
    """The counter above tells recomputation apart: the same model not checkpointed runs none."""
    torch.manual_seed(0)
    model, x = Inside(), torch.randn(4, 8)
    plain = _compile(model, x, pattern="dense", train=False)  # (an inference compile keeps no checkpointing)
    assert "checkpoint" not in plain.graph_module.code
    assert _products_in_backward(plain, x) == 0


def test_a_sparse_layer_inside_trains_as_the_pruned_model_and_a_copy_keeps_it():
    torch.manual_seed(0)
    model, x = Inside("autocast"), torch.randn(4, 8)
    cm = _compile(model, x, pattern="2:4", train=True, include=["c"], min_weights=0)
    assert {layer.name: layer.sparsity for layer in cm.plan.layers} == {"a": None, "b": None, "c": "2:4"}
    copied = copy.deepcopy(cm)  # (pickle refuses graphs with export's autocast regions, saying so)
    for compiled in (cm, copied):
        assert compiled.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
        assert _products_in_backward(compiled, x) == _products_in_backward(model, x) > 0
    reference = pruned_model(model, cm.plan)  # the model with c's weight pruned as the plan says
    want_x, want = _grads(reference, x)
    got_x, _ = _grads(cm, x)
    torch.testing.assert_close(got_x, want_x)
    mask = cm.mask("c")
    torch.testing.assert_close(cm.graph_module.sparse_c.weight.grad, want["c.weight"] * mask)  # (the rewritten layer)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_compiled_model_compiled_again_for_training_keeps_its_checkpointing(reentrant):
    """torch.export runs a graph module through fx.Interpreter, not its (checkpointed) forward: compiled
    again, the compiled model's graph stored every activation. The calls are read from the nodes' meta.
    (autocast: an export graph's no_grad region leaves grad off where symbolic_trace fails inside it.)"""
    torch.manual_seed(0)
    model, x = Inside("autocast", reentrant), torch.randn(4, 8, requires_grad=True)
    first = _compile(model, x, pattern="dense", train=True)
    assert any("1 torch.utils.checkpoint call(s), captured by torch.export" in note for note in first.plan.notes)
    # (compiled again, its code is traced: the export graph's autocast region is recorded as it is)
    again = _compile(first, x, pattern="dense", train=True)
    assert again.trace_method == "symbolic_trace"
    assert any("checkpointed code under torch.utils.checkpoint: the compiled model does too" in note
               for note in again.plan.notes), again.plan.notes
    assert again.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    assert ("use_reentrant = True" in again.graph_module.code) == reentrant
    assert _products_in_backward(again, x) == _products_in_backward(model, x) > 0
    _assert_trains_as(model, again, x)


class AutocastOverCalls(nn.Module):
    """One autocast region around several checkpoint calls: export records it as one higher-order op."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for block in self.blocks:
                x = ckpt.checkpoint(block, x, use_reentrant=self.reentrant)
        return x.float()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_calls_inside_one_autocast_region_run_as_one_checkpoint(reentrant):
    """The region cannot be split: its calls run as one. Left untagged, the getitems after it made a span
    alone: nothing was recomputed, and a reentrant one got a tuple, so nothing trained (backward failed)."""
    torch.manual_seed(0)
    model, x = AutocastOverCalls(reentrant), torch.randn(4, 8, requires_grad=True)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    assert _products_in_backward(cm, x) == _products_in_backward(model, x) > 0
    _assert_trains_as(model, cm, x)


def test_compiling_again_a_graph_with_a_no_grad_region_leaves_grad_on_and_keeps_the_region():
    """torch.export records a no_grad block as a region whose exit is no finally: the trace of the compiled
    graph, failing inside it, left grad off for the whole process, and the export fallback then traced
    every op under no_grad (the region dropped: gradients reached the frozen branch)."""

    class FrozenScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.m = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            with torch.no_grad():
                s = self.l(x).mean()
            return self.m(x) * s

    torch.manual_seed(0)
    model, x = FrozenScale(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    again = _compile(cm, x, pattern="dense", train=True)
    assert torch.is_grad_enabled()
    _assert_trains_as(model, again, x)
    assert again.graph_module.get_parameter("l.weight").grad is None


class CondInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def part(self, h):
        return torch.cond(h.sum() > 0, lambda t: self.b(t), lambda t: -self.b(t), (h,))

    def forward(self, x):
        return self.c(torch.relu(ckpt.checkpoint(self.part, torch.relu(self.a(x)), use_reentrant=False)))


def test_torch_cond_still_exports_under_the_annotating_modes():
    """Dynamo traces torch.cond's branches through the torch function modes active while export runs, and
    refused what they asked (the thread, inference mode): training compiles of such models failed. The
    modes step aside while dynamo traces; the cond itself is made in the checkpoint call, which is kept."""
    torch.manual_seed(0)
    model, x = CondInside(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    _assert_trains_as(model, cm, x)
