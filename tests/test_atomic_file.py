"""sparsec.atomic_file: the file is replaced whole or not at all, and no temporary file is left behind."""
import os

import pytest

from sparsec.atomic_file import replaced_on_success


def test_replaces_the_file_when_the_block_succeeds(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with replaced_on_success(str(path), suffix=".json") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(path)
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # (a reader sees the old file until the block ends)
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="half way"):
        with replaced_on_success(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise ValueError("half way")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_two_writers_of_one_path_get_their_own_temporary_files(tmp_path):
    path = str(tmp_path / "out.json")
    with replaced_on_success(path) as first, replaced_on_success(path) as second:
        assert first != second
        for name, text in ((first, "first"), (second, "second")):
            with open(name, "w") as f:
                f.write(text)
    with open(path) as f:
        assert f.read() == "first"  # (the outer block ends last: its rename wins, whole)
    assert os.listdir(tmp_path) == ["out.json"]
