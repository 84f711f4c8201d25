"""Conv1d layers (audio / sequence stems such as Whisper's and wav2vec2's) are pruned like Conv2d:
N:M along in/groups * k, run as a conv2d of height 1. Checked against plain torch's F.conv1d on the
oracle-pruned weights, for every padding mode, stride, dilation and groups setting."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import lexsort_mask, output_error, pruned_model, shrunk_and_unchanged

CONVS = {
    "padding=1": dict(padding=1),
    "stride=2": dict(stride=2, padding=1),
    "dilation=2": dict(dilation=2, padding=2),
    "same": dict(padding="same"),
    "valid": dict(padding="valid"),
    "groups=2": dict(groups=2, padding=1),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "circular": dict(padding=2, padding_mode="circular"),
    "replicate, no bias": dict(padding=1, padding_mode="replicate", bias=False),
}


class Stem(nn.Module):
    """A speech-encoder stem: Conv1d -> GELU -> Conv1d (the one under test) -> GELU -> Linear."""

    def __init__(self, **conv):
        super().__init__()
        self.conv1 = nn.Conv1d(20, 64, 3, padding=1)
        self.conv2 = nn.Conv1d(64, 64, 3, **conv)
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):                       # x [B, 20, L]
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return self.head(torch.relu(self.proj(h.transpose(-1, -2))))


@pytest.mark.parametrize("setting", sorted(CONVS))
def test_conv1d_layers_are_pruned_along_in_channels_times_kernel(setting):
    torch.manual_seed(0)
    model, x = Stem(**CONVS[setting]).eval(), torch.randn(2, 20, 17)
    cm = sparsec.compile(model, example_inputs=(x,))
    lp = cm.plan["conv2"]
    groups = CONVS[setting].get("groups", 1)
    assert (lp.op, lp.sparsity, lp.weight_shape) == ("conv1d", "2:4", (64, 64 // groups, 3)), lp.reason
    assert f"K = in/groups*k = {64 // groups}*3 = {64 // groups * 3}" in lp.reason
    assert (cm.mask("conv2").reshape(64, -1, 4).sum(-1) == 2).all()
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_conv1d_through_torch_export_and_the_functional_form():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv1d(8, 32, 1)
            self.w = nn.Parameter(torch.randn(32, 16, 3) / 8)
            self.out = nn.Conv1d(32, 4, 1)

        def forward(self, x):
            h = F.conv1d(self.inp(x), self.w, None, 1, 1, 1, 2)  # stride, padding, dilation, groups positionally
            if x.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
                h = h * 1.0
            return self.out(torch.relu(h))

    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(3, 8, 10)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export" and cm.plan.names == ["inp", "w", "out"]
    assert (cm.plan["w"].op, cm.plan["w"].sparsity) == ("conv1d", "2:4")
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert not hasattr(cm.graph_module, "w")


def test_an_unbatched_input_and_a_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model, x = Stem(padding=1).eval(), torch.randn(20, 9)  # Conv1d takes [C, L] too
    cm = sparsec.compile(model, example_inputs=(x,), quantize="int8")
    assert cm.plan["conv2"].quant == "int8"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    sparsec.save(cm, tmp_path / "stem.sparsec")
    assert torch.equal(sparsec.load(tmp_path / "stem.sparsec")(x), cm(x))


def _prune_channels(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[N, C, L]: N:M along C at each (n, l), independent of sparsec."""
    t = g.permute(0, 2, 1)
    return (t * lexsort_mask(t.reshape(*t.shape[:-1], -1, m), n).reshape(t.shape)).permute(0, 2, 1)


def test_conv1d_sdgp_prunes_the_data_gradient_along_channels():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, stride=2)), torch.randn(2, 8, 11)
    plan = sparsec.explain(model, pattern="dense", example_inputs=(x,))
    plan["0"].sparsity, plan["0"].grad_sparsity = "2:4", "2:4"
    cm = sparsec.compile(model, example_inputs=(x,), train=True, plan=plan)
    xg = x.clone().requires_grad_(True)
    y = cm(xg)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    w = cm.effective_weight("0")
    assert torch.allclose(y, F.conv1d(x, w, model[0].bias, stride=2, padding=1), atol=1e-5)
    expected = torch.nn.grad.conv1d_input(x.shape, w, _prune_channels(G, 2, 4), stride=2, padding=1)
    assert torch.allclose(xg.grad, expected, atol=1e-5)
    assert not torch.allclose(xg.grad, torch.nn.grad.conv1d_input(x.shape, w, G, stride=2, padding=1), atol=1e-3)
    dense_wgrad = torch.nn.grad.conv1d_weight(x, w.shape, G, stride=2, padding=1)
    assert torch.allclose(cm.sparse_module("0").weight.grad, dense_wgrad * cm.mask("0"), atol=1e-4)


def test_training_a_conv1d_stem_keeps_its_masks():
    torch.manual_seed(0)
    model, x = Stem(padding=1, padding_mode="reflect").train(), torch.randn(4, 20, 16)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, grad_pattern="2:4")
    assert cm.plan["conv2"].sparsity == "2:4" and cm.plan["conv2"].grad_sparsity == "2:4"
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    before = cm.effective_weight("conv2").clone()
    for _ in range(3):
        cm(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after, mask = cm.effective_weight("conv2"), cm.mask("conv2")
    assert not torch.equal(after, before) and (after[~mask] == 0).all()


def test_shrink_removes_dead_conv1d_channels():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(8, 32, 3, padding=1), nn.Conv1d(32, 16, 3, padding=1)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))).mean(-1))

    torch.manual_seed(0)
    model, x = Plain().eval(), torch.randn(2, 8, 10)
    with torch.no_grad():
        model.a.weight[:5] = 0
        model.a.bias[:5] = -1.0  # channels 0-4 of relu(a(x)) are 0 everywhere
    small = shrunk_and_unchanged(model, x)
    assert small.shrink_report["a"].removed == [0, 1, 2, 3, 4]
    assert small.graph_module.a.weight.shape == (27, 8, 3) and small.graph_module.b.weight.shape == (16, 27, 3)


def test_a_customized_conv1d_stays_dense_with_the_reason():
    torch.manual_seed(0)
    model, x = Stem(padding=1).eval(), torch.randn(2, 20, 8)
    model.conv2.register_forward_hook(lambda m, i, o: o * 2)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["conv2"].sparsity is None and "forward hooks" in cm.plan["conv2"].reason
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5  # the hook still doubles its output


def test_group_lasso_on_conv1d_filters_and_channels():
    from sparsec.group_lasso import GroupLasso

    torch.manual_seed(0)
    model, x = Stem(padding=1, groups=2).eval(), torch.randn(2, 20, 8)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True)
    w = model.conv2.weight  # [64, 32, 3], two groups of 32 filters
    filters = w.flatten(1).norm(dim=1).sum()
    channels = sum(w[g * 32:(g + 1) * 32, c].norm() for g in range(2) for c in range(32))
    torch.testing.assert_close(GroupLasso(cm, 0.5, "filters", layers=["conv2"])(), 0.5 * filters)
    torch.testing.assert_close(GroupLasso(cm, 0.5, "channels", layers=["conv2"])(), 0.5 * channels)
