"""Work per layer that scanned every layer or graph node made compile, save and plan lookups quadratic in the
layer count (1,600 layers: SDGP's gradient analysis 2.1 s, save 2.4 s, on this project's machine). Timing is
for benchmarks; these tests count the scans instead, and check the single-pass versions decide the same."""
import networkx as nx
import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.compiled import CompiledModel


class Tower(nn.Module):
    """Layers in a chain, the first `frozen` of them frozen: SDGP has no trainable parameter upstream of
    the layers reading only frozen ones, so their data gradient stays dense."""

    def __init__(self, depth: int, frozen: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        for layer in self.layers[:frozen]:
            layer.requires_grad_(False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x)) + x  # (residuals: every later layer has every earlier one upstream)
        return x


def test_gradient_analysis_searches_the_graph_once(monkeypatch):
    searches = []
    real = nx.ancestors
    monkeypatch.setattr(nx, "ancestors", lambda *a, **k: searches.append(1) or real(*a, **k))
    cm = sparsec.compile(Tower(12, frozen=3), pattern="dense", example_inputs=(torch.randn(2, 16),), train=True,
                         grad_pattern="2:4", min_weights=0, include=[".*"])
    assert not searches
    grads = [lp.grad_sparsity for lp in cm.plan]
    # layers 0-3 read the input or frozen layers only (layer 3's input comes from frozen 0-2): dense
    assert grads == [None] * 4 + ["2:4"] * 8, grads
    assert "no trainable parameter upstream" in cm.plan["layers.3"].reason


def test_save_and_group_checks_walk_the_modules_once(monkeypatch, tmp_path):
    cm = sparsec.compile(Tower(12, frozen=0), example_inputs=(torch.randn(2, 16),), train=True, min_weights=0,
                         include=[".*"])
    walks = []
    monkeypatch.setattr(CompiledModel, "sparse_module", lambda self, name: walks.append(name))
    sparsec.save(cm, tmp_path / "m.sparsec")
    sparsec.GroupLasso(cm, 1e-4)
    assert not walks


@pytest.mark.parametrize("edit", ["rename", "replace", "insert", "remove"])
def test_plan_lookups_follow_edits_to_the_list(edit):
    plan = sparsec.explain(Tower(4, frozen=0), example_inputs=(torch.randn(2, 16),), min_weights=0)
    assert plan["layers.2"] is plan.layers[2] and "layers.2" in plan  # (the index is built now)
    first = plan.layers[0]
    if edit == "rename":
        plan.layers[2].name, plan.layers[0].name = "gone", "layers.2"
        assert plan["layers.2"] is first and "gone" in plan
    elif edit == "replace":
        plan.layers[2] = sparsec.LayerPlan(**{**vars(first), "name": "layers.2"})
        assert plan["layers.2"] is plan.layers[2] and plan["layers.2"] is not first
    elif edit == "insert":
        plan.layers.insert(0, plan.layers.pop(2))
        assert plan["layers.2"] is plan.layers[0] and plan["layers.0"] is plan.layers[1]
    else:
        del plan.layers[2]
        assert "layers.2" not in plan and plan.get("layers.2") is None
        with pytest.raises(KeyError, match="no layer named 'layers.2'"):
            plan["layers.2"]
        assert plan["layers.3"] is plan.layers[2]
