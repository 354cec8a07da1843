"""Warnings that point at the user's line: the innermost caller outside tracin_func and torch (whose wrappers,
e.g. ``torch.compiler.disable``'s, sit between a user's compiled step and the library)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from collections.abc import Iterator

import torch

_LIBRARIES = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


_SILENT = contextvars.ContextVar("tracin_func_silent", default=False)  # per thread: never another thread's warnings


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """The library's own warnings left out within the block, in this thread only (``warnings.catch_warnings``
    changes the process's filters: ``tc.explain`` dropped other threads' warnings)."""
    token = _SILENT.set(True)
    try:
        yield
    finally:
        _SILENT.reset(token)


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line, however deep in the library the cause was found."""
    if _SILENT.get():
        return
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
