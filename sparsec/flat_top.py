"""The `keep` largest magnitudes of a large float tensor as a mask, a slice of it at a time.

`reference.unstructured_mask` ranks a layer's magnitudes in one stable sort, which holds int64
indices and a sorted copy: ~20 bytes per weight at once, ten times a bfloat16 layer. Here the
keep-th largest magnitude is found by radix selection instead: |x| of a float orders as its bits
read as an integer, so its key is those bits (every NaN made the largest key, so NaNs tie with each
other above inf, as in torch.sort), and the key is found 16 bits at a time, from the top, by
histograms of one slice at a time. The mask is then every key above that threshold plus the first
keys equal to it in flat order: the stable sort's mask, ties to the lower index.
"""
from __future__ import annotations

from typing import Iterator

import torch

RADIX_BITS = 16
_BITS_OF = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_INT_OF = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def selectable(t: torch.Tensor) -> bool:
    return t.dtype in _BITS_OF


def _keys(part: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering |part| (the sign bit of |x| is clear, so they are non-negative)."""
    bits = _BITS_OF[part.dtype]
    keys = part.abs().view(_INT_OF[bits]).long()
    return keys.masked_fill(torch.isnan(part), torch.iinfo(_INT_OF[bits]).max)


def _slices(flat: torch.Tensor, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, flat.numel(), size):
        yield start, _keys(flat[start:start + size])


def _threshold(flat: torch.Tensor, keep: int, size: int) -> tuple[int, int]:
    """(the keep-th largest key, how many keys are larger than it), for 1 <= keep <= flat.numel()."""
    bits = _BITS_OF[flat.dtype]
    prefix, above = 0, 0  # the digits fixed so far, and how many keys lie above every key with them
    for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS):
        histogram = torch.zeros(1 << RADIX_BITS, dtype=torch.int64, device=flat.device)
        for _, keys in _slices(flat, size):
            if shift + RADIX_BITS < bits:
                keys = keys[(keys >> (shift + RADIX_BITS)) == prefix]
            histogram += torch.bincount((keys >> shift) & ((1 << RADIX_BITS) - 1), minlength=1 << RADIX_BITS)
        at_or_above = histogram.flip(0).cumsum(0)  # [i]: keys whose digit is >= the (i+1)-th largest digit
        i = int(torch.searchsorted(at_or_above, keep - above))  # the first digit reaching `keep`
        digit = (1 << RADIX_BITS) - 1 - i
        above += int(at_or_above[i] - histogram[digit])
        prefix = (prefix << RADIX_BITS) | digit
    return prefix, above


def largest_mask(t: torch.Tensor, keep: int, size: int) -> torch.Tensor:
    """Boolean mask (t's shape) of the `keep` largest |t| over the whole tensor, ties to the lower flat
    index; at most `size` entries' temporaries at a time."""
    flat = t.detach().reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep == 0:
        return mask.reshape(t.shape)
    threshold, above = _threshold(flat, keep, size)
    ties_left = keep - above  # >= 1: the threshold key itself is kept
    for start, keys in _slices(flat, size):
        part = keys > threshold
        if ties_left:
            equal = keys == threshold
            first = equal & (equal.cumsum(0) <= ties_left)
            ties_left -= int(first.sum())
            part |= first
        mask[start:start + part.numel()] = part
    return mask.reshape(t.shape)
