"""The pass runner: a failing pass is named with the passes before it, an analysis pass that edits
the graph is refused, SPARSEC_DEBUG prints what it promises."""
import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import pipeline
from sparsec.errors import PassError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def test_a_failing_pass_is_named_with_its_cause_and_the_passes_before_it(monkeypatch):
    def choose_quantization(gm, ctx):  # stands in for the real pass of that name
        raise RuntimeError("scale table exhausted")

    passes = [choose_quantization if p.__name__ == "choose_quantization" else p for p in pipeline.ANALYSIS_PASSES]
    monkeypatch.setattr(pipeline, "ANALYSIS_PASSES", passes)
    with pytest.raises(PassError, match=r"pass 'choose_quantization' failed \(RuntimeError: scale table exhausted\); "
                                        r"passes completed before it: propagate_shapes, find_candidates, .*"
                                        r"choose_grad_sparsity$") as info:
        sparsec.compile(_mlp(), example_inputs=(torch.randn(2, 32),))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_analysis_pass_that_edits_the_graph_is_refused(monkeypatch):
    def sneaky_analysis(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.relu, (out.args[0],))
        return gm

    monkeypatch.setattr(pipeline, "ANALYSIS_PASSES", pipeline.ANALYSIS_PASSES[:2] + [sneaky_analysis])
    with pytest.raises(PassError, match="analysis pass 'sneaky_analysis' changed the graph"):
        sparsec.explain(_mlp(), example_inputs=(torch.randn(2, 32),))


@pytest.mark.parametrize("level, shows, hides", [
    ("1", ["layer", "reason"], ["[sparsec] analysis", "# after"]),
    ("2", ["[sparsec] analysis propagate_shapes", "[sparsec] rewrite  emit_kernels"], ["# after"]),
    ("3", ["# after sparsify_layers (rewrite pass", "def forward"], ["# ---- kernel"]),
    ("4", ["# ---- kernel sparse24_mm", "@triton.jit"], []),
    ("not-a-number", [], ["[sparsec]", "# after"]),
])
def test_debug_output(monkeypatch, capsys, level, shows, hides):
    monkeypatch.setenv("SPARSEC_DEBUG", level)
    x = torch.randn(2, 32)
    if level.isdigit():
        sparsec.compile(_mlp(), example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    else:
        with pytest.warns(UserWarning, match="SPARSEC_DEBUG='not-a-number' is not a level"):
            sparsec.compile(_mlp(), example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    err = capsys.readouterr().err
    assert all(s in err for s in shows), err[:2000]
    assert not any(s in err for s in hides), err[:2000]
    assert bool(err) == (level != "not-a-number")
