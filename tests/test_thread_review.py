"""Shared process state under threads, forks and torch's global modes (found by the thread-safety review)."""
import multiprocessing
import os
import threading
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from oracle import output_error, pruned_model
from sparsec.fork_safe import fork_safe
from sparsec.tracing import TRACE_LOCK, RetraceTracer


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class GeluNet(ReluNet):  # the same module names, another forward
    def forward(self, x):
        return self.c(F.gelu(self.b(F.gelu(self.a(x)))) * 3.0)


def test_two_models_loaded_at_once_each_compute_their_own_forward(tmp_path, monkeypatch):
    """fx rebuilds a pickled graph module by setting its code on a class the whole process shares, then
    tracing it: a second load in between (held here at that point) set its own code there, and the first
    model came back computing the second's forward on its own weights, without an error."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    expected = {}
    for name, cls in (("relu", ReluNet), ("gelu", GeluNet)):
        cm = sparsec.compile(cls(), "2:4", (x,), backend="torch")
        sparsec.save(cm, tmp_path / f"{name}.sparsec")
        with torch.no_grad():
            expected[name] = cm(x)
    first_tracing, original = threading.Event(), RetraceTracer.trace

    def held_trace(self, root, concrete_args=None):
        if threading.current_thread().name == "first":
            first_tracing.set()
            time.sleep(0.5)  # (the second load runs meanwhile, as far as the lock lets it)
        return original(self, root, concrete_args)

    monkeypatch.setattr(RetraceTracer, "trace", held_trace)
    loaded = {}

    def load(name):
        loaded[name] = sparsec.load(tmp_path / f"{name}.sparsec")
    first = threading.Thread(target=load, args=("relu",), name="first")
    first.start()
    assert first_tracing.wait(60)
    load("gelu")
    first.join()
    with torch.no_grad():
        for name, cm in loaded.items():
            assert torch.allclose(cm(x), expected[name], atol=1e-6), name


def _compile_in_child(queue):
    # (GNU OpenMP's thread pool does not survive a fork: a child's first multi-threaded GEMM after the
    # parent ran some waits for the parent's threads for ever, sparsec or not. DataLoader workers, forked
    # the same way, run one thread for this reason.)
    torch.set_num_threads(1)
    try:
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        cm = sparsec.compile(model, "2:4", (torch.randn(4, 64),), backend="torch")
        queue.put(sum(1 for lp in cm.plan if lp.sparsity))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(repr(e))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_another_thread_traces_can_compile():
    """os.fork copies only the forking thread: TRACE_LOCK, held by a thread tracing in the parent (a server
    compiling in the background while it forks workers), came into the child held by no thread there, and
    every compile in the child waited for ever."""
    holding, done = threading.Event(), threading.Event()

    def trace_in_background():
        with TRACE_LOCK:
            holding.set()
            done.wait(60)
    background = threading.Thread(target=trace_in_background)
    background.start()
    try:
        assert holding.wait(60)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_compile_in_child, args=(queue,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (fork with threads running: what this tests)
            child.start()
        child.join(60)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
        assert not hung, "the child's compile waited for a lock no thread of it holds"
        assert queue.get(timeout=10) == 1  # (the middle layer: the first and last stay dense)
    finally:
        done.set()
        background.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_safe_locks_are_free_in_the_child_unless_the_forking_thread_holds_them():
    lock, rlock, own = fork_safe(threading.Lock()), fork_safe(threading.RLock()), fork_safe(threading.RLock())
    holding, done = threading.Event(), threading.Event()

    def hold():
        with lock, rlock:
            holding.set()
            done.wait(60)
    other = threading.Thread(target=hold)
    other.start()
    assert holding.wait(60)
    with own, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
        if pid == 0:  # the child: the other thread's locks are free, its own RLock still its own
            ok = lock.acquire(timeout=5) and rlock.acquire(timeout=5) and own._is_owned()
            os._exit(0 if ok else 1)
    done.set()
    other.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.parametrize("options", [{}, {"train": True, "grad_pattern": "2:4"}, {"train": True, "weight_update": "ste"}])
def test_a_model_compiled_under_inference_mode_runs_and_trains_in_grad_mode(options):
    """Under torch.inference_mode() every tensor made is an inference tensor for good: a model compiled in a
    server's start-up code failed when called in grad mode ('Inference tensors cannot be saved for backward')
    and could not be trained. It compiles as under no_grad, and the mode is the caller's again after."""
    model, x = _mlp(), torch.randn(8, 128)
    with torch.inference_mode():
        cm = sparsec.compile(model, "2:4", (x,), backend="torch", **options)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    assert not any(t.is_inference() for t in [*cm.parameters(), *cm.buffers()])
    reference = pruned_model(model, cm.plan)
    y = cm(x)
    assert output_error(y, reference(x)) <= 1e-5
    y.sum().backward()
    if options:
        assert all(p.grad is not None for p in cm.parameters())
    with torch.inference_mode():
        assert output_error(cm(x), reference(x)) <= 1e-5


class Noisy(nn.Module):
    def __init__(self, fail: bool):
        super().__init__()
        self.fail = fail
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        noise = torch.randn(64)  # (a fixed shape: torch.fx draws it while tracing)
        if self.fail:
            raise ValueError("the model's own error")
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) + noise)))


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("entry", ["compile", "explain"])
def test_compile_draws_nothing_from_the_callers_random_stream(entry, fail):
    """Tracing runs the forward: its torch.randn took numbers from the caller's stream (the export and eager
    runs restored it, the fx traces did not), so the program drew other numbers after a compile than without."""
    model, x = Noisy(fail), torch.randn(4, 64)
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    try:
        getattr(sparsec, entry)(model, "2:4", (x,), min_weights=0, include=["b"])
    except sparsec.SparsecError:
        assert fail
    assert torch.equal(torch.rand(3), expected)


def test_the_nothing_sparse_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="no layer was made sparse") as record:
        sparsec.compile(nn.Sequential(nn.Linear(4, 4)), "2:4", (torch.randn(2, 4),))
    assert [w.filename for w in record if "no layer" in str(w.message)] == [__file__]


class ScaledOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        scale = torch.linspace(0.5, 1.5, 64)  # (reads no input: a tensor constant of the trace)
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) * scale


def test_a_capture_under_inference_mode_leaves_no_inference_constant():
    """The capture runs in the caller's inference mode; the constants it makes are ordinary tensors after it
    (an inference constant multiplied in grad mode cannot be saved for backward)."""
    torch.manual_seed(0)
    model, x = ScaledOut(), torch.randn(4, 64)
    with torch.inference_mode():
        cm = sparsec.compile(model, "2:4", (x,), backend="torch", train=True, min_weights=0, include=["b"])
    tensors = [t for m in cm.modules() for t in [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]
               if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)
    y = cm(x)
    assert output_error(y, pruned_model(model, cm.plan)(x)) <= 1e-5
    y.sum().backward()
    assert cm.sparse_module("b").weight.grad is not None
