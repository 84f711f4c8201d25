"""Shared process state under threads, forks and torch's global modes (found by the thread-safety review)."""
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.graph_module import RetraceTracer


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
