"""Activation checkpointing kept where torch.export captures the model (a forward torch.fx cannot record:
no_grad or autocast inside the checkpointed code, data-dependent shapes, ...). The capture annotates each op
made inside a torch.utils.checkpoint call with the call (sparsec/checkpointing.py ExportTags), and the
compiled graph runs those spans through checkpoint again, as for torch.fx graphs (tests/test_checkpointing.py).

Recomputation is observed as the ops backward runs: the checkpointed code's products (aten.addmm) run again
in backward, as many times as in the eager model's backward (the reference), and not at all without
checkpointing."""
import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode

import sparsec
from oracle import pruned_model


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


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


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
