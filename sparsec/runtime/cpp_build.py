"""Build a C++ kernel file of sparsec/runtime/csrc against the installed torch, once, and load it.

The system C++ compiler ($CXX, split into words as a shell would, else c++) compiles the one source
(~10 s on 2 cores; no ninja, no Python headers) into $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions)/sparsec/<stem>_<hash>.so, the hash covering source, flags, compiler and torch
version, so later processes only load it (a library that no longer loads is built again). The
kernels carry target attributes and pick their instruction set at run time, so nothing is built with
-march=native and a library stays valid on another CPU. CppKernels turns any failure into "unavailable".
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess

import torch

from sparsec.atomic_file import replaced_on_success
from sparsec.fork_safe import fork_safe_lock

log = logging.getLogger(__name__)
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# -fopenmp: at::parallel_for is inline OpenMP; the library resolves libgomp to torch's own copy
# (rpath below), so there is one thread pool. -w: a failed build still reports its errors.
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w"]


def _command(filename: str) -> tuple[list[str], list[str], str]:
    """(the compiler command up to its output, the link arguments, the library's path) for csrc/<filename>."""
    from torch.utils import cpp_extension

    source_path = os.path.join(CSRC, filename)
    # $CXX may carry a launcher or options ("ccache g++", "g++ -m64"), as make and CMake accept: taken
    # whole, "ccache g++" was "no C++ compiler on PATH" and every layer ran plain torch. (A program
    # that $CXX names whole, a path with a space in it, stays one word.)
    named = os.environ.get("CXX") or "c++"
    cxx = [named] if shutil.which(named) else shlex.split(named) or ["c++"]
    if shutil.which(cxx[0]) is None:
        raise RuntimeError(f"no C++ compiler {cxx[0]!r} on PATH")
    libdirs = cpp_extension.library_paths()
    flags = FLAGS + [f"-I{p}" for p in cpp_extension.include_paths()] + [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    link = [f"-L{p}" for p in libdirs] + [f"-Wl,-rpath,{p}" for p in libdirs] + ["-lc10", "-ltorch_cpu"]
    with open(source_path, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join([*cxx, *flags, *link]).encode(), torch.__version__.encode()]))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    stem = os.path.splitext(filename)[0]
    return [*cxx, *flags, source_path], link, os.path.join(root, "sparsec", f"{stem}_{key.hexdigest()[:16]}.so")


def library_path(filename: str) -> str:
    """Where the library built from csrc/<filename> with this compiler and torch is (or will be) kept."""
    return _command(filename)[2]


def build_and_load(filename: str) -> None:
    """Compile csrc/<filename> (unless this exact build exists and loads) and load it into torch.ops."""
    compile_command, link, lib = _command(filename)
    folder = os.path.dirname(lib)
    if os.path.exists(lib):
        try:
            torch.ops.load_library(lib)
            return
        except OSError as exc:
            # A damaged entry (truncated by a full disk or an interrupted copy of the cache): dlopen
            # refuses it, and every later process fell back to plain torch until someone deleted it.
            # Built again, as a corrupt kernel cache entry is (a failed dlopen loads nothing).
            log.warning("sparsec: %s does not load (%s); building it again", lib, exc)
    os.makedirs(folder, exist_ok=True)
    # Build under a private name, then rename: concurrent first uses (pytest -n, several workers)
    # never load a half-written file.
    with replaced_on_success(lib, suffix=".so") as tmp:
        proc = subprocess.run([*compile_command, "-o", tmp, *link], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {compile_command[-1]} failed:\n{proc.stderr[-4000:]}")
        # mkstemp made it 0600 and the linker keeps that: in a TORCH_EXTENSIONS_DIR shared by several
        # users the others could not load it (dlopen reads it) and silently ran plain torch instead
        os.chmod(tmp, 0o755)
    torch.ops.load_library(lib)


class CppKernels:
    """One kernel library, csrc/<filename> registering torch.ops.<namespace> (with isa() / set_isa()),
    built and loaded on first use. `register_fakes()` gives its operators their shape-only versions for
    torch.compile / export; `what` names it in the warning a failed build logs."""

    def __init__(self, filename: str, namespace: str, register_fakes, what: str):
        self.filename, self.namespace, self.register_fakes, self.what = filename, namespace, register_fakes, what
        self.state: dict = {}  # "op": the loaded operator namespace, or None after a failed build
        # Threads making their first call together wait for the one build: a thread that came in while
        # another built was told None ("unavailable"), and a condensed layer whose layout it prepared
        # kept the torch fallback for good.
        self.lock = fork_safe_lock()

    def op(self):
        """torch.ops.<namespace>, or None when SPARSEC_NO_CPP is set or anything fails (no compiler, a
        compile error, an unwritable cache: logged once as a warning, the callers then run plain torch)."""
        if "op" not in self.state:
            with self.lock:
                if "op" not in self.state:
                    self.state["op"] = self._build()
        return self.state["op"]

    def _build(self):
        if os.environ.get("SPARSEC_NO_CPP"):
            return None
        try:
            build_and_load(self.filename)
            self.register_fakes()
            return getattr(torch.ops, self.namespace)
        except Exception as exc:  # noqa: BLE001 - any failure only disables the fast path
            log.warning("sparsec %s unavailable, using the torch fallback: %s", self.what, exc)
            return None

    def is_available(self) -> bool:
        """Whether the library is loaded (building it on the first call)."""
        return self.op() is not None

    def isa(self) -> str:
        """The kernel family in use ("avx512", "scalar", ...), or "torch" without the library."""
        op = self.op()
        return op.isa() if op is not None else "torch"

    def set_isa(self, name: str) -> str:
        """For tests: use kernels no better than `name` ("best": the CPU's); returns the family in use."""
        op = self.op()
        return op.set_isa(name) if op is not None else "torch"
