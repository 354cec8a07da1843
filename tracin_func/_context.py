"""The context every call runs in: outside the caller's ``torch.autocast`` (the library computes in the call's dtype),
and never inside a ``torch.func`` transform (it takes gradients itself)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")
_F = TypeVar("_F", bound=Callable[..., Any])


def in_own_context(fn: _F) -> _F:
    """``fn`` run with an ambient ``torch.autocast`` (a training step's, around a tracer's update) switched off, so
    that scores are computed in the call's dtype: under it the library's own products ran in bfloat16 (2e-3 off)
    and float16 ones overflowed. Autocast set inside the model's forward is the model's own and stays. Refused
    inside a ``torch.func`` transform (``vmap`` / ``grad`` over a call), where a test example was blamed for torch's
    "Cannot access storage of TensorWrapper"; and under ``torch.inference_mode()`` (a tracer's update raised torch's
    "Inference tensors do not track version counter")."""

    outer, _, inner = fn.__qualname__.partition(".<locals>.")  # (a tracer's update: `tc.tracer(...).update`)
    name = f"tc.{outer}(...).{inner}" if inner else f"tc.{fn.__name__}"

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"`{name}`: scores need gradients, which torch cannot compute under "
                f"`torch.inference_mode()`; call it outside that block (`torch.no_grad()` is fine: the library "
                f"enables what it needs)."
            )
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"`{name}` was called inside a torch.func transform (`vmap`, `grad`, `jacrev`, ... over the "
                f"call): it takes per-example gradients itself and cannot be transformed. Call it outside the "
                f"transform (`torch.vmap` over test examples: pass them as one batch)."
            )
        ambient = [device for device in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]
        if not ambient:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in ambient:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
