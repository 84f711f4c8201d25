"""More ways model code writes a linear layer on a parameter, each pruned like nn.Linear:
einsum equations that are a layer, `W @ x` (weight on the left, features along x's dim -2), and
`F.linear(x, W.t())` (weight stored [in, out]). Checked against the independent pruned-model oracle."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import output_error, pruned_model, shrunk_and_unchanged
from sparsec.passes.einsum_forms import linear_operands

LAYER_EQUATIONS = {  # equation -> (weight operand index, weight written [out, in], weight on the left)
    "bsd,hd->bsh": (1, True, False),
    "bd,hd": (1, True, False),          # implicit output: b, h in alphabetical order
    "...d,dh->...h": (1, False, False),
    "hd,bsd->bsh": (0, True, False),    # weight first
    "b...k,kn->b...n": (1, False, False),
    " b s d , h d -> b s h ": (1, True, False),
    "BSD,HD->BSH": (1, True, False),
    "hk,bkl->bhl": (0, True, True),     # W @ x
    "...kl,kh->...hl": (1, False, True),  # W.T @ x
}
NOT_LAYERS = ["bsd,hd->bhs", "bsd,sd->bs", "bsd,hd->hsb", "ii,ij->ij", "bdd,hd->bh", "bd,dd->bd", "bsd,hd->bsh,x",
              "bsd,hd,he->bse", "bd->db", "b1,hd->bh", "bhd,hd->bh", "bd,h...d->bh", "bd,bd->bd", "hk,bkl->blh",
              "hk,k...->h...", "hk,bkl->bh", 7, None]


@pytest.mark.parametrize("equation", sorted(LAYER_EQUATIONS))
def test_einsum_equations_that_are_layers(equation):
    assert linear_operands(equation) == [LAYER_EQUATIONS[equation]]


@pytest.mark.parametrize("equation", NOT_LAYERS, ids=str)
def test_einsum_equations_that_are_not_layers(equation):
    assert linear_operands(equation) == []


@st.composite
def _equations(draw):
    """Layer equations (x @ W.T, x @ W, W @ x with any batch dims) and near misses: the data's,
    the weight's or the output's subscripts shuffled, or the weight sharing a batch index."""
    letters = draw(st.permutations("abcdefg"))
    prefix, (k, n, tail) = list(letters[:draw(st.integers(0, 2))]), letters[4:7]
    data = prefix + [k] + ([tail] if draw(st.booleans()) else [])
    weight = draw(st.permutations([n, k]))
    out = prefix + [n] + data[len(prefix) + 1:]
    if draw(st.booleans()):
        data, weight, out = (draw(st.permutations(t)) if draw(st.booleans()) else t for t in (data, weight, out))
    if prefix and draw(st.integers(0, 4)) == 0:
        weight = [prefix[0], k]
    terms = [weight, data] if draw(st.booleans()) else [data, weight]
    return f"{''.join(terms[0])},{''.join(terms[1])}->{''.join(out)}"


@settings(max_examples=300, deadline=None)
@given(_equations())
def test_every_equation_taken_as_a_layer_computes_that_layer(equation):
    """Soundness: for any equation the parser accepts, einsum equals F.linear on the data operand
    (on its transpose when the weight is on the left)."""
    sizes = dict(zip("abcdefg", (2, 3, 5, 7, 4, 6, 8)))
    terms = equation.split("->")[0].split(",")
    for w, out_by_in, left in linear_operands(equation):
        operands = [torch.randn([sizes[c] for c in term], dtype=torch.float64) for term in terms]
        weight, data = operands[w] if out_by_in else operands[w].t(), operands[1 - w]
        expected = F.linear(data.mT, weight).mT if left else F.linear(data, weight)
        assert torch.allclose(torch.einsum(equation, *operands), expected)


class Einsums(nn.Module):
    """Projections written with einsum, as in Flax ports and hand-written attention."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.inp, self.head = nn.Linear(32, 64), nn.Linear(64, 8)
        self.wq = nn.Parameter(torch.randn(128, 64) / 8)      # "bsd,hd->bsh": W [out, in]
        self.wk = nn.Parameter(torch.randn(64, 128) / 8)      # "...d,dh->...h" on wk.T: a linear layer
        self.wv = nn.Parameter(torch.randn(128, 64) / 8)      # weight first
        self.wo = nn.Parameter(torch.randn(128, 64) / 8)      # "bsk,kn->bsn": W [in, out], a matmul layer

    def forward(self, x):
        h = self.inp(x)
        h = torch.relu(torch.einsum("bsd,hd->bsh", h, self.wq))
        h = torch.einsum("...d,dh->...h", h, self.wk.T)
        h = torch.einsum("vd,bsd->bsv", self.wv, h)
        h = torch.einsum("bsk,kn->bsn", [h, self.wo])
        if self.untraceable and h.shape[0] > 1:  # a branch on a shape: symbolic_trace fails, torch.export runs it
            h = h * 1.0
        return self.head(h)


EINSUM_OPS = {"wq": "linear", "wk": "linear", "wv": "linear", "wo": "matmul"}


@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_einsum_layers_are_pruned(untraceable):
    torch.manual_seed(0)
    model, x = Einsums(untraceable).eval(), torch.randn(2, 5, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == ("torch.export" if untraceable else "symbolic_trace")
    assert cm.plan.names == ["inp", "wq", "wk", "wv", "wo", "head"]  # in the order they run, on both tracers
    for name, op in EINSUM_OPS.items():
        assert (cm.plan[name].op, cm.plan[name].sparsity) == (op, "2:4"), cm.plan[name].reason
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert "einsum" not in cm.graph_module.code and not any(hasattr(cm.graph_module, n) for n in EINSUM_OPS)


def test_einsum_layers_on_the_triton_backend_fuse_their_activation():
    from sparsec.runtime.triton_linear import TritonSparseLinear

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
    model, x = Einsums().eval().to(device), torch.randn(2, 3, 32, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton")
    modules = {m.layer_name: m for m in cm.graph_module.modules() if isinstance(m, TritonSparseLinear)}
    assert set(modules) == set(EINSUM_OPS) and modules["wq"].activation == "relu"
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_training_einsum_layers_with_pruned_data_gradients():
    torch.manual_seed(0)
    model, x = Einsums().train(), torch.randn(4, 3, 32)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, grad_pattern="2:4")
    assert all(cm.plan[n].grad_sparsity == "2:4" for n in ("wk", "wv", "wo"))
    optimizer = torch.optim.SGD(cm.parameters(), lr=0.1)
    before = {n: cm.effective_weight(n).clone() for n in EINSUM_OPS}
    cm(x).square().mean().backward()
    optimizer.step()
    for name in EINSUM_OPS:
        mask, after = cm.mask(name), cm.effective_weight(name)
        assert not torch.equal(after, before[name]) and torch.equal(after[~mask], torch.zeros_like(after[~mask]))


class ChannelsFirst(nn.Module):
    """Channel mixing on [B, C, L] sequences written as W @ x (a 1x1 Conv1d in matmul form)."""

    def __init__(self, untraceable=False, einsum=False):
        super().__init__()
        self.untraceable, self.einsum = untraceable, einsum
        self.inp, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        self.w1 = nn.Parameter(torch.randn(128, 64) / 8)      # W @ x: [out, in], a linear layer on x.mT
        self.w2 = nn.Parameter(torch.randn(128, 64) / 8)      # W.T @ x: [in, out], a matmul layer on x.mT

    def forward(self, x):
        h = torch.relu(self.w1 @ self.inp(x))
        h = torch.matmul(self.w2.T, h) if not self.einsum else torch.einsum("kh,bkl->bhl", self.w2, h)
        if self.untraceable and h.shape[0] > 1:
            h = h * 1.0
        return self.head(h)


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_weight_on_the_left_is_a_layer_on_the_transposed_data(untraceable, einsum):
    torch.manual_seed(0)
    model, x = ChannelsFirst(untraceable, einsum).eval(), torch.randn(2, 64, 16)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert [(cm.plan[n].op, cm.plan[n].sparsity) for n in ("w1", "w2")] == [("linear", "2:4"), ("matmul", "2:4")]
    # groups of 4 run along the contracted dim: W's rows for W @ x, its columns for W.T @ x
    assert (cm.mask("w1").reshape(128, -1, 4).sum(-1) == 2).all()
    assert (cm.mask("w2").t().reshape(64, -1, 4).sum(-1) == 2).all()
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert not hasattr(cm.graph_module, "w1") and not hasattr(cm.graph_module, "w2")


class MatrixVector(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(32, 64), nn.Linear(64, 8)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, v):
        return self.head(torch.relu(self.w @ self.inp(v)))  # a 1-D input: W @ v = F.linear(v, W), no transposes


def test_weight_on_the_left_of_a_vector():
    torch.manual_seed(0)
    model, v = MatrixVector().eval(), torch.randn(32)
    cm = sparsec.compile(model, example_inputs=(v,))
    assert cm.plan["w"].sparsity == "2:4" and "transpose" not in cm.graph_module.code
    assert output_error(cm(v), pruned_model(model, cm.plan)(v)) <= 1e-5


def test_weight_on_the_left_needs_example_inputs():
    model = ChannelsFirst().eval()
    cm = sparsec.compile(model, include=["w1", "w2"])
    assert cm.plan["w1"].sparsity is None and "pass example_inputs" in cm.plan["w1"].reason
    x = torch.randn(2, 64, 16)
    assert torch.equal(cm(x), model(x))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_on_the_left_on_both_backends(backend):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = ChannelsFirst().eval().to(device), torch.randn(3, 64, 16, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend=backend)
    assert {cm.plan[n].backend for n in ("w1", "w2")} == {backend}
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_training_a_weight_on_the_left_layer():
    torch.manual_seed(0)
    model, x = ChannelsFirst().train(), torch.randn(4, 64, 16)
    cm = sparsec.compile(model, example_inputs=(x,), train=True)  # no SDGP: gradients equal plain torch's
    ref = pruned_model(model, cm.plan)
    cm(x).square().sum().backward()
    ref(x).square().sum().backward()
    for name in ("w1", "w2"):
        mask = cm.mask(name)
        trained = [m for m in cm.modules() if getattr(m, "layer_name", None) == name][0]
        assert output_error(trained.weight.grad * mask, getattr(ref, name).grad * mask) <= 1e-5


def test_shrink_leaves_a_weight_on_the_left_layer_as_it_is():
    torch.manual_seed(0)
    model, x = ChannelsFirst().eval(), torch.randn(2, 64, 16)
    with torch.no_grad():
        model.w1[:8] = 0  # channels 0-7 of relu(w1 @ x) are 0, but they run along x's dim -2
    small = shrunk_and_unchanged(model, x)
    assert small.shrink_report["w1"].removed == []
    assert "it is W @ x (its features run along x's second-to-last dim)" in str(small.shrink_report)


class StoredInByOut(nn.Module):
    """F.linear(x, W.t(), b) with W stored [in, out] (as Keras / JAX ports do): x @ W + b."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.inp, self.head = nn.Linear(32, 64), nn.Linear(128, 8)
        self.kernel = nn.Parameter(torch.randn(64, 128) / 8)
        self.bias = nn.Parameter(torch.randn(128) / 8)

    def forward(self, x):
        h = F.linear(self.inp(x), self.kernel.t(), self.bias)
        if self.untraceable and h.shape[0] > 1:
            h = h * 1.0
        return self.head(torch.relu(h))


@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_linear_on_a_transposed_weight_is_a_matmul_layer(untraceable):
    torch.manual_seed(0)
    model, x = StoredInByOut(untraceable).eval(), torch.randn(3, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    lp = cm.plan["kernel"]
    assert (lp.op, lp.weight_shape, lp.sparsity) == ("matmul", (64, 128), "2:4"), lp.reason
    assert (cm.mask("kernel").t().reshape(128, -1, 4).sum(-1) == 2).all()  # groups run along K = W's rows
    assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
    assert not hasattr(cm.graph_module, "kernel") and not hasattr(cm.graph_module, "bias")


class _KeywordCalls(nn.Module):
    """Layer modules called with their input by keyword, as nn.Linear / nn.Conv1d name it: self.fc(input=x)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        self.conv = nn.Conv1d(1, 4, 4)

    def forward(self, x):
        h = self.c(input=torch.relu(self.b(input=self.a(input=x))))
        return self.conv(input=h.unsqueeze(1))


@pytest.mark.parametrize("options", [dict(backend="torch"), dict(backend="auto"), dict(train=True, grad_pattern="2:4")],
                         ids=["torch", "auto", "train"])
def test_layer_modules_called_with_the_input_by_keyword(options):
    # the runtime layers take the input as `x`: a graph calling self.b(input=a) compiled, then failed on
    # its first call (TypeError: unexpected keyword argument 'input')
    model, x = _KeywordCalls(), torch.randn(5, 32)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), include=[".*"], min_weights=0, **options)
    assert [lp.sparsity for lp in cm.plan] == ["2:4"] * 4
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5
