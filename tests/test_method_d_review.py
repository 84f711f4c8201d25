"""Review of method (d) (pattern "unstructured:S" stored as CSR, the direct sparse conv, non-linear levels) in the
rest of sparsec: torch.compile / torch.export, what a layer's output looks like to the ops after it, state dicts
from another stored form, corrupt level tables, dtype conversions, shrink and edited plans. Every result is
checked against plain torch running the independent oracle's pruned (and levels-quantized) weights."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import oracle_log2, oracle_unstructured_mask, output_error, pruned_model
from sparsec.errors import InvalidInputError
from sparsec.runtime import csr_linear
from sparsec.runtime.csr_linear import CsrLinear
from sparsec.runtime.direct_conv_layer import DirectSparseConv2d


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(6, 48)


def _compiled(model, x, backend, quantize=None, pattern="unstructured:0.9"):
    """`model` compiled with every layer `pattern`, each on `backend` (set in the plan, no timing)."""
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), quantize=quantize, include=[".*"],
                           min_weights=0, backend="torch")
    for lp in plan:
        lp.backend = backend
    return sparsec.compile(model, example_inputs=(x,), plan=plan)


class _Flattening(nn.Module):
    """A linear layer's output flattened with .view(), as plain torch allows on nn.Linear's row-major output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(3 * 512, 4)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))).view(1, -1))


def test_csr_layer_output_is_row_major_as_nn_linears_and_compiles_whole():
    """The CSR product's output was its transpose's view (column-major): a .view() after the layer failed where
    the plain model runs, and torch.compile(fullgraph=True) refused the operator, whose fake output is
    row-major."""
    torch.manual_seed(0)
    model, x = _Flattening(), torch.randn(3, 64)
    cm = _compiled(model, x, "csr")
    assert all(isinstance(cm.sparse_module(lp.name), CsrLinear) for lp in cm.plan)
    oracle = pruned_model(model, cm.plan)
    csr_linear.calls.clear()
    with torch.no_grad():
        assert output_error(cm(x), oracle(x)) <= 1e-5
        assert csr_linear.calls["fast"] == 3  # the CSR product ran every layer
        assert cm.sparse_module("b")(torch.randn(3, 512)).is_contiguous()
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert output_error(compiled(x), oracle(x)) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "csr", "dense"])
def test_levels_layers_compile_and_export(backend):
    """Dequantizing level codes checked them against the table with a data-dependent read, so
    torch.compile(fullgraph=True) and torch.export failed on every torch / csr layer with levels."""
    model, x = _mlp()
    cm = _compiled(model, x, backend, quantize="log2:4")
    oracle = pruned_model(model, cm.plan)  # the oracle's mask, then its own log2 levels (numpy)
    assert all(lp.quant == "log2:4" for lp in cm.plan)
    for lp in cm.plan:
        assert torch.equal(cm.effective_weight(lp.name), oracle.get_submodule(lp.name).weight.detach())
    with torch.no_grad():
        want = oracle(x)
        assert output_error(cm(x), want) <= 1e-5
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert output_error(compiled(x), want) <= 1e-5
    exported = torch.export.export(cm, (x,))
    with torch.no_grad():
        assert output_error(exported.module()(x), want) <= 1e-5


def test_oracle_log2_is_what_the_levels_say():
    """(The oracle used above: every nonzero is +-2^e with e in the top 7 exponents, zeros stay.)"""
    w = torch.tensor([[0.0, 0.3, -1.5, 2.9e-3], [-0.7, 0.0, 5.0, -1e-6]])
    q = oracle_log2(w, 4)
    assert torch.equal(q, torch.tensor([[0.0, 0.25, -2.0, 2.0 ** -4], [-0.5, 0.0, 4.0, -2.0 ** -4]]))


@pytest.mark.parametrize("backend", ["torch", "csr"])
@pytest.mark.parametrize("corrupt, message", [("code", "corrupt level codes: code 200"),
                                              ("zero", "corrupt level table: code 0 must be exactly 0"),
                                              ("nan", "corrupt level table")])
def test_corrupt_level_codes_or_table_are_refused_when_loaded(backend, corrupt, message):
    """A state dict's codes and table are checked as it loads (the per-call check no longer runs under
    torch.compile): a torch-backend layer loaded them and computed with a table whose code 0 was not 0, or
    NaN, silently."""
    model, x = _mlp()
    cm = _compiled(model, x, backend, quantize="codebook:3")
    state = cm.state_dict()
    codes = next(k for k in state if k.endswith("2.packed.values"))
    table = next(k for k in state if k.endswith("2.packed.table"))
    bad = dict(state)
    if corrupt == "code":
        bad[codes] = state[codes].clone()
        bad[codes][5] = 200
    else:
        bad[table] = state[table].clone()
        bad[table][0 if corrupt == "zero" else 3] = 1.0 if corrupt == "zero" else float("nan")
    with pytest.raises(InvalidInputError, match=message):
        copy.deepcopy(cm).load_state_dict(bad)
    again = copy.deepcopy(cm)
    again.load_state_dict(state)  # the state dict as saved loads
    with torch.no_grad():
        assert torch.equal(again(x), cm(x))


def test_state_dict_of_another_stored_form_or_quantization_is_refused_naming_why():
    """backend auto picks CSR or the pruned weight kept dense per layer by timing, and the check naming that
    did not know CSR: torch's missing / unexpected keys instead. A state dict of another quantization loaded
    with strict=False copied float values into level codes (or codes into floats) and ran silently wrong."""
    model, x = _mlp()
    csr, dense = _compiled(model, x, "csr"), _compiled(model, x, "dense")
    for source, target, words in ((csr, dense, "stored here as the pruned weight kept dense .* as CSR values"),
                                  (dense, csr, "stored here as CSR values .* as the pruned weight kept dense")):
        for strict in (True, False):
            with pytest.raises(InvalidInputError, match=words):
                copy.deepcopy(target).load_state_dict(source.state_dict(), strict=strict)
    levels, plain = _compiled(model, x, "torch", quantize="log2:4"), _compiled(model, x, "torch")
    for source, target, words in ((plain, levels, "holds level codes with a table here and float values"),
                                  (levels, plain, "holds float values here and level codes with a table")):
        with pytest.raises(InvalidInputError, match=words):
            copy.deepcopy(target).load_state_dict(source.state_dict(), strict=False)
    # the same form on another backend loads, and computes the source's results
    torch_backend = _compiled(model, x, "torch")
    torch_backend.load_state_dict(csr.state_dict())
    with torch.no_grad():
        assert output_error(torch_backend(x), pruned_model(model, csr.plan)(x)) <= 1e-5


def _convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
    return model, torch.randn(2, 3, 6, 6)


def test_direct_conv_layers_compile_whole():
    """Under torch.compile the direct conv's operator took its output shape from the layer's reference on its
    real packed weight, inside the tracer's fake mode: "Please convert all Tensors to FakeTensors first"."""
    model, x = _convnet()
    cm = sparsec.compile(model, pattern="unstructured:0.7", example_inputs=(x,), backend="triton", include=[".*"])
    assert isinstance(cm.sparse_module("0"), DirectSparseConv2d) and isinstance(cm.sparse_module("2"), DirectSparseConv2d)
    oracle = pruned_model(model, cm.plan)
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True)
    with torch.no_grad():
        for xx in (x, torch.randn(1, 3, 6, 6)):
            assert output_error(compiled(xx), oracle(xx)) <= 1e-5


def test_a_direct_conv_model_refuses_a_dtype_its_kernel_cannot_run():
    """cm.double() converted the layer, and every later call failed in the kernel's launcher (it takes float16
    / float32, bfloat16 on a GPU): refused up front, as for the Triton matmul layers, leaving the model as it
    was; float16 converts."""
    model, x = _convnet()
    cm = sparsec.compile(model, pattern="unstructured:0.7", example_inputs=(x,), backend="triton", include=[".*"])
    with pytest.raises(InvalidInputError, match="runs the direct sparse conv kernel.*float64"):
        cm.double()
    assert cm.sparse_module("0").packed.dtype_probe.dtype == torch.float32
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
        half = copy.deepcopy(cm).half()
        assert half(x.half()).dtype == torch.float16
        assert output_error(half(x.half()).float(), pruned_model(model, cm.plan)(x)) <= 1e-2


@pytest.mark.parametrize("groups, channels", [(1, 4), (2, 6), (2, 2)])
def test_a_direct_conv_layer_refuses_an_input_of_other_channels_as_f_conv2d(groups, channels):
    """The kernel's CSR columns only bound C/groups * R * S from above: an input with more channels ran (the
    extra ones ignored, or with groups the channels of each group misplaced), one with fewer failed as a
    "corrupt CSR weight"; plain torch raises RuntimeError naming the channels."""
    torch.manual_seed(0)
    in_channels = 2 * groups
    model = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, groups=groups), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, in_channels, 6, 6)
    cm = sparsec.compile(model, pattern="unstructured:0.6", example_inputs=(x,), backend="triton", include=[".*"])
    assert isinstance(cm.sparse_module("0"), DirectSparseConv2d)
    bad = torch.randn(2, channels, 6, 6)
    with pytest.raises(RuntimeError):
        model(bad)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=f"expects an input with {in_channels} channels"):
            cm(bad)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_shrink_keeps_sr_ste_unstructured_layers_whole():
    """SR-STE derives an unstructured layer's mask from its weight on every forward, keeping numel - round(S *
    numel): shrink removed all-zero rows, and the smaller layers then kept fewer weights (192 -> 129) and
    computed other outputs. Such a layer is pinned, as SR-STE fan-in is; a fixed mask shrinks and computes alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(6, 48)
    for update in ("ste", "fixed"):
        cm = sparsec.compile(model, pattern="unstructured:0.7", example_inputs=(x,), include=[".*"], train=True,
                             weight_update=update)
        with torch.no_grad():
            cm.graph_module.get_submodule("2").weight[:20] = 0  # 20 whole output rows of layer 2
            expected = cm(x)
        small = sparsec.shrink(cm)
        with torch.no_grad():
            assert output_error(small(x), expected) <= 1e-5
        if update == "ste":
            assert [lp.weight_shape for lp in small.plan] == [lp.weight_shape for lp in cm.plan]
            assert "SR-STE unstructured sparsity re-derives its kept count" in str(small.shrink_report)
        else:
            assert small.plan["2"].weight_shape[0] < 64


def test_a_plan_spelling_a_pattern_another_way_compiles_it():
    """parse_pattern accepts " unstructured:0.90" (whitespace, trailing zeros, 9e-1), but the passes after
    selection read the plan's text: backend auto took the layer for N:M and crashed ("values (6554,) must be
    [out, nnz]"). The compiled plan spells the pattern as sparsec does."""
    model, x = _mlp()
    for spelling in (" unstructured:0.90", "unstructured:9e-1"):
        for backend in (None, "csr"):
            plan = sparsec.explain(model, pattern="unstructured:0.9", example_inputs=(x,), include=[".*"],
                                   backend="torch")
            plan["2"].sparsity, plan["2"].backend = spelling, backend
            cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
            assert cm.plan["2"].sparsity == "unstructured:0.9" and cm.plan["2"].backend in ("csr", "dense")
            assert torch.equal(cm.mask("2"), oracle_unstructured_mask(model[2].weight.detach(), 0.9))
            with torch.no_grad():
                assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_csr_product_never_multiplies_a_pruned_weight():
    """README "Semantics": an inf input reaches only the outputs whose kept weights read it (the dense form's
    0 * inf spreads NaN to every output); the other outputs, and every other row, are plain torch's."""
    model, x = _mlp()
    cm = _compiled(model, x, "csr")
    layer, mask, weight = cm.sparse_module("0"), cm.mask("0"), cm.effective_weight("0")
    xi = x.clone()
    xi[0, 7] = float("inf")
    with torch.no_grad():
        y = layer(xi)
        want = F.linear(x, weight, layer.bias)
        without = F.linear(torch.where(torch.isinf(xi), 0.0, xi), weight, layer.bias)  # input 7 read by no one
    reads = mask[:, 7]
    assert 0 < int(reads.sum()) < mask.shape[0]
    assert output_error(y[1:], want[1:]) <= 1e-6
    assert not torch.isfinite(y[0, reads]).any()
    assert output_error(y[0, ~reads], without[0, ~reads]) <= 1e-6
