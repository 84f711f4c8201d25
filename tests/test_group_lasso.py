"""GroupLasso (FSSL / SSL group lasso, methods.md (c)): value and gradient against plain torch norms,
zero-norm groups, masks, SSL's sparsity metrics, thresholding, freezing, and sparsity monotone in lambda."""
import gc
import weakref

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


@pytest.mark.parametrize("groups", ["rows", "cols", ["rows", "cols"], "filters", "channels", ["rows", "filters"]])
def test_penalty_value_on_a_compiled_model(groups):
    torch.manual_seed(0)
    model, (x,) = load_example("cnn").build_model()
    cm = dense(model, x)
    lam = 0.3
    expected = 0.0
    alias = {"filters": "rows", "channels": "cols"}
    # an alias names the same groups: ["rows", "filters"] counts each row once
    kinds = list(dict.fromkeys(alias.get(g, g) for g in ([groups] if isinstance(groups, str) else groups)))
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


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.Adam(p, lr=1e-2)])
@pytest.mark.parametrize("bound", [True, False])
def test_optimizer_state_from_before_freezing_does_not_move_frozen_groups(make_opt, bound):
    """The README's flow fine-tunes with the optimizer that trained with the penalty: its momentum / Adam
    moments moved frozen rows off 0 (6.8e-4 after one Adam step), and shrink then removed nothing. Also
    when the FrozenGroups is not kept in a variable."""
    torch.manual_seed(0)
    cm = dense(nn.Sequential(nn.Linear(6, 4)), torch.randn(2, 6))
    opt = make_opt(cm.parameters())
    x, y = torch.randn(16, 6), torch.randn(16, 4)

    def step():
        opt.zero_grad()
        ((cm(x) - y) ** 2).mean().backward()
        opt.step()
    for _ in range(3):  # momentum / Adam's moments build up for every row
        step()
    w = cm.graph_module.get_parameter("0.weight")
    with torch.no_grad():
        w[2] = 0
    frozen = GroupLasso(cm, 0.0, "rows").freeze_zero_groups()
    if not bound:
        del frozen
        gc.collect()
    for _ in range(3):
        step()
    assert (w[2] == 0).all() and (w[[0, 1, 3]] != 0).all()
    if bound:
        frozen.remove()  # without the hooks the stale state moves the row again: the hooks are what held it
        step()
        assert (w[2] != 0).any()


def test_reapply_sets_frozen_entries_written_outside_an_optimizer_back_to_zero():
    """The step hook acts only after an optimizer step; a write by hand (a weight averaging, an EMA copy)
    is undone by reapply_(), which leaves every trainable entry as it was."""
    torch.manual_seed(0)
    cm = dense(nn.Sequential(nn.Linear(6, 4)), torch.randn(2, 6))
    w = cm.graph_module.get_parameter("0.weight")
    with torch.no_grad():
        w[[1, 3]] = 0
    frozen = GroupLasso(cm, 0.0, "rows").freeze_zero_groups()
    with torch.no_grad():
        w.add_(0.5)
    before = w.detach().clone()
    frozen.reapply_()
    assert (w[[1, 3]] == 0).all()
    assert torch.equal(w[[0, 2]], before[[0, 2]])


def test_frozen_groups_do_not_keep_a_deleted_model_alive():
    from torch.optim.optimizer import _global_optimizer_post_hooks

    gc.collect()  # (the frozen groups of earlier tests' models go now, not during this test)
    hooks = len(_global_optimizer_post_hooks)
    cm = dense(nn.Sequential(nn.Linear(6, 4)), torch.randn(2, 6))
    with torch.no_grad():
        cm.graph_module.get_parameter("0.weight")[1] = 0
    GroupLasso(cm, 0.0, "rows").freeze_zero_groups()
    assert len(_global_optimizer_post_hooks) == hooks + 1
    alive = weakref.ref(cm)
    del cm
    gc.collect()
    assert alive() is None
    assert len(_global_optimizer_post_hooks) == hooks  # nor leave a dead hook for every optimizer step
    torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1).step()  # the global hook of a dead model does nothing


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


# ---------------------------------------------------------------------------- independent reference on random models
#
# methods.md (c): penalty = lam * sum over layers, group types, groups g of ||w_g||_2 (bias never in a group);
# gradient lam * w / ||w_g|| summed over the groups holding w, exactly 0 for a zero group. The weight is the one
# the penalty sees: `weight * mask` for a fixed-mask layer (pruned entries get no gradient), the dense weight for
# SR-STE. Groups are written out one by one here, as index masks, to stay independent of group_view's reshapes.


def ref_group_masks(shape, op: str, kind: str, conv_groups: int = 1) -> list[torch.Tensor]:
    """One bool mask (weight shape) per group: rows = output features, cols = input features (conv: per conv group)."""
    groups = []
    if op == "matmul":  # y = x @ W, W [K, N]: output n reads W[:, n], input k is W[k, :]
        k, n = shape
        for i in range(n if kind == "rows" else k):
            m = torch.zeros(shape, dtype=torch.bool)
            if kind == "rows":
                m[:, i] = True
            else:
                m[i, :] = True
            groups.append(m)
        return groups
    out, cin = shape[0], shape[1]
    if kind == "rows":
        for o in range(out):
            m = torch.zeros(shape, dtype=torch.bool)
            m[o] = True
            groups.append(m)
        return groups
    og = out // conv_groups
    for j in range(conv_groups):  # input channel c of conv group j is read only by that group's filters
        for c in range(cin):
            m = torch.zeros(shape, dtype=torch.bool)
            m[j * og:(j + 1) * og, c] = True
            groups.append(m)
    return groups


def ref_penalty_and_grad(w: torch.Tensor, op: str, kinds, conv_groups: int, lam: float):
    """(value, d value / d w) in float64, by the formula, group by group."""
    w = w.double()
    value, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(w)
    for kind in kinds:
        for m in ref_group_masks(w.shape, op, kind, conv_groups):
            norm = w[m].square().sum().sqrt()
            value += norm
            if norm > 0:
                grad[m] += w[m] / norm
    return lam * value, lam * grad


class RandomNet(nn.Module):
    """conv2d (grouped) -> conv1d (grouped) -> linear -> matmul parameter, sizes drawn by hypothesis."""

    def __init__(self, c0, c1, g1, k1, c2, g2, f, n):
        super().__init__()
        self.conv = nn.Conv2d(c0, c1, k1, groups=g1, padding=k1 // 2)
        self.conv1 = nn.Conv1d(c1, c2, 3, groups=g2, padding=1)
        self.fc = nn.Linear(c2, f)
        self.w = nn.Parameter(torch.randn(f, n))

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(-1)
        h = torch.relu(self.conv1(h)).mean(-1)
        return torch.relu(self.fc(h)) @ self.w


def _layer_state(cm, name: str):
    """(stored parameter, mask the penalty applies or None, op, conv groups), found without GroupLasso's code."""
    module = cm.sparse_module(name)
    op, groups = cm.plan[name].op, 1
    if module is not None:
        mask = module.weight_mask if module.weight_update == "fixed" else None
        if module.conv is not None:
            groups = module.conv.groups
        return module.weight, mask, op, groups
    if name == "w":
        return cm.graph_module.get_parameter("w"), None, op, 1
    sub = cm.graph_module.get_submodule(name)
    return sub.weight, None, op, getattr(sub, "groups", 1)


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def random_setups(draw):
    # channel counts per conv group from {1, 2, 3, 4}: some reductions are multiples of 4 (masked under 2:4),
    # some not (those layers stay dense)
    g1 = draw(st.sampled_from([1, 2, 4]))
    c0, c1 = g1 * draw(st.integers(1, 4)), g1 * draw(st.integers(1, 4))
    g2 = draw(st.sampled_from([g for g in (1, 2, 4) if c1 % g == 0]))
    c2 = g2 * draw(st.integers(1, 4))
    f, n = 4 * draw(st.integers(1, 2)), draw(st.integers(1, 5))
    return dict(
        sizes=(c0, c1, g1, draw(st.sampled_from([1, 3])), c2, g2, f, n),
        mode=draw(st.sampled_from(["dense", "fixed", "ste"])),
        kinds=draw(st.sampled_from([["rows"], ["cols"], ["rows", "cols"], ["cols", "filters"], ["filters", "rows"],
                                    "channels"])),
        lam=draw(st.floats(0.0, 5.0)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        zero_frac=draw(st.floats(0.0, 0.6)),
        quantile=draw(st.floats(0.0, 1.0)),
        dirty=draw(st.booleans()),  # stored weights under a fixed mask nonzero (a dense checkpoint loaded in)
        seed=draw(st.integers(0, 2 ** 16)),
    )


@given(random_setups())
def test_random_models_match_the_reference(setup):
    torch.manual_seed(setup["seed"])
    model = RandomNet(*setup["sizes"]).to(setup["dtype"])
    with torch.no_grad():  # zero whole rows / input columns so the zero-norm branch is hit
        for p in (model.conv.weight, model.conv1.weight, model.fc.weight, model.w):
            p[torch.rand(p.shape[0]) < setup["zero_frac"]] = 0
            p[:, torch.rand(p.shape[1]) < setup["zero_frac"]] = 0
    x = torch.randn(2, setup["sizes"][0], 5, 5, dtype=setup["dtype"])
    kw = {} if setup["mode"] == "dense" else dict(
        pattern="2:4", include=[".*"], weight_update="fixed" if setup["mode"] == "fixed" else "ste")
    cm = sparsec.compile(model, **{"pattern": "dense", **kw}, example_inputs=(x,), train=True)
    alias = {"filters": "rows", "channels": "cols"}
    kinds = list(dict.fromkeys(alias.get(k, k) for k in ([setup["kinds"]] if isinstance(setup["kinds"], str)
                                                         else setup["kinds"])))
    layers = {name: _layer_state(cm, name) for name in ("conv", "conv1", "fc", "w")}
    if setup["dirty"]:  # the forward reads weight * mask, so must the penalty: the noise must not count
        with torch.no_grad():
            for weight, mask, *_ in layers.values():
                if mask is not None:
                    weight[~mask] = torch.randn_like(weight)[~mask]
    tol = dict(rtol=1e-5, atol=1e-6) if setup["dtype"] == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    gl = GroupLasso(cm, setup["lam"], setup["kinds"])
    assert sorted(lw.name for lw in gl.layers) == sorted(layers)
    value = gl()
    value.backward()
    expected = torch.zeros((), dtype=torch.float64)
    for name, (weight, mask, op, groups) in layers.items():
        seen = weight.detach() * mask if mask is not None else weight.detach()
        v, g = ref_penalty_and_grad(seen, op, kinds, groups, setup["lam"])
        expected += v
        g = g * mask if mask is not None else g  # d(weight * mask) / d weight
        assert torch.isfinite(weight.grad).all(), name
        torch.testing.assert_close(weight.grad.double(), g, **tol, msg=name)
        if mask is not None:
            assert (weight.grad[~mask] == 0).all(), name  # pruned weights get exactly no push
    torch.testing.assert_close(value.double(), expected, **tol)

    # zero_small_: every group with norm <= threshold, judged on the norms at the call, becomes exactly 0
    norms = {}
    for name, (w, mask, op, g) in layers.items():
        seen = w.detach() * mask if mask is not None else w.detach()
        norms[name] = {k: torch.stack([seen[m].double().norm() for m in ref_group_masks(seen.shape, op, k, g)])
                       for k in kinds}
    # a threshold halfway between two distinct norms: a norm right at it would read as above or below it
    # depending on fp32 / fp64 rounding
    levels = torch.cat([n for d in norms.values() for n in d.values()]).unique()  # sorted
    i = int(setup["quantile"] * (len(levels) - 1))
    threshold = float((levels[i] + levels[i + 1]) / 2) if i + 1 < len(levels) else float(levels[i]) * 2 + 1
    before = {name: w.detach().clone() for name, (w, *_) in layers.items()}
    count = gl.zero_small_(threshold)
    expected_count = 0
    for name, (weight, mask, op, groups) in layers.items():
        keep = torch.ones(weight.shape, dtype=torch.bool)
        for k in kinds:
            for m, nrm in zip(ref_group_masks(weight.shape, op, k, groups), norms[name][k]):
                if nrm <= threshold:
                    keep &= ~m
        assert torch.equal(weight.detach(), before[name] * keep), name
        seen = weight.detach() * mask if mask is not None else weight.detach()
        for k in kinds:
            for m, nrm in zip(ref_group_masks(weight.shape, op, k, groups), norms[name][k]):
                expected_count += int(nrm > 0 and not seen[m].any())
    assert count == expected_count

    # freeze_zero_groups: exactly the all-zero groups of the weight the penalty sees are frozen
    frozen = gl.freeze_zero_groups()
    for name, (weight, mask, op, groups) in layers.items():
        seen = weight.detach() * mask if mask is not None else weight.detach()
        keep = torch.ones(weight.shape, dtype=torch.bool)
        for k in kinds:
            for m in ref_group_masks(weight.shape, op, k, groups):
                if not seen[m].any():
                    keep &= ~m
        assert torch.equal(frozen.masks[name], keep), name
    frozen.remove()

    # sparsity(): SSL's counts on the weight each layer computes with
    s = gl.sparsity()
    for name in layers:
        eff = cm.effective_weight(name)
        w, _, op, groups = layers[name]
        n_rows = len(ref_group_masks(w.shape, op, "rows", groups))
        zero_rows = sum(not eff[m].any() for m in ref_group_masks(w.shape, op, "rows", groups))
        zero_chan = [not eff[m].any() for m in ref_group_masks(w.shape, op, "cols", groups)]
        assert s[name]["element"] == pytest.approx(100 * (eff == 0).sum().item() / eff.numel()), name
        assert s[name]["row"] == pytest.approx(100 * zero_rows / n_rows), name
        assert s[name]["channel"] == pytest.approx(100 * sum(zero_chan) / len(zero_chan)), name


# ---------------------------------------------------------------------------- regressions found in review


@pytest.mark.parametrize("kinds", [["rows", "cols"], ["cols", "rows"]])
def test_zero_small_judges_all_groups_before_zeroing_any(kinds):
    """Row 0 (norm 0.42) is the only group at or below 0.45. Judged one type after the other, zeroing
    row 0 first left both columns at 0.4, which then went too, and then row 1 (0.57): the whole layer,
    and only for ["rows", "cols"]."""
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, 0.3, 0.0], [0.4, 0.4, 0.0]]))
    cm = dense(model, torch.randn(2, 3))
    assert GroupLasso(cm, 1.0, kinds).zero_small_(0.45) == 1  # row 0; column 2 was zero before
    w = cm.graph_module.get_parameter("0.weight").detach()
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.4, 0.0]]))


def test_freeze_zero_groups_with_a_frozen_layer():
    """A layer with requires_grad=False (a fixed backbone) took torch's 'cannot register a hook on a
    tensor that doesn't require gradient' out of freeze_zero_groups; the trainable layers must still freeze."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[2] = 0
        model[2].weight[1] = 0
    cm = dense(model, torch.randn(2, 6))
    gl = GroupLasso(cm, 1e-2, "rows")
    frozen = gl.freeze_zero_groups()
    assert not frozen.masks["0"][2].any() and not frozen.masks["2"][1].any()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x = torch.randn(16, 6)
    for _ in range(5):
        opt.zero_grad()
        (cm(x).square().mean() + gl()).backward()
        opt.step()
    assert (cm.graph_module.get_parameter("2.weight")[1] == 0).all()
    assert (cm.graph_module.get_parameter("2.weight")[0] != 0).all()  # the rest trained
    frozen.remove()


def test_sparsity_counts_the_weight_an_ste_layer_computes_with():
    """SR-STE keeps the dense weight and re-derives the mask each step: sparsity() read the dense weight and
    said 0% while the layer computes with 50% zeros and two all-zero input channels (which shrink removes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, 4:6] *= 1e-3  # in every row, columns 4 and 5 lose their 2:4 group to 6 and 7
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(torch.randn(2, 8),), train=True, include=["2"],
                         weight_update="ste")
    s = GroupLasso(cm, 1.0, "cols", layers=["2"]).sparsity()["2"]
    assert s["element"] == 50.0
    assert s["channel"] == pytest.approx(100 * 2 / 16) and s["column"] == pytest.approx(100 * 2 / 16)
    assert s["row"] == 0.0


def test_lam_assigned_later_is_checked_like_the_constructor_argument():
    """A schedule sets gl.lam each step; a negative or NaN lam was taken silently (a reward for larger groups,
    a NaN loss)."""
    model, (x,) = load_example("mlp").build_model()
    gl = GroupLasso(dense(model, x), 0.1)
    gl.lam = 0.5  # a schedule's next value
    assert gl.lam == 0.5 and isinstance(gl.lam, float)
    for bad, err in ((-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                     (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(err, match="lam"):
            gl.lam = bad
    assert gl.lam == 0.5
