import json
import warnings

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.runtime.training import TrainableLayer
from oracle import output_error, pruned_model

from sparsec import LayerPlan, Plan
from sparsec.errors import CorruptFileError, InvalidInputError, InvalidTypeError


def _plan() -> Plan:
    return Plan(layers=[
        LayerPlan("fc1", "linear", (64, 32), None, None, None, "kept dense: first layer", "float32", 4096),
        LayerPlan("fc2", "linear", (64, 64), "2:4", "int8", None, "2:4 ...", "float32", 8192),
        LayerPlan("conv", "conv2d", (16, 8, 3, 3), "fanin:0.75", None, "2:4", "fan-in", "float16", None),
        LayerPlan("w", "matmul", (64, 32), "1:4", None, None, "1:4", "float32", 100),
    ], pattern="2:4", notes=["a note"])


def test_json_round_trip():
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert isinstance(again["fc1"].weight_shape, tuple)


def test_derived_numbers():
    plan = _plan()
    assert plan["fc2"].kept == 64 * 64 // 2
    assert plan["conv"].kept == 16 * (16 * 8 * 9 // 4 // 16)  # k = floor(numel*0.25)//out per row
    assert plan["w"].out_features == 32 and plan["w"].reduction == 64 and plan["w"].kept == 64 * 32 // 4
    # int8 2:4: 1 byte per kept value + int16 nibble words (ceil(64/16) per row) + fp32 scale per row
    assert plan["fc2"].stored_bytes() == 2048 + 64 * 4 * 2 + 64 * 4
    t = plan.totals()
    assert t["weights"] == sum(lp.numel for lp in plan) and t["sparse_layers"] == 3
    assert t["flops_dense"] == 4096 + 8192 + 100
    assert t["flops_saved"] == pytest.approx(8192 / 2 + 100 * 3 / 4)


def test_table_lists_every_layer_with_reason_and_totals():
    text = str(_plan())
    for lp in _plan():
        assert lp.name in text and lp.reason in text
    assert "totals:" in text and "weight bytes" in text and "FLOPs saved" in text
    assert "grad" in text.splitlines()[1]  # gradient column shown because a layer has grad_sparsity
    assert "note: a note" in text


def test_lookup_errors_list_names():
    with pytest.raises(KeyError, match="fc1"):
        _plan()["nope"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a sparsec plan"),
    ('{"format": "sparsec.plan", "version": 99, "layers": []}', "unsupported plan version"),
    ('{"format": "sparsec.plan", "version": 1, "layers": [{"name": "a"}]}', "missing fields"),
])
def test_corrupt_json(text, match):
    with pytest.raises(CorruptFileError, match=match):
        Plan.from_json(text)


@pytest.mark.parametrize("given", [5, None, {"format": "sparsec.plan"}])
def test_from_json_names_what_it_takes(given):
    with pytest.raises(InvalidTypeError, match=f"takes the JSON text .*got {type(given).__name__}"):
        Plan.from_json(given)


def test_invalid_entries_are_rejected():
    data = json.loads(_plan().to_json())
    for bad, why in (("int_7", "dtype 'int_7' is not a torch dtype"), ("float99", "dtype 'float99' is not a torch dtype"),
                     ("int8", "its weight dtype 'int8' is not floating-point, so it is left dense")):
        data["layers"][1]["dtype"] = bad  # (fc2 is sparse)
        with pytest.raises(InvalidInputError, match=f"'fc2': {why}"):
            Plan.from_json(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["layers"][1]["sparsity"] = "3:2"
    with pytest.raises(InvalidInputError, match="fc2"):
        Plan.from_json(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["layers"][1]["quant"] = "int4"
    with pytest.raises(InvalidInputError, match="quant"):
        Plan.from_json(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["layers"][1]["name"] = "fc1"
    with pytest.raises(InvalidInputError, match="twice"):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("field, value, match", [
    ("backend", "cuda", r"backend 'cuda' not in \("),
    ("sparsity", "dense", "'dense' is spelled None in a plan"),
    ("grad_sparsity", "dense", "'dense' is spelled None in a plan"),
    ("grad_sparsity", "2:3:4", "bad grad_sparsity"),
    ("sparsityy", "2:4", r"unknown fields \['sparsityy'\]"),  # a misspelt field is not silently dropped
])
def test_misspelt_or_misplaced_entries_name_the_layer(field, value, match):
    data = json.loads(_plan().to_json())
    data["layers"][1][field] = value
    with pytest.raises((InvalidInputError, CorruptFileError), match=match) as info:
        Plan.from_json(json.dumps(data))
    assert "fc2" in str(info.value)


@pytest.mark.parametrize("field, value, match", [
    ("weight_shape", "128x128", r"layer #1 \('fc2'\): weight_shape must be a list of non-negative ints"),
    ("weight_shape", None, "weight_shape must be a list of non-negative ints"),
    ("weight_shape", [128.9, 128], r"weight_shape must be .*got \[128.9, 128\]"),  # was cut to (128, 128)
    ("name", None, r"layer #1 \(None\): name must be a string"),
    ("name", 5, "name must be a string"),
    ("flops", "many", "flops must be a non-negative int or null"),
    ("runtime_bytes", 1.5, "runtime_bytes must be a non-negative int or null"),
    ("sparsity", 24, "sparsity must be a string or null"),
])
def test_fields_of_the_wrong_json_type_are_named(field, value, match):
    data = json.loads(_plan().to_json())
    data["layers"][1][field] = value
    with pytest.raises(CorruptFileError, match=match):
        Plan.from_json(json.dumps(data))


def test_plan_notes_and_pattern_of_the_wrong_json_type_are_refused():
    data = json.loads(_plan().to_json())
    data["notes"] = "abc"  # was read as ['a', 'b', 'c']
    with pytest.raises(CorruptFileError, match='"notes" a list of strings'):
        Plan.from_json(json.dumps(data))


class WritesInPlace(nn.Module):
    """Layer outputs handed on by in-place writes, as KV caches and scatter-style MoE code do."""
    # (symbolic_trace refuses item assignment, `buf[:, :64] = y`; torch.export records it as a write too)

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(64, 64), nn.Linear(128, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        buf = x.new_zeros(x.shape[0], 128)
        buf.narrow(1, 0, 64).copy_(self.a(x))        # a write into a view of buf (buf[:, :64] = ... under export)
        h = self.b(buf)
        acc = torch.zeros_like(h)
        acc.index_add_(0, torch.arange(h.shape[0]), self.c(h))  # c's output reaches acc's later readers
        return self.out(acc)


class ExportOnly(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
            x = x * 1.0
        return self.inner(x)


def _compiled_by(tracer: str, model_class, x_shape: tuple[int, ...]):
    """(model, x, compiled model, plan entries by the layer's own name): a seeded model_class() and input,
    captured by `tracer` (wrapped in ExportOnly for torch.export)."""
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(x_shape)
    model = model if tracer == "symbolic_trace" else ExportOnly(model)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, backend="torch")
    assert cm.trace_method == tracer
    prefix = "inner." if tracer == "torch.export" else ""
    return model, x, cm, {lp.name.removeprefix(prefix): lp for lp in cm.plan.layers}


@pytest.mark.parametrize("tracer", ["symbolic_trace", "torch.export"])
def test_first_and_last_layers_follow_dataflow_through_in_place_writes(tracer):
    model, x, cm, reasons = _compiled_by(tracer, WritesInPlace, (8, 64))
    assert "first layer" in reasons["a"].reason and "last layer" in reasons["out"].reason
    assert reasons["b"].sparsity == "2:4" and reasons["c"].sparsity == "2:4", cm.plan
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class SharedLayers(nn.Module):
    """`edge` reads the model input and is applied again mid-network; `tail` runs mid-network and again
    to make the model output; `a`, `b` only ever run between other layers."""

    def __init__(self):
        super().__init__()
        self.edge, self.a, self.b, self.tail = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        h = self.a(self.edge(x))
        h = self.tail(torch.relu(self.edge(h)))
        return self.tail(self.b(h))


@pytest.mark.parametrize("tracer", ["symbolic_trace", "torch.export"])
def test_a_layer_called_at_the_edge_once_is_a_first_or_last_layer(tracer):
    """The first / last layer rule keeps dense a layer one of whose calls reads the model input (or makes
    its output), even when its other calls sit between other layers: `edge` was pruned (its second call
    has `a` upstream), though its first call reads the input as any first layer does."""
    model, x, cm, plan = _compiled_by(tracer, SharedLayers, (4, 32))
    assert plan["edge"].sparsity is None and "first layer (its call 1 of 2 has no candidate" in plan["edge"].reason
    assert plan["tail"].sparsity is None and "last layer (its call 2 of 2 has no candidate" in plan["tail"].reason
    assert plan["a"].sparsity == plan["b"].sparsity == "2:4", cm.plan
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class AttentionThenMLP(nn.Module):
    """`attn` (two Linears) reads the model input; the MLP after it reads only what attn made."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.mlp1, self.mlp2, self.out = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.mlp2(torch.relu(self.mlp1(self.attn(x))))))


@pytest.mark.parametrize("tracer", ["symbolic_trace", "torch.export"])
def test_an_excluded_module_holding_layers_counts_as_layers_for_the_first_last_rule(tracer):
    """symbolic_trace leaves an excluded module one opaque call, so the MLP after an excluded attention was
    kept dense as "first layer (no candidate layer before it)", while torch.export, which inlines the
    excluded Linears, pruned it: the same model and options planned two ways."""
    torch.manual_seed(0)
    model, x = AttentionThenMLP().eval(), torch.randn(4, 32)
    model = model if tracer == "symbolic_trace" else ExportOnly(model)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, backend="torch", exclude=[r"(inner\.)?attn"])
    assert cm.trace_method == tracer
    plan = {lp.name.removeprefix("inner."): lp for lp in cm.plan.layers}
    assert plan["mlp1"].sparsity == plan["mlp2"].sparsity == "2:4", cm.plan
    assert plan["out"].sparsity is None and "last layer" in plan["out"].reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_in_looks_layers_up_by_name_as_indexing_does():
    # `in` fell back to iterating and compared the name with each LayerPlan: "fc1" in plan was False
    plan = _plan()
    assert "fc1" in plan and "conv" in plan and "nope" not in plan
    assert plan["fc2"] in plan
    assert [name in plan for name in ("fc1", "fc2", "conv", "w", "fc")] == [True, True, True, True, False]


@pytest.mark.parametrize("change, error, match", [
    # a plan without "layers" was read as empty, and compile kept every layer dense ("not listed")
    (lambda d: d.pop("layers"), CorruptFileError, r'"layers" must be a list of layer objects, got None'),
    # a string was read character by character, each reported as a layer missing fields
    (lambda d: d.__setitem__("layers", "fc1"), CorruptFileError, r'"layers" must be a list .*got \'fc1\''),
    # the plan's own pattern passed unchecked until compile refused it as if given as pattern=
    (lambda d: d.__setitem__("pattern", "3:2"), InvalidInputError, r"plan pattern: invalid pattern '3:2'.*accepted"),
    # counts: a negative one made the totals negative
    (lambda d: d["layers"][1].__setitem__("flops", -5), CorruptFileError, "flops must be a non-negative int"),
    (lambda d: d.__setitem__("grad_mode", "maxnorm"), InvalidInputError, r"plan grad_mode 'maxnorm' not in"),
])
def test_plan_level_fields_are_checked(change, error, match):
    data = json.loads(_plan().to_json())
    change(data)
    with pytest.raises(error, match=match):
        Plan.from_json(json.dumps(data))


def test_a_plan_built_in_python_with_other_entries_is_refused_naming_them():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(2, 16)
    plan = Plan(layers=[{"name": "2", "sparsity": "2:4"}])  # (was an AttributeError from inside compile)
    with pytest.raises(TypeError, match=r"sparsec.LayerPlan entries .*got dict"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)
    with pytest.raises(ValueError, match="plan pattern: invalid pattern 'bogus'"):
        sparsec.compile(model, example_inputs=(x,), plan=Plan(layers=[], pattern="bogus"))


def test_totals_of_a_plan_with_a_weightless_layer():
    """A layer with no weights (nn.Linear(16, 0)) given FLOPs by a hand-written plan divided by zero."""
    plan = Plan([LayerPlan("empty", "linear", (0, 16), None, None, None, "no weights", "float32", 64),
                 LayerPlan("fc", "linear", (8, 16), "2:4", None, None, "2:4", "float32", 256)])
    totals = plan.totals()
    assert totals["weights"] == 128 and totals["weights_kept"] == 64 and totals["flops_dense"] == 256, totals
    assert str(plan)  # the table prints too


def _sdgp_input_grad(cm, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    cm(x).backward(dy)
    return x.grad


def test_a_plan_runs_the_grad_mode_it_was_made_with():
    """explain(grad_mode="rescale") made a plan whose reasons said "(rescale)"; compile(plan=) ran magnitude,
    and its reasons dropped the SDGP note."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x, dy = torch.randn(6, 16), torch.randn(6, 8)
    opts = dict(example_inputs=(x,), train=True, min_weights=0)
    plan = Plan.from_json(sparsec.explain(model, grad_pattern="2:4", grad_mode="rescale", **opts).to_json())
    assert plan.grad_mode == "rescale" and plan["2"].grad_sparsity == "2:4"
    from_plan = sparsec.compile(model, plan=plan, **opts)
    assert "SDGP" in from_plan.plan["2"].reason and "(rescale)" in from_plan.plan["2"].reason
    direct = {mode: sparsec.compile(model, grad_pattern="2:4", grad_mode=mode, **opts) for mode in ("rescale", "magnitude")}
    got = _sdgp_input_grad(from_plan, x, dy)
    torch.testing.assert_close(got, _sdgp_input_grad(direct["rescale"], x, dy), rtol=0, atol=0)
    assert not torch.allclose(got, _sdgp_input_grad(direct["magnitude"], x, dy))  # (the modes differ here)
    with pytest.raises(InvalidInputError, match=r"grad_mode='magnitude' differs from the given plan's 'rescale'"):
        sparsec.compile(model, plan=plan, grad_mode="magnitude", **opts)
    # a plan that does not say (JSON from before the field existed, one built in Python) takes grad_mode=
    old = json.loads(plan.to_json())
    del old["grad_mode"]
    unsaid = Plan.from_json(json.dumps(old))
    assert unsaid.grad_mode is None
    for mode in ("rescale", "magnitude"):
        torch.testing.assert_close(_sdgp_input_grad(sparsec.compile(model, plan=unsaid, grad_mode=mode, **opts), x, dy),
                                   _sdgp_input_grad(direct[mode], x, dy), rtol=0, atol=0)


def _three_linears() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def test_a_plan_keeps_the_grad_mode_it_was_made_with_when_no_layer_prunes_yet():
    """With the last layer's gradient dense by default, a model of a first and a last layer prunes no gradient:
    the plan said no grad_mode, and an edit pruning the last layer's ran magnitude where the plan was made with
    rescale. Checked against rescale by hand: dX = (prune(dY) * |dY| row sums / |prune(dY)| row sums) @ W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x, dy = torch.randn(4, 16), torch.randn(4, 8)
    opts = dict(example_inputs=(x,), train=True)
    plan = sparsec.explain(model, pattern="dense", grad_pattern="2:4", grad_mode="rescale", **opts)
    assert (plan.grad_mode, plan.grad_pattern) == ("rescale", "2:4") and not any(lp.grad_sparsity for lp in plan)
    edited = Plan.from_json(plan.to_json())
    edited["2"].grad_sparsity = "2:4"
    cm = sparsec.compile(model, plan=edited, **opts)
    assert cm.plan.grad_mode == "rescale" and "set by the given plan (default: gradient dense: last layer" in cm.plan["2"].reason
    xg = x.clone().requires_grad_(True)
    cm(xg).backward(dy)
    kept = torch.sort(dy.abs().reshape(4, 2, 4), dim=-1, descending=True, stable=True).indices[..., :2]
    pruned = torch.zeros(4, 2, 4).scatter(-1, kept, dy.reshape(4, 2, 4).gather(-1, kept)).reshape(4, 8)
    pruned = pruned * dy.abs().sum(-1, keepdim=True) / pruned.abs().sum(-1, keepdim=True)
    h = model[0](x)
    expected = ((pruned @ model[2].weight) * (h > 0)) @ model[0].weight
    torch.testing.assert_close(xg.grad, expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"grad_mode='magnitude' differs from the given plan's 'rescale'"):
        sparsec.compile(model, plan=edited, grad_mode="magnitude", **opts)


def test_compiling_explains_plan_gives_that_plan_and_says_where_an_edit_departs():
    """compile(plan=explain(...)) dropped the gradient notes ("no trainable parameter upstream", "last
    layer"), so its plan was not explain's; an edit of a layer's gradient said nothing of the default."""
    torch.manual_seed(0)
    model, x = _three_linears(), torch.randn(4, 16)
    opts = dict(example_inputs=(x,), train=True, min_weights=0)
    plan = sparsec.explain(model, grad_pattern="2:4", **opts)
    assert [lp.grad_sparsity for lp in plan] == [None, "2:4", None]
    assert sparsec.compile(model, plan=Plan.from_json(plan.to_json()), **opts).plan == plan
    edited = Plan.from_json(plan.to_json())
    edited["2"].grad_sparsity, edited["4"].grad_sparsity = None, "2:4"
    got = sparsec.compile(model, plan=edited, **opts).plan
    assert [lp.grad_sparsity for lp in got] == [None, None, "2:4"]
    assert "gradient dense: set by the given plan (default: SDGP: dX from dY pruned 2:4" in got["2"].reason
    assert "SDGP: dX from dY pruned 2:4" in got["4"].reason
    assert "set by the given plan (default: gradient dense: last layer" in got["4"].reason


def test_exclude_keeps_a_layers_gradient_dense_too():
    """include= forces the last layer's gradient in; exclude= left SDGP on an excluded layer."""
    model, x = _three_linears(), torch.randn(4, 16)
    plan = sparsec.explain(model, pattern="dense", example_inputs=(x,), train=True, grad_pattern="2:4", exclude=["2"])
    assert plan["2"].grad_sparsity is None and "gradient dense: excluded by exclude='2'" in plan["2"].reason


def test_backend_entries_that_run_nothing_are_said_not_dropped():
    """A backend on an entry edited dense, or on an inference plan compiled for training, came back None (dense)
    or stayed in the compiled plan while TrainableLayer ran (training): the reason now says which."""
    torch.manual_seed(0)
    model, x = _three_linears(), torch.randn(4, 16)
    opts = dict(example_inputs=(x,), min_weights=0)
    plan = sparsec.explain(model, **opts)
    assert plan["2"].backend is not None
    trained = sparsec.compile(model, plan=Plan.from_json(plan.to_json()), train=True, **opts).plan["2"]
    assert trained.backend is None and trained.launch is None
    assert f"the given plan's backend {plan['2'].backend!r} not used: training runs" in trained.reason
    edited = Plan.from_json(plan.to_json())
    edited["2"].sparsity = None
    dense = sparsec.compile(model, plan=edited, **opts).plan["2"]
    assert dense.sparsity is None and dense.backend is None
    assert f"the given plan's backend {plan['2'].backend!r} not used: a dense layer" in dense.reason


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.unused = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_gradient_pattern_on_a_layer_never_called_is_refused():
    x = torch.randn(4, 16)
    plan = sparsec.explain(_WithUnused(), example_inputs=(x,), train=True, grad_pattern="2:4")
    plan["unused"].grad_sparsity = "2:4"
    with pytest.raises(InvalidInputError, match=r"gradient pattern 2:4 on layer 'unused', which cannot take it"):
        sparsec.compile(_WithUnused(), plan=plan, example_inputs=(x,), train=True)


class _CalledTwiceAtTheEnd(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.fc = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(torch.relu(self.first(x)))))


def test_a_layer_whose_calls_all_end_the_model_names_them_all():
    """fc(fc(first(x))): the reason said "its call 1 of 2 has no candidate layer after it", where call 2 is."""
    plan = sparsec.explain(_CalledTwiceAtTheEnd(), example_inputs=(torch.randn(2, 32),), min_weights=0)
    assert "last layer (its calls 1 and 2 of 2 have no other candidate layer after them)" in plan["fc"].reason


@pytest.mark.parametrize("bad, message", [
    ({"version": True}, r"unsupported plan version True"),
    ({"layers": [5]}, r"plan layer #0 must be an object of a layer's fields, got 5"),
    ({"grad_pattern": "fanin:0.5"}, r"plan grad_pattern 'fanin:0.5': data gradients are pruned N:M"),
])
def test_plan_json_type_errors_are_named(bad, message):
    data = dict(json.loads(_plan().to_json()), **bad)
    with pytest.raises((CorruptFileError, InvalidInputError), match=message):
        Plan.from_json(json.dumps(data))


def test_a_plan_is_written_in_the_oldest_version_that_holds_it():
    """"grad_pattern" was written as null into every plan, which a sparsec reading version 1 refused as an unknown
    key (a saved model's plan: "damaged"): a plan without it stays version 1; one with it is version 2, which such
    a sparsec calls a plan from a newer one. A version of 1.0 still reads, as it did."""
    model, x = _three_linears(), torch.randn(4, 16)
    inference = json.loads(sparsec.explain(model, example_inputs=(x,)).to_json())
    assert inference["version"] == 1 and "grad_pattern" not in inference
    training = json.loads(sparsec.explain(model, example_inputs=(x,), train=True, grad_pattern="2:4").to_json())
    assert training["version"] == 2 and training["grad_pattern"] == "2:4"
    assert Plan.from_json(json.dumps(dict(inference, version=1.0))).grad_pattern is None
    ste = json.loads(sparsec.explain(model, example_inputs=(x,), train=True, weight_update="ste").to_json())
    assert ste["version"] == 3 and ste["weight_update"] == "ste" and "grad_pattern" not in ste
    assert "weight_update" not in training
    with pytest.raises(CorruptFileError, match=r"version 4; this sparsec reads versions 1 to 3 \(the plan was written by a newer"):
        Plan.from_json(json.dumps(dict(training, version=4)))


def test_a_plan_made_with_sr_ste_resumes_training_with_it():
    """Resuming from cm.state_dict() and cm.plan (the route for a model that cannot be saved) ran fixed masks
    where the run had trained with SR-STE: nothing in the plan said so. The plan records the rule and its decay,
    a training compile from it runs them, and a contradicting weight_update= / ste_decay= is refused."""
    model, x = _three_linears(), torch.randn(4, 16)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, weight_update="ste", ste_decay=3e-4,
                         include=["0", "2", "4"], min_weights=0)
    plan = Plan.from_json(cm.plan.to_json())
    assert (plan.weight_update, plan.ste_decay) == ("ste", 3e-4)
    resumed = sparsec.compile(model, example_inputs=(x,), train=True, plan=plan)
    layers = [m for m in resumed.modules() if isinstance(m, TrainableLayer) and m.pattern is not None]
    assert len(layers) == 3 and all((m.weight_update, m.ste_decay) == ("ste", 3e-4) for m in layers)
    assert (resumed.plan.weight_update, resumed.plan.ste_decay) == ("ste", 3e-4)
    with pytest.raises(ValueError, match=r"weight_update='fixed' differs from the given plan's 'ste'"):
        sparsec.compile(model, example_inputs=(x,), train=True, plan=plan, weight_update="fixed")
    with pytest.raises(ValueError, match=r"ste_decay=0.001 differs from the given plan's 0.0003"):
        sparsec.compile(model, example_inputs=(x,), train=True, plan=plan, ste_decay=1e-3)
    fixed = sparsec.compile(model, example_inputs=(x,), plan=plan)  # (an inference compile: no update rule)
    assert fixed.plan.weight_update is None


def test_a_plan_without_a_recorded_default_keeps_its_gradient_reasons_plain():
    """A plan JSON from before "grad_pattern" (grad_mode said, no default): each pruned layer's reason read "set
    by the given plan" though explain chose it by default."""
    model, x = _three_linears(), torch.randn(4, 16)
    opts = dict(example_inputs=(x,), train=True, min_weights=0)
    old = json.loads(sparsec.explain(model, grad_pattern="2:4", **opts).to_json())
    del old["grad_pattern"]
    got = sparsec.compile(model, plan=Plan.from_json(json.dumps(dict(old, version=1))), **opts).plan
    assert got["2"].grad_sparsity == "2:4" and "SDGP" in got["2"].reason and "set by the given plan" not in got["2"].reason


def test_the_plans_own_grad_mode_passed_again_is_accepted():
    """grad_mode equal to the plan's was refused ("no gradient is pruned: pass grad_pattern"), which plan= refuses."""
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(4, 16)
    opts = dict(example_inputs=(x,), train=True)
    plan = sparsec.explain(model, pattern="dense", grad_pattern="2:4", grad_mode="rescale", **opts)
    assert sparsec.compile(model, plan=plan, grad_mode="rescale", **opts).plan == plan


def test_a_dense_entry_that_prunes_gradients_says_it_trains_as_a_trainable_layer():
    model, x = _three_linears(), torch.randn(4, 16)
    plan = sparsec.explain(model, example_inputs=(x,), min_weights=0)
    assert plan["2"].backend is not None
    plan["2"].sparsity, plan["2"].grad_sparsity = None, "2:4"
    got = sparsec.compile(model, plan=plan, example_inputs=(x,), train=True).plan["2"]
    assert got.grad_sparsity == "2:4" and "not used: training runs sparsec's TrainableLayer" in got.reason


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128),
                         nn.ReLU(), nn.Linear(128, 10)), torch.randn(4, 64)


def test_totals_say_why_a_sparse_compile_holds_more_bytes_than_dense():
    """Backend auto may keep a sparse layer's pruned weight dense (faster here), plus its mask bits: the model
    then holds more than the dense one. The totals said "1.5 MB -> 1.5 MB (1.03x)", which a user reading
    "2:4" took for a saving."""
    model, x = _mlp()
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), backend="torch")
    for lp in plan.sparse_layers:
        lp.backend = "dense"
    held = sparsec.compile(model, example_inputs=(x,), plan=plan).plan
    t = held.totals()
    assert t["bytes_after"] > t["bytes_before"]
    assert f"({100 * t['bytes_after'] / t['bytes_before']:.1f}% of dense) because 2 sparse layers (2, 4) hold their " \
           "pruned weight dense (plan backend 'dense'" in held.summary()
    packed = sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="torch").plan
    t = packed.totals()
    assert t["bytes_after"] < t["bytes_before"] and "because" not in packed.summary()


def test_compile_warns_when_no_layer_could_take_the_pattern():
    """pattern "2:3" on power-of-two widths returned a model with no sparse layer, and only the printed
    plan said so: a caller who did not print it believed the model sparse."""
    model, x = _mlp()
    with pytest.warns(UserWarning, match=r"no layer was made sparse with pattern '2:3'.*0: reduction size K = "
                                         r"in_features = 64 is not a multiple of M=3.*and 1 more") as caught:
        cm = sparsec.compile(model, pattern="2:3", example_inputs=(x,), backend="torch")
    assert caught[0].filename == __file__  # points at the caller's line
    assert not cm.plan.sparse_layers
    with pytest.warns(UserWarning, match="0: first layer; 2: too small to matter"):
        sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="torch", min_weights=10 ** 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsec.compile(model, pattern="dense", example_inputs=(x,), backend="torch")
        sparsec.compile(model, pattern="2:4", example_inputs=(x,), backend="torch")
        plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), backend="torch")
        for lp in plan:
            lp.sparsity = None
        sparsec.compile(model, example_inputs=(x,), plan=plan)  # the caller's own choice


def test_no_warning_where_only_the_data_gradients_are_pruned():
    model, x = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = sparsec.compile(model, pattern="2:3", example_inputs=(x,), train=True, grad_pattern="2:4")
    assert not cm.plan.sparse_layers and any(lp.grad_sparsity for lp in cm.plan)
