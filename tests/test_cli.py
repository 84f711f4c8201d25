"""`sparsec inspect` on example files."""
import json
import os
import subprocess
import sys

import pytest

import sparsec
from sparsec.cli import main
from oracle import EXAMPLES

MLP = os.path.join(EXAMPLES, "mlp.py")


def test_inspect_prints_plan_and_graph(capsys):
    assert main(["inspect", MLP, "--pattern", "2:4", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "sparsec plan (pattern 2:4)" in out and "fc2" in out and "int8" in out
    assert "# transformed graph (traced with symbolic_trace)" in out
    assert "def forward" in out and "# sparsec: fc2 (linear) -> 2:4, int8" in out


def test_inspect_json_round_trips_and_plan_flag_applies_it(capsys, tmp_path):
    assert main(["inspect", f"{MLP}:build_model", "--pattern", "fanin:0.9", "--json"]) == 0
    plan = sparsec.Plan.from_json(capsys.readouterr().out)
    assert plan["fc2"].sparsity == "fanin:0.9"
    data = json.loads(plan.to_json())
    data["layers"][1]["sparsity"] = "1:4"
    data["layers"][1]["backend"] = None  # let sparsec choose what runs the edited layer
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    assert main(["inspect", MLP, "--plan", str(path), "--json"]) == 0
    assert sparsec.Plan.from_json(capsys.readouterr().out)["fc2"].sparsity == "1:4"


def test_function_returning_only_a_model(tmp_path, capsys):
    target = tmp_path / "m.py"
    target.write_text("import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), "
                      "nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))\n")
    assert main(["inspect", f"{target}:make", "--include", "2"]) == 0
    assert "forced by include='2'" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["inspect", "/no/such/file.py"], "no such file"),
    (["inspect", f"{MLP}:nope"], "has no function 'nope'; write FILE.py:FUNC with one of: MLP, build_model"),
    (["inspect", MLP, "--pattern", "3:2"], "invalid pattern '3:2'"),
    (["inspect", MLP, "--include", "fcx"], "matches no candidate layer"),
])
def test_errors_exit_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_errors_in_the_users_file_or_output_folder_exit_2_naming_them(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch.nn as nn\n\ndef boom():\n    raise RuntimeError('builder exploded')\n")
    assert main(["inspect", f"{broken}:boom"]) == 2
    assert f"{broken}:boom() failed: RuntimeError: builder exploded (at {broken} line 4)" in capsys.readouterr().err
    bad_syntax = tmp_path / "syntax.py"
    bad_syntax.write_text("def build_model(:\n    pass\n")
    assert main(["inspect", str(bad_syntax)]) == 2
    assert f"importing {bad_syntax} failed: SyntaxError" in capsys.readouterr().err
    # a script run at import (sys.exit, or argparse reading the CLI's own arguments) is not a success
    for code, exit_code in (("import sys\nsys.exit(0)\n", "0"),
                            ("import argparse\nargparse.ArgumentParser().parse_args(['--epochs', '3'])\n", "2")):
        script = tmp_path / "script.py"
        script.write_text(code)
        assert main(["inspect", str(script)]) == 2
        err = capsys.readouterr().err
        assert f"importing {script} exited (SystemExit {exit_code} (at {script} line 2))" in err
        assert 'under `if __name__ == "__main__":`' in err
    assert main(["inspect", MLP, "--plan", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the plan file" in capsys.readouterr().err
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for output in (not_a_folder, not_a_folder / "sub"):
        assert main(["dump-kernels", MLP, "-o", str(output)]) == 2
        assert f"cannot write to the output folder {output}" in capsys.readouterr().err


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "sparsec", "inspect", MLP, "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert sparsec.Plan.from_json(result.stdout).names == ["fc1", "fc2", "fc3", "head"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_a_plan_file_in_another_unicode_encoding_is_read(encoding, capsys, tmp_path):
    """PowerShell's `>` writes UTF-16 with a byte-order mark; editors add a UTF-8 one."""
    assert main(["inspect", MLP, "--pattern", "2:4", "--json"]) == 0
    path = tmp_path / "plan.json"
    path.write_text(capsys.readouterr().out, encoding=encoding)
    assert main(["inspect", MLP, "--plan", str(path), "--json"]) == 0
    assert sparsec.Plan.from_json(capsys.readouterr().out)["fc2"].sparsity == "2:4"
    path.write_bytes(b"\xff\xfe\x00\xd8{")  # UTF-16 with a lone surrogate: not text
    assert main(["inspect", MLP, "--plan", str(path)]) == 2
    assert "is not JSON text in UTF-8, -16 or -32" in capsys.readouterr().err
