"""GradualPruning (method (d), methods.md D.1 / D.4 item 1) against checks computed here: Zhu & Gupta's
cubic schedule from its formula, round(s * numel) pruned weights per layer (tests/oracle.py), each new mask
the top-k |w| among the weights the previous one kept (numpy lexsort, not the code under test), pruned
weights and their optimizer state exactly 0 through later steps, per-layer targets, the inference compile
of the trained model, a real run on the digits, checkpoints, errors. Under DDP / FSDP: test_distributed.py."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsec
from oracle import output_error, unstructured_pruned_count
from sparsec.gradual import GradualPruning, shrink_mask


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10))


MODELS = {"mlp": (_mlp, (16,)), "cnn": (_cnn, (3, 6, 6))}


def _compile(make=_mlp, shape=(16,), sparsity=0.5, **kwargs):
    return sparsec.compile(make(), pattern=f"unstructured:{sparsity}", example_inputs=(torch.randn(2, *shape),),
                           train=True, include=[".*"], min_weights=0, **kwargs)


def _batches(n, shape=(16,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _train(cm, opt, pruner, batches):
    for x, y in batches:
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()


def _rows(t):
    return t.detach().reshape(t.shape[0], -1)  # Linear / Conv2d: the [out, K] view masks rank in


def _monotone_top(w, old, keep):
    """The `keep` largest |w| among the positions `old` holds, ties to the lower flat index of the rows
    view; positions outside `old` come after all of them (numpy lexsort: last key is the primary one)."""
    a = _rows(w).double().abs().numpy().reshape(-1)
    outside = ~_rows(old).numpy().reshape(-1)
    order = np.lexsort((np.arange(a.size), -a, outside))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:keep]] = True
    assert not (mask & outside).any(), "keep must not exceed the old mask"
    return torch.from_numpy(mask).reshape(w.shape)


def _schedule(s_i, s_f, t, t0, t1):
    """Zhu & Gupta 2017, eq. (1): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, written from the paper."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3


OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
              "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_update_follows_the_schedule_and_prunes_the_smallest_kept_weights(model, optimizer):
    """Updates at 3, 8, 13, 18 and at end_step 21 (off the grid); each: the formula's sparsity, round(s *
    numel) weights pruned, the new mask the top-k |w| of the old one, kept weights and their optimizer
    state untouched, pruned ones and their state exactly 0, and every mask fixed between updates."""
    make, shape = MODELS[model]
    cm = _compile(make, shape)
    opt = OPTIMIZERS[optimizer](cm.parameters())
    pruner = GradualPruning(cm, 0.9, start_step=3, end_step=21, every=5, optimizer=opt)
    names = list(pruner.layers)
    assert len(names) == 3
    updates = []
    for step, (x, y) in enumerate(_batches(26, shape), start=1):
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        before = {n: (cm.mask(n), pruner.layers[n].weight.detach().clone(),
                      {k: v.clone() for k, v in opt.state[pruner.layers[n].weight].items()}) for n in names}
        record = pruner.step()
        if step in (3, 8, 13, 18, 21):
            updates.append(step)
            assert record is not None and record.step == step and not record.skipped
            expected = _schedule(0.5, 0.9, step, 3, 21)
            for n in names:
                old, w0, state0 = before[n]
                layer = pruner.layers[n]
                mask, w = cm.mask(n), layer.weight.detach()
                info = record.layers[n]
                assert info["sparsity"] == pytest.approx(expected, abs=1e-12)
                assert str(layer.pattern) == f"unstructured:{info['sparsity']!r}" == cm.plan[n].sparsity
                pruned = unstructured_pruned_count(mask.numel(), expected)
                assert int((~mask).sum()) == pruned == mask.numel() - info["kept"], n
                assert info["pruned"] == int((old & ~mask).sum())
                assert torch.equal(mask, _monotone_top(w0, old, mask.numel() - pruned)), n
                assert not (mask & ~old).any(), "nothing comes back"
                assert torch.equal(w[mask], w0[mask]) and (w[~mask] == 0).all()
                for key, value in opt.state[layer.weight].items():
                    if value.shape == mask.shape:
                        assert torch.equal(value[mask], state0[key][mask]) and (value[~mask] == 0).all(), key
        else:
            assert record is None
            assert all(torch.equal(cm.mask(n), before[n][0]) for n in names), "masks frozen between updates"
        for n in names:  # through every optimizer step: pruned weights and their state stay exactly 0
            layer, mask = pruner.layers[n], cm.mask(n)
            assert (layer.weight[~mask] == 0).all()
            assert all((v[~mask] == 0).all() for v in opt.state[layer.weight].values() if v.shape == mask.shape)
    assert updates == [r.step for r in pruner.history] == [3, 8, 13, 18, 21]
    assert all(r.layers[n]["pruned"] == 0 for r in pruner.history[:1] for n in names), "start_step: s_i itself"
    assert all(str(pruner.layers[n].pattern) == "unstructured:0.9" for n in names)


@given(st.integers(1, 8), st.integers(1, 12), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_shrink_mask_is_the_top_k_of_the_old_mask_and_zeros_never_come_back(out, k, kept_frac, keep_frac, seed):
    """Many ties: weights drawn from {0, +-1, +-2}, every weight outside the old mask 0, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (out, k), generator=g).float()
    old = torch.rand(out, k, generator=g) < kept_frac
    w = w * old
    keep = int(keep_frac * int(old.sum()))
    new = shrink_mask(w, old, keep)
    assert torch.equal(new, _monotone_top(w, old, keep))
    assert int(new.sum()) == keep and not (new & ~old).any()


def test_without_the_optimizer_only_the_raw_parameter_moves_under_the_mask():
    """The module doc's claim: without optimizer=, momentum left at newly pruned weights keeps moving the raw
    Parameter there (so the state zeroing above is what keeps it 0), while the layer still computes with
    weight * mask: cm.mask, effective_weight and outputs are exact."""
    cm = _compile()
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruning(cm, 0.8, end_step=4, every=2)
    for x, y in _batches(6):
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    layer, mask = pruner.layers["2"], cm.mask("2")
    assert (layer.weight[~mask] != 0).any(), "stale momentum moved pruned entries of the raw weight"
    assert torch.equal(cm.effective_weight("2"), layer.weight.detach() * mask)
    assert int((~mask).sum()) == unstructured_pruned_count(mask.numel(), 0.8)


def test_per_layer_targets_first_matching_key_wins_and_unmatched_layers_are_left_alone():
    cm = _compile()
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruning(cm, {"2": 0.95, "[04]": 0.7}, end_step=6, every=3, optimizer=opt)
    assert pruner.final == {"0": 0.7, "2": 0.95, "4": 0.7}
    only = _compile()
    other = GradualPruning(only, {"2": 0.9}, end_step=6, every=3)
    masks_before = {n: only.mask(n) for n in ["0", "4"]}
    for x, y in _batches(8):
        for model, o, p in ((cm, opt, pruner), (only, None, other)):
            F.cross_entropy(model(x), y).backward()
            if o is not None:
                o.step()
                o.zero_grad()
            p.step()
    for n, s in {"0": 0.7, "2": 0.95, "4": 0.7}.items():
        mask = cm.mask(n)
        assert int((~mask).sum()) == unstructured_pruned_count(mask.numel(), s), n
        assert cm.plan[n].sparsity == f"unstructured:{s}" and "GradualPruning raised it" in cm.plan[n].reason
    assert list(other.layers) == ["2"] and int((~only.mask("2")).sum()) == unstructured_pruned_count(4096, 0.9)
    for n, mask in masks_before.items():  # not in the dict: compiled sparsity, mask as compiled
        assert torch.equal(only.mask(n), mask) and str(only.sparse_module(n).pattern) == "unstructured:0.5"


def test_an_inference_compile_keeps_the_learned_masks_and_outputs():
    cm = _compile()
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    pruner = GradualPruning(cm, 0.95, end_step=10, every=2, optimizer=opt)
    _train(cm, opt, pruner, _batches(14))
    for n in pruner.layers:
        assert str(cm.sparse_module(n).pattern) == "unstructured:0.95"
    x = torch.randn(5, 16)
    inference = sparsec.compile(cm, pattern="unstructured:0.95", example_inputs=(x,))
    cm.eval()
    for n in pruner.layers:
        lp = inference.plan[n]
        assert lp.sparsity == "unstructured:0.95" and "learned in training" in lp.reason
        assert torch.equal(inference.mask(n), cm.mask(n)), n
    with torch.no_grad():
        assert output_error(inference(x), cm(x)) <= 1e-5


def test_digits_reach_90_percent_with_accuracy_close_to_dense():
    """A real run on scikit-learn's bundled digits: every layer from 50% to 90% unstructured in 10 pruning
    steps, retrained in between, against the dense model trained for as many steps."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def fit(net, steps, pruner=None):
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        if pruner is not None:
            pruner = pruner(opt)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            batch = train[torch.randint(0, len(train), (64,), generator=g)]
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
            opt.zero_grad()
            if pruner is not None:
                pruner.step()
        net.eval()
        with torch.no_grad():
            return float((net(x[test]).argmax(1) == y[test]).float().mean())

    dense = fit(model(), 600)
    cm = sparsec.compile(model(), pattern="unstructured:0.5", example_inputs=(x[:2],), train=True, include=[".*"])
    sparse = fit(cm, 600, lambda opt: GradualPruning(cm, 0.9, start_step=100, end_step=400, every=30, optimizer=opt))
    for n in ["0", "2", "4"]:
        mask = cm.mask(n)
        assert int((~mask).sum()) == unstructured_pruned_count(mask.numel(), 0.9)
    assert dense >= 0.95, dense
    assert sparse >= dense - 0.03, (sparse, dense)


def test_a_fresh_compile_loading_a_pruned_state_says_the_sparsity_its_masks_hold():
    """The masks are state: loaded into a compile at 0.5, the layers, their plan entries, the plan's
    totals and an inference compile say what the loaded masks keep (they said 0.5 while holding 10%)."""
    trained = _compile()
    opt = torch.optim.SGD(trained.parameters(), lr=0.05)
    pruner = GradualPruning(trained, 0.9, end_step=4, every=2, optimizer=opt)
    _train(trained, opt, pruner, _batches(4))
    cm = _compile()
    cm.load_state_dict(trained.state_dict())
    kept = {n: int(trained.mask(n).sum()) for n in pruner.layers}
    for n in pruner.layers:
        lp, numel = cm.plan[n], cm.plan[n].numel
        assert kept[n] == numel - unstructured_pruned_count(numel, 0.9)  # the oracle's count at 0.9
        assert lp.sparsity == "unstructured:0.9" and cm.sparse_module(n).pattern.sparsity == 0.9, n
        assert f"the loaded state's mask keeps {kept[n]} of {numel} weights" in lp.reason
    assert cm.plan.totals()["weights_kept"] == sum(kept.values())
    x = torch.randn(5, 16)
    inference = sparsec.compile(cm, example_inputs=(x,))
    for n in pruner.layers:
        assert inference.plan[n].sparsity == "unstructured:0.9" and torch.equal(inference.mask(n), trained.mask(n))
    # loaded again (same state), the note is not repeated; a pruner built now starts from the loaded sparsity
    cm.load_state_dict(trained.state_dict())
    assert cm.plan["2"].reason.count("the loaded state's mask keeps") == 1
    assert GradualPruning(cm, 0.95, end_step=4).initial == {n: 0.9 for n in pruner.layers}


def _run(steps, batches, resume_from=None):
    """Train _mlp() with GradualPruning; resume_from: a checkpoint (bytes) of model, optimizer and pruner state."""
    cm = _compile()
    opt = torch.optim.SGD(cm.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruning(cm, 0.9, start_step=2, end_step=20, every=4, optimizer=opt)
    if resume_from is not None:
        state = torch.load(io.BytesIO(resume_from), weights_only=True)
        cm.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pruner.load_state_dict(state["pruner"])
    for x, y in batches[pruner.steps:steps]:
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    buffer = io.BytesIO()
    torch.save({"model": cm.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buffer)
    return cm, pruner, buffer.getvalue()


def test_checkpoint_and_resume_reproduces_an_uninterrupted_run():
    batches = _batches(24)
    whole, whole_pruner, _ = _run(24, batches)
    _, _, checkpoint = _run(11, batches)  # between the updates at 10 and 14
    resumed, resumed_pruner, _ = _run(24, batches, resume_from=checkpoint)
    assert [r.step for r in resumed_pruner.history] == [r.step for r in whole_pruner.history] == [2, 6, 10, 14, 18, 20]
    assert resumed_pruner.history == whole_pruner.history
    for n in whole_pruner.layers:
        assert torch.equal(resumed.mask(n), whole.mask(n)), n
        assert torch.equal(resumed_pruner.layers[n].weight, whole_pruner.layers[n].weight), n
    # right after loading, each layer's pattern is its sparsity at the update at step 10 again
    cm, pruner, _ = _run(0, batches, resume_from=checkpoint)
    s10 = _schedule(0.5, 0.9, 10, 2, 20)
    assert pruner.steps == 11 and cm.sparse_module("2").pattern.sparsity == pytest.approx(s10, abs=1e-12)


def test_resume_refuses_another_schedule_a_model_state_left_out_and_no_state():
    batches = _batches(11)
    _, pruner, checkpoint = _run(11, batches)
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    cm = _compile()
    with pytest.raises(ValueError, match=r"another schedule or model \(every: saved 4, this pruner 5\)"):
        GradualPruning(cm, 0.9, start_step=2, end_step=20, every=5).load_state_dict(state["pruner"])
    with pytest.raises(ValueError, match=r"final: saved \{'0': 0.9, '2': 0.9, '4': 0.9\}, this pruner \{'0': 0.9, '2': 0.8"):
        GradualPruning(cm, {"2": 0.8, ".*": 0.9}, start_step=2, end_step=20, every=4).load_state_dict(state["pruner"])
    fresh = GradualPruning(cm, 0.9, start_step=2, end_step=20, every=4)
    with pytest.raises(ValueError, match=r"masks do not match this state at step 11 \('0' holds 512, .* load the model's state"):
        fresh.load_state_dict(state["pruner"])  # the model's state (its masks) was not loaded first
    with pytest.raises(ValueError, match="not a GradualPruning state"):
        fresh.load_state_dict({})
    # ... and without the pruner's state, its first update refuses masks smaller than its schedule's
    cm.load_state_dict(state["model"])
    fresh.steps = 1
    with pytest.raises(ValueError, match=r"step 2: layer '0' is to keep 512 weights \(unstructured:0.5\) but its mask "
                                         r"holds \d+: .* call pruner.load_state_dict"):
        fresh.step()


def test_a_frozen_layer_is_left_alone():
    cm = _compile()
    frozen = cm.sparse_module("2").weight
    frozen.requires_grad_(False)
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    pruner = GradualPruning(cm, 0.9, end_step=4, every=2, optimizer=opt)
    mask0, weight0 = cm.mask("2"), frozen.detach().clone()
    for x, y in _batches(4):
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert all("frozen" in r.skipped["2"] and "2" not in r.layers for r in pruner.history)
    assert torch.equal(cm.mask("2"), mask0) and torch.equal(frozen, weight0)
    assert int((~cm.mask("0")).sum()) == unstructured_pruned_count(1024, 0.9)


def test_an_update_on_weights_that_are_not_finite_changes_no_mask():
    """A diverged run's magnitudes rank nothing: the update is skipped with a warning (as SRigL's), not run
    on NaN, which compares false and pruned by position; the next update prunes to its own step's sparsity."""
    cm = _compile()
    opt = torch.optim.SGD(cm.parameters(), lr=0.05)
    pruner = GradualPruning(cm, 0.9, end_step=4, every=2, optimizer=opt)
    masks = {name: cm.mask(name) for name in pruner.layers}
    with torch.no_grad():
        cm.sparse_module("2").weight[0, cm.mask("2")[0].nonzero()[0]] = float("nan")
    pruner.step()
    with pytest.warns(UserWarning, match=r"GradualPruning step 2: weights not finite in \['2'\]"):
        record = pruner.step()
    assert not record.layers and "not finite" in record.skipped["0"]
    assert all(torch.equal(cm.mask(name), mask) for name, mask in masks.items())
    with torch.no_grad():
        cm.sparse_module("2").weight.nan_to_num_(0.0)
    pruner.step()
    assert pruner.step().layers["2"]["kept"] == 4096 - unstructured_pruned_count(4096, 0.9)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(final_sparsity=0.9, end_step=10, start_step=10), ValueError, r"0 <= start_step < end_step .* start_step=10, end_step=10"),
    (dict(final_sparsity=0.9, end_step=10, start_step=-1), ValueError, "start_step=-1"),
    (dict(final_sparsity=0.9, end_step=10, every=0), ValueError, "every >= 1 .* every=0"),
    (dict(final_sparsity=0.9, end_step=10.5), TypeError, "end_step must be an int, got float 10.5"),
    (dict(final_sparsity=1.0, end_step=10), ValueError, r"final_sparsity must lie in \(0, 1\) .* got 1.0"),
    (dict(final_sparsity=float("nan"), end_step=10), ValueError, r"final_sparsity must lie in \(0, 1\)"),
    (dict(final_sparsity="0.9", end_step=10), TypeError, "final_sparsity must be a float in .* got str '0.9'"),
    (dict(final_sparsity=0.3, end_step=10), ValueError,
     r"below a layer's compiled sparsity .* layer '0': 0.3 < unstructured:0.5.* in \[its compiled sparsity, 1\)"),
    (dict(final_sparsity={"fc9": 0.9}, end_step=10), ValueError,
     r"final_sparsity\['fc9'\] matches no unstructured layer; those are \['0', '2', '4'\]"),
    (dict(final_sparsity={".*": 0.9, "2": 0.95}, end_step=10), ValueError,
     r"final_sparsity\['2'\] sets no layer: every layer it matches \(\['2'\]\) is taken by an earlier key"),
    (dict(final_sparsity={}, end_step=10), ValueError, "empty dict"),
    (dict(final_sparsity={"2": 1.5}, end_step=10), ValueError, r"final_sparsity\['2'\] must lie in \(0, 1\)"),
    (dict(final_sparsity={2: 0.9}, end_step=10), TypeError, "keys are layer names or regexes"),
])
def test_bad_arguments(kwargs, error, match):
    cm = _compile()
    with pytest.raises(error, match=match):
        GradualPruning(cm, **kwargs)


def test_refuses_models_and_optimizers_it_cannot_drive():
    cm = _compile()
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="got the optimizer SGD: pass it as optimizer="):
        GradualPruning(cm, opt, end_step=10)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got list"):
        GradualPruning(cm, 0.9, end_step=10, optimizer=[opt])
    with pytest.raises(ValueError, match=r"does not hold the weights of \['2'"):
        GradualPruning(cm, 0.9, end_step=10, optimizer=torch.optim.SGD(cm.sparse_module("0").parameters(), lr=0.1))
    plain = _mlp()
    with pytest.raises(TypeError, match="needs a sparsec.CompiledModel, got Sequential.*compile the model first"):
        GradualPruning(plain, 0.9, end_step=10)
    fanin = sparsec.compile(_mlp(), pattern="fanin:0.5", example_inputs=(torch.randn(2, 16),), train=True)
    with pytest.raises(ValueError, match=r"needs unstructured layers: compile with pattern='unstructured:S' and "
                                         r"train=True; this model has none: 0: dense \(kept dense: first layer"):
        GradualPruning(fanin, 0.9, end_step=10)
    # a layer the default policy kept dense is named with the reason
    default = sparsec.compile(_mlp(), pattern="unstructured:0.5", example_inputs=(torch.randn(2, 16),), train=True)
    with pytest.raises(ValueError, match=r"\['0'\] matches no unstructured layer; those are \['2'\]; it names '0' "
                                         r"\(dense: kept dense: first layer"):
        GradualPruning(default, {"0": 0.9}, end_step=10)
    ste = _compile(weight_update="ste")
    with pytest.raises(ValueError, match="GradualPruning owns the masks; layers .* weight_update='ste'"):
        GradualPruning(ste, 0.9, end_step=10)


def test_method_d_digits_example_runs_and_checks_its_models(tmp_path):
    """examples/train_method_d_digits.py (gradual pruning, then each quantization) checks every model it makes
    against plain torch and its masks and levels against their definitions; one epoch here."""
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    from oracle import EXAMPLES

    env = {**os.environ, "SPARSEC_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "train_method_d_digits.py"), "--epochs", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = tmp_path.glob("method-d-digits-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["config"] for r in rows][:2] == ["dense", "unstructured 0.9 float32"] and len(rows) == 13
    assert all(r["compressed_ratio"] < 0.25 for r in rows[1:])
