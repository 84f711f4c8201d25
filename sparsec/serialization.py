"""save / load a CompiledModel (plan, packed weights, graph) as one file.

Layout: a magic line, one JSON header line (format, version, plan, payload length and SHA-256),
then the payload, a torch.save archive of the module. The checksum catches damage torch.load does
not notice (it reads tensor bytes without checking the archive's CRCs: a flipped byte in a weight
would load as a wrong weight). Loading unpickles Python objects, so only load files you trust.
Anything unreadable, truncated, damaged or of another format raises CorruptFileError naming the
file and the problem; an intact file saved with CUDA tensors, loaded where there is no CUDA device,
raises InvalidInputError naming map_location (the file is fine: deleting it as corrupt would be
wrong). Files from sparsec's first format (a bare torch.save archive, no checksum) still load.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import stat
import threading
import warnings

import torch
from torch.nn.utils import parametrize

from sparsec.errors import CorruptFileError, InvalidInputError, InvalidTypeError, MissingCodeError

MODEL_FORMAT = "sparsec.model"
MODEL_VERSION = 2
MAGIC = b"SPARSEC-MODEL\n"
_ZIP_MAGIC = b"PK\x03\x04"  # version 1 files are torch.save zip archives


def save(compiled, path: str | os.PathLike) -> None:
    from sparsec.compiled import CompiledModel

    if not isinstance(compiled, CompiledModel):
        # torch.compile(cm) and DDP(cm) are how a compiled model is run: name the model inside to save
        inside = next((f"its .{a}" for a in ("_orig_mod", "module") if isinstance(getattr(compiled, a, None), CompiledModel)), None)
        raise InvalidTypeError(f"sparsec.save takes a CompiledModel (from sparsec.compile), got {type(compiled).__name__}"
                               + (f", a wrapper around one: save {inside}" if inside else ""))
    compiled.require_unsharded("sparsec.save")
    _warn_of_unsaved_hooks(compiled)
    payload = _pickled(compiled)  # (a view of the pickle's buffer, hashed and written without a copy)
    header = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "plan": compiled.plan.to_json(),
              "payload_bytes": payload.nbytes, "payload_sha256": hashlib.sha256(payload).hexdigest()}
    # Write through a symlink (as open() would) instead of replacing the link by a file and leaving its
    # target stale; the temp name is unique per thread too (two threads saving one path shared it).
    given = os.fsdecode(path)  # (a bytes path made the temp name "b'...'.tmp...")
    if given.endswith(os.sep) or (os.altsep and given.endswith(os.altsep)):  # realpath would drop the slash
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {given}: it names a folder; give a file name", given)
    target = os.path.realpath(given)
    if os.path.isdir(target):  # (os.replace's error named the temp file, which the user never asked for)
        raise IsADirectoryError(errno.EISDIR, f"cannot save to {given}: it is a folder; give a file name", given)
    if os.path.exists(target) and not os.path.isfile(target):  # (the rename below replaced /dev/null, a FIFO, ...)
        raise InvalidInputError(f"cannot save to {given}: it is not a regular file (a device, FIFO or socket), which "
                                f"saving would replace; give a file name")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):  # (open() would name the temp file, which the user never asked for)
        raise FileNotFoundError(errno.ENOENT, f"cannot save to {given}: no folder {folder}", given)
    # A short temp name: "<target>.tmp<pid>-<thread>" went past the 255-byte limit on a file name for a
    # valid target name of 230+ bytes (ENAMETOOLONG, naming the temp file)
    tmp = os.path.join(folder, f".sparsec-save-{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        try:
            f = open(tmp, "wb")
        except OSError as e:  # (a read-only folder: the error named the temp file, which the user never asked for)
            raise type(e)(e.errno, f"cannot save to {given}: {e.strerror} (creating a file in {folder})", given) from e
        with f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
            f.write(payload)
        if os.path.isfile(target):  # the new file takes the old one's permissions, as writing into it would
            # (open, torch.save): the temp file got the umask's, so a private 0600 model became 0644
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)  # never leave a half-written file under the real name
    finally:
        if os.path.exists(tmp):  # the replace failed (path is a folder, ...): nothing is left behind either
            os.unlink(tmp)


def _pickled(compiled) -> memoryview:
    parametrized = [name for name, module in compiled.graph_module.named_modules() if parametrize.is_parametrized(module)]
    if parametrized:  # torch refuses these with a message that names no module
        problem = (f"layer {parametrized[0]!r} has a parametrized weight (torch.nn.utils.parametrize), which torch "
                   f"cannot pickle (for inference, parametrize.remove_parametrizations(module, 'weight') before "
                   f"compiling also lets sparsec prune the computed weight)")
    else:
        buffer = io.BytesIO()
        try:
            torch.save(compiled, buffer)
            return buffer.getbuffer()
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError) as e:
            problem = f"torch.save could not pickle it: {type(e).__name__}: {e}"
    raise InvalidTypeError(f"sparsec.save cannot store this compiled model: {problem}. To keep it, save "
                           f"cm.state_dict() and restore it with sparsec.compile(model, example_inputs=..., "
                           f"plan=cm.plan, <the same options>).load_state_dict(state)")


def load(path: str | os.PathLike, map_location=None):
    from sparsec.compiled import CompiledModel
    from sparsec.plan import Plan
    from sparsec.runtime.layers import held_weight_bytes

    name = os.fsdecode(path)  # (os.fspath kept a bytes path, and every message named it as "b'...'")
    _check_map_location(map_location)  # (torch.load's error on a bad one was reported as a damaged file)
    # Read from the file as torch.load needs it, not into memory first: the whole file read, then its payload
    # sliced off and wrapped took 3x the file's size at the peak (torch.load alone takes about 1x)
    with open(name, "rb") as f:  # FileNotFoundError as is
        start = f.read(len(MAGIC) + 1)  # (+1: a CRLF-converted header is one byte longer)
        f.seek(0)
        if start.startswith(_ZIP_MAGIC):
            plan_json, model = _load_version_1(name, f, map_location)
        elif start.startswith(MAGIC):
            f.seek(len(MAGIC))
            plan_json, model = _load_checked(name, f, map_location)
        else:
            raise CorruptFileError(_not_a_model_file(name, start))
    if not isinstance(model, CompiledModel):
        raise CorruptFileError(f"{name} does not hold a CompiledModel")
    _upgrade_launch_configs(model)
    try:
        stored_plan = Plan.from_json(plan_json)
    except (TypeError, ValueError) as e:  # a header plan edited into a non-string / non-plan: name the file
        raise CorruptFileError(f"{name}: the plan stored in its header is unreadable ({type(e).__name__}: {e}); "
                               f"the file was edited or damaged") from e
    if stored_plan.to_json() != model.plan.to_json():
        raise CorruptFileError(f"{name}: the stored plan and the model's plan disagree")
    _regenerate_kernels(model)  # (unpickling restored its graph module: CompiledModel.__setstate__)
    # what the layers hold as loaded (checked against the header first): a layer of an older file may hold more
    # than it was saved with (an int8 dense layer's scales, rebuilt)
    model.plan.record_held_bytes(held_weight_bytes(model.graph_module))
    return model


def _warn_of_unsaved_hooks(compiled) -> None:
    """Gradient hooks on parameters (GroupLasso.freeze_zero_groups holds its frozen groups at 0 with them)
    are not pickled: the loaded model would let those entries move again without a word."""
    hooked = [name for name, p in compiled.named_parameters()
              if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)]
    if hooked:
        warnings.warn(f"sparsec.save: parameters {hooked[:4]}{' ...' if len(hooked) > 4 else ''} carry gradient hooks "
                      f"(frozen groups of GroupLasso.freeze_zero_groups, or your own), which the file does not keep: "
                      f"after loading, register them again (GroupLasso(cm, ...).freeze_zero_groups())", stacklevel=3)


def _not_a_model_file(name: str, data: bytes) -> str:
    """Why `data` (which starts with neither header) is no model file, telling apart the cases a
    user can act on: an empty file, one cut inside the header, one whose line endings a text-mode
    transfer converted (FTP ASCII, git autocrlf)."""
    if not data:
        return f"{name} is empty (0 bytes): the save did not complete or the copy failed; save or copy it again"
    if MAGIC.startswith(data):
        return f"{name} is truncated: it ends inside the sparsec header ({len(data)} bytes)"
    if data.startswith(MAGIC.replace(b"\n", b"\r\n")):
        return (f"{name} had its line endings converted to CRLF (copied in text mode, e.g. FTP ASCII or git "
                f"autocrlf), which damages the binary payload: copy the original file in binary mode")
    return f"{name} is not a sparsec model file (it does not start with the sparsec header)"


class _Payload(io.RawIOBase):
    """The payload of an open model file (what follows its header) as a file of its own: torch.load seeks
    within what it reads, from the payload's start."""

    def __init__(self, f, offset: int, size: int):
        super().__init__()
        self._f, self._offset, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(view[:max(0, min(len(view), self._size - self._pos))])
        self._pos += got
        return got


def _load_checked(name: str, f, map_location):
    header_line = f.readline()
    try:
        header = json.loads(header_line) if header_line.endswith(b"\n") else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
        raise CorruptFileError(f"{name}: the sparsec header is damaged or truncated")
    if header.get("version") == 1:  # (version 1 files are a torch.save dict, not this header: "reads 1" misled)
        raise CorruptFileError(f"{name}: its header says format version 1, but version 1 files have no such header "
                               f"(they are a torch.save of a dict): the header is damaged")
    if header.get("version") != MODEL_VERSION:
        raise CorruptFileError(f"{name} has sparsec model format version {header.get('version')!r}; "
                               f"this sparsec reads versions 1 and {MODEL_VERSION}{_newer(header.get('version'))}")
    expected = header.get("payload_bytes")
    if not isinstance(expected, int) or isinstance(expected, bool):
        raise CorruptFileError(f"{name}: the sparsec header is damaged (payload_bytes is {expected!r})")
    offset = f.tell()
    size = os.fstat(f.fileno()).st_size - offset
    if size < expected:
        raise CorruptFileError(f"{name} is truncated: {size} of {expected} payload bytes")
    if size > expected:  # (not "truncated": bytes were appended, or the header was edited)
        raise CorruptFileError(f"{name} is damaged: {size} payload bytes where its header says {expected} "
                               f"(bytes appended after the model, or the header edited)")
    digest = hashlib.sha256()
    while chunk := f.read(1 << 24):
        digest.update(chunk)
    if digest.hexdigest() != header.get("payload_sha256"):
        raise CorruptFileError(f"{name} is damaged: its payload does not match the checksum written when it was saved")
    return header.get("plan"), _torch_load(name, _Payload(f, offset, size), map_location, intact=True)


def _check_map_location(map_location) -> None:
    """map_location as torch.load takes it: None, a device (or its name), a dict of storage locations, a function."""
    accepted = ("accepted: None, a device or its name ('cpu', 'cuda:0'), a dict of storage locations "
                "({'cuda:0': 'cpu'}) or a function (storage, location) -> storage")
    if map_location is None or callable(map_location) or isinstance(map_location, (torch.device, dict)):
        return
    if not isinstance(map_location, str):
        raise InvalidTypeError(f"sparsec.load: map_location {map_location!r} is a {type(map_location).__name__}; "
                               f"{accepted}")
    try:
        torch.device(map_location)
    except RuntimeError as e:
        raise InvalidInputError(f"sparsec.load: map_location {map_location!r} is not a device name ({e}); "
                                f"{accepted}") from e


def _newer(version) -> str:
    """What to do about a file of a later format version (the error named no remedy)."""
    if isinstance(version, int) and not isinstance(version, bool) and version > MODEL_VERSION:
        return " (the file was saved by a newer sparsec: upgrade sparsec here to load it)"
    return ""


def _load_version_1(name: str, f, map_location):
    blob = _torch_load(name, f, map_location)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CorruptFileError(f"{name} is not a sparsec model file (no '{MODEL_FORMAT}' header)")
    if blob.get("version") != 1:
        raise CorruptFileError(f"{name} has sparsec model format version {blob.get('version')!r}; "
                               f"this sparsec reads versions 1 and {MODEL_VERSION}{_newer(blob.get('version'))}")
    return blob.get("plan"), blob.get("model")


def _torch_load(name: str, source, map_location, intact: bool = False):
    try:
        return torch.load(source, map_location=map_location, weights_only=False)
    except RuntimeError as e:
        if "on a CUDA device but torch.cuda.is_available() is False" in str(e):
            # a file saved on a GPU machine: nothing is wrong with it, and torch's own advice names
            # torch.load, which would skip the checksum; say what to pass to sparsec.load instead
            raise InvalidInputError(
                f"{name} {'is intact (its checksum matches) but ' if intact else ''}holds CUDA tensors and this "
                f"process has no CUDA device: load it with sparsec.load(path, map_location='cpu') (layers that run Triton kernels "
                f"then need TRITON_INTERPRET=1 on a CPU; compile with backend='torch' or 'auto' for plain CPU)") from e
        raise _unreadable(name, e, intact) from e
    except (AttributeError, ImportError) as e:
        if intact:  # the checksum matched: the file is whole, the classes it names are what is missing
            raise MissingCodeError(
                f"{name} is intact (its checksum matches) but holds objects of a class this process cannot import "
                f"({type(e).__name__}: {e}). A class defined in the script that saved the model (__main__) or in a "
                f"module not importable here must be importable under the same name when loading: move it to a "
                f"module and import it before sparsec.load") from e
        raise _unreadable(name, e, intact) from e
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means the file is not usable
        raise _unreadable(name, e, intact) from e


def _unreadable(name: str, error: Exception, intact: bool) -> CorruptFileError:
    if intact:  # the checksum matched: the bytes are what was saved, so "truncated or corrupt" would mislead
        return CorruptFileError(f"{name} is intact (its checksum matches) but torch.load cannot read its payload "
                                f"here (written by another torch version, or edited before its checksum was "
                                f"updated?): {type(error).__name__}: {error}")
    return CorruptFileError(f"{name} is not a readable sparsec model file (truncated or corrupt?): "
                            f"{type(error).__name__}: {error}")


def _upgrade_launch_configs(model) -> None:
    """Launch configs recorded by an earlier version (plan layers, layer modules) in this version's
    keys, as Plan.from_json reads them from the file's plan."""
    from sparsec.codegen.configs import upgrade_launch
    from sparsec.runtime.triton_linear import FusedEpilogue

    for lp in model.plan.layers:
        lp.launch = upgrade_launch(lp.launch)
    for module in model.graph_module.modules():
        if isinstance(module, FusedEpilogue) and getattr(module, "launch", None) is not None:
            module.launch = upgrade_launch(module.launch)


def _regenerate_kernels(model) -> None:
    """Re-emit every generated kernel from its spec: a file saved by another sparsec version holds
    kernel sources whose arguments this version's launchers may no longer pass. Same spec, same
    name; the source is this version's (and identical when the templates did not change)."""
    from sparsec.codegen.builder import LayerUse, emit_matmul
    from sparsec.runtime.triton_linear import FusedEpilogue

    kernels, manifest = {}, {}
    for module in model.graph_module.modules():
        if isinstance(module, FusedEpilogue) and module.kernel_name is not None:
            entry = model.kernel_manifest.get(module.kernel_name, {})
            uses = [LayerUse(u["name"], u["M"], u["N"], u["K"]) for u in entry.get("layers", [])]
            name, source = emit_matmul(module.spec(), uses)
            module.kernel_name, module.kernel_source = name, source
            kernels[name] = source
            if entry:
                manifest[name] = dict(entry, file=f"{name}.py")
    if kernels:
        model.kernels, model.kernel_manifest = kernels, manifest
