import json

import pytest

from sparsec import LayerPlan, Plan
from sparsec.errors import CorruptFileError, InvalidInputError


def _plan() -> Plan:
    return Plan(layers=[
        LayerPlan("fc1", "linear", (64, 32), None, None, None, "kept dense: first layer", "float32", 4096),
        LayerPlan("fc2", "linear", (64, 64), "2:4", "int8", None, "2:4 ...", "float32", 8192),
        LayerPlan("conv", "conv2d", (16, 8, 3, 3), "fanin:0.75", None, "2:4", "fan-in", "float16", None),
        LayerPlan("w", "matmul", (64, 32), "1:4", None, None, "1:4", "float32", 100),
    ], pattern="2:4", notes=["a note"])


def test_json_round_trip():
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert isinstance(again["fc1"].weight_shape, tuple)


def test_derived_numbers():
    plan = _plan()
    assert plan["fc2"].kept == 64 * 64 // 2
    assert plan["conv"].kept == 16 * (16 * 8 * 9 // 4 // 16)  # k = floor(numel*0.25)//out per row
    assert plan["w"].out_features == 32 and plan["w"].reduction == 64 and plan["w"].kept == 64 * 32 // 4
    # int8 2:4: 1 byte per kept value + int16 nibble words (ceil(64/16) per row) + fp32 scale per row
    assert plan["fc2"].stored_bytes() == 2048 + 64 * 4 * 2 + 64 * 4
    t = plan.totals()
    assert t["weights"] == sum(lp.numel for lp in plan) and t["sparse_layers"] == 3
    assert t["flops_dense"] == 4096 + 8192 + 100
    assert t["flops_saved"] == pytest.approx(8192 / 2 + 100 * 3 / 4)


def test_table_lists_every_layer_with_reason_and_totals():
    text = str(_plan())
    for lp in _plan():
        assert lp.name in text and lp.reason in text
    assert "totals:" in text and "weight bytes" in text and "FLOPs saved" in text
    assert "grad" in text.splitlines()[1]  # gradient column shown because a layer has grad_sparsity
    assert "note: a note" in text


def test_lookup_errors_list_names():
    with pytest.raises(KeyError, match="fc1"):
        _plan()["nope"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a sparsec plan"),
    ('{"format": "sparsec.plan", "version": 99, "layers": []}', "unsupported plan version"),
    ('{"format": "sparsec.plan", "version": 1, "layers": [{"name": "a"}]}', "missing fields"),
])
def test_corrupt_json(text, match):
    with pytest.raises(CorruptFileError, match=match):
        Plan.from_json(text)


def test_invalid_entries_are_rejected():
    data = json.loads(_plan().to_json())
    data["layers"][1]["sparsity"] = "3:2"
    with pytest.raises(InvalidInputError, match="fc2"):
        Plan.from_json(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["layers"][1]["quant"] = "int4"
    with pytest.raises(InvalidInputError, match="quant"):
        Plan.from_json(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["layers"][1]["name"] = "fc1"
    with pytest.raises(InvalidInputError, match="twice"):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("field, value, match", [
    ("backend", "cuda", r"backend 'cuda' not in \("),
    ("sparsity", "dense", "'dense' is spelled None in a plan"),
    ("grad_sparsity", "dense", "'dense' is spelled None in a plan"),
    ("grad_sparsity", "2:3:4", "bad grad_sparsity"),
    ("sparsityy", "2:4", r"unknown fields \['sparsityy'\]"),  # a misspelt field is not silently dropped
])
def test_misspelt_or_misplaced_entries_name_the_layer(field, value, match):
    data = json.loads(_plan().to_json())
    data["layers"][1][field] = value
    with pytest.raises((InvalidInputError, CorruptFileError), match=match) as info:
        Plan.from_json(json.dumps(data))
    assert "fc2" in str(info.value)
