"""Scoring outside the caller's ``torch.autocast``: the library computes in the call's dtype."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")
_F = TypeVar("_F", bound=Callable[..., Any])


def outside_autocast(fn: _F) -> _F:
    """``fn`` run with an ambient ``torch.autocast`` (a training step's, around a tracer's update) switched off, so
    that scores are computed in the call's dtype: under it the library's own products ran in bfloat16 (2e-3 off)
    and float16 ones overflowed. Autocast set inside the model's forward is the model's own and stays."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ambient = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
        if not ambient:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in ambient:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
