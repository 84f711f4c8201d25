"""Replace a file whole or not at all: write a temporary file beside it, then rename it over it.

A reader (another process compiling the same model, a later load) never sees a half-written file, and
a write that fails or is killed leaves the previous version and no temporary file behind. Used by the
kernel cache, the C++ kernel build and the benchmarks' result files. (`sparsec.save` does the same
with checks of its own first: each of its errors names the user's path, never the temporary file.)"""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def replaced_on_success(path: str, prefix: str = ".tmp-", suffix: str = ""):
    """Yield the name of a new, empty temporary file in `path`'s folder; when the block returns, rename
    it to `path` (atomic on POSIX); when it raises, remove it. A private name per call (mkstemp), so
    concurrent writers of one path never write into each other's file. The file is created 0600:
    callers that share it set its mode before it is renamed."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
