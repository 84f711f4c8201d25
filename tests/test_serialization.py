import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import load_example
from sparsec.errors import CorruptFileError


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


def test_corrupt_files(tmp_path):
    model, inputs = load_example("mlp").build_model()
    path = tmp_path / "model.sparsec"
    sparsec.save(sparsec.compile(model, example_inputs=inputs), path)
    data = path.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        sparsec.load(tmp_path / "truncated")
    (tmp_path / "garbage").write_bytes(b"\x00not a model at all")
    with pytest.raises(CorruptFileError, match="not a readable sparsec model file"):
        sparsec.load(tmp_path / "garbage")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other")
    with pytest.raises(CorruptFileError, match="not a sparsec model file"):
        sparsec.load(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        sparsec.load(tmp_path / "missing")
    with pytest.raises(TypeError, match="CompiledModel"):
        sparsec.save(model, tmp_path / "x")


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

    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
    x = torch.randn(2, 32)
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
