"""The compiled model starts from the model's state at compile time: nothing sparsec runs while capturing
or inspecting the model (fx's trace of the forward's Python, a parametrized weight read to list its layer)
may leave its buffers changed. Checked against the model itself run side by side, call for call."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import output_error


class _Counting(nn.Module):
    """A step counter updated in forward. fx's trace ran `self.steps += 1` on the real buffer (sparsec's copy's),
    its graph was found not to compute what the model does (the count is read), and the torch.autocast region
    is torch.export's to capture: it captured the buffer as the failed trace left it, one step ahead."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(64, 64) for _ in range(4))
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps += 1
        h = self.a(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(h).float()
        return self.d(self.c(h)) * self.steps


def _reference(model, cm):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for lp in cm.plan.sparse_layers:
            reference.get_submodule(lp.name).weight.copy_(cm.effective_weight(lp.name))
    return reference


def test_a_buffer_the_forward_updates_starts_where_the_models_is():
    torch.manual_seed(0)
    model, x = _Counting(), torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export" and cm.plan.sparse_layers
    assert float(model.steps) == 0 and float(cm.state_dict()["graph_module.steps"]) == 0
    reference = _reference(model, cm)
    for _ in range(2):  # torch.export records the update: the compiled model counts as the model does
        assert output_error(cm(x), reference(x)) < 1e-5
    assert float(cm.state_dict()["graph_module.steps"]) == float(reference.steps) == 2


class _SpectralNormed(nn.Module):
    def __init__(self, export: bool):
        super().__init__()
        self.export = export
        self.a, self.c, self.d = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.b = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(64, 64))

    def forward(self, x):
        h = self.a(x)
        if self.export:
            with torch.no_grad():
                h = h + h.mean()
        return self.d(self.c(self.b(h)))


@pytest.mark.parametrize("export", [False, True])
def test_spectral_norm_is_not_stepped_by_compile_or_inspection(export):
    """spectral_norm takes a power-iteration step on its buffers whenever its weight is read in training
    mode: listing its layer in the plan, and effective_weight('b'), each moved the compiled model one step
    ahead of the model, whose outputs then differed from the model's on every call."""
    torch.manual_seed(0)
    model, x = _SpectralNormed(export), torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = sparsec.compile(model, example_inputs=(x,), include=["c"])
    assert cm.trace_method == ("torch.export" if export else "symbolic_trace")
    assert cm.plan["b"].sparsity is None and cm.plan["c"].sparsity == "2:4"
    key = "graph_module.b.parametrizations.weight.0._u"
    before = model.b.parametrizations.weight[0]._u.clone()
    assert torch.equal(cm.state_dict()[key], before)
    if not export:  # (torch.export's graph computes the weight inside it: no weight to ask for)
        cm.effective_weight("b")
        assert torch.equal(cm.state_dict()[key], before)
    reference = _reference(model, cm)
    for _ in range(2):  # training mode: both take their power-iteration step on each call
        assert output_error(cm(x), reference(x)) < 1e-5
    assert torch.equal(cm.state_dict()[key], reference.b.parametrizations.weight[0]._u)


class _PythonCounter(nn.Module):
    """`self.calls += 1` in Python, read by the output; the no_grad region is torch.export's to capture.
    `lazy`: the attribute is set on the first call only (a lazy initialisation), not on every call."""

    def __init__(self, lazy: bool):
        super().__init__()
        self.lazy = lazy
        self.a, self.b, self.c, self.d = (nn.Linear(64, 64) for _ in range(4))
        self.calls = 0

    def forward(self, x):
        if not self.lazy or self.calls == 0:
            self.calls += 1
        h = self.a(x)
        with torch.no_grad():
            h = h + h.mean()
        return self.d(self.c(self.b(h))) + self.calls


@pytest.mark.parametrize("lazy", [False, True])
def test_python_state_the_forward_changes_is_named_on_the_export_path_and_starts_as_the_models(lazy):
    """The export graph holds a Python attribute at the value it had while exported: that was the value the
    failed fx trace and the example checks had counted it up to (3 on the first call, where the model has 1),
    and no note said that the graph does not count (the fx path's does)."""
    torch.manual_seed(0)
    model, x = _PythonCounter(lazy), torch.randn(8, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export" and cm.plan.sparse_layers
    named = [n for n in [*cm.plan.notes, *(str(w.message) for w in caught)] if "['calls']" in n]
    assert bool(named) == (not lazy)
    if named:
        assert "graph torch.export traced does not make that change" in named[0]
    reference = _reference(model, cm)
    assert output_error(cm(x), reference(x)) < 1e-5  # the first call: both add 1
    if lazy:
        assert output_error(cm(x), reference(x)) < 1e-5
