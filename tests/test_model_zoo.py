"""Whole models of the kinds users bring, compiled end to end and checked against the oracle.

Each model is compiled under each pattern; the compiled model must compute what the original
computes with the oracle's pruned (and fake-quantized) weights (tests/oracle.py, independent of
sparsec), at the example's batch size and another one, after a save / load, and a training step
must keep masked weights at exactly 0. Bugs this net caught: a layer called three times in one
forward crashed SR-STE's backward; an optional `mask=None` argument made compile fail. Random CNNs
(tests/test_shrink_random.py's generator) are compiled under each pattern against the oracle too.
"""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import output_error, pruned_model
from test_shrink_random import RandomNet, kill_groups


class TinyGPT(nn.Module):
    """Embedding, fused qkv projection split into heads, causal SDPA, GELU MLP, head tied to the embedding."""

    def __init__(self, vocab=96, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.emb, self.ln1, self.ln2 = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.fc, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        x = self.emb(tokens)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = [part.view(b, t, self.heads, c // self.heads).transpose(1, 2) for part in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return self.head(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(F.relu(self.stem(x))), 1), 1))


class TinyMobileNet(nn.Module):
    """Depthwise-separable blocks and a grouped conv (which 2:4 leaves dense or runs grouped)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2, 1)
        self.dw1, self.pw1 = nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.Conv2d(32, 64, 1)
        self.dw2, self.pw2 = nn.Conv2d(64, 64, 3, 2, 1, groups=64), nn.Conv2d(64, 128, 1)
        self.grouped, self.fc = nn.Conv2d(128, 128, 3, 1, 1, groups=4), nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu6(self.pw1(F.relu6(self.dw1(F.relu6(self.stem(x))))))
        x = F.silu(self.grouped(F.hardswish(self.pw2(self.dw2(x)))))
        return self.fc(x.mean((2, 3)))


class LoRALinear(nn.Module):
    def __init__(self, cin, cout, rank=4):
        super().__init__()
        self.base, self.A, self.B = nn.Linear(cin, cout), nn.Linear(cin, rank, bias=False), nn.Linear(rank, cout, bias=False)

    def forward(self, x):
        return self.base(x) + 0.5 * self.B(self.A(x))


class LoRAWeightShared(nn.Module):
    """LoRA adapters, and one layer applied three times (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp, self.lora, self.shared, self.out = nn.Linear(8, 64), LoRALinear(64, 64), nn.Linear(64, 64), nn.Linear(64, 2)

    def forward(self, x):
        h = F.relu(self.lora(F.relu(self.inp(x))))
        for _ in range(3):
            h = F.relu(self.shared(h)) + h
        return self.out(h)


class Encoder(nn.Module):
    """nn.TransformerEncoder: symbolic_trace cannot trace it, torch.export does (dynamic batch / length)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 64), nn.Linear(64, 3)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def _tokens(batch):
    return torch.randint(0, 96, (batch, 7))


ZOO = {  # name -> (model class, inputs at a batch size, trace method)
    "gpt": (TinyGPT, _tokens, "symbolic_trace"),
    "resnet": (TinyResNet, lambda b: torch.randn(b, 3, 16, 16), "symbolic_trace"),
    "mobilenet": (TinyMobileNet, lambda b: torch.randn(b, 3, 16, 16), "symbolic_trace"),
    "lora_shared": (LoRAWeightShared, lambda b: torch.randn(b, 8), "symbolic_trace"),
    "encoder": (Encoder, lambda b: torch.randn(b, 5, 8), "torch.export"),
}


def _encoder_weight(ref, name):
    return ref.get_parameter(name) if name.endswith("in_proj_weight") else ref.get_submodule(name).weight


@pytest.mark.parametrize("pattern, quantize", [("2:4", None), ("2:4", "int8"), ("4:8", None), ("fanin:0.9", None)])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_compiled_model_computes_like_the_oracle(name, pattern, quantize, tmp_path):
    cls, inputs, method = ZOO[name]
    torch.manual_seed(0)
    model = cls().eval()
    cm = sparsec.compile(model, pattern=pattern, quantize=quantize, example_inputs=(inputs(2),), min_weights=0)
    assert cm.trace_method == method
    assert sum(lp.sparsity is not None for lp in cm.plan) >= 2, cm.plan
    reference = pruned_model(model, cm.plan, _encoder_weight if name == "encoder" else None)
    sparsec.save(cm, tmp_path / "m")
    loaded = sparsec.load(tmp_path / "m")
    with torch.no_grad():
        for batch in (2, 5):
            x = inputs(batch)
            assert output_error(cm(x), reference(x)) <= 1e-5, (batch, cm.plan)
            assert torch.equal(loaded(x), cm(x))


@pytest.mark.parametrize("update", ["fixed", "ste"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_training_step_keeps_masked_weights_at_zero(name, update):
    cls, inputs, _ = ZOO[name]
    torch.manual_seed(0)
    model = cls().train()
    cm = sparsec.compile(model, example_inputs=(inputs(2),), min_weights=0, train=True, weight_update=update,
                         grad_pattern="2:4" if update == "fixed" else None)
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2, weight_decay=0.1)
    sparse = [lp.name for lp in cm.plan if lp.sparsity]
    before = {n: cm.effective_weight(n) for n in sparse}
    for _ in range(2):
        optimizer.zero_grad()
        cm(inputs(4)).float().square().mean().backward()
        optimizer.step()
    for n in sparse:
        weight, mask = cm.effective_weight(n), cm.mask(n)
        assert not weight[~mask].any(), n
        assert not torch.equal(weight, before[n]), f"{n} did not train"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), config=st.sampled_from([
    {"pattern": "2:4"}, {"pattern": "2:4", "quantize": "int8"}, {"pattern": "4:8"}, {"pattern": "fanin:0.8"},
    {"pattern": "1:4", "quantize": "auto"}, {"pattern": "2:4", "include": [".*"]}]))
def test_random_cnns_compute_like_the_oracle(seed, config):
    """The random CNNs shrink is tested on (depthwise, SE gates, pools, concatenation, view heads),
    some with dead groups, compiled under each pattern: the oracle-pruned model's outputs."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = RandomNet(rng)
    if rng.random() < 0.5:
        kill_groups(rng, model)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, **config)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
