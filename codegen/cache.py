"""Content-hashed kernel cache: generated Triton sources as importable files.

Triton's `@jit` reads a kernel's source with `inspect`, so a generated kernel has to live in a file
before it can run; the cache is that file store. An entry's key hashes the source together with the
sparsec / torch / triton versions and the device arch, so a change to any of them is a new entry.

Each file starts with `# sparsec-cache sha256=<hash of the rest>`; a file whose body does not match
(truncated, edited, half-copied) is rebuilt, never trusted. Writes go to a temp file in the same
folder and are renamed into place atomically, so two processes compiling at once never see a
half-written file. Location: $SPARSEC_CACHE_DIR, default ~/.cache/sparsec.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import os
import sys
from types import ModuleType

import torch

from sparsec.atomic_file import replaced_on_success
from sparsec.codegen.configs import interpreting
from sparsec.errors import InvalidInputError
from sparsec.fork_safe import fork_safe_lock

HEADER_PREFIX = "# sparsec-cache sha256="
log = logging.getLogger(__name__)


def default_root() -> str:
    return os.environ.get("SPARSEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsec")


def device_arch() -> str:
    """What the kernels will be built for: 'sm_90' on an H100, 'interpreter' under TRITON_INTERPRET=1, else 'cpu'."""
    if interpreting():
        return "interpreter"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return "cpu"


def versions() -> str:
    from sparsec import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"sparsec={__version__} torch={torch.__version__} triton={triton_version}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class KernelCache:
    """Files under `<root>/kernels/`, named `<kernel name>-<key prefix>.py`."""

    _modules: dict[str, ModuleType] = {}      # process-wide: key -> imported module
    _lock = fork_safe_lock()

    def __init__(self, root: str | None = None):
        self.root = root or default_root()
        self.counters: collections.Counter = collections.Counter()

    def key(self, source: str) -> str:
        return _sha256(f"{versions()}\n{device_arch()}\n{source}")

    def path(self, name: str, source: str) -> str:
        return os.path.join(self.root, "kernels", f"{name}-{self.key(source)[:20]}.py")

    def _valid(self, path: str, source: str) -> bool:
        return self._problem(path, source) is None

    def _problem(self, path: str, source: str) -> str | None:
        """Why the file at `path` is not a valid entry for `source` ("missing" when there is none; None
        when it is valid)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, NotADirectoryError):  # (the second: a file where a folder of the path should be)
            return "missing"
        except UnicodeDecodeError:
            return "is not UTF-8 text"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        if not text:
            return "is empty"
        first, _, body = text.partition("\n")
        if not first.startswith(HEADER_PREFIX):
            return "has no sparsec-cache header"
        if first != HEADER_PREFIX + _sha256(body):
            return "is truncated or edited (its body does not match the sha256 in its header)"
        if body != source:
            return "holds another kernel's source under this name and key"
        return None

    def store(self, name: str, source: str) -> str:
        """Make sure a valid file for `source` exists; return its path. Counts hit / written / corrupt."""
        path = self.path(name, source)
        problem = self._problem(path, source)
        if problem is None:
            self.counters["hit"] += 1
            return path
        if problem != "missing":  # present but wrong: rebuilt below, and said (a silent rewrite every
            self.counters["corrupt"] += 1  # compile hid whatever keeps damaging the cache)
            log.warning("sparsec kernel cache: %s %s; writing it again", path, problem)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with replaced_on_success(path, suffix=".py") as tmp, open(tmp, "w", encoding="utf-8") as f:
                # mkstemp makes the file 0600: renamed into place, an entry in a cache shared by several users
                # ($SPARSEC_CACHE_DIR on a team machine) was unreadable to the others, who then rewrote it as
                # "corrupt" (or failed, in a sticky folder). Entries hold generated source, nothing private.
                os.fchmod(f.fileno(), 0o644)
                f.write(HEADER_PREFIX + _sha256(source) + "\n" + source)
        except OSError as e:
            raise self._unusable(e) from e
        self.counters["written"] += 1
        return path

    def _unusable(self, error: OSError) -> InvalidInputError:
        # (os.replace's error names the temporary file first, the entry in the way second)
        in_the_way = error.filename2 or error.filename
        where = f" ({in_the_way})" if in_the_way else ""
        return InvalidInputError(
            f"the kernel cache in {self.root} cannot be written: {error.strerror or error}{where}. Set "
            f"SPARSEC_CACHE_DIR to a folder this process can write (default ~/.cache/sparsec), or remove what "
            f"stands in the way")

    def load(self, name: str, source: str) -> ModuleType:
        """Import the kernel module for `source` (stored first if needed); one import per process."""
        key = self.key(source)
        with self._lock:
            if key in self._modules:
                return self._modules[key]
            path = self.store(name, source)
            module_name = f"sparsec_kernel_{name}_{key[:20]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # triton resolves globals through the module
            spec.loader.exec_module(module)
            self._modules[key] = module
            return module
