"""Locks that a forked child can still take.

os.fork copies only the forking thread. A lock another thread held at that moment is copied held, by a
thread the child does not have, so nothing ever releases it: a server that forked workers while a
background thread compiled a model had every compile in those workers wait for ever. Such locks are
reset in the child, unless the forking thread holds it itself (it will release it): an RLock says so; a
Lock does not, and sparsec holds none across user code (which is where a fork could come from)."""
from __future__ import annotations

import os
import threading


def _reset_unless_owned(lock) -> None:
    owned = getattr(lock, "_is_owned", None)  # (RLock: held by the thread that forked?)
    if owned is None or not owned():
        lock._at_fork_reinit()


def fork_safe(lock):
    """`lock` (a threading.Lock or RLock), reset in a forked child where another thread held it."""
    if hasattr(os, "register_at_fork") and hasattr(lock, "_at_fork_reinit"):  # (CPython on POSIX)
        os.register_at_fork(after_in_child=lambda: _reset_unless_owned(lock))
    return lock


def fork_safe_lock() -> threading.Lock:
    return fork_safe(threading.Lock())


def fork_safe_rlock() -> threading.RLock:
    return fork_safe(threading.RLock())
