"""Where in the user's code something happened: the innermost frame that is neither torch's nor sparsec's.

Errors and notes about a model name the line of its code they are about (a trace that failed there, an op
run under a mode of its own), not a line inside torch.fx or sparsec.
"""
from __future__ import annotations

import importlib.util
import os
import traceback

import torch

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep  # (not torchvision's, torchaudio's, ...)
# sparsec's own code: the package and its passes / codegen subpackages (separate folders in the source tree)
_SPARSEC_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (
    __file__, importlib.util.find_spec("sparsec.passes").origin, importlib.util.find_spec("sparsec.codegen").origin))


def user_frame(exc: BaseException) -> str | None:
    """The innermost frame of the traceback that is the user's code, as 'file:line in func: code'."""
    return user_code_frame(traceback.extract_tb(exc.__traceback__))


def user_frame_summary(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code."""
    return _innermost_user_frame(traceback.extract_tb(exc.__traceback__))


def user_code_frame(frames: traceback.StackSummary) -> str | None:
    """The innermost of `frames` that is the user's code (not torch's, not sparsec's), as 'file:line in func: code'."""
    frame = _innermost_user_frame(frames)
    return None if frame is None else f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _innermost_user_frame(frames: traceback.StackSummary) -> traceback.FrameSummary | None:
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_SPARSEC_DIRS) or "<" in frame.filename):
            return frame
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text[:400]}"

