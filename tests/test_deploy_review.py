"""What a user deploying a compiled model does with it: torch.export (dynamic batch, save / load),
torch.compile after eval() / load_state_dict / with dynamic=True, state dicts between compiles,
calls with inputs of the wrong kind. Each result is checked against plain torch on the pruned model."""
import copy
import gc
import inspect
import pickle

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import sparsec
from oracle import output_error, pruned_model
from sparsec.errors import InvalidInputError
from sparsec.runtime import bitmask_cpu, condensed_cpu


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16))


def _on_backend(model, x, pattern, backend):
    """`model` compiled with every layer sparse and run by `backend` (backend auto's timing would pick
    bitmask / condensed / dense by chance: the plan fixes the choice)."""
    plan = sparsec.explain(model, pattern=pattern, example_inputs=(x,), include=[".*"], min_weights=0)
    for lp in plan:
        lp.backend, lp.launch = backend, None
    return sparsec.compile(model, example_inputs=(x,), plan=plan)


needs_kernels = pytest.mark.skipif(not (bitmask_cpu.is_available() and condensed_cpu.is_available()),
                                   reason="the C++ CPU kernels did not build here")
KERNELS = [("2:4", "bitmask"), ("fanin:0.9", "condensed")]


@needs_kernels
@pytest.mark.parametrize("pattern,backend", KERNELS)
def test_fullgraph_compile_after_eval_and_after_load_state_dict(pattern, backend):
    """cm.eval() set `training` on every layer, which dropped the CPU kernel's layout (as any attribute
    set did), and load_state_dict dropped it too: the next torch.compile(fullgraph=True) call had to
    build it inside the graph and failed ("Skip inlining torch.compiler.disable()d function")."""
    model, x = _mlp(), torch.randn(8, 64)
    cm = _on_backend(model, x, pattern, backend)
    fresh = _on_backend(_mlp(1), x, pattern, backend)
    fresh.load_state_dict(cm.state_dict())
    ref = pruned_model(model, cm.plan)
    for m in (cm.eval(), fresh):
        torch._dynamo.reset()
        with torch.no_grad():
            assert output_error(torch.compile(m, backend="eager", fullgraph=True)(x), ref(x)) <= 1e-5


@needs_kernels
@pytest.mark.parametrize("pattern,backend", KERNELS)
def test_compile_with_dynamic_shapes_and_gradients(pattern, backend):
    """dynamic=True makes the feature dim symbolic too; the kernel wrapper's check of it inside the
    layer's autograd.Function failed TorchDynamo with an internal AssertionError (with or without
    fullgraph), so a compiled model called with gradients wanted (a bias requires grad) never ran."""
    model, x = _mlp(), torch.randn(8, 64)
    cm = _on_backend(model, x, pattern, backend)
    ref = pruned_model(model, cm.plan)
    compiled = torch.compile(cm, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (8, 3):
        xa = torch.randn(rows, 64, requires_grad=True)
        xb = xa.detach().clone().requires_grad_(True)
        ya, yb = compiled(xa), ref(xb)
        assert output_error(ya, yb) <= 1e-5
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert output_error(xa.grad, xb.grad) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "bitmask"])
def test_export_with_a_dynamic_batch_as_torch_documents_it(backend, tmp_path):
    """CompiledModel.forward took (*args, **kwargs), and torch.export binds dynamic_shapes by the forward's
    signature: export(cm, (x,), dynamic_shapes=({0: batch},)) was refused as a structure mismatch, and
    keyed by the model's argument name as well. It now has the graph's signature, after pickling too."""
    if backend == "bitmask" and not bitmask_cpu.is_available():
        pytest.skip("the C++ bitmask kernel did not build here")
    model, x = _mlp(), torch.randn(8, 64)
    cm = _on_backend(model, x, "2:4", backend)
    ref = pruned_model(model, cm.plan)
    other = torch.randn(5, 64)
    for dynamic in (({0: Dim("batch")},), {"input": {0: Dim("batch")}}):
        exported = torch.export.export(cm, (x,), dynamic_shapes=dynamic)
        assert output_error(exported.module()(other), ref(other)) <= 1e-5
    torch.export.save(exported, tmp_path / "cm.pt2")
    assert output_error(torch.export.load(tmp_path / "cm.pt2").module()(other), ref(other)) <= 1e-5
    loaded = pickle.loads(pickle.dumps(cm))
    assert str(inspect.signature(loaded.forward)) == str(inspect.signature(cm.forward)) == "(input)"
    assert output_error(loaded(other), ref(other)) <= 1e-5


def test_export_records_triton_layers_as_portable_ops(tmp_path):
    """Exported under no_grad, a Triton layer recorded torch.ops.sparsec.kernel_layer(x, handle): a handle
    naming a layer object of this process. Once that model was gone the program failed, and loaded in
    another process it ran whichever layer took that handle there: another model's, silently."""
    model, x = _mlp(), torch.randn(4, 64)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    ref = pruned_model(model, cm.plan)
    with torch.no_grad():
        exported = torch.export.export(cm, (x,))
    assert "kernel_layer" not in exported.graph_module.code
    torch.export.save(exported, tmp_path / "cm.pt2")
    del cm, exported
    gc.collect()
    other = sparsec.compile(_mlp(7), example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    with torch.no_grad():
        assert output_error(torch.export.load(tmp_path / "cm.pt2").module()(x), ref(x)) <= 1e-5
    del other


def test_a_state_dict_from_a_compile_on_another_backend_names_the_cause():
    """backend auto picks each layer's stored form by timing (the kernel's packed values, or the pruned
    weight kept dense), so two compiles of one model can differ; loading one's state dict into the other
    raised torch's missing / unexpected keys and size mismatches, which did not say why."""
    model, x = _mlp(), torch.randn(8, 64)
    packed = _on_backend(model, x, "2:4", "torch")
    dense = _on_backend(model, x, "2:4", "dense")
    with pytest.raises(InvalidInputError, match=r"layer '0' is stored here as the pruned weight kept dense.*plan="):
        dense.load_state_dict(packed.state_dict())
    with pytest.raises(InvalidInputError, match="stored here as N:M packed values"):
        packed.load_state_dict(dense.state_dict(), strict=False)
    # also where the compiled model sits inside a larger one, loaded through its parent (raw torch errors before)
    with pytest.raises(InvalidInputError, match=r"layer '0' is stored here as the pruned weight kept dense"):
        nn.Sequential(dense, nn.Linear(16, 2)).load_state_dict(nn.Sequential(packed, nn.Linear(16, 2)).state_dict())
    with pytest.raises(InvalidInputError, match=r"keyed like the model before compiling \(0.weight"):
        nn.Sequential(packed, nn.Linear(16, 2)).load_state_dict(nn.Sequential(model, nn.Linear(16, 2)).state_dict())
    # the remedy it names: compile with the saving model's plan
    again = sparsec.compile(_mlp(3), example_inputs=(x,), plan=packed.plan)
    again.load_state_dict(packed.state_dict())
    with torch.no_grad():
        assert output_error(again(x), pruned_model(model, packed.plan)(x)) <= 1e-6


@needs_kernels
@pytest.mark.parametrize("pattern,backend", KERNELS)
def test_a_kernel_layer_given_none_raises_as_linear_does(pattern, backend):
    """A CPU kernel layer read x.shape first: cm(None) or cm([x]) raised AttributeError ('NoneType' object
    has no attribute 'shape') where nn.Linear and the torch runtime raise a TypeError that the compiled
    model explains (arguments fixed at trace time)."""
    model, x = _mlp(), torch.randn(8, 64)
    cm = _on_backend(model, x, pattern, backend)
    with pytest.raises(TypeError, match="passing None for input"):
        cm(None)
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        cm([x])


def test_sdgp_training_step_compiles_with_fullgraph():
    """SDGP's forward asked y._is_view(), which TorchDynamo cannot trace: torch.compile(fullgraph=True) of
    a training step with grad_pattern failed. Gradients must equal the eager step's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Linear(128, 16))
    for x in (torch.randn(8, 64), torch.randn(2, 4, 64)):
        cm = sparsec.compile(model, example_inputs=(x,), train=True, grad_pattern="2:4", include=[".*"], min_weights=0)
        eager, traced = copy.deepcopy(cm), copy.deepcopy(cm)
        eager(x).square().sum().backward()
        torch.compile(traced, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
        grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), traced.parameters())]
        assert all(a is not None and torch.allclose(a, b, atol=1e-5) for a, b in grads)


@needs_kernels
@pytest.mark.parametrize("pattern,backend", KERNELS)
def test_a_jit_trace_holds_portable_ops(pattern, backend, tmp_path):
    """torch.jit.trace recorded the C++ kernel's operator (sparsec_bitmask::linear): the saved trace failed
    to load in a process that had not built the kernel ("Unknown builtin op"), sparsec imported or not."""
    import warnings

    model, x = _mlp(), torch.randn(8, 64)
    cm = _on_backend(model, x, pattern, backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(cm, x)
    assert not [n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("sparsec")]
    torch.jit.save(traced, tmp_path / "cm.pt")
    other = torch.randn(3, 64)
    with torch.no_grad():
        assert output_error(torch.jit.load(tmp_path / "cm.pt")(other), pruned_model(model, cm.plan)(other)) <= 1e-5
