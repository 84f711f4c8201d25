"""save / load a CompiledModel (plan, packed weights, graph) as one file.

The file is a torch.save archive holding a small header and the pickled module. Loading unpickles
Python objects, so only load files you trust. Anything unreadable, truncated or of another format
raises CorruptFileError naming the file and the problem.
"""
from __future__ import annotations

import os

import torch

from sparsec.errors import CorruptFileError, InvalidTypeError

MODEL_FORMAT = "sparsec.model"
MODEL_VERSION = 1


def save(compiled, path: str | os.PathLike) -> None:
    from sparsec.compiled import CompiledModel

    if not isinstance(compiled, CompiledModel):
        raise InvalidTypeError(f"sparsec.save takes a CompiledModel (from sparsec.compile), got {type(compiled).__name__}")
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    torch.save({"format": MODEL_FORMAT, "version": MODEL_VERSION, "plan": compiled.plan.to_json(), "model": compiled}, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name


def load(path: str | os.PathLike, map_location=None):
    from sparsec.compiled import CompiledModel
    from sparsec.plan import Plan

    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not usable
        raise CorruptFileError(f"{os.fspath(path)} is not a readable sparsec model file (truncated or corrupt?): "
                               f"{type(e).__name__}: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CorruptFileError(f"{os.fspath(path)} is not a sparsec model file (no '{MODEL_FORMAT}' header)")
    if blob.get("version") != MODEL_VERSION:
        raise CorruptFileError(f"{os.fspath(path)} has sparsec model format version {blob.get('version')!r}; "
                               f"this sparsec reads version {MODEL_VERSION}")
    model = blob.get("model")
    if not isinstance(model, CompiledModel):
        raise CorruptFileError(f"{os.fspath(path)} does not hold a CompiledModel")
    if Plan.from_json(blob["plan"]).to_json() != model.plan.to_json():
        raise CorruptFileError(f"{os.fspath(path)}: the stored plan and the model's plan disagree")
    _regenerate_kernels(model)
    return model


def _regenerate_kernels(model) -> None:
    """Re-emit every generated kernel from its spec: a file saved by another sparsec version holds
    kernel sources whose arguments this version's launchers may no longer pass. Same spec, same
    name; the source is this version's (and identical when the templates did not change)."""
    from sparsec.codegen.builder import LayerUse, emit_matmul
    from sparsec.runtime.triton_linear import TritonSparseLinear

    kernels, manifest = {}, {}
    for module in model.graph_module.modules():
        if isinstance(module, TritonSparseLinear) and module.kernel_name is not None:
            entry = model.kernel_manifest.get(module.kernel_name, {})
            uses = [LayerUse(u["name"], u["M"], u["N"], u["K"]) for u in entry.get("layers", [])]
            name, source = emit_matmul(module.spec(), uses)
            module.kernel_name, module.kernel_source = name, source
            kernels[name] = source
            if entry:
                manifest[name] = dict(entry, file=f"{name}.py")
    if kernels:
        model.kernels, model.kernel_manifest = kernels, manifest
