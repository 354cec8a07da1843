"""A dry run of the loss on one example that refuses forward passes a score cannot be trusted with.

The forward pass must be a function of the checkpoint and the example: a module that updates state (running
statistics of a train-mode norm layer, spectral norm's power-iteration vectors, a custom counter) would write into
the checkpoint's or the model's tensors, and one that draws random numbers (train-mode dropout in custom code)
gives random scores. Every aten op of the dry run is inspected *before* it runs, so a refused write never happens.
The same run turns deep torch errors about outputs and dtypes into messages that name the fix.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._grads import Tensors, batch_of_one, example_at
from ._loss import CriterionLoss, ExampleLossFn


def _storage(t: torch.Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" and t.numel() else None


def _bound(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument by name, defaults included (SDPA's CPU kernel is called without its ``dropout_p=0``)."""
    schema = func._schema.arguments
    defaults = {a.name: a.default_value for a in schema if a.has_default_value()}
    return {**defaults, **{a.name: v for a, v in zip(schema, args)}, **kwargs}


@functools.cache
def _inspected(func: Any) -> tuple[bool, tuple[str, ...]]:
    """Whether an op may draw random numbers, and the names of the arguments it writes (per op, once: most ops
    are neither, and pass the watch without their arguments being bound)."""
    written = tuple(a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    return torch.Tag.nondeterministic_seeded in func.tags, written


def _draws_random(values: Mapping[str, Any]) -> bool:
    """Whether a seeded random op called with ``values`` draws random numbers: not when a zero probability or
    ``train=False`` makes it deterministic (the attention kernels carry the tag whatever their ``dropout_p``)."""
    if any(isinstance(values.get(key), (int, float)) and values[key] == 0 for key in ("dropout_p", "p")):
        return False
    return values.get("train") is not False


class _Watch(TorchDispatchMode):
    """Raises on a random op or a write into a protected storage, naming the innermost running module."""

    def __init__(self, protected: Mapping[int, str], modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.protected, self.modules = protected, modules

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        seeded, writes = _inspected(func)
        if seeded or writes:
            values = _bound(func, args, kwargs)
            if seeded and _draws_random(values):
                self._refuse(f"draws random numbers ({func}), so its scores would be random")
            for name in writes:
                written = values.get(name)
                for t in written if isinstance(written, (list, tuple)) else [written]:
                    target = self.protected.get(_storage(t)) if isinstance(t, torch.Tensor) else None
                    if target is not None:
                        self._refuse(
                            f"writes into {target} ({func}), which would change it and make scores depend on order"
                        )
        return func(*args, **kwargs)

    def _refuse(self, what: str) -> None:
        path, module = self.modules[-1] if self.modules else ("", None)
        who = f"module {path or '(root)'!r} ({type(module).__name__})" if module is not None else "the model"
        raise ValueError(
            f"`model`: {who} {what} in its forward pass. TracIn needs a forward pass that is a function of the "
            f"checkpoint and the example: call `model.eval()` before scoring (training mode updates running "
            f"statistics and turns on dropout), or remove the state update / randomness from that module."
        )


@contextmanager
def leaving_no_trace(module: nn.Module | None) -> Iterator[None]:
    """A dry run of the model within the block leaves its layers' own attributes as they were (a cache it filled is
    emptied again, so that the first run to fill it, discovery, shows what it holds)."""
    taken = layer_state(module)
    try:
        yield
    finally:
        restore_state(taken)


@contextmanager
def _running_modules(module: nn.Module | None) -> Iterator[list[tuple[str, nn.Module]]]:
    """A stack of the modules whose forward is running (hooks on the call's private copy, removed on exit)."""
    stack: list[tuple[str, nn.Module]] = []

    def enter(path: str) -> Callable[..., None]:
        return lambda m, args: stack.append((path, m))

    def leave(m: nn.Module, args: Any, output: Any) -> None:
        stack.pop()  # returns None: the output is left as it is

    handles = []
    for path, m in module.named_modules() if module is not None else ():
        handles.append(m.register_forward_pre_hook(enter(path)))
        handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _protected(module: nn.Module | None, state: Tensors, example: Any) -> dict[int, str]:
    """Storages no forward pass may write: the checkpoint's tensors, the model's tensors and the inputs."""
    named: dict[str, torch.Tensor] = {}
    for path, m in module.named_modules() if module is not None else ():
        prefix = f"{path}." if path else ""
        tensors = {**m._parameters, **m._buffers, **{k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}}
        named.update({f"the model's tensor {prefix}{k!r}": t for k, t in tensors.items() if t is not None})
    named.update({f"the checkpoint's tensor {n!r}": t for n, t in state.items()})
    named.update({f"input tensor {i}": t for i, t in enumerate(optree.tree_leaves(example, none_is_leaf=True))})
    return {ptr: name for name, t in named.items() if isinstance(t, torch.Tensor) and (ptr := _storage(t))}


# nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts, the training flag): not a layer's state
_MODULE_SLOTS = frozenset(vars(nn.Module()))


class Attributes(NamedTuple):
    """The attributes a layer of no known kind (not torch's own) holds besides nn.Module's bookkeeping, when taken:
    ``values`` by name, ``contents`` shallow copies of the dicts, lists and sets among them (filled in place)."""

    path: str
    module: nn.Module
    values: dict[str, Any]
    contents: dict[str, Any]


def layer_state(module: nn.Module | None) -> list[Attributes]:
    """Every custom layer's own attributes (caches a forward pass may fill), to compare and restore after a run."""
    taken = []
    for path, m in module.named_modules() if module is not None else ():
        if type(m).__module__.startswith("torch."):  # known state (an LSTM's flat weights follow its weights)
            continue
        values = {k: v for k, v in vars(m).items() if k not in _MODULE_SLOTS}
        contents = {k: copy.copy(v) for k, v in values.items() if type(v) in (dict, list, set)}
        taken.append(Attributes(path, m, values, contents))
    return taken


def changed_state(taken: list[Attributes]) -> list[tuple[str, nn.Module, str, Any]]:
    """``(path, module, attribute, value)`` of each attribute a run added, rebound or filled since ``taken``."""
    out = []
    for path, m, values, contents in taken:
        for key, value in vars(m).items():
            if key in _MODULE_SLOTS:
                continue
            filled = key in contents and not _same_items(value, contents[key])
            if key not in values or value is not values[key] or filled:
                out.append((path, m, key, value))
    return out


def restore_state(taken: list[Attributes]) -> None:
    """Undo a run's changes to the layers' own attributes (``layer_state``): added ones removed, rebound ones set
    back, filled containers emptied back to their content."""
    for _, m, values, contents in taken:
        for key in [k for k in vars(m) if k not in _MODULE_SLOTS and k not in values]:
            delattr(m, key)
        for key, value in values.items():
            if vars(m).get(key) is not value:
                object.__setattr__(m, key, value)
            if key in contents and not _same_items(value, contents[key]):
                value.clear()
                (value.extend if isinstance(value, list) else value.update)(contents[key])


def kept_gradients(taken: list[Attributes]) -> list[tuple[str, nn.Module, str, Any, Any]]:
    """The attributes a run (with gradients) set or filled since ``taken`` that hold a tensor computed from the
    parameters: ``(path, module, attribute, value, shallow copy of its items)``. Stored on every run (an attention
    map kept for inspection), such a tensor is harmless; kept and read back by later runs (a cache), it is not."""
    out = []
    for path, m, key, value in changed_state(taken):
        leaves = optree.tree_leaves(value, none_is_leaf=True) if type(value) in (dict, list, tuple) else [value]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            out.append((path, m, key, value, copy.copy(value) if type(value) in (dict, list, set) else None))
    return out


def refuse_reused(taken: list[Attributes], kept: list[tuple[str, nn.Module, str, Any, Any]]) -> None:
    """After a second run of the same example: raise (the attributes restored to ``taken``) when an attribute of
    ``kept_gradients`` still holds the first run's tensors, a cache (LeViT's attention biases in eval mode) that every
    later pass would reuse, with the first checkpoint's values and graph instead of its own."""
    for path, m, key, value, items in kept:
        now = vars(m).get(key)
        if now is value and (items is None or _same_items(now, items)):
            restore_state(taken)
            raise ValueError(
                f"`model`: module {path or '(root)'!r} ({type(m).__name__}) keeps {key!r} from one forward pass to "
                f"the next, and it holds a tensor computed from the parameters (a cache, like LeViT's attention "
                f"biases in eval mode): later passes would reuse the first checkpoint's values instead of their "
                f"own, and no gradient would reach those parameters. Make the forward pass compute it every time "
                f"(e.g. override the method that fills the cache), then score."
            )


def _same_items(now: Any, then: Any) -> bool:
    if isinstance(now, dict):
        return now.keys() == then.keys() and all(now[k] is then[k] for k in now)
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))  # (a set: same size, no lookup needed)


def check_forward(module: nn.Module | None, loss: ExampleLossFn, state: Tensors, batch: Any, where: str) -> None:
    """Run ``loss`` on the first example of ``batch`` under the watch; raise with the fix on anything untrustworthy.
    The run leaves no trace in the layers' own attributes (a cache it filled is emptied again)."""
    example = batch_of_one(example_at(batch, 0))
    protected = _protected(module, state, example)
    with leaving_no_trace(module), torch.no_grad(), _running_modules(module) as stack, _Watch(protected, stack):
        try:
            if not isinstance(loss, CriterionLoss):
                loss(state, example)
                return
            *inputs, target = example
            output = loss.forward(state, *inputs)
            _check_output(output)
            loss.criterion(output, target)
        except RuntimeError as err:
            _explain_dtype(err, example, state, where)
            raise


def _check_output(output: Any) -> None:
    if isinstance(output, torch.Tensor):
        return
    kind = "dict" if isinstance(output, Mapping) else type(output).__name__
    keys = f" with keys {list(output)[:6]}" if isinstance(output, Mapping) else ""
    raise TypeError(
        f"`loss_fn`: the model returns a {kind}{keys}, but `loss_fn` is a criterion `loss_fn(outputs, targets)` "
        f"that needs the output tensor. Pass `loss_fn=tc.ExampleLoss(lambda params, batch: ...)` that picks the "
        f"output (e.g. `out[0]` or `out['logits']`), or make the model return a tensor."
    )


def _explain_dtype(err: RuntimeError, example: Any, state: Tensors, where: str) -> None:
    """Integer inputs to a floating layer fail deep inside torch: name the input and the conversion instead."""
    message = str(err)
    if "dtype" not in message and "scalar type" not in message:
        return
    leaves = optree.tree_leaves(example, none_is_leaf=True)
    inputs = leaves[:-1] if len(leaves) > 1 else leaves
    integer = [(i, t.dtype) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    if integer and floating:
        i, dtype = integer[0]
        raise TypeError(
            f"`{where}` input {i} is {dtype} but the model computes in {sorted(map(str, floating))[0]}, and the "
            f"forward pass failed: {message.splitlines()[0]}. Convert it with `x.float()` (token ids for an "
            f"nn.Embedding stay integers)."
        ) from err
