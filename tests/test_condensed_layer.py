"""Constant fan-in layers on the CPU condensed kernel: chosen by measurement, exact, differentiable."""
import copy

import pytest
import torch

import sparsec
from oracle import load_example, output_error, pruned_model
from sparsec.plan import dtype_name
from sparsec.runtime import condensed_cpu
from sparsec.runtime.condensed_linear import CondensedLinear

# (per test, not for the module: the packing tests at the end need no kernel)
needs_kernel = pytest.mark.skipif(not condensed_cpu.is_available(), reason="the C++ condensed kernel did not build here")


def _condensed_plan(model, inputs):
    plan = sparsec.explain(model, pattern="fanin:0.9", example_inputs=inputs, backend="torch")
    for lp in plan.sparse_layers:
        lp.backend = "condensed"
    return plan


@needs_kernel
def test_auto_measures_and_records_the_choice():
    model, inputs = load_example("mlp").build_model()
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=inputs)
    assert cm.plan.sparse_layers
    for lp in cm.plan.sparse_layers:
        assert lp.backend in ("condensed", "dense")
        assert "backend auto at M=8: " in lp.reason and "us" in lp.reason


@needs_kernel
def test_kernel_runs_in_grad_mode_and_gradients_match_the_reference():
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,)))
    assert all(isinstance(cm.sparse_module(lp.name), CondensedLinear) for lp in cm.plan.sparse_layers)
    ref = pruned_model(model, cm.plan)
    condensed_cpu.calls.clear()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = cm(xa), ref(xb)
    assert condensed_cpu.calls["fast"] == 2 and not condensed_cpu.calls["fallback"]
    assert output_error(ya, yb) <= 1e-5
    G = torch.randn_like(ya)
    (ya * G).sum().backward()
    (yb * G).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(cm.sparse_module("fc2").bias.grad, ref.fc2.bias.grad, atol=1e-5)


@needs_kernel
def test_other_dtypes_fall_back_to_the_reference():
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,)))
    double = copy.deepcopy(cm).double()
    with torch.no_grad():
        assert output_error(double(x.double()), pruned_model(model.double(), cm.plan)(x.double())) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_16_bit_layers_run_the_kernel_in_float32(dtype, tolerance):
    """A bfloat16 / float16 model compiled onto the kernel, and a float32 one cast after compiling: the
    kernel multiplies float32 values, y comes back in the model's dtype and equals the oracle's pruned
    model within that dtype's rounding."""
    model, (x,) = load_example("mlp").build_model()
    cast = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,))).to(dtype)
    model16 = copy.deepcopy(model).to(dtype)
    native = sparsec.compile(model16, example_inputs=(x.to(dtype),), plan=_condensed_plan(model16, (x.to(dtype),)))
    for cm, expected in ((cast, pruned_model(model, cast.plan).to(dtype)), (native, pruned_model(model16, native.plan))):
        condensed_cpu.calls.clear()
        with torch.no_grad():
            y = cm(x.to(dtype))
            assert y.dtype == dtype and condensed_cpu.calls["fast"] == 2 and not condensed_cpu.calls["fallback"]
            assert output_error(y.double(), expected(x.to(dtype)).double()) <= tolerance


@needs_kernel
def test_save_load_rebuilds_the_kernel_layout(tmp_path):
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,)))
    with torch.no_grad():
        expected = cm(x)
    sparsec.save(cm, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(sparsec.load(tmp_path / "m")(x), expected)


@needs_kernel
def test_auto_measures_each_distinct_shape_once():
    model, inputs = load_example("transformer").build_model()
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=inputs)
    measured = [lp for lp in cm.plan.sparse_layers if "measured on" not in lp.reason]
    reused = [lp for lp in cm.plan.sparse_layers if "measured on" in lp.reason]
    # 256x256 (q, k, v, out) and 1024x256 / 256x1024 MLP layers: 3 shapes, 8 sparse layers
    assert len(measured) == 3 and len(reused) == len(cm.plan.sparse_layers) - 3
    for lp in reused:
        source = lp.reason.split("measured on ")[1].split(",")[0]
        assert cm.plan[source].weight_shape == lp.weight_shape and cm.plan[source].backend == lp.backend


@needs_kernel
def test_torch_compile_traces_the_condensed_kernel():
    """torch.compile of a model with condensed layers: the kernel layout is built eagerly, once (it
    reads tensor values, which TorchDynamo cannot trace), and from then on the forward traces into one
    graph with the C++ kernel in it (its shape-only Meta version lets the tracer through)."""
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,)))
    with torch.no_grad():
        expected = pruned_model(model, cm.plan)(x)
        cold = torch.compile(copy.deepcopy(cm), backend="aot_eager")  # (a copy has no layouts yet)
        assert output_error(cold(x), expected) <= 1e-5 and output_error(cold(x), expected) <= 1e-5
        assert output_error(cm(x), expected) <= 1e-5  # eagerly: builds the layouts
        warm = torch._dynamo.explain(cm)(x)
    assert warm.graph_count == 1 and warm.graph_break_count == 0
    assert warm.graphs[0].code.count("sparsec_condensed.linear_") == len(cm.plan.sparse_layers)


@needs_kernel
def test_torch_export_holds_the_reference_not_the_kernel():
    """torch.export of a model with condensed layers: building the kernel layout reads tensor values
    (export failed: "data-dependent expression"); the exported program computes the same with
    portable ops, and runs where this process's C++ kernel does not exist."""
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=(x,), plan=_condensed_plan(model, (x,)))
    exported = torch.export.export(cm, (x,))
    assert "sparsec_condensed" not in str(exported.graph)
    with torch.no_grad():
        assert output_error(exported.module()(x), pruned_model(model, cm.plan)(x)) <= 1e-5
        condensed_cpu.calls.clear()
        cm(x)
    assert condensed_cpu.calls["fast"] > 0 and not condensed_cpu.calls["fallback"]  # eagerly the kernel still runs


# --------------------------------------------------------------------------- packing edge cases (no kernel needed)


@pytest.mark.parametrize("pattern", ["fanin:0.5", "2:4", "1:4"])
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("dense", [False, True])
def test_a_weight_with_no_output_rows_is_refused_clearly(pattern, quant, dense):
    """Zero output rows: FanInPacked.pack raised IndexError (reading row 0's count), NMPacked and
    DensePacked a RuntimeError from a reshape; every format now refuses it alike, naming the shape
    (the compiler keeps such a layer dense before it gets here, see the next test)."""
    from sparsec.patterns import parse_pattern
    from sparsec.runtime.packed import DensePacked, PackedWeight

    cls = DensePacked if dense else PackedWeight
    with pytest.raises(ValueError, match=r"rows shape \(0, 16\).*no output rows"):
        cls.pack(torch.randn(0, 16), torch.zeros(0, 16, dtype=torch.bool), parse_pattern(pattern), quant)
    with pytest.raises(ValueError, match=r"mask shape \(4, 8\) does not match rows shape \(4, 16\)"):
        cls.pack(torch.randn(4, 16), torch.ones(4, 8, dtype=torch.bool), parse_pattern(pattern), quant)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_one_row_fan_in_weight_packs_and_round_trips(quant):
    """The smallest layer that packs: one output row keeps its k largest weights."""
    from sparsec.patterns import parse_pattern
    from sparsec.runtime.packed import FanInPacked, PackedWeight

    rows = torch.tensor([[0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.0, -4.0]])
    mask = rows.abs() >= 2.0
    packed = PackedWeight.pack(rows, mask, parse_pattern("fanin:0.5"), quant)
    assert isinstance(packed, FanInPacked) and packed.k == 3 and packed.out_features == 1
    assert torch.equal(packed.mask(), mask)
    expected = torch.where(mask, rows, 0.0)
    torch.testing.assert_close(packed.rows(), expected, rtol=0, atol=0 if quant is None else 4.0 / 254)


def test_mask_bits_of_no_rows():
    from sparsec.runtime.packed import pack_mask_bits, unpack_mask_bits

    bits = pack_mask_bits(torch.zeros(0, 10, dtype=torch.bool))
    assert bits.shape == (0, 2) and unpack_mask_bits(bits, 10).shape == (0, 10)


@pytest.mark.parametrize("pattern", ["fanin:0.5", "2:4"])
def test_a_model_with_an_empty_layer_compiles_with_that_layer_dense(pattern):
    """A Linear(16, 0) beside real layers (every layer forced in): it stays dense with the reason, the
    others are packed, and the compiled model computes what the original does."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.empty, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 0), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.empty(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x = M(), torch.randn(4, 16)
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), min_weights=0, include=[".*"], backend="torch")
    assert cm.plan["empty"].sparsity is None and "no elements" in cm.plan["empty"].reason
    assert cm.plan["a"].sparsity == cm.plan["b"].sparsity == pattern
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


# --------------------------------------------------------------------------- condense (after fan-in training)


def _trained_fanin_mlp():
    """A train=True fan-in MLP with what training leaves: masked weights moved off their init and two
    neurons of the hidden layer ablated (all-zero rows, mask False)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    x = torch.randn(8, 48)
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=(x,), train=True, include=[".*"], min_weights=0)
    with torch.no_grad():
        for name in ("0", "2", "4"):
            layer = cm.sparse_module(name)
            layer.weight.add_(torch.randn_like(layer.weight) * 0.1).mul_(layer.weight_mask)
        hidden = cm.sparse_module("2")
        hidden.weight_mask[[3, 7]] = False
        hidden.weight[[3, 7]] = 0
    return model, cm.eval()


def _masked_copy(model, cm):
    """Plain torch: `model` with each trained layer's weight * mask and its bias."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lp in cm.plan:
            layer, plain = cm.sparse_module(lp.name), ref.get_submodule(lp.name)
            plain.weight.copy_(layer.weight * layer.weight_mask)
            plain.bias.copy_(layer.bias)
    return ref


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_condense_without_inputs_follows_a_dtype_conversion_after_compiling(dtype, tolerance):
    """A model compiled in float32, then converted (trained in 16 bits): condense() with no example
    inputs made float32 ones from the compile-time spec, and the converted layers refused them
    ("the example inputs do not fit the model", though none were passed)."""
    model, cm = _trained_fanin_mlp()
    cm = cm.to(dtype)
    small = cm.condense(backend="torch")
    assert all(lp.dtype == dtype_name(dtype) for lp in small.plan)
    x = torch.randn(5, 48, dtype=dtype)
    with torch.no_grad():
        assert output_error(small(x).double(), _masked_copy(model, cm).to(dtype)(x).double()) <= tolerance


def test_a_condensed_plan_says_it_keeps_the_learned_masks():
    """condense compiles with pattern "dense" (layers not trained sparse stay dense), so its plan read
    "sparsec plan (pattern dense)" above fan-in layers: a user took the model for a dense one."""
    _, cm = _trained_fanin_mlp()
    small = cm.condense(backend="torch")
    sparse = {lp.sparsity for lp in small.plan if lp.sparsity}
    assert small.plan.pattern == "dense" and sparse
    assert str(small.plan).splitlines()[0] == f"sparsec plan (pattern dense; layers keep their existing masks: " \
                                              f"{', '.join(sorted(sparse))})"
    assert str(cm.plan).splitlines()[0] == f"sparsec plan (pattern {cm.plan.pattern})"  # (masks not yet learned)
