"""load_state_dict refuses what is not a form of the layer it would load into, before copying anything:
N:M metadata of another pattern or corrupt, fan-in indices that do not decode, a dense-stored weight
nonzero where its mask prunes, a training mask of another pattern, buffers of another shape. Each case
was loaded silently before (the layer then computed neither model) or failed only at the next forward."""
import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import InvalidInputError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


X = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


def _compile(pattern: str, backend: str = "torch", quantize: str | None = None, **options):
    torch.manual_seed(0)
    model = MLP().eval()
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(X,), include=["fc2"], quantize=quantize)
    for lp in plan:
        if lp.sparsity:
            lp.backend, lp.launch = backend, None
    return sparsec.compile(model, example_inputs=(X,), plan=plan, **options)


def _refused(cm, state: dict, match: str) -> None:
    """The load raises naming the layer, and leaves every tensor of the model as it was."""
    before = {k: v.clone() for k, v in cm.state_dict().items()}
    with pytest.raises(InvalidInputError, match=match) as caught:
        cm.load_state_dict(state)
    assert "'fc2'" in str(caught.value)
    after = cm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("saved, loading", [("1:4", "2:8"), ("1:2", "4:8"), ("2:8", "1:4")])
@pytest.mark.parametrize("backend", ["torch", "bitmask"])
def test_another_n_m_patterns_state_dict_of_the_same_shapes_is_refused(saved, loading, backend):
    source, target = _compile(saved, backend), _compile(loading, backend)
    assert source.state_dict()["graph_module.fc2.packed.values"].shape == \
        target.state_dict()["graph_module.fc2.packed.values"].shape  # (torch's own shape check passes)
    _refused(target, source.state_dict(), "metadata does not decode")


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_corrupt_n_m_metadata_is_refused(pattern):
    cm = _compile(pattern)
    state = cm.state_dict()
    meta = state["graph_module.fc2.packed.meta"]
    n, m = map(int, pattern.split(":"))
    # 2:4: nibble 0 is i0 = i1 = 0; otherwise a position M is out of every group
    state["graph_module.fc2.packed.meta"] = torch.zeros_like(meta) if (n, m) == (2, 4) else torch.full_like(meta, m)
    _refused(cm, state, rf"corrupt {n}:{m} metadata: kept positions must lie in \[0, {m}\)")


def test_another_n_m_pattern_of_other_shapes_names_the_layer():
    _refused(_compile("1:4"), _compile("2:4").state_dict(), r"packed.values of shape \(128, 32\) here and \(128, 64\)")


@pytest.mark.parametrize("backend", ["torch", "condensed"])
@pytest.mark.parametrize("damage, match", [
    (lambda t: t.clone().fill_(3), "ascend"), (lambda t: t.flip(-1).contiguous(), "ascend"),
    (lambda t: t.clone().fill_(128), r"lie in \[0, 128\)"), (lambda t: t.clone().fill_(-1), r"lie in \[0, 128\)")])
def test_fan_in_indices_that_do_not_decode_are_refused(backend, damage, match):
    cm = _compile("fanin:0.9", backend)
    state = cm.state_dict()
    state["graph_module.fc2.packed.indices"] = damage(state["graph_module.fc2.packed.indices"])
    _refused(cm, state, f"corrupt fan-in weight: .*{match}")


def test_fan_in_indices_repeated_out_of_order_are_refused():
    cm = _compile("fanin:0.9")
    state = cm.state_dict()
    indices = state["graph_module.fc2.packed.indices"].clone()
    indices[:, -1] = indices[:, 0]  # the first column again, last: not ascending
    state["graph_module.fc2.packed.indices"] = indices
    _refused(cm, state, "corrupt fan-in weight")


def test_ragged_fan_in_padding_must_hold_zero():
    cm = _compile("fanin:0.9")
    packed = cm.graph_module.fc2.packed
    mask = cm.mask("fc2").clone()
    mask[0] = False  # an ablated neuron: stored ragged, its row all padding
    ragged = type(packed).pack(cm.graph_module.fc2.weight.detach() * mask, mask, sparsec.patterns.FanIn(0.9), None)
    assert ragged.row_counts is not None and int(ragged.row_counts[0]) == 0
    cm.graph_module.fc2.packed = ragged
    state = cm.state_dict()
    cm.load_state_dict(state)  # its own state loads
    values = state["graph_module.fc2.packed.values"].clone()
    values[0, 0] = 1.0
    _refused(cm, dict(state, **{"graph_module.fc2.packed.values": values}), "padding entries")


def test_dense_stored_weight_nonzero_where_pruned_is_refused():
    cm = _compile("2:4", "dense")
    state = cm.state_dict()
    assert "graph_module.fc2.packed.mask_bits" in state
    unpruned = state["graph_module.fc2.packed.values"].clone()
    unpruned[~cm.mask("fc2")] = 0.5
    _refused(cm, dict(state, **{"graph_module.fc2.packed.values": unpruned}), "nonzero where its mask says pruned")


@pytest.mark.parametrize("saved", ["fanin:0.9", "unstructured:0.9"])
@pytest.mark.parametrize("weight_update", ["fixed", "ste"])
def test_training_mask_of_another_pattern_is_refused(saved, weight_update):
    source = _compile(saved, train=True)
    target = _compile("2:4", train=True, weight_update=weight_update)
    _refused(target, source.state_dict(), r"trains 2:4 weights, but this state dict's mask .* keeps \[")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_dense_stored_layer_refuses_another_quantizations_state_dict(dtype):
    """Backend "dense" keeps an int8 layer's weight dequantized: in the keys an unquantized layer has, each
    state dict loaded silently into the other, and the plan said int8 of float weights (or the reverse). The
    int8 layer now keeps its scales, which tell the two apart."""
    plain = _compile("2:4", "dense").to(dtype)
    int8 = _compile("2:4", "dense", quantize="int8").to(dtype)
    assert int8.plan["fc2"].quant == "int8" and "graph_module.fc2.packed.scales" in int8.state_dict()
    assert int8.state_dict()["graph_module.fc2.packed.scales"].dtype == torch.float32
    _refused(int8, plain.state_dict(), "dense-stored weight is not int8 values .* holds no int8 scales")
    _refused(plain, int8.state_dict(), "with int8 scales beside it, but this layer's weight is not quantized")
    again = _compile("2:4", "dense", quantize="int8").to(dtype)
    again.load_state_dict(int8.state_dict())
    assert torch.equal(again.effective_weight("fc2"), int8.effective_weight("fc2"))


def test_a_dense_stored_int8_state_dict_saved_without_scales_still_loads():
    """Saved before the scales were kept: accepted where its values are int8 values, the scales rebuilt."""
    source, target = _compile("2:4", "dense", quantize="int8"), _compile("2:4", "dense", quantize="int8")
    state = source.state_dict()
    scales = state.pop("graph_module.fc2.packed.scales")
    with torch.no_grad():
        target.graph_module.fc2.packed.scales.fill_(1.0)
    assert not target.load_state_dict(state).missing_keys
    assert torch.equal(target.graph_module.fc2.packed.scales, scales)
    assert torch.equal(target(X), source(X))


def test_own_state_dicts_still_load_exactly():
    for pattern, backend, options in [("2:4", "torch", {}), ("4:8", "bitmask", {}), ("fanin:0.9", "condensed", {}),
                                      ("2:4", "dense", {}), ("2:4", "dense", dict(quantize="int8")),
                                      ("2:4", "torch", dict(train=True))]:
        source, target = _compile(pattern, backend, **options), _compile(pattern, backend, **options)
        with torch.no_grad():
            for p in source.parameters():
                p.mul_(1.5)  # (a trained model: its state differs from the fresh compile it loads into)
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(X), source(X)), (pattern, backend)


@pytest.mark.parametrize("pattern, packed", [("2:4", "N:M packed values"), ("fanin:0.5", "condensed fan-in values"),
                                             ("unstructured:0.5", "CSR values")])
def test_a_state_dict_of_the_other_stored_form_is_refused_naming_both(pattern, packed):
    """A layer auto kept dense on one machine (its pruned weight and a bitmask) and packed on another: each
    form's keys say which it is (the keys the check reads are checked here against the real buffers)."""
    dense, compressed = _compile(pattern, "dense"), _compile(pattern, "torch")
    kept_dense = "the pruned weight kept dense"
    _refused(compressed, dense.state_dict(), f"stored here as {packed} .* in this state dict as {kept_dense}")
    _refused(dense, compressed.state_dict(), f"stored here as {kept_dense} .* in this state dict as {packed}")


def test_a_dense_int8_model_saved_without_scales_loads_with_them(tmp_path):
    """A file saved before dense int8 layers kept their scales: loaded, its layer rebuilds them, so it takes a
    current state dict (torch raised "Unexpected key(s) ... packed.scales") and holds what its plan counts."""
    old = _compile("2:4", "dense", quantize="int8")
    packed = old.graph_module.fc2.packed
    scales = packed.scales.clone()
    packed.scales = None  # (as such a file holds the layer)
    sparsec.save(old, tmp_path / "old.sparsec")
    loaded = sparsec.load(tmp_path / "old.sparsec")
    assert torch.equal(loaded.graph_module.fc2.packed.scales, scales)
    assert loaded.plan["fc2"].runtime_bytes == loaded.plan["fc2"].stored_bytes()
    loaded.load_state_dict(_compile("2:4", "dense", quantize="int8").state_dict())
    assert torch.equal(loaded(X), old(X))
