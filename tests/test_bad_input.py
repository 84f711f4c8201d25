"""Bad input gets a clear error or a reasoned dense layer, never a crash or wrong math."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import load_example, output_error, pruned_model
from sparsec.errors import ExampleInputError, InvalidInputError, InvalidTypeError


def _mlp(d_in=32, hidden=64, out=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()


@pytest.mark.parametrize("pattern", ["3:2", "0:4", "2:4:8", "fanin:1.5", "", "banana"])
def test_invalid_pattern_strings(pattern):
    with pytest.raises(ValueError, match="accepted"):
        sparsec.compile(_mlp(), pattern=pattern, example_inputs=(torch.randn(2, 32),))


@pytest.mark.parametrize("pattern", [2, 0.5, ("2", "4")])
def test_non_string_patterns(pattern):
    with pytest.raises(TypeError, match="pattern must be a string"):
        sparsec.compile(_mlp(), pattern=pattern, example_inputs=(torch.randn(2, 32),))


def test_no_pattern_means_2_4():
    assert sparsec.explain(_mlp(), pattern=None, example_inputs=(torch.randn(2, 32),)).pattern == "2:4"


def test_shapes_not_divisible_by_m_stay_dense_with_reason():
    model = nn.Sequential(nn.Linear(30, 60), nn.ReLU(), nn.Linear(60, 30), nn.ReLU(), nn.Linear(30, 62), nn.ReLU(),
                          nn.Linear(62, 4)).eval()
    x = torch.randn(3, 30)
    cm = sparsec.compile(model, pattern="4:8", example_inputs=(x,), min_weights=0, include=[".*"])
    assert cm.plan["2"].sparsity is None and "K = in_features = 60 is not a multiple of M=8" in cm.plan["2"].reason
    assert cm.plan["4"].sparsity is None and "30" in cm.plan["4"].reason
    # 2:4 fits K = 60 (and 30 does not)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, include=[".*"])
    assert cm.plan["2"].sparsity == "2:4" and cm.plan["4"].sparsity is None
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


@pytest.mark.parametrize("bad, match", [
    ((torch.randn(2, 31),), "mat1 and mat2 shapes cannot be multiplied"),
    ((torch.randn(2, 32, dtype=torch.float64),), "dtype"),
    ((torch.randn(2, 32), torch.randn(2, 32)), "example inputs do not fit"),
    (("not a tensor",), "example inputs do not fit"),
])
def test_example_inputs_that_do_not_fit(bad, match):
    with pytest.raises(ExampleInputError, match=match) as err:
        sparsec.compile(_mlp(), example_inputs=bad)
    assert isinstance(err.value, ValueError)
    assert "example_inputs must be a tuple" in str(err.value)
    assert "passes" + os.sep not in str(err.value)  # sparsec's own frames are not named as the user's code


@pytest.mark.parametrize("bad", [[torch.randn(2, 32)], {"x": torch.randn(2, 32)}, "x", 3])
def test_example_inputs_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match=r"example_inputs must be a tuple .* e\.g\. \(x,\)"):
        sparsec.compile(_mlp(), example_inputs=bad)


def test_a_single_tensor_is_accepted_as_example_inputs():
    cm = sparsec.compile(_mlp(), example_inputs=torch.randn(2, 32), min_weights=0)
    assert cm.plan["2"].sparsity == "2:4"


def test_wrong_inputs_through_the_export_path_are_named_as_such():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc(x).clone()
            y[:, 0] = 1.0
            return y

    with pytest.raises(ExampleInputError, match="example inputs do not fit"):
        sparsec.compile(Untraceable(), example_inputs=(torch.randn(2, 7),))


def test_non_float_weights_stay_dense_with_reason():
    class IntModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randint(-3, 4, (64, 64)), requires_grad=False)
            self.lin = nn.Linear(64, 64)
            self.head = nn.Linear(64, 4)

        def forward(self, idx):
            h = idx @ self.w
            return self.head(self.lin(self.lin(h.float())))

    model = IntModel().eval()
    x = torch.randint(0, 3, (2, 64))
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.plan["w"].sparsity is None and "dtype int64 is not supported" in cm.plan["w"].reason
    assert "float16, bfloat16, float32, float64" in cm.plan["w"].reason
    assert cm.plan["lin"].sparsity == "2:4"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_refuse_that_layer_and_keep_the_model_usable(bad_value):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = bad_value
    x = torch.randn(4, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.plan["2"].sparsity is None and "NaN/Inf" in cm.plan["2"].reason
    assert cm.plan["4"].sparsity == "2:4"
    torch.testing.assert_close(cm(x), pruned_model(model, cm.plan)(x), equal_nan=True, rtol=1e-5, atol=1e-6)


class _EmptyLayers(nn.Module):
    """Layers with no weights at all (a config with zero heads / experts): nn.Linear(64, 0), a parameter [0, 64]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c, self.empty = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 0)
        self.w = nn.Parameter(torch.empty(0, 64))

    def forward(self, x):
        h = self.a(x)
        return torch.cat([self.c(h), self.empty(h), torch.nn.functional.linear(h, self.w)], dim=-1)


@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.9"])
def test_layers_with_no_weights_stay_dense_with_reason(pattern):
    # nn.Linear(64, 0) crashed find_candidates (IndexError on weight[0]), and the plan's totals divided by
    # the layer's zero weight count
    model, x = _EmptyLayers(), torch.randn(4, 64)
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), include=[".*"], min_weights=0)
    for name in ("empty", "w"):
        assert cm.plan[name].sparsity is None and "no elements" in cm.plan[name].reason
    assert cm.plan["a"].sparsity == cm.plan["c"].sparsity == pattern
    assert len(cm.plan) == 4
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_model_without_eligible_layers_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert not cm.plan.sparse_layers
    assert "no layer was made sparse" in str(cm.plan)
    assert torch.equal(cm(x), model(x))


def test_model_without_any_candidate():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    x = torch.randn(3, 5)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert len(cm.plan) == 0 and "no candidate layer" in str(cm.plan)
    assert torch.equal(cm(x), model(x))


def test_include_naming_a_missing_layer():
    model, inputs = load_example("mlp").build_model()
    with pytest.raises(InvalidInputError, match="include='fc' matches no candidate layer; close names: ") as err:
        sparsec.compile(model, example_inputs=inputs, include=["fc"])
    close = str(err.value).split("close names: ")[1].split(";")[0].split(", ")
    assert set(close) == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(quantize="int4"), ValueError, "quantize='int4' is not supported"),
    (dict(include="fc2"), None, None),  # a single string is one name
    (dict(include=[3]), TypeError, "module names or regular expressions"),
    (dict(plan="2:4"), TypeError, "plan must be a sparsec.Plan"),
    (dict(min_weights=-1), ValueError, "min_weights"),
    (dict(quant_budget=0), ValueError, "quant_budget"),
    # options that would change nothing (they were ignored, silently)
    (dict(quant_budget=0.5), ValueError, r"quant_budget=0.5 applies to quantize='auto' only.*got quantize=None"),
    (dict(quant_budget=0.5, quantize="int8"), ValueError, "applies to quantize='auto' only"),
    (dict(quant_budget=0.5, quantize="auto"), None, None),
    (dict(leaf_modules=[3]), TypeError, "leaf_modules"),
])
def test_bad_options(kwargs, error, match):
    model, inputs = load_example("mlp").build_model()
    if error is None:
        sparsec.compile(model, example_inputs=inputs, **kwargs)
        return
    with pytest.raises(error, match=match):
        sparsec.compile(model, example_inputs=inputs, **kwargs)


def test_not_a_module():
    with pytest.raises(InvalidTypeError, match="nn.Module"):
        sparsec.compile(lambda x: x, example_inputs=(torch.randn(2),))


def test_a_model_that_cannot_be_copied_is_named_not_modified():
    import threading

    model = _mlp()
    model.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(InvalidTypeError, match=r"works on a copy of the model, and copy.deepcopy\(model\) failed: "
                                               r"TypeError: .*lock"):
        sparsec.compile(model, example_inputs=(torch.randn(2, 32),))


def test_explain_takes_compiles_options_only():
    with pytest.raises(InvalidTypeError, match=r"unknown options \['quantise'\]; it takes compile's: .*'quantize'"):
        sparsec.explain(_mlp(), example_inputs=(torch.randn(2, 32),), quantise="int8")
    plan = sparsec.explain(_mlp(), example_inputs=(torch.randn(2, 32),), quantize="int8")
    assert any(lp.quant == "int8" for lp in plan)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(32, 8)
        self.spare = nn.Linear(32, 8)  # defined, never called

    def forward(self, x):
        return self.used(x)


class _UnusedExported(_Unused):
    def forward(self, x):
        int(x.shape[0])  # symbolic_trace cannot: torch.export traces it, reading every parameter at the top
        return self.used(x)


@pytest.mark.parametrize("model", [_Unused, _UnusedExported], ids=["symbolic_trace", "torch.export"])
def test_a_layer_the_forward_never_calls(model):
    # through torch.export, the reason read "its weight is read directly (by ), not through the layer's forward"
    cm = sparsec.compile(model(), example_inputs=(torch.randn(2, 32),))
    assert cm.trace_method == ("torch.export" if model is _UnusedExported else "symbolic_trace")
    assert cm.plan["spare"].sparsity is None and "not called by the model's forward" in cm.plan["spare"].reason
    if model is _Unused:
        with pytest.raises(KeyError, match="'spare' is in the plan but its weight is not in the compiled graph.*not called by the model's forward"):
            cm.mask("spare")
    else:  # the exported graph holds the weight, dense
        assert cm.mask("spare").all()
    with pytest.raises(KeyError, match="nope"):
        cm.mask("nope")


def test_example_inputs_like_needs_example_inputs():
    x = torch.randn(3, 32)
    cm = sparsec.compile(_mlp(), example_inputs=(x,))
    (fresh,) = cm.example_inputs_like()
    assert fresh.shape == x.shape and fresh.dtype == x.dtype
    with pytest.raises(ValueError, match="compiled without example inputs; pass example_inputs"):
        sparsec.compile(_mlp()).example_inputs_like()


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Unusual(nn.Module):
    """Linear modules used in ways sparsec does not rewrite: each stays dense, with the reason."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), _DoubledLinear(64, 64)
        self.tied, self.out = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        h = self.c(self.b(self.a(x)))
        # the weight read directly, by an einsum that is not a layer (its output is transposed)
        return self.out(torch.einsum("bi,oi->ob", h, self.tied.weight).t())


def test_layers_used_unusually_stay_dense_with_the_reason():
    model = _Unusual().eval()
    x = torch.randn(2, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.plan["b"].sparsity == "2:4"
    assert cm.plan["c"].sparsity is None and "_DoubledLinear overrides forward" in cm.plan["c"].reason
    assert cm.plan["tied"].sparsity is None and "weight is read directly (by einsum)" in cm.plan["tied"].reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class _ScaledConv(nn.Conv2d):
    """Keeps Conv2d.forward, overrides the _conv_forward it calls (weight scaling, as some quantization and
    reparametrization code does)."""

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, weight * 2, bias)


class _ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c, self.out = nn.Conv2d(3, 8, 1), _ScaledConv(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.plain = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.out(self.plain(torch.relu(self.c(self.a(x)))))


def test_a_conv_subclass_overriding_conv_forward_stays_dense_with_the_reason():
    # Conv2d subclasses are leaves of the trace: the sparse replacement ran plain conv math and dropped the
    # override's doubling (48% off the model, with no word in the plan)
    model, x = _ConvStack().eval(), torch.randn(2, 3, 8, 8)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, backend="torch")
    assert cm.plan["c"].sparsity is None and "_ScaledConv overrides _conv_forward" in cm.plan["c"].reason
    assert cm.plan["plain"].sparsity == "2:4"
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


@pytest.mark.parametrize("wrap, match", [
    (lambda m, x: torch.jit.script(m), "TorchScript module .*pass the nn.Module you scripted"),
    (lambda m, x: torch.jit.trace(m, x), "TorchScript module .*pass the nn.Module you scripted"),
    (lambda m, x: torch.compile(m), r"torch.compile wrapper .*model._orig_mod"),
    (lambda m, x: nn.DataParallel(m), "wrapped in DataParallel.*pass model.module"),
])
def test_wrapped_models_are_refused_naming_the_module_to_pass(wrap, match):
    model, x = _mlp(), torch.randn(2, 32)
    with pytest.raises(InvalidTypeError, match=match):
        sparsec.compile(wrap(model, x), example_inputs=(x,))
    with pytest.raises(InvalidTypeError, match=match):
        sparsec.explain(wrap(model, x), example_inputs=(x,))


_DDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist, torch.nn as nn
import sparsec
from sparsec.errors import InvalidTypeError

dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + sys.argv[1])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).train()
x = torch.randn(4, 32)
try:
    sparsec.compile(nn.parallel.DistributedDataParallel(model), example_inputs=(x,), train=True)
    print("NOT REFUSED")
except InvalidTypeError as e:
    print("REFUSED:", e)
cm = sparsec.compile(model, example_inputs=(x,), train=True)
ddp = nn.parallel.DistributedDataParallel(cm)
before = cm.effective_weight("2").clone()
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
ddp(x).square().sum().backward()
optimizer.step()
after, mask = cm.effective_weight("2"), cm.mask("2")
print("TRAINED:", not torch.equal(after, before), "MASK HELD:", bool((after[~mask] == 0).all()), flush=True)
# Skip the process group's teardown: ~ProcessGroupGloo joins its worker thread while holding the GIL,
# and that thread can be waiting for the GIL (a torch deadlock that hung CI once).
os._exit(0)
"""


def test_distributed_data_parallel_wraps_the_compiled_model_not_the_other_way(tmp_path):
    # In a child process: a gloo process group cannot be torn down reliably inside the test run (above).
    done = subprocess.run([sys.executable, "-c", _DDP_SCRIPT, str(tmp_path / "rendezvous")], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"REFUSED: .*wrapped in DistributedDataParallel.*pass model.module, and wrap the compiled model "
                     r"in DistributedDataParallel afterwards", out), out
    assert "TRAINED: True MASK HELD: True" in out, out  # trained through DDP, and the mask held


class _Parametrized(nn.Module):
    def __init__(self, untraceable=False):
        super().__init__()
        from torch.nn.utils import parametrizations

        self.untraceable = untraceable
        self.a, self.b, self.c, self.out = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        parametrizations.weight_norm(self.b)
        parametrizations.orthogonal(self.c)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        if self.untraceable and h.shape[0] > 1:  # symbolic_trace fails on the branch: torch.export runs it
            h = h * 1.0
        return self.out(torch.relu(self.c(h)))


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_parametrized_weights_stay_dense_with_the_remedy(untraceable, train):
    torch.manual_seed(0)
    model, x = _Parametrized(untraceable).train(train), torch.randn(4, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "out"], train=train)
    assert cm.trace_method == ("torch.export" if untraceable else "symbolic_trace")
    for name, kind in [("b", "_WeightNorm"), ("c", "_Orthogonal")]:
        lp = cm.plan[name]
        assert lp.sparsity is None and f"weight is computed by a parametrization ({kind})" in lp.reason
        assert "remove_parametrizations(module, 'weight')" in lp.reason
        if untraceable:  # torch.export inlines the parametrization: the graph computes the weight
            with pytest.raises(KeyError, match=f"'{name}' is in the plan but its weight is not in the compiled graph"
                                               r" \(never called, or computed inside the graph\); its plan entry: kept"):
                cm.effective_weight(name)
        else:  # the module is called whole: inspection reads its computed weight
            assert torch.equal(cm.effective_weight(name), getattr(model, name).weight) and cm.mask(name).all()
    assert cm.plan["a"].sparsity == "2:4"
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_group_lasso_and_shrink_leave_parametrized_weights_alone():
    """Zeroing a computed weight writes to a tensor the next forward recomputes: GroupLasso refuses
    such layers by name; shrink keeps their channels, saying why (it crashed on the lookup)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(4, 32)  # 0 -> 2 -> 4 -> 6, 2 weight-normed
    parametrizations.weight_norm(model[2])
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True)
    with pytest.raises(InvalidInputError, match=r"layer '2' computes its weight with a parametrization"
                                                r".*layers=\[\.\.\.\] \(layers: \['0', '2', '4', '6'\]\)"):
        sparsec.GroupLasso(cm, lam=1e-3)
    lasso = sparsec.GroupLasso(cm, lam=1e-3, layers=["0", "4", "6"])
    with torch.no_grad():
        cm.graph_module.get_submodule("0").weight[:16] = 0  # 16 zero rows: 2 reads their constant relu(bias)
    lasso.zero_small_(0.0)
    small = sparsec.shrink(cm)
    assert small.shrink_report["0"].before == 64 and small.shrink_report["0"].after == 64
    assert any("2 (its weight is computed by a parametrization" in why for why in small.shrink_report["0"].kept), \
        small.shrink_report["0"].kept
    with torch.no_grad():
        assert output_error(small(x), cm(x)) <= 1e-5


def test_weights_on_the_meta_device_are_refused():
    with torch.device("meta"):
        model = _mlp()
    for call in (sparsec.compile, sparsec.explain):
        with pytest.raises(InvalidInputError, match=r"0.weight, 0.bias, 2.weight ... are on the meta device.*to_empty"):
            call(model, example_inputs=(torch.randn(2, 32, device="meta"),))


def test_weights_held_as_buffers_stay_dense_with_the_reason():
    model, x = _mlp(), torch.randn(2, 32)
    weight = model[2].weight.detach()
    del model[2].weight
    model[2].register_buffer("weight", weight)  # as some checkpoint converters leave frozen layers
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["2"].sparsity is None and "its weight is a buffer, not nn.Parameter" in cm.plan["2"].reason
    assert cm.plan["4"].sparsity == "2:4"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class _WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(16, 16))
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.blk(x))


@pytest.mark.parametrize("given, error, message", [
    ("blk", TypeError, r"leaf_modules takes a list of module classes or module names, got 'blk': wrap it in a list, \['blk'\]"),
    (nn.Sequential, TypeError, r"got <class .*Sequential'>: wrap it in a list, \[Sequential\]"),
    (["bkl"], ValueError, r"leaf_modules names \['bkl'\] match no module of the model; .* e.g. \['blk', 'blk.0', 'out'\]"),
    ([int], TypeError, r"takes module classes \(nn.Module subclasses\) or module names, got \[<class 'int'>\]")])
def test_leaf_modules_that_would_do_nothing_are_refused(given, error, message):
    """A string was split into its letters and a misspelt name matched nothing, both silently (the trace error
    that followed told the user to set leaf_modules, as they had); a class not in a list failed deep inside."""
    x = torch.randn(2, 16)
    with pytest.raises(error, match=message):
        sparsec.compile(_WithBlock(), example_inputs=(x,), leaf_modules=given, min_weights=0)
    cm = sparsec.compile(_WithBlock(), example_inputs=(x,), leaf_modules=["blk"], min_weights=0)
    assert any(n.op == "call_module" and n.target == "blk" for n in cm.graph_module.graph.nodes)  # (a leaf)


def test_a_plan_with_quant_budget_is_refused():
    """The plan's quant column decides: quant_budget was accepted and ignored. (min_weights is not refused: the
    plan workflow passes explain's options to compile again.)"""
    model, (x,) = load_example("mlp").build_model()
    plan = sparsec.explain(model, example_inputs=(x,), min_weights=0)
    with pytest.raises(ValueError, match=r"pass either plan= or quant_budget=0.9, not both"):
        sparsec.compile(model, example_inputs=(x,), plan=plan, quant_budget=0.9)
    assert sparsec.compile(model, example_inputs=(x,), plan=plan, min_weights=0).plan.names == plan.names


def test_a_levels_object_for_quant_is_refused_naming_the_written_forms():
    """A Levels object (sparsec.levels.parse_levels' result) where the plan and quantize= take its text: it passed
    the checks and failed inside a pass ("sequence item 1: expected str instance, Levels found")."""
    from sparsec.levels import parse_levels

    model, (x,) = load_example("mlp").build_model()
    with pytest.raises(ValueError, match=r"quantize=Levels\(kind='log2', bits=4\) is not supported; accepted: None"):
        sparsec.compile(model, example_inputs=(x,), quantize=parse_levels("log2:4"))
    plan = sparsec.explain(model, example_inputs=(x,))
    plan.sparse_layers[0].quant = parse_levels("log2:4")
    with pytest.raises(ValueError, match=r"quant Levels\(kind='log2', bits=4\) is not one of None, \"int8\""):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


def test_shrink_takes_numpy_thresholds_and_refuses_non_bool_flags():
    import numpy as np

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), pattern="dense")
    small = sparsec.shrink(cm, threshold=np.float32(0.0))  # (refused as "not a finite number >= 0")
    with torch.no_grad():
        assert torch.allclose(small(x), cm(x))
    for flag in ("ragged_fanin", "eval_only"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):  # ("no" turned it on)
            sparsec.shrink(cm, **{flag: "no"})


def test_a_nested_tensor_example_input_is_refused_naming_what_to_pass():
    """(compile failed with torch's "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue")"""
    nested = torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)])
    with pytest.raises(ExampleInputError, match=r"is a nested tensor .* pass a padded dense tensor"):
        sparsec.compile(nn.Sequential(nn.Linear(16, 16)), example_inputs=(nested,))


def test_an_include_that_is_not_a_regex_and_matches_nothing_says_both():
    model, (x,) = load_example("mlp").build_model()
    with pytest.raises(ValueError, match=r"include='fc\(' matches no candidate layer \(as a literal name: it is not "
                                         r"a valid regular expression, missing \), unterminated subpattern"):
        sparsec.compile(model, example_inputs=(x,), include=["fc("])
