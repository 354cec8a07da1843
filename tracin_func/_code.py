"""Reading a function's code: the names it reads, the globals it loads and the values it closes over or holds."""

from __future__ import annotations

import dis
import functools
import types
from typing import Any

from torch import nn


def cell_value(cell: types.CellType) -> Any:
    """A closure cell's value (None for a cell not yet filled)."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def closure_values(fn: types.FunctionType) -> list[Any]:
    """The values ``fn`` closes over."""
    return [cell_value(cell) for cell in fn.__closure__ or ()]


def names_read(code: types.CodeType) -> set[str]:
    """The attribute and global names ``code`` (its nested functions' and comprehensions' too) reads."""
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return set(code.co_names).union(*map(names_read, nested))


@functools.lru_cache(maxsize=256)
def loaded_globals(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` (and the functions defined in it) loads: not its attribute names, which
    ``co_names`` holds too."""
    names = [i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    nested = [n for c in code.co_consts if isinstance(c, types.CodeType) for n in loaded_globals(c)]
    return tuple(dict.fromkeys([*names, *nested]))


_CALLS_DEEP = 4  # how many calls down ``held_values`` reads


def held_values(fn: Any, depth: int = 0, seen: dict[int, int] | None = None) -> list[tuple[str, Any]]:
    """``(where, value)`` for the values a loss callable holds: a ``functools.partial``'s arguments, a function's
    closure, defaults and loaded globals, a bound method's or a callable object's attributes; the callables among them
    are read too, four levels deep, each once at the shallowest depth it is met (``seen``: by id, that depth; helpers
    calling one another, an object keeping its own bound methods, were read once per path, 3-5 s a call; one met
    first at the depth limit was cut there). A module is not looked into (a model the loss calls holds the model's
    tensors)."""
    seen = {} if seen is None else seen
    method = isinstance(fn, types.MethodType)  # (a new object at each lookup: its object and function are read once)
    key = id(fn.__self__) if method else id(fn)
    shallowest = seen.get(key, _CALLS_DEEP + 1)
    if depth > _CALLS_DEEP or not method and shallowest <= depth:
        return []
    seen[key] = min(shallowest, depth)
    inner: Any = None  # the callable a partial or a bound method wraps
    if isinstance(fn, functools.partial):
        held = [(f"argument {i} of the partial", a) for i, a in enumerate(fn.args)]
        held += [(f"the partial's keyword {k!r}", v) for k, v in fn.keywords.items()]
        inner = fn.func
    elif method:
        held = _attributes(fn.__self__) if shallowest > depth and not isinstance(fn.__self__, nn.Module) else []
        inner = fn.__func__
    elif isinstance(fn, types.FunctionType):
        held = [(f"the {n!r} it closes over", v) for n, v in zip(fn.__code__.co_freevars, closure_values(fn))]
        held += [(f"a default of {fn.__name__}", v) for v in fn.__defaults__ or ()]
        held += [(f"the default {k!r} of {fn.__name__}", v) for k, v in (fn.__kwdefaults__ or {}).items()]
        held += [(f"the global {n!r}", fn.__globals__.get(n)) for n in loaded_globals(fn.__code__)]
    elif _read(fn):
        held = _attributes(fn)
    else:
        return []
    return held + [h for v in [inner, *(v for _, v in held if _read(v))] if v is not None
                   for h in held_values(v, depth + 1, seen)]  # fmt: skip


def _read(value: Any) -> bool:
    """Whether ``held_values`` reads a value a loss holds: a callable, not a module nor a class."""
    return callable(value) and not isinstance(value, (nn.Module, type))


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    return [(f"its attribute {k!r}", v) for k, v in getattr(obj, "__dict__", {}).items()]
