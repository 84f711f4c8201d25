"""Backend auto on the CPU keeps a layer's pruned weight dense where no C++ kernel runs it (convs,
float16 / bfloat16 / float64, no compiler): the torch runtime would rebuild that weight on every call
before the same op. The dense-kept layer computes the oracle's pruned model, keeps its mask as bits,
and says why in the plan."""
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from oracle import load_example, oracle_nm_mask, output_error, pruned_model
from sparsec.runtime.layers import SparseLayer
from sparsec.runtime.packed import DensePacked, pack_mask_bits, unpack_mask_bits


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 5), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_mask_bits_round_trip(out, k, seed):
    mask = torch.rand(out, k, generator=torch.Generator().manual_seed(seed)) > 0.5
    bits = pack_mask_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (out, -(-k // 8))
    # bit j of byte b is column 8b + j, counted independently of the packer
    for r in range(out):
        for c in range(k):
            assert bool(int(bits[r, c // 8]) >> (c % 8) & 1) == bool(mask[r, c])
    assert torch.equal(unpack_mask_bits(bits, k), mask)


@pytest.mark.parametrize("pattern", ["2:4", "fanin:0.9"])
def test_auto_keeps_sparse_convs_dense_on_cpu(pattern):
    model, inputs = load_example("cnn").build_model()
    cm = sparsec.compile(model, pattern=pattern, example_inputs=inputs)
    torch_cm = sparsec.compile(model, pattern=pattern, example_inputs=inputs, backend="torch")
    convs = [lp for lp in cm.plan.sparse_layers if lp.op == "conv2d"]
    assert convs
    for lp in convs:
        assert lp.backend == "dense", lp
        assert "the CPU kernels run linear layers (this one is a conv2d)" in lp.reason
        assert "backend='torch' keeps the compressed form" in lp.reason
        # the same pruned weight and mask as the compressed form's, and the mask is stored as bits
        assert torch.equal(cm.effective_weight(lp.name), torch_cm.effective_weight(lp.name))
        assert torch.equal(cm.mask(lp.name), torch_cm.mask(lp.name))
        module = cm.sparse_module(lp.name)
        assert isinstance(module.packed, DensePacked)
        assert lp.stored_bytes() == lp.dense_bytes() + lp.out_features * -(-lp.reduction // 8)
        assert sum(t.numel() * t.element_size() for t in module.packed.state_dict().values()) == lp.stored_bytes()
    with torch.no_grad():
        expected = pruned_model(model, cm.plan)(*inputs)
        assert output_error(cm(*inputs), expected) <= 1e-5
        assert output_error(torch_cm(*inputs), expected) <= 1e-5


def test_auto_plan_reapplies_and_torch_backend_still_compresses():
    """A plan from auto with dense-kept layers applies as it is; backend="torch" keeps everything
    compressed (no dense floating tensor as large as the weight)."""
    model, inputs = load_example("cnn").build_model()
    cm = sparsec.compile(model, example_inputs=inputs)
    again = sparsec.compile(model, example_inputs=inputs, plan=cm.plan)
    assert [lp.backend for lp in again.plan] == [lp.backend for lp in cm.plan]
    with torch.no_grad():
        assert torch.equal(again(*inputs), cm(*inputs))
    compressed = sparsec.compile(model, example_inputs=inputs, backend="torch")
    for m in compressed.graph_module.modules():
        if isinstance(m, SparseLayer):
            numel = torch.Size(m.weight_shape).numel()
            assert not any(t.is_floating_point() and t.numel() >= numel for t in m.state_dict().values())


def test_dense_kept_layer_saved_with_a_bool_mask_still_loads():
    """Files written before the mask was stored as bits hold a bool buffer 'stored_mask'."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 20, generator=g)
    mask = oracle_nm_mask(rows, 2, 4)
    packed = DensePacked.pack(rows, mask, None, None)
    del packed._buffers["mask_bits"]  # the old layout
    packed._buffers["stored_mask"] = mask.clone()
    old = io.BytesIO()
    torch.save(packed, old)
    loaded = torch.load(io.BytesIO(old.getvalue()), weights_only=False)
    assert "stored_mask" not in loaded._buffers and torch.equal(loaded.mask(), mask)
    assert torch.equal(loaded.rows(), rows * mask)
    assert torch.equal(pickle.loads(pickle.dumps(loaded)).mask(), mask)


# ------------------------------------------------------------------------------------------------ backend auto's choice


def _three_sparse_layers(dtype=torch.float32):
    """A model whose layers "2" and "4" are sparse by default (first and last stay dense) and share a shape."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dtype)
    return model, torch.randn(3, 32, dtype=dtype)


def test_editing_one_plan_entrys_launch_in_place_changes_nothing_else(monkeypatch):
    """The measurement's launch dict was the plan's LayerPlan.launch itself, shared by every layer of
    that shape and kept for the process: plan["2"].launch["max_rows"] = 1 also set layer "4"'s, and
    every later backend-auto compile in the process planned (and ran) max_rows 1."""
    from sparsec.codegen import measure
    from sparsec.passes import backend as backend_pass

    monkeypatch.setattr(backend_pass, "CPU_MEASUREMENTS", {})
    monkeypatch.setattr(backend_pass, "cpu_kernel_blocker", lambda *a, **k: None)  # (whether the library built)
    monkeypatch.setattr(measure, "pick_fastest", lambda *a, **k: ("bitmask", "stand-in measurement", {"max_rows": 64}))
    model, x = _three_sparse_layers()
    cm = sparsec.compile(model, example_inputs=(x,))
    assert cm.plan["2"].launch == cm.plan["4"].launch == {"max_rows": 64}
    cm.plan["2"].launch["max_rows"] = 1  # an edit of one entry
    assert cm.plan["4"].launch == {"max_rows": 64}
    again = sparsec.compile(model, example_inputs=(x,))  # (its measurement reused from the first compile)
    assert again.plan["2"].launch == again.plan["4"].launch == {"max_rows": 64}
    assert again.sparse_module("2").max_rows() == again.sparse_module("4").max_rows() == 64
    edited = sparsec.compile(model, example_inputs=(x,), plan=cm.plan)
    assert edited.sparse_module("2").max_rows() == 1 and edited.sparse_module("4").max_rows() == 64
    with torch.no_grad():
        for rows in (1, 2):  # the kernel, then the dense weight made per call
            xr = torch.randn(rows, 32)
            assert output_error(edited(xr), pruned_model(model, edited.plan)(xr)) <= 1e-5


def test_cpu_auto_times_the_modules_the_compiled_model_calls(monkeypatch):
    """The dense candidate was a bare F.linear and the kernel its kernel_forward, while the compiled
    model calls each layer's forward, whose checks cost the kernel layer ~13 us a call and the dense
    one ~4 us on this machine (a 64 x 64 layer's whole GEMM at one row is ~5 us): a kernel that
    measured faster could run slower than the dense layer. The timer stands in; the calls are real."""
    from sparsec.codegen import measure
    from sparsec.passes import backend as backend_pass
    from sparsec.runtime import bitmask_cpu
    from sparsec.runtime.bitmask_linear import BitmaskLinear
    from sparsec.runtime.layers import SparseLinear

    if not bitmask_cpu.is_available():
        pytest.skip("the C++ bitmask kernel did not build here")
    monkeypatch.setattr(backend_pass, "CPU_MEASUREMENTS", {})
    called = []
    for cls in (SparseLinear, BitmaskLinear):
        def forward(self, x, _forward=cls.forward):
            called.append((type(self).__name__, type(self.packed).__name__))
            return _forward(self, x)
        monkeypatch.setattr(cls, "forward", forward)
    timed = []

    def fake_time_cpu(fn, block_s=0.02, blocks=7, cold=False):
        called.clear()
        fn()
        timed.append(tuple(called))
        kind = called[0][0] if called else None  # None: a probe above the rows (two paths of the kernel module)
        return {"SparseLinear": 20e-6, "BitmaskLinear": 10e-6, None: 1e-3}[kind]

    monkeypatch.setattr(measure, "time_cpu", fake_time_cpu)
    model, x = _three_sparse_layers()
    cm = sparsec.compile(model, example_inputs=(x,))
    lp = cm.plan["2"]
    assert lp.backend == "bitmask" and "bitmask 10.0 us, dense 20.0 us -> bitmask (2.00x dense)" in lp.reason, lp.reason
    assert lp.launch == {"max_rows": 3}  # (the stand-in probe at 12 rows: a tie, which the kernel loses)
    # 3 rounds, each timing one forward of each module ("dense": the plain layer on the pruned weight,
    # what backend "dense" makes of it), then the probe at 12 rows (kernel and densified weight)
    dense, kernel = (("SparseLinear", "DensePacked"),), (("BitmaskLinear", "NMPacked"),)
    assert timed == [dense, kernel] * 3 + [(), ()], timed
    with torch.no_grad():
        assert output_error(cm(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_a_given_plan_naming_a_kernel_that_cannot_run_here_says_so(monkeypatch):
    """A plan made where the C++ library built, applied where it does not (no compiler, SPARSEC_NO_CPP):
    the layer runs the kernel's plain-torch fallback, the weight rebuilt per call, while its reason
    said only 'backend bitmask, set by the given plan'. The plan still applies as it is."""
    from sparsec.runtime import bitmask_cpu

    model, x = _three_sparse_layers()
    plan = sparsec.explain(model, example_inputs=(x,), backend="torch")
    plan["2"].backend, plan["2"].launch = "bitmask", {"max_rows": 4}
    here = sparsec.compile(model, example_inputs=(x,), plan=plan).plan["2"]
    assert "fallback" not in here.reason or not bitmask_cpu.is_available()
    monkeypatch.setattr(bitmask_cpu, "is_available", lambda: False)
    cm = sparsec.compile(model, example_inputs=(x,), plan=plan)
    lp = cm.plan["2"]
    assert lp.backend == "bitmask" and lp.launch == {"max_rows": 4}
    assert ("backend bitmask, set by the given plan, but the C++ bitmask kernel could not be built or loaded here"
            in lp.reason and "runs the kernel's plain-torch fallback, slower than dense" in lp.reason), lp.reason
    with torch.no_grad():
        for rows in (4, 5):
            xr = torch.randn(rows, 32)
            assert output_error(cm(xr), pruned_model(model, cm.plan)(xr)) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("pattern, backend", [("2:4", "bitmask"), ("fanin:0.75", "condensed")])
def test_a_plans_max_rows_splits_calls_at_exactly_its_rows(monkeypatch, dtype, tol, pattern, backend):
    """launch {"max_rows": 4} from an edited plan: the kernel up to 4 rows, counted over every leading
    dimension (a [2, 3, K] input is 6 rows), the dense weight made per call above; both give what
    F.linear gives on the masked weight, in every dtype the kernels run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 8)).to(dtype)
    x = torch.randn(3, 16, dtype=dtype)
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), backend="torch")
    plan["2"].backend, plan["2"].launch = backend, {"max_rows": 4}
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(x,), plan=plan)
    assert (cm.plan["2"].backend, cm.plan["2"].launch) == (backend, {"max_rows": 4})
    layer, paths = cm.sparse_module("2"), []
    for path in ("kernel_forward", "many_rows"):
        monkeypatch.setattr(layer, path, lambda h, _f=getattr(layer, path), _p=path: (paths.append(_p), _f(h))[1])
    reference = pruned_model(model, cm.plan)
    for shape, path in [((3, 16), "kernel_forward"), ((4, 16), "kernel_forward"), ((5, 16), "many_rows"),
                        ((1, 4, 16), "kernel_forward"), ((2, 2, 16), "kernel_forward"), ((2, 3, 16), "many_rows"),
                        ((5, 1, 16), "many_rows")]:
        paths.clear()
        h = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            y, expected = cm(h), reference(h)
        assert paths == [path], (shape, paths)
        assert y.dtype == dtype and y.shape == expected.shape and output_error(y, expected) <= tol, shape


def _mlp(width: int, extra: int):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU()]
    layers += [torch.nn.Linear(128, extra), torch.nn.ReLU(), torch.nn.Linear(extra, width)]
    return torch.nn.Sequential(*layers), torch.randn(2, 64)


def test_a_layer_shape_is_measured_once_in_models_of_any_size_and_the_measurements_are_bounded(monkeypatch):
    """The process-wide measurements were keyed on the note saying the weights were timed hot, which names
    the model's size: the same layer shape in a larger model was timed again, and a sweep over shapes grew
    them without bound (found by the leak review). The reused result quotes this model's size."""
    from sparsec.codegen import measure
    from sparsec.passes import backend as backend_pass

    monkeypatch.setattr(backend_pass, "CPU_MEASUREMENTS", {})
    monkeypatch.setattr(backend_pass, "cpu_kernel_blocker", lambda *a, **k: None)
    measured = []

    def stand_in(gm, ctx, layer, decision, m, blocker, device="cuda", input_shape=None, graph=False, cpu_cold=None):
        measured.append(layer.weight_shape)
        return "dense", f"backend auto at M={m}: stand-in, {cpu_cold[1]}", None
    monkeypatch.setattr(measure, "pick_fastest", stand_in)
    small = sparsec.compile(*_mlp(8, 128)[:1], example_inputs=_mlp(8, 128)[1:], include=[".*"])
    assert measured.count((128, 128)) == 1
    large = sparsec.compile(*_mlp(8, 512)[:1], example_inputs=_mlp(8, 512)[1:], include=[".*"])
    assert measured.count((128, 128)) == 1, "the 128 x 128 layer was timed again in a larger model"
    for cm in (small, large):
        assert cm.plan["2"].reason.count("the model's") == 1
    assert small.plan["2"].reason != large.plan["2"].reason  # (each quotes its own model's size)
    monkeypatch.setattr(backend_pass, "SHARED_SHAPES_KEPT", 3)
    for width in (8, 16, 24, 32):
        sparsec.compile(*_mlp(width, 128)[:1], example_inputs=_mlp(width, 128)[1:], include=[".*"])
    assert len(backend_pass.CPU_MEASUREMENTS) <= 3
