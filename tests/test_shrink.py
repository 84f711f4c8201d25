"""shrink: all-zero neurons / channels removed through the channel dependency graph, outputs unchanged.

The oracle is the model itself (plain torch): the smaller model must compute its outputs (fp32, 1e-5
relative to the output scale). Which channels go is predicted by hand from the zeroed weights."""
import copy
import datetime

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import load_example, output_error, pruned_model
from sparsec.runtime.train_offset import TrainOffset
from sparsec.runtime.training import TrainableLayer
from sparsec.shrink import shrink


def dense(model, *inputs):
    return sparsec.compile(model, pattern="dense", example_inputs=inputs, train=True)


def same_outputs(small, model, *inputs):
    with torch.no_grad():
        ref, out = model(*inputs), small(*inputs)
    assert out.shape == ref.shape
    assert output_error(out, ref) <= 1e-5, output_error(out, ref)


def same_in_both_modes(small, model, *inputs):
    """The outputs agree in training mode (BatchNorm batch statistics, on copies: a forward updates the
    running ones) and in eval mode."""
    for training in (True, False):
        same_outputs(copy.deepcopy(small).train(training), copy.deepcopy(model).train(training), *inputs)


def param(cm, path):
    return cm.graph_module.get_parameter(path)


# ---------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    def __init__(self, d=16, h1=32, h2=32, out=4, last_bias=True):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h1), nn.Linear(h1, h2), nn.Linear(h2, out, bias=last_bias)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_mlp_zero_rows_and_columns_with_negative_and_positive_bias():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[0:6] = 0
        model.fc1.bias[0:3] = -0.5     # relu(-0.5) = 0: removed, nothing to fold
        model.fc1.bias[3:5] = 0.7      # relu(0.7) = 0.7 everywhere: removed, folded into fc2's bias
        model.fc1.bias[5] = 0.0        # relu(0) = 0
        model.fc2.weight[:, [10, 11]] = 0  # nobody reads fc1 outputs 10, 11: removed with their rows
        model.fc2.weight[0:2] = 0
        model.fc2.bias[0:2] = 1.5      # constant 1.5 folded into fc3's bias
    x = torch.randn(8, 16)
    cm = dense(model, x)
    small = shrink(cm)
    same_outputs(small, model, x)
    report = small.shrink_report
    assert report["fc1"].removed == [0, 1, 2, 3, 4, 5, 10, 11]
    assert report["fc2"].removed == [0, 1]
    assert report["fc3"].removed == [] and report["fc3"].feeds_output
    assert param(small, "fc1.weight").shape == (24, 16)
    assert param(small, "fc2.weight").shape == (30, 24)
    assert param(small, "fc3.weight").shape == (4, 30)
    assert small.graph_module.fc2.in_features == 24 and small.graph_module.fc2.out_features == 30
    # the folds really happened (the biases changed), and the plan says what shrink did
    assert not torch.equal(param(small, "fc3.bias"), model.fc3.bias)
    assert small.plan["fc1"].weight_shape == (24, 16)
    assert "shrink: removed 8 of 32 output rows, 0 of 16 input columns" in small.plan["fc1"].reason
    assert report.hidden_before == 64 and report.hidden_after == 54
    assert small.history[-1].name == "shrink"


def test_constant_channel_kept_when_the_consumer_has_no_bias():
    torch.manual_seed(0)
    model = MLP(h1=8, h2=8, last_bias=False).eval()
    with torch.no_grad():
        model.fc2.weight[0:2] = 0
        model.fc2.bias[0] = -1.0   # relu -> 0: removable without a bias to fold into
        model.fc2.bias[1] = 0.5    # relu -> 0.5: fc3 has no bias to absorb it
    x = torch.randn(4, 16)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    space = small.shrink_report["fc2"]
    assert space.removed == [0]
    assert any("no bias" in why and 1 in idx for why, idx in space.kept.items())


@settings(max_examples=12)
@given(h1=st.integers(2, 12), h2=st.integers(2, 12), data=st.data())
def test_mlp_width_is_the_number_of_units_with_a_nonzero_row_and_column(h1, h2, data):
    # With ReLU and biases everywhere, a zero row makes a constant channel that folds into the next bias,
    # and a zero column makes a channel nobody reads: each is removable, nothing else is.
    model = MLP(d=5, h1=h1, h2=h2, out=3).eval()
    torch.manual_seed(data.draw(st.integers(0, 100)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for layer, n in ((model.fc1, h1), (model.fc2, h2)):
            layer.weight[data.draw(st.lists(st.integers(0, n - 1), max_size=n))] = 0
        model.fc2.weight[:, data.draw(st.lists(st.integers(0, h1 - 1), max_size=h1))] = 0
        model.fc3.weight[:, data.draw(st.lists(st.integers(0, h2 - 1), max_size=h2))] = 0
    x = torch.randn(6, 5)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)

    def alive(w_in, w_out):
        n = int(((w_in.norm(dim=1) > 0) & (w_out.norm(dim=0) > 0)).sum())
        return max(n, 1)  # every layer keeps at least one channel

    assert param(small, "fc1.weight").shape[0] == alive(model.fc1.weight, model.fc2.weight)
    assert param(small, "fc2.weight").shape[0] == alive(model.fc2.weight, model.fc3.weight)


def test_threshold_treats_tiny_groups_as_zero():
    torch.manual_seed(0)
    model = MLP(h1=8, h2=8).eval()
    with torch.no_grad():
        model.fc1.weight[2] = 1e-9
        model.fc1.bias[2] = -1.0
    x = torch.randn(4, 16)
    cm = dense(model, x)
    assert shrink(cm).shrink_report["fc1"].removed == []
    small = shrink(cm, threshold=1e-6)
    assert small.shrink_report["fc1"].removed == [2]
    same_outputs(small, model, x)


@pytest.mark.parametrize("as_module", [False, True])
def test_inplace_activation_changes_what_later_readers_of_its_input_see(as_module):
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.fc1(x)
            a = self.act(h) if as_module else F.relu(h, inplace=True)
            return self.fc2(a) + self.fc3(h)  # h was overwritten: fc3 reads relu(h) too

    torch.manual_seed(0)
    model = Inplace().eval()
    with torch.no_grad():
        model.fc1.weight[1] = 0
        model.fc1.bias[1] = -0.5   # -0.5 before the relu, 0 after it, for both readers
    x = torch.randn(3, 4)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert small.shrink_report["fc1"].removed == [1]
    assert torch.equal(param(small, "fc3.bias"), model.fc3.bias)  # nothing to fold: the constant is 0


# ---------------------------------------------------------------------------- CNN: conv -> BN -> ReLU -> conv


class ConvNet(nn.Module):
    def __init__(self, padding=1, padding_mode="zeros", c1_bias=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=c1_bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=padding, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _bn_constant(bn, c, value):
    """Make BatchNorm (eval) map an all-zero channel c to `value`."""
    bn.running_mean[c], bn.running_var[c], bn.weight[c], bn.bias[c] = 0.3, 1.0, 1.0, value + 0.3 / (1 + bn.eps) ** 0.5


def test_conv_bn_relu_conv_eval():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        model.c1.weight[0:3] = 0           # c1 has no bias: these channels are 0, then BN makes a constant
        _bn_constant(model.bn1, 0, -0.4)   # relu -> 0: removed
        _bn_constant(model.bn1, 1, -0.1)   # relu -> 0: removed
        _bn_constant(model.bn1, 2, 0.6)    # relu -> 0.6, but c2 zero-pads: kept
        model.c2.weight[[4, 5]] = 0        # constant after bn2 + relu + pool: folded into head's bias
    x = torch.randn(2, 3, 10, 10)
    cm = dense(model, x)
    # exact in both modes: with batch statistics, c1's zero channel 1 leaves bn1 as beta, relu(0.2) = 0.2,
    # which c2's zero padding cannot take; c2's constant rows (bias 0) are beta's too, but their bias is not
    both = shrink(cm)
    same_in_both_modes(both, model, x)
    assert both.shrink_report["c1"].removed == [0] and both.shrink_report["c2"].removed == []
    assert [4, 5] in both.shrink_report["c2"].kept.values()
    padded = {why: idx for why, idx in both.shrink_report["c1"].kept.items() if "zero padding" in why}
    assert sorted(sum(padded.values(), [])) == [1, 2]
    assert any("(0 in eval mode, 0.2 in training mode)" in why for why in padded)
    small = shrink(cm, eval_only=True)
    same_outputs(small, model, x)
    with pytest.raises(ValueError, match=r"shrunk with eval_only=True: .* cannot switch it"):
        small.train()
    report = small.shrink_report
    assert report["c1"].removed == [0, 1]
    assert any("zero padding" in why and idx == [2] for why, idx in report["c1"].kept.items())
    assert report["c2"].removed == [4, 5]
    gm = small.graph_module
    assert gm.c1.weight.shape == (6, 3, 3, 3) and gm.c2.weight.shape == (4, 6, 3, 3) and gm.head.weight.shape == (5, 4)
    assert gm.bn1.num_features == 6 and gm.bn1.running_mean.shape == (6,) and gm.bn2.running_var.shape == (4,)
    assert torch.equal(gm.bn1.running_mean, model.bn1.running_mean[2:])


def test_conv_bn_train_mode_uses_batch_statistics():
    torch.manual_seed(0)
    model = ConvNet(c1_bias=True).train()
    with torch.no_grad():
        model.c1.weight[[1, 2, 4]] = 0
        model.c1.bias[[1, 2]] = 0      # exactly 0 everywhere: batch norm outputs beta
        model.bn1.bias[1] = -0.2       # relu(beta) = 0: removed
        model.bn1.bias[2] = 0.3        # relu(beta) = 0.3, c2 zero-pads: kept
        model.c1.bias[4] = 0.1         # constant 0.1: its batch mean may be off by an ulp, amplified by 1/sqrt(eps)
        model.bn1.bias[4] = -0.2
    x = torch.randn(4, 3, 8, 8)
    cm = dense(model, x)
    small = shrink(cm)
    assert small.graph_module.bn1.training
    space = small.shrink_report["c1"]
    assert space.removed == [1]
    assert any(2 in idx and "zero padding" in why for why, idx in space.kept.items())
    assert any(4 in idx and "not a known constant" in why for why, idx in space.kept.items())
    same_outputs(small, copy.deepcopy(model), x)


class PointwiseNet(nn.Module):
    """conv -> BN -> relu -> 1x1 conv (no padding: constants fold) -> BN -> relu -> pool -> head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _dead_channels_net() -> PointwiseNet:
    """c1's channels 0-2 and c2's 4, 5 all-zero; BatchNorm statistics set so that they leave relu as
    a nonzero constant, another one in each mode."""
    torch.manual_seed(0)
    model = PointwiseNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(0.2, 0.6)
        model.c1.weight[0:3] = 0
        model.c2.weight[[4, 5]], model.c2.bias[[4, 5]] = 0, 0
    return model


@pytest.mark.parametrize("shrunk_training", [True, False])
def test_a_model_shrunk_in_one_mode_is_exact_in_the_other(shrunk_training, tmp_path):
    """Zero channels leave BatchNorm as beta with batch statistics and as beta - mean * gamma / sqrt(var
    + eps) with running ones: both folds are worked out, the bias takes eval's and a TrainOffset after
    the consumer adds training's difference, so the model shrunk in either mode computes the original's
    outputs in both (folding one mode's constant made the other mode's outputs wrong by 1.2 on digits)."""
    model = _dead_channels_net()
    model.train(shrunk_training)
    x = torch.randn(4, 3, 6, 6)
    small = shrink(dense(model, x))
    same_in_both_modes(small, model, x)
    report = small.shrink_report
    assert report["c1"].removed == [0, 1, 2] and report["c2"].removed == [4, 5]
    gm = small.graph_module
    offsets = {n.args[0].target: n.target for n in gm.graph.nodes  # consumer -> its offset's module path
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TrainOffset)}
    assert set(offsets) == {"c2", "head"}
    c2_offset = gm.get_submodule(offsets["c2"])
    assert c2_offset.offset.shape == (4,) and c2_offset.dim == -3 and gm.get_submodule(offsets["head"]).dim == -1
    # shrunk again after another c2 channel died (its row and bias, and the offset its row made): the
    # existing offset is sliced along
    with torch.no_grad():
        gm.c2.weight[1], gm.c2.bias[1], c2_offset.offset[1] = 0, 0, 0
        model.c2.weight[1], model.c2.bias[1] = 0, 0
    again = shrink(small)
    assert again.shrink_report["c2"].removed == [1]
    assert again.graph_module.get_submodule(offsets["c2"]).offset.shape == (3,)
    same_in_both_modes(again, model, x)
    sparsec.save(again, tmp_path / "small.pt")
    same_in_both_modes(sparsec.load(tmp_path / "small.pt"), model, x)
    # compiled again for inference, the offset (identity in eval mode) stays a module call
    inference = sparsec.compile(again.eval(), example_inputs=(x,))
    same_outputs(inference, pruned_model(again, inference.plan, lambda m, name: m.graph_module.get_submodule(name).weight), x)


def test_a_batchnorm_frozen_in_eval_inside_a_training_model_keeps_what_its_mode_changes():
    """Flags mixed (bn1 frozen in eval, the rest training): a fold must hold for the flags as they are
    as well as after cm.train() / cm.eval(); bn1's dead channels read another constant as they are than
    in training mode, so they stay (saying so), while bn2's go."""
    model = _dead_channels_net()
    model.train()
    model.bn1.eval()
    x = torch.randn(4, 3, 6, 6)
    cm = dense(model, x)
    small = shrink(cm)
    assert small.shrink_report["c1"].removed == [] and small.shrink_report["c2"].removed == [4, 5]
    assert any("cm.train() or cm.eval() before shrinking" in why for why in small.shrink_report["c1"].kept)
    same_outputs(copy.deepcopy(small), copy.deepcopy(model), x)  # the flags as they are
    same_in_both_modes(small, model, x)


def test_dropout_keeps_a_constant_channel_unless_shrunk_for_eval_only():
    """Training-mode dropout scales a constant channel at random: it is a constant in eval mode only."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[0:2], model.fc1.bias[0:2] = 0, 0.5
    x = torch.randn(4, 8)
    cm = dense(model, x)
    both = shrink(cm)
    assert both.shrink_report["fc1"].removed == []
    assert any("not a known constant in training mode" in why for why in both.shrink_report["fc1"].kept)
    small = shrink(cm, eval_only=True)
    assert small.shrink_report["fc1"].removed == [0, 1] and not small.training
    same_outputs(small, model, x)


@pytest.mark.parametrize("padding, mode, removable", [(0, "zeros", True), (1, "reflect", True), (1, "zeros", False)])
def test_constant_folds_into_a_conv_only_without_zero_padding(padding, mode, removable):
    torch.manual_seed(0)
    model = ConvNet(padding, mode).eval()
    with torch.no_grad():
        model.c1.weight[3] = 0
        _bn_constant(model.bn1, 3, 0.8)
    x = torch.randn(2, 3, 9, 9)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert small.shrink_report["c1"].removed == ([3] if removable else [])


def test_flatten_of_a_conv_maps_each_channel_to_a_block_of_linear_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = -1.0   # relu -> 0
        model[0].weight[3] = 0
        model[0].bias[3] = 0.5    # relu -> 0.5 on all 16 positions: folded into the Linear's bias
    x = torch.randn(3, 2, 6, 6)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert small.shrink_report["0"].removed == [1, 3]
    assert param(small, "3.weight").shape == (3, 3 * 16)


# ---------------------------------------------------------------------------- residual and concatenation


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_a, self.fc_b, self.head = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.fc_in(x)
        r = h + self.fc_b(torch.relu(self.fc_a(h)))
        return self.head(torch.relu(r))


def test_residual_add_shares_one_channel_set():
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.head.weight[:, 3] = 0; model.fc_a.weight[:, 3] = 0        # no reader of channel 3 on any branch
        model.head.weight[:, 5] = 0                                     # fc_a still reads h[5]: kept
        model.fc_in.weight[7] = 0; model.fc_in.bias[7] = 0              # h[7] = 0 and fc_b's 7 = 0: r[7] = 0
        model.fc_b.weight[7] = 0; model.fc_b.bias[7] = 0
        model.fc_in.weight[9] = 0; model.fc_in.bias[9] = 0              # h[9] = 0 but r[9] = fc_b's output: kept
    x = torch.randn(5, 6)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    space = small.shrink_report["fc_in"]
    assert space.producers == ["fc_in", "fc_b"] and set(space.consumers) == {"fc_a", "head"}
    assert space.removed == [3, 7] and space.before == 12 and space.after == 10
    for path, shape in (("fc_in.weight", (10, 6)), ("fc_b.weight", (10, 12)), ("fc_a.weight", (12, 10)),
                        ("head.weight", (4, 10))):
        assert param(small, path).shape == shape


def test_residual_from_the_model_input_is_pinned():
    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(x + self.fc(x))

    model = InputResidual().eval()
    with torch.no_grad():
        model.head.weight[:, 2] = 0
        model.fc.weight[2] = 0
    x = torch.randn(3, 8)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    space = small.shrink_report["fc"]
    assert space.removed == []
    assert any("model input x" in why and "add" in why for why in space.kept)


def test_concatenation_keeps_each_part_separately():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fa, self.fb, self.head = nn.Linear(4, 6), nn.Linear(4, 5), nn.Linear(11, 3)

        def forward(self, x):
            return self.head(torch.cat([torch.relu(self.fa(x)), torch.relu(self.fb(x))], dim=-1))

    torch.manual_seed(0)
    model = Cat().eval()
    with torch.no_grad():
        model.fa.weight[2] = 0; model.fa.bias[2] = -1.0   # fa's channel 2 is 0
        model.head.weight[:, 6 + 1] = 0                   # nobody reads fb's channel 1
    x = torch.randn(5, 4)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    report = small.shrink_report
    assert report["fa"].removed == [2] and report["fb"].removed == [1]
    assert param(small, "head.weight").shape == (3, 9)


# ---------------------------------------------------------------------------- transformer


def test_transformer_only_the_mlp_hidden_shrinks():
    encoder = load_example("transformer").Encoder(depth=2, dim=32, heads=2, mlp=64).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        encoder.blocks[0].fc2.weight[:, 0:10] = 0                         # nobody reads hidden 0-9
        encoder.blocks[1].fc1.weight[5:10] = 0; encoder.blocks[1].fc1.bias[5:10] = 0   # gelu(0) = 0
        encoder.blocks[0].attn.q.weight[0:4] = 0; encoder.blocks[0].attn.q.bias[0:4] = 0  # but q is reshaped
    small = shrink(dense(encoder, x))
    same_outputs(small, encoder, x)
    report = small.shrink_report
    assert report["blocks.0.fc1"].removed == list(range(10))
    assert report["blocks.1.fc1"].removed == list(range(5, 10))
    assert param(small, "blocks.0.fc1.weight").shape == (54, 32)
    assert param(small, "blocks.1.fc2.weight").shape == (32, 59)
    assert report["blocks.0.attn.q"].removed == []
    assert any("view" in why for why in report["blocks.0.attn.q"].kept)          # reshaped into heads
    assert any("add" in why for why in report["blocks.0.fc2"].kept)              # residual stream
    text = str(report)
    assert "blocks.0.attn.q" in text and "view" in text and "hidden units" in text
    assert report.hidden_after == report.hidden_before - 15


# ---------------------------------------------------------------------------- sparse training models


def test_train_24_model_slices_masks_and_keeps_them_nm():
    torch.manual_seed(0)
    model = load_example("mlp").MLP(d_in=64, hidden=64, classes=10).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        model.fc1.weight[4:8] = 0; model.fc1.bias[4:8] = -1.0    # an aligned group of fc2's 2:4 inputs
        model.fc1.weight[12] = 0; model.fc1.bias[12] = -1.0       # one column alone would break fc2's groups
        model.fc2.weight[0:4] = 0; model.fc2.bias[0:4] = -1.0     # fc2's SDGP groups outputs by 4: a whole group
        model.fc2.weight[9] = 0; model.fc2.bias[9] = -1.0         # one row alone would break them
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), train=True, grad_pattern="2:4",
                         min_weights=0)
    assert cm.plan["fc2"].sparsity == "2:4" and cm.plan["fc2"].grad_sparsity == "2:4"
    small = shrink(cm)
    same_outputs(small, cm, x)
    report = small.shrink_report
    assert report["fc1"].removed == [4, 5, 6, 7]
    assert any("2:4-sparse along its inputs" in why and 12 in idx for why, idx in report["fc1"].kept.items())
    assert report["fc2"].removed == [0, 1, 2, 3]
    assert any("SDGP" in why and 9 in idx for why, idx in report["fc2"].kept.items())
    for name, shape in (("fc2", (60, 60)), ("fc3", (64, 60))):
        layer = small.sparse_module(name)
        assert isinstance(layer, TrainableLayer)
        assert layer.weight.shape == shape and layer.weight_mask.shape == shape
        assert (layer.weight_mask.reshape(shape[0], -1, 4).sum(-1) == 2).all()   # still exactly 2 of every 4
    torch.testing.assert_close(small.effective_weight("fc3"), cm.effective_weight("fc3")[:, 4:])
    small(x).sum().backward()  # SDGP still groups fc2's 60 output features by 4


# ---------------------------------------------------------------------------- contract


def test_original_is_unchanged_and_result_is_a_new_compiled_model():
    model, (x,) = load_example("cnn").build_model()
    with torch.no_grad():
        model.stem[0].weight[0:4] = 0
        model.stem[1].bias[0:4] = -5.0
    cm = dense(model, x)
    before = {k: v.clone() for k, v in cm.state_dict().items()}
    types = [type(m) for m in cm.modules()]
    plan = cm.plan.to_json()
    small = shrink(cm)
    assert isinstance(small, sparsec.CompiledModel) and small is not cm
    assert small.shrink_report["stem.0"].removed == [0, 1, 2, 3]
    assert cm.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in cm.state_dict().items())
    assert [type(m) for m in cm.modules()] == types and cm.plan.to_json() == plan
    assert not hasattr(cm, "shrink_report")
    same_outputs(small, cm, x)
    # the grouped conv's channels are pinned, with the reason
    assert any("grouped conv" in why for why in small.shrink_report["stage2.0.0"].kept)
    # the model's inputs are unchanged: condense() and example_inputs_like() take the compile's
    assert small.example_input_spec == cm.example_input_spec is not None
    assert [t.shape for t in small.example_inputs_like()] == [x.shape]


def test_a_shrunk_model_compiles_for_inference():
    torch.manual_seed(0)
    model = MLP(d=32, h1=64, h2=64, out=8).eval()
    with torch.no_grad():
        model.fc2.weight[:, 0:8] = 0
    x = torch.randn(4, 32)
    small = shrink(dense(model, x))
    assert param(small, "fc1.weight").shape == (56, 32)
    packed = sparsec.compile(small, pattern="2:4", example_inputs=(x,), min_weights=0)
    assert packed.plan["fc1"].weight_shape == (56, 32)  # a CompiledModel is compiled through its graph
    assert packed(x).shape == (4, 8)


def test_bad_input():
    model, (x,) = load_example("mlp").build_model()
    with pytest.raises(ValueError, match="train=True"):
        shrink(sparsec.compile(model, pattern="2:4", example_inputs=(x,)))
    cm = dense(model, x)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            shrink(cm, threshold=bad)
    with pytest.raises(TypeError):
        shrink(model)


class _Pooled(nn.Module):
    """Conv channels reduced by a mean, a concatenation along the batch, dropout, and a module called
    twice (which shrink cannot change)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mid, self.twice, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        if self.pool == "spatial":
            pooled = h.mean((2, 3))
        elif self.pool == "keepdim":
            pooled = h.mean((-2, -1), keepdim=True).flatten(1)
        else:  # also a mean over the channels: removing a zero channel would change it
            pooled = h.mean((2, 3)) + h.mean(1, keepdim=True).mean((2, 3))
        both = torch.cat([pooled, pooled * 2], 0)  # along the batch: channel i of each part is one channel
        z = F.dropout(torch.relu(self.mid(both)), 0.1, self.training)
        return self.head(self.twice(torch.relu(self.twice(z))))


@pytest.mark.parametrize("pool, conv2_removed", [("spatial", [5, 6]), ("keepdim", [5, 6]), ("channels", [])])
def test_means_concatenation_dropout_and_a_module_called_twice(pool, conv2_removed):
    torch.manual_seed(0)
    model = _Pooled(pool).eval()
    with torch.no_grad():
        for layer, rows in ((model.conv1, [0, 1]), (model.conv2, [5, 6]), (model.mid, [0, 1, 2])):
            layer.weight[rows] = 0
            layer.bias[rows] = -1.0  # relu(-1) = 0: these channels are zero everywhere
        model.twice.weight[0:2] = 0
    x = torch.randn(2, 3, 6, 6)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    report = small.shrink_report
    assert report["conv1"].removed == [0, 1] and report["conv2"].removed == conv2_removed
    assert report["mid"].removed == [] and "feeds twice (its module is called at 2 places)" in str(report)
    assert report["twice"].removed == [] and param(small, "twice.weight").shape == (8, 8)
    assert param(small, "mid.weight").shape == (8, 8 - len(conv2_removed))


class _TiedMLP(MLP):
    def __init__(self):
        super().__init__(h1=16, h2=16)
        self.fc2b = nn.Linear(16, 16)
        self.fc2b.weight = self.fc2.weight  # tied

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(torch.relu(self.fc2(h))) + self.fc3(self.fc2b(h))


def test_a_weight_shared_by_two_modules_is_left_alone():
    torch.manual_seed(0)
    model = _TiedMLP().eval()
    with torch.no_grad():
        model.fc2.weight[0:4] = 0
        model.fc2.bias[0:4] = -1.0
    x = torch.randn(4, 16)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert param(small, "fc2.weight").shape == (16, 16)
    assert "shared with another module" in str(small.shrink_report)


class _ReadsItsWeights(nn.Module):
    """fc2 / bn's tensors are read by more than the one call that multiplies by them (or normalises):
    slicing them would change what that other read computes."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1, self.fc2, self.bn = nn.Linear(4, 8), nn.Linear(8, 6), nn.BatchNorm1d(8)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x, ids):
        h = torch.relu(self.fc1(x))
        if self.how == "transposed":  # the module, and F.linear on its weight's transpose: a [6] -> [8] layer
            y = self.fc2(h)
            return y + F.linear(y, self.fc2.weight.t())[:, :6]
        if self.how == "mean":  # a functional layer whose weight also scales the result
            return F.linear(h, self.fc2.weight, self.fc2.bias) * self.fc2.weight.mean()
        if self.how == "embedding":  # output projection tied to an embedding the model also looks up
            return F.linear(h, self.emb.weight) + self.emb(ids).sum(-1, keepdim=True)
        return self.fc2(self.bn(h)) * self.bn.weight.sum()  # "batchnorm": its gamma also scales the output


@pytest.mark.parametrize("how", ["transposed", "mean", "embedding", "batchnorm"])
def test_a_weight_also_read_outside_its_layer_is_left_alone(how):
    torch.manual_seed(0)
    model = _ReadsItsWeights(how).eval()
    with torch.no_grad():
        model.fc1.weight[0:3] = 0
        model.fc1.bias[0:2], model.fc1.bias[2] = -1.0, 0.5   # relu -> 0, 0, 0.5: removable if nothing else read
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.running_mean.zero_()                        # bn maps the zero channels to beta = 0
        model.bn.bias[0:2] = 0.0
    x, ids = torch.randn(5, 4), torch.tensor([1, 2, 3, 4, 5])
    small = shrink(dense(model, x, ids))
    same_outputs(small, model, x, ids)  # slicing fc2 / emb / bn made the shape or the values differ
    assert small.shrink_report["fc1"].removed == []
    assert "also read at node" in str(small.shrink_report)


@pytest.mark.parametrize("alias", ["identity", "contiguous", "dropout", "flatten"])
def test_an_in_place_write_through_another_name_of_the_tensor_keeps_its_channels(alias):
    """h and a are one tensor; relu_ on a writes h too, so fc3 reads relu(h): the analysis must not take
    h's dead channel as the constant -0.5 it had before (folding -0.5 * column into fc3's bias)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.id = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3), nn.Identity()

        def forward(self, x):
            h = self.fc1(x)
            a = {"identity": lambda: self.id(h), "contiguous": h.contiguous, "flatten": lambda: torch.flatten(h, 1),
                 "dropout": lambda: F.dropout(h, 0.5, False)}[alias]()
            F.relu(a, inplace=True)
            return self.fc2(a) + self.fc3(h)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[1], model.fc1.bias[1] = 0, -0.5
    x = torch.randn(3, 4)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert small.shrink_report["fc1"].removed == []
    assert any("written in place" in why for why in small.shrink_report["fc1"].kept)


def test_an_in_place_write_through_an_alias_nobody_reads_again_still_removes():
    """fc1 -> Dropout (eval: returns its input) -> ReLU(inplace=True) -> fc2: no other name of the tensor
    is read after the write, so the dead channel still goes."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.1), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight[1], model[0].bias[1] = 0, -0.5
    x = torch.randn(3, 4)
    small = shrink(dense(model, x), eval_only=True)
    same_outputs(small, model, x)
    assert small.shrink_report["0"].removed == [1]


@pytest.mark.parametrize("on", ["fc1", "act"])
def test_a_module_with_a_forward_hook_is_left_alone(on):
    """A hook can compute with the module's width (here: a per-channel scale of its output)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = Net().eval()
    scale = torch.rand(6) + 0.5
    getattr(model, on).register_forward_hook(lambda module, args, out: out * scale)
    with torch.no_grad():
        model.fc2.weight[:, 1] = 0  # nobody reads channel 1: removable, were it not for the hook
    x = torch.randn(3, 4)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)  # (the sliced model failed: the hook's scale has 6 channels)
    assert small.shrink_report["fc1"].removed == []
    assert "hooks" in str(small.shrink_report)


def test_a_bias_held_as_a_buffer_is_sliced_and_folded_into():
    """A frozen bias registered as a buffer (not an nn.Parameter) is sliced and folded like a parameter."""
    class Net(MLP):
        def __init__(self):
            super().__init__(d=4, h1=6, h2=5, out=3)
            for fc in (self.fc1, self.fc2):
                bias = fc.bias.detach().clone()
                del fc.bias
                fc.register_buffer("bias", bias)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[1:3] = 0
        model.fc1.bias[1], model.fc1.bias[2] = -0.5, 0.5  # relu: 0, and 0.5 folded into fc2's (buffer) bias
    x = torch.randn(3, 4)
    small = shrink(dense(model, x))
    same_outputs(small, model, x)
    assert small.shrink_report["fc1"].removed == [1, 2]
    gm = small.graph_module
    assert gm.fc1.bias.shape == (4,) and "bias" in gm.fc1._buffers and "bias" in gm.fc2._buffers
    assert not torch.equal(gm.fc2.bias, model.fc2.bias)  # the fold happened


# ---------------------------------------------------------------------------- depthwise convs


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1x1), depthwise 3x3, project (1x1), residual."""

    def __init__(self, c=16, hidden=64, batchnorm=False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.exp, self.dw, self.proj = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), \
            nn.Conv2d(hidden, c, 1)
        self.bn = nn.BatchNorm2d(hidden) if batchnorm else nn.Identity()
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.proj(torch.relu(self.bn(self.dw(torch.relu(self.exp(x))))))
        return self.head(x.mean((2, 3)))


def test_depthwise_conv_channels_go_with_the_channels_they_filter():
    """A depthwise conv maps channel c to channel c: removing c drops its filter too. Its output is
    the bias where the filter or the input is zero, so dead filters remove the expansion rows feeding them."""
    torch.manual_seed(0)
    model = InvertedResidual().eval()
    with torch.no_grad():
        model.exp.weight[0:12] = 0
        model.exp.bias[0:8] = -1.0     # relu -> 0 -> dw gives its bias:
        model.dw.bias[0:4] = -0.5      #   relu(-0.5) = 0: removed
        model.dw.bias[4:8] = 0.3       #   relu(0.3): a constant folded into proj's bias, removed
        model.exp.bias[8:12] = 0.5     # relu(0.5) = 0.5 in: zero padding makes dw's border outputs differ ...
        model.dw.weight[8:10] = 0      #   ... unless the filter is zero (bias 0 below): 8, 9 removed, 10, 11 kept
        model.dw.bias[8:10] = 0.0
        model.dw.weight[20:24] = 0     # dead filters, bias 0: removed with the live expansion rows 20-23
        model.dw.bias[20:24] = 0.0
        model.dw.weight[30:32] = 0     # dead filters, bias 0.2: folded
        model.dw.bias[30:32] = 0.2
    x = torch.randn(2, 3, 8, 8)
    cm = dense(model, x)
    small = shrink(cm)
    report = small.shrink_report["exp"]
    assert report.removed == [*range(0, 10), *range(20, 24), 30, 31] and report.after == 48
    assert {10, 11} <= set(report.kept["proj reads it (nonzero input column) and its value is not a known constant"])
    dw = small.graph_module.dw
    assert dw.weight.shape == (48, 1, 3, 3) and small.graph_module.proj.weight.shape == (16, 48, 1, 1)
    assert dw.conv.groups == 48 if isinstance(dw, TrainableLayer) else dw.groups == 48
    same_outputs(small, cm, x)
    small(x).sum().backward()  # trains on
    inference = sparsec.compile(small.eval(), pattern="2:4", example_inputs=(x,), min_weights=0)
    assert inference.plan["proj"].sparsity == "2:4" and inference.plan["dw"].sparsity is None  # (K = 9)
    same_outputs(inference, pruned_model(small, inference.plan, lambda m, name: m.graph_module.get_submodule(name).weight), x)


def test_depthwise_conv_with_batch_statistics_and_reflect_padding():
    """BatchNorm after the depthwise conv is sliced along; reflect padding keeps a constant plane
    constant (c * sum(filter) + bias); a Conv1d depthwise works the same."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.exp, self.proj = nn.Conv1d(8, 32, 1), nn.Conv1d(32, 8, 1)
            self.dw = nn.Conv1d(32, 32, 5, padding=2, groups=32, padding_mode="reflect")
            self.bn, self.head = nn.BatchNorm1d(32), nn.Linear(8, 3)

        def forward(self, x):
            return self.head((x + self.proj(torch.relu(self.bn(self.dw(torch.relu(self.exp(x))))))).mean(2))

    torch.manual_seed(0)
    model = Seq().train()  # batch statistics: only an exactly-zero channel is constant after BatchNorm (beta)
    with torch.no_grad():
        model.exp.weight[0:6] = 0
        model.exp.bias[0:3] = 0.4      # relu(0.4) -> dw (reflect) -> 0.4 * sum + b: constant, but not 0 -> kept by bn
        model.exp.bias[3:6] = -1.0     # 0 -> dw bias, set to 0 -> bn gives beta -> relu -> folded into proj
        model.dw.bias[3:6] = 0.0
        model.bn.bias[3:6] = 0.25
    x = torch.randn(4, 8, 12)
    cm = dense(model, x)
    small = shrink(cm)
    assert small.shrink_report["exp"].removed == [3, 4, 5]
    assert small.graph_module.bn.num_features == 29 and small.graph_module.dw.weight.shape == (29, 1, 5)
    same_in_both_modes(small, model, x)
    model.eval()  # running statistics: 0.4 * sum(filter) + b is a known constant through BatchNorm too,
    cm = dense(model, x)  # for a model that runs in eval mode only
    assert shrink(cm).shrink_report["exp"].removed == [3, 4, 5]
    small = shrink(cm, eval_only=True)
    assert small.shrink_report["exp"].removed == [0, 1, 2, 3, 4, 5]
    same_outputs(small, cm, x)


def test_depthwise_conv_under_sdgp_removes_whole_aligned_groups():
    """SDGP prunes the depthwise conv's (and the expansion's) data gradient in groups of 4 channels:
    a group goes whole (20-23) or stays (30, 31 alone would split one)."""
    torch.manual_seed(0)
    model, x = InvertedResidual().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for dead in (slice(20, 24), slice(30, 32)):
            model.dw.weight[dead], model.dw.bias[dead] = 0, 0
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True, grad_pattern="2:4")
    small = shrink(cm)
    report = small.shrink_report["exp"]
    assert report.removed == [20, 21, 22, 23]
    assert any("aligned groups of 4" in why and 30 in kept for why, kept in report.kept.items())
    same_outputs(small, cm, x)
    small(x).sum().backward()


class _ViewFlattenCNN(nn.Module):
    """Older CNN code flattens with view(x.size(0), -1) (or reshape(b, -1)) instead of torch.flatten."""

    def __init__(self, reshape=False):
        super().__init__()
        self.reshape = reshape
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)
        x = x.reshape(x.shape[0], -1) if self.reshape else x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("reshape", [False, True])
def test_view_batch_minus_one_is_a_flatten(reshape):
    torch.manual_seed(0)
    model = _ViewFlattenCNN(reshape).eval()
    with torch.no_grad():
        model.c2.weight[2:5] = 0
        model.c2.bias[2:5] = -1.0  # relu -> 0: removed, with their 16 features each in fc1
    x = torch.randn(2, 3, 8, 8)
    cm = dense(model, x)
    small = shrink(cm)
    assert small.shrink_report["c2"].removed == [2, 3, 4]
    assert param(small, "fc1.weight").shape == (32, 5 * 16)
    same_outputs(small, cm, x)
    same_outputs(small, cm, torch.randn(5, 3, 8, 8))  # the batch dim stays free


class _SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: a per-channel gate from pooled 1x1 convs."""

    def __init__(self, c, r):
        super().__init__()
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class _MobileNetV3Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.exp, self.bn1 = nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.dw, self.bn2 = nn.Conv2d(64, 64, 5, 1, 2, groups=64, bias=False), nn.BatchNorm2d(64)
        self.se, self.proj, self.head = _SqueezeExcite(64, 16), nn.Conv2d(64, 24, 1), nn.Linear(24, 10)

    def forward(self, x):
        h = F.hardswish(self.bn2(self.dw(F.hardswish(self.bn1(self.exp(F.hardswish(self.stem(x))))))))
        return self.head(F.adaptive_avg_pool2d(self.proj(self.se(h)), 1).flatten(1))


def test_squeeze_excitation_gates_dead_channels_to_zero():
    """A dead expansion channel is 0 through BatchNorm (batch statistics, beta 0), hardswish and the
    depthwise conv; the SE gate multiplies it, and 0 times the gate is 0, so it goes (its SE weights
    with it). Dead SE-reduction units go too."""
    torch.manual_seed(0)
    model, x = _MobileNetV3Block().train(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        model.exp.weight[:24] = 0
        model.se.fc1.weight[:6], model.se.fc1.bias[:6] = 0, -1.0
    cm = dense(model, x)
    small = shrink(cm)
    assert small.shrink_report["exp"].removed == list(range(24))
    assert small.shrink_report["se.fc1"].removed == list(range(6))
    assert param(small, "se.fc2.weight").shape == (40, 10, 1, 1) and small.graph_module.dw.groups == 40
    same_outputs(small, cm, x)


def test_the_cnn_channel_pruning_example_runs_and_shrinks_exactly(tmp_path, monkeypatch):
    """examples/shrink_cnn_digits.py for 3 epochs: trained with group lasso, the shrunk model has
    fewer expansion channels and parameters and computes what the unshrunk one does."""
    monkeypatch.setenv("SPARSEC_RESULTS_DIR", str(tmp_path))
    (row,) = load_example("shrink_cnn_digits").main(["--epochs", "3", "--lams", "0.06"])
    kept, before = map(int, row["channels"].split("/"))
    assert kept < before == 128 and row["params"] < row["params_before"]
    assert row["max_abs_difference"] <= 1e-4
    assert (tmp_path / f"shrink-cnn-digits-{datetime.date.today().isoformat()}.json").exists()
