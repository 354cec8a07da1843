"""The layers' own attributes (besides their parameters, buffers and sublayers): what a forward pass may store in
them (a cache, attention maps kept for plots) is taken before a run and restored after it, so that planning's dry
runs and every call leave the user's model as they found it."""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import nn

# nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts, the training flag): not a layer's state
MODULE_SLOTS = frozenset(vars(nn.Module()))
CONTAINERS = (dict, list, set, tuple, deque)
NESTING = 3  # containers nested this deep in a layer's attributes are taken, copied and searched for tensors
FLAT_ABOVE = 1000  # items of a container taken as one flat copy (a vocabulary list): not walked item by item


class _Taken(NamedTuple):
    """A container as it was: the object and its items (nested containers taken too, unless ``flat``)."""

    original: Any
    items: dict[Any, Any]  # keys, or positions, to items
    flat: Any = None  # a large container's items, copied at once (a list, or a dict), instead of ``items``


def _structure(value: Any, depth: int = NESTING) -> Any:
    """``value`` with the containers nested in it (dicts, lists, sets, tuples, deques, subclasses too) taken as
    ``_Taken``, their other items by reference: what a run may fill in place, to compare and restore. A tuple holding
    no container (a convolution's ``kernel_size``) cannot be filled: itself."""
    if depth == 0 or not isinstance(value, CONTAINERS):
        return value
    if len(value) > FLAT_ABOVE:
        return _Taken(value, {}, dict(value) if isinstance(value, dict) else list(value))
    items = {k: _structure(v, depth - 1) for k, v in _items(value)}
    if type(value) is tuple and not any(isinstance(v, _Taken) for v in items.values()):
        return value
    return _Taken(value, items)


def _items(container: Any) -> Any:
    return container.items() if isinstance(container, dict) else enumerate(container)


def _same(now: Any, then: Any) -> bool:
    """Whether ``now`` is still what ``_structure`` took as ``then``: the same objects, holding the same items."""
    if not isinstance(then, _Taken):
        return now is then
    if now is not then.original:
        return False
    if then.flat is not None:
        if isinstance(now, dict):
            same_keys = len(now) == len(then.flat) and now.keys() == then.flat.keys()
            return same_keys and all(map(operator.is_, now.values(), then.flat.values()))
        return len(now) == len(then.flat) and all(map(operator.is_, now, then.flat))
    items = dict(_items(now))
    return items.keys() == then.items.keys() and all(_same(items[k], then.items[k]) for k in items)


def _put_back(taken: Any) -> Any:
    """The object ``_structure`` took, given its items back in place (nested containers too)."""
    if not isinstance(taken, _Taken):
        return taken
    container = taken.original
    flat = taken.flat.items() if isinstance(taken.flat, dict) else enumerate(taken.flat or ())
    items = list(flat) if taken.flat is not None else [(k, _put_back(v)) for k, v in taken.items.items()]
    if not isinstance(container, tuple):  # (a tuple's mutable items are put back above)
        container.clear()
        if isinstance(container, dict):
            container.update(items)
        else:
            (container.update if isinstance(container, set) else container.extend)(v for _, v in items)
    return container


def own_attributes(m: nn.Module) -> dict[str, Any]:
    """A layer's attributes besides nn.Module's bookkeeping (of torch's own layers, the public ones only: an LSTM
    keeps private flat weights that follow its weights)."""
    torch_layer = type(m).__module__.startswith("torch.")
    return {k: v for k, v in vars(m).items() if k not in MODULE_SLOTS and not (torch_layer and k.startswith("_"))}


class Attributes(NamedTuple):
    module: nn.Module
    values: dict[str, Any]  # by name, as taken
    contents: dict[str, Any]  # ``_structure`` of the containers among them (filled in place by a run)
    tensors: tuple[dict[str, Any], dict[str, Any]]  # its parameters and buffers by name, as taken
    hooks: tuple[frozenset[int], ...]  # the ids of its hooks of each kind (``_HOOKS``), as taken


# a module's hook dicts: a forward may register hooks of its own on its first run, with a flag saying so (transformers'
# output capturing): the flag removed after a run and not the hooks, each run added a set, which fed SegFormer's head
# duplicated hidden states (0.1% off, silently) and piled hooks on the user's model (``restore_state``)
_HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip


class LayerState(NamedTuple):
    layers: list[Attributes]
    dicts: list[dict[Any, Any]]  # every layer's attribute, parameter, buffer and hook dicts
    entries: tuple[list[Any], list[Any]]  # their keys and objects as taken (``_entries``)


def layer_state(module: nn.Module | None) -> LayerState:
    """Every layer's own attributes (caches a forward pass may fill), the tensors its parameter and buffer slots
    hold (a forward rebinding a buffer, ``self.count = self.count + 1``, replaces the slot's tensor, which
    ``functional_call`` restores only for the names it is given) and its hooks, to restore after a run."""
    taken, dicts = [], []
    for m in module.modules() if module is not None else ():
        if isinstance(m, torch.jit.ScriptModule):  # (its state is TorchScript's, in wrappers of no Python dict: a
            continue  # scripted criterion crashed every call; a Python run cannot rebind it)
        values = own_attributes(m)
        structures = {k: _structure(v) for k, v in values.items() if isinstance(v, CONTAINERS)}
        contents = {k: c for k, c in structures.items() if isinstance(c, _Taken)}
        hooks = tuple(frozenset(getattr(m, kind, ())) for kind in _HOOKS)
        taken.append(Attributes(m, values, contents, (dict(m._parameters), dict(m._buffers)), hooks))
        dicts += [vars(m), m._parameters, m._buffers, *[getattr(m, kind, _NONE) for kind in _HOOKS]]
    return LayerState(taken, dicts, _entries(dicts))


def _entries(dicts: list[dict[Any, Any]]) -> tuple[list[Any], list[Any]]:
    return list(chain.from_iterable(dicts)), list(chain.from_iterable(map(dict.values, dicts)))


def _unchanged(state: LayerState) -> bool:
    """Whether no layer's attribute, parameter, buffer or hook entry was added, rebound or removed since
    ``layer_state``, nor a container filled: a run's usual case, found at C speed (MobileNet's 200 layers walked one
    by one took 1.1 ms each scoring pass). The dicts are the ones taken: a slot's dict rebound is an attribute."""
    keys, objects = _entries(state.dicts)
    return (
        keys == state.entries[0]
        and all(map(operator.is_, objects, state.entries[1]))
        and all(_same(values[k], c) for _, values, contents, *_ in state.layers for k, c in contents.items())
    )


_NONE: dict[Any, Any] = {}


def restore_state(state: LayerState, last: bool = True) -> None:
    """Undo a run's changes to the layers' own attributes (``layer_state``): added ones removed, rebound ones set
    back, filled containers given their items back; and the tensors in its parameter and buffer slots. A run that
    registered hooks (``_HOOKS``) keeps them, and the values it set that are no tensors or containers (the flag
    saying so, a handle), while the call runs the model again (not ``last``): each run would register another set
    (transformers' output capturing: SegFormer's head read duplicated hidden states), and registered again after the
    call's own hooks, an output-changing hook ran after them (32% off). At the call's end (``last``) the hooks go
    where a layer's attribute was set with them (the flag, undone with it), and stay where none was (a flag kept
    elsewhere, a config object, a module-level set, which no restore reaches: as running the model leaves it)."""
    if _unchanged(state):
        return
    taken = state.layers
    registered = [(m, kind, then) for m, *_, held in taken for kind, then in zip(_HOOKS, held)
                  if any(k not in then for k in getattr(m, kind, ()))]  # fmt: skip
    flags = {
        (id(m), k)
        for m, values, *_ in taken if registered
        for k, v in own_attributes(m).items()
        if values.get(k, _ABSENT) is not v and not isinstance(v, (torch.Tensor, *CONTAINERS))
    }
    for m, kind, then in registered if last and flags else ():
        hooked = getattr(m, kind)
        for key in [k for k in hooked if k not in then]:
            del hooked[key]
    kept = set() if last else flags
    for m, values, contents, tensors, _ in taken:
        for key in [k for k in own_attributes(m) if k not in values and (id(m), k) not in kept]:
            delattr(m, key)
        for key, value in values.items():
            if vars(m).get(key) is not value and (id(m), key) not in kept:
                object.__setattr__(m, key, value)
            if key in contents and not _same(value, contents[key]):
                _put_back(contents[key])
        for slot, then in zip((m._parameters, m._buffers), tensors):  # (entry by entry: never an empty dict)
            for key in [k for k in slot if k not in then]:
                del slot[key]
            for key, t in then.items():
                if slot.get(key) is not t:
                    slot[key] = t


def left_by_run(taken: LayerState) -> list[tuple[nn.Module, str]]:
    """``(layer, name)`` of the attributes and parameter or buffer slots a run added, rebound or filled since
    ``layer_state`` took ``taken``."""
    left = []
    for m, values, contents, tensors, _ in taken.layers:
        now = own_attributes(m)
        left += [(m, k) for k, v in now.items() if v is not values.get(k, _ABSENT) or not _same(v, contents.get(k, v))]
        for slot, then in zip((m._parameters, m._buffers), tensors):
            left += [(m, k) for k, t in slot.items() if t is not then.get(k)]
    return left


_ABSENT = object()


def put_back_forwards(set_for_a_block: list[tuple[nn.Module, Any]]) -> None:
    """Each module's own ``forward`` attribute as it was before a block set one (``(module, the one before or None)``,
    in the order set): removed, or set again."""
    for module, before in reversed(set_for_a_block):
        if before is None:
            object.__delattr__(module, "forward")
        else:
            object.__setattr__(module, "forward", before)


_WITHIN: ContextVar[int] = ContextVar("_WITHIN", default=0)  # `leaving_no_trace` blocks entered and not left


@contextmanager
def leaving_no_trace(module: nn.Module | None) -> Iterator[LayerState]:
    """A dry run of the model within the block leaves its layers' own attributes as they were (a cache it filled is
    emptied again), and hooks it registered as ``restore_state`` says (the outermost block: the call's end); the block
    gets the attributes as taken (``left_by_run``)."""
    taken = layer_state(module)
    token = _WITHIN.set(_WITHIN.get() + 1)
    try:
        yield taken
    finally:
        _WITHIN.reset(token)
        restore_state(taken, last=_WITHIN.get() == 0)


# a call's layers' attributes as the scoring passes start from them, and the depth of ``leaving_no_trace`` blocks
# there (``passes_from_here``)
_FOUND: ContextVar[tuple[LayerState, int] | None] = ContextVar("_FOUND", default=None)


@contextmanager
def passes_from_here(module: nn.Module | None) -> Iterator[None]:
    """Within the block (a call's, its model set up: ``_model.exclusive_use``), each scoring pass starts from the
    layers' attributes as they are here (``as_found``)."""
    token = _FOUND.set(None if module is None else (layer_state(module), _WITHIN.get()))
    try:
        yield
    finally:
        _FOUND.reset(token)


@torch.compiler.disable  # (eager inside compiled updates)
def as_found() -> None:
    """Each scoring pass of a call (a batch's, an example's spot check) starts from the layers' attributes as the
    call found them: a value a run keeps for later ones (Hugging Face's dynamic RoPE grows its table on the longest
    input seen) gave an example's scores the examples scored before it (40% off, silently, where the longer ones came
    later; a review helper's). Each batch then runs as the model's next forward would run it; the dry runs, in blocks
    of their own, keep what one leaves for the next, which planning's checks read (a cache filled before the call, a
    lazy calibration)."""
    found = _FOUND.get()
    if found is not None and _WITHIN.get() == found[1]:  # (not within a dry run's block)
        restore_state(found[0], last=False)
