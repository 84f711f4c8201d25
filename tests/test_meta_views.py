"""Data flow through views (sparsec.dataflow.dataflow_graph): a layer's output written in place into a view of
a buffer reaches the buffer's later readers, whatever op made the view; a detach passes the data on but
no gradient.

The decisions checked are the plan's: first / last layer (kept dense when no candidate layer is
upstream / downstream) and SDGP's "no trainable parameter upstream" (the data gradient is unused).
"""
from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sparsec
from sparsec.dataflow import dataflow_graph
from test_plan import ExportOnly  # (a model only torch.export can capture)

# Each spelling turns an [8, 32] tensor into a view of it; the model writes fc2's output through the
# buffer's view and fc3 reads the buffer. (The ones marked "had" were in the view set before.)
VIEWS = {
    "movedim": lambda t: t.movedim(0, 1),
    "torch.movedim": lambda t: torch.movedim(t, 0, 1),
    "moveaxis": lambda t: t.moveaxis(0, 1),
    "swapaxes": lambda t: t.swapaxes(0, 1),
    "swapdims": lambda t: t.swapdims(0, 1),
    "adjoint": lambda t: t.adjoint(),
    "mT": lambda t: t.mT,
    "T": lambda t: t.T,
    "mH": lambda t: t.mH,
    "H": lambda t: t.H,
    "real": lambda t: t.real,
    "unbind": lambda t: t.unbind(0)[3],
    "split_with_sizes": lambda t: t.split_with_sizes([16, 16], 1)[1],
    "tensor_split": lambda t: t.tensor_split(2, 1)[1],
    "hsplit": lambda t: t.hsplit(2)[0],
    "expand_as": lambda t: t.expand_as(t),
    "reshape_as": lambda t: t.reshape_as(t),
    "unsqueeze_squeeze": lambda t: t.unsqueeze(-1).squeeze(-1),
    "narrow (had)": lambda t: t.narrow(1, 8, 16),
    "unflatten (had)": lambda t: t.unflatten(1, (4, 8)),
    "view_as (had)": lambda t: t.view_as(t),
}
# Not under torch.export: it traces with grad mode on, where autograd refuses an in-place write into an
# output of a multiple-view function (unbind, split_with_sizes; such writes run under no_grad only), and it
# cannot trace `.data`.
SYMBOLIC_TRACE_ONLY = {"unbind", "split_with_sizes", "data"}
DETACHES = {
    "detach": lambda t: t.detach(),
    "data": lambda t: t.data,
    "detach_then_movedim": lambda t: t.detach().movedim(0, 1),
}


class WriteThroughView(nn.Module):
    """fc1 -> fc2, whose output is copied into buf through `view(buf)` -> fc3 reads buf -> out."""

    def __init__(self, view):
        super().__init__()
        self.view = view
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        buf = x.new_zeros(8, 32)
        self.view(buf).copy_(self.view(self.fc2(h)))
        return self.out(torch.relu(self.fc3(buf)))




def _plan(view, tracer):
    torch.manual_seed(0)
    model = WriteThroughView(view)
    if tracer == "torch.export":
        model = ExportOnly(model)
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(torch.randn(8, 32),), min_weights=0,
                           train=True, grad_pattern="2:4")
    prefix = "inner." if tracer == "torch.export" else ""
    return {lp.name.removeprefix(prefix): lp for lp in plan}


def _cases(spellings):
    return [(s, t) for s in spellings for t in ("symbolic_trace", "torch.export")
            if t == "symbolic_trace" or s not in SYMBOLIC_TRACE_ONLY]


@pytest.mark.parametrize("spelling, tracer", _cases(list(VIEWS) + list(DETACHES)))
def test_a_write_through_a_view_reaches_the_buffers_readers(spelling, tracer):
    """fc2 feeds fc3 through the buffer: neither is the last / first layer. With x.movedim(...) (and the
    other views missing from the set) the flow stopped at the view: fc2 was kept dense as the "last
    layer", fc3 as the "first layer". A detached alias is still the buffer's memory, so the data gets
    there too."""
    layers = _plan({**VIEWS, **DETACHES}[spelling], tracer)
    assert "first layer" in layers["fc1"].reason and "last layer" in layers["out"].reason
    assert layers["fc2"].sparsity == "2:4", layers["fc2"].reason
    assert layers["fc3"].sparsity == "2:4", layers["fc3"].reason


@pytest.mark.parametrize("spelling, tracer", _cases([s for s in VIEWS if s not in SYMBOLIC_TRACE_ONLY]))
def test_a_write_through_a_view_gives_the_buffers_readers_a_trainable_upstream(spelling, tracer):
    """fc3's data gradient reaches fc2 (autograd rebases the buffer on the in-place write into its view),
    so fc3 gets SDGP; the broken flow said "no trainable parameter upstream" and left it dense.
    (Not for unbind / split_with_sizes: training cannot write into their views, see SYMBOLIC_TRACE_ONLY.)"""
    layers = _plan(VIEWS[spelling], tracer)
    assert layers["fc3"].grad_sparsity == "2:4", layers["fc3"].reason
    assert layers["fc1"].grad_sparsity is None and "no trainable parameter upstream" in layers["fc1"].reason


def _node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


class ReadsDetached(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc2(self.fc1(x).detach())


@pytest.mark.parametrize("spelling", list(DETACHES))
def test_detach_passes_data_but_no_gradient(spelling):
    """dataflow_graph(gm) follows the data through a detach (first / last layer); dataflow_graph(gm,
    gradients=True) does not: no gradient flows back through a detach, nor through an in-place write
    into a detached alias to the tensor it aliases."""
    gm = fx.symbolic_trace(WriteThroughView(DETACHES[spelling]))
    fc2, fc3 = _node(gm, "fc2"), _node(gm, "fc3")
    assert nx.has_path(dataflow_graph(gm), fc2, fc3)
    assert not nx.has_path(dataflow_graph(gm, gradients=True), fc2, fc3)

    gm = fx.symbolic_trace(ReadsDetached())
    fc1, fc2 = _node(gm, "fc1"), _node(gm, "fc2")
    assert nx.has_path(dataflow_graph(gm), fc1, fc2)
    assert not nx.has_path(dataflow_graph(gm, gradients=True), fc1, fc2)


@pytest.mark.parametrize("spelling", list(VIEWS))
def test_views_pass_gradients(spelling):
    gm = fx.symbolic_trace(WriteThroughView(VIEWS[spelling]))
    assert nx.has_path(dataflow_graph(gm, gradients=True), _node(gm, "fc2"), _node(gm, "fc3"))


def test_a_write_into_a_detached_alias_reaches_the_alias_readers_gradients():
    """`d = buf.detach(); d.copy_(y)`: d now carries y's gradient (autograd records the copy on d), buf does not."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            buf = x.new_zeros(8, 32)
            d = buf.detach()
            d.copy_(self.fc1(x))
            return self.fc2(d) + self.fc3(buf)

    gm = fx.symbolic_trace(M())
    graph = dataflow_graph(gm, gradients=True)
    assert nx.has_path(graph, _node(gm, "fc1"), _node(gm, "fc2"))
    assert not nx.has_path(graph, _node(gm, "fc1"), _node(gm, "fc3"))
    assert nx.has_path(dataflow_graph(gm), _node(gm, "fc1"), _node(gm, "fc3"))
    # the same in autograd itself
    x = torch.randn(8, 32)
    buf = torch.zeros(8, 32)
    d = buf.detach()
    w = torch.randn(32, 32, requires_grad=True)
    d.copy_(x @ w)
    assert d.requires_grad and not buf.requires_grad


@pytest.mark.parametrize("model", ["reads_detached", "writes_through_detach"])
def test_no_sdgp_behind_a_detach(model):
    """A layer reading a detached tensor never has its data gradient used (autograd does not even compute
    it): its plan must not claim SDGP; first / last-layer decisions still see the data flow."""
    if model == "reads_detached":
        net = ReadsDetached()
        layer = "fc2"
    else:
        net = WriteThroughView(DETACHES["detach"])
        layer = "fc3"
    plan = sparsec.explain(net, pattern="2:4", example_inputs=(torch.randn(8, 32),), min_weights=0,
                           train=True, grad_pattern="2:4")
    assert "first layer" not in plan[layer].reason
    assert plan[layer].grad_sparsity is None and "no trainable parameter upstream" in plan[layer].reason
