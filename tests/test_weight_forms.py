"""`x @ W.T` on a parameter is `F.linear(x, W)`: a linear layer sparsec prunes like any other.
Weight matrices read in forms sparsec does not rewrite are listed in the plan, dense, with the reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import output_error, pruned_model, shrunk_and_unchanged
from sparsec.errors import InvalidInputError
from sparsec.runtime.layers import RuntimeLayer

TRANSPOSES = {
    ".T": lambda w: w.T,
    ".t()": lambda w: w.t(),
    ".mT": lambda w: w.mT,
    ".transpose(0, 1)": lambda w: w.transpose(0, 1),
    ".transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    ".permute(1, 0)": lambda w: w.permute(1, 0),
    ".permute((1, 0))": lambda w: w.permute((1, 0)),
    ".swapaxes(0, 1)": lambda w: w.swapaxes(0, 1),
    "torch.t": torch.t,
    "torch.transpose(w, 1, 0)": lambda w: torch.transpose(w, 1, 0),
}


class HandWritten(nn.Module):
    """A block written with raw parameters, as attention and MLP code often is: y = x @ W.T."""

    def __init__(self, transpose, d=64, hidden=128, out=8, untraceable=False):
        super().__init__()
        self.transpose, self.untraceable = transpose, untraceable
        self.inp = nn.Linear(32, d)
        self.w_up = nn.Parameter(torch.randn(hidden, d) / 8)
        self.b_up = nn.Parameter(torch.randn(hidden) / 8)
        self.w_down = nn.Parameter(torch.randn(d, hidden) / 8)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu(h @ self.transpose(self.w_up) + self.b_up)
        h = h @ self.transpose(self.w_down)
        if self.untraceable and h.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
            h = h * 1.0
        return self.head(h)


@pytest.mark.parametrize("form", sorted(TRANSPOSES))
def test_every_transpose_form_is_a_linear_layer(form):
    torch.manual_seed(0)
    model, x = HandWritten(TRANSPOSES[form]).eval(), torch.randn(3, 5, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "symbolic_trace"
    for name, shape in [("w_up", (128, 64)), ("w_down", (64, 128))]:
        lp = cm.plan[name]
        assert (lp.op, lp.weight_shape, lp.sparsity) == ("linear", shape, "2:4"), lp.reason
    # groups of 4 run along W's rows (in_features), as for nn.Linear
    assert (cm.mask("w_up").reshape(128, -1, 4).sum(-1) == 2).all()
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    # no dense copy and no transpose left behind
    code = cm.graph_module.code
    assert not hasattr(cm.graph_module, "w_up") and not hasattr(cm.graph_module, "w_down")
    assert not any(word in code for word in ["self.w_up", "self.w_down", "getattr", "transpose", "permute", "swapaxes", ".t(", "torch.t("])


def test_export_graphs_rewrite_transposed_weights():
    torch.manual_seed(0)
    for form in [".T", ".t()", ".permute(1, 0)", ".transpose(-1, -2)"]:
        model, x = HandWritten(TRANSPOSES[form], untraceable=True).eval(), torch.randn(4, 32)
        cm = sparsec.compile(model, example_inputs=(x,))
        assert cm.trace_method == "torch.export"
        assert cm.plan["w_up"].sparsity == "2:4" and cm.plan["w_down"].op == "linear", form
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_plan_lists_functional_layers_in_the_order_they_run():
    model = HandWritten(TRANSPOSES[".T"])
    assert sparsec.explain(model, example_inputs=(torch.randn(2, 32),)).names == ["inp", "w_up", "w_down", "head"]


class SharedTranspose(nn.Module):
    def __init__(self, extra_use):
        super().__init__()
        self.extra_use = extra_use
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        wt = self.w.t()
        h = torch.relu(self.a(x) @ wt)
        h = h @ wt  # a second call site of the same layer
        if self.extra_use:
            h = h + wt.sum(0)  # another use of the transposed weight
        return self.b(h)


def test_a_transposed_weight_used_twice():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    model = SharedTranspose(extra_use=False).eval()
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["w"].sparsity == "2:4"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    model = SharedTranspose(extra_use=True).eval()
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["w"].sparsity is None and "also read by sum" in cm.plan["w"].reason
    assert torch.equal(cm(x), model(x))


class OtherForms(nn.Module):
    """Weight matrices used in ways sparsec does not rewrite."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.left = nn.Parameter(torch.randn(64, 64) / 8)       # batched matmul of a view of the weight
        self.mixed = nn.Parameter(torch.randn(64, 64) / 8)      # einsum with a permuted output
        self.stack = nn.Parameter(torch.randn(2, 64, 32) / 8)   # bmm of a 3-D weight
        self.pos = nn.Parameter(torch.randn(3, 64))             # added, not multiplied: not a layer

    def forward(self, x):
        h = self.a(x)
        h = (h.unsqueeze(0) @ self.left.unsqueeze(0).half().float()).squeeze(0)
        h = torch.einsum("bi,oi->ob", h, self.mixed).t() + self.pos
        h = torch.bmm(h.unsqueeze(0).expand(2, -1, -1), self.stack).sum(0)
        return self.b(torch.cat([h, h], -1))


def test_other_weight_matrix_uses_are_listed_dense_with_the_reason():
    torch.manual_seed(0)
    model, x = OtherForms().eval(), torch.randn(3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b"])
    for name, op in [("left", "matmul"), ("mixed", "einsum"), ("stack", "bmm")]:
        lp = cm.plan[name]
        assert lp.op == op and lp.sparsity is None and f"read by {op} in a form sparsec does not rewrite" in lp.reason
        assert "x @ W.T" in lp.reason
        assert torch.equal(cm.effective_weight(name), getattr(model, name))
    assert "pos" not in cm.plan.names
    assert cm.plan["a"].sparsity == "2:4"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    plan["mixed"].sparsity = "2:4"
    with pytest.raises(InvalidInputError, match="mixed.*read by einsum"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


class SlicedWeights(nn.Module):
    """One parameter holding several weight matrices, read in parts, as fused-QKV attention code often is."""

    def __init__(self, d=32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, 8)
        self.qkv = nn.Parameter(torch.randn(3 * d, d) / 6)     # sliced: qkv[:d]
        self.gate_up = nn.Parameter(torch.randn(2 * d, d) / 6)  # chunked: gate, up = gate_up.chunk(2)
        self.d = d

    def forward(self, x):
        h = self.a(x)
        q = F.linear(h, self.qkv[: self.d])
        gate, up = self.gate_up.chunk(2)
        h = F.silu(F.linear(q, gate)) * F.linear(q, up)
        return self.b(h)


class UntraceableSlicedWeights(SlicedWeights):
    def forward(self, x):
        if x.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
            x = x * 1.0
        return super().forward(x)


@pytest.mark.parametrize("untraceable", [False, True])
def test_weights_read_in_parts_are_listed_dense_with_the_reason(untraceable):
    """Not pruned (sparsec prunes weights read whole), and not passed over: each is in the plan, saying so.
    Both tracers: symbolic_trace (getitem, chunk) and torch.export (aten.slice, aten.split)."""
    torch.manual_seed(0)
    model, x = (UntraceableSlicedWeights if untraceable else SlicedWeights)().eval(), torch.randn(3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "b"])
    assert cm.trace_method == ("torch.export" if untraceable else "symbolic_trace")
    for name in ("qkv", "gate_up"):
        lp = cm.plan[name]
        assert lp.sparsity is None and "only parts of it are read" in lp.reason and "linear" in lp.reason, lp.reason
        assert lp.weight_shape == tuple(getattr(model, name).shape)
    assert cm.plan["a"].sparsity == "2:4"
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_training_a_transposed_weight_layer():
    torch.manual_seed(0)
    model, x = HandWritten(TRANSPOSES[".T"]).train(), torch.randn(6, 32)
    cm = sparsec.compile(model, example_inputs=(x,), train=True)
    ref = pruned_model(model, cm.plan)
    cm(x).square().sum().backward()
    ref(x).square().sum().backward()
    mask = cm.mask("w_up")
    assert output_error(cm.effective_weight("w_up"), ref.w_up * mask) == 0
    trained = [m for m in cm.modules() if getattr(m, "layer_name", None) == "w_up"][0]
    assert output_error(trained.weight.grad * mask, ref.w_up.grad * mask) <= 1e-5


def test_triton_kernel_fuses_the_bias_and_activation_after_x_at_w_t():
    from sparsec.runtime.triton_linear import TritonSparseLinear

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
    model, x = HandWritten(TRANSPOSES[".T"]).eval().to(device), torch.randn(5, 32, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    modules = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}
    assert set(modules) == {"w_up", "w_down"}
    assert modules["w_up"].activation == "relu" and modules["w_up"].bias is not None
    assert "self.b_up" not in cm.graph_module.code and not hasattr(cm.graph_module, "b_up")  # the bias is in the kernel
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(32, 64), nn.Linear(64, 8)
        self.w_up, self.w_down = nn.Parameter(torch.randn(128, 64) / 8), nn.Parameter(torch.randn(64, 128) / 8)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x) @ self.w_up.T) @ self.w_down.t())


def test_shrink_removes_zero_units_between_transposed_weight_layers():
    torch.manual_seed(0)
    model, x = NoBias().eval(), torch.randn(4, 32)
    with torch.no_grad():
        model.w_up[:10] = 0             # hidden units 0-9 are relu(0) = 0
        model.w_down[:, 100:] = 0       # nobody reads hidden units 100-127
    small = shrunk_and_unchanged(model, x)
    assert small.shrink_report["w_up"].removed == list(range(10)) + list(range(100, 128))
    assert small.graph_module.get_parameter("w_up").shape == (90, 64)
    assert small.graph_module.get_parameter("w_down").shape == (64, 90)


def test_save_and_load_a_model_with_transposed_weight_layers(tmp_path):
    torch.manual_seed(0)
    model, x = HandWritten(TRANSPOSES[".t()"]).eval(), torch.randn(3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), quantize="int8")
    sparsec.save(cm, tmp_path / "m.sparsec")
    loaded = sparsec.load(tmp_path / "m.sparsec")
    assert loaded.plan["w_down"].quant == "int8"
    assert torch.equal(loaded(x), cm(x))
    assert output_error(loaded(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class UnprunedTypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.conv = nn.ConvTranspose1d(64, 64, 3, padding=1)
        self.rnn = nn.GRU(64, 64, batch_first=True)

    def forward(self, x):
        h = self.a(x)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h, _ = self.rnn(self.b(h))
        return self.out(h)


def test_layer_types_sparsec_does_not_prune_are_listed_dense():
    torch.manual_seed(0)
    model, x = UnprunedTypes().eval(), torch.randn(2, 5, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.plan.names == ["a", "conv", "b", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "out"]
    assert cm.plan["conv"].op == "convtranspose1d"
    assert "ConvTranspose1d layers are not pruned by sparsec" in cm.plan["conv"].reason
    assert cm.plan["rnn.weight_hh_l0"].weight_shape == (192, 64) and "GRU layers" in cm.plan["rnn.weight_hh_l0"].reason
    assert cm.plan["b"].sparsity == "2:4"
    assert torch.equal(cm.effective_weight("rnn.weight_ih_l0"), model.rnn.weight_ih_l0)
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    # the plan round-trips and applies as it is; asking to prune such a weight names why it cannot be
    plan = sparsec.Plan.from_json(cm.plan.to_json())
    assert torch.equal(sparsec.compile(model, example_inputs=(x,), plan=plan)(x), cm(x))
    plan["rnn.weight_hh_l0"].sparsity = "2:4"
    with pytest.raises(InvalidInputError, match="rnn.weight_hh_l0.*GRU layers are not pruned"):
        sparsec.compile(model, example_inputs=(x,), plan=plan)


class TiedHead(nn.Module):
    """A language-model head tied to the embedding: logits = h @ emb.weight.T."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(96, 64)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, tokens):
        h = self.b(torch.relu(self.a(self.emb(tokens))))
        return h @ self.emb.weight.T


def test_a_head_tied_to_the_embedding_stays_dense():
    torch.manual_seed(0)
    model, tokens = TiedHead().eval(), torch.randint(0, 96, (2, 7))
    cm = sparsec.compile(model, example_inputs=(tokens,), min_weights=0, include=["emb"])
    lp = cm.plan["emb"]
    assert (lp.op, lp.weight_shape, lp.sparsity) == ("linear", (96, 64), None)
    assert "also read by module 'emb' (Embedding)" in lp.reason  # pruning the head would change the embedding lookup too
    assert lp.reason.endswith("; include='emb' cannot override this")  # (include= named it: it said nothing of it)
    assert "include" not in sparsec.explain(model, example_inputs=(tokens,), min_weights=0)["emb"].reason
    assert torch.equal(cm.effective_weight("emb"), model.emb.weight)
    assert output_error(cm(tokens), pruned_model(model, cm.plan)(tokens)) <= 1e-5


# ---------------------------------------------------------------------------- addmm (GPT-2's Conv1D)


class Conv1D(nn.Module):
    """A linear layer as HF GPT-2 writes it: weight stored [in, out], y = addmm(b, x, W) on the flattened rows."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.n_out = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 8)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.n_out,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = Conv1D(d, 3 * d), Conv1D(d, d)
        self.c_fc, self.mlp_proj = Conv1D(d, 4 * d), Conv1D(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab=96, d=64, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(GPT2Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens):
        x = self.wte(tokens)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head: stays dense, with the reason


CONV1D_LAYERS = [f"h.{i}.{name}" for i in range(2) for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj")]


def test_gpt2_conv1d_layers_are_pruned():
    torch.manual_seed(0)
    model, tokens = GPT2().eval(), torch.randint(0, 96, (2, 9))
    cm = sparsec.compile(model, example_inputs=(tokens,), include=CONV1D_LAYERS)
    assert cm.trace_method == "symbolic_trace"
    for name in CONV1D_LAYERS:
        lp = cm.plan[name]
        assert lp.op == "matmul" and lp.sparsity == "2:4", (name, lp.reason)
    assert cm.plan["h.0.c_fc"].weight_shape == (64, 256) and cm.plan["h.0.c_fc"].flops == 2 * 18 * 64 * 256
    # groups of 4 run down W's rows: K = in features
    assert (cm.mask("h.1.mlp_proj").t().reshape(64, -1, 4).sum(-1) == 2).all()
    assert "also read by module 'wte' (Embedding)" in cm.plan["wte"].reason
    assert output_error(cm(tokens), pruned_model(model, cm.plan)(tokens)) <= 1e-5
    assert "addmm" not in cm.graph_module.code


def test_gpt2_conv1d_layers_train_with_pruned_data_gradients():
    torch.manual_seed(0)
    model, tokens = GPT2().train(), torch.randint(0, 96, (2, 9))
    cm = sparsec.compile(model, example_inputs=(tokens,), include=CONV1D_LAYERS, train=True, grad_pattern="2:4")
    assert all(cm.plan[name].grad_sparsity == "2:4" for name in CONV1D_LAYERS)
    ref = pruned_model(model, cm.plan)
    assert output_error(cm(tokens), ref(tokens)) <= 1e-5
    cm(tokens).square().mean().backward()
    grads = [p.grad for p in cm.parameters() if p.grad is not None]
    assert len(grads) == len(list(cm.parameters())) and all(torch.isfinite(g).all() for g in grads)


def test_gpt2_conv1d_through_torch_export():
    class Untraceable(GPT2):
        def forward(self, tokens):
            if tokens.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
                tokens = tokens.clone()
            return super().forward(tokens)

    torch.manual_seed(0)
    model, tokens = Untraceable().eval(), torch.randint(0, 96, (2, 9))
    cm = sparsec.compile(model, example_inputs=(tokens,), include=CONV1D_LAYERS)
    assert cm.trace_method == "torch.export"
    assert all(cm.plan[name].sparsity == "2:4" for name in CONV1D_LAYERS)
    assert output_error(cm(tokens), pruned_model(model, cm.plan)(tokens)) <= 1e-5


class AddmmMLP(nn.Module):
    def __init__(self, transposed):
        super().__init__()
        self.transposed = transposed
        self.inp, self.head = nn.Linear(16, 32), nn.Linear(32, 4)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.b = nn.Parameter(torch.randn(32) / 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.addmm(self.b, h, self.w.t() if self.transposed else self.w)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("transposed", [False, True])
def test_shrink_reads_the_data_operand_of_addmm(transposed):
    """addmm's data operand is its second argument: shrink must slice w along the channels it reads."""
    torch.manual_seed(0)
    model, x = AddmmMLP(transposed).eval(), torch.randn(8, 16)
    with torch.no_grad():
        model.inp.weight[:5] = 0
        model.inp.bias[:5] = -1.0  # inp's units 0-4 are relu(-1) = 0: w's inputs 0-4 can go
    small = shrunk_and_unchanged(model, x)
    assert small.shrink_report["inp"].removed == [0, 1, 2, 3, 4]
    assert small.graph_module.get_parameter("w").shape == ((32, 27) if transposed else (27, 32))


def test_addmm_forms_that_are_not_layers():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(16, 32), nn.Linear(32, 4)
            self.w1, self.w2 = nn.Parameter(torch.randn(32, 32)), nn.Parameter(torch.randn(32, 32))
            self.b2d = nn.Parameter(torch.randn(8, 32))

        def forward(self, x):
            h = torch.addmm(self.a.bias, x, self.a.weight.t(), beta=0.5)  # scaled bias: not a plain layer
            h = torch.addmm(self.b2d, h, self.w2)                         # bias per row, not per feature
            return self.out(h)

    model, x = Forms().eval(), torch.randn(8, 16)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert "read directly (by addmm)" in cm.plan["a"].reason and "read by addmm" in cm.plan["w2"].reason
    assert torch.equal(cm(x), model(x))


def test_gpt2_conv1d_kernels_fuse_the_bias_and_the_gelu_after_the_view():
    from sparsec.runtime.triton_linear import TritonSparseLinear

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
    model, tokens = GPT2().eval().to(device), torch.randint(0, 96, (2, 9), device=device)
    cm = sparsec.compile(model, example_inputs=(tokens,), include=CONV1D_LAYERS, backend="triton")
    modules = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}
    assert set(modules) == set(CONV1D_LAYERS) and all(m.bias is not None for m in modules.values())
    assert [name for name, m in modules.items() if m.activation] == ["h.0.c_fc", "h.1.c_fc"]
    assert modules["h.0.c_fc"].activation == "gelu_tanh"
    assert output_error(cm(tokens), pruned_model(model, cm.plan)(tokens)) <= 1e-5


# ---------------------------------------------------------------------------- F.linear with a bias computed at run time


class BeitAttentionQKV(nn.Module):
    """BEiT / EVA-style qkv: F.linear(x, qkv.weight, cat(q_bias, zeros, v_bias)), the bias built every call."""

    def __init__(self, d=64):
        super().__init__()
        self.inp, self.out = nn.Linear(32, d), nn.Linear(3 * d, 8)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d) / 8), nn.Parameter(torch.randn(d) / 8)

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return self.out(torch.relu(F.linear(self.inp(x), self.qkv.weight, bias)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_with_a_bias_computed_at_run_time(backend):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: triton runs in the interpreter (conftest)
    model, x = BeitAttentionQKV().eval().to(device), torch.randn(5, 32, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend=backend)
    assert cm.plan["qkv"].sparsity == "2:4" and cm.plan["qkv"].op == "linear"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    targets = [n.target for n in cm.graph_module.graph.nodes]
    assert torch.cat in targets and F.linear not in targets and torch._C._nn.linear not in targets


def test_training_a_linear_with_a_bias_computed_at_run_time():
    torch.manual_seed(0)
    model, x = BeitAttentionQKV().train(), torch.randn(6, 32)
    cm = sparsec.compile(model, example_inputs=(x,), train=True)  # no SDGP: gradients equal plain torch's
    assert cm.plan["qkv"].sparsity == "2:4"
    ref = pruned_model(model, cm.plan)
    cm(x).square().sum().backward()
    ref(x).square().sum().backward()
    trained = dict(cm.graph_module.named_parameters())
    for name in ("q_bias", "v_bias"):  # the bias parameters still learn through the add
        assert output_error(trained[name].grad, getattr(ref, name).grad) <= 1e-5


def test_shrink_keeps_the_width_of_a_layer_whose_bias_is_computed_at_run_time():
    torch.manual_seed(0)
    model, x = BeitAttentionQKV().eval(), torch.randn(4, 32)
    with torch.no_grad():
        model.qkv.weight[:4] = 0
        model.q_bias[:4] = -1.0  # qkv outputs 0-3 are relu(-1) = 0: removable, but the built bias has 192 entries
    small = shrunk_and_unchanged(model, x)
    assert small.shrink_report["qkv"].removed == []
    assert "bias is computed at run time" in str(small.shrink_report)


class ShapeReads(nn.Module):
    """Model code that reads its weights' shapes (`W.size(-1)` as HF's Conv1D once did, `W.T.shape[1]`,
    `fc.weight.shape[0]`, `W.dim()`): pruning keeps shapes, so these layers are pruned."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.w_up = nn.Parameter(torch.randn(128, 64) / 8)      # y = x @ W.T
        self.w_proj = nn.Parameter(torch.randn(128, 64) / 8)    # y = addmm(b, x, W), W stored [in, out]
        self.b_proj = nn.Parameter(torch.randn(64) / 8)

    def forward(self, x):
        h = torch.relu(self.inp(x) @ self.w_up.T).reshape(-1, self.w_up.T.shape[1])
        h = torch.addmm(self.b_proj, h, self.w_proj).view(x.size()[:-1] + (self.w_proj.size(-1),))
        h = torch.relu(self.mid(h)) * (self.mid.weight.dim() - 1)
        return self.head(h.reshape(-1, self.mid.weight.shape[0]))


SHAPE_READ_LAYERS = ["w_up", "w_proj", "mid"]


def test_reads_of_a_weights_shape_do_not_keep_its_layer_dense(tmp_path):
    torch.manual_seed(0)
    model, x = ShapeReads().eval(), torch.randn(2, 3, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "symbolic_trace"
    for name in SHAPE_READ_LAYERS:
        assert cm.plan[name].sparsity == "2:4", (name, cm.plan[name].reason)
    ref = pruned_model(model, cm.plan)
    assert output_error(cm(x), ref(x)) <= 1e-5
    other = torch.randn(5, 7, 32)  # only the weights' shapes were folded: the data's stay dynamic
    assert output_error(cm(other), ref(other)) <= 1e-5
    # the packed layers hold the weights: no dense copy stays behind to be read for its shape
    assert not hasattr(cm.graph_module, "w_up") and not hasattr(cm.graph_module, "w_proj")
    assert "weight" not in cm.graph_module.mid._parameters
    assert not any(word in cm.graph_module.code for word in ["self.w_up", "self.w_proj", "mid.weight", "getattr"])
    sparsec.save(cm, tmp_path / "m.sparsec")
    assert output_error(sparsec.load(tmp_path / "m.sparsec")(other), ref(other)) <= 1e-5


def test_shape_reads_with_keyword_arguments_do_not_keep_a_layer_dense():
    # W.size(dim=1) was counted as a read of the values: "pruning it would change that use too"
    class KeywordSize(ShapeReads):
        def forward(self, x):
            return super().forward(x) / self.mid.weight.size(dim=1) + self.w_up.t().size(dim=0)

    torch.manual_seed(0)
    model, x = KeywordSize().eval(), torch.randn(2, 3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    for name in SHAPE_READ_LAYERS:
        assert cm.plan[name].sparsity == "2:4", (name, cm.plan[name].reason)
    assert "size(dim" not in cm.graph_module.code  # folded to the numbers (x.size() stays: it is the data's)
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_a_read_of_a_weights_values_still_keeps_it_dense():
    class ValueRead(ShapeReads):
        def forward(self, x):
            return super().forward(x) + self.w_proj.sum()

    torch.manual_seed(0)
    model, x = ValueRead().eval(), torch.randn(2, 3, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["w_proj"].sparsity is None and "also read by sum" in cm.plan["w_proj"].reason
    assert cm.plan["w_up"].sparsity == "2:4"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_training_reads_the_shape_of_the_trained_weight():
    torch.manual_seed(0)
    model, x = ShapeReads().train(), torch.randn(2, 3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), train=True)
    assert all(cm.plan[name].sparsity == "2:4" for name in SHAPE_READ_LAYERS)
    ref = pruned_model(model, cm.plan)
    out, expected = cm(x), ref(x)
    assert output_error(out, expected) <= 1e-5
    out.square().sum().backward()
    expected.square().sum().backward()
    trained = {m.layer_name: m for m in cm.modules() if hasattr(m, "weight_mask")}
    mask = cm.mask("w_proj")
    assert output_error(trained["w_proj"].weight.grad * mask, ref.w_proj.grad * mask) <= 1e-5
    assert not hasattr(cm.graph_module, "w_proj")


class ScaledByWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(32, 64), nn.Linear(128, 8)
        self.w_up = nn.Parameter(torch.randn(128, 64) / 8)

    def forward(self, x):  # scaled by the layer's width, as attention code scales by the head size
        return self.head(torch.relu(self.inp(x) @ self.w_up.T) * self.w_up.shape[0] ** -0.5)


@pytest.mark.parametrize("pattern", ["dense", "2:4"])
def test_shrink_keeps_the_width_the_model_read_before_it_shrank(pattern):
    from sparsec.shrink import shrink

    torch.manual_seed(0)
    model, x = ScaledByWidth().eval(), torch.randn(4, 32)
    with torch.no_grad():
        model.w_up[:16] = 0  # hidden units 0-15 are relu(0) = 0
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), train=True)
    small = shrink(cm)
    assert small.shrink_report["w_up"].removed == list(range(16))
    path = "w_up" if pattern == "dense" else "sparse_w_up.weight"
    assert small.graph_module.get_parameter(path).shape == (112, 64)
    with torch.no_grad():  # still scaled by 128 ** -0.5: shrinking does not change what the model computes
        assert output_error(small(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class ReadsWeightDtype(nn.Module):
    """Casts its input to the weight's dtype and makes tensors on the weight's device, as mixed-precision
    code does: reads of what the weight is, not of its values."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        h = self.a(x.to(self.a.weight.dtype))
        offset = torch.ones(64, dtype=self.w.T.dtype, device=self.w.device)
        h = F.linear(h.to(self.w.dtype), self.w) + offset * self.w.is_floating_point()
        return self.b(h)


@pytest.mark.parametrize("train", [False, True])
def test_dtype_and_device_reads_of_a_weight_do_not_keep_it_dense(train, tmp_path):
    """The layers are pruned, no dense copy of the weight stays behind to answer the reads, and they
    follow a cast of the compiled model (they read the replacement layer's dtype, not a fixed one)."""
    torch.manual_seed(0)
    model, x = ReadsWeightDtype().train(train), torch.randn(3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0, include=["a", "w", "b"], train=train)
    assert all(lp.sparsity == "2:4" for lp in cm.plan.layers), cm.plan
    gm = cm.graph_module
    probes = {f"{path}.{m.weight_probe}" for path, m in gm.named_modules() if isinstance(m, RuntimeLayer)}
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} <= probes and not hasattr(gm, "w")
    sparsec.save(cm, tmp_path / "m")
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
        assert torch.equal(sparsec.load(tmp_path / "m")(x), cm(x))
        half = cm.to(torch.bfloat16)
        assert half(x).dtype == torch.bfloat16
        assert output_error(half(x).float(), pruned_model(model, cm.plan).to(torch.bfloat16)(x).float()) <= 2e-2


class _Holder(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.randn(32, 32) / 6))


class CollidingNames(nn.Module):
    """Functional layers whose sparse module names collide: "a.b_c" and "a_b.c" both map to sparse_a_b_c,
    and "w" maps to sparse_w, a layer of the model's own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = nn.Linear(16, 32), nn.Linear(32, 8)
        self.a, self.a_b = _Holder("b_c"), _Holder("c")
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.sparse_w = nn.Linear(32, 32)

    def forward(self, x):
        h = self.inp(x)
        h = F.linear(h, self.a.b_c) + 2 * F.linear(h, self.a_b.c)
        return self.head(torch.relu(F.linear(h, self.w) - self.sparse_w(h)))


def test_functional_layers_whose_module_names_collide():
    # the second layer's module overwrote the first's (both call sites ran a_b.c's weight: 70% off), and
    # a module named sparse_w was overwritten by layer w's (sparse_w's own rewrite then failed)
    model, x = CollidingNames(), torch.randn(4, 16)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, backend="torch")
    assert {lp.name for lp in cm.plan.sparse_layers} == {"a.b_c", "a_b.c", "w", "sparse_w"}
    modules = [m for m in cm.graph_module.modules() if isinstance(m, RuntimeLayer)]
    assert sorted(m.layer_name for m in modules) == ["a.b_c", "a_b.c", "sparse_w", "w"]
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class _FunctionalCall(nn.Module):
    """A functional call on a parameter weight between two plain layers; `call(self, h)` is the form under test."""

    def __init__(self, call, conv=False):
        super().__init__()
        torch.manual_seed(0)
        self.call = call
        self.inp = nn.Conv2d(3, 8, 1) if conv else nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(16, 8, 3, 3) / 8 if conv else torch.randn(32, 32) / 6)
        self.bias = nn.Parameter(torch.randn(16 if conv else 32))
        self.conv = nn.Conv2d(8, 16, 3)
        self.out = nn.Conv2d(16, 4, 1) if conv else nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.call(self, self.inp(x))))


CALLS_KEPT_DENSE = {  # form -> (is a conv, layer name, what the reason must say)
    "F.conv2d(x, W, padding=x.shape[-1] // 4)": (lambda s, h: F.conv2d(h, s.w, None, 1, h.shape[-1] // 4), True, "w",
                                                 "F.conv2d's padding is computed at run time"),
    "F.conv2d(x, W, stride=(1, x.shape[0]))": (lambda s, h: F.conv2d(h, s.w, None, (1, h.shape[0] - 1)), True, "w",
                                               "F.conv2d's stride is computed at run time"),
    "F.conv2d(x, W, b * 2)": (lambda s, h: F.conv2d(h, s.w, s.bias * 2, padding=1), True, "w",
                              "F.conv2d's bias is computed at run time"),
    "F.conv2d(x, conv.weight, conv.bias * 2)": (lambda s, h: F.conv2d(h, s.conv.weight, s.conv.bias * 2), True,
                                                "conv", "F.conv2d's bias is computed at run time"),
    "torch.matmul(input=x, other=W)": (lambda s, h: torch.matmul(input=h, other=s.w), False, "w",
                                       "matmul's operands are passed by keyword"),
    "torch.matmul(x, other=W)": (lambda s, h: torch.matmul(h, other=s.w), False, "w",
                                 "matmul's operands are passed by keyword"),
}


@pytest.mark.parametrize("form", sorted(CALLS_KEPT_DENSE))
def test_functional_calls_the_rewrite_cannot_take_stay_dense_with_the_reason(form):
    # F.linear(weight=W, input=x) was rewritten into a layer run on W (on the run-time bias with bias= first):
    # wrong values or a shape error; run-time conv settings crashed the compile (int(node)); a run-time conv
    # bias and matmul by keyword were said to be forms sparsec does not rewrite, at all
    call, conv, name, why = CALLS_KEPT_DENSE[form]
    model = _FunctionalCall(call, conv).eval()
    x = torch.randn(2, 3, 8, 8) if conv else torch.randn(3, 16)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, backend="torch")
    lp = cm.plan[name]
    assert lp.sparsity is None and why in lp.reason, lp.reason
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))  # every layer stays dense: first, last and the refused one


CALLS_BY_KEYWORD = {  # form -> is a conv
    "F.linear(input=x, weight=W, bias=b * 2)": (lambda s, h: F.linear(input=h, weight=s.w, bias=s.bias * 2), False),
    "F.linear(weight=W, input=x)": (lambda s, h: F.linear(weight=s.w, input=h), False),
    "F.linear(bias=b * 2, weight=W, input=x)": (lambda s, h: F.linear(bias=s.bias * 2, weight=s.w, input=h), False),
    "F.conv2d(weight=W, input=x)": (lambda s, h: F.conv2d(weight=s.w, input=h, padding=1), True),
}


@pytest.mark.parametrize("form", sorted(CALLS_BY_KEYWORD))
def test_a_layer_whose_input_is_passed_by_keyword_is_pruned(form):
    # the rewrite took a keyword call's first argument as its input: F.linear(weight=W, input=x) ran the layer
    # on W (a shape error), with bias= first on the run-time bias (276% off)
    call, conv = CALLS_BY_KEYWORD[form]
    model = _FunctionalCall(call, conv).eval()
    x = torch.randn(2, 3, 8, 8) if conv else torch.randn(3, 16)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, backend="torch")
    assert cm.plan["w"].sparsity == "2:4", cm.plan["w"].reason
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


class _TiedLayers(nn.Module):
    def __init__(self, untraceable):
        super().__init__()
        torch.manual_seed(0)
        self.untraceable = untraceable
        self.inp, self.fc, self.fc2, self.out = (nn.Linear(32, 32) for _ in range(4))
        self.fc2.weight = self.fc.weight

    def forward(self, x):
        if self.untraceable:
            int(x.shape[0])  # symbolic_trace cannot: torch.export traces it
        return self.out(torch.relu(self.fc2(torch.relu(self.fc(self.inp(x))))))


@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_linear_layers_sharing_one_weight_stay_dense_with_the_reason(untraceable):
    # torch.export reads a tied Parameter under one name (fc2.weight) for both layers: fc was said to be
    # "not called by the model's forward"
    model, x = _TiedLayers(untraceable).eval(), torch.randn(3, 32)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, backend="torch")
    assert cm.trace_method == ("torch.export" if untraceable else "symbolic_trace")
    assert "tied to fc2.weight" in cm.plan["fc"].reason and "tied to fc.weight" in cm.plan["fc2"].reason
    assert cm.plan["fc"].sparsity is None and cm.plan["fc2"].sparsity is None
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.lin = nn.Linear(32, 32)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _Inner()

    def forward(self, x):
        return F.linear(x, self.sub.w) + self.sub.lin(x)


class _ReadsInsideALeaf(nn.Module):
    """Parameters of a submodule of a module called as a whole (a leaf), read by the traced graph as well."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blk, self.out = nn.Linear(16, 32), _Block(), nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.relu(self.blk(h) + F.linear(h, self.blk.sub.w) + F.linear(h, self.blk.sub.lin.weight)))


def test_a_weight_a_leaf_module_also_reads_stays_dense():
    # only the leaf's own parameters counted as its reads: blk.sub.w was pruned where the graph reads it while
    # blk's forward went on with the dense values (26% off the model with that weight pruned)
    model, x = _ReadsInsideALeaf().eval(), torch.randn(3, 16)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), min_weights=0, leaf_modules=[_Block],
                         backend="torch")
    for name in ("blk.sub.w", "blk.sub.lin"):
        lp = cm.plan[name]
        assert lp.sparsity is None and "also read by module 'blk' (_Block)" in lp.reason, lp.reason
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))
