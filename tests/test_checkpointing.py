"""Activation checkpointing through compile(train=True): the compiled model recomputes the forward's
torch.utils.checkpoint calls in backward, as the model does, and trains the same. Checkpointing is
observed directly: a forward hook on a checkpointed layer runs again during backward (on an early
layer of the span: the recomputation stops once it has what backward needs)."""
import collections
import copy
import functools
import io
import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import sparsec
from oracle import pruned_model


class Block(nn.Module):
    def __init__(self, dim=32, p=0.0):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Dropout(p)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.relu(self.fc1(x))))


class Net(nn.Module):
    """Blocks run under torch.utils.checkpoint, as transformer stacks do."""

    def __init__(self, reentrant=False, p=0.0, blocks=2):
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 4)
        self.blocks = nn.ModuleList([Block(p=p) for _ in range(blocks)])

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = ckpt.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.out(x)


def _compile(model, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's notes (checked where they matter)
        return sparsec.compile(model, example_inputs=(x,), **options)


def _forward_calls(module: nn.Module) -> list[bool]:
    """Record, for every forward of `module`, whether autograd's engine was running it (a recomputation)."""
    calls = []
    module.register_forward_hook(lambda *_: calls.append(torch._C._current_graph_task_id() != -1))
    return calls


def _grads(model, x):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    model(x).square().sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads_as(model, x, got_x, cm):
    """The eager model's input and parameter gradients equal those `cm` just computed (got_x: its input's)."""
    want_x, want = _grads(model, x)
    torch.testing.assert_close(got_x, want_x)
    for name, grad in want.items():
        torch.testing.assert_close(cm.graph_module.get_parameter(name).grad, grad)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("pattern", ["dense", "2:4"])
def test_checkpointed_blocks_are_recomputed_in_backward_and_train_the_same(reentrant, pattern):
    torch.manual_seed(0)
    model, x = Net(reentrant), torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"runs blocks.0, blocks.1 under torch.utils.checkpoint: the compiled model "
                                         r"does too"):
        cm = sparsec.compile(model, example_inputs=(x,), pattern=pattern, train=True,
                             include=["blocks.*"] if pattern != "dense" else None)
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 2
    inner, outer = _forward_calls(cm.graph_module.get_submodule("blocks.1.fc1")), _forward_calls(cm.graph_module.out)
    got_x, got = _grads(cm, x)
    assert inner == [False, True] and outer == [False]  # run once in forward, again in backward; `out` once
    # independent reference: the model itself (with the plan's pruned weights), checkpointed as written
    reference = pruned_model(model, cm.plan) if pattern != "dense" else model
    want_x, want = _grads(reference, x)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    for name, grad in want.items():
        compiled = cm.graph_module.get_parameter(name).grad
        if pattern != "dense" and ".fc" in name and name.endswith("weight"):
            grad = grad * (cm.mask(name.removesuffix(".weight")))  # pruned weights get no gradient
        torch.testing.assert_close(compiled, grad, atol=1e-5, rtol=1e-5)


def test_dropout_inside_a_checkpoint_draws_the_same_mask_when_recomputed():
    """preserve_rng_state: backward's recomputation draws forward's dropout masks, so the gradient is
    the gradient of what forward computed (the eager model, same seed, is the reference)."""
    model, x = Net(p=0.5), torch.randn(8, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    torch.manual_seed(3)
    got_x, got = _grads(cm, x)
    torch.manual_seed(3)
    _assert_same_grads_as(model, x, got_x, cm)


def test_an_inference_compile_of_the_trained_model_drops_checkpointing():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="2:4", train=True, include=["blocks.*"])
    with pytest.warns(UserWarning, match="which an inference compile does not keep"):
        served = sparsec.compile(cm, example_inputs=(x,))
    assert "checkpoint" not in served.graph_module.code
    torch.testing.assert_close(served(x), cm(x), atol=1e-5, rtol=1e-5)
    again = _compile(cm, x, train=True)  # compiled again for training: still recomputed
    calls = _forward_calls(again.graph_module.get_submodule("blocks.0.fc1"))
    again(x).sum().backward()
    assert calls == [False, True]


@pytest.mark.parametrize("how", ["sparsec.save", "torch.save", "deepcopy"])
def test_saved_and_copied_models_keep_checkpointing(how, tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="2:4", train=True, include=["blocks.*"])
    if how == "sparsec.save":
        sparsec.save(cm, tmp_path / "m.sparsec")
        loaded = sparsec.load(tmp_path / "m.sparsec")
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(cm, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    else:
        loaded = copy.deepcopy(cm)
    assert "# sparsec: blocks.0.fc1" in loaded.graph_module.code  # (annotations kept too)
    calls = _forward_calls(loaded.graph_module.get_submodule("blocks.1.fc1"))
    got_x, _ = _grads(loaded, x)
    assert calls == [False, True]
    want_x, _ = _grads(cm, x)
    torch.testing.assert_close(got_x, want_x)


class Shapes(nn.Module):
    """A checkpointed function whose values leave it in odd ways: a parameter read inside and used after,
    a Python int computed inside, two outputs, and a checkpoint nested in it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.full((32,), 0.5))

    def inner(self, h):
        return torch.tanh(self.fc2(h))

    def part(self, x):
        h = torch.relu(self.fc1(x)) * self.scale
        g = ckpt.checkpoint(self.inner, h, use_reentrant=False)
        return h, g, h.shape[0]

    def forward(self, x):
        h, g, rows = ckpt.checkpoint(self.part, x, use_reentrant=False)
        return self.fc3(g + h * self.scale) / rows


def test_values_leaving_a_checkpoint_and_nested_checkpoints():
    torch.manual_seed(0)
    model, x = Shapes(), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    code = cm.graph_module.code
    assert code.count("torch.utils.checkpoint.checkpoint(") == 1  # the nested call is part of the outer one
    calls = _forward_calls(cm.graph_module.fc2)
    got_x, got = _grads(cm, x)
    assert calls == [False, True]
    _assert_same_grads_as(model, x, got_x, cm)


def test_checkpoint_sequential_keeps_each_segment():
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])

        def forward(self, x):
            return ckpt.checkpoint_sequential(self.body, 2, x, use_reentrant=False)

    model, x = Seq(), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    # checkpoint_sequential runs its last segment plainly: one checkpoint call, as in the model
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    first, last = _forward_calls(cm.graph_module.get_submodule("body.0")), _forward_calls(cm.graph_module.get_submodule("body.3"))
    got_x, _ = _grads(cm, x)
    assert first == [False, True] and last == [False]
    torch.testing.assert_close(got_x, _grads(model, x)[0])


# selective checkpointing: the linear layers' products are saved in forward, the rest recomputed
SAVE_PRODUCTS = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default,
                                                                          torch.ops.aten.addmm.default])


class Selective(nn.Module):
    def __init__(self, context_fn=SAVE_PRODUCTS):
        super().__init__()
        self.context_fn = context_fn
        self.inp, self.block, self.out = nn.Linear(16, 32), Block(), nn.Linear(32, 4)

    def forward(self, x):
        h = ckpt.checkpoint(self.block, self.inp(x), use_reentrant=False, context_fn=self.context_fn)
        return self.out(h)


class CountOps(TorchDispatchMode):
    """Counts the aten ops run while it is active: a product selective checkpointing saved is not run again."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(model, x) -> collections.Counter:
    """The aten ops `model`'s backward runs (recomputation included)."""
    loss = model(x.detach().clone().requires_grad_(True)).square().sum()
    with CountOps() as ops:
        loss.backward()
    return ops.counts


def test_selective_checkpointing_is_kept():
    torch.manual_seed(0)
    model, x = Selective(), torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"with its context_fn where it passes one"):
        cm = sparsec.compile(model, example_inputs=(x,), pattern="dense", train=True)
    assert "context_fn = self._sparsec_checkpoint_contexts[0]" in cm.graph_module.code
    # the eager model is the reference: its backward runs the same ops, which is fewer products than
    # the same model checkpointing every op (so the count sees whether the policy was applied)
    fully = Selective(context_fn=ckpt.noop_context_fn)
    fully.load_state_dict(model.state_dict())
    want = _backward_ops(model, x)
    assert want[torch.ops.aten.addmm.default] < _backward_ops(fully, x)[torch.ops.aten.addmm.default]
    assert _backward_ops(cm, x) == want
    _assert_same_grads_as(model, x, _grads(cm, x)[0], cm)


def test_a_selectively_checkpointed_sparse_layer_runs_the_policy():
    calls = []

    def policy(ctx, op, *args, **kwargs):  # (torch >= 2.9 consults it in forward only)
        calls.append(op)
        saved = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(0)
    model, x = Selective(functools.partial(create_selective_checkpoint_contexts, policy)), torch.randn(4, 16)
    cm = _compile(model, x, pattern="2:4", train=True, include=["block.*"])
    reference = pruned_model(model, cm.plan)  # checkpointed with the same policy, as written
    products = torch.ops.aten.addmm.default
    assert _backward_ops(cm, x)[products] == _backward_ops(reference, x)[products]
    assert calls.count(products) == 2 * 2  # the two layers, in each model's forward
    got_x, _ = _grads(cm, x)
    want_x, want = _grads(reference, x)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
    for name, grad in want.items():
        if name.startswith("block.") and name.endswith("weight"):
            grad = grad * cm.mask(name.removesuffix(".weight"))  # pruned weights get no gradient
        torch.testing.assert_close(cm.graph_module.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-5)


class SaveProducts:
    """A context_fn that is a callable object with value equality, so not hashable."""

    def __eq__(self, other):
        return isinstance(other, SaveProducts)

    __hash__ = None

    def __call__(self):
        return SAVE_PRODUCTS()


def _reloaded(cm, how: str, tmp_path):
    if how == "deepcopy":
        return copy.deepcopy(cm)
    if how == "sparsec.save":
        sparsec.save(cm, tmp_path / "m.sparsec")
        return sparsec.load(tmp_path / "m.sparsec")
    buffer = io.BytesIO()
    torch.save(cm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["sparsec.save", "torch.save", "deepcopy"])
@pytest.mark.parametrize("context_fn", [SAVE_PRODUCTS, SaveProducts()], ids=["partial", "unhashable"])
def test_saved_and_copied_models_keep_selective_checkpointing(how, context_fn, tmp_path):
    """Its usual context_fn, a partial holding torch operators (which do not pickle), is saved too."""
    torch.manual_seed(0)
    model, x = Selective(context_fn), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    loaded = _reloaded(cm, how, tmp_path)
    code = loaded.graph_module.code
    assert "context_fn = self._sparsec_checkpoint_contexts[0]" in code
    assert code.count("torch.utils.checkpoint.checkpoint(") == 1
    assert _backward_ops(loaded, x) == _backward_ops(model, x)
    _assert_same_grads_as(model, x, _grads(loaded, x)[0], loaded)


def test_a_context_fn_pickle_cannot_keep_is_saved_as_full_checkpointing_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model, x = Selective(context_fn=lambda: SAVE_PRODUCTS()), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    with pytest.warns(UserWarning, match=r"cannot be pickled .*recomputes that call whole"):
        loaded = _reloaded(cm, "sparsec.save", tmp_path)
    assert "context_fn" not in loaded.graph_module.code
    assert loaded.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    calls = _forward_calls(loaded.graph_module.get_submodule("block.fc1"))
    _assert_same_grads_as(model, x, _grads(loaded, x)[0], loaded)
    assert calls == [False, True]


def test_a_saved_context_fn_this_process_cannot_import_loads_as_full_checkpointing_with_a_warning(tmp_path, monkeypatch):
    """A policy defined in the training script (pickled by reference to __main__) is not there when a server
    loads the model, which needs none of the model's own classes: the load failed altogether."""
    script = types.ModuleType("_sparsec_training_script")

    def policy(ctx, op, *args, **kwargs):
        saved = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    policy.__module__, policy.__qualname__, script.policy = script.__name__, "policy", policy
    monkeypatch.setitem(sys.modules, script.__name__, script)
    torch.manual_seed(0)
    model, x = Selective(functools.partial(create_selective_checkpoint_contexts, policy)), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    sparsec.save(cm, tmp_path / "m.sparsec")
    monkeypatch.delitem(sys.modules, script.__name__)  # (the serving process)
    with pytest.warns(UserWarning, match=r"context_fn .* cannot be loaded .*recomputes that call whole"):
        loaded = sparsec.load(tmp_path / "m.sparsec")
    assert "context_fn" not in loaded.graph_module.code
    assert loaded.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    _assert_same_grads_as(model, x, _grads(loaded, x)[0], loaded)


def test_a_context_fn_naming_a_higher_order_operator_is_saved():
    """Save lists name torch.ops.higher_order operators too (flex_attention): they did not pickle."""
    torch.manual_seed(0)
    save = [torch.ops.aten.addmm.default, torch.ops.higher_order.flex_attention]
    model, x = Selective(functools.partial(create_selective_checkpoint_contexts, save)), torch.randn(4, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "cannot be pickled")
        loaded = _reloaded(cm, "torch.save", None)
    assert loaded.graph_module._sparsec_checkpoint_contexts[0].args == (save,)
    assert _backward_ops(loaded, x) == _backward_ops(model, x)


def test_shrink_keeps_checkpointing_and_the_outputs():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="dense", train=True)
    with torch.no_grad():
        cm.graph_module.get_submodule("blocks.0.fc1").weight[:20] = 0  # 20 dead hidden neurons, and their biases
        cm.graph_module.get_submodule("blocks.0.fc1").bias[:20] = 0
    small = sparsec.shrink(cm)
    assert small.graph_module.get_submodule("blocks.0.fc1").weight.shape[0] == 44
    calls = _forward_calls(small.graph_module.get_submodule("blocks.0.fc1"))
    got_x, _ = _grads(small, x)
    assert calls == [False, True]
    torch.testing.assert_close(got_x, _grads(cm, x)[0], atol=1e-5, rtol=1e-5)


def test_torch_compile_of_a_checkpointed_model():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="2:4", train=True, include=["blocks.*"])
    compiled = torch.compile(cm, backend="aot_eager")
    got_x, got = _grads(compiled, x)
    want_x, want = _grads(cm, x)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)


def test_a_functional_layer_inside_a_checkpoint():
    """F.linear on a parameter (a functional layer: its node is replaced by the training rewrite) inside
    the checkpointed function: still recomputed, gradients as the pruned model's."""
    torch.manual_seed(0)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.w = nn.Parameter(torch.randn(32, 32) / 6)
            self.out = nn.Linear(32, 4)

        def mid(self, h):
            return F.gelu(F.linear(h, self.w))

        def forward(self, x):
            return self.out(ckpt.checkpoint(self.mid, self.inp(x), use_reentrant=False))

    model, x = Functional(), torch.randn(8, 16)
    cm = _compile(model, x, pattern="2:4", train=True, include=["w"])
    assert cm.plan["w"].sparsity == "2:4"
    calls = _forward_calls(cm.graph_module.sparse_w)  # the layer the rewrite put in F.linear's place
    got_x, _ = _grads(cm, x)
    assert calls == [False, True]
    want_x, _ = _grads(pruned_model(model, cm.plan), x)
    torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)


def test_readme_quotes_the_checkpointing_benchmark_as_measured():
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = " ".join(open(os.path.join(root, "README.md")).read().split())
    with open(os.path.join(root, "bench", "results", "checkpointing-cpu2-2026-11-24.json")) as f:
        rows = json.load(f)["rows"]
    kept, flat = rows["sparsec"], rows["sparsec_flat"]
    assert kept["saved_mb"] < 0.2 * flat["saved_mb"]
    assert (f"holds {kept['saved_mb']:.1f} MB for backward, against {flat['saved_mb']:.1f} MB for the same compile of "
            f"the model without checkpointing, at {kept['step_ms'] / flat['step_ms']:.2f}x the step time") in readme


class _NoGradInside(nn.Module):
    """torch.no_grad() inside a non-reentrant checkpointed function: its result is a constant to autograd."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def part(self, h):
        with torch.no_grad():
            g = self.b(h)
        return h * g

    def forward(self, x):
        return ckpt.checkpoint(self.part, self.a(x), use_reentrant=False)


def test_no_grad_inside_a_non_reentrant_checkpoint_is_kept():
    """The tracer let every grad-mode change inside a checkpoint pass (a reentrant one runs its function
    under no_grad), so the graph dropped the user's own torch.no_grad(): gradients flowed through it."""
    torch.manual_seed(0)
    model, x = _NoGradInside(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    got_x, got = _grads(cm, x)
    _assert_same_grads_as(model, x, got_x, cm)
    assert cm.graph_module.get_parameter("b.weight").grad is None


class _AutocastInside(_NoGradInside):
    def part(self, h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.b(h).float()


@pytest.mark.parametrize("inside", [_NoGradInside, _AutocastInside])
def test_a_capture_by_torch_export_keeps_checkpointing_for_training_only(inside):
    """A model only torch.export captures (here: no_grad / autocast inside the checkpoint): a training
    compile keeps its checkpoint calls (tests/test_checkpointing_export.py), an inference compile drops
    them, saying so, as it does for torch.fx graphs."""
    torch.manual_seed(0)
    model, x = inside(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 1
    assert any("captured by torch.export: the compiled model checkpoints them too" in note for note in cm.plan.notes)
    served = _compile(model, x, pattern="dense")
    assert "checkpoint" not in served.graph_module.code
    assert any("torch.utils.checkpoint" in note and "does not keep in an inference compile" in note
               for note in served.plan.notes)


class _ReentrantNoGradInside(_NoGradInside):
    def forward(self, x):
        return ckpt.checkpoint(self.part, self.a(x), use_reentrant=True)


class _ReentrantDecoratedNoGrad(_ReentrantNoGradInside):
    @torch.no_grad()
    def frozen(self, h):
        return self.b(h)

    def part(self, h):
        return h * self.frozen(h)


class _ReentrantAutocastInside(_AutocastInside):
    def forward(self, x):
        return ckpt.checkpoint(self.part, self.a(x), use_reentrant=True)


@pytest.mark.parametrize("model_class", [_ReentrantNoGradInside, _ReentrantDecoratedNoGrad, _ReentrantAutocastInside])
def test_a_reentrant_checkpoint_torch_fx_cannot_record_trains_as_the_model_does(model_class):
    """A reentrant call runs its function under no_grad, so the model's own no_grad inside it left the
    grad mode its ops saw as it was: the graph dropped it, and gradients flowed through the frozen branch.
    And torch.export, which captures such models, recorded the call's forward under no_grad: its
    parameters got no gradient at all. Now: captured by torch.export, checkpointed, with the gradients of
    the model."""
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.plan.notes[0].startswith("traced with torch.export")
    assert "use_reentrant = True" in cm.graph_module.code  # (kept: tests/test_checkpointing_export.py)
    got_x, _ = _grads(cm, x)
    _assert_same_grads_as(model, x, got_x, cm)
    assert cm.graph_module.get_parameter("a.weight").grad is not None
    if model_class is not _ReentrantAutocastInside:
        assert cm.graph_module.get_parameter("b.weight").grad is None


class _ReentrantUnderNoGrad(nn.Module):
    """A reentrant checkpoint called under the model's own torch.no_grad() (a frozen branch), whose ops all
    run inside the call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            g = ckpt.checkpoint(self.b, h, use_reentrant=True)
        return self.c(h * g)


def test_a_reentrant_checkpoint_under_the_models_own_no_grad_trains_as_the_model_does():
    """Inside a reentrant call grad is off, as the call sets it, so its ops matched the mode the tracer expects
    there and the model's no_grad around the call went unseen: the compiled model trained the frozen branch."""
    torch.manual_seed(0)
    model, x = _ReentrantUnderNoGrad(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    got_x, _ = _grads(cm, x)
    _assert_same_grads_as(model, x, got_x, cm)
    assert model.b.weight.grad is None and cm.graph_module.get_parameter("b.weight").grad is None


def test_a_reentrant_checkpoint_on_inputs_needing_no_grad_trains_nothing_inside_under_torch_export_too():
    """Where no input of a reentrant call requires grad, its output requires none and the parameters inside
    get no gradient (torch warns): the export capture does the same."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.side, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def part(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # (torch.fx cannot record it: export captures)
                return self.b(x).float()

        def forward(self, x):
            return self.side(x) + ckpt.checkpoint(self.part, x, use_reentrant=True)

    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's: none of the inputs require grad)
        cm = _compile(model, x, pattern="dense", train=True)
        assert cm.plan.notes[0].startswith("traced with torch.export")
        cm(x).sum().backward()
        model(x).sum().backward()
    assert model.b.weight.grad is None and cm.graph_module.get_parameter("b.weight").grad is None
    torch.testing.assert_close(cm.graph_module.get_parameter("side.weight").grad, model.side.weight.grad)


class _AutocastBlock(Block):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (torch.fx cannot record it: export captures)
            h = torch.relu(self.fc1(x))
        return x + self.fc2(h.float())


class _Stage(nn.Module):
    """A pipeline stage: its input is the previous stage's activation, which requires grad."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_AutocastBlock(dim=8) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = ckpt.checkpoint(block, x, use_reentrant=True)
        return x


def test_torch_export_fixing_that_a_reentrant_call_trains_nothing_is_noted():
    """Whether a reentrant call trains the code inside is decided on each call (does an input require grad?);
    torch.export fixes the example's answer. Example inputs that require no grad gave a graph that trains
    nothing in the stage, even for inputs that do, without a word: the plan says so, and example inputs
    that require grad give the model's gradients."""
    torch.manual_seed(0)
    model, x = _Stage(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's: none of the inputs requires grad)
        cm = _compile(model, x, pattern="dense", train=True)
    assert any("requires grad on the example inputs" in note and "_AutocastBlock" in note for note in cm.plan.notes)
    cm = _compile(model, x.clone().requires_grad_(True), pattern="dense", train=True)
    assert not any("requires grad on the example inputs" in note for note in cm.plan.notes)
    got_x, _ = _grads(cm, x)
    _assert_same_grads_as(model, x, got_x, cm)


def test_the_grad_mode_and_reentrant_call_patches_wait_for_the_running_trace():
    """Each trace patches torch._C._set_grad_enabled and CheckpointFunction.apply. One that patched before
    waiting for its turn (the model traced again in its other mode; the torch.export capture in that mode)
    took the running trace's patch for the original: one removed the other's, and a patch stayed for good."""
    from sparsec.checkpointing import reentrant_calls_run_plainly
    from sparsec.fx_tracer import Tracer
    from sparsec.tracing import TRACE_LOCK

    def patches():
        return torch._C._set_grad_enabled, ckpt.CheckpointFunction.__dict__.get("apply")

    release = threading.Event()

    def export_capture():
        with reentrant_calls_run_plainly():
            release.wait(5)

    original = patches()
    for work in (lambda: Tracer(keep_checkpoints=True).trace(Net(reentrant=True)), export_capture):
        release.clear()
        with TRACE_LOCK:  # another thread's trace, running
            thread = threading.Thread(target=work)
            thread.start()
            thread.join(0.3)
            assert patches() == original  # (not patched while it waits)
        release.set()
        thread.join(5)
        assert not thread.is_alive() and patches() == original


def test_names_in_the_model_do_not_clash_with_the_generated_functions():
    """A submodule named like a generated function (`_sparsec_checkpoint_0`, its call a local of the same
    name in forward), or `checkpoint` / `torch`: the model still runs checkpointed, computing the same."""

    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self._sparsec_checkpoint_0, self.torch = nn.Linear(8, 8), nn.Linear(8, 8)
            self.checkpoint = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self._sparsec_checkpoint_1 = nn.Linear(8, 8)

        def forward(self, x):
            h = ckpt.checkpoint(self.checkpoint, self._sparsec_checkpoint_0(x), use_reentrant=False)
            h = ckpt.checkpoint(self._sparsec_checkpoint_1, h, use_reentrant=False)
            return self.torch(h)

    torch.manual_seed(0)
    model, x = Clash(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    assert cm.graph_module.code.count("torch.utils.checkpoint.checkpoint(") == 2
    calls = _forward_calls(cm.graph_module.get_submodule("checkpoint.0"))
    got_x, got = _grads(cm, x)
    assert calls == [False, True]
    _assert_same_grads_as(model, x, got_x, cm)


def test_a_reentrant_checkpoint_trains_as_the_model_does_when_no_input_requires_grad():
    """A reentrant call whose inputs require no grad gives its parameters no gradient (torch warns):
    the eager model leaves them as they are. The compiled model recomputed it non-reentrant, which
    trains them: it computed other gradients than the model and trained layers the model does not."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.out = Block(dim=8), nn.Linear(8, 4)
            self.scale = nn.Parameter(torch.full((8,), 2.0))  # read inside the call (a get_attr node)

        def forward(self, x):
            return self.out(ckpt.checkpoint(lambda h: self.block(h) * self.scale, x, use_reentrant=True))

    torch.manual_seed(0)
    model, x = Head(), torch.randn(4, 8)
    cm = _compile(model, x, pattern="dense", train=True)
    calls = _forward_calls(cm.graph_module.get_submodule("block.fc1"))
    for m in (cm, model):
        m.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch's: none of the inputs requires grad)
            m(x).square().sum().backward()  # x itself requires no grad: the data
    for name, param in model.named_parameters():
        got = cm.graph_module.get_parameter(name).grad
        assert (got is None) == (param.grad is None), name
        if got is not None:
            torch.testing.assert_close(got, param.grad)
    assert model.block.fc1.weight.grad is None and calls == [False]
    # with an input that requires grad it is recomputed in backward, with the model's gradients
    calls.clear()
    got_x, _ = _grads(cm, x)
    assert calls == [False, True]
    _assert_same_grads_as(model, x, got_x, cm)
