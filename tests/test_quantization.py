"""int8 weights (quantize="int8" / "auto") against a plain-torch reference written from the contract:
per output channel (a row of the [out, K] view; `x @ W`: a column of W), symmetric, float32 scale
max|row| / 127, round to nearest, clamp to [-127, 127], zeros stay zero."""
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.plan import Plan


def reference_int8(pruned: torch.Tensor) -> torch.Tensor:
    """Dequantized rows, computed in float64 from float32 scales (independent of sparsec's code)."""
    w = pruned.double()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = (absmax.float() / 127).double()
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale).clamp(-127, 127) * scale


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    with torch.no_grad():
        model.b.weight[3] = 0           # an all-zero row: nothing to divide by
        model.b.weight[5, 7] = 1000.0   # one huge outlier: a coarse step for that row only
    return model


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.75"])
def test_int8_weight_and_output_match_the_per_channel_reference(pattern, backend):
    model = _model()
    x = torch.randn(4, 64)
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), quantize="int8", include=["b"], backend=backend)
    assert cm.plan["b"].quant == "int8"
    mask = cm.mask("b")
    expected = reference_int8(model.b.weight.detach() * mask)
    # q * scale rounded once to float32, the layer's dtype
    assert torch.equal(cm.effective_weight("b"), expected.float())
    assert (cm.effective_weight("b")[3] == 0).all()
    with torch.no_grad():
        h = torch.relu(model.a(x))
        y_ref = model.c(torch.relu(F.linear(h, expected.float(), model.b.bias)))
        assert torch.allclose(cm(x), y_ref, rtol=1e-5, atol=1e-5)


def test_auto_reason_states_the_measured_error_and_flush_fraction():
    model = _model()
    x = torch.randn(4, 64)
    for column_outliers, expect in ((False, "int8"), (True, None)):
        if column_outliers:
            with torch.no_grad():
                model.b.weight[:, 0] = 100.0  # every row: one outlier, most kept weights flush to 0
        cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="auto", include=["b"], backend="torch")
        lp = cm.plan["b"]
        pruned = (model.b.weight.detach() * cm.mask("b")).double()
        deq = reference_int8(pruned)
        error = float((deq - pruned).norm() / pruned.norm())
        flushed = float(((deq == 0) & (pruned != 0)).sum() / (pruned != 0).sum())
        stated_error = float(re.search(r"relative weight error ([\d.]+)%", lp.reason).group(1)) / 100
        stated_flushed = float(re.search(r"([\d.]+)% of kept weights flushed", lp.reason).group(1)) / 100
        assert stated_error == pytest.approx(error, abs=5e-5)
        assert stated_flushed == pytest.approx(flushed, abs=5e-4)
        assert lp.quant == expect
        assert (error <= 0.02 and flushed <= 0.05) == (expect == "int8")


def test_float64_weight_beyond_float32_scale_range_is_not_quantized():
    """A float64 row with max|w| / 127 beyond float32's range: its float32 scale was inf and the
    layer computed with NaN weights under quantize="int8" (the plan said "relative weight error nan%")."""
    model = _model(torch.float64)
    with torch.no_grad():
        model.b.weight.mul_(1e300)
    x = torch.randn(4, 64, dtype=torch.float64)
    for quantize in ("int8", "auto"):
        cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize=quantize, include=["b"], backend="torch")
        lp = cm.plan["b"]
        assert lp.quant is None and "overflows to inf" in lp.reason, lp.reason
        weight = cm.effective_weight("b")
        assert torch.isfinite(weight).all()
        assert torch.equal(weight, model.b.weight.detach() * cm.mask("b"))


def test_tiny_weight_whose_scale_underflows_is_not_quantized():
    """float32 rows with max|w| ~1e-44: max|w| / 127 underflows to 0 in float32, and int8 turned every
    kept weight into 0."""
    model = _model()
    with torch.no_grad():
        model.b.weight.mul_(1e-43)
    x = torch.randn(4, 64)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="int8", include=["b"], backend="torch")
    lp = cm.plan["b"]
    assert lp.quant is None and "underflows to 0" in lp.reason, lp.reason
    kept = model.b.weight.detach() * cm.mask("b")
    assert int((kept != 0).sum()) > 0
    assert torch.equal(cm.effective_weight("b"), kept)


def test_a_plan_asking_int8_for_a_weight_int8_cannot_store_is_refused():
    model = _model(torch.float64)
    x = torch.randn(4, 64, dtype=torch.float64)
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), include=["b"], backend="torch")
    plan = Plan.from_json(plan.to_json())
    plan["b"].quant = "int8"
    with torch.no_grad():
        model.b.weight.mul_(1e300)
    with pytest.raises(ValueError, match=r"plan layer 'b': quant 'int8' cannot store this weight: .*overflows to inf.*"
                                         r"set the entry's quant to None"):
        sparsec.compile(model, example_inputs=(x,), plan=plan, backend="torch")


def test_int8_scales_follow_the_output_columns_of_a_matmul_weight():
    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.W, self.c = nn.Linear(64, 64), nn.Parameter(torch.randn(64, 48)), nn.Linear(48, 8)

        def forward(self, x):
            return self.c(torch.relu(torch.relu(self.a(x)) @ self.W))

    torch.manual_seed(0)
    model = MatMul()
    with torch.no_grad():
        model.W[0, 3] = 50.0  # an outlier in output column 3 must coarsen only that column
    x = torch.randn(4, 64)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="int8", include=["W"], backend="torch")
    expected = reference_int8((model.W.detach() * cm.mask("W")).t()).t()
    assert torch.allclose(cm.effective_weight("W").double(), expected, rtol=0, atol=50 * 2.0 ** -23)
    assert not math.isclose(float(expected[:, 3].abs().max()), float(expected[:, 4].abs().max()))


def test_condense_int8_with_a_fully_ablated_layer_kept_by_a_residual():
    """Every neuron of f1 ablated, but a residual add keeps its channels: after condense its fan-in
    is k = 0 (values [64, 0]), and packing those values as int8 raised IndexError (amax over an empty
    dim), so cm.condense(quantize="int8") failed."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f0, self.f1, self.f2, self.f3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            h = torch.relu(self.f0(x))
            return self.f3(torch.relu(self.f2(torch.relu(h + self.f1(h)))))

    torch.manual_seed(0)
    model = Residual()
    x = torch.randn(8, 16)
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=(x,), train=True, include=["f1", "f2"], min_weights=0)
    f1 = cm.sparse_module("f1")
    with torch.no_grad():  # what SRigL's ablation leaves: no kept weight in any row
        f1.weight_mask.zero_()
        f1.weight.zero_()
    cm.eval()
    small = cm.condense(quantize="int8", backend="torch")
    assert small.plan["f2"].quant == "int8"
    # plain torch: f1 contributes its bias only; f2 computes with its int8-dequantized pruned weight
    w2 = reference_int8(cm.sparse_module("f2").weight.detach() * cm.mask("f2")).float()
    with torch.no_grad():
        h = torch.relu(F.linear(x, model.f0.weight, model.f0.bias))
        z = torch.relu(h + cm.sparse_module("f1").bias)
        expected = F.linear(torch.relu(F.linear(z, w2, cm.sparse_module("f2").bias)), model.f3.weight, model.f3.bias)
        assert torch.allclose(small(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget, stated", [(0.005, "0.5%"), (0.0125, "1.25%"), (0.02, "2%"), (0.3, "30%")])
def test_auto_reason_states_the_budget_it_was_held_to(budget, stated):
    # ":.0%" stated quant_budget=0.005 as "budget 0%" (and 0.0125 as 1%)
    model, x = _model(), torch.randn(4, 64)
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), quantize="auto", include=["b"],
                           quant_budget=budget, backend="torch")
    lp = plan["b"]
    assert f"budget {stated} / 5%" in lp.reason, lp.reason
    error = float(re.search(r"relative weight error ([\d.]+)%", lp.reason).group(1)) / 100
    assert (lp.quant == "int8") == (error <= budget)  # the stated budget is the one applied


@pytest.mark.parametrize("quant", ["int8", "codebook:4"])
def test_quantize_that_no_layer_takes_is_warned_about(quant):
    """A compiled model compiled again runs its packed layers as they are, and pattern 'dense' makes no layer
    sparse: quantize= changed nothing there, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(4, 64)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    with pytest.warns(UserWarning, match=rf"quantize='{quant}' was applied to no layer: layers \['2'\] were packed"):
        again = sparsec.compile(cm, example_inputs=(x,), quantize=quant)
    assert all(lp.quant is None for lp in again.plan)
    with pytest.warns(UserWarning, match="applied to no layer: quantization applies to the layers made sparse"):
        sparsec.compile(model, pattern="dense", example_inputs=(x,), quantize=quant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparsec.compile(model, example_inputs=(x,), quantize=quant).plan["2"].quant == quant
