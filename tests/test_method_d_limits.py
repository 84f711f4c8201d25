"""Two limits of method (d) lifted:

1. A learned mask compiled again (a fixed-mask layer after shrink, a gradually pruned model, a condensed
   fan-in model, a packed layer compiled again) is counted in the plan from the mask, not estimated from
   the pattern string on the layer's (new) shape: kept weights, bytes and FLOPs say what the layer holds.
2. A level table says which form made it (log2:B and codebook:B tables have disjoint layouts): a log2 state
   dict loaded into a codebook layer of the same B is refused naming both forms, as the reverse was, also
   for layers stored dense (backend "dense"), which keep their table for this.

Every count is checked against plain torch: the mask sliced by hand and counted with torch, the packed
buffers' bytes summed from the state dict, the table layouts written out by hand."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import output_error
from sparsec.errors import InvalidInputError
from sparsec.levels import quantize_levels, table_form
from sparsec.patterns import FanIn, Unstructured
from sparsec.runtime.packed import DensePacked


class MLP(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, width), nn.Linear(width, width)
        self.fc3, self.fc4 = nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x):
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def _trained(pattern, **options):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 32)
    return sparsec.compile(model, pattern=pattern, example_inputs=(x,), train=True, min_weights=16, **options), x


ZEROED = {"fc2": list(range(0, 40, 2)), "fc3": list(range(1, 30, 3))}  # output rows zeroed by hand


def _zero_rows(cm):
    with torch.no_grad():
        for name, rows in ZEROED.items():
            cm.sparse_module(name).weight[rows] = 0


def _expected_masks(cm):
    """The masks shrink must leave, sliced by hand from the masks before it: the zeroed rows go, and with
    fc2's rows the matching input columns of fc3."""
    keep2 = [r for r in range(64) if r not in ZEROED["fc2"]]
    keep3 = [r for r in range(64) if r not in ZEROED["fc3"]]
    return {"fc2": cm.mask("fc2").clone()[keep2], "fc3": cm.mask("fc3").clone()[keep3][:, keep2]}


def _inference(trained, x, backend):
    """`trained` compiled again for inference (keeping its masks), every sparse layer on `backend`."""
    plan = sparsec.explain(trained, example_inputs=(x,), backend="torch")
    for lp in plan.sparse_layers:
        lp.backend = backend
    return sparsec.compile(trained, example_inputs=(x,), plan=plan)


def _packed_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.packed.state_dict().values())


# --------------------------------------------------------------------------- 1. counts from the mask


def test_shrunk_unstructured_layers_are_counted_from_their_masks():
    cm, x = _trained("unstructured:0.9")
    _zero_rows(cm)
    expected = _expected_masks(cm)
    small = sparsec.shrink(cm)
    for name, mask in expected.items():
        count = int(mask.sum())
        lp = small.plan[name]
        assert lp.weight_shape == tuple(mask.shape)
        assert count != Unstructured(0.9).kept(mask.numel())  # (the estimate this replaces would be wrong here)
        assert lp.kept == count and f"its mask keeps {count} of {mask.numel()} weights" in lp.reason
        assert torch.equal(small.mask(name), mask)
    for backend in ("torch", "csr", "dense"):
        inference = _inference(small, x, backend)
        with torch.no_grad():
            assert output_error(inference(x), small(x)) <= 1e-5
        dense_kept = sum(lp.numel for lp in inference.plan if not lp.sparsity)
        assert inference.plan.totals()["weights_kept"] == dense_kept + sum(int(m.sum()) for m in expected.values())
        for name, mask in expected.items():
            lp = inference.plan[name]
            assert lp.kept == int(mask.sum()) and f"{int(mask.sum())} of {mask.numel()} weights" in lp.reason
            assert lp.mask_kept == int(mask.sum())
            if backend == "torch":  # the bytes the plan counts are the bytes the packed layer holds
                assert lp.stored_bytes() == _packed_bytes(inference.sparse_module(name)) == lp.runtime_bytes
        # compiled again, the packed layers are counted from what they hold, too
        again = sparsec.compile(inference, example_inputs=(x,))
        assert [again.plan[n].kept for n in expected] == [int(m.sum()) for m in expected.values()]


def test_gradually_pruned_then_shrunk_masks_are_counted_and_a_new_pattern_drops_the_count():
    cm, x = _trained("unstructured:0.5")
    opt = torch.optim.SGD(cm.parameters(), lr=0.01)
    pruner = sparsec.GradualPruning(cm, 0.9, start_step=0, end_step=4, every=2, optimizer=opt)
    for _ in range(4):
        cm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert cm.plan["fc2"].sparsity == "unstructured:0.9"
    _zero_rows(cm)
    expected = _expected_masks(cm)
    small = sparsec.shrink(cm)
    inference = sparsec.compile(small, example_inputs=(x,), backend="torch")
    for name, mask in expected.items():
        assert small.plan[name].kept == inference.plan[name].kept == int(mask.sum())
        assert int(mask.sum()) != Unstructured(0.9).kept(mask.numel())
        assert inference.plan[name].stored_bytes() == _packed_bytes(inference.sparse_module(name))
    # pruning the shrunk model further: its plan says the new pattern, whose count the mask then has
    pruner = sparsec.GradualPruning(small, 0.95, start_step=0, end_step=1, every=1)
    pruner.step()
    for name in expected:
        lp = small.plan[name]
        assert lp.sparsity == "unstructured:0.95" and lp.mask_kept is None
        assert lp.kept == int(small.mask(name).sum()) == Unstructured(0.95).kept(lp.numel)


def test_condensed_ragged_fanin_layers_are_counted_from_their_masks():
    """condense removes input columns where the fan-in mask keeps weights (ragged rows): the pattern's k on the
    new shape is not what each row holds."""
    cm, x = _trained("fanin:0.75")
    _zero_rows(cm)
    keep2 = [r for r in range(64) if r not in ZEROED["fc2"]]
    keep3 = [r for r in range(64) if r not in ZEROED["fc3"]]
    fc3 = cm.mask("fc3").clone()[keep3][:, keep2]
    condensed = cm.condense(example_inputs=(x,), backend="torch")
    with torch.no_grad():
        assert output_error(condensed(x), cm(x)) <= 1e-5
    lp = condensed.plan["fc3"]
    assert lp.weight_shape == tuple(fc3.shape) and torch.equal(condensed.mask("fc3"), fc3)
    pattern = FanIn(0.75)
    assert int(fc3.sum()) != fc3.shape[0] * pattern.k(fc3.numel(), fc3.shape[0])
    assert lp.kept == int(fc3.sum())


def test_nm_masks_compiled_again_count_what_they_hold():
    """N:M: shrink removes input columns in whole aligned groups, so the count stays N/M of the new shape."""
    cm, x = _trained("2:4")
    with torch.no_grad():
        cm.sparse_module("fc2").weight[:16] = 0  # four whole groups of fc3's inputs
        cm.sparse_module("fc3").weight[ZEROED["fc3"]] = 0
    keep3 = [r for r in range(64) if r not in ZEROED["fc3"]]
    expected = {"fc2": cm.mask("fc2").clone()[16:], "fc3": cm.mask("fc3").clone()[keep3][:, 16:]}
    inference = sparsec.compile(sparsec.shrink(cm), example_inputs=(x,), backend="torch")
    for name, mask in expected.items():
        assert torch.equal(inference.mask(name), mask)
        assert inference.plan[name].kept == int(mask.sum()) == mask.numel() // 2
        assert inference.plan[name].stored_bytes() == _packed_bytes(inference.sparse_module(name))


def test_mask_kept_round_trips_and_is_checked():
    cm, x = _trained("unstructured:0.9")
    _zero_rows(cm)
    plan = sparsec.compile(sparsec.shrink(cm), example_inputs=(x,), backend="torch").plan
    again = sparsec.Plan.from_json(plan.to_json())
    assert [lp.kept for lp in again] == [lp.kept for lp in plan] and again["fc2"].mask_kept is not None
    edited = copy.deepcopy(plan)
    edited["fc2"].sparsity = "unstructured:0.95"  # another pattern: another mask, counted by the pattern
    assert edited["fc2"].mask_kept is None and edited["fc2"].kept == Unstructured(0.95).kept(edited["fc2"].numel)
    bad = copy.deepcopy(plan)
    bad["fc2"].mask_kept = bad["fc2"].numel + 1
    with pytest.raises(InvalidInputError, match="mask_kept"):
        bad.validate()


# --------------------------------------------------------------------------- 2. the form of a level table


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(6, 48)


def _compiled(model, x, backend, quantize):
    plan = sparsec.explain(model, pattern="unstructured:0.9", example_inputs=(x,), quantize=quantize, include=[".*"],
                           min_weights=0, backend="torch")
    for lp in plan:
        lp.backend = backend
    return sparsec.compile(model, example_inputs=(x,), plan=plan)


def _log2_layout(powers, bits):
    """A log2:bits table written out by hand: the powers, zeros, their negatives, zeros."""
    per_sign = (2 ** bits - 2) // 2
    table = torch.zeros(2 ** bits)
    table[1:1 + len(powers)] = torch.tensor(powers)
    table[per_sign + 1:per_sign + 1 + len(powers)] = -torch.tensor(powers)
    return table


def test_table_layouts_tell_the_forms_apart():
    assert table_form(_log2_layout([0.25, 0.5, 1.0], 4), 4) == "log2"
    assert table_form(torch.tensor([0.0, -1.0, 0.5, 2.0] + [0.0] * 12), 4) == "codebook"
    assert table_form(torch.tensor([0.0, -2.0, 0.5, 4.0] + [0.0] * 12), 4) == "codebook"  # powers, ascending
    assert table_form(torch.zeros(16), 4) == "zero"
    assert table_form(torch.tensor([0.0, 2.0, -1.0] + [0.0] * 13), 4) is None  # neither
    torch.manual_seed(1)
    for bits in (2, 4, 8):
        for w in (torch.randn(300), torch.rand(300) + 0.1, -torch.rand(300) - 0.1, torch.randn(300).sign() * 2.0 ** torch.randint(-3, 3, (300,))):
            assert table_form(quantize_levels(w, f"log2:{bits}")[1], bits) == "log2"
            assert table_form(quantize_levels(w, f"codebook:{bits}")[1], bits) == "codebook"


@pytest.mark.parametrize("backend", ["torch", "csr", "dense"])
def test_a_log2_state_dict_is_refused_by_a_codebook_layer_naming_both_forms(backend):
    model, x = _mlp()
    log2, codebook = _compiled(model, x, backend, "log2:4"), _compiled(model, x, backend, "codebook:4")
    assert {lp.backend for lp in codebook.plan} == {backend}
    for source, target in ((log2, codebook), (codebook, log2)):
        for strict in (True, False):
            model_before = {k: v.clone() for k, v in target.state_dict().items()}
            with pytest.raises(InvalidInputError, match=r"(?s)log2:4.*codebook:4|codebook:4.*log2:4") as info:
                target.load_state_dict(source.state_dict(), strict=strict)
            assert "not powers of two" in str(info.value) or "is a log2:4 table" in str(info.value)
            assert all(torch.equal(model_before[k], v) for k, v in target.state_dict().items())  # nothing copied
    for cm in (log2, codebook):  # each loads its own, also through torch.save / torch.load(weights_only=True)
        fresh = copy.deepcopy(cm)
        buffer = io.BytesIO()
        torch.save(cm.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        with torch.no_grad():
            assert torch.equal(fresh(x), cm(x))


def test_dense_stored_levels_keep_their_table_and_the_plan_counts_it():
    model, x = _mlp()
    cm = _compiled(model, x, "dense", "codebook:3")
    for lp in cm.plan:
        packed = cm.sparse_module(lp.name).packed
        assert isinstance(packed, DensePacked) and table_form(packed.table, 3) == "codebook"
        w = cm.effective_weight(lp.name)
        assert bool(torch.isin(w[w != 0], packed.table).all())  # the values are the table's levels
        assert lp.stored_bytes() == _packed_bytes(cm.sparse_module(lp.name)) == lp.runtime_bytes


def test_dense_state_dicts_without_a_table_load_where_their_values_fit_the_form(tmp_path):
    model, x = _mlp()
    codebook, plain = _compiled(model, x, "dense", "codebook:4"), _compiled(model, x, "dense", None)
    old = {k: v for k, v in codebook.state_dict().items() if not k.endswith("packed.table")}  # as saved before
    target = copy.deepcopy(codebook)
    with torch.no_grad():
        for lp in target.plan:  # (a table to rebuild: the loaded one must come from the values)
            target.sparse_module(lp.name).packed.table.zero_()
    target.load_state_dict(old)  # strict: the missing table is no missing key
    for lp in codebook.plan:
        assert torch.equal(target.sparse_module(lp.name).packed.table, codebook.sparse_module(lp.name).packed.table)
    with torch.no_grad():
        assert torch.equal(target(x), codebook(x))
    # an unquantized dense weight is no codebook: refused, whether or not it says so with a table
    with pytest.raises(InvalidInputError, match="not codebook:4 levels"):
        copy.deepcopy(codebook).load_state_dict(plain.state_dict())
    with pytest.raises(InvalidInputError, match="level table beside it"):
        copy.deepcopy(plain).load_state_dict(codebook.state_dict(), strict=False)
    # sparsec.save / sparsec.load of a dense-stored levels model
    sparsec.save(codebook, tmp_path / "m.sparsec")
    loaded = sparsec.load(tmp_path / "m.sparsec")
    with torch.no_grad():
        assert torch.equal(loaded(x), codebook(x))
    loaded.load_state_dict(codebook.state_dict())
