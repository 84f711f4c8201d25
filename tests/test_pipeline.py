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


@pytest.mark.parametrize("train", [False, True])
def test_the_debug_plan_is_the_plan_compile_returns(monkeypatch, capsys, train):
    """The printed plan's byte totals count what the runtime layers hold (a CPU kernel's layout, a trainable
    layer's dense weight and mask), as cm.plan's do: it was printed before they were counted."""
    monkeypatch.setenv("SPARSEC_DEBUG", "1")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    x = torch.randn(1, 256)
    plan = sparsec.explain(model, example_inputs=(x,), include=["2"], train=train)
    if not train:
        plan["2"].backend = "bitmask"  # (holds its kernel's layout beside the packed form)
    capsys.readouterr()
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan, train=train)
    err = capsys.readouterr().err
    assert cm.plan["2"].runtime_bytes is not None and cm.plan["2"].runtime_bytes != cm.plan["2"].stored_bytes()
    assert str(cm.plan) in err


# ---- graphs captured by torch.export, pickled (sparsec.save / load, pickle): fx keeps a graph module's
# code and traces it again on load, which ran every op reading no graph input once, at load time


class _Counting(torch.nn.Module):
    """Only torch.export captures it (a branch on the batch size); its forward updates buffers in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(64))

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 1:
            self.steps += 1
        self.ema.mul_(0.9).add_(h.mean(0).detach() * 0.1)
        return self.c(torch.relu(self.b(h + self.ema)))


class _Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 1:
            h = h + torch.randn(64)  # a random op of fixed shape: no graph input in its arguments
        return self.c(torch.relu(self.b(h)))


def _exported(model, x):
    cm = sparsec.compile(model, example_inputs=(x,), include=[".*"], min_weights=0)
    assert cm.trace_method == "torch.export" and cm.plan.sparse_layers
    return cm


def _reloaded(cm, how, tmp_path):
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(cm))
    sparsec.save(cm, tmp_path / "m.sparsec")
    return sparsec.load(tmp_path / "m.sparsec")


@pytest.mark.parametrize("how", ["save", "pickle"])
def test_a_loaded_export_graph_keeps_its_buffer_updates(how, tmp_path):
    """Loading applied `steps += 1` and `ema *= 0.9` to the buffers once and dropped them from the graph:
    the loaded model never counted, and its EMA lost the decay (outputs off by 3e-2 from the second call)."""
    import copy

    from oracle import output_error, pruned_model

    torch.manual_seed(0)
    model, x = _Counting().eval(), torch.randn(8, 32)
    cm = _exported(model, x)
    ref = pruned_model(model, cm.plan)
    for _ in range(2):  # the compiled model's buffers move on, as the reference's do
        cm(x), ref(x)
    saved = {name: buffer.clone() for name, buffer in cm.graph_module.named_buffers()}
    loaded, ref_at_save = _reloaded(cm, how, tmp_path), copy.deepcopy(ref)
    for name in ("steps", "ema"):  # loading changed nothing
        assert torch.equal(getattr(loaded.graph_module, name), saved[name])
    for _ in range(3):
        inputs = torch.randn(6, 32)
        assert output_error(loaded(inputs), ref_at_save(inputs)) <= 1e-5
    assert loaded.graph_module.steps.item() == ref_at_save.steps.item() == 5
    torch.testing.assert_close(loaded.graph_module.ema, ref_at_save.ema, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["save", "pickle"])
def test_a_loaded_export_graph_draws_new_random_numbers(how, tmp_path):
    """`torch.randn(64)` in forward became one draw, made at load time, added on every call."""
    from oracle import output_error, pruned_model

    torch.manual_seed(0)
    model, x = _Noisy().eval(), torch.randn(8, 32)
    loaded = _reloaded(_exported(model, x), how, tmp_path)
    ref = pruned_model(model, loaded.plan)
    for seed in (1, 2):
        torch.manual_seed(seed)
        got = loaded(x)
        torch.manual_seed(seed)
        assert output_error(got, ref(x)) <= 1e-5


def test_an_export_graph_with_control_flow_operators_is_refused_at_save(tmp_path):
    """torch.cond's graph cannot be traced again from its code: the file saved and then failed to load
    with a TypeError from inside fx. Saving says so; a deep copy is exact."""
    import copy

    from oracle import output_error, pruned_model

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.cond(h.sum() > 0, lambda t: self.b(t), lambda t: -self.b(t), (h,))
            return self.c(torch.relu(h))

    torch.manual_seed(0)
    model, x = Cond().eval(), torch.randn(4, 32)
    cm = _exported(model, x)
    with pytest.raises(sparsec.errors.InvalidTypeError, match="calls cond .*torch.export's control flow"):
        sparsec.save(cm, tmp_path / "m.sparsec")
    ref = pruned_model(model, cm.plan)
    for inputs in (x, -x):
        assert output_error(copy.deepcopy(cm)(inputs), ref(inputs)) <= 1e-5


def test_an_export_graph_compiled_again_keeps_its_buffer_updates_and_random_ops():
    """Compiling a compiled export graph traces its code: the ops reading no graph input (`steps += 1`,
    the EMA's decay, a fixed-shape randn) ran once while tracing and were dropped (the EMA lost its
    decay silently, the noise became a constant, and the two traces' different constants made the
    graph look like it fixed its mode)."""
    import copy

    from oracle import output_error, pruned_model

    torch.manual_seed(0)
    model, x = _Counting().eval(), torch.randn(8, 32)
    cm = _exported(model, x)
    again = sparsec.compile(cm, example_inputs=(x,), include=[".*"], min_weights=0)
    assert not [n for n in again.plan.notes if "updates buffer" in n], again.plan.notes
    ref = copy.deepcopy(pruned_model(model, cm.plan))
    for _ in range(3):
        inputs = torch.randn(6, 32)
        assert output_error(again(inputs), ref(inputs)) <= 1e-5
    assert again.graph_module.steps.item() == ref.steps.item() == 3

    noisy = _exported(_Noisy().eval(), x)
    noisy_again = sparsec.compile(noisy, example_inputs=(x,), include=[".*"], min_weights=0)
    assert getattr(noisy_again.graph_module, "fixed_training", None) is None or noisy.graph_module.fixed_training \
        == noisy_again.graph_module.fixed_training
    assert not torch.equal(noisy_again(x), noisy_again(x)), "the noise is drawn on every call"
