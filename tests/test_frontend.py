"""Tracing: symbolic_trace, the torch.export fallback, leaf modules, and errors naming user code."""
import copy
import dataclasses
import os
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import output_error, pruned_model
from sparsec.errors import TraceError


class Block(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ShapeUnpacking(nn.Module):
    """symbolic_trace cannot iterate a Proxy (B, T, C = x.shape) nor assign items on one."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        b, t, c = x.shape
        h = self.blocks(self.inp(x))
        h = h.reshape(b * t, -1).clone()
        h[:, 0] = 0.0
        return self.head(h)


class DataDependent(nn.Module):
    """Control flow on tensor values: neither tracer can capture it."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.block(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.weird = DataDependent()
        self.mid = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(self.mid(self.weird(self.inp(x))))


def test_export_fallback_names_layers_by_module_path():
    torch.manual_seed(0)
    model, x = ShapeUnpacking().eval(), torch.randn(2, 5, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export"
    assert any("symbolic_trace failed" in n and "item assignment" in n or "iter" in n for n in cm.plan.notes)
    names = {lp.name for lp in cm.plan}
    assert names == {"inp", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}
    assert cm.plan["blocks.0.fc1"].sparsity == "2:4" and cm.plan["head"].sparsity is None
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert "sparse_blocks_0_fc1" in cm.graph_module.code and "# sparsec: blocks.0.fc1" in cm.graph_module.code


def test_both_tracers_failing_names_the_calls_and_the_user_line(capfd):
    with pytest.raises(TraceError) as err:
        sparsec.compile(DataDependent(), example_inputs=(torch.randn(2, 64),))
    # (torch.export's own warning, which prints the whole traced graph, does not bury the error)
    assert "def forward" not in capfd.readouterr().err
    text = str(err.value)
    assert "torch.fx.symbolic_trace failed" in text and "torch.export.export(strict=False) failed" in text
    assert "test_frontend.py" in text and "if x.sum() > 0:" in text
    assert "leaf_modules" in text and "exclude" in text
    # the branch is in the model's own forward, which no leaf_modules / exclude can take out: the remedy that
    # applies there, and that torch.export captures, is torch.cond
    assert "the failing line is in the model's own forward, which leaf_modules / exclude cannot skip" in text
    assert "torch.cond(pred, true_fn, false_fn, operands)" in text
    assert "mark the submodule whose code failed as a leaf" not in text  # (offered where it cannot help)


def test_both_tracers_failing_in_a_submodule_offer_leaf_modules():
    model = nn.Sequential(nn.Linear(64, 64), DataDependent())
    with pytest.raises(TraceError) as err:
        sparsec.compile(model, example_inputs=(torch.randn(2, 64),))
    assert "mark the submodule whose code failed as a leaf (leaf_modules=" in str(err.value)


def test_export_output_is_given_back_less_a_failure_dump(capfd):
    """What is written to stderr while torch.export runs comes back afterwards; on a failure only the
    partial graph torch.export prints is left out (it stays on the exception)."""
    import sys

    from sparsec.export_capture import export_chatter_held

    with export_chatter_held():
        sys.stderr.write("a model's own note\n")
    assert capfd.readouterr().err == "a model's own note\n"

    failure = RuntimeError("data-dependent")
    failure.partial_fx_graph = "def forward(self, x):\n    return x"
    with pytest.raises(RuntimeError, match="data-dependent"):
        with export_chatter_held():
            sys.stderr.write("before\n")
            print(failure.partial_fx_graph, file=sys.stderr)
            sys.stderr.write("after\n")
            raise failure
    assert capfd.readouterr().err == "before\nafter\n"


def test_untraceable_without_example_inputs_asks_for_them():
    with pytest.raises(TraceError, match="needs example inputs: pass example_inputs"):
        sparsec.compile(ShapeUnpacking())


@pytest.mark.parametrize("remedy", [dict(leaf_modules=[DataDependent]), dict(leaf_modules=["weird"]),
                                    dict(exclude=["weird"])])
def test_leaf_or_excluded_module_makes_the_rest_compilable(remedy):
    torch.manual_seed(0)
    model, x = Outer().eval(), torch.randn(3, 64)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, **remedy)
    assert cm.trace_method == "symbolic_trace"
    assert cm.plan["mid"].sparsity == "2:4"
    inner = cm.plan["weird.block.fc1"]
    assert inner.sparsity is None
    assert ("excluded by exclude='weird'" if "exclude" in remedy else "called as a whole") in inner.reason
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert torch.equal(cm.effective_weight("weird.block.fc1"), model.weird.block.fc1.weight)


def test_builtin_transformer_layers_are_traced_into():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), nn.Linear(64, 8))
    model.eval()
    x = torch.randn(2, 7, 64)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    # nn.MultiheadAttention's Python is not symbolically traceable: torch.export sees its ops
    assert cm.trace_method == "torch.export"
    for name in ["1.self_attn.in_proj_weight", "1.self_attn.out_proj", "1.linear1", "1.linear2"]:
        assert cm.plan[name].sparsity == "2:4", cm.plan[name].reason

    def weight_of(ref, name):
        return ref.get_parameter(name) if name.endswith("in_proj_weight") else ref.get_submodule(name).weight

    assert output_error(cm(x), pruned_model(model, cm.plan, weight_of)(x)) <= 1e-5


def test_leaf_builtin_reports_its_layers():
    model = nn.Sequential(nn.Linear(64, 64), nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), nn.Linear(64, 8))
    cm = sparsec.compile(model.eval(), example_inputs=(torch.randn(2, 7, 64),), leaf_modules=[nn.TransformerEncoderLayer])
    assert cm.trace_method == "symbolic_trace"
    out_proj = cm.plan["1.self_attn.out_proj"]
    assert out_proj.sparsity is None and "not traced into" in out_proj.reason


def test_export_graph_rewrites_functional_conv():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = self.c(torch.relu(self.b(torch.relu(self.a(x))))).clone()
            y[:, 0] = 0.0  # item assignment on a Proxy: symbolic_trace fails
            return y

    torch.manual_seed(0)
    model, x = Conv().eval(), torch.randn(2, 3, 10, 10)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.trace_method == "torch.export"
    assert cm.plan["b"].sparsity == "2:4" and cm.plan["b"].op == "conv2d"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_export_traced_model_runs_the_shapes_its_code_allows_and_refuses_the_rest():
    """torch.export leaves batch and length dynamic (the model's code fixes only the feature dim);
    sizes 0 and 1 it does not trace dynamically, and says how to get them."""
    torch.manual_seed(0)
    model = ShapeUnpacking().eval()
    cm = sparsec.compile(model, example_inputs=(torch.randn(2, 5, 32),))
    assert cm.trace_method == "torch.export"
    reference = pruned_model(model, cm.plan)
    for shape in [(2, 5, 32), (3, 7, 32), (9, 2, 32)]:
        x = torch.randn(shape)
        assert output_error(cm(x), reference(x)) <= 1e-5, shape
    with pytest.raises(ValueError, match=r"input 0 dim 2 is fixed at 32, got 16"):
        cm(torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match=r"input 0 dim 0 must be in \[2, inf\), got 1 \(.*compile with example inputs "
                                         r"of that size"):
        cm(torch.randn(1, 5, 32))
    single = sparsec.compile(model, example_inputs=(torch.randn(1, 5, 32),))  # batch 1: fixed at 1
    x = torch.randn(1, 6, 32)
    assert output_error(single(x), reference(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"input 0 dim 0 is fixed at 1, got 2"):
        single(torch.randn(2, 6, 32))


class StridedPoolHead(nn.Module):
    """A strided conv, a max pool and a flatten into a Linear: torch.export with dynamic dims fails
    (sympy cannot solve the guard on the flattened size), with static ones it works; the branch on a
    shape makes symbolic_trace fail."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv1d(3, 8, 1, stride=2), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[1] > 0:
            x = F.max_pool1d(x, 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


def test_a_failed_dynamic_export_falls_back_to_a_dynamic_batch_and_leaves_inputs_unmarked():
    """torch.export marks the example tensors' dims for dynamo (attributes on the tensors) and removes the
    marks when it succeeds, not when it fails: the static export after the failed dynamic one read them,
    traced the dims dynamic again and failed alike, and compile raised TraceError (found by
    tests/test_fuzz_compile.py). The marks are put back as they were, so it compiles, and the user's
    tensor is left as given. The batch dim alone stays dynamic (the graph was fixed at batch 2)."""
    torch.manual_seed(0)
    model, x = StridedPoolHead().eval(), torch.randn(2, 3, 8)
    probe = x.clone()
    with pytest.raises(Exception):  # the premise: this torch's dynamic export fails on the model
        torch.export.export(model, (probe,), strict=False,
                            dynamic_shapes=({d: torch.export.Dim.AUTO for d in range(3)},))
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.trace_method == "torch.export"
    assert not [k for k in vars(x) if k.startswith("_dynamo") or k == "_has_dynamo_dim_marking"], vars(x)
    assert sum(lp.sparsity is not None for lp in cm.plan) == 1, cm.plan  # fc (conv is first, out last)
    reference = pruned_model(model, cm.plan)
    for batch in (2, 5):
        x = torch.randn(batch, 3, 8)
        assert output_error(cm(x), reference(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"input 0 dim 2 is fixed at 8, got 10"):
        cm(torch.randn(2, 3, 10))


class _TwoInputs(nn.Module):
    """x + y ties the two inputs' batch dims."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x, y):
        h = self.b(torch.relu(self.a(x))) + y
        h[:, 0] = 0.0  # item assignment: symbolic_trace fails
        return h


def test_export_guard_ties_equal_dims_and_survives_save(tmp_path):
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    cm = sparsec.compile(model, example_inputs=(torch.randn(4, 16), torch.randn(4, 16)), min_weights=0)
    assert cm.trace_method == "torch.export"
    x, y = torch.randn(6, 16), torch.randn(6, 16)
    assert output_error(cm(x, y), pruned_model(model, cm.plan)(x, y)) <= 1e-5
    with pytest.raises(ValueError, match=r"input 1 dim 0 must equal input 0 dim 0 \(6\), got 5"):
        cm(x, torch.randn(5, 16))
    sparsec.save(cm, tmp_path / "m")
    loaded = sparsec.load(tmp_path / "m")
    assert torch.equal(loaded(x, y), cm(x, y))
    with pytest.raises(ValueError, match=r"input 1 dim 0 must equal input 0 dim 0"):
        loaded(x, torch.randn(5, 16))


def test_input_guards_saved_with_fixed_shapes_still_check():
    """Files saved before dims could be dynamic hold one int per dim."""
    from sparsec.runtime.guard import InputGuard

    guard = InputGuard([(2, 5, 32), None])
    guard(torch.zeros(2, 5, 32), 3.0)
    with pytest.raises(ValueError, match=r"\[\(2, 5, 32\), -\]: input 0 dim 1 is fixed at 5, got 6"):
        guard(torch.zeros(2, 6, 32), 3.0)


class CountingStage(nn.Module):
    """Counts its calls in a buffer, in Python code symbolic_trace cannot record."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.fc(x))


def _counting_model():
    return nn.Sequential(nn.Linear(64, 64), CountingStage(), nn.BatchNorm1d(64), nn.Linear(64, 4)).train()


def test_a_buffer_update_the_graph_would_lose_is_reported_not_dropped_silently():
    model, x = _counting_model(), torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"updates buffer \['1.calls'\] in Python code that torch.fx does not record"):
        cm = sparsec.compile(model, example_inputs=(x,))
    assert any("1.calls" in note for note in cm.plan.notes) and "1.calls" in str(cm.plan)
    assert float(model[1].calls) == 0 and float(model[2].num_batches_tracked) == 0  # the user's model untouched
    # the remedy the note names: a leaf module keeps its update; BatchNorm's running stats never needed one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "sparsec.compile: no layer was made sparse")  # (its layers are small)
        kept = sparsec.compile(model, example_inputs=(x,), leaf_modules=["1"])
    assert not kept.plan.notes
    kept(x)
    counters = dict(kept.named_buffers())
    assert [float(v) for k, v in counters.items() if k.endswith("1.calls")] == [1.0]


class CountsItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps += 1
        return self.fc(x)


def test_a_buffer_update_in_the_models_own_forward_is_not_sent_to_leaf_modules_alone():
    """The remedy named only leaf_modules=['its.name'], which cannot hold the model itself: an update in its own
    forward can only move out of it."""
    with pytest.warns(UserWarning, match=r"an update in the model's own forward can only move out of it"):
        sparsec.compile(CountsItself(), example_inputs=(torch.randn(2, 64),), pattern="dense")


class EmaStage(nn.Module):
    """Keeps an EMA of its activations: `self.ema.mul_(0.9)` has no proxy among its arguments, so it runs on
    the buffer while tracing and is not in the graph (the add_ after it, which reads h, is)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("ema", torch.zeros(64))

    def forward(self, x):
        h = torch.relu(self.fc(x))
        self.ema.mul_(0.9).add_(0.1 * h.mean(0).detach())
        return h + self.ema


def test_a_buffer_update_lost_only_from_the_second_call_on_is_reported():
    # From a zero EMA, the graph's first call agrees with the model (0.9 * 0 == 0), so comparing the buffers
    # after one example run saw nothing; the second call differs. It was compiled without a word.
    model, x = nn.Sequential(nn.Linear(64, 64), EmaStage(), nn.Linear(64, 4)), torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"updates buffer \['1.ema'\] in Python code that torch.fx does not record"):
        cm = sparsec.compile(model, example_inputs=(x,), pattern="dense")
    with torch.no_grad():  # what the note warns of, against the model itself
        cm(x), model(x)
        assert output_error(cm(x), model(x)) > 1e-3
    # the remedy the note names keeps the update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = sparsec.compile(model, example_inputs=(x,), pattern="dense", leaf_modules=["1"])
    with torch.no_grad():
        for _ in range(3):
            assert output_error(kept(x), model(x)) <= 1e-6


class LazyTable(nn.Module):
    """Fills a buffer once, on its first call: done while tracing, the graph reads the filled buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.register_buffer("table", torch.zeros(64))
        self.register_buffer("ready", torch.tensor(False))

    def forward(self, x):
        if not self.ready:
            self.table.copy_(torch.linspace(-1, 1, 64))
            self.ready.fill_(True)
        return self.fc(x) * self.table


def test_a_buffer_filled_once_while_tracing_is_not_reported_as_a_lost_update():
    model, x = nn.Sequential(nn.Linear(64, 64), LazyTable(), nn.Linear(64, 4)), torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = sparsec.compile(model, example_inputs=(x,))
    assert not cm.plan.notes
    ref = pruned_model(model, cm.plan)
    with torch.no_grad():
        for _ in range(2):
            assert output_error(cm(x), ref(x)) <= 1e-5


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_forward_set_on_the_model_instance_is_refused():
    model = _TwoLayers()
    model.forward = lambda x: model.a(x) * 2  # tracing would record _TwoLayers.forward instead
    with pytest.raises(TraceError, match=r"model.forward is set on the instance .* records the class's forward "
                                         r"\(_TwoLayers.forward\)"):
        sparsec.compile(model, example_inputs=(torch.randn(2, 16),))


def test_hooks_on_the_model_itself_are_named():
    model = _TwoLayers()
    model.register_forward_hook(lambda module, args, out: out * 3)
    with pytest.warns(UserWarning, match=r"the model's own forward hooks are not part of the compiled model"):
        cm = sparsec.compile(model, example_inputs=(torch.randn(2, 16),), pattern="dense")
    assert any("forward hooks" in note for note in cm.plan.notes)


def test_layers_with_hooks_or_an_instance_forward_stay_dense_and_keep_them():
    model = _TwoLayers().eval()
    model.b.register_forward_hook(lambda module, args, out: out * 3)
    model.c.forward = types.MethodType(lambda self, x: F.linear(x, self.weight) - 1, model.c)
    x = torch.randn(4, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a"])
    assert cm.plan["a"].sparsity == "2:4"
    assert cm.plan["b"].sparsity is None and "forward hooks, which a sparse replacement would drop" in cm.plan["b"].reason
    assert cm.plan["c"].sparsity is None and "forward is set on the instance" in cm.plan["c"].reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5  # the hook and the forward still run


class _OptionalInputs(nn.Module):
    """An optional mask tested against None, a bool switch, and a float scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x, mask=None, scale: float = 1.0, residual: bool = False):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        if mask is not None:
            h = h * mask
        if residual:
            h = h + torch.relu(self.a(x))
        return self.c(h) * scale


@pytest.mark.parametrize("example", ["x", "x, mask", "x, None, 2.0, True"])
def test_none_and_bool_arguments_are_traced_as_the_values_they_have(example):
    """As graph inputs, `mask is not None` was always true (compile failed: "the example inputs do not fit")
    and `if residual:` could not be traced; as values, the graph follows the example's path and
    refuses a call that takes another."""
    torch.manual_seed(0)
    model, x, mask = _OptionalInputs().eval(), torch.randn(4, 12), torch.rand(4, 64)
    inputs = {"x": (x,), "x, mask": (x, mask), "x, None, 2.0, True": (x, None, 2.0, True)}[example]
    cm = sparsec.compile(model, example_inputs=inputs, min_weights=0)
    assert cm.trace_method == "symbolic_trace"
    reference = pruned_model(model, cm.plan)
    with torch.no_grad():
        assert output_error(cm(*inputs), reference(*inputs)) <= 1e-5
        scaled = (*inputs[:2], 3.0) if len(inputs) > 1 else (x, None, 3.0)  # the float stays a graph input
        if len(inputs) == 4:
            scaled = (*scaled, True)
        assert output_error(cm(*scaled), reference(*scaled)) <= 1e-5
        if example == "x, mask":
            assert output_error(cm(x, mask=mask), reference(x, mask=mask)) <= 1e-5  # keyword names kept
        else:
            with pytest.raises(ValueError, match="mask has been specialized to have value None.*pass in example_inputs"):
                cm(x, mask=mask)
    if example != "x, None, 2.0, True":
        with pytest.raises(ValueError, match="residual has been specialized to have value False"):
            cm(x, residual=True)


def test_export_refuses_a_non_tensor_input_other_than_the_one_it_baked_in():
    """torch.export holds a float input's value in the graph: another value computed silently with
    the example's before the guard checked it."""
    class Scaled(_OptionalInputs):
        def forward(self, x, scale: float = 1.0):
            h = torch.relu(self.b(torch.relu(self.a(x)))).clone()
            h[:, 0] = 0.0  # item assignment: symbolic_trace fails
            return self.c(h) * scale

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(4, 12)
    cm = sparsec.compile(model, example_inputs=(x, 2.0), min_weights=0)
    assert cm.trace_method == "torch.export"
    assert output_error(cm(x, 2.0), pruned_model(model, cm.plan)(x, 2.0)) <= 1e-5
    with pytest.raises(ValueError, match=r"input 1 is fixed at 2.0 \(not a tensor: the graph holds its value\), got 3.0"):
        cm(x, 3.0)
    with pytest.raises(ValueError, match=r"input 1 is fixed at 2.0 .*, got 2\. Call it"):
        cm(x, 2)  # an int where the graph was traced with a float


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.blocks, self.out = nn.Linear(16, 64), nn.ModuleList([Block(), Block()]), nn.Linear(64, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.out(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_an_inference_compile_drops_is_named(reentrant):
    """An inference compile runs through torch.utils.checkpoint: the compiled model computes the same,
    with all activations kept; a warning and the plan's notes say which modules lost their checkpointing.
    (train=True keeps it: tests/test_checkpointing.py.)"""
    torch.manual_seed(0)
    model, x = _Checkpointed(reentrant), torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match=r"runs blocks.0, blocks.1 under torch.utils.checkpoint, which an inference "
                                         r"compile does not keep"):
        cm = sparsec.compile(model, example_inputs=(x,), pattern="dense")
    assert any("torch.utils.checkpoint" in note for note in cm.plan.notes)
    assert "checkpoint" not in cm.graph_module.code
    cm(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    model(x2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


class _MaskedAttention(nn.Module):
    """An optional mask handed on to attention: None and a tensor both work there."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.head = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x, attn_mask=None, causal: bool = False):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.head(torch.relu(self.out(y)))


def test_a_none_argument_passed_on_stays_a_graph_input():
    """Compiled without a mask, called with one: the graph takes any value where the model hands the
    argument on (it would assert None if it were taken as a value); a bool used in Python is one."""
    torch.manual_seed(0)
    model, x = _MaskedAttention().eval(), torch.randn(2, 6, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.trace_method == "symbolic_trace"
    reference = pruned_model(model, cm.plan)
    mask = torch.rand(6, 6) > 0.3
    with torch.no_grad():
        assert output_error(cm(x), reference(x)) <= 1e-5
        assert output_error(cm(x, mask), reference(x, mask)) <= 1e-5
        assert output_error(cm(x, attn_mask=mask), reference(x, attn_mask=mask)) <= 1e-5


@pytest.mark.parametrize("options", [{}, {"train": True}, {"pattern": "fanin:0.9"}])
def test_compiling_leaves_the_random_stream_where_it_was(options):
    """Compiling runs the model (shapes; checks of the traced graph) with dropout in train mode, and
    times candidates on random inputs (fan-in on CPU): the user's next random numbers are still the
    ones they would have had without compiling (dropout and timing inputs drew from them)."""
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 64), nn.Linear(64, 4)).train()
    for target, example in [(model, (torch.randn(2, 32),)), (_MaskedAttention().train(), (torch.randn(2, 6, 32),))]:
        state = torch.get_rng_state()
        sparsec.compile(target, example_inputs=example, min_weights=0, **options)
        assert torch.equal(torch.get_rng_state(), state), type(target).__name__


class FunctionalDropout(nn.Module):
    """Reads self.training in its own code, as nanoGPT's attention does: symbolic_trace fixes the value."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.c(F.dropout(h, 0.5, training=self.training))


def test_a_graph_that_fixes_the_train_eval_mode_refuses_to_switch(tmp_path):
    """A forward reading self.training is traced in the mode the model had: the plan says so, and the
    switch the graph would ignore (cm.eval() on a graph that keeps dropout on) is refused, also after
    save / load; a model whose mode only leaf modules read (nn.Dropout, BatchNorm) switches and computes
    each mode."""
    x = torch.randn(8, 16)
    model = FunctionalDropout()  # training mode, as built
    with pytest.warns(UserWarning, match="holds for training mode only"):
        cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert any("its forward reads self.training" in note for note in cm.plan.notes)
    cm.train()  # the mode it has: fine
    with pytest.raises(ValueError, match=r"traced in training mode and fixes it .* sparsec.compile\(model.eval\(\)"):
        cm.eval()
    sparsec.save(cm, tmp_path / "m")
    with pytest.raises(ValueError, match="traced in training mode"):
        sparsec.load(tmp_path / "m").eval()
    with pytest.warns(UserWarning, match="the compiled graph it was traced from fixed it"):
        again = sparsec.compile(cm, example_inputs=(x,), min_weights=0)  # its graph reads no flag: it inherits
    with pytest.raises(ValueError, match="traced in training mode"):
        again.eval()
    inference = sparsec.compile(model.eval(), example_inputs=(x,), min_weights=0)
    with torch.no_grad():
        assert output_error(inference(x), pruned_model(model, inference.plan)(x)) <= 1e-5
    with pytest.raises(ValueError, match="traced in eval mode"):
        inference.train()
    leaves = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Dropout(0.5), nn.Linear(64, 64), nn.Linear(64, 4))
    cm = sparsec.compile(leaves, example_inputs=(x,), min_weights=0)
    assert not any("holds for" in note for note in cm.plan.notes)
    cm.eval()
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(leaves, cm.plan).eval()(x)) <= 1e-5


def test_a_call_the_graph_cannot_take_names_what_was_fixed():
    """Arguments left at their defaults (or None) are fixed at the example's values: a call that passes
    them gets an error saying so, not a bare TypeError from generated code."""
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)

        def forward(self, x, mask=None):
            h = self.a(x)
            if mask is not None:
                h = h * mask
            return self.b(h)

    x = torch.randn(2, 16)
    cm = sparsec.compile(WithMask(), example_inputs=(x,), min_weights=0)
    with pytest.raises(ValueError, match="specialized to have value None.*pass in example_inputs \(or by name in example_kwargs\) every argument"):
        cm(x, torch.ones(2, 64))
    with pytest.raises(TypeError, match=r"this compiled model takes forward\(.*does not fit it"):
        cm(x, torch.ones(2, 64), 3)
    masked = sparsec.compile(WithMask(), example_inputs=(x, torch.ones(2, 64)), min_weights=0)
    with pytest.raises(TypeError, match="passing None for mask.*with a tensor where you will pass one"):
        masked(x)


def test_example_inputs_changed_in_place_by_the_forward_are_not_the_users():
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(self, x):
            x.mul_(2)
            return self.c(self.b(self.a(x)))

    model, x = Doubling(), torch.randn(2, 16)
    before = x.clone()
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert torch.equal(x, before)
    with torch.no_grad():
        assert output_error(cm(x.clone()), pruned_model(model, cm.plan)(x.clone())) <= 1e-5


class ParameterNorm(nn.Module):
    """Adds a penalty computed from self.parameters(): symbolic_trace runs it on the tensors themselves."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        penalty = sum(p.pow(2).sum() for p in self.b.parameters())
        return self.c(h + 1e-3 * penalty)


def test_a_weight_computed_with_while_tracing_keeps_its_layer_dense(tmp_path):
    """The penalty is a graph constant of b's values at compile time: pruning b would leave it stale.
    b stays dense with the op and the user's line, the other layers are pruned, the mode is not
    mistaken as fixed (each trace names its constant afresh), and a second compile (also of a saved
    and loaded model, whose graph holds the constant) keeps b dense."""
    model, x = ParameterNorm().eval(), torch.randn(3, 16)
    with pytest.warns(UserWarning, match="computed with parameters b.weight, b.bias while it was traced"):
        cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"])
    reason = cm.plan["b"].reason
    assert cm.plan["b"].sparsity is None and "Tensor.pow at" in reason and "p.pow(2).sum() for p in" in reason
    assert cm.plan["a"].sparsity == "2:4" and cm.plan["c"].sparsity == "2:4"
    assert not any("holds for" in note for note in cm.plan.notes)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    sparsec.save(cm, tmp_path / "m")
    for compiled in (cm, sparsec.load(tmp_path / "m")):
        again = sparsec.compile(compiled, example_inputs=(x,), min_weights=0, include=["b"])
        assert again.plan["b"].sparsity is None and "while it was traced" in again.plan["b"].reason


def test_shape_dtype_and_device_reads_while_tracing_do_not_keep_layers_dense():
    class ReadsMetadata(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4)

        def forward(self, x):
            first = next(self.parameters())
            width = sum(p.shape[0] for p in self.parameters() if p.dim() == 2)
            return self.b(self.a(x.to(first.dtype).to(first.device))) * (width / 68)

    model, x = ReadsMetadata(), torch.randn(3, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b"])
    assert cm.plan["a"].sparsity == "2:4" and cm.plan["b"].sparsity == "2:4", cm.plan
    assert not any("while it was traced" in note for note in cm.plan.notes)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class ExportOnlyBlock(nn.Module):
    """Dropout and BatchNorm behind a branch on a shape (symbolic_trace fails, torch.export runs it)."""

    def __init__(self, scaled_in_training: bool = False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.bn, self.drop = nn.BatchNorm1d(64), nn.Dropout(0.5)
        self.scaled_in_training = scaled_in_training

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 1.0
        h = self.drop(torch.relu(self.bn(self.a(x))))
        if self.scaled_in_training and self.training:  # a mode dependence export can only fix
            h = h * 2
        return self.c(self.b(h))


@pytest.mark.parametrize("start", ["train", "eval"])
def test_an_exported_graph_follows_train_and_eval_where_the_model_allows(start):
    """torch.export writes the mode into dropout and batch norm; compiled in either mode, the graph reads
    cm's own flag instead: eval uses running statistics and no dropout, train updates the statistics and
    BatchNorm's batch counter as the model does."""
    torch.manual_seed(0)
    model, x = ExportOnlyBlock().train(start == "train"), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"])
    assert cm.trace_method == "torch.export" and cm.training == (start == "train")
    assert not any("mode only" in note for note in cm.plan.notes), cm.plan.notes
    reference = pruned_model(model, cm.plan)
    with torch.no_grad():
        cm.eval(), reference.eval()
        assert output_error(cm(x), reference(x)) <= 1e-5 and torch.equal(cm(x), cm(x))
        cm.train(), reference.train()
        before = reference.bn.num_batches_tracked.clone()
        torch.manual_seed(1)
        got = cm(x)
        torch.manual_seed(1)
        assert output_error(got, reference(x)) <= 1e-5
        bn = cm.graph_module.get_submodule("bn")
        assert torch.allclose(bn.running_mean, reference.bn.running_mean, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(reference.bn.num_batches_tracked) == int(before) + 1
        cm.eval()
        cm(x)
        assert int(bn.num_batches_tracked) == int(before) + 1


def test_an_exported_graph_that_reads_the_mode_otherwise_stays_fixed():
    model, x = ExportOnlyBlock(scaled_in_training=True).eval(), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert any("holds for eval mode only" in note and "other ways than dropout and batch norm" in note
               for note in cm.plan.notes), cm.plan.notes
    with pytest.raises(ValueError, match="traced in eval mode"):
        cm.train()


@pytest.mark.parametrize("case", ["MC dropout", "frozen batch norm"])
def test_an_exported_graph_with_a_layer_in_the_other_mode_refuses_train_and_eval(case, tmp_path):
    """A dropout kept on in an eval model (MC dropout), a batch norm frozen in a training one: torch.export
    writes each layer's mode into the graph, the same in both exports, so reading cm's flag switched the
    others and left these: cm.eval() / cm.train() then computed what the model in that mode does not
    (0.27 / 0.29 off). The graph keeps its modes; both switches are refused, naming the layers, also after
    save / load and a compile of the compiled model."""
    torch.manual_seed(0)
    model, x = ExportOnlyBlock(), torch.randn(8, 16)
    if case == "MC dropout":
        model.eval()
        model.drop.train()
    else:
        model.train()
        model.bn.eval()
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"])
    assert cm.trace_method == "torch.export"
    layer = "drop" if case == "MC dropout" else "bn"
    assert any(f"['{layer}'] runs in" in note and "cm.train() and cm.eval() are refused" in note
               for note in cm.plan.notes), cm.plan.notes
    reference = pruned_model(model, cm.plan)
    with torch.no_grad():
        torch.manual_seed(1)
        got = cm(x)
        torch.manual_seed(1)
        assert output_error(got, reference(x)) <= 1e-5
    sparsec.save(cm, tmp_path / "m.sparsec")
    again = sparsec.compile(cm, example_inputs=(x,), min_weights=0)
    for compiled in (cm, sparsec.load(tmp_path / "m.sparsec"), again):
        for switch in (compiled.train, compiled.eval):
            with pytest.raises(ValueError, match=rf"holds layers \['{layer}'\] in the other mode"):
                switch()


class ModeFreeNorm(nn.Module):
    """A batch norm without running statistics (batch statistics in both modes) and F.dropout(training=True):
    their ops take a constant that is not the model's mode, and compute the same in both modes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.norm = nn.BatchNorm1d(64, track_running_stats=False)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 1.0
        h = F.dropout(self.norm(self.a(x)), 0.0, training=True)
        return self.c(self.b(h))


@pytest.mark.parametrize("start", ["train", "eval"])
def test_an_exported_op_whose_constant_is_not_the_mode_does_not_fix_the_graph(start):
    """Only a layer whose own flag differs from the model's fixes the graph's modes: the first version of that
    check read the op's constant, and refused cm.eval() on this eval model (a no-op)."""
    torch.manual_seed(0)
    model, x = ModeFreeNorm().train(start == "train"), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"])
    assert cm.trace_method == "torch.export"
    assert not any("other mode" in note for note in cm.plan.notes), cm.plan.notes
    reference = pruned_model(model, cm.plan)
    for switch in ("eval", "train"):
        getattr(cm, switch)(), getattr(reference, switch)()
        with torch.no_grad():
            assert output_error(cm(x), reference(x)) <= 1e-5


def _train_two_steps(cm, x) -> None:
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        cm(x).square().mean().backward()
        opt.step()


def test_a_trained_exported_model_compiles_again_for_inference():
    """The compiled graph is traced again (sparsec's input check and layers are leaves): its trained layers
    stay in the plan with their learned masks, and cm.eval() is allowed before it."""
    torch.manual_seed(0)
    model, x = ExportOnlyBlock().train(), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"], train=True)
    _train_two_steps(cm, x)
    cm.eval()
    inference = sparsec.compile(cm, example_inputs=(x,), min_weights=0)
    assert not inference.training
    for name in ("a", "b", "c"):
        assert inference.plan[name].sparsity == "2:4" and "learned in training" in inference.plan[name].reason
        assert torch.equal(inference.mask(name), cm.mask(name))
    with torch.no_grad():
        assert output_error(inference(x), cm(x)) <= 1e-5


class RegionBlock(nn.Module):
    """A torch.no_grad() / torch.autocast region in forward, which torch.export captures as a higher-order op
    (wrap_with_set_grad_enabled / wrap_with_autocast) calling a submodule."""

    def __init__(self, region: str):
        super().__init__()
        self.region = region
        self.a, self.b, self.c, self.d = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        h = self.a(x)
        if self.region == "no_grad":
            with torch.no_grad():
                h = h + h.mean()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = (h * 2).float()
        return self.d(self.c(torch.relu(self.b(h))))


@pytest.mark.parametrize("region", ["no_grad", "autocast"])
@pytest.mark.parametrize("train", [False, True])
def test_an_exported_graph_with_a_grad_or_autocast_region_compiles_again_keeping_its_sparse_layers(region, train):
    """Compiled again, the graph's own code is traced: the region's higher-order op ran its body under its own
    grad mode, which the trace refuses, so the compile fell back to torch.export, which inlined the packed and
    trainable layers: a model trained sparse came out of its inference compile dense, its learned masks gone."""
    torch.manual_seed(0)
    model, x = RegionBlock(region), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["b", "c"], train=train)
    assert cm.trace_method == "torch.export"
    if train:
        _train_two_steps(cm, x)
        cm.eval()
    again = sparsec.compile(cm, example_inputs=(x,), min_weights=0)
    assert again.trace_method == "symbolic_trace"
    for name in ("b", "c"):
        assert again.plan[name].sparsity == "2:4"
        assert torch.equal(again.mask(name), cm.mask(name))
    with torch.no_grad():
        assert output_error(again(x), cm(x)) <= 1e-5


def test_converting_an_exported_graph_that_holds_its_dtype_is_refused():
    """torch.export writes the example's dtypes into its graph (`g.to(h.dtype)` as float32, autocast checks):
    cm.double() was accepted, and the call then failed with "Tensor dtype mismatch! Expected: BFloat16, Got:
    double". Refused before converting, naming the op; an exported graph without such constants converts."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    cm = sparsec.compile(RegionBlock("autocast"), example_inputs=(x,), min_weights=0, include=["b", "c"])
    assert cm.trace_method == "torch.export"
    with pytest.raises(ValueError, match=r"holds the dtype float32 as a constant \(aten\."):
        cm.double()
    assert all(p.dtype == torch.float32 for p in cm.parameters())
    model = ExportOnlyBlock().eval()
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b", "c"]).double()
    with torch.no_grad():
        assert output_error(cm(x.double()), pruned_model(model, cm.plan).double()(x.double())) <= 1e-12


@pytest.mark.parametrize("train", [False, True])
def test_a_batchnorm_frozen_in_eval_inside_a_training_model_stays_frozen(train):
    """Fine-tuning with frozen BatchNorm (model.train(); bn.eval()): the compiled model keeps each
    module's flag, so bn goes on normalizing with its running statistics and never updates them (the
    graph was switched to training as a whole: batch statistics, and the running ones overwritten)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[1].eval()
    cm = sparsec.compile(model, example_inputs=(torch.randn(4, 16),), min_weights=0, train=train)
    bn = cm.graph_module.get_submodule("1")
    assert cm.training and not bn.training
    running = bn.running_mean.clone()
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert torch.equal(bn.running_mean, running)


class _ReverseGrad(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): forward is the identity, backward negates."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _Reversal(nn.Module):
    def forward(self, x):
        return _ReverseGrad.apply(x)


class _Adversarial(nn.Module):
    def __init__(self, untraceable=False):
        super().__init__()
        torch.manual_seed(0)
        self.untraceable = untraceable
        self.a, self.rev, self.c = nn.Linear(32, 32), _Reversal(), nn.Linear(32, 8)

    def forward(self, x):
        if self.untraceable:
            int(x.shape[0])  # symbolic_trace cannot: torch.export traces it
        return self.c(self.rev(torch.relu(self.a(x))))


def _grads(module):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_an_autograd_function_traced_through_is_noted_when_training(untraceable):
    # both tracers run a Function's forward ops and drop its backward: a gradient reversal trained
    # the compiled model with the gradient's sign flipped, without a word
    model, x = _Adversarial(untraceable), torch.randn(4, 32)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True)
    assert any("_ReverseGrad" in note and "custom backward" in note for note in cm.plan.notes)
    cm(x).sum().backward()
    model(x).sum().backward()
    assert not torch.allclose(_grads(cm)[0], _grads(model)[0])  # what the note warns of
    # an inference compile computes the forward exactly: nothing to say
    assert not any("_ReverseGrad" in note for note in sparsec.compile(model, example_inputs=(x,)).plan.notes)


def test_the_remedy_for_an_autograd_function_keeps_its_backward():
    model, x = _Adversarial(), torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True, leaf_modules=["rev"])
    cm(x).sum().backward()
    model(x).sum().backward()
    for got, expected in zip(_grads(cm), _grads(model), strict=True):
        torch.testing.assert_close(got, expected)


def test_a_failing_probe_run_of_the_traced_graph_prints_nothing(capfd):
    """The graph traced with `mask` as an input fails on mask=None (`b * mask`), and capture then traces
    with None fixed: a normal path, which printed fx's whole 'Call using an FX-traced Module' traceback."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x, mask=None):
            h = self.b(torch.relu(self.a(x)))
            if mask is not None:
                h = h * mask
            return self.c(h)

    model, x = Masked(), torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, backend="torch")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FX-traced Module" not in err, err
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class _EvenBatchBranch(nn.Module):
    """Branches on a size in a way that is not a range: torch.export records `x.shape[0] % 2 == 0`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        y = self.a(x)
        return y + 1 if x.shape[0] % 2 == 0 else y


def test_an_exported_graph_refuses_sizes_its_code_branched_on_otherwise(tmp_path):
    """sparsec replaced torch.export's guard by a range check: a batch of 3 ran the branch taken for 4."""
    model = _EvenBatchBranch()
    cm = sparsec.compile(model, pattern="dense", example_inputs=(torch.randn(4, 16),))
    assert cm.trace_method == "torch.export"
    sparsec.save(cm, tmp_path / "m")
    for compiled in (cm, sparsec.load(tmp_path / "m")):
        x = torch.randn(6, 16)
        assert torch.allclose(compiled(x), model(x), atol=1e-6)  # another even size: the same graph holds
        with pytest.raises(ValueError, match=r"% 2\) == 0.*input 0 dim 0 = 3"):
            compiled(torch.randn(3, 16))


def test_a_size_condition_that_cannot_be_evaluated_fails_with_the_guard_message():
    """A condition dividing by a size whose range allows 0 raised ZeroDivisionError from the guard's
    generated code; it now counts as failed, and the others are still checked one by one."""
    from sparsec.runtime.guard import ShapeGuard

    guard = ShapeGuard([(("s0", 0, None), ("s1", 0, None))], ["s0 % s1 == 0", "s0 >= s1"])
    guard(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"where s0 % s1 == 0 \(.*s1 = input 0 dim 1 = 0"):
        guard(torch.zeros(4, 0))
    with pytest.raises(ValueError, match=r"where s0 % s1 == 0 and s0 >= s1 "):
        guard(torch.zeros(3, 4))


class _GradAndAutocastRegions(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen, self.low, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        with torch.no_grad():
            x = self.frozen(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = self.low(x)
        return self.head(x.float()), x


def test_no_grad_and_autocast_regions_in_forward_are_kept():
    """symbolic_trace records ops, not the grad / autocast mode they ran in: the frozen layer got
    gradients and the autocast layer ran in float32."""
    model, x = _GradAndAutocastRegions(), torch.randn(2, 16)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,))
    (out, low), (expected, expected_low) = cm(x), model(x)
    assert low.dtype == expected_low.dtype == torch.bfloat16 and torch.equal(low, expected_low)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    grads = {name.removeprefix("graph_module."): p.grad is not None for name, p in cm.named_parameters()}
    assert grads == {"frozen.weight": False, "frozen.bias": False, "low.weight": True, "low.bias": True,
                     "head.weight": True, "head.bias": True}


def test_a_random_draw_of_fixed_shape_is_drawn_on_every_call():
    """torch.randn(16) reads no traced value: symbolic_trace ran it once and kept the draw as a constant."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) + torch.randn(16)

    model, x = Noisy(), torch.randn(2, 16)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,))
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = model(x)
        torch.manual_seed(seed)
        assert torch.allclose(cm(x), expected, atol=1e-6)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.calls, self.previous = 0, None

    def forward(self, x):
        self.calls += 1
        y = self.a(x) * self.calls
        if self.previous is not None:
            y = y + self.previous
        self.previous = y.detach()  # a graph value while traced: it leaked into later runs
        return y


def test_python_state_the_forward_changes_on_every_call_is_named():
    """A counter and a cache kept as module attributes: the graph neither updates nor reads them anew.
    They were passed over (or the cache crashed compile with an AttributeError on `_tensor_constant0`),
    and the counter, traced again in the other mode, claimed the forward read self.training."""
    model, x = _Counting(), torch.randn(2, 16)
    with pytest.warns(UserWarning, match=r"changes attributes \['calls', 'previous'\] in Python code on every call"):
        cm = sparsec.compile(model, pattern="dense", example_inputs=(x,))
    assert not any("self.training" in note for note in cm.plan.notes)
    assert model.calls == 0 and model.previous is None  # the user's model untouched
    assert torch.allclose(cm(x), model(x), atol=1e-6)  # right for the first call, as the note says


class SumsAList(nn.Module):
    """Takes a list of tensors; a branch on a size makes it torch.export's to capture."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, xs):
        h = sum(self.a(x) for x in xs)
        if h.shape[0] > 1:
            h = h * 1.0
        return self.c(self.b(h))


def test_a_list_input_of_another_length_is_refused_not_cut(tmp_path):
    """torch.export's graph flattens a call's inputs by the example's structure: compiled with [x, x] and
    called with [x, x, x] it summed the first two, silently (and [x] raised an IndexError). Also after
    save / load."""
    from sparsec.errors import InvalidInputError

    torch.manual_seed(0)
    model, x = SumsAList().eval(), torch.randn(3, 16)
    cm = sparsec.compile(model, example_inputs=([x, x],), min_weights=0)
    assert cm.trace_method == "torch.export"
    with torch.no_grad():
        assert output_error(cm([x, 2 * x]), pruned_model(model, cm.plan)([x, 2 * x])) <= 1e-5
    sparsec.save(cm, tmp_path / "m.sparsec")
    for compiled in (cm, sparsec.load(tmp_path / "m.sparsec")):
        for wrong in ([x, x, x], [x]):
            with pytest.raises(InvalidInputError, match=f"inputs holding 2 values in all .*got {len(wrong)}"):
                compiled(wrong)


class HalvesItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        with torch.no_grad():
            self.b.weight.mul_(0.5)  # a parameter written in place on every call
        return self.c(self.b(self.a(x)))


def test_a_forward_that_writes_its_parameters_is_refused():
    """sparsec's tracing and example runs wrote the copy's weights (b.weight halved once per run), which it
    then pruned and compiled: outputs were wrong from the first call, silently. Refused, naming the
    parameter (not as an example-input problem); the user's model is untouched. Modules that write their
    own weights as the graph does too (nn.Embedding with max_norm), and a model made under
    torch.inference_mode (its tensors count no writes), compile."""
    from sparsec.errors import ParameterWriteError

    torch.manual_seed(0)
    model = HalvesItsWeight()
    before = model.b.weight.detach().clone()
    with pytest.raises(ParameterWriteError, match=r"writes parameters \['b.weight'\] in place"):
        sparsec.compile(model, example_inputs=(torch.randn(3, 16),), min_weights=0)
    assert torch.equal(model.b.weight, before)
    embedded = nn.Sequential(nn.Embedding(50, 16, max_norm=1.0), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    tokens = torch.randint(0, 50, (3, 5))
    cm = sparsec.compile(embedded, example_inputs=(tokens,), min_weights=0)
    with torch.no_grad():
        assert output_error(cm(tokens), pruned_model(embedded, cm.plan)(tokens)) <= 1e-5
    with torch.inference_mode():
        made = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
        sparsec.compile(made, example_inputs=(torch.randn(3, 16),), min_weights=0)


class InferenceModeInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.m = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        with torch.inference_mode():
            g = self.l(x)
        return self.m(x) * g.clone()


def test_torch_inference_mode_inside_forward_is_refused_naming_no_grad():
    """torch.fx refuses it (a grad mode of its own), and torch.export does not record it: the compiled model
    computed that code with gradients and trained l, which the model never does. Refused, naming the line
    and torch.no_grad(), which export records; compiling under an outer inference_mode still works."""
    model, x = InferenceModeInside(), torch.randn(4, 8)
    with pytest.raises(TraceError, match=r"runs ops under torch.inference_mode\(\) \(.*test_frontend.py:\d+ in forward: "
                                         r"g = self.l\(x\)\).*use torch.no_grad\(\) there"):
        sparsec.compile(model, example_inputs=(x,), pattern="dense", train=True)
    with torch.inference_mode():
        cm = sparsec.compile(model, example_inputs=(x,), pattern="dense")
        torch.testing.assert_close(cm(x), model(x))


class InferenceTensorFedOn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        with torch.inference_mode():
            h = self.a(x)
        return self.b(h)  # an inference tensor into an op that saves it for backward: export itself fails


@pytest.mark.parametrize("train", [False, True])
def test_inference_mode_whose_result_feeds_later_ops_is_named_not_export_s_error(train):
    """When torch.export fails after the region ("Inference tensors cannot be saved for backward"), the
    error still names torch.inference_mode() and its line (it named torch.fx's no_grad / autocast first and
    then export's error, not the cause), and each capture's message names inference_mode, not no_grad."""
    model, x = InferenceTensorFedOn(), torch.randn(4, 8)
    with pytest.raises(TraceError, match=r"^the forward runs ops under torch.inference_mode\(\) \(.*test_frontend.py:\d+ in "
                                         r"forward: h = self.a\(x\)\).*use torch.no_grad\(\) there.*Inference tensors"):
        sparsec.compile(model, example_inputs=(x,), pattern="dense", train=train)
    with torch.inference_mode():  # the remedy the message gives
        cm = sparsec.compile(model, example_inputs=(x,), pattern="dense")
        torch.testing.assert_close(cm(x), model(x))


def test_symbolic_trace_names_inference_mode_as_the_mode_it_does_not_record():
    """(Seen in the plan's trace note, or with export's own error when both fail.)"""
    from sparsec.fx_tracer import Tracer

    with pytest.raises(TraceError, match=r"calls l under torch.inference_mode\(\) of its own") as info:
        Tracer().trace(InferenceModeInside())
    assert "no_grad" not in str(info.value)


class ScalesByMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        scale = torch.tensor(2.0) if self.training else torch.tensor(1.0)  # a tensor constant per mode
        return self.b(self.a(x)) * scale


def test_a_tensor_constant_that_depends_on_the_mode_fixes_the_mode():
    """The train / eval check traces again in the other mode and compares the tensor constants: the
    second trace reused the first's constant names, and both sides read the first's values, so the
    dependence went unseen and cm.eval() silently computed train-mode outputs."""
    torch.manual_seed(0)
    model, x = ScalesByMode().train(), torch.randn(4, 16)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,))
    assert cm.trace_method == "symbolic_trace" and cm.graph_module.fixed_training is True
    with pytest.raises(Exception, match="cannot switch it"):
        cm.eval()


def test_fxs_own_tensor_constants_are_not_named_as_the_models_state():
    """A constant built in forward (torch.arange) is set on the root as _tensor_constant0 while tracing:
    without example inputs that was named as Python state the forward changes."""
    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(self.a(x) + torch.arange(16))

    for inputs in (None, (torch.randn(2, 16),)):
        cm = sparsec.compile(Offsets(), pattern="dense", example_inputs=inputs)
        assert not [note for note in cm.plan.notes if "changes attribute" in note], cm.plan.notes


class _LazyAttribute(nn.Module):
    """Keeps a table of positions in a plain attribute, made on its first call (as rotary-embedding caches do)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.arange(16, dtype=x.dtype)
        return self.a(x) + self.table


def test_an_attribute_set_once_is_not_named_as_changed_on_every_call():
    """A lazy initialisation changes its attribute on the first call only: the note said the forward
    changed it "on every call (a counter, a cache)"; a second example run now tells the two apart."""
    model, x = _LazyAttribute(), torch.randn(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note at all
        cm = sparsec.compile(model, pattern="dense", example_inputs=(x,))
    assert not any("on every call" in note for note in cm.plan.notes)
    assert model.table is None  # the user's model untouched
    assert torch.allclose(cm(x), model(x), atol=1e-6)


@dataclasses.dataclass
class _Logits:
    logits: torch.Tensor
    hidden: torch.Tensor


class _DataclassThroughExport(nn.Module):
    """Returns a plain dataclass, and needs torch.export (no_grad inside forward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        with torch.no_grad():
            scale = x.abs().amax()
        h = F.relu(self.b(F.relu(self.a(x / scale))))
        return _Logits(self.c(h), h)


def test_a_dataclass_output_export_cannot_flatten_names_the_registration_that_fixes_it():
    """The error quoted torch's "not a known type" and then advised leaf_modules / exclude, which cannot help:
    it names the class and torch's register_dataclass, which makes the compile work."""
    torch.manual_seed(0)
    model, x = _DataclassThroughExport().eval(), torch.randn(4, 32)
    with pytest.raises(TraceError, match=r"does not know .*_Logits: register it before compiling, "
                                         r"torch.utils._pytree.register_dataclass\(_Logits\)"):
        sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0)
    torch.utils._pytree.register_dataclass(_Logits)
    try:
        cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, include=[".*"])
        y = cm(x)
        assert cm.trace_method == "torch.export" and isinstance(y, _Logits)
        ref = copy.deepcopy(model)
        for lp in cm.plan.sparse_layers:
            ref.get_submodule(lp.name).weight.data = cm.effective_weight(lp.name)
        assert output_error(y.logits, ref(x).logits) <= 1e-6
    finally:
        deregister = getattr(torch.utils._pytree, "_deregister_pytree_node", None)
        if deregister is not None:
            deregister(_Logits)


def test_a_package_beside_torch_is_the_users_code_not_torchs():
    """torch's folder was matched as a prefix without its separator: torchvision, torchaudio, a user's
    'torchzoo' beside it in site-packages were taken for torch, and errors raised there named no line."""
    import traceback

    from sparsec.user_code import user_code_frame
    beside = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "torchzoo", "__init__.py")
    inside = os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "module.py")
    frames = traceback.StackSummary.from_list([(beside, 7, "forward", "y = self.l(x)"), (inside, 1, "_call_impl", "")])
    assert user_code_frame(frames) == f"{beside}:7 in forward: y = self.l(x)"
