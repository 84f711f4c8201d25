"""Compiled models under torch.compile: Triton layers trace as one custom operator each (the
kernels run in the interpreter without a GPU), into a single graph, and compute what eager does."""
import copy

import pytest
import torch
import torch.nn as nn

import sparsec
from oracle import output_error, pruned_model
from sparsec.runtime.triton_linear import FusedEpilogue
from test_triton_conv import ConvNet

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.Linear(64, 8)).to(DEVICE)


def _triton_layers(cm) -> int:
    return sum(isinstance(m, FusedEpilogue) for m in cm.modules())


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_triton_layers_trace_into_one_graph_and_match_eager(quantize):
    model, x = _mlp(), torch.randn(3, 5, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0,
                         quantize=quantize)
    assert _triton_layers(cm) == 4
    with torch.no_grad():
        eager = cm(x)
        explained = torch._dynamo.explain(cm)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        assert explained.graphs[0].code.count("sparsec.kernel_layer") == 4
        compiled = torch.compile(copy.deepcopy(cm), backend="aot_eager")
        assert torch.equal(compiled(x), eager)


def test_torch_compile_is_not_taken_for_torch_export(monkeypatch):
    """TorchDynamo before pytorch#176499 (torch 2.11, the H100 image's) replaced torch.compiler.is_exporting()
    by True while tracing anything, so every kernel layer under torch.compile recorded its reference, the
    portable form meant for torch.export (the decode bench's MLP block ran 4x slower than the original).
    Patched to answer as it did there, the layers still trace as their operator and torch.export still
    records references."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    model, x = _mlp(), torch.randn(2, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    with torch.no_grad():
        explained = torch._dynamo.explain(cm)(x)
        assert explained.graphs[0].code.count("sparsec.kernel_layer") == 4
        exported = torch.export.export(cm, (x,))
    assert "kernel_layer" not in str(exported.graph)
    assert output_error(exported.module()(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_inductor_runs_the_kernels_it_cannot_see_into():
    model, x = _mlp(), torch.randn(4, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    with torch.no_grad():
        assert output_error(torch.compile(cm)(x), pruned_model(model, cm.plan)(x)) <= 1e-5


def test_conv_layers_trace_with_their_output_shapes():
    """Every padding form and the conv1d stage: the operator's shape-only version gives each output
    shape as the kernel makes it (a wrong one fails the compiled graph's checks)."""
    torch.manual_seed(0)
    model, x = ConvNet("reflect").eval().to(DEVICE), torch.randn(2, 4, 12, 12, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", min_weights=0)
    with torch.no_grad():
        eager = cm(x)
        explained = torch._dynamo.explain(cm)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        compiled = torch.compile(cm, backend="aot_eager")
        assert torch.equal(compiled(x), eager)
        other = torch.randn(3, 4, 10, 14, device=DEVICE)  # a second shape: traced again, with symbolic sizes
        assert torch.equal(compiled(other), cm(other))


def test_unbatched_conv_inputs_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 8, 1)).to(DEVICE)
    x = torch.randn(4, 12, 12, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    assert _triton_layers(cm) == 3
    with torch.no_grad():
        assert torch.equal(torch.compile(cm, backend="aot_eager")(x), cm(x))


def test_with_gradients_the_traced_layers_run_their_reference():
    """The kernels have no backward: a traced call that needs gradients runs the layer's plain-torch
    reference (the same math), and gradients flow to the input and the biases as in eager mode."""
    model, x = _mlp(), torch.randn(4, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    compiled = torch.compile(copy.deepcopy(cm), backend="aot_eager")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = compiled(xa), cm(xb)
    assert output_error(ya, yb) <= 1e-5
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert output_error(xa.grad, xb.grad) <= 1e-5


def test_a_loaded_model_compiles_and_a_dead_handle_is_named(tmp_path):
    model, x = _mlp(), torch.randn(2, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    sparsec.save(cm, tmp_path / "m.sparsec")
    loaded = sparsec.load(tmp_path / "m.sparsec")
    handles = {m._traced_handle for m in cm.modules() if isinstance(m, FusedEpilogue)}
    loaded_handles = {m._traced_handle for m in loaded.modules() if isinstance(m, FusedEpilogue)}
    assert len(handles) == len(loaded_handles) == 4 and not handles & loaded_handles
    with torch.no_grad():
        assert torch.equal(torch.compile(loaded, backend="aot_eager")(x), cm(x))
    with pytest.raises(RuntimeError, match="no live kernel layer has handle -1"):
        torch.ops.sparsec.kernel_layer(x, -1)


def test_a_deleted_models_handles_leave_the_registry():
    """The registry that finds layers by handle holds them weakly and forgets them with the model: a
    process compiling model after model kept one dead entry per layer forever."""
    import gc

    from sparsec.runtime import traced_call

    model, x = _mlp(), torch.randn(2, 64, device=DEVICE)
    cm = sparsec.compile(model, example_inputs=(x,), backend="triton", include=[".*"], min_weights=0)
    handles = [m._traced_handle for m in cm.modules() if isinstance(m, FusedEpilogue)]
    assert len(handles) == 4 and all(h in traced_call._LAYERS for h in handles)
    del cm
    gc.collect()
    assert not any(h in traced_call._LAYERS for h in handles)
    with pytest.raises(RuntimeError, match=f"no live kernel layer has handle {handles[0]}"):
        torch.ops.sparsec.kernel_layer(x, handles[0])


def test_cusparselt_layers_trace_as_one_operator(monkeypatch):
    """A cuSPARSELt layer's semi-structured weight is a tensor subclass the tracer is not asked to see
    into: the layer traces as the same custom operator. (cuSPARSELt needs CUDA: here the library call
    is stood in by the dense product it computes; the operator around it is what is tested.)"""
    from oracle import oracle_nm_mask
    from sparsec.patterns import parse_pattern
    from sparsec.runtime.cusparselt_linear import CusparseltLinear
    from sparsec.runtime.packed import PackedWeight

    torch.manual_seed(0)
    w, bias = torch.randn(32, 64), torch.randn(32)
    packed = PackedWeight.pack(w, oracle_nm_mask(w, 2, 4), parse_pattern("2:4"), None)
    layer = CusparseltLinear(packed, bias, "linear", (32, 64), "fc", "2:4", "")
    monkeypatch.setattr(CusparseltLinear, "kernel_forward", lambda self, x: torch.nn.functional.linear(
        x, self.packed.rows(), self.bias))
    model, x = nn.Sequential(layer, nn.ReLU()), torch.randn(4, 64)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        assert "sparsec.kernel_layer" in explained.graphs[0].code
        assert torch.equal(torch.compile(model, backend="aot_eager")(x), model(x))
        assert output_error(model(x), torch.relu(x @ (w * oracle_nm_mask(w, 2, 4)).t() + bias)) <= 1e-6
    xg = x.clone().requires_grad_(True)  # with gradients wanted, the traced layer runs its reference
    assert output_error(torch.compile(model, backend="aot_eager")(xg), model(x)) <= 1e-6


def test_each_compiled_model_compiles_on_its_own():
    """Each compiled model's graph module is of a class of its own; with one forward shared by every
    CompiledModel, TorchDynamo took one entry of that frame's cache per model, and past torch's
    recompile limit (8) ran further models eagerly (fullgraph=True: refused them). Patched to a limit
    of 2, three models each compile one graph; inside a parent model and under export they still work."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    counters = torch._dynamo.utils.counters["stats"]
    x = torch.randn(2, 64, device=DEVICE)
    with torch._dynamo.config.patch(**{limit: 2}), torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            cm = sparsec.compile(_mlp(), example_inputs=(x,), include=[".*"], min_weights=0)
            before = counters["unique_graphs"]
            assert torch.equal(torch.compile(cm, backend="eager", fullgraph=True)(x), cm(x))
            assert counters["unique_graphs"] == before + 1, f"model {seed} ran without a graph"
    parent = nn.Sequential(cm, nn.ReLU())
    with torch.no_grad():
        assert torch.equal(torch.compile(parent, backend="eager", fullgraph=True)(x), parent(x))
    exported = torch.export.export(cm, (x,))
    # Where backend auto picked the CPU kernel (a timing call, so not every run), export records the
    # layer's torch form: the same products, summed in another order.
    torch.testing.assert_close(exported.module()(x), cm(x), rtol=1e-5, atol=1e-6)
    assert isinstance(copy.deepcopy(cm), sparsec.CompiledModel) and type(cm).__name__ == "CompiledModel"


@pytest.mark.parametrize("pattern", ["unstructured:0.7", "fanin:0.75", "2:4"])
def test_training_layers_compiled_one_by_one_match_eager(pattern):
    """Compiling each layer on its own (as per-block compile does) runs one forward's code for weights of
    several shapes, so torch.compile makes the weight's shape dynamic: SR-STE's mask count must be
    computable from a symbolic size, and training must match an uncompiled copy step for step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 48))
    cm = sparsec.compile(model, pattern=pattern, example_inputs=(torch.randn(4, 32),), train=True,
                         weight_update="ste", grad_pattern="2:4", min_weights=0, include=[".*"])
    eager = copy.deepcopy(cm)
    layers = [m for m in cm.graph_module.modules() if hasattr(m, "layer_name")]
    assert len(layers) == 3
    for layer in layers:
        layer.compile(backend="aot_eager")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (cm, eager)]
    for step in range(3):
        x = torch.randn(4 + step, 32)
        for m, optimizer in zip((cm, eager), optimizers):
            optimizer.zero_grad()
            m(x).square().sum().backward()
            optimizer.step()
    for (name, got), want in zip(cm.named_parameters(), eager.parameters()):
        assert torch.equal(got, want), name
