"""A fingerprint of everything an index's numbers depend on, compared part by part so a mismatch says what differs.

Parts: the model's state names and shapes, the differentiated parameters, every checkpoint's tensors (their bytes,
dtype and shape, in the computation dtype) and learning rate, the loss, the computation dtype and the method. The
loss is identified by its class and settings (a criterion module: its class, public attributes and buffers) or by
the function's qualified name and code (``tc.ExampleLoss`` and plain functions); a closure's captured values are
not part of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._loss import ExampleLoss
from ._setup import Setup


def _update(digest: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))


def _sha(parts: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            _update(digest, part)
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def _code(fn: Any) -> str:
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if code is None:
        return name
    return f"{name}:{_sha([code.co_code, code.co_consts, code.co_names])[:16]}"


def describe_loss(loss_fn: Any) -> str:
    """A stable description of a loss: equal for the same criterion settings or the same function code."""
    if isinstance(loss_fn, ExampleLoss):
        return f"ExampleLoss({_code(loss_fn.fn)})"
    if isinstance(loss_fn, torch.nn.Module):
        settings = {k: v for k, v in sorted(vars(loss_fn).items()) if not k.startswith("_")}
        settings = {k: v for k, v in settings.items() if isinstance(v, (bool, int, float, str, type(None)))}
        buffers = _sha(t for _, t in sorted(loss_fn.state_dict().items()))[:16] if loss_fn.state_dict() else ""
        return f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}({settings}{buffers})"
    if inspect.isfunction(loss_fn) or inspect.ismethod(loss_fn) or inspect.isbuiltin(loss_fn):
        return _code(loss_fn)
    return f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}({_code(type(loss_fn).__call__)})"


def fingerprint(setup: Setup, loss_fn: Any) -> dict[str, Any]:
    """The parts of ``setup`` (and the training loss ``loss_fn``) that the index's numbers depend on."""
    first = setup.checkpoints[0].state
    return {
        "parameters": _sha((name, tuple(first[name].shape)) for name in sorted(first)),
        "differentiated": _sha(sorted(setup.spec.diff_names)),
        "checkpoints": [_sha(x for name in sorted(c.state) for x in (name, c.state[name])) for c in setup.checkpoints],
        "learning_rates": [float(c.lr) for c in setup.checkpoints],
        "loss": describe_loss(loss_fn),
        "dtype": str(setup.dtype).replace("torch.", ""),
        "method": setup.method,
    }


_MEANING = {
    "parameters": "the model's state names or shapes",
    "differentiated": "the differentiated parameters (`params` / `layers` / `method`)",
    "checkpoints": "the checkpoints' tensors",
    "learning_rates": "the learning rates",
    "loss": "the loss",
    "dtype": "the computation dtype (`dtype`)",
    "method": "the method",
}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty when they match)."""
    found = []
    for key, meaning in _MEANING.items():
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if key == "checkpoints" and isinstance(old, list) and len(old) != len(new):
            found.append(f"the number of checkpoints ({len(old)} -> {len(new)})")
        elif key == "checkpoints":
            changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
            found.append(f"the tensors of checkpoints {changed}")
        elif key in ("parameters", "differentiated", "checkpoints"):
            found.append(meaning)
        else:
            found.append(f"{meaning} ({old!r} -> {new!r})")
    return found
