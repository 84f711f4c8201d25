"""Helpers that keep a module's state untouched while sparsec runs it on example inputs."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparsec.errors import ParameterWriteError


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore every buffer and the random streams afterwards: a forward in train mode updates
    BatchNorm running stats and draws dropout masks, and a compile must neither change what the
    model computes nor which random numbers the user's program draws next."""
    saved = buffer_values(module)
    # Parameters are not copied (that would double a large model for every run); an in-place write to one
    # (`with torch.no_grad(): self.w.mul_(0.5)` in forward) shows in its version counter instead. It changed
    # the weights sparsec then pruned and compiled: outputs were wrong from the first call, silently.
    versions = _parameter_versions(module)
    cuda = sorted({t.device.index or 0 for t in [*module.parameters(), *module.buffers()] if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        restore_buffers(module, saved)
    written = [name for name, version in _parameter_versions(module).items() if versions.get(name, version) != version]
    if written:
        raise ParameterWriteError(f"the model's forward writes parameters {written} in place; sparsec compiles the "
                                f"weights as they are, and a forward that changes them on every call cannot be "
                                f"compiled faithfully. Move that update out of forward (into the training step)")


def buffer_values(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer's value now, for restore_buffers."""
    return {name: buf.detach().clone() for name, buf in module.named_buffers()}


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the values `buffer_values` copied (in place: a graph sharing a buffer sees them too)."""
    for name, buf in module.named_buffers():
        if name in saved:
            buf.data.copy_(saved[name])


def _parameter_versions(module: nn.Module) -> dict[str, int]:
    """In-place write counters of the parameters a forward is not meant to write: not inference tensors
    (a model made under torch.inference_mode: they count no versions), not the weights nn.Embedding
    renormalises in place itself (max_norm: the compiled graph calls that module, as the model does)."""
    renormalised = {f"{path}.weight" if path else "weight" for path, m in module.named_modules()
                    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}
    return {name: p._version for name, p in module.named_parameters()
            if name not in renormalised and not p.is_inference()}


def read_quietly(owner: nn.Module, attr: str):
    """getattr(owner, attr) for inspection, with no effect on the model: a parametrized tensor is computed
    by reading it, and a parametrization may update its own buffers as it does (spectral_norm takes a
    power-iteration step in training mode), so compiling, or asking a compiled model for a layer's weight,
    moved the model's spectral norm on. Computed without grad: a value to look at."""
    if not parametrize.is_parametrized(owner, attr):
        return getattr(owner, attr)
    with torch.no_grad(), preserved_state(owner):
        return getattr(owner, attr)
