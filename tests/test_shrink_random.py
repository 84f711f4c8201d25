"""shrink on random CNNs with random dead rows, columns and filters: whatever it removes, the outputs
stay those of the model it came from (plain torch), in train mode (batch statistics) and eval mode.

The nets mix what shrink follows: inverted residual blocks (expansion, BatchNorm, depthwise conv with
zero / reflect / replicate padding, squeeze-excitation gates, projection, residual), plain convs with
functional and module pools, channel concatenation, and flatten / view(b, -1) / mean heads."""
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import output_error

ACTIVATIONS = [F.relu, F.relu6, F.hardswish, F.gelu, F.silu, torch.tanh]


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Inverted(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        h = c * rng.choice([2, 4])
        maybe_bn = lambda: nn.BatchNorm2d(h) if rng.random() < 0.6 else nn.Identity()  # noqa: E731
        self.exp, self.bn1 = nn.Conv2d(c, h, 1, bias=rng.random() < 0.5), maybe_bn()
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=rng.random() < 0.5,
                            padding_mode=rng.choice(["zeros", "reflect", "replicate"]))
        self.bn2 = maybe_bn()
        self.se = SqueezeExcite(h, max(2, h // 4)) if rng.random() < 0.4 else nn.Identity()
        self.proj = nn.Conv2d(h, c, 1, bias=rng.random() < 0.7)
        self.act1, self.act2, self.residual = rng.choice(ACTIVATIONS), rng.choice(ACTIVATIONS), rng.random() < 0.7

    def forward(self, x):
        y = self.proj(self.se(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.exp(x))))))))
        return x + y if self.residual else y


class Plain(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=rng.random() < 0.7)
        self.bn = nn.BatchNorm2d(c) if rng.random() < 0.5 else nn.Identity()
        self.act, self.pool, self.max_pool = rng.choice(ACTIVATIONS), rng.choice(["max", "avg", "module", None]), nn.MaxPool2d(2)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        pools = {"max": lambda t: F.max_pool2d(t, 2), "avg": lambda t: F.avg_pool2d(t, 2), "module": self.max_pool}
        return pools[self.pool](x) if self.pool else x


class Concat(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c - c // 2, 3, padding=1)

    def forward(self, x):
        return F.relu(torch.cat([self.a(x), self.b(x)], 1))


class RandomNet(nn.Module):
    def __init__(self, rng):
        super().__init__()
        c = rng.choice([8, 12, 16])
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=rng.random() < 0.5)
        self.blocks = nn.Sequential(*[rng.choice([Inverted, Plain, Concat])(rng, c) for _ in range(rng.randint(1, 3))])
        self.head_kind, self.act = rng.choice(["flatten", "view", "mean"]), rng.choice(ACTIVATIONS)
        self.fc1, self.fc2 = nn.Linear(c if self.head_kind == "mean" else c * 16, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        if self.head_kind == "mean":
            x = x.mean((2, 3))
        else:
            x = F.adaptive_avg_pool2d(x, 4)
            x = torch.flatten(x, 1) if self.head_kind == "flatten" else x.view(x.size(0), -1)
        return self.fc2(self.act(self.fc1(x)))


@torch.no_grad()
def kill_groups(rng, model):
    """Dead rows (with constant biases), dead columns, dead depthwise filters, BatchNorms with zero betas."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rows = rng.sample(range(m.weight.shape[0]), rng.randint(0, m.weight.shape[0] // 2))
            m.weight[rows] = 0
            if m.bias is not None:
                for r in rows:
                    m.bias[r] = rng.choice([0.0, -1.0, 0.5, rng.uniform(-1, 1)])
            if m.weight.shape[1] > 1:
                m.weight[:, rng.sample(range(m.weight.shape[1]), rng.randint(0, m.weight.shape[1] // 3))] = 0
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.bias[rng.sample(range(m.num_features), m.num_features // 3)] = 0.0
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), train_mode=st.booleans())
def test_shrink_keeps_the_outputs_of_random_cnns(seed, train_mode):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = RandomNet(rng)
    kill_groups(rng, model)
    x = torch.randn(4, 3, 8, 8)
    cm = sparsec.compile(model.train(train_mode), pattern="dense", example_inputs=(x,), train=True)
    small = sparsec.shrink(cm.train(train_mode))
    with torch.no_grad():
        assert output_error(small(x), cm(x)) <= 1e-4


def test_the_random_cnns_do_lose_channels():
    """(So the test above checks removals, not only models shrink left alone.)"""
    removed = 0
    for seed in range(8):
        rng = random.Random(seed)
        torch.manual_seed(seed)
        model = RandomNet(rng)
        kill_groups(rng, model)
        report = sparsec.shrink(sparsec.compile(model.eval(), pattern="dense", example_inputs=(torch.randn(2, 3, 8, 8),),
                                                train=True)).shrink_report
        removed += report.channels_before - report.channels_after
    assert removed >= 40
