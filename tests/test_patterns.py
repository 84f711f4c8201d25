import pytest

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
