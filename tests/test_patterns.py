import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.errors import InvalidInputError, InvalidTypeError
from sparsec.patterns import NM, Dense, FanIn, parse_pattern


@pytest.mark.parametrize("text, expected", [
    ("2:4", NM(2, 4)), ("1:4", NM(1, 4)), ("4:8", NM(4, 8)), ("4:4", NM(4, 4)),
    ("fanin:0.9", FanIn(0.9)), ("fanin:0.5", FanIn(0.5)), ("dense", Dense()), (" 2:4 ", NM(2, 4)),
])
def test_valid_patterns(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected


@pytest.mark.parametrize("text", ["3:2", "0:4", "2:4:8", "fanin:1.5", "fanin:0", "fanin:1", "fanin:x", "", "2:0",
                                  "-1:4", "2/4", "fanin:nan", "Dense"])
def test_invalid_patterns_name_the_accepted_forms(text):
    with pytest.raises(InvalidInputError) as err:
        parse_pattern(text)
    assert isinstance(err.value, ValueError)
    assert '"N:M"' in str(err.value) and "fanin:S" in str(err.value) and "dense" in str(err.value)


@pytest.mark.parametrize("value", [None, 2, 0.5, ["2:4"], (2, 4)])
def test_non_string_patterns(value):
    """Wrong type, so a TypeError; and like every pattern outside the accepted forms, a ValueError."""
    with pytest.raises(InvalidTypeError, match="pattern must be a string"):
        parse_pattern(value)
    with pytest.raises(ValueError, match="accepted: "):
        parse_pattern(value)


def test_fanin_k():
    # k = max(1, floor(numel * (1 - S)) // out)
    assert FanIn(0.9).k(768 * 3072, 768) == 307
    assert FanIn(0.99).k(4 * 10, 4) == 1


@pytest.mark.parametrize("sparsity", [0.9999995, 0.12345649, 1e-7, 0.1 + 0.2, 0.9])
def test_fanin_text_keeps_the_exact_sparsity(sparsity):
    """The plan stores str(pattern) and masks are computed from that text: "%g" rounded it to 6 digits
    (0.9999995 -> the invalid "fanin:1"; 0.12345649 -> 0.123456, a different k on a 1e6-weight row)."""
    pattern = FanIn(sparsity)
    assert parse_pattern(str(pattern)) == pattern
    assert parse_pattern(str(pattern)).k(10**6, 1) == max(1, math.floor(10**6 * (1 - sparsity)))


def test_fanin_near_one_compiles():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(2, 8)
    cm = sparsec.compile(model, pattern="fanin:0.9999995", example_inputs=(x,), min_weights=0, backend="torch")
    (lp,) = cm.plan.sparse_layers
    assert parse_pattern(lp.sparsity) == FanIn(0.9999995)
    assert cm.mask(lp.name).sum(dim=1).tolist() == [1] * 8  # k = max(1, floor(64 * 5e-7) // 8) = 1
    w = model[2].weight.detach()
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().argmax(dim=1, keepdim=True), True)
    with torch.no_grad():
        hidden = torch.relu(F.linear(torch.relu(model[0](x)), w * keep, model[2].bias))
        assert torch.allclose(cm(x), model[4](hidden), atol=1e-6)


@pytest.mark.parametrize("pattern, kept", [("2:16", "12.5%"), ("1:32", "3.12%"), ("3:7", "42.9%"), ("2:4", "50%"),
                                           ("8:8", "100%")])
def test_the_reason_states_the_kept_fraction(pattern, kept):
    # ":.0f" said 2:16 keeps 12% and 1:32 keeps 3% of weights (1:256: 0%)
    model = nn.Sequential(nn.Linear(8, 224), nn.ReLU(), nn.Linear(224, 16), nn.ReLU(), nn.Linear(16, 4))
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(torch.randn(2, 8),), min_weights=0,
                           backend="torch")
    lp = plan["2"]
    assert lp.sparsity == pattern and f"keeps {kept} of weights" in lp.reason, lp.reason
    n, m = map(int, pattern.split(":"))
    assert abs(float(kept[:-1]) - 100 * n / m) < 0.05 * 100 * n / m  # the stated number is the real fraction
