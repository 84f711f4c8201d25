"""GroupLasso (FSSL / SSL group lasso, methods.md (c)): value and gradient against plain torch norms,
zero-norm groups, masks, SSL's sparsity metrics, thresholding, freezing, and sparsity monotone in lambda."""
import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import load_example
from sparsec.group_lasso import GroupLasso, col_norms, row_norms
from sparsec.shrink import shrink

# ---------------------------------------------------------------------------- oracle (plain torch)


def oracle_rows(w: torch.Tensor, op: str) -> torch.Tensor:
    """One norm per output feature: W[o] (linear / conv), W[:, n] for y = x @ W."""
    return w.norm(dim=0) if op == "matmul" else w.flatten(1).norm(dim=1)


def oracle_cols(w: torch.Tensor, op: str, groups: int = 1) -> torch.Tensor:
    """One norm per input feature: W[:, i] (linear), W[k, :] (matmul), W[filters of its group, c] (conv)."""
    if op == "matmul":
        return w.norm(dim=1)
    out = []
    og = w.shape[0] // groups
    for g in range(groups):
        for c in range(w.shape[1]):
            out.append(w[g * og:(g + 1) * og, c].norm())
    return torch.stack(out)


class MatmulNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))   # y = x @ w: 12 inputs, 8 outputs
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(x @ self.w))


def dense(model, x, **kw):
    return sparsec.compile(model, pattern="dense", example_inputs=(x,), train=True, **kw)


# ---------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("op, shape, groups", [("linear", (6, 5), 1), ("conv2d", (6, 4, 3, 3), 1),
                                               ("conv2d", (6, 2, 3, 3), 2), ("matmul", (5, 7), 1),
                                               ("conv1d", (6, 4, 3), 1), ("conv1d", (6, 2, 5), 3)])
def test_norms_gradcheck_and_match_plain_torch(op, shape, groups):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(row_norms(w, op, groups), oracle_rows(w, op))
    torch.testing.assert_close(col_norms(w, op, groups), oracle_cols(w, op, groups))
    # every norm is > 0 here, where w / ||w_g|| is the true gradient
    assert torch.autograd.gradcheck(lambda t: row_norms(t, op, groups), (w,))
    assert torch.autograd.gradcheck(lambda t: col_norms(t, op, groups), (w,))
    assert torch.autograd.gradcheck(lambda t: row_norms(t, op, groups).sum() + col_norms(t, op, groups).sum(), (w,))


@pytest.mark.parametrize("groups", ["rows", "cols", ["rows", "cols"], "filters", "channels"])
def test_penalty_value_on_a_compiled_model(groups):
    torch.manual_seed(0)
    model, (x,) = load_example("cnn").build_model()
    cm = dense(model, x)
    lam = 0.3
    expected = 0.0
    alias = {"filters": "rows", "channels": "cols"}
    kinds = [alias.get(g, g) for g in ([groups] if isinstance(groups, str) else groups)]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            op, g = ("linear", 1) if isinstance(module, nn.Linear) else ("conv2d", module.groups)
            for kind in kinds:
                expected += (oracle_rows(module.weight, op) if kind == "rows" else oracle_cols(module.weight, op, g)).sum()
    value = GroupLasso(cm, lam, groups)()
    assert value.dim() == 0
    torch.testing.assert_close(value, lam * expected, rtol=1e-5, atol=1e-5)


def test_matmul_orientation():
    torch.manual_seed(0)
    model = MatmulNet()
    cm = dense(model, torch.randn(2, 12))
    w = model.w.detach()
    rows = GroupLasso(cm, 1.0, "rows", layers=["w"])()
    cols = GroupLasso(cm, 1.0, "cols", layers=["w"])()
    torch.testing.assert_close(rows, w.norm(dim=0).sum())   # output feature n reads W[:, n]
    torch.testing.assert_close(cols, w.norm(dim=1).sum())   # input feature k is W[k, :]
    small = w.norm(dim=1) <= w.norm(dim=1).median()
    GroupLasso(cm, 1.0, "cols", layers=["w"]).zero_small_(float(w.norm(dim=1).median()))
    after = cm.graph_module.get_parameter("w").detach()
    assert (after[small] == 0).all() and torch.equal(after[~small], w[~small])


def test_rows_plus_cols_gradient_is_w_over_row_plus_w_over_col_and_zero_groups_give_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[1] = 0       # a zero row
        model[0].weight[:, 4] = 0    # a zero column
    cm = dense(model, torch.randn(2, 6))
    gl = GroupLasso(cm, 1.0, ["rows", "cols"], layers=["0"])
    gl().backward()
    w = model[0].weight.detach()
    row = w.norm(dim=1, keepdim=True)
    col = w.norm(dim=0, keepdim=True)
    expected = torch.where(row > 0, w / row.clamp_min(1e-30), 0) + torch.where(col > 0, w / col.clamp_min(1e-30), 0)
    grad = cm.graph_module.get_parameter("0.weight").grad
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected)
    assert (grad[1] == 0).all() and (grad[:, 4] == 0).all()


def test_all_zero_weight_has_zero_gradient_not_nan():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
    cm = dense(model, torch.randn(2, 4))
    gl = GroupLasso(cm, 2.0, ["rows", "cols"])
    value = gl()
    value.backward()
    assert value.item() == 0
    assert torch.equal(cm.graph_module.get_parameter("0.weight").grad, torch.zeros(4, 4))


def test_masked_layer_uses_the_effective_weight_and_masked_entries_get_no_gradient():
    model, (x,) = load_example("mlp").build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), train=True)
    layer = cm.sparse_module("fc2")
    eff = layer.weight.detach() * layer.weight_mask
    gl = GroupLasso(cm, 1.0, "rows", layers=["fc2"])
    value = gl()
    torch.testing.assert_close(value, eff.norm(dim=1).sum())
    value.backward()
    assert (layer.weight.grad[~layer.weight_mask] == 0).all()
    assert (layer.weight.grad[layer.weight_mask] != 0).any()


def test_layers_filter_and_lam_zero():
    model, (x,) = load_example("mlp").build_model()
    cm = dense(model, x)
    gl = GroupLasso(cm, 0.0, "rows", layers=["fc[12]"])
    assert [lw.name for lw in gl.layers] == ["fc1", "fc2"]
    value = gl()
    assert value.item() == 0.0
    value.backward()  # valid, all-zero gradient
    assert (cm.graph_module.fc1.weight.grad == 0).all()


def test_bad_arguments():
    model, (x,) = load_example("mlp").build_model()
    cm = dense(model, x)
    with pytest.raises(ValueError, match="rows.*cols|cols.*rows"):
        GroupLasso(cm, 1.0, "blocks")
    with pytest.raises(ValueError):
        GroupLasso(cm, 1.0, [])
    with pytest.raises(ValueError, match="lam"):
        GroupLasso(cm, -1.0)
    with pytest.raises(ValueError, match="lam"):
        GroupLasso(cm, float("nan"))
    with pytest.raises(TypeError):
        GroupLasso(cm, "0.1")
    with pytest.raises(ValueError, match="nope"):
        GroupLasso(cm, 1.0, layers=["nope"])
    with pytest.raises(ValueError, match="train=True"):
        GroupLasso(sparsec.compile(model, pattern="2:4", example_inputs=(x,)), 1.0)


# ---------------------------------------------------------------------------- SSL metrics, thresholding, freezing


def test_sparsity_metrics_follow_ssl_definitions():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        conv = model[0].weight       # [4, 2, 3, 3]
        conv[0] = 0                  # filter 0: a zero row
        conv[:, 1] = 0               # input channel 1: a zero channel, and 9 zero GEMM columns
        conv[:, 0, 0, 0] = 0         # one more zero GEMM column (shape-wise group (0, 0, 0))
    cm = dense(model, torch.randn(1, 2, 6, 6))
    s = GroupLasso(cm, 1.0, "rows").sparsity()
    w = conv.detach()
    assert s["0"]["element"] == pytest.approx(100 * (w == 0).sum().item() / w.numel())
    assert s["0"]["row"] == pytest.approx(100 * 1 / 4)
    assert s["0"]["column"] == pytest.approx(100 * 10 / 18)
    assert s["0"]["channel"] == pytest.approx(100 * 1 / 2)
    assert s["3"]["row"] == 0.0
    total = w.numel() + model[3].weight.numel()
    assert s["total"]["element"] == pytest.approx(100 * ((w == 0).sum().item() + (model[3].weight == 0).sum().item()) / total)


def test_zero_small_sets_small_groups_exactly_to_zero():
    model = nn.Sequential(nn.Linear(6, 8))
    with torch.no_grad():
        model[0].weight[2] = 1e-4
        model[0].weight[5] = 0
    cm = dense(model, torch.randn(2, 6))
    gl = GroupLasso(cm, 1.0, "rows")
    before = cm.graph_module.get_parameter("0.weight").detach().clone()
    assert gl.zero_small_(1e-2) == 1  # row 2 newly zeroed; row 5 already was
    after = cm.graph_module.get_parameter("0.weight").detach()
    assert (after[2] == 0).all() and (after[5] == 0).all()
    keep = [i for i in range(8) if i not in (2, 5)]
    assert torch.equal(after[keep], before[keep])
    with pytest.raises(ValueError):
        gl.zero_small_(-1.0)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                      lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)])
def test_frozen_zero_groups_stay_zero_while_fine_tuning(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0
        model[2].weight[:, 6] = 0
    cm = dense(model, torch.randn(2, 6))
    gl = GroupLasso(cm, 1e-2, ["rows", "cols"])
    frozen = gl.freeze_zero_groups()
    assert (~frozen.masks["0"][[1, 4]]).all() and frozen.masks["0"][[0, 2, 3]].all()
    opt = make_opt(cm.parameters())
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    start = cm.graph_module.get_parameter("0.weight").detach().clone()
    for _ in range(50):  # the penalty stays on: its gradient must be masked too
        loss = ((cm(x) - y) ** 2).mean() + gl()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w0, w2 = cm.graph_module.get_parameter("0.weight"), cm.graph_module.get_parameter("2.weight")
    assert (w0[[1, 4]] == 0).all() and (w2[:, 6] == 0).all()
    assert not torch.equal(w0[[0, 2, 3]], start[[0, 2, 3]])  # the rest trained
    frozen.remove()


def test_reapply_covers_optimizer_state_from_before_freezing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    cm = dense(model, torch.randn(2, 6))
    opt = torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    for _ in range(3):  # momentum builds up for every row
        opt.zero_grad()
        ((cm(x) - y) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        cm.graph_module.get_parameter("0.weight")[2] = 0
    frozen = GroupLasso(cm, 0.0, "rows").freeze_zero_groups()
    opt.zero_grad()
    ((cm(x) - y) ** 2).mean().backward()
    opt.step()
    w = cm.graph_module.get_parameter("0.weight")
    assert (w[2] != 0).any()  # stale momentum moved it: the reason reapply_ exists
    frozen.reapply_()
    assert (w[2] == 0).all()


# ---------------------------------------------------------------------------- SSL recipe on a toy problem


def _train(lam: float, steps: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y = torch.tanh(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    cm = dense(model, x[:2])
    gl = GroupLasso(cm, lam, "rows", layers=["0"])
    opt = torch.optim.SGD(cm.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # anneal so groups settle near 0
    for _ in range(steps):
        loss = ((cm(x) - y) ** 2).mean() + gl()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    gl.zero_small_(1e-3)  # SSL: threshold tiny groups to exactly 0
    return cm, gl, x


def test_group_sparsity_grows_with_lambda_and_shrink_removes_the_zero_rows():
    zero_rows = []
    for lam in (0.0, 0.03, 0.1, 0.3):
        cm, gl, x = _train(lam)
        zero_rows.append(gl.sparsity()["0"]["row"])
    assert zero_rows == sorted(zero_rows), zero_rows
    assert zero_rows[0] == 0.0 and zero_rows[-1] >= 50.0
    # The last model, compacted: one hidden unit per nonzero row, same outputs.
    w = cm.graph_module.get_parameter("0.weight").detach()
    alive = int((w.norm(dim=1) > 0).sum())
    small = shrink(cm)
    assert small.graph_module.get_parameter("0.weight").shape == (alive, 8)
    with torch.no_grad():
        ref, out = cm(x), small(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fp16_weights_norms_neither_underflow_nor_overflow():
    """Squares summed in fp16 flush a weight below ~2.4e-4 to 0 and overflow above ~256: small
    nonzero rows then read as removed (sparsity, freeze_zero_groups; shrink dropped them, changing the
    outputs) and large ones as Inf. Checked against float64 norms of the same fp16 values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[2].weight[:10].mul_(1e-3)   # entries ~1e-4: nonzero, squares underflow fp16
        model[2].weight[10:12].mul_(3e3)  # entries ~300: squares overflow fp16
    model = model.half()
    cm = dense(model, torch.randn(4, 16).half())
    gl = GroupLasso(cm, 0.5, "rows", layers=["2"])
    w = cm.graph_module.get_submodule("2").weight
    ref_norms = w.detach().double().norm(dim=1)
    assert (ref_norms > 0).all() and torch.isfinite(ref_norms).all()
    value = gl()
    torch.testing.assert_close(value.double(), 0.5 * ref_norms.sum(), rtol=1e-5, atol=0)
    value.backward()
    ref_grad = 0.5 * w.detach().double() / ref_norms[:, None]
    assert w.grad.dtype == torch.float16
    torch.testing.assert_close(w.grad.double(), ref_grad.half().double(), rtol=2e-3, atol=1e-7)
    assert gl.sparsity()["2"]["row"] == 0.0
    assert gl.freeze_zero_groups().masks["2"].all()  # nothing frozen: no row is zero
    assert gl.zero_small_(0.0) == 0 and torch.equal(w.detach().double().norm(dim=1), ref_norms)


def test_bad_argument_types_name_the_problem():
    model, (x,) = load_example("mlp").build_model()
    cm = dense(model, x)
    with pytest.raises(TypeError, match=r"groups must be a str or a list of str.*rows"):
        GroupLasso(cm, 1.0, None)
    with pytest.raises(TypeError, match=r"groups must be a str or a list of str"):
        GroupLasso(cm, 1.0, ["rows", 3])
    with pytest.raises(TypeError, match=r"layers must be a str or a list of str"):
        GroupLasso(cm, 1.0, layers=5)
    with pytest.raises(ValueError, match=r"layers is empty; pass None for every layer, or some of \['fc1'"):
        GroupLasso(cm, 1.0, layers=[])
    with pytest.raises(ValueError, match=r"layers entry 'fc\[' is neither a layer name nor a valid regular"):
        GroupLasso(cm, 1.0, layers=["fc["])
    with pytest.raises(TypeError, match=r"needs a sparsec.CompiledModel, got .*compile the model first"):
        GroupLasso(model, 1.0)
    gl = GroupLasso(cm, 1.0)
    with pytest.raises(TypeError, match="threshold must be a number, got str"):
        gl.zero_small_("0.1")
    import numpy as np
    assert GroupLasso(cm, np.float32(0.5)).lam == 0.5  # numpy scalars are numbers
    assert gl.zero_small_(torch.tensor(0.0)) == 0      # so is a 0-dim tensor (a quantile of the norms)


def test_save_warns_that_frozen_groups_are_not_in_the_file_and_freezing_again_holds_them(tmp_path):
    """Frozen groups are gradient hooks, which pickling drops: the loaded model moved them again with no
    word. save warns; a GroupLasso on the loaded model freezes them again."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    cm = sparsec.compile(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), pattern="dense",
                         example_inputs=(x,), train=True)  # (tanh: a zero row still gets a gradient)
    with torch.no_grad():
        cm.graph_module.get_submodule("0").weight[:4] = 0
    GroupLasso(cm, lam=1e-3, groups="rows").freeze_zero_groups()
    with pytest.warns(UserWarning, match=r"carry gradient hooks .* which the file does not keep"):
        sparsec.save(cm, tmp_path / "m.sparsec")
    for refreeze in (False, True):
        loaded = sparsec.load(tmp_path / "m.sparsec")
        if refreeze:
            GroupLasso(loaded, lam=1e-3, groups="rows").freeze_zero_groups()
        opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
        loaded(x).sum().backward()
        opt.step()
        moved = float(loaded.graph_module.get_submodule("0").weight[:4].detach().abs().sum())
        assert (moved == 0) == refreeze, moved
