"""Helpers that keep a module's state untouched while sparsec runs it on example inputs."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore every buffer and the random streams afterwards: a forward in train mode updates
    BatchNorm running stats and draws dropout masks, and a compile must neither change what the
    model computes nor which random numbers the user's program draws next."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    cuda = sorted({t.device.index or 0 for t in [*module.parameters(), *module.buffers()] if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for name, buf in module.named_buffers():
            if name in saved:
                buf.data.copy_(saved[name])
