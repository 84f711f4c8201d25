"""Helpers that keep a module's state untouched while sparsec runs it on example inputs."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards: a forward in train mode updates BatchNorm running stats,
    and a compile must not change what the model computes."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    try:
        yield
    finally:
        for name, buf in module.named_buffers():
            if name in saved:
                buf.data.copy_(saved[name])
