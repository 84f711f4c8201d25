"""Conformance tests for design.md's public contract, written as an outside tester would.

Every expected value is computed here with small plain-torch / plain-Python references (loops over
groups and rows, ranking by the key (-|w|, index)); nothing from sparsec computes an expectation.
CPU only, small models.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import re

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import sparsec

BAD_PATTERNS = ["3:2", "0:4", "2:4:8", "fanin:1.5", ""]
# The default CPU backend ("auto") times kernels for every new layer shape, seconds per compile on a
# shared 2-core machine; most tests pin the plain-torch runtime (same masks, same math) and the tests
# marked "default backend" keep the default.
TORCH = dict(backend="torch")


# --------------------------------------------------------------------------- references


def keep_top(values: list[float], keep: int) -> list[bool]:
    """Keep the `keep` largest |v|; ties go to the lower index (sort key (-|v|, index))."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    kept = set(order[:keep])
    return [i in kept for i in range(len(values))]


def ref_nm_mask(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask [out, K]: in every group of m consecutive entries of a row, the n largest magnitudes."""
    out = []
    for row in rows.tolist():
        flags = []
        for g in range(0, len(row), m):
            flags += keep_top(row[g:g + m], n)
        out.append(flags)
    return torch.tensor(out, dtype=torch.bool)


def fanin_k(numel: int, out_features: int, s: float) -> int:
    return max(1, math.floor(numel * (1 - s)) // out_features)


def ref_fanin_mask(rows: torch.Tensor, s: float) -> torch.Tensor:
    k = fanin_k(rows.numel(), rows.shape[0], s)
    return torch.tensor([keep_top(row, k) for row in rows.tolist()], dtype=torch.bool)


def ref_mask(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """Mask in the weight's own shape; Linear [out, in] and Conv2d [out, in/groups, kh, kw] are both
    grouped along the row-major flattening of everything but dim 0."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    if pattern.startswith("fanin:"):
        mask = ref_fanin_mask(rows, float(pattern.split(":")[1]))
    else:
        n, m = map(int, pattern.split(":"))
        mask = ref_nm_mask(rows, n, m)
    return mask.reshape(weight.shape)


def pruned_copy(model: nn.Module, sparsity: dict[str, str | None]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of `model` whose listed layers are pruned by the reference; also returns the masks."""
    ref = copy.deepcopy(model)
    masks = {}
    with torch.no_grad():
        for name, module in ref.named_modules():
            if sparsity.get(name):
                masks[name] = ref_mask(module.weight, sparsity[name])
                module.weight.mul_(masks[name])
    return ref, masks


def candidate_names(model: nn.Module) -> list[str]:
    return [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """fc1 reads the input and fc2 produces the output; body.* and mid are in between.
    mid's in_features (30) fits no M in {4, 8}."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))
        self.proj = nn.Linear(48, 30)
        self.mid = nn.Linear(30, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.body(h))
        h = torch.relu(self.mid(torch.relu(self.proj(h))))
        return self.fc2(h)


class ConvNet(nn.Module):
    """conv2: grouped, non-square kernel (K = 8*3*2 = 48); conv3: 1x1 (K = 32);
    conv4: in/groups*kh*kw = 6*3*3 = 54, not a multiple of 4."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, (3, 2), padding=(1, 1), groups=2)
        self.conv3 = nn.Conv2d(32, 60, 1)
        self.conv4 = nn.Conv2d(60, 60, 3, padding=1, groups=10)
        self.fc = nn.Linear(60, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        h = torch.relu(self.conv4(h))
        return self.fc(h.mean(dim=(2, 3)))


def mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(5, 32)


def convnet():
    torch.manual_seed(1)
    return ConvNet().eval(), torch.randn(2, 3, 8, 8)


def check_compiled(cm, model, x, expect: dict[str, str | None]):
    """cm's plan says `expect` for each layer; masks, effective weights and outputs match the reference."""
    assert {lp.name: lp.sparsity for lp in cm.plan} == expect
    ref, masks = pruned_copy(model, expect)
    modules = dict(model.named_modules())
    for name, pattern in expect.items():
        weight = modules[name].weight.detach()
        mask, eff = cm.mask(name), cm.effective_weight(name)
        assert mask.dtype == torch.bool and tuple(mask.shape) == tuple(weight.shape), name
        assert tuple(eff.shape) == tuple(weight.shape), name
        if pattern is None:
            assert bool(mask.all()), name
            assert torch.equal(eff, weight), name
        else:
            assert torch.equal(mask, masks[name]), name
            assert torch.equal(eff, weight * masks[name]), name
            assert bool((eff[~mask] == 0).all()), name  # a masked weight is exactly zero
    with torch.no_grad():
        torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- API shape


def test_signatures():
    params = list(inspect.signature(sparsec.compile).parameters)
    assert params[:3] == ["model", "pattern", "example_inputs"]
    for name in ("include", "exclude", "plan"):
        assert name in params
    assert list(inspect.signature(sparsec.explain).parameters)[:3] == ["model", "pattern", "example_inputs"]
    for fn in (sparsec.nm_compress, sparsec.nm_decompress):
        sig = inspect.signature(fn)
        assert sig.parameters["n"].default == 2 and sig.parameters["m"].default == 4


def test_compile_and_explain_return_types():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,))
    assert isinstance(cm, sparsec.CompiledModel) and isinstance(cm, nn.Module)
    assert cm(x).shape == (5, 10)
    assert isinstance(cm.plan, sparsec.Plan)
    assert all(isinstance(lp, sparsec.LayerPlan) for lp in cm.plan)
    assert isinstance(cm.graph_module, fx.GraphModule) and isinstance(cm.graph_module.code, str)
    assert isinstance(cm.kernels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in cm.kernels.items())
    table = str(cm.plan)
    header = next(line for line in table.splitlines() if line.startswith("layer"))
    assert re.search(r"layer\s+op\s+weight shape\s+sparsity\s+quant.*reason", header), header
    for lp in cm.plan:
        assert lp.name in table
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,))
    assert isinstance(plan, sparsec.Plan)
    assert [(lp.name, lp.sparsity) for lp in plan] == [(lp.name, lp.sparsity) for lp in cm.plan]


def test_layerplan_fields_mlp():
    model, x = mlp()
    plan = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH).plan
    modules = dict(model.named_modules())
    assert [lp.name for lp in plan] == candidate_names(model)
    for lp in plan:
        assert lp.op == "linear"
        assert isinstance(lp.weight_shape, tuple) and lp.weight_shape == tuple(modules[lp.name].weight.shape)
        assert lp.quant is None and lp.grad_sparsity is None
        assert isinstance(lp.reason, str) and lp.reason.strip()
    assert {lp.name: lp.sparsity for lp in plan} == {
        "fc1": None, "body.0": "2:4", "body.2": "2:4", "proj": "2:4", "mid": None, "fc2": None}
    assert "first" in plan["fc1"].reason and "last" in plan["fc2"].reason
    assert "multiple" in plan["mid"].reason and "4" in plan["mid"].reason


def test_layerplan_fields_conv():
    model, x = convnet()
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH)
    modules = dict(model.named_modules())
    assert [lp.name for lp in plan] == candidate_names(model)
    for lp in plan:
        assert lp.op == ("linear" if lp.name == "fc" else "conv2d")
        assert lp.weight_shape == tuple(modules[lp.name].weight.shape)
    assert {lp.name: lp.sparsity for lp in plan} == {
        "conv1": None, "conv2": "2:4", "conv3": "2:4", "conv4": None, "fc": None}
    assert "multiple" in plan["conv4"].reason


# --------------------------------------------------------------------------- patterns and masks


@pytest.mark.parametrize("pattern,options", [("2:4", {}), ("fanin:0.9", {}),  # default backend
                                             ("1:4", TORCH), ("4:8", TORCH), ("fanin:0.5", TORCH)])
def test_mlp_matches_pruned_reference(pattern, options):
    model, x = mlp()
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), **options)
    fits_mid = pattern.startswith("fanin")  # K = 30 takes constant fan-in but no M in {4, 8}
    check_compiled(cm, model, x, {"fc1": None, "body.0": pattern, "body.2": pattern, "proj": pattern,
                                  "mid": pattern if fits_mid else None, "fc2": None})


@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.75"])
def test_conv_matches_pruned_reference(pattern):  # default backend
    """Conv2d groups run along the flattened in/groups*kh*kw (memory order), fan-in along the filter."""
    model, x = convnet()
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), include=["conv1", "fc"])
    fits = pattern.startswith("fanin")
    check_compiled(cm, model, x, {"conv1": None if not fits else pattern, "conv2": pattern, "conv3": pattern,
                                  "conv4": pattern if fits else None, "fc": pattern})
    # conv1's K = 3*3*3 = 27: include= never forces a layer whose shape does not fit
    if not fits:
        assert "multiple" in cm.plan["conv1"].reason


def test_ties_go_to_lower_index():
    model, x = mlp()
    with torch.no_grad():
        w = model.body[0].weight
        w.copy_(torch.where(torch.arange(w.numel()).reshape(w.shape) % 3 == 0, 1.0, -1.0))  # all |w| equal
        w[0, :4] = torch.tensor([3.0, 1.0, 3.0, 3.0])  # 2:4 keeps index 0 and 2
        model.body[2].weight.fill_(0.5)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH)
    mask = cm.mask("body.0")
    assert mask[0, :4].tolist() == [True, False, True, False]
    assert bool(mask[1:].reshape(-1, 4)[:, :2].all()) and not bool(mask[1:].reshape(-1, 4)[:, 2:].any())
    cm = sparsec.compile(model, pattern="fanin:0.75", example_inputs=(x,), **TORCH)
    mask = cm.mask("body.2")  # all equal: every row keeps its first k columns
    k = fanin_k(48 * 64, 48, 0.75)
    assert bool(mask[:, :k].all()) and not bool(mask[:, k:].any())


def test_mask_is_not_inferred_from_zeros():
    """Groups whose weights are exactly zero still keep N positions (lowest index among the ties)."""
    model, x = mlp()
    with torch.no_grad():
        w = model.body[0].weight
        w[:, :8] = 0.0               # two all-zero groups in every row
        w[:, 8:12] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # one nonzero: keeps 3 and the first zero (0)
    for pattern in ("2:4", "fanin:0.5"):
        cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), **TORCH)
        check_compiled(cm, model, x, {"fc1": None, "body.0": pattern, "body.2": pattern, "proj": pattern,
                                      "mid": pattern if pattern.startswith("fanin") else None, "fc2": None})
        mask = cm.mask("body.0")
        if pattern == "2:4":
            assert mask[:, :12].reshape(-1, 3, 4).tolist() == [[[True, True, False, False]] * 2
                                                               + [[True, False, False, True]]] * 64
        assert bool((mask.sum(1) == mask.sum(1)[0]).all())


@pytest.mark.parametrize("s", [0.9, 0.99, 0.3, 0.123])
def test_fanin_k_per_row(s):
    model, x = mlp()
    cm = sparsec.compile(model, pattern=f"fanin:{s}", example_inputs=(x,), **TORCH, include=[".*"])
    for lp in cm.plan:
        assert lp.sparsity == f"fanin:{s}"
        rows, out = math.prod(lp.weight_shape[1:]), lp.weight_shape[0]
        k = fanin_k(out * rows, out, s)
        mask = cm.mask(lp.name)
        assert mask.sum(1).tolist() == [k] * out, lp.name
    check_compiled(cm, model, x, {lp.name: f"fanin:{s}" for lp in cm.plan})


def test_dense_pattern_prunes_nothing():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="dense", example_inputs=(x,), **TORCH)
    check_compiled(cm, model, x, {name: None for name in candidate_names(model)})
    assert all(lp.sparsity is None for lp in sparsec.explain(model, pattern="dense", example_inputs=(x,), **TORCH))


@pytest.mark.parametrize("bad", BAD_PATTERNS + ["fanin:0", "fanin:1", "fanin:-0.5", "fanin:", "2:0", "4", "sparse"])
def test_bad_patterns_raise_naming_accepted_forms(bad):
    model, x = mlp()
    for fn in (sparsec.compile, sparsec.explain):
        with pytest.raises(ValueError) as info:
            fn(model, pattern=bad, example_inputs=(x,))
        text = str(info.value)
        assert "N:M" in text and "fanin:" in text and "dense" in text, text


# --------------------------------------------------------------------------- include / exclude


def test_include_forces_first_and_last():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH, include=["fc1", "fc2"])
    check_compiled(cm, model, x, {"fc1": "2:4", "body.0": "2:4", "body.2": "2:4", "proj": "2:4",
                                  "mid": None, "fc2": "2:4"})


def test_include_regex_full_match():
    model, x = mlp()
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH, include=[r"fc\d"])
    assert plan["fc1"].sparsity == "2:4" and plan["fc2"].sparsity == "2:4"
    # "fc" full-matches no layer name (fc1, fc2 only contain it)
    with pytest.raises(ValueError):
        sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH, include=["fc"])
    with pytest.raises(ValueError):
        sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH, exclude=["body.0x"])


def test_include_never_forces_a_misfit():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH, include=["mid"])
    assert cm.plan["mid"].sparsity is None and "multiple" in cm.plan["mid"].reason
    assert bool(cm.mask("mid").all())
    plan = sparsec.explain(model, pattern="4:8", example_inputs=(x,), **TORCH, include=[".*"])
    assert plan["mid"].sparsity is None and all(lp.sparsity == "4:8" for lp in plan if lp.name != "mid")


def test_exclude_keeps_dense():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH, exclude=[r"body\.\d"])
    check_compiled(cm, model, x, {"fc1": None, "body.0": None, "body.2": None, "proj": "2:4", "mid": None, "fc2": None})
    assert "exclude" in cm.plan["body.0"].reason
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH, exclude=["proj"])
    assert cm.plan["proj"].sparsity is None and cm.plan["body.0"].sparsity == "2:4"


@pytest.mark.parametrize("arg,name,close", [("include", "fcc1", "fc1"), ("exclude", "prj", "proj"),
                                            ("include", "body.1", "body.0")])
def test_unmatched_name_lists_close_names(arg, name, close):
    model, x = mlp()
    for fn in (sparsec.compile, sparsec.explain):
        with pytest.raises(ValueError, match=re.escape(close)):
            fn(model, pattern="2:4", example_inputs=(x,), **{arg: [name]})


# --------------------------------------------------------------------------- plans


def test_plan_json_round_trip():
    model, x = mlp()
    plan = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH).plan
    text = plan.to_json()
    assert isinstance(text, str) and isinstance(json.loads(text), dict)
    back = sparsec.Plan.from_json(text)
    assert isinstance(back, sparsec.Plan)
    fields = ("name", "op", "weight_shape", "sparsity", "quant", "grad_sparsity", "reason")
    assert [tuple(getattr(lp, f) for f in fields) for lp in back] == [tuple(getattr(lp, f) for f in fields) for lp in plan]
    assert all(isinstance(lp.weight_shape, tuple) for lp in back)
    assert back.to_json() == sparsec.Plan.from_json(back.to_json()).to_json()


def test_compile_applies_edited_plan_exactly():
    model, x = mlp()
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH)
    edits = {"fc1": "fanin:0.5", "body.0": None, "body.2": "4:8", "proj": "1:4", "mid": None, "fc2": "2:4"}
    for lp in plan:
        lp.sparsity = edits[lp.name]
        lp.backend = "torch" if lp.sparsity else None  # (None: chosen again, by timing, slow here)
    plan = sparsec.Plan.from_json(plan.to_json())  # as a user editing the JSON file would
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    check_compiled(cm, model, x, edits)
    # the same plan applied again gives the same plan
    again = sparsec.compile(model, example_inputs=(x,), plan=cm.plan)
    assert {lp.name: lp.sparsity for lp in again.plan} == edits


def test_edited_plan_quant_applied():
    model, x = mlp()
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH)
    plan["body.2"].quant = "int8"
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    assert cm.plan["body.2"].quant == "int8" and cm.plan["body.0"].quant is None
    weight = model.body[2].weight.detach()
    mask = ref_mask(weight, "2:4")
    assert torch.equal(cm.mask("body.2"), mask)
    eff = cm.effective_weight("body.2")
    assert bool((eff[~mask] == 0).all())
    # per output channel symmetric int8: every row sits on a grid of max|row| / 127
    pruned = weight * mask
    scale = pruned.abs().amax(1, keepdim=True) / 127
    q = eff / scale
    assert bool(((q - q.round()).abs() < 1e-3).all()) and bool((q.abs() <= 127.001).all())
    assert bool(((eff - pruned).abs() <= scale / 2 + 1e-6).all())


# --------------------------------------------------------------------------- the user's model


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [id(p) for p in model.parameters()],
            [(n, type(m)) for n, m in model.named_modules()], model.training,
            [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize("kwargs", [dict(pattern="2:4"), dict(pattern="fanin:0.9", include=[".*"]),
                                    dict(pattern="2:4", quantize="int8")])
def test_compile_never_modifies_the_model(kwargs):
    model, x = mlp()
    before, y = _snapshot(model), model(x).detach()
    cm = sparsec.compile(model, example_inputs=(x,), **kwargs, **TORCH)
    sparsec.explain(model, example_inputs=(x,), **kwargs, **TORCH)
    cm(x)
    after = _snapshot(model)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(model(x), y)
    # and the compiled model does not share storage with it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(cm.effective_weight("fc1"), model.fc1.weight.detach())


# --------------------------------------------------------------------------- format helpers


def ref_nibble_compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 storage of a [rows, K] tensor with exactly 2 nonzeros per group (K % 16 == 0)."""
    values, meta = [], []
    for row in w.tolist():
        vals, words = [], [0] * (len(row) // 16)
        for g in range(len(row) // 4):
            i0, i1 = [j for j in range(4) if row[4 * g + j] != 0]
            vals += [row[4 * g + i0], row[4 * g + i1]]
            words[g // 4] |= (i0 | (i1 << 2)) << (4 * (g % 4))
        values.append(vals)
        meta.append([wd - 65536 if wd >= 32768 else wd for wd in words])  # int16 bit pattern
    return torch.tensor(values, dtype=w.dtype), torch.tensor(meta, dtype=torch.int16)


def random_nm(rows: int, k: int, n: int, m: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A tensor with exactly n nonzeros in every group of m (all pairs of positions occur)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones_like(w), w)
    keep = torch.rand(rows, k // m, m, generator=g).argsort(-1)[..., :n]
    mask = torch.zeros(rows, k // m, m, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, k)
    return w * mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nm_compress_2_4_nibble_format(dtype):
    w = random_nm(6, 64, 2, 4, dtype)
    w[0, 12:16] = torch.tensor([0, 0, 1.5, -2.5], dtype=dtype)  # nibble 14 in bits 12..15: negative int16
    values, meta = sparsec.nm_compress(w)
    want_values, want_meta = ref_nibble_compress(w)
    assert values.dtype == dtype and values.shape == (6, 32)
    assert meta.dtype == torch.int16 and meta.shape == (6, 4)
    assert torch.equal(values, want_values)
    assert torch.equal(meta, want_meta)
    assert int(meta[0, 0]) < 0
    assert torch.equal(sparsec.nm_decompress(values, meta), w)
    assert torch.equal(sparsec.nm_decompress(values, meta, n=2, m=4), w)


def test_nm_compress_last_dim_of_3d():
    w = random_nm(6, 32, 2, 4).reshape(2, 3, 32)
    values, meta = sparsec.nm_compress(w)
    want_values, want_meta = ref_nibble_compress(w.reshape(6, 32))
    assert torch.equal(values.reshape(6, 16), want_values) and torch.equal(meta.reshape(6, 2), want_meta)
    assert values.shape == (2, 3, 16) and meta.shape == (2, 3, 2)
    assert torch.equal(sparsec.nm_decompress(values, meta), w)


def test_nm_compress_groups_with_fewer_nonzeros_round_trip():
    w = random_nm(4, 32, 2, 4)
    w[0, :8] = torch.tensor([0, 0, 0, 0, 0, 0, 3.0, 0])
    w[1, :4] = 0
    values, meta = sparsec.nm_compress(w)
    assert values.shape == (4, 16) and meta.shape == (4, 2)
    assert torch.equal(sparsec.nm_decompress(values, meta), w)


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (2, 8), (1, 2)])
def test_other_nm_round_trip(n, m):
    w = random_nm(5, 32, n, m, seed=n * 10 + m)
    values, meta = sparsec.nm_compress(w, n=n, m=m)
    want = torch.stack([row[row != 0] for row in w])  # kept values in index order
    assert torch.equal(values, want)
    assert torch.equal(sparsec.nm_decompress(values, meta, n=n, m=m), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_cutlass_matches_torch(dtype):
    w = random_nm(64, 128, 2, 4, dtype, seed=3)
    w[5, :16] = 0          # empty groups
    w[7, 4:8] = torch.tensor([0, 0, 0, 1], dtype=dtype)  # one nonzero
    values, meta = sparsec.nm_compress(w)
    sparse, meta_cutlass = sparsec.to_cutlass(values, meta)
    want_sparse, want_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert sparse.dtype == want_sparse.dtype and meta_cutlass.dtype == want_meta.dtype
    assert torch.equal(sparse, want_sparse) and torch.equal(meta_cutlass, want_meta)


def test_to_cutlass_from_compiled_layer_weight():
    """The pruned dense matrix of a compiled layer, compressed and converted, equals torch's encoding."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 64)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,))
    eff = cm.effective_weight("2").half()
    assert torch.equal(eff.float(), (model[2].weight * ref_mask(model[2].weight, "2:4")).detach().half().float())
    sparse, meta = sparsec.to_cutlass(*sparsec.nm_compress(eff))
    want_sparse, want_meta = sparse_semi_structured_from_dense_cutlass(eff)
    assert torch.equal(sparse, want_sparse) and torch.equal(meta, want_meta)


# --------------------------------------------------------------------------- more of the contract


@pytest.mark.parametrize("pattern,backends", [("2:4", ["torch", "dense", "bitmask"]),
                                              ("4:8", ["torch", "dense", "bitmask"]),
                                              ("fanin:0.5", ["torch", "dense", "condensed"])])
def test_every_cpu_runtime_keeps_masks_with_zero_weights(pattern, backends):
    """Whatever runs a layer (set through an edited plan), its mask is the reference mask even where kept
    weights are exactly 0, and the model computes the pruned network."""
    model, x = mlp()
    with torch.no_grad():
        model.body[0].weight[:, :8] = 0.0
        model.body[0].weight[:, 8:12] = torch.tensor([0.0, 0.0, 0.0, 2.0])
        model.body[2].weight[3] = 0.0   # a whole row of zeros
    for backend in backends:
        plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), **TORCH)
        for lp in plan:
            lp.backend = backend if lp.sparsity else None
        cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
        assert [lp.backend for lp in cm.plan if lp.sparsity] == [backend] * len(plan.sparse_layers)
        check_compiled(cm, model, x, {lp.name: lp.sparsity for lp in plan})


def test_quantized_layers_compute_with_their_effective_weight():
    model, x = mlp()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), quantize="int8", **TORCH)
    assert {lp.name: lp.quant for lp in cm.plan} == {
        "fc1": None, "body.0": "int8", "body.2": "int8", "proj": "int8", "mid": None, "fc2": None}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in cm.plan:
                mask = cm.mask(name)
                if cm.plan[name].sparsity:
                    assert torch.equal(mask, ref_mask(module.weight, "2:4")), name
                eff = cm.effective_weight(name)
                assert bool((eff[~mask] == 0).all()), name
                module.weight.copy_(eff)
        torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_too_small_layers_stay_dense_unless_included():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(),  # 512 weights
                          nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(3, 32)
    plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH)
    assert {lp.name: lp.sparsity for lp in plan} == {"0": None, "2": None, "4": None, "6": "2:4", "8": None}
    assert "small" in plan["2"].reason
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), include=["2"], **TORCH)
    check_compiled(cm, model, x, {"0": None, "2": "2:4", "4": None, "6": "2:4", "8": None})


class Functional(nn.Module):
    """x @ W (W [K, N]: groups run down W's columns) and F.linear on a parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 64)
        self.W = nn.Parameter(torch.randn(64, 48))
        self.v = nn.Parameter(torch.randn(32, 48))
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.linear(torch.relu(self.a(x)) @ self.W, self.v))


def test_matmul_and_functional_linear_on_parameters():
    torch.manual_seed(6)
    model, x = Functional().eval(), torch.randn(3, 16)
    cm = sparsec.compile(model, pattern="2:4", example_inputs=(x,), **TORCH)
    ops = {lp.name: (lp.op, lp.weight_shape, lp.sparsity) for lp in cm.plan}
    assert ops["W"] == ("matmul", (64, 48), "2:4") and ops["v"] == ("linear", (32, 48), "2:4")
    w_mask = ref_mask(model.W.detach().t(), "2:4").t()  # reduction runs along W's rows
    v_mask = ref_mask(model.v.detach(), "2:4")
    assert torch.equal(cm.mask("W"), w_mask) and torch.equal(cm.mask("v"), v_mask)
    assert torch.equal(cm.effective_weight("W"), model.W.detach() * w_mask)
    with torch.no_grad():
        want = model.b(torch.nn.functional.linear(torch.relu(model.a(x)) @ (model.W * w_mask), model.v * v_mask))
        torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)


def test_plan_json_round_trip_is_equal():
    model, x = convnet()
    plan = sparsec.explain(model, pattern="fanin:0.9", example_inputs=(x,), include=["conv1"], **TORCH)
    assert sparsec.Plan.from_json(plan.to_json()) == plan


def test_bad_pattern_in_an_edited_plan_raises_naming_accepted_forms():
    model, x = mlp()
    for bad in BAD_PATTERNS:
        plan = sparsec.explain(model, pattern="2:4", example_inputs=(x,), **TORCH)
        plan["body.0"].sparsity = bad
        with pytest.raises(ValueError) as info:
            sparsec.compile(model, example_inputs=(x,), plan=plan)
        assert "N:M" in str(info.value) and "fanin:" in str(info.value), bad


@pytest.mark.parametrize("layer,x", [(nn.Linear(64, 32), torch.randn(3, 64)),
                                     (nn.Conv2d(8, 16, 3), torch.randn(1, 8, 6, 6))])
def test_a_model_that_is_one_layer_is_named_as_named_modules_names_it(layer, x):
    """model.named_modules() names the model itself "": its plan holds that one layer, once, under that
    name (it was "weight", its weight's path, plus a second entry "" said not to be called by the forward),
    and the plan round-trips through JSON (an entry named "" was refused)."""
    torch.manual_seed(7)
    layer = layer.eval()
    plan = sparsec.explain(layer, pattern="2:4", example_inputs=(x,), **TORCH)
    assert [(lp.name, lp.op, lp.weight_shape) for lp in plan] == [
        ("", "linear" if isinstance(layer, nn.Linear) else "conv2d", tuple(layer.weight.shape))]
    assert plan[""].sparsity is None and "first" in plan[""].reason  # the first layer, kept dense
    assert sparsec.Plan.from_json(plan.to_json()) == plan
    cm = sparsec.compile(layer, pattern="2:4", example_inputs=(x,), include=[""], **TORCH)
    assert [(lp.name, lp.sparsity) for lp in cm.plan] == [("", "2:4")]
    mask = ref_mask(layer.weight, "2:4")
    assert torch.equal(cm.mask(""), mask)
    assert torch.equal(cm.effective_weight(""), layer.weight.detach() * mask)
    pruned = copy.deepcopy(layer)
    with torch.no_grad():
        pruned.weight.mul_(mask)
        torch.testing.assert_close(cm(x), pruned(x), rtol=1e-5, atol=1e-5)
    assert sparsec.explain(layer, pattern="2:4", example_inputs=(x,), exclude=[""], **TORCH)[""].sparsity is None
    with pytest.raises(ValueError):
        sparsec.explain(layer, pattern="2:4", example_inputs=(x,), include=["weight"], **TORCH)
