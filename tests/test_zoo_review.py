"""Architectures users compile, beyond tests/test_model_zoo.py: a GPT-2 stack of HF-style `Conv1D`
layers (addmm on a weight stored [in, out]), a causal-mask buffer and a head tied to the token
embedding, which symbolic_trace cannot trace (the mask is sliced by a traced length), so torch.export
captures it. Bug this caught: torch.export reads the tied head as the embedding's weight, so the graph
never references `lm_head`; pickling rebuilt the graph module from its code, which keeps only the
submodules the graph reads, and `sparsec.load` returned a model without `lm_head`: its state_dict lost
the key, and `load_state_dict(cm.state_dict())` (strict) failed with "Unexpected key(s)".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import output_error, pruned_model


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: weight [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf) * 0.02), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size()[:-1] + (self.nf,))


class Block(nn.Module):
    def __init__(self, d, heads, t_max):
        super().__init__()
        self.heads, self.ln_1, self.ln_2 = heads, nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj, self.c_fc, self.mlp_proj = Conv1D(3 * d, d), Conv1D(d, d), Conv1D(4 * d, d), Conv1D(d, 4 * d)
        self.register_buffer("bias", torch.tril(torch.ones(t_max, t_max, dtype=torch.bool)).view(1, 1, t_max, t_max))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = [p.view(b, t, self.heads, c // self.heads).transpose(1, 2) for p in self.c_attn(self.ln_1(x)).split(c, 2)]
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        att = torch.where(self.bias[:, :, :t, :t], att, torch.tensor(torch.finfo(att.dtype).min))
        x = x + self.c_proj(torch.matmul(att.softmax(-1), v).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab=96, d=64, heads=4, t_max=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t_max, d)
        self.h = nn.ModuleList([Block(d, heads, t_max) for _ in range(2)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _ids(batch, t=12):
    return torch.randint(0, 96, (batch, t))


def test_gpt2_conv1d_training_step_matches_the_pruned_reference():
    torch.manual_seed(0)
    model = GPT2().train()
    cm = sparsec.compile(model, pattern="fanin:0.9", example_inputs=(_ids(2),), min_weights=0, train=True)
    plan = {lp.name: lp for lp in cm.plan}
    assert plan["lm_head"].sparsity is None and "tied" in plan["lm_head"].reason
    sparse = [n for n, lp in plan.items() if lp.sparsity]
    assert len(sparse) == 7 and all(plan[n].op == "matmul" for n in sparse)
    ref = pruned_model(model, cm.plan)
    masks, params = {n: cm.mask(n) for n in sparse}, dict(ref.named_parameters())
    x = _ids(3)
    for module in (cm, ref):
        module(x).square().mean().backward()
    for n in sparse:
        params[f"{n}.weight"].grad *= masks[n]  # masked training: pruned weights get no update
    for module in (cm, ref):
        torch.optim.SGD(module.parameters(), lr=0.5).step()
    for n in sparse:
        assert torch.allclose(cm.effective_weight(n), params[f"{n}.weight"], atol=1e-6), n
        assert not cm.effective_weight(n)[~masks[n]].any(), n
    tied = dict(cm.named_parameters(remove_duplicate=False))
    assert tied["graph_module.lm_head.weight"] is tied["graph_module.wte.weight"]
    with torch.no_grad():
        assert output_error(cm(x), ref(x)) <= 1e-5


def test_saved_export_model_keeps_its_tied_head(tmp_path):
    torch.manual_seed(0)
    model = GPT2().eval()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(_ids(2),), min_weights=0, train=True)
    assert cm.trace_method == "torch.export"
    sparsec.save(cm, tmp_path / "m")
    loaded = sparsec.load(tmp_path / "m")
    assert set(loaded.state_dict()) == set(cm.state_dict())
    loaded.load_state_dict(cm.state_dict())  # strict
    tied = dict(loaded.named_parameters(remove_duplicate=False))
    assert tied["graph_module.lm_head.weight"] is tied["graph_module.wte.weight"]
    x = _ids(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), cm(x))
