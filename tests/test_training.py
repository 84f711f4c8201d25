"""compile(train=True): SDGP backward, masked / SR-STE weight updates, plans, autocast.

Gradients are checked directly against plain torch: with loss = sum(y * G) the layer's dY is
exactly G, so X.grad must be prune(G) @ W (an independent pruning below), W.grad = G^T X (masked),
b.grad = sum(G)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import load_example, lexsort_mask, output_error

torch.manual_seed(0)


def prune_rows(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M along the last dim, independent of sparsec (numpy lexsort on (-|g|, index))."""
    mask = lexsort_mask(g.reshape(*g.shape[:-1], -1, m), n).reshape(g.shape)
    return g * mask


def prune_channels(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[N, C, H, W]: N:M along C at each (n, h, w)."""
    return prune_rows(g.permute(0, 2, 3, 1), n, m).permute(0, 3, 1, 2)


def single_layer_plan(model, x, sparsity, grad):
    plan = sparsec.explain(model, pattern="dense", example_inputs=(x,))
    plan["0"].sparsity, plan["0"].grad_sparsity = sparsity, grad
    return plan


@pytest.mark.parametrize("sparsity", [None, "2:4"])
@pytest.mark.parametrize("shape", [(6, 32), (2, 3, 32)])
def test_linear_sdgp_gradients(sparsity, shape):
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(*shape)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, plan=single_layer_plan(model, x, sparsity, "2:4"))
    layer = cm.sparse_module("0")
    xg = x.clone().requires_grad_(True)
    y = cm(xg)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    w = cm.effective_weight("0")
    assert torch.allclose(y, F.linear(x, w, model[0].bias), atol=1e-6)
    assert torch.allclose(xg.grad, prune_rows(G, 2, 4) @ w, atol=1e-6)
    assert not torch.allclose(xg.grad, G @ w, atol=1e-3), "the data gradient really is pruned"
    dense_wgrad = G.reshape(-1, 16).t() @ x.reshape(-1, 32)
    expected_wgrad = dense_wgrad * cm.mask("0") if sparsity else dense_wgrad
    assert torch.allclose(layer.weight.grad, expected_wgrad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, G.reshape(-1, 16).sum(0), atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_sdgp_groups_along_channels(memory_format):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2))
    x = torch.randn(2, 8, 9, 9).to(memory_format=memory_format)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, plan=single_layer_plan(model, x, "2:4", "2:4"))
    xg = x.clone().requires_grad_(True)
    y = cm(xg)
    G = torch.randn_like(y).to(memory_format=memory_format)
    (y * G).sum().backward()
    w = cm.effective_weight("0")
    expected = torch.nn.grad.conv2d_input(x.shape, w, prune_channels(G, 2, 4), stride=2, padding=1)
    assert torch.allclose(xg.grad, expected, atol=1e-5)
    layer = cm.sparse_module("0")
    dense_wgrad = torch.nn.grad.conv2d_weight(x, w.shape, G, stride=2, padding=1)
    assert torch.allclose(layer.weight.grad, dense_wgrad * cm.mask("0"), atol=1e-4)


def test_rescale_mode_keeps_each_rows_l1_norm():
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(5, 32)
    plan = single_layer_plan(model, x, None, "2:4")
    cm = sparsec.compile(model, example_inputs=(x,), train=True, plan=plan, grad_mode="rescale")
    xg = x.clone().requires_grad_(True)
    y = cm(xg)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    pruned = prune_rows(G, 2, 4)
    rescaled = pruned * (G.abs().sum(-1, keepdim=True) / pruned.abs().sum(-1, keepdim=True))
    assert torch.allclose(rescaled.abs().sum(-1), G.abs().sum(-1), rtol=1e-4)
    assert torch.allclose(xg.grad, rescaled @ model[0].weight, atol=1e-5)


def test_n_equal_m_is_a_no_op():
    model, (x,) = load_example("mlp").build_model()
    ref = copy.deepcopy(model)
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True, grad_pattern="4:4")
    assert not any(lp.grad_sparsity for lp in cm.plan)
    assert "gradient dense: grad_pattern 4:4 keeps every value (N = M)" in cm.plan["fc2"].reason
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cm(xg).square().sum().backward()
    ref(xr).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)


def test_plan_gradient_column_and_reasons():
    model, inputs = load_example("cnn").build_model()
    plan = sparsec.explain(model, example_inputs=inputs, train=True, grad_pattern="2:4")
    assert plan["stem.0"].grad_sparsity is None and "data gradient is never used" in plan["stem.0"].reason
    assert plan["head"].grad_sparsity is None and "10 output features are not a multiple of M=4" in plan["head"].reason
    assert plan["stage1.0.0"].grad_sparsity == "2:4" and "SDGP" in plan["stage1.0.0"].reason
    assert "grad" in str(plan).splitlines()[1]
    assert sparsec.Plan.from_json(plan.to_json()) == plan
    # a plan with pruned data gradients is applied exactly, so only where there is a backward
    with pytest.raises(ValueError, match=r"prunes data gradients \(grad_sparsity\) of \['stage1.0.0'.*needs train=True"):
        sparsec.compile(model, example_inputs=inputs, plan=plan)
    trained = sparsec.compile(model, example_inputs=inputs, plan=plan, train=True)
    assert trained.plan["stage1.0.0"].grad_sparsity == "2:4"


def test_last_layer_keeps_its_loss_gradient_dense_unless_included():
    """SDGP's original never prunes the classifier's data gradient (methods.md A.4): the last layer's dY is
    the loss gradient, the one every earlier layer's comes from. grad_pattern pruned it; now the last layer
    keeps it dense unless include= names it. dX checked against a backward by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x, dy = torch.randn(6, 16), torch.randn(6, 8)
    opts = dict(pattern="dense", example_inputs=(x,), train=True, grad_pattern="2:4")
    default, included = sparsec.compile(model, **opts), sparsec.compile(model, include=["4"], **opts)
    assert [lp.grad_sparsity for lp in default.plan] == [None, "2:4", None]
    assert "last layer" in default.plan["4"].reason and "include=['4'] overrides" in default.plan["4"].reason
    assert [lp.grad_sparsity for lp in included.plan] == [None, "2:4", "2:4"]
    assert "forced by include='4'" in included.plan["4"].reason

    def by_hand(prune_last: bool) -> torch.Tensor:
        w0, w2, w4 = (model[i].weight.detach() for i in (0, 2, 4))
        z0 = F.linear(x, w0, model[0].bias)
        z2 = F.linear(z0.relu(), w2, model[2].bias)
        prune = lambda g: g * lexsort_mask(g.reshape(g.shape[0], -1, 4), 2).reshape(g.shape)
        d4 = prune(dy) if prune_last else dy
        d2 = prune((d4 @ w4) * (z2 > 0))
        return ((d2 @ w2) * (z0 > 0)) @ w0

    for cm, prune_last in ((default, False), (included, True)):
        xg = x.clone().requires_grad_(True)
        cm(xg).backward(dy)
        torch.testing.assert_close(xg.grad, by_hand(prune_last), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.75"])
def test_fixed_masks_survive_optimizer_steps(make_optimizer, pattern):
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), train=True, grad_pattern="2:4")
    masks = {lp.name: cm.mask(lp.name).clone() for lp in cm.plan.sparse_layers}
    assert masks
    opt = make_optimizer(cm.parameters())
    target = torch.randint(0, 10, (8,))
    for _ in range(6):
        loss = F.cross_entropy(cm(x), target)
        opt.zero_grad()
        loss.backward()
        for name in masks:
            assert (cm.sparse_module(name).weight.grad[~masks[name]] == 0).all(), "pruned weights get no gradient"
        opt.step()
    for name, mask in masks.items():
        w = cm.sparse_module(name).weight
        assert torch.equal(cm.mask(name), mask)
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()


@pytest.mark.parametrize("extra", [{}, {"grad_pattern": "2:4"}, {"weight_update": "ste"}])
def test_frozen_parameters_stay_frozen(extra):
    """Fine-tuning part of a model: parameters frozen before compiling get no gradient and do not move."""
    model, (x,) = load_example("mlp").build_model()
    frozen = {name for name, p in model.named_parameters() if not name.startswith("fc2.")}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, min_weights=0, include=[".*"], **extra)
    assert len(cm.plan.sparse_layers) == len(cm.plan.layers)
    if "grad_pattern" in extra:  # fc2's input comes from the frozen fc1: its dX is never used
        assert cm.plan["fc2"].grad_sparsity is None and "no trainable parameter upstream" in cm.plan["fc2"].reason
        assert cm.plan["fc3"].grad_sparsity == "2:4"
    before = {name: cm.effective_weight(name).clone() for name in cm.plan.names}
    opt = torch.optim.SGD(cm.parameters(), lr=0.5)
    F.cross_entropy(cm(x), torch.randint(0, 10, (x.shape[0],))).backward()
    opt.step()
    for lp in cm.plan:
        module = cm.sparse_module(lp.name)
        trainable = f"{lp.name}.weight" not in frozen
        assert module.weight.requires_grad == trainable and module.bias.requires_grad == trainable
        assert torch.equal(cm.effective_weight(lp.name), before[lp.name]) != trainable, lp.name


def test_ste_mask_follows_the_weights_and_decays_pruned_ones():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    plan = sparsec.explain(model, example_inputs=(x,), include=["0"], min_weights=0)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, plan=plan, weight_update="ste", ste_decay=0.5)
    layer = cm.sparse_module("0")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 8))  # a dense shadow weight: the mask is re-derived from it
    y = cm(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    mask = cm.mask("0")
    assert torch.equal(mask, lexsort_mask(layer.weight.detach().reshape(8, 2, 4), 2).reshape(8, 8))
    # straight-through: every weight gets dL/d(W*mask); pruned ones also SR-STE's 0.5 * w
    expected = _ste_grad(x, layer, cm, G, mask) + 0.5 * layer.weight.detach() * (~mask)
    assert torch.allclose(layer.weight.grad, expected, atol=1e-5)
    assert (layer.weight.grad[~mask] != 0).any(), "pruned weights do receive gradient under STE"
    # weights crossing each other flip the mask on the next step
    with torch.no_grad():
        flipped = torch.where(mask, torch.full_like(layer.weight, 0.01), torch.full_like(layer.weight, 5.0))
        layer.weight.copy_(flipped)
    cm(x)
    assert torch.equal(cm.mask("0"), ~mask)


def test_ste_keeps_pruned_weights_and_reads_the_mask_the_weight_implies():
    """SR-STE starts from the dense weights (pruned ones keep their values, to win their place back),
    and after an optimizer step, with no forward since, the mask, the effective weight and an inference
    compile of the trained model are those the weight now implies, not the step-old stored ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, include=["2"], min_weights=0, weight_update="ste")
    layer = cm.sparse_module("2")
    assert torch.equal(layer.weight.detach(), model[2].weight.detach())  # nothing zeroed
    opt = torch.optim.SGD(cm.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(cm(x), torch.arange(8) % 4).backward()
        opt.step()
    implied = lexsort_mask(layer.weight.detach().reshape(16, 4, 4), 2).reshape(16, 16)
    assert not torch.equal(implied, layer.weight_mask), "the steps should have moved the mask"
    assert torch.equal(cm.mask("2"), implied)
    assert torch.equal(cm.effective_weight("2"), layer.weight.detach() * implied)
    inference = sparsec.compile(cm, example_inputs=(x,), backend="torch")
    assert torch.equal(inference.mask("2"), implied)
    with torch.no_grad():
        assert output_error(inference(x), cm(x)) <= 1e-6


def _ste_grad(x, layer, cm, G, mask):
    """dL/d(W*mask) evaluated at the masked weight: what STE hands to every entry of W."""
    wm = (layer.weight.detach() * mask).requires_grad_(True)
    head = cm.graph_module.get_submodule("2")
    y = F.linear(F.relu(F.linear(x, wm, layer.bias.detach())), head.weight.detach(), head.bias.detach())
    (y * G).sum().backward()
    return wm.grad


class _SharedLayer(nn.Module):
    """One Linear applied three times in a forward (weight sharing, as in a recurrent step)."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.z = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.a(x)
        for _ in range(3):
            x = torch.relu(self.mid(x)) + x
        return self.z(x)


@pytest.mark.parametrize("update", ["fixed", "ste"])
def test_a_layer_called_several_times_gets_the_sum_of_its_gradients(update):
    model, x = _SharedLayer(), torch.randn(5, 8)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, include=["mid"], min_weights=0,
                         weight_update=update, **({"ste_decay": 0.0} if update == "ste" else {}))
    y = cm(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()  # under STE the mask buffer is rewritten by each of the three calls
    mask = cm.mask("mid")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.mid.weight.mul_(mask)
    (reference(x) * G).sum().backward()
    expected = reference.mid.weight.grad * (mask if update == "fixed" else 1)
    assert torch.allclose(cm.sparse_module("mid").weight.grad, expected, atol=1e-5)


def test_training_under_autocast_bf16():
    model, inputs = load_example("cnn").build_model()
    cm = sparsec.compile(model.train(), pattern="2:4", example_inputs=inputs, train=True, grad_pattern="2:4")
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(*inputs)
    loss = F.cross_entropy(out.float(), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    layer = cm.sparse_module("stage1.0.0")
    assert out.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all() and (layer.weight[~cm.mask("stage1.0.0")] == 0).all()


def test_trained_model_computes_like_the_masked_original():
    model, inputs = load_example("transformer").build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs, train=True, grad_pattern="2:4")
    inference = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    with torch.no_grad():
        assert output_error(cm(*inputs), inference(*inputs)) <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_pattern="2:4"), "needs train=True"),
    (dict(train=True, grad_pattern="fanin:0.5"), "pruned N:M"),
    (dict(train=True, grad_mode="random"), "grad_mode='random'"),
    (dict(train=True, weight_update="sgd"), "weight_update='sgd'"),
    (dict(train=True, quantize="int8"), "quantize is for inference"),
    (dict(train=True, backend="triton"), "torch training runtime"),
    (dict(train="yes"), "train must be True or False"),
    (dict(train=True, weight_update="ste", ste_decay=float("nan")), "ste_decay must be a finite non-negative"),
    (dict(train=True, weight_update="ste", ste_decay=float("inf")), "ste_decay must be a finite non-negative"),
    (dict(train=True, weight_update="ste", ste_decay=-1.0), "ste_decay must be a finite non-negative"),
    (dict(train=True, ste_decay=0.1), "used with weight_update='ste' only"),
    (dict(train=True, grad_mode="rescale"), "no gradient is pruned: pass grad_pattern"),
    (dict(weight_update="ste"), "needs train=True"),
    (dict(train=True, weight_update="ste", pattern="dense"), "pattern='dense' prunes nothing"),
    (dict(train=True, grad_pattern=(2, 4)), "grad_pattern: pattern must be a string"),
])
def test_bad_training_options(kwargs, match):
    model, inputs = load_example("mlp").build_model()
    with pytest.raises((ValueError, TypeError), match=match):
        sparsec.compile(model, example_inputs=inputs, **kwargs)


@pytest.mark.parametrize("pattern, update", [("2:4", "fixed"), ("2:4", "ste"), ("fanin:0.8", "fixed")])
def test_a_trained_model_compiles_for_inference_with_its_learned_masks(pattern, update):
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), train=True, weight_update=update)
    opt = torch.optim.SGD(cm.parameters(), lr=0.5)
    for _ in range(3):  # move the weights so magnitude masks would now differ from the trained ones
        F.cross_entropy(cm(x), torch.arange(8)).backward()
        opt.step()
        opt.zero_grad()
    cm(x)
    trained = {lp.name: cm.mask(lp.name) for lp in cm.plan.sparse_layers}
    if pattern.startswith("fanin"):  # an ablated neuron: rows end up with different counts
        layer = cm.sparse_module("fc2")
        with torch.no_grad():
            layer.weight_mask[3] = False
            layer.weight[3] = 0
        trained["fc2"] = cm.mask("fc2")
    deployed = sparsec.compile(cm, example_inputs=(x,))
    assert {lp.name for lp in deployed.plan.sparse_layers} == set(trained)
    for name, mask in trained.items():
        assert torch.equal(deployed.mask(name), mask), name
        assert "learned in training" in deployed.plan[name].reason
    with torch.no_grad():
        assert output_error(deployed(x), cm.eval()(x)) <= 1e-5


def test_a_plan_with_a_fan_in_gradient_pattern_is_refused_by_name():
    """Data gradients are pruned N:M only; a plan asking for a constant fan-in gradient pattern used to
    end in a PassError wrapping AttributeError ('FanIn' object has no attribute 'm')."""
    model, inputs = load_example("mlp").build_model()
    plan = sparsec.explain(model, example_inputs=inputs, train=True, grad_pattern="2:4")
    name = next(lp.name for lp in plan if lp.grad_sparsity is not None)
    plan[name].grad_sparsity = "fanin:0.5"
    with pytest.raises(ValueError, match=rf"gradient pattern 'fanin:0.5' on layer '{name}'.*N:M"):
        sparsec.compile(model, example_inputs=inputs, plan=plan, train=True)


@pytest.mark.parametrize("dims", [1, 2])
def test_sdgp_conv_on_an_unbatched_input(dims):
    """nn.Conv2d / Conv1d take one sample without a batch dim ([C, H, W] / [C, L]); a model compiled with
    grad_pattern compiled from such an example and then refused it on the first call ("expects a batched
    input"). The data gradient is pruned along channels at each position, as for a batch of one."""
    conv, grad = (nn.Conv1d, torch.nn.grad.conv1d_input) if dims == 1 else (nn.Conv2d, torch.nn.grad.conv2d_input)
    wgrad = torch.nn.grad.conv1d_weight if dims == 1 else torch.nn.grad.conv2d_weight
    model = nn.Sequential(conv(4, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1))
    x = torch.randn(4, *(6,) * dims)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, grad_pattern="2:4", include=[".*"], min_weights=0)
    assert cm.plan["2"].grad_sparsity == "2:4"
    xg = x.clone().requires_grad_(True)
    y = cm(xg)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    wa, wb = cm.effective_weight("0"), cm.effective_weight("2")
    pre = F.conv2d(x, wa, model[0].bias, padding=1) if dims == 2 else F.conv1d(x, wa, model[0].bias, padding=1)
    G1 = G.unsqueeze(0)  # one sample: channels are dim 1, positions the rest
    pruned = prune_channels(G1, 2, 4) if dims == 2 else prune_rows(G1.transpose(1, 2), 2, 4).transpose(1, 2)
    d_pre = grad(pre.unsqueeze(0).shape, wb, pruned, padding=1) * (pre > 0)
    assert torch.allclose(xg.grad, grad(x.unsqueeze(0).shape, wa, d_pre, padding=1)[0], atol=1e-5)
    expected_wa = wgrad(x.unsqueeze(0), wa.shape, d_pre, padding=1) * cm.mask("0")
    assert torch.allclose(cm.sparse_module("0").weight.grad, expected_wa, atol=1e-4)
    h = torch.relu(pre).unsqueeze(0)
    assert torch.allclose(cm.sparse_module("2").weight.grad, wgrad(h, wb.shape, G1, padding=1) * cm.mask("2"), atol=1e-4)


def test_numeric_options_take_numpy_scalars_and_refuse_bools():
    """A numpy scalar (a sweep's np.float32 decay, np.int64 size) was refused with "must be a finite
    non-negative number, got np.float32(0.001)"; quant_budget=True was taken as a budget of 1.0."""
    import numpy as np

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, weight_update="ste", ste_decay=np.float32(0.5),
                         min_weights=np.int64(0), include=["2"])
    layer = cm.sparse_module("2")
    assert layer.ste_decay == 0.5 and type(layer.ste_decay) is float
    y = cm(x)
    G = torch.randn_like(y)
    (y * G).sum().backward()
    mask = cm.mask("2")
    wm = (layer.weight.detach() * mask).requires_grad_(True)
    h = torch.relu(F.linear(torch.relu(model[0](x)), wm, model[2].bias))
    (model[4](h) * G).sum().backward()
    assert torch.allclose(layer.weight.grad, wm.grad + 0.5 * layer.weight.detach() * ~mask, atol=1e-5)
    with pytest.raises(ValueError, match="quant_budget must be a positive number, got True"):
        sparsec.compile(model, example_inputs=(x,), quantize="auto", quant_budget=True)
    with pytest.raises(ValueError, match="ste_decay must be a finite non-negative number, got True"):
        sparsec.compile(model, example_inputs=(x,), train=True, weight_update="ste", ste_decay=True)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is torch >= 2.9")
def test_an_optimizer_with_dense_updates_cannot_change_what_fixed_masks_compute():
    """Muon orthogonalizes each weight's whole momentum matrix, so its update is dense and the raw
    Parameter gets values under the mask (documented); the layer must still compute with weight * mask."""
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), train=True, grad_pattern="2:4")
    masks = {lp.name: cm.mask(lp.name) for lp in cm.plan.sparse_layers}
    opt = torch.optim.Muon([p for p in cm.parameters() if p.dim() == 2], lr=0.02)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(cm(x), torch.arange(8)).backward()
        opt.step()
    assert any((cm.sparse_module(n).weight[~m] != 0).any() for n, m in masks.items()), "Muon's update is dense"
    h = x
    for name in ("fc1", "fc2", "fc3", "head"):
        layer = cm.graph_module.get_submodule(name)
        w = layer.weight.detach() * masks[name] if name in masks else layer.weight.detach()
        h = F.linear(h, w, layer.bias.detach())
        h = torch.relu(h) if name != "head" else h
        if name in masks:
            assert torch.equal(cm.mask(name), masks[name])
            assert torch.equal(cm.effective_weight(name), w)
    with torch.no_grad():
        assert torch.allclose(cm(x), h, atol=1e-6)


class _RegisteredOutOfCallOrder(nn.Module):
    """Registers b before a and calls a first; a root-level parameter read in between."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64)
        self.scale = nn.Parameter(torch.ones(64))
        self.a = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        h = F.relu(self.a(F.relu(self.inp(x)))) * self.scale
        return self.out(F.relu(self.b(h)))


def test_parameters_come_in_the_models_order_after_compile_copy_and_load(tmp_path):
    """fx builds a graph module with what the graph reads in the order it reads it: the compiled model's
    parameters came in forward order (a before b), so a dense phase's optimizer state_dict, which
    optimizers map by position, loaded b's momentum into a's weight (equal shapes: no error). Copies and
    saved files keep the model's order too."""
    torch.manual_seed(0)
    model, x = _RegisteredOutOfCallOrder(), torch.randn(4, 32)
    target = torch.zeros(4, dtype=torch.long)
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), target).backward()
    dense_opt.step()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), train=True, include=["a", "b"])
    path = tmp_path / "cm.sparsec"
    sparsec.save(cm, path)
    names = [name for name, _ in model.named_parameters()]
    for compiled in (cm, copy.deepcopy(cm), sparsec.load(path)):
        assert [name.removeprefix("graph_module.") for name, _ in compiled.named_parameters()] == names
    opt = torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(dense_opt.state_dict())
    for name in ("inp", "a", "b", "out"):
        ours = opt.state[cm.graph_module.get_submodule(name).weight]["momentum_buffer"]
        assert torch.equal(ours, dense_opt.state[model.get_submodule(name).weight]["momentum_buffer"])
