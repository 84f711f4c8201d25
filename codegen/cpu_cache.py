"""Where a CPU layer's weights come from when the compiled model runs: the cache or memory.

A layer timed alone, call after call, reads its weights from the last-level cache once they fit
there (a 768 x 3072 float32 layer's 9.4 MB do in a 32 MB L3), so a dense GEMM reads them at cache
speed and a kernel that reads half the bytes shows no gain. In a model whose weights exceed the
cache, the other layers evict them between calls and every call reads them from memory: there the
bitmask kernel ran a 12-block 768 -> 3072 -> 768 MLP 2.0x faster than dense at batch 1, while the
layer timed hot measured 1.00x, a coin flip between the two (this project's CI machine, 2026-11-23).
So backend auto times CPU candidates cold, after reading a buffer twice the cache's size, when the
model's weights exceed half the cache, and hot otherwise; the plan says which.
"""
from __future__ import annotations

import glob
import os

import torch

FALLBACK_CACHE_BYTES = 32 << 20  # where sysfs cannot say (not Linux): a common server L3 size
_EVICTION: dict[int, torch.Tensor] = {}


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


def last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache level (as cpu0 sees it, from sysfs)."""
    levels = {}
    for folder in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(folder, "level")) as f_level, open(os.path.join(folder, "size")) as f_size:
                levels[int(f_level.read())] = _parse_size(f_size.read())
        except (OSError, ValueError, KeyError):
            continue
    return levels[max(levels)] if levels else FALLBACK_CACHE_BYTES


def evict() -> None:
    """Read a buffer twice the last-level cache's size: afterwards a call's weights come from memory,
    as in a model whose other layers' weights pushed them out (the lines left behind are clean, so
    evicting them costs the timed call nothing)."""
    size = 2 * last_level_cache_bytes()
    if size not in _EVICTION:
        _EVICTION.clear()
        _EVICTION[size] = torch.ones(size // 4, dtype=torch.float32)
    _EVICTION[size].sum()


def release() -> None:
    """Drop the eviction buffer (twice the last-level cache) once measuring is done."""
    _EVICTION.clear()


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def weights_from_memory(model: torch.nn.Module) -> tuple[bool, str]:
    """(cold, note): whether the model's parameters and buffers exceed half the last-level cache, so a
    layer's weights come from memory on each call, and the note saying so for the plan."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    cache = last_level_cache_bytes()
    if total > cache // 2:
        return True, f"timed with weights from memory (the model's {_fmt_mb(total)} exceed half the {_fmt_mb(cache)} cache)"
    return False, f"timed with weights in cache (the model's {_fmt_mb(total)} fit in half the {_fmt_mb(cache)} cache)"
