"""Per-shape caches that stay bounded.

Work done once per input shape (a kernel's launch config and grid, the call with a layer's operands
bound) is cached so that a one-row call pays only for its launch. A server sees many shapes, though
(every prompt length is a new row count): unbounded, these caches grew by one entry per distinct
row count in every layer for as long as the process ran. Past `limit` entries the oldest is
dropped; a dropped shape is only worked out again when it comes back (tens of microseconds).
"""
from __future__ import annotations

SHAPES_KEPT = 256  # per layer's cache: far more row counts than a steady workload alternates between
# The process-wide launch and config tables hold every layer's shapes (each model, each layer shape):
# a cap per layer would be cycled through and missed on every call by a large model, so theirs is wider.
SHARED_SHAPES_KEPT = 16 * SHAPES_KEPT


def remember(cache: dict, key, value, limit: int | None = None, counts=None):
    """cache[key] = value, first dropping the oldest entries (insertion order) while `limit` or more
    of them count (default SHAPES_KEPT); `counts(key)` says which keys count (all when None: the
    cache holds shapes only)."""
    limit = SHAPES_KEPT if limit is None else limit
    # Threads serving one model fill its caches at once: iterate a snapshot (list() copies the keys in one
    # step, where iterating the dict itself raised "dictionary changed size during iteration" when another
    # thread added a shape meanwhile), and drop an entry another thread may have dropped first (`del` raised
    # KeyError when two threads evicted the same oldest shape).
    counted = [old for old in list(cache) if counts is None or counts(old)]
    for old in counted[:max(0, len(counted) - limit + 1)]:
        cache.pop(old, None)
    cache[key] = value
    return value
