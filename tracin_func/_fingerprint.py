"""A fingerprint of everything an index's numbers depend on, compared part by part so a mismatch says what differs.

Parts: the model's code and settings, its state names and shapes, the differentiated parameters, every checkpoint's
tensors (their bytes, dtype and shape, in the computation dtype), learning rate and optimizer state, the loss, the
computation dtype and the method. The loss is described by value (``_describe``): a criterion by its class,
settings and buffers, a function by its qualified name, code, defaults and captured values, so the description is
the same in every process for the same loss and differs when a setting differs (the model's layers alike, less
their tensors: the checkpoints').
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._checkpoints import as_coo
from ._code import closure_values, loaded_globals
from ._setup import Setup
from ._state import MODULE_SLOTS


def tensor_digest(digest: Any, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into a hashlib digest."""
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    tensor_bytes(digest, t)


def tensor_bytes(digest: Any, t: torch.Tensor) -> None:
    """Feed a tensor's bytes (row-major, on the CPU) into a hashlib digest; a sparse one's coalesced indices and
    values (a graph's adjacency: its dense form may not fit)."""
    if t.layout != torch.strided:
        coo = as_coo(t.detach().to("cpu"))
        for part in (coo.indices(), coo.values()):
            tensor_bytes(digest, part)
        return
    plain = t.detach().to("cpu").contiguous()  # (held while read: a copy's memory is freed with it)
    digest.update(memory_of(plain))


def memory_of(t: torch.Tensor) -> Any:
    """The bytes of ``t`` (contiguous, on the CPU), read in place (no copy) as long as ``t`` lives."""
    size = t.numel() * t.element_size()
    return (ctypes.c_char * size).from_address(t.data_ptr()) if size else b""


def _sha(parts: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor_digest(digest, part)
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


_SIMPLE = (bool, int, float, complex, str, bytes, type(None))


def _describe(obj: Any, depth: int = 0, model: frozenset[int] = frozenset()) -> str:
    """A description of ``obj`` that is equal across processes for equal settings: values, tensors (by content),
    containers, functions (qualified name, code, defaults, closure values and the plain values of the globals it
    reads), ``functools.partial`` and objects (class and attributes), never a memory address or a hash-seeded order.
    Modules nested inside a loss count by class where they are the model's (``model``: their ids; their weights are
    the checkpoints'), by class and state otherwise (a frozen head a closure calls)."""
    if isinstance(obj, _SIMPLE):
        return repr(obj)
    if isinstance(obj, torch.Tensor):
        return f"tensor:{_sha([obj])[:16]}"
    inner = lambda x: _describe(x, depth + 1, model)  # noqa: E731
    if isinstance(obj, types.CodeType):  # (whole at any depth: a comprehension's code is nested in its function's)
        return f"code({obj.co_name}, {obj.co_code.hex()}, {inner(obj.co_names)}, {_describe(obj.co_consts, 0, model)})"
    if depth > 4:
        return type(obj).__qualname__
    if isinstance(obj, (tuple, list)):
        return f"[{', '.join(map(inner, obj))}]"
    if isinstance(obj, (set, frozenset)):
        return f"{{{', '.join(sorted(map(inner, obj)))}}}"
    if isinstance(obj, dict):
        return f"{{{', '.join(sorted(f'{inner(k)}: {inner(v)}' for k, v in obj.items()))}}}"
    if isinstance(obj, functools.partial):
        return f"partial({inner(obj.func)}, {inner(obj.args)}, {inner(obj.keywords)})"
    if isinstance(obj, types.MethodType):
        return f"method({inner(obj.__func__)}, {inner(obj.__self__)})"
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if isinstance(obj, types.FunctionType):
        cells = closure_values(obj)
        read = {n: obj.__globals__[n] for n in loaded_globals(obj.__code__) if n in obj.__globals__}
        values = {n: v for n, v in read.items() if _described_global(v)}  # (a temperature, a criterion, a helper)
        return f"function({name}, {inner(obj.__code__)}, {inner(obj.__defaults__)}, {inner(cells)}, {inner(values)})"
    if callable(obj) and not hasattr(obj, "__dict__") or isinstance(obj, type):
        return name  # builtins, classes
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if not hasattr(obj, "__dict__"):  # a dtype, a device, a slice: its repr is its value, where no address
        text = repr(obj)
        return cls if " at 0x" in text else f"{cls}:{text}"
    if isinstance(obj, torch.nn.Module):
        if depth and id(obj) in model:
            return cls
        settings = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}
        return f"{cls}({inner(settings)}, {inner(dict(obj.state_dict()))})"
    # (an object's private attributes left out: caches, hashes of the process, GenerationConfig's)
    return f"{cls}({inner({k: v for k, v in vars(obj).items() if not k.startswith('_')})})"


def _described_global(value: Any) -> bool:
    """A global a function reads whose value its description holds: a plain value, a tensor, a module (a
    criterion), a function of the user's (a helper); not modules of code, classes, or torch's own functions."""
    if isinstance(value, (*_SIMPLE, torch.Tensor, torch.nn.Module)):
        return True
    return isinstance(value, types.FunctionType) and not (value.__module__ or "").startswith("torch")


def describe_loss(loss_fn: Any, model: Any = None) -> str:
    """A stable description of a loss: equal for the same criterion settings or the same function code and
    captured values, in any process (``model``'s modules by class: see ``_describe``)."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    return _describe(loss_fn, model=frozenset(map(id, modules)))


def describe_model(model: Any) -> str:
    """A stable digest of what a model computes beside its tensors: a function's description (``_describe``), or
    each layer's path, class, forward code and settings (its public attributes: sizes, a stored activation). Two
    models of one state layout (an MLP with ``tanh``, one with ``relu``) were one index's, silently."""
    if not isinstance(model, torch.nn.Module):
        return _sha([_describe(model)])
    tree = frozenset(map(id, model.modules()))
    return _sha(f"{path}: {_describe_layer(layer, tree)}" for path, layer in model.named_modules())




_LIBRARY = f"{__package__}."


def _describe_layer(layer: torch.nn.Module, tree: frozenset[int]) -> str:
    """A layer's class, the code of its class's methods (of classes outside torch: a helper its forward calls), its
    buffers that no checkpoint holds (by content), its mode and forward hooks (the user's, under the call's guard;
    not those another call puts on a user's module that a loss runs, for the time it runs: an index built meanwhile
    was refused by every query, "the model's code or settings differ"), its public attributes and its private ones
    of plain values (a scale); the model's modules (``tree``) they reach by class."""
    cls = type(layer)
    methods = {
        f"{c.__qualname__}.{name}": fn
        for c in cls.__mro__
        if c.__module__.split(".")[0] != "torch" and c is not object
        for name, fn in vars(c).items()
        if isinstance(fn, types.FunctionType)
    }
    settings = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
    private = {k: v for k, v in vars(layer).items() if k.startswith("_") and k not in MODULE_SLOTS}
    settings.update({k: v for k, v in private.items() if isinstance(v, _SIMPLE)})
    # buffers no checkpoint holds (``persistent=False``: rotary frequencies, a fixed shift), which the forward reads as
    # the model's own, by content: a build resumed after one changed mixed shards of both values, silently
    unsaved = layer._non_persistent_buffers_set
    settings.update({f"buffer {k}": t for k, t in layer._buffers.items() if k in unsaved and t is not None})
    hooks = [getattr(h, "__wrapped__", h) for h in (*layer._forward_pre_hooks.values(), *layer._forward_hooks.values())]
    hooks = [h for h in hooks if not (getattr(h, "__module__", None) or "").startswith(_LIBRARY)]  # (another call's)
    described = (_describe(part, 1, tree) for part in (methods, settings, hooks))
    return f"{cls.__module__}.{cls.__qualname__}, {_describe(cls.forward)}, {', '.join(described)}"


def fingerprint(setup: Setup, loss_fn: Any) -> dict[str, Any]:
    """The parts of ``setup`` (and the training loss ``loss_fn``) that the index's numbers depend on."""
    first = setup.checkpoints[0].state
    return {
        "model": describe_model(setup.spec.forward.user_function if setup.spec.module is None else setup.spec.module),
        "parameters": _sha((name, tuple(first[name].shape)) for name in sorted(first)),
        "differentiated": _sha(sorted(setup.spec.diff_names)),
        "checkpoints": [_sha(x for name in sorted(c.state) for x in (name, c.state[name])) for c in setup.checkpoints],
        "learning_rates": [float(c.lr) for c in setup.checkpoints],
        "optimizer": [None if c.adam is None else _sha([_describe(c.adam)]) for c in setup.checkpoints],
        "loss": describe_loss(loss_fn, setup.spec.module),
        "dtype": str(setup.dtype).replace("torch.", ""),
        "method": setup.method,
    }


_MEANING = {
    "model": (
        "the model's code or settings (a layer's class, forward or attributes, one its own forward fills on first use "
        "too: a cache, transformers' output-capturing hooks; a function's code)"
    ),
    "parameters": "the model's state names or shapes",
    "differentiated": "the differentiated parameters (`params` / `layers` / `method`)",
    "checkpoints": "the checkpoints' tensors",
    "learning_rates": "the learning rates",
    "optimizer": "the checkpoints' optimizer states (Adam-aware training side)",
    "loss": "the loss",
    "dtype": "the computation dtype (`dtype`)",
    "method": "the method",
}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty when they match)."""
    found = []
    # (the checkpoints' tensors and learning rates are taken in the computation dtype: another one changes them too)
    following_dtype = {"checkpoints", "learning_rates"} if stored.get("dtype") != current.get("dtype") else set()
    for key, meaning in _MEANING.items():
        old, new = stored.get(key), current.get(key)
        if old == new or key in following_dtype:
            continue
        if key == "optimizer" and not any(old or ()) and not any(new or ()):
            continue  # (none on either side, per checkpoint: lists of other lengths, said by the checkpoints' number)
        if key == "checkpoints" and isinstance(old, list) and len(old) != len(new):
            found.append(f"the number of checkpoints ({len(old)} -> {len(new)})")
        elif key == "checkpoints":
            changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
            found.append(f"the tensors of checkpoints {changed}")
        elif key in ("model", "parameters", "differentiated", "checkpoints", "optimizer"):
            found.append(meaning)
        else:
            found.append(f"{meaning} ({old!r} -> {new!r})")
    return found
