import hashlib
import io
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import load_example
from sparsec.errors import CorruptFileError, MissingCodeError


def test_save_load_round_trip(tmp_path):
    model, inputs = load_example("cnn").build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs, quantize="int8")
    path = tmp_path / "model.sparsec"
    sparsec.save(cm, path)
    loaded = sparsec.load(path)
    assert loaded.plan == cm.plan
    assert torch.equal(loaded(*inputs), cm(*inputs))
    assert torch.equal(loaded.mask("stage1.0.0"), cm.mask("stage1.0.0"))
    assert torch.equal(loaded.effective_weight("stage2.0.0"), cm.effective_weight("stage2.0.0"))
    # the printed graph keeps its per-layer annotations (fx rebuilds a loaded graph from code, without meta)
    assert loaded.graph_module.code == cm.graph_module.code
    assert "# sparsec: stage1.0.0 (conv2d) -> 2:4, int8" in loaded.graph_module.code


def test_corrupt_files(tmp_path):
    model, inputs = load_example("mlp").build_model()
    path = tmp_path / "model.sparsec"
    sparsec.save(sparsec.compile(model, example_inputs=inputs), path)
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated: .* of .* payload bytes"):
        sparsec.load(tmp_path / "truncated")
    (tmp_path / "header-cut").write_bytes(data[:40])
    with pytest.raises(CorruptFileError, match="header is damaged or truncated"):
        sparsec.load(tmp_path / "header-cut")
    # a few flipped bytes mid-payload (mostly weights): torch.load alone would read them as weights
    damaged = bytearray(data)
    at = len(data) // 2
    damaged[at:at + 8] = bytes(b ^ 0x5A for b in damaged[at:at + 8])
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match="damaged: its payload does not match the checksum"):
        sparsec.load(tmp_path / "damaged")
    (tmp_path / "garbage").write_bytes(b"\x00not a model at all")
    with pytest.raises(CorruptFileError, match="not a sparsec model file"):
        sparsec.load(tmp_path / "garbage")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other")
    with pytest.raises(CorruptFileError, match="not a sparsec model file"):
        sparsec.load(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        sparsec.load(tmp_path / "missing")
    with pytest.raises(TypeError, match="CompiledModel"):
        sparsec.save(model, tmp_path / "x")


def _rewritten(data: bytes, edit_header=None, payload: bytes | None = None) -> bytes:
    """A saved file with its JSON header edited and/or its payload replaced (checksum kept consistent)."""
    magic, header_line, rest = data.split(b"\n", 2)
    header = json.loads(header_line)
    if payload is not None:
        header.update(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
        rest = payload
    if edit_header:
        edit_header(header)
    return b"\n".join([magic, json.dumps(header).encode(), rest])


def test_well_formed_files_with_the_wrong_content(tmp_path):
    model, inputs = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=inputs)
    path = tmp_path / "model.sparsec"
    sparsec.save(cm, path)
    data = path.read_bytes()
    (tmp_path / "ok").write_bytes(_rewritten(data))  # the rewriting alone keeps a loadable file
    assert sparsec.load(tmp_path / "ok").plan == cm.plan
    # a file written by a newer sparsec
    (tmp_path / "v3").write_bytes(_rewritten(data, lambda h: h.update(version=3)))
    with pytest.raises(CorruptFileError, match=r"version 3; this sparsec reads versions 1 and 2 \(the file was saved "
                                               r"by a newer sparsec: upgrade sparsec here to load it\)"):
        sparsec.load(tmp_path / "v3")
    # a header line that is not JSON
    magic, _, rest = data.split(b"\n", 2)
    (tmp_path / "bad-json").write_bytes(magic + b"\n{not json\n" + rest)
    with pytest.raises(CorruptFileError, match="header is damaged or truncated"):
        sparsec.load(tmp_path / "bad-json")
    # an intact archive of something else
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    (tmp_path / "not-a-model").write_bytes(_rewritten(data, payload=buffer.getvalue()))
    with pytest.raises(CorruptFileError, match="does not hold a CompiledModel"):
        sparsec.load(tmp_path / "not-a-model")
    # the header's plan (readable without unpickling) edited so that it no longer describes the model
    edited = cm.plan.to_json().replace('"sparsity": "2:4"', '"sparsity": null', 1)
    assert edited != cm.plan.to_json()
    (tmp_path / "plan-edited").write_bytes(_rewritten(data, lambda h: h.update(plan=edited)))
    with pytest.raises(CorruptFileError, match="the stored plan and the model's plan disagree"):
        sparsec.load(tmp_path / "plan-edited")


def test_files_of_the_first_format_still_load(tmp_path):
    """Version 1 files were a bare torch.save archive of a header dict and the model (no checksum)."""
    model, inputs = load_example("mlp").build_model()
    cm = sparsec.compile(model, example_inputs=inputs)
    torch.save({"format": "sparsec.model", "version": 1, "plan": cm.plan.to_json(), "model": cm}, tmp_path / "v1")
    assert torch.equal(sparsec.load(tmp_path / "v1")(*inputs), cm(*inputs))
    torch.save({"format": "sparsec.model", "version": 7, "plan": cm.plan.to_json(), "model": cm}, tmp_path / "v7")
    with pytest.raises(CorruptFileError, match="version 7; this sparsec reads versions 1 and 2"):
        sparsec.load(tmp_path / "v7")


def test_save_load_export_traced_model(tmp_path):
    from test_frontend import ShapeUnpacking

    torch.manual_seed(0)
    model, x = ShapeUnpacking().eval(), torch.randn(2, 5, 32)
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.trace_method == "torch.export"
    sparsec.save(cm, tmp_path / "m")
    assert torch.equal(sparsec.load(tmp_path / "m")(x), cm(x))


def test_load_regenerates_kernels_saved_by_another_version(tmp_path):
    """A file whose Triton kernels came from another sparsec (here: an old source with a different
    argument list) loads with this version's kernels, which its launchers can call."""
    import os

    from sparsec.runtime.triton_linear import TritonSparseLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU runs the kernels in the interpreter)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU()).to(device)
    x = torch.randn(2, 32, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    expected = cm(x)
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseLinear))
    current = layer.kernel_source
    stale = current.replace("x_ptr, stride_xm,", "x_ptr, stride_xm, stride_xk,")
    assert stale != current
    layer.kernel_source = cm.kernels[layer.kernel_name] = stale
    path = os.path.join(tmp_path, "old.sparsec")
    sparsec.save(cm, path)
    loaded = sparsec.load(path)
    again = next(m for m in loaded.modules() if isinstance(m, TritonSparseLinear))
    assert again.kernel_source == current and loaded.kernels == {again.kernel_name: current}
    assert set(loaded.kernel_manifest) == {again.kernel_name}
    assert torch.allclose(loaded(x), expected)


def test_launch_configs_recorded_with_a_renamed_key_load_in_this_versions_keys(tmp_path):
    """Plans and layers that recorded a launch config under an earlier key name (INT8_PRMT, now
    PRMT_EXPAND), and without a key added since (GATHER, 0: the form they ran), load with the current
    keys and are used, from a model file and from plan JSON."""
    import json

    from sparsec.runtime.triton_linear import TritonSparseLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU runs the kernels in the interpreter)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU()).to(device)
    x = torch.randn(3, 64, device=device)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    launch = dict(M=3, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=2, PRMT_EXPAND=0, num_warps=4, num_stages=1)
    old = {("INT8_PRMT" if key == "PRMT_EXPAND" else key): value for key, value in launch.items()}
    launch["GATHER"] = 0
    layer = next(m for m in cm.modules() if isinstance(m, TritonSparseLinear))
    layer.launch, cm.plan["0"].launch = dict(old), dict(old)  # as an earlier version recorded them
    sparsec.save(cm, tmp_path / "old")
    loaded = sparsec.load(tmp_path / "old")
    again = next(m for m in loaded.modules() if isinstance(m, TritonSparseLinear))
    assert loaded.plan["0"].launch == launch and again.launch == launch
    assert again.launch_config(3)["SPLIT_K"] == 2
    with torch.no_grad():
        assert torch.allclose(loaded(x), torch.relu(x @ cm.effective_weight("0").t() + model[0].bias), atol=1e-5)
    text = json.loads(cm.plan.to_json())
    assert text["layers"][0]["launch"] == old
    assert sparsec.Plan.from_json(json.dumps(text))["0"].launch == launch


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.t()) / 2


def test_a_model_torch_cannot_pickle_is_refused_with_the_layer_and_a_way_to_keep_it(tmp_path):
    """A parametrized layer stays dense (its weight is computed) and torch refuses to pickle it; the
    state_dict route the error names restores the trained model exactly."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))
    nn.utils.parametrize.register_parametrization(model[2], "weight", _Symmetric())
    x = torch.randn(4, 8)
    cm = sparsec.compile(model, example_inputs=(x,), train=True, min_weights=0)
    assert cm.plan["2"].sparsity is None and cm.plan["4"].sparsity == "2:4"
    with pytest.raises(TypeError, match=r"layer '2' has a parametrized weight .* save cm.state_dict\(\)"):
        sparsec.save(cm, tmp_path / "m")
    assert not list(tmp_path.iterdir()), "nothing half-written is left behind"
    cm(x).square().sum().backward()
    torch.optim.SGD(cm.parameters(), lr=0.1).step()
    restored = sparsec.compile(model, example_inputs=(x,), train=True, plan=cm.plan)
    restored.load_state_dict(cm.state_dict())
    assert torch.equal(restored(x), cm(x)) and torch.equal(restored.mask("4"), cm.mask("4"))


def test_saving_onto_a_folder_leaves_nothing_behind(tmp_path):
    cm = sparsec.compile(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4)),
                         example_inputs=(torch.randn(2, 16),), min_weights=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError, match="taken: it is a folder; give a file name") as caught:
        sparsec.save(cm, tmp_path / "taken")
    assert ".tmp" not in str(caught.value)  # (the temp file is no name the user gave)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_an_intact_file_whose_classes_are_missing_says_so_not_corrupt(tmp_path):
    """A class of the saving script (__main__) is not importable in another process: the file is whole
    (its checksum matches), so the error says what is missing, not 'truncated or corrupt'."""
    script = tmp_path / "save_it.py"
    script.write_text(
        "import sys, torch, torch.nn as nn, sparsec\n"
        "class Act(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.relu(x)\n"
        "model = nn.Sequential(nn.Linear(16, 64), Act(), nn.Linear(64, 64), Act(), nn.Linear(64, 4)).eval()\n"
        "cm = sparsec.compile(model, example_inputs=(torch.randn(2, 16),), min_weights=0, leaf_modules=[Act])\n"
        "sparsec.save(cm, sys.argv[1])\n")
    import subprocess
    import sys
    subprocess.run([sys.executable, str(script), str(tmp_path / "m")], check=True, capture_output=True)
    with pytest.raises(MissingCodeError, match=r"is intact .* Can't get attribute 'Act'.*importable under the same"):
        sparsec.load(tmp_path / "m")


def test_damaged_headers_and_cut_files_name_the_file_and_the_problem(tmp_path):
    """Every way a header can be wrong raises CorruptFileError naming the file (a plan edited into a
    non-string raised a bare TypeError naming nothing; appended bytes were reported as 'truncated')."""
    model, inputs = load_example("mlp").build_model()
    path = tmp_path / "model.sparsec"
    sparsec.save(sparsec.compile(model, example_inputs=inputs), path)
    data = path.read_bytes()
    cases = {
        "plan-null": (_rewritten(data, lambda h: h.update(plan=None)), "the plan stored in its header is unreadable"),
        "plan-gone": (_rewritten(data, lambda h: h.pop("plan")), "the plan stored in its header is unreadable"),
        "plan-text": (_rewritten(data, lambda h: h.update(plan="{oops")), "the plan stored in its header is unreadable"),
        "appended": (data + b"trailing bytes", r"is damaged: \d+ payload bytes where its header says \d+ \(bytes appended"),
        "size-text": (_rewritten(data, lambda h: h.update(payload_bytes=str(h["payload_bytes"]))),
                      "header is damaged \\(payload_bytes is '"),
        "empty": (b"", r"is empty \(0 bytes\)"),
        "cut-in-magic": (data[:6], r"is truncated: it ends inside the sparsec header \(6 bytes\)"),
        "crlf": (data.replace(b"\n", b"\r\n"), "line endings converted to CRLF"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CorruptFileError, match=message) as info:
            sparsec.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name


def test_an_intact_file_of_cuda_tensors_on_a_machine_without_cuda_names_map_location(tmp_path, monkeypatch):
    """A file saved on a GPU machine is not corrupt: the error says so and names map_location, and with
    map_location='cpu' it loads and computes what was saved (it said 'truncated or corrupt?', and
    torch's advice in it named torch.load, which skips the checksum)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    import torch.serialization as ts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(3, 16)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    with torch.no_grad():
        expected = torch.relu(torch.relu(x @ model[0].weight.t() + model[0].bias) @ cm.effective_weight("2").t()
                              + model[2].bias) @ model[4].weight.t() + model[4].bias
    # saved as on a GPU machine: every storage tagged cuda:0 (torch's location tags are a registry)
    monkeypatch.setattr(ts, "_package_registry", list(ts._package_registry))
    ts.register_package(1, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda obj, loc: None)
    sparsec.save(cm, tmp_path / "gpu")
    monkeypatch.undo()
    with pytest.raises(sparsec.InvalidInputError, match=r"is intact .* holds CUDA tensors .*map_location='cpu'") as info:
        sparsec.load(tmp_path / "gpu")
    assert not isinstance(info.value, CorruptFileError)
    loaded = sparsec.load(tmp_path / "gpu", map_location="cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_save_writes_through_a_symlink_from_any_thread_and_names_a_missing_folder(tmp_path):
    """A symlinked path updates its target (the link was replaced by a file, the target left stale);
    two threads saving one path do not collide on a shared temp name (one failed with a
    FileNotFoundError naming the temp file); a missing folder is named, not the temp file."""
    import os
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    target, link = tmp_path / "run3.sparsec", tmp_path / "latest.sparsec"
    target.write_bytes(b"an older model")
    os.symlink(target, link)
    sparsec.save(cm, link)
    assert link.is_symlink() and torch.equal(sparsec.load(target)(x), cm(x))

    errors = []

    def save_often():
        for _ in range(4):
            try:
                sparsec.save(cm, tmp_path / "shared.sparsec")
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
    threads = [threading.Thread(target=save_often) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(sparsec.load(tmp_path / "shared.sparsec")(x), cm(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.sparsec", "run3.sparsec", "shared.sparsec"]

    with pytest.raises(FileNotFoundError, match=r"cannot save to .*nowhere.*: no folder .*nowhere") as info:
        sparsec.save(cm, tmp_path / "nowhere" / "m.sparsec")
    assert ".tmp" not in str(info.value)
    # a path naming a folder that does not exist yet ("out/") is refused, not saved as a file named "out"
    with pytest.raises(IsADirectoryError, match="names a folder"):
        sparsec.save(cm, f"{tmp_path / 'out'}/")
    assert not (tmp_path / "out").exists()


def test_saving_over_a_file_keeps_its_permissions_and_a_bytes_path_is_named_as_text(tmp_path):
    """save writes a temp file and renames it over the old one: the new file had the umask's mode, so
    re-saving a private (0600) model made it readable by everyone (0644); torch.save, which writes into
    the file, keeps the mode. Messages about a bytes path named it "b'...'"."""
    import os
    import stat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    path = tmp_path / "private.sparsec"
    path.write_bytes(b"an older model")
    for mode in (0o600, 0o640):
        os.chmod(path, mode)
        sparsec.save(cm, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    with torch.no_grad():  # (what was saved is the model: its pruned layer is the middle one)
        expected = torch.relu(torch.relu(x @ model[0].weight.t() + model[0].bias) @ cm.effective_weight("2").t()
                              + model[2].bias) @ model[4].weight.t() + model[4].bias
        assert torch.allclose(sparsec.load(path)(x), expected, atol=1e-5)
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(CorruptFileError) as info:
        sparsec.load(os.fsencode(tmp_path / "junk"))
    assert str(info.value).startswith(f"{tmp_path / 'junk'} is not a sparsec model file")


def test_a_long_file_name_saves_and_an_unwritable_folder_names_the_path_given(tmp_path):
    """The temp file was "<name>.tmp<pid>-<thread>", past the 255-byte limit on a file name for a valid
    name of 230+ bytes (ENAMETOOLONG naming the temp file); a folder no file can be created in was
    reported with the temp file's name, which the user never gave."""
    import os

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    long_name = tmp_path / ("m" * 240 + ".sparsec")  # 248 bytes: a valid name
    sparsec.save(cm, long_name)
    with torch.no_grad():
        expected = torch.relu(torch.relu(x @ model[0].weight.t() + model[0].bias) @ cm.effective_weight("2").t()
                              + model[2].bias) @ model[4].weight.t() + model[4].bias
        assert torch.allclose(sparsec.load(long_name)(x), expected, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [long_name.name]
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc, a folder no file can be created in (chmod does not stop root)")
    with pytest.raises(OSError, match=r"cannot save to /proc/m\.sparsec: .*creating a file in /proc") as info:
        sparsec.save(cm, "/proc/m.sparsec")
    assert ".tmp" not in str(info.value)


def test_saving_a_wrapped_compiled_model_names_the_model_inside(tmp_path):
    """torch.compile(cm) / DataParallel(cm) is how a compiled model runs; saving the wrapper said only
    'got OptimizedModule'. The model inside saves and loads as itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(2, 16)
    cm = sparsec.compile(model, example_inputs=(x,), backend="torch")
    for wrapper, inside in ((torch.compile(cm), "_orig_mod"), (nn.DataParallel(cm), "module")):
        with pytest.raises(TypeError, match=f"got {type(wrapper).__name__}, a wrapper around one: save its .{inside}"):
            sparsec.save(wrapper, tmp_path / "m")
        assert not (tmp_path / "m").exists()
        sparsec.save(getattr(wrapper, inside), tmp_path / "m")
        with torch.no_grad():
            # (map_location: on a GPU machine DataParallel moved cm to cuda:0)
            assert torch.allclose(sparsec.load(tmp_path / "m", map_location="cpu")(x), torch.relu(torch.relu(
                x @ model[0].weight.t() + model[0].bias) @ cm.effective_weight("2").cpu().t() + model[2].bias)
                @ model[4].weight.t() + model[4].bias, atol=1e-5)
        (tmp_path / "m").unlink()


_LOAD_THEN_TRACE = """
import pickle, sys, torch, torch.nn as nn, torch.fx as fx
import sparsec

class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x, shift=None):  # traced as its None value: the code calls torch's _assert_is_none
        h = self.b(torch.relu(self.a(x)))
        return h if shift is None else h + shift

x = torch.randn(4, 64)
cm = sparsec.compile(Shifted(), "2:4", (x,), include=[".*"])
assert "_assert_is_none" in cm.graph_module.code
if sys.argv[2] == "sparsec":
    sparsec.save(cm, sys.argv[1])
    loaded = sparsec.load(sys.argv[1])
else:
    loaded = pickle.loads(pickle.dumps(cm))
assert torch.equal(loaded(x), cm(x))
again = sparsec.compile(Shifted(), "2:4", (x,), include=[".*"])   # any later trace in the process
assert again.trace_method == "symbolic_trace"
fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))                  # the user's own too
print("traced after load")
"""


@pytest.mark.parametrize("how", ["sparsec", "pickle"])
def test_loading_a_graph_with_a_none_argument_leaves_later_traces_working(tmp_path, how):
    """torch issue 130701: the loaded code registered torch.fx._symbolic_trace._assert_is_none for patching
    under a name its globals lack, and every later symbolic_trace in the process failed with KeyError
    (sparsec's own compiles too, both capture ways). Run in a process of its own: the failure is process-wide."""
    script = tmp_path / "load_then_trace.py"
    script.write_text(_LOAD_THEN_TRACE)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "m.sparsec"), how], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "traced after load" in result.stdout, result.stderr[-2000:]


def test_a_framed_file_whose_header_says_version_1_is_called_damaged(tmp_path):
    """Version 1 files are a torch.save dict without this header: "reads versions 1 and 2" contradicted itself."""
    cm = sparsec.compile(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4)),
                         example_inputs=(torch.randn(2, 16),), min_weights=0)
    path = tmp_path / "m.sparsec"
    sparsec.save(cm, path)
    data = path.read_bytes()
    magic_end = data.index(b"\n") + 1
    header_end = data.index(b"\n", magic_end) + 1
    header = json.loads(data[magic_end:header_end])
    header["version"] = 1
    path.write_bytes(data[:magic_end] + json.dumps(header).encode() + b"\n" + data[header_end:])
    with pytest.raises(CorruptFileError, match="header says format version 1, but version 1 files have no such header"):
        sparsec.load(path)


class _IntAndEmptyLayers(nn.Module):
    """An integer weight and an empty layer, both kept dense by compile with a reason."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randint(-3, 4, (64, 64)), requires_grad=False)
        self.lin = nn.Linear(64, 64)
        self.empty = nn.Linear(64, 0)

    def forward(self, idx):
        h = self.lin((idx @ self.w).float())
        return torch.cat([h, self.empty(h)], dim=-1)


def test_a_plan_with_integer_or_empty_layers_kept_dense_reads_back_and_its_model_loads(tmp_path):
    """compile wrote dtype 'int64' and weight_shape [0, 64] for the layers it kept dense, which Plan.validate
    refused: the plan did not survive to_json / from_json, and sparsec.load called the saved file damaged."""
    torch.manual_seed(0)
    model, x = _IntAndEmptyLayers().eval(), torch.randint(0, 3, (2, 64))
    cm = sparsec.compile(model, example_inputs=(x,), min_weights=0)
    assert cm.plan["w"].dtype == "int64" and cm.plan["w"].sparsity is None
    assert cm.plan["empty"].weight_shape == (0, 64) and cm.plan["empty"].sparsity is None
    assert sparsec.Plan.from_json(cm.plan.to_json()) == cm.plan
    again = sparsec.compile(model, example_inputs=(x,), plan=cm.plan).plan
    assert [(lp.name, lp.sparsity) for lp in again] == [(lp.name, lp.sparsity) for lp in cm.plan]
    sparsec.save(cm, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(sparsec.load(tmp_path / "m")(x), cm(x))
    for name in ("w", "empty"):  # a pattern for either is still refused, naming why
        plan = sparsec.Plan.from_json(cm.plan.to_json())
        plan[name].sparsity = "2:4"
        with pytest.raises(ValueError, match=f"plan layer '{name}': its weight .* so it is left dense"):
            sparsec.compile(model, example_inputs=(x,), plan=plan)


def test_save_refuses_a_path_that_is_not_a_regular_file(tmp_path):
    """Saving renames a finished temp file onto the path: onto a FIFO (or /dev/null, as root) that replaced the
    special file by a regular one."""
    cm = sparsec.compile(nn.Sequential(nn.Linear(16, 16)), example_inputs=(torch.randn(2, 16),), min_weights=0)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="it is not a regular file .* which saving would replace"):
        sparsec.save(cm, fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("bad, error, why", [("gpu", ValueError, "map_location 'gpu' is not a device name"),
                                             (5, TypeError, "map_location 5 is a int")])
def test_load_names_a_bad_map_location_instead_of_calling_the_file_damaged(tmp_path, bad, error, why):
    x = torch.randn(2, 16)
    cm = sparsec.compile(nn.Sequential(nn.Linear(16, 16)), example_inputs=(x,), min_weights=0)
    sparsec.save(cm, tmp_path / "m")
    with pytest.raises(error, match=why + r".*accepted: None, a device or its name"):
        sparsec.load(tmp_path / "m", map_location=bad)
    for good in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage):
        with torch.no_grad():
            assert torch.equal(sparsec.load(tmp_path / "m", map_location=good)(x), cm(x))


def test_the_names_files_saved_earlier_hold_still_resolve():
    """A pickled graph module names the tracer that rebuilds it: files saved before the tracers moved to
    sparsec.tracing name sparsec.graph_module.RetraceTracer (checked by loading such a file, 2026-11-25)."""
    import sparsec.graph_module
    import sparsec.tracing

    assert sparsec.graph_module.RetraceTracer is sparsec.tracing.RetraceTracer
