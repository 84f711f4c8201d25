"""quantize="log2:B" / "codebook:B" (method (d)'s non-linear levels) through the compiler: every sparse layer
stores uint8 codes into one float32 table, whatever its pattern, and computes with the levels of its pruned
weight (the oracle's mask); the backends that read float or int8 values directly say why they do not run it.
The levels themselves are tested against numpy in tests/test_levels.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import load_example, output_error, pruned_weight
from sparsec.levels import fake_quant_levels


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(6, 48)


def _expected_weight(model, name, pattern, quant):
    w = model.get_submodule(name).weight.detach()
    return fake_quant_levels(pruned_weight(w, "linear", pattern, None), quant)


@pytest.mark.parametrize("pattern, backend", [("unstructured:0.9", "torch"), ("unstructured:0.9", "csr"),
                                              ("unstructured:0.9", "dense"), ("2:4", "torch"), ("fanin:0.8", "condensed"),
                                              ("fanin:0.8", "torch"), ("2:4", None)])
@pytest.mark.parametrize("quant", ["log2:4", "codebook:4"])
def test_levels_on_every_pattern_and_backend(pattern, backend, quant):
    model, x = _mlp()
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), quantize=quant, backend="torch")
    for lp in plan.sparse_layers:
        lp.backend = backend
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    lp = cm.plan["2"]
    assert lp.quant == quant and f"{quant} levels, one table for the layer" in lp.reason
    w = cm.effective_weight("2")
    assert torch.equal(w, _expected_weight(model, "2", pattern, quant))
    nonzero = w[w != 0].double()
    assert not bool(w[~cm.mask("2")].any())  # zeros stay zero
    if quant.startswith("codebook"):
        assert nonzero.unique().numel() <= 15
    else:  # every kept weight is +-2^e
        assert torch.equal(nonzero.abs().log2(), nonzero.abs().log2().round())
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle[2].weight.copy_(w)
        assert output_error(cm(x), oracle(x)) <= 1e-5
    module = cm.sparse_module("2")
    if lp.backend not in ("dense", "condensed"):  # the stored form is what the plan counts
        held = sum(t.numel() * t.element_size() for t in module.packed.state_dict().values())
        assert held == lp.stored_bytes() and module.packed.values.dtype == torch.uint8
    if backend is None:  # auto on the CPU: the bitmask kernel reads float or int8 values
        assert lp.backend == "dense" and f"this layer stores {quant} level codes" in lp.reason


def test_triton_runs_unstructured_convs_with_levels_and_leaves_24_matmuls_to_torch():
    model, inputs = load_example("cnn").build_model()
    cm = sparsec.compile(model, pattern="unstructured:0.8", example_inputs=inputs, quantize="codebook:3",
                         backend="triton", include=[".*"])
    convs = [lp for lp in cm.plan if lp.op == "conv2d"]
    assert convs and all(lp.backend == "triton" and lp.quant == "codebook:3" for lp in convs)
    with torch.no_grad():
        for lp in convs:
            conv = model.get_submodule(lp.name)
            x = torch.randn(1, conv.in_channels, 8, 8)
            expected = F.conv2d(x, cm.effective_weight(lp.name), conv.bias, conv.stride, conv.padding, conv.dilation,
                                conv.groups)
            assert output_error(cm.sparse_module(lp.name)(x), expected) <= 1e-5
    matmul = sparsec.compile(*_mlp()[:1], pattern="2:4", example_inputs=(_mlp()[1],), quantize="log2:3",
                             backend="triton")
    lp = matmul.plan["2"]
    assert lp.backend == "torch" and "the Triton matmul kernels read float or int8 weights" in lp.reason


def test_plan_round_trip_save_load_and_dtype_conversion(tmp_path):
    model, x = _mlp()
    cm = sparsec.compile(model, pattern="unstructured:0.9", example_inputs=(x,), quantize="log2:5", backend="torch")
    assert sparsec.Plan.from_json(cm.plan.to_json()) == cm.plan
    with torch.no_grad():
        expected = cm(x)
        sparsec.save(cm, tmp_path / "m")
        loaded = sparsec.load(tmp_path / "m")
        assert torch.equal(loaded(x), expected)
        assert loaded.sparse_module("2").packed.quant == "log2:5"
        half = copy.deepcopy(cm.sparse_module("2")).half()
        assert half.packed.table.dtype == torch.float32  # the table is the format, as int8 scales are
        assert torch.equal(half.effective_weight(), cm.effective_weight("2").half())


def test_bad_levels_are_refused_with_the_accepted_forms():
    model, x = _mlp()
    for bad in ("log2:9", "codebook", "int4", "log2:1"):
        with pytest.raises(ValueError, match=r"'log2:B' / 'codebook:B' with 2 <= B <= 8"):
            sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize=bad)
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,))
    plan["2"].quant = "codebook:12"
    with pytest.raises(ValueError, match=r"quant 'codebook:12' is not one of None, \"int8\", \"log2:B\""):
        sparsec.compile(model, example_inputs=(x,), plan=plan)
    with pytest.raises(ValueError, match="quantize is for inference"):
        sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="log2:4", train=True)


@pytest.mark.parametrize("quant", ["codebook:4", "log2:4"])
@pytest.mark.parametrize("scale, words", [(None, "max |w| = 1e+300 is beyond"), (1e-300, "is below the range")])
def test_a_weight_the_levels_cannot_hold_stays_unquantized_or_is_refused_from_a_plan(quant, scale, words):
    """A float64 weight beyond float32's range, or a whole layer below its normal range: its float32 table would
    saturate it, silently wrong (a layer at 1e-300 was stored as +-2**-149, the codebook's of both signs as
    one value, and the plan said "relative weight error 0.00%")."""
    model, x = _mlp()
    model, x = model.double(), x.double()
    with torch.no_grad():
        if scale is None:
            model[2].weight[0, 0] = 1e300
        else:
            model[2].weight.mul_(scale)
    cm = sparsec.compile(model, pattern="unstructured:0.9", example_inputs=(x,), quantize=quant, backend="torch")
    assert cm.plan["2"].quant is None and f"{quant} cannot store it: max |w| = " in cm.plan["2"].reason
    assert words in cm.plan["2"].reason
    assert torch.equal(cm.effective_weight("2"), pruned_weight(model[2].weight.detach(), "linear", "unstructured:0.9",
                                                               None))
    plan = sparsec.explain(model, pattern="unstructured:0.9", example_inputs=(x,), backend="torch")
    plan["2"].quant = quant
    with pytest.raises(ValueError, match=f"plan layer '2': quant '{quant}' cannot store this weight"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


def test_a_codebook_state_dict_is_refused_by_a_log2_layer_of_the_same_bits():
    """The stored buffers have the same shapes: loaded, the codebook's values ran while plan and layer said log2."""
    model, x = _mlp()
    log2 = sparsec.compile(model, pattern="unstructured:0.9", example_inputs=(x,), quantize="log2:4", backend="torch")
    codebook = sparsec.compile(model, pattern="unstructured:0.9", example_inputs=(x,), quantize="codebook:4",
                               backend="torch")
    before = {k: v.clone() for k, v in log2.state_dict().items()}
    with pytest.raises(ValueError, match="not powers of two: the state dict comes from another quantization"):
        log2.load_state_dict(codebook.state_dict())
    after = log2.state_dict()  # refused before anything was copied: the model is as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    log2.load_state_dict(copy.deepcopy(log2).state_dict())  # its own loads


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_layers_codebook_is_fitted_once(backend, monkeypatch):
    """The analysis fits each layer's table to state what it costs; packing the layer, and timing its
    candidates under auto, reuse it (fitting is most of a codebook's time: seconds on a 4096 x 2048 layer)."""
    from sparsec import levels
    fits = []
    counts = levels._value_counts
    monkeypatch.setattr(levels, "_value_counts", lambda flat: fits.append(flat.numel()) or counts(flat))
    model, x = _mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="codebook:4", backend=backend,
                         include=["0", "2", "4"])
    sparse = cm.plan.sparse_layers
    assert len(sparse) == 3 and len(fits) == 3
    for lp in sparse:
        assert torch.equal(cm.effective_weight(lp.name), _expected_weight(model, lp.name, "2:4", "codebook:4"))


def test_the_per_weight_error_shows_a_codebook_collapsed_by_outliers():
    """One outlier input column (50 against weights below 0.09): the codebook's values go to the outliers and the
    rest share two, 28% off each, while the norm's error, dominated by the exactly kept outliers, read 0.29%. The
    plan's mean error per weight is computed here from the weights and the effective weight."""
    import re
    model, x = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.05)
        model[2].weight[:, 0] = 50.0
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="codebook:4", backend="torch")
    stated = float(re.search(r"([\d.]+)% of its magnitude per weight on average", cm.plan["2"].reason).group(1)) / 100
    pruned = pruned_weight(model[2].weight.detach(), "linear", "2:4", None).double()
    kept = pruned != 0
    actual = float(((cm.effective_weight("2").double() - pruned)[kept] / pruned[kept]).abs().mean())
    assert actual > 0.1 and stated == pytest.approx(actual, rel=1e-3, abs=1e-4)
