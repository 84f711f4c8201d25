"""Pruning-aware training side by side with an independent plain-torch reference.

Each test trains a compiled model and a plain-torch copy from identical weights with the same
optimizer and data. The reference applies masks by hand (`weight * mask` in its forward, masks from
the oracle's lexsort), prunes dY by hand for SDGP (a small autograd.Function: dX = prune(dY) W,
dW and db from the dense dY), and re-derives SR-STE's mask from |W| every forward. After every step
the parameters must agree and pruned weights must be exactly 0 (no optimizer revives them)."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import lexsort_mask

STEPS = 4


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    rows = w.detach().reshape(w.shape[0], -1)
    return lexsort_mask(rows.reshape(rows.shape[0], -1, m), n).reshape(w.shape)


def prune_last(g: torch.Tensor, n: int, m: int, mode: str) -> torch.Tensor:
    """N:M along the last dim; "rescale" restores each row's L1 norm (a row left all zero stays 0)."""
    kept = g * lexsort_mask(g.detach().float().reshape(*g.shape[:-1], -1, m), n).reshape(g.shape)
    if mode == "magnitude":
        return kept
    before, after = g.float().abs().sum(-1, keepdim=True), kept.float().abs().sum(-1, keepdim=True)
    return (kept.float() * torch.where(after > 0, before / after, torch.zeros_like(after))).to(g.dtype)


def prune_channels(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return prune_last(g.permute(0, 2, 3, 1), n, m, "magnitude").permute(0, 3, 1, 2)


class _RefSDGP(torch.autograd.Function):
    """Linear (x [..., in]) or conv2d (conv = (stride, padding)) with a by-hand SDGP backward."""

    @staticmethod
    def forward(ctx, x, w, b, conv, mode):
        ctx.save_for_backward(x, w)
        ctx.conv, ctx.mode = conv, mode
        return F.linear(x, w, b) if conv is None else F.conv2d(x, w, b, *conv)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        if ctx.conv is None:
            rows = dy.reshape(-1, dy.shape[-1])
            return (prune_last(dy, 2, 4, ctx.mode) @ w, rows.t() @ x.reshape(-1, x.shape[-1]), rows.sum(0), None, None)
        s, p = ctx.conv
        return (torch.nn.grad.conv2d_input(x.shape, w, prune_channels(dy, 2, 4), stride=s, padding=p),
                torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=p), dy.sum((0, 2, 3)), None, None)


class RefLayer(nn.Module):
    """The reference for one compiled layer: masked weight (fixed or SR-STE) and optional SDGP."""

    def __init__(self, layer, mask, sdgp, mode="magnitude", ste_decay=None):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone() * (mask if mask is not None and ste_decay is None else 1))
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("mask", mask)
        self.conv = (layer.stride, layer.padding) if isinstance(layer, nn.Conv2d) else None
        self.sdgp, self.mode, self.ste_decay = sdgp, mode, ste_decay

    def forward(self, x):
        w = self.weight
        if self.ste_decay is not None:  # SR-STE: mask from |W| now; value W*mask, gradient straight through
            mask, decay, kept = nm_mask(w), self.ste_decay, w.detach()
            w = kept * mask + (w - kept)
            w.register_hook(lambda g: g + decay * kept * ~mask)  # SR-STE's term on the pruned weights
        elif self.mask is not None:
            w = w * self.mask
        b = self.bias
        if not self.sdgp:
            return F.linear(x, w, b) if self.conv is None else F.conv2d(x, w, b, *self.conv)
        if torch.is_autocast_enabled("cpu"):  # what autocast does for a custom Function (cast_inputs)
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return _RefSDGP.apply(x.to(dtype), w.to(dtype), b.to(dtype), self.conv, self.mode)
        return _RefSDGP.apply(x, w, b, self.conv, self.mode)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc4(torch.tanh(self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(32, 16, 3, padding=1, stride=2), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x)))))).mean((2, 3)))


def side_by_side(model, x, mode="magnitude", ste_decay=None, **options):
    """(compiled, reference, the compiled model's parameters in the reference's order, masks)."""
    extra = {"weight_update": "ste", "ste_decay": ste_decay} if ste_decay is not None else {}
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), train=True, **extra, **options)
    ref, masks = copy.deepcopy(model), {}
    for lp in cm.plan:
        if lp.sparsity is None and lp.grad_sparsity is None:
            continue
        layer = model.get_submodule(lp.name)
        mask = nm_mask(layer.weight) if lp.sparsity else None
        if mask is not None:
            assert torch.equal(cm.mask(lp.name), mask), lp.name
            masks[lp.name] = mask
        setattr(ref, lp.name, RefLayer(layer, mask, lp.grad_sparsity == "2:4", mode, ste_decay if mask is not None else None))
    own = dict(cm.named_parameters())
    params = [own[f"graph_module.{name}"] for name, _ in ref.named_parameters()]
    return cm, ref, params, masks


def assert_same(params, ref, masks, cm, exact=True):
    for p, q in zip(params, ref.parameters()):
        if exact:
            assert torch.equal(p.detach(), q.detach())
        else:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for name, mask in masks.items():
        assert torch.equal(cm.mask(name), mask)
        assert (cm.sparse_module(name).weight[~mask] == 0).all(), f"a pruned weight of {name} revived"


OPTIMIZERS = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2, fused=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("loop", ["plain", "groups-clip-accumulate"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fixed_masks_train_like_a_masked_reference(optimizer, loop):
    torch.manual_seed(0)
    model, x, target = MLP(), torch.randn(12, 32), torch.randint(0, 8, (12,))
    cm, ref, params, masks = side_by_side(model, x)
    make = OPTIMIZERS[optimizer]
    opts = []
    for ps in (params, list(ref.parameters())):
        if loop == "plain":
            opts.append(make(ps))
        else:  # two groups (biases slower, no decay); set_to_none=False; 3 micro-batches; clipping
            opts.append(make([{"params": [p for p in ps if p.dim() > 1]},
                              {"params": [p for p in ps if p.dim() == 1], "lr": 1e-3, "weight_decay": 0.0}]))
    micro = 1 if loop == "plain" else 3
    for _ in range(STEPS):
        for net, opt, ps in ((cm, opts[0], params), (ref, opts[1], list(ref.parameters()))):
            opt.zero_grad(set_to_none=loop == "plain")
            for i in range(micro):
                (F.cross_entropy(net(x[i::micro]), target[i::micro]) / micro).backward()
            if loop != "plain":
                torch.nn.utils.clip_grad_norm_(ps, 0.05)
            opt.step()
        assert_same(params, ref, masks, cm)


@pytest.mark.parametrize("mode", ["magnitude", "rescale"])
@pytest.mark.parametrize("shape", [(12, 32), (4, 3, 32)])
def test_sdgp_trains_like_a_by_hand_pruned_backward(mode, shape):
    """X.grad from prune(dY) along output features (3-D inputs: per token), W.grad / b.grad from the
    dense dY; fc2 and fc3 prune (fc1 reads the input, fc4's dY is the loss gradient), fc2 / fc3 also have
    masked weights."""
    torch.manual_seed(1)
    model, x, target = MLP(), torch.randn(*shape), torch.randint(0, 8, (shape[0],))
    cm, ref, params, masks = side_by_side(model, x, mode, grad_pattern="2:4", grad_mode=mode)
    assert [lp.grad_sparsity for lp in cm.plan] == [None, "2:4", "2:4", None]
    opts = [torch.optim.SGD(ps, lr=0.1, momentum=0.9) for ps in (params, list(ref.parameters()))]
    for _ in range(STEPS):
        for net, opt in ((cm, opts[0]), (ref, opts[1])):
            opt.zero_grad()
            out = net(x)
            F.cross_entropy(out if out.dim() == 2 else out.mean(1), target).backward()
            opt.step()
        assert_same(params, ref, masks, cm)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_sdgp_trains_like_a_by_hand_pruned_backward(channels_last):
    torch.manual_seed(2)
    model, x, target = CNN(), torch.randn(4, 3, 8, 8), torch.randint(0, 8, (4,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cm, ref, params, masks = side_by_side(model, x, grad_pattern="2:4")
    assert [(lp.sparsity, lp.grad_sparsity) for lp in cm.plan] == [(None, None), ("2:4", "2:4"), ("2:4", "2:4"), (None, None)]
    opts = [torch.optim.SGD(ps, lr=0.1, momentum=0.9) for ps in (params, list(ref.parameters()))]
    for _ in range(STEPS):
        for net, opt in ((cm, opts[0]), (ref, opts[1])):
            opt.zero_grad()
            F.cross_entropy(net(x), target).backward()
            opt.step()
        # conv2d_input / conv2d_weight may take another algorithm than convolution_backward
        assert_same(params, ref, masks, cm, exact=False)


@pytest.mark.parametrize("grad_pattern", [None, "2:4"])
def test_autocast_bf16_trains_like_the_reference(grad_pattern):
    torch.manual_seed(3)
    model, x, target = MLP(), torch.randn(12, 32), torch.randint(0, 8, (12,))
    cm, ref, params, masks = side_by_side(model, x, **({"grad_pattern": grad_pattern} if grad_pattern else {}))
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1) for ps in (params, list(ref.parameters()))]
    for _ in range(STEPS):
        for net, opt in ((cm, opts[0]), (ref, opts[1])):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), target)
            loss.backward()
            opt.step()
        assert all(p.grad.dtype == torch.float32 for p in params)
        assert_same(params, ref, masks, cm)


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_sr_ste_trains_like_the_reference(decay):
    torch.manual_seed(4)
    model, x, target = MLP(), torch.randn(12, 32), torch.randint(0, 8, (12,))
    cm, ref, params, _ = side_by_side(model, x, ste_decay=decay)
    opts = [torch.optim.SGD(ps, lr=0.5, momentum=0.9) for ps in (params, list(ref.parameters()))]
    start = {lp.name: cm.mask(lp.name) for lp in cm.plan.sparse_layers}
    for _ in range(STEPS + 2):
        for net, opt in ((cm, opts[0]), (ref, opts[1])):
            opt.zero_grad()
            F.cross_entropy(net(x), target).backward()
            opt.step()
        assert_same(params, ref, {}, cm)
        for lp in cm.plan.sparse_layers:
            assert torch.equal(cm.mask(lp.name), nm_mask(ref.get_submodule(lp.name).weight))
    assert any(not torch.equal(cm.mask(n), m) for n, m in start.items()), "the masks should have moved"


@pytest.mark.parametrize("options", [{}, {"grad_pattern": "2:4"}, {"weight_update": "ste"}])
@pytest.mark.parametrize("how", ["state_dict", "sparsec.save"])
def test_resuming_mid_training_continues_like_an_uninterrupted_run(how, options, tmp_path):
    """The resumed model is compiled from other initial weights (other magnitude masks): the masks
    must come from the checkpoint, and training then continues bit for bit."""
    torch.manual_seed(5)
    x, target = torch.randn(12, 32), torch.randint(0, 8, (12,))
    compile_ = lambda m: sparsec.compile(m, pattern="2:4", example_inputs=(x,), train=True, **options)  # noqa: E731
    run = compile_(MLP())
    opt = torch.optim.AdamW(run.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)

    def step(net, o):
        o.zero_grad()
        F.cross_entropy(net(x), target).backward()
        o.step()

    for _ in range(STEPS):
        step(run, opt)
    if how == "state_dict":
        resumed = compile_(MLP())
        resumed.load_state_dict(copy.deepcopy(run.state_dict()))
    else:
        path = os.path.join(tmp_path, "mid.sparsec")
        sparsec.save(run, path)
        resumed = sparsec.load(path)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(STEPS):
        step(run, opt)
        step(resumed, opt2)
    for p, q in zip(run.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for lp in run.plan.sparse_layers:
        assert torch.equal(run.mask(lp.name), resumed.mask(lp.name))
