"""Forward hooks on the call's private copy of the model (``_model.private_copy``): a hook that reads the model
through a reference of its own (a method's ``self``, a closure over ``self``, a partial's argument) would read the
user's modules, with the user's weights, not the checkpoint's (21-54% off, silently, before). Such references to
modules of the tree are moved to their copies where the hook can be rebuilt around them (a bound method, a
closure's cells, a partial's arguments, default arguments); a tensor of the model, or a container of its modules,
held there is refused. Every hook on the copy then runs refusing to compute with a tensor of the user's model
that the copy does not hold (``_guarded``): a reference through a global, another object's attributes, a weak
reference, however deep. Global module hooks, which every module runs, the copies too, are refused where they hold
the model (searched ``_DEPTH`` levels deep). A hook reading only its arguments (the copy, its inputs and outputs)
runs as it is; one that stores what it sees (activations) stores the call's own tensors, which may be internal to
``vmap``."""

from __future__ import annotations

import functools
import operator
import threading
import types
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._code import cell_value, closure_values, loaded_globals

# a module's forward hooks (its backward ones are refused: ``_model``) and the global ones, each by the name of its
# kind: a global backward hook reaching the model read the user's weights (7-8% off, silently, found by review)
_HOOK_DICTS = {"_forward_hooks": "forward hook", "_forward_pre_hooks": "forward pre-hook"}
_GLOBAL_HOOKS = {
    "_global_forward_hooks": "forward hook",
    "_global_forward_pre_hooks": "forward pre-hook",
    "_global_backward_hooks": "backward hook",
    "_global_backward_pre_hooks": "backward pre-hook",
}
_DEPTH = 3  # levels of references searched from a hook (a closure's list of the model's layers: 2)
_ITEMS = 64  # a container's items searched at each level


class _Tree:
    """The modules of the tree (by id, with their copies) and its tensors (by id and by storage); what was found
    reaching them, by id, for one call (hooks often share the globals they read)."""

    def __init__(self, model: nn.Module, copies: Mapping[int, nn.Module]) -> None:
        self.copies = copies
        named = [*model.named_parameters(), *model.named_buffers()]
        self.own = _Own({id(t): n for n, t in named}, {_storage(t): n for n, t in named if _storage(t)})
        self.seen: dict[tuple[int, int], bool] = {}
        self.rebuilding: set[int] = set()  # functions being rebuilt (a closure may hold itself)

    def holds(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is a tensor of the tree (or a view of one's storage: ``w.detach()``)."""
        return id(value) in self.own.ids or _storage(value) in self.own.storages

    def reaches(self, value: Any, depth: int = _DEPTH) -> bool:
        """Whether ``value`` is, or holds within ``depth`` levels of references, a module or tensor of the tree."""
        if isinstance(value, torch.Tensor):
            return self.holds(value)
        if isinstance(value, nn.Module) and id(value) in self.copies:
            return True
        if depth == 0 or value is None or isinstance(value, (str, bytes, int, float, complex, bool, types.ModuleType)):
            return False
        key = (id(value), depth)
        if key not in self.seen:
            self.seen[key] = False  # (a cycle back to it finds nothing new)
            self.seen[key] = any(self.reaches(v, depth - 1) for v in _references(value))
        return self.seen[key]


def _storage(t: torch.Tensor) -> int | None:
    """The address of a dense tensor's storage; None for others (sparse, meta, functorch's wrappers that a hook
    collecting activations may have kept from a call)."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def _references(value: Any) -> list[Any]:
    """What ``value`` refers to, as far as a hook's reach is searched: a function's closure, defaults and globals it
    loads; a method's ``self`` and function; a partial's function and arguments; a container's items; an object's
    attributes."""
    if isinstance(value, types.FunctionType):
        defaults = [*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
        globals_ = (value.__globals__.get(n) for n in loaded_globals(value.__code__))
        return [*closure_values(value), *defaults, *globals_]
    if isinstance(value, types.MethodType):
        return [value.__self__, value.__func__]
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values()]
    if isinstance(value, nn.Module):  # (another module: its layers, tensors and attributes)
        return [*islice(value._modules.values(), _ITEMS), *value._parameters.values(), *value._buffers.values()]
    if isinstance(value, dict):  # (keys too: a dict of the model's layers to their names)
        return [*islice(value.keys(), _ITEMS), *islice(value.values(), _ITEMS)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(islice(value, _ITEMS))
    attributes = getattr(value, "__dict__", None)
    return list(islice(attributes.values(), _ITEMS)) if isinstance(attributes, dict) else []


def on_copies(model: nn.Module, copies: Mapping[int, nn.Module]) -> None:
    """Every copy's forward hooks with their references to the tree's modules moved to the copies, and guarded (see
    the module docstring); raises on a hook holding a tensor or container of the model, or a global hook reaching
    it."""
    modules = list(model.named_modules())  # (a module reachable twice: its one copy's hooks moved once)
    global_hooks = [h for slot in _GLOBAL_HOOKS for h in getattr(nn.modules.module, slot).values()]
    if not global_hooks and not any(vars(m)[slot] for _, m in modules for slot in _HOOK_DICTS):
        return
    tree = _Tree(model, copies)
    for name, module in modules:
        layer = f"`model` module {name or '(root)'!r} ({type(module).__name__})"
        for slot, kind in _HOOK_DICTS.items():  # (the copy's own dicts: private_copy)
            hooks = vars(copies[id(module)])[slot]
            for key, hook in list(hooks.items()):
                what = f"{layer} has a {kind} ({_name(hook)})"
                kept = _Kept(module, (slot, *_HOOK_FLAGS[slot]), key)
                hooks[key] = _guarded(_rebuilt(hook, tree, what), tree.own, copies[id(model)], what, kept)
    for slot, kind in _GLOBAL_HOOKS.items():  # (every module's, the copies' too; not the call's to rebuild)
        for hook in list(getattr(nn.modules.module, slot).values()):
            if tree.reaches(hook):
                raise ValueError(f"A global {kind} ({_name(hook)}) {_REACHES}. {_GLOBAL_FIX}")


def global_hook_ids() -> tuple[tuple[int, ...], ...]:
    """The global module hooks registered now (their handles' ids), by kind: a tracer plans anew where they changed,
    so that one registered after planning is checked as planning checks it."""
    return tuple(tuple(getattr(nn.modules.module, slot)) for slot in _GLOBAL_HOOKS)


class _Own(NamedTuple):
    """The user's model's tensors' names, by id and by storage."""

    ids: Mapping[int, str]
    storages: Mapping[int, str]


# the dicts of a module's hook flags, by the hook's own dict: a handle's ``remove()`` deletes its key from each
_HOOK_FLAGS = {
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
}


# held while a copy's hook runs and its entries are put back, and while a copy is made: a hook removing itself from
# the user's dicts in one call's run left another call's copy made meanwhile without it (40% off; a review helper's)
HOOKS_PUT_BACK = threading.RLock()


class _Kept:
    """A hook's entries in the user's module's dicts (``slots``) as the call found them, put back where the hook's
    run removed them: a hook running once (``handle.remove()`` in it) removed itself from the user's model, its
    handle pointing at the user's dicts, not the copy's (a review helper's); the copy keeps it, so that the model is
    scored as the next forward would run it, on every example and in every call."""

    def __init__(self, module: nn.Module, slots: tuple[str, ...], key: int) -> None:
        self.module, self.key = module, key
        self.found = {slot: dict(vars(module)[slot]) for slot in slots if isinstance(vars(module).get(slot), dict)}

    def put_back(self) -> None:
        for slot, found in self.found.items():
            now = vars(self.module)[slot]
            if self.key in found and self.key not in now:  # (in order: hooks run as they were registered)
                kept = {k: now.get(k, v) for k, v in found.items() if k in now or k == self.key}
                entries = {**kept, **now}
                now.clear()
                now.update(entries)


def _guarded(hook: Any, own: _Own, root: nn.Module, what: str, kept: _Kept) -> Callable[..., Any]:
    """``hook``, run refusing to compute with a tensor of the user's model that the call's copy (``root``) does not
    hold now: a reference to the model the search above cannot see (a weak reference, an object's slots, a chain of
    attributes deeper than it looks) would read the user's weights, not the checkpoint's being scored. Its entries
    in the user's module stay (``kept``)."""

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with HOOKS_PUT_BACK:
            try:
                with _UsersTensors(own, root, what):
                    return hook(*args, **kwargs)
            finally:
                kept.put_back()

    return guarded


class _UsersTensors(TorchFunctionMode):
    """Raises where an op gets a tensor of the user's model (``own``: by id, or a view of its storage:
    ``w.detach()``) that ``root`` does not hold now."""

    def __init__(self, own: _Own, root: nn.Module, what: str) -> None:
        super().__init__()
        self.own, self.root, self.what = own, root, what

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: Any = None) -> Any:
        for t in optree.tree_leaves((args, kwargs or {})):
            name = self._own(t) if isinstance(t, torch.Tensor) else None
            if name is not None and not self._current(t):
                raise ValueError(
                    f"{self.what} that computes with the model's own tensor {name!r}, the user's, not the "
                    f"checkpoint's being scored (which the call's copy of the model holds). {_FIX}"
                )
        return func(*args, **(kwargs or {}))

    def _own(self, t: torch.Tensor) -> str | None:
        return self.own.ids.get(id(t)) or self.own.storages.get(_storage(t))

    def _current(self, t: torch.Tensor) -> bool:
        """Whether the copy holds ``t`` now (a checkpoint made of the model's own tensors: its buffers, say), or, for
        a view of a tensor of the model, one of its storage (the copy's weight detached: on a checkpoint made of the
        model's tensors, that storage is theirs)."""
        held = (*self.root.parameters(), *self.root.buffers())
        if id(t) in self.own.ids:
            return any(c is t for c in held)
        return any(_storage(c) == _storage(t) for c in held)


def _rebuilt(hook: Any, tree: _Tree, what: str) -> Any:
    """``hook`` with its references to the tree's modules moved to their copies, or itself where it holds none."""
    if isinstance(hook, types.MethodType):
        if id(hook.__self__) in tree.copies:
            return types.MethodType(hook.__func__, tree.copies[id(hook.__self__)])
        return hook  # (another object's method: what it reads of the model, ``_guarded`` sees)
    if isinstance(hook, functools.partial):
        func = _rebuilt(hook.func, tree, what)
        args = [_moved(a, tree, what) for a in hook.args]
        keywords = {k: _moved(v, tree, what) for k, v in hook.keywords.items()}
        same = func is hook.func and all(map(operator.is_, args, hook.args)) and all(
            keywords[k] is v for k, v in hook.keywords.items()
        )
        return hook if same else functools.partial(func, *args, **keywords)
    if isinstance(hook, types.FunctionType):
        if id(hook) in tree.rebuilding:  # (a closure holding itself: left as it is within its own rebuilding)
            return hook
        tree.rebuilding.add(id(hook))
        try:
            return _rebuilt_function(hook, tree, what)
        finally:
            tree.rebuilding.discard(id(hook))
    return hook  # (a callable object: what it reads of the model, ``_guarded`` sees)


def _rebuilt_function(fn: types.FunctionType, tree: _Tree, what: str) -> types.FunctionType:
    """``fn`` with the tree's modules in its closure and default arguments moved to their copies (new cells for
    those; the others shared, so that the hook's own state is the user's). Its globals are the user's (a copy would
    lose what the hook writes there): what it reads of the model through them, ``_guarded`` sees."""
    cells = fn.__closure__ or ()
    closure = tuple(_moved_cell(c, tree, what) for c in cells)
    defaults = tuple(_moved(v, tree, what) for v in fn.__defaults__ or ())
    kwdefaults = {k: _moved(v, tree, what) for k, v in (fn.__kwdefaults__ or {}).items()}
    if all(map(operator.is_, closure, cells)) and all(map(operator.is_, defaults, fn.__defaults__ or ())) and all(
        kwdefaults[k] is v for k, v in (fn.__kwdefaults__ or {}).items()
    ):
        return fn
    rebuilt = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, defaults or None, closure or None)
    rebuilt.__kwdefaults__ = kwdefaults or None
    return functools.update_wrapper(rebuilt, fn, updated=())


def _moved_cell(cell: types.CellType, tree: _Tree, what: str) -> types.CellType:
    value = cell_value(cell)
    moved = _moved(value, tree, what)
    return cell if moved is value else types.CellType(moved)


def _moved(value: Any, tree: _Tree, what: str) -> Any:
    """A module of the tree's copy; a function rebuilt (``_rebuilt``); anything else itself, unless it reaches the
    model (a tensor of it, a container or object holding it): refused."""
    if isinstance(value, nn.Module) and id(value) in tree.copies:
        return tree.copies[id(value)]
    if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        return _rebuilt(value, tree, what)
    if tree.reaches(value):
        kind = "tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what} holding a {kind} that {_REACHES}. {_FIX}")
    return value


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or type(hook).__name__


_REACHES = "is or holds a module or tensor of the model"
_FIX = (
    "Scores run a private copy of the model with each checkpoint's tensors, and such a hook would read the "
    "original's (the user's weights). Read the module through the hook's first argument, keep the model in the "
    "hook's closure or arguments (moved to the copy), or register a method of the module "
    "(`register_forward_hook(self._hook)`)."
)
_GLOBAL_FIX = (
    "Scores run a private copy of the model with each checkpoint's tensors, and a global hook holding the model "
    "would read the original's (the user's weights). Remove it (`handle.remove()`) while scoring, or read the module "
    "through the hook's first argument."
)
