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
        assert "the C++ CPU kernels run linear layers (this one is a conv2d)" in lp.reason
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
