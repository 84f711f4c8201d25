"""`sparsec inspect` on example files."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.cli import build_parser, main
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


def test_function_returning_example_kwargs(tmp_path, capsys):
    """(model, example_inputs, example_kwargs): a forward with a keyword-only argument inspects and dumps."""
    target = tmp_path / "m.py"
    target.write_text(
        "import torch, torch.nn as nn\n"
        "class Scaled(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)\n"
        "    def forward(self, x, *, scale):\n"
        "        return self.b(torch.relu(self.a(x)) * scale)\n"
        "def make():\n"
        "    return Scaled(), (torch.randn(2, 64),), {'scale': torch.rand(64)}\n")
    assert main(["inspect", f"{target}:make", "--include", "a", "b", "--json"]) == 0
    assert [lp.sparsity for lp in sparsec.Plan.from_json(capsys.readouterr().out)] == ["2:4", "2:4"]
    assert main(["dump-kernels", f"{target}:make", "--include", "a", "b", "-o", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(use["name"] for k in manifest["kernels"].values() for use in k["layers"]) == ["a", "b"]


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


def test_a_model_file_with_a_dataclass_config_imports(tmp_path, capsys):
    """The target file runs as an imported module would: registered in sys.modules, which @dataclass
    with `from __future__ import annotations` needs (it failed: 'NoneType' object has no attribute '__dict__')."""
    target = tmp_path / "gpt_like.py"
    target.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "import torch, torch.nn as nn\n"
        "@dataclass\n"
        "class Config:\n"
        "    width: int = 64\n"
        "def build_model():\n"
        "    c = Config()\n"
        "    return nn.Sequential(nn.Linear(c.width, c.width), nn.ReLU(), nn.Linear(c.width, c.width), nn.ReLU(),\n"
        "                         nn.Linear(c.width, 4)), torch.randn(2, c.width)\n")
    assert main(["inspect", str(target), "--json"]) == 0, capsys.readouterr().err
    assert sparsec.Plan.from_json(capsys.readouterr().out)["2"].sparsity == "2:4"


def test_a_target_after_include_or_exclude_is_taken_back_and_a_colon_in_its_folder_works(tmp_path, capsys):
    """--include / --exclude take every following word, so `inspect --include fc2 FILE` left no target
    (argparse: 'the following arguments are required: target'); FUNC follows the last colon, so a
    folder named with one (a timestamp) is found."""
    assert main(["inspect", "--include", "fc1", MLP, "--json"]) == 0
    assert sparsec.Plan.from_json(capsys.readouterr().out)["fc1"].sparsity == "2:4"
    assert main(["inspect", "--exclude", "fc2", "--include", "fc1", f"{MLP}:build_model", "--json"]) == 0
    plan = sparsec.Plan.from_json(capsys.readouterr().out)
    assert plan["fc1"].sparsity == "2:4" and plan["fc2"].sparsity is None
    bad_plan = tmp_path / "bad.json"  # a file after another option is that option's, not the target
    bad_plan.write_text("{not json")
    assert main(["inspect", "--include", "fc1", MLP, "--plan", str(bad_plan)]) == 2
    assert f"the plan file {bad_plan} is not a usable sparsec plan" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a word naming no file is still argparse's missing target
        main(["inspect", "--include", "fc1", "no_such_model.py"])
    assert info.value.code == 2 and "required: target" in capsys.readouterr().err
    folder = tmp_path / "run-12:30"
    folder.mkdir()
    (folder / "m.py").write_text(open(MLP).read())
    assert main(["inspect", f"{folder / 'm.py'}:build_model", "--json"]) == 0
    assert sparsec.Plan.from_json(capsys.readouterr().out).names == ["fc1", "fc2", "fc3", "head"]
    assert main(["inspect", str(folder / "m.py"), "--json"]) == 0
    capsys.readouterr()


def test_output_piped_into_a_reader_that_quits_is_no_traceback():
    """`sparsec inspect ... | head -1`: the closed pipe ended in a BrokenPipeError traceback. (`true` closes
    the pipe at once, long before sparsec writes: `head` would race with the write.)"""
    for extra in ("", " --json"):
        result = subprocess.run(f"{sys.executable} -m sparsec inspect {MLP}{extra} | true", shell=True,
                                capture_output=True, text=True, timeout=300)
        assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


def test_plan_file_errors_name_the_file(tmp_path, capsys):
    """A malformed plan file is reported with its path (the message named no file; JSON of the wrong
    shape, "layers": 3, ended in a TypeError traceback)."""
    assert main(["inspect", MLP, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for name, text in (("broken.json", "{not json"), ("shape.json", json.dumps(dict(data, layers=3)))):
        path = tmp_path / name
        path.write_text(text)
        assert main(["inspect", MLP, "--plan", str(path)]) == 2
        assert f"the plan file {path} is not a usable sparsec plan" in capsys.readouterr().err


def test_dump_kernels_leaves_a_folder_with_someone_elses_manifest_alone(tmp_path, capsys):
    """A manifest.json that no dump wrote (a web app's) is neither overwritten nor read as a list of
    kernels to delete (its "kernels" entries' .py files were removed as 'an earlier dump')."""
    foreign = '{"name": "my app", "kernels": {"helper": 1}}'
    (tmp_path / "manifest.json").write_text(foreign)
    (tmp_path / "helper.py").write_text("print('mine')\n")
    assert main(["dump-kernels", MLP, "-o", str(tmp_path)]) == 2
    assert "is not the manifest of an earlier `sparsec dump-kernels`" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helper.py", "manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == foreign
    # a dump's own manifest is recognised: dumping again over it works and replaces its kernels
    out = tmp_path / "dump"
    assert main(["dump-kernels", MLP, "-o", str(out)]) == 0
    assert main(["dump-kernels", MLP, "--pattern", "fanin:0.9", "-o", str(out)]) == 0
    assert "removed 1 kernel of the earlier dump" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.py" for k in manifest["kernels"]] + ["manifest.json"])


def test_dump_kernels_needs_no_kernel_cache(tmp_path, capsys, monkeypatch):
    """A dump writes its kernels to -o and runs none: with SPARSEC_CACHE_DIR a file (no cache to be had) it
    failed ("the kernel cache ... cannot be written") and wrote nothing; it now writes the same files, and
    the cache stays as it was."""
    cache = tmp_path / "not-a-folder"
    cache.write_text("x")
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(cache))
    out = tmp_path / "dump"
    assert main(["dump-kernels", MLP, "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels"] and sorted(p.name for p in out.iterdir()) == sorted(
        [f"{k}.py" for k in manifest["kernels"]] + ["manifest.json"])
    assert cache.read_text() == "x"


def test_json_output_is_the_plan_alone_when_the_users_file_prints(tmp_path, capsys):
    """--json "prints only the plan": a print in the user's file (at import or in FUNC) went into stdout
    ahead of the JSON, which then did not parse."""
    target = tmp_path / "chatty.py"
    target.write_text("import torch, torch.nn as nn\nprint('importing chatty')\n"
                      "def build_model():\n    print('building the model...')\n"
                      "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),\n"
                      "                         nn.Linear(64, 4)), torch.randn(2, 64)\n")
    assert main(["inspect", str(target), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["layers"][1]["sparsity"] == "2:4"
    assert "importing chatty" in captured.err and "building the model..." in captured.err
    assert main(["inspect", str(target)]) == 0  # without --json the prints stay on stdout
    assert "building the model..." in capsys.readouterr().out


def test_func_may_import_neighbours_when_called_and_any_file_name_or_exit_is_handled(tmp_path, capsys):
    """FUNC importing a neighbour only when called failed (the file's folder was taken off sys.path right
    after the import); a file not named *.py (a script `train`) was an AttributeError traceback; sys.exit(0)
    in FUNC ended the command with status 0 and no output."""
    (tmp_path / "cli_test_nets.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),\n"
        "                         nn.Linear(64, 4)), torch.randn(2, 64)\n")
    lazy = "def build_model():\n    from cli_test_nets import make  # imported when called, as scripts often do\n    return make()\n"
    before = list(sys.path)
    for name in ("lazy.py", "train", "model.txt"):
        (tmp_path / name).write_text(lazy)
        assert main(["inspect", str(tmp_path / name), "--json"]) == 0, capsys.readouterr().err
        plan = sparsec.Plan.from_json(capsys.readouterr().out)
        # 64x64 layers, the middle one neither first nor last: only it is pruned
        assert [(lp.name, lp.sparsity) for lp in plan] == [("0", None), ("2", "2:4"), ("4", None)]
        assert sys.path == before, "the target's folder does not stay on sys.path after the command"
    (tmp_path / "quits.py").write_text("import sys\ndef build_model():\n    sys.exit(0)\n")
    assert main(["inspect", str(tmp_path / "quits.py")]) == 2
    assert f"build_model() exited (SystemExit 0 (at {tmp_path / 'quits.py'} line 3))" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder: give the Python file" in capsys.readouterr().err


def test_a_plan_file_from_a_newer_sparsec_says_what_to_do(tmp_path, capsys):
    """A plan of a later format version said 'unsupported plan version 2' and nothing about a remedy."""
    from sparsec.plan import PLAN_VERSION

    assert main(["inspect", MLP, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dict(data, version=PLAN_VERSION + 1)))
    assert main(["inspect", MLP, "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"the plan file {path} is not a usable sparsec plan: unsupported plan version {PLAN_VERSION + 1}" in err
    assert "written by a newer sparsec: upgrade sparsec here" in err


def test_a_misspelt_top_level_key_in_a_plan_file_is_refused_not_ignored(tmp_path, capsys):
    """Layer fields were checked but the plan's own keys were not: "grad_mod": "rescale" was dropped
    without a word and the plan ran the default gradient mode."""
    assert main(["inspect", MLP, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    data["grad_mod"] = "rescale"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    assert main(["inspect", MLP, "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"the plan file {path} is not a usable sparsec plan: plan has unknown keys ['grad_mod']" in err
    assert "did you mean 'grad_mode'?" in err


def test_a_model_nothing_sparse_in_is_said_once_in_the_commands_own_words(tmp_path, capsys):
    """compile's nothing-sparse warning tells a Python caller to print(cm.plan): inspect printed the plan below it
    (and that line attributed to cli.py), and dump-kernels only said it wrote 0 kernels."""
    import warnings

    target = tmp_path / "m.py"
    target.write_text("import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Linear(60, 60), nn.ReLU(), "
                      "nn.Linear(60, 60))\n")  # (K = 60: no 2:8 groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["inspect", f"{target}:make", "--pattern", "2:8", "--include", ".*"]) == 0
        assert "no layer was made sparse (see reasons)" in capsys.readouterr().out
        assert main(["dump-kernels", f"{target}:make", "--pattern", "2:8", "--include", ".*",
                     "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 kernels" in out and "no layer was made sparse with pattern '2:8': `sparsec inspect`" in out


def test_a_linked_model_file_imports_the_files_beside_its_target(tmp_path, capsys):
    """`python FILE.py` puts the folder of a symlink's target on sys.path; the CLI put the link's folder
    there, so a linked model file that imports its neighbours failed with ModuleNotFoundError (found by the
    CLI review)."""
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    (real / "linked_file_nets.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),\n"
        "                         nn.Linear(64, 4)), torch.randn(2, 64)\n")
    (real / "m.py").write_text("from linked_file_nets import make\ndef build_model():\n    return make()\n")
    os.symlink(real / "m.py", links / "m.py")
    assert main(["inspect", str(links / "m.py"), "--json"]) == 0, capsys.readouterr().err
    assert [lp.sparsity for lp in sparsec.Plan.from_json(capsys.readouterr().out)] == [None, "2:4", None]


def test_dump_kernels_help_offers_no_plan_option():
    parser = build_parser()
    dump = parser._subparsers._group_actions[0].choices["dump-kernels"].format_help()
    inspect = parser._subparsers._group_actions[0].choices["inspect"].format_help()
    assert "--plan" not in dump and "with --plan" in " ".join(inspect.split())


def test_without_triton_dump_kernels_says_what_to_install_before_building_the_model(tmp_path, capsys, monkeypatch):
    """Triton is an optional dependency: without it, a dump failed inside the emit pass with
    'ModuleNotFoundError: No module named triton', after building and tracing the model (found by the CLI
    review); compile(backend='triton') ran every layer on torch."""
    import sparsec.codegen.configs as configs

    monkeypatch.setattr(configs, "triton_installed", lambda: False)
    built = tmp_path / "built"
    (tmp_path / "m.py").write_text(
        "import pathlib, torch, torch.nn as nn\n"
        "def build_model():\n"
        f"    pathlib.Path({str(built)!r}).write_text('built')\n"
        "    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), "
        "torch.randn(2, 64)\n")
    assert main(["dump-kernels", str(tmp_path / "m.py"), "-o", str(tmp_path / "out")]) == 2
    assert "the triton package is not installed (pip install 'sparsec[triton]'" in capsys.readouterr().err
    assert not built.exists() and not (tmp_path / "out").exists()
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), torch.randn(2, 64)
    with pytest.raises(sparsec.InvalidInputError, match=r"backend='triton' generates Triton kernels, but the triton "
                                                         r"package is not installed.*backend='auto' or 'torch'"):
        sparsec.compile(model, "2:4", (x,), backend="triton")
    assert sparsec.compile(model, "2:4", (x,), backend="torch").plan["2"].sparsity == "2:4"


def test_dump_kernels_names_each_sparse_layer_left_without_a_kernel(tmp_path, capsys):
    assert main(["dump-kernels", os.path.join(EXAMPLES, "mlp.py"), "--pattern", "1:4", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 kernels" in out
    assert "fc2: no kernel, the Triton kernels cover 2:4, constant fan-in and unstructured convs only (this layer is 1:4)" in out


def test_leaf_modules_and_min_weights_reach_compile(tmp_path, capsys):
    """compile's errors and warnings advise leaf_modules= (and the plan min_weights=): the commands had
    neither, so a model needing one could not be inspected or dumped from the command line."""
    (tmp_path / "blocks.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Block(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(16, 16)\n"
        "    def forward(self, x):\n"
        "        return torch.relu(self.fc(x))\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Linear(16, 16), Block(), Block(), nn.Linear(16, 4)), torch.randn(2, 16)\n")
    target = str(tmp_path / "blocks.py")
    assert main(["inspect", target, "--json"]) == 0
    plan = sparsec.Plan.from_json(capsys.readouterr().out)
    assert [lp.sparsity for lp in plan] == [None] * 4 and "256 weights < min_weights=1024" in plan["1.fc"].reason
    assert main(["inspect", "--min-weights", "0", "--leaf-modules", "2", "--json", target]) == 0
    plan = sparsec.Plan.from_json(capsys.readouterr().out)
    assert plan["1.fc"].sparsity == "2:4"  # 256 weights, now enough
    assert plan["2.fc"].sparsity is None and "called as a whole" in plan["2.fc"].reason
    assert main(["dump-kernels", target, "--min-weights", "0", "-o", str(tmp_path / "out")]) == 0
    assert "1.fc" in (tmp_path / "out" / "manifest.json").read_text()
    assert main(["inspect", target, "--min-weights", "-1"]) == 2
    assert "min_weights must be a non-negative int, got -1" in capsys.readouterr().err
