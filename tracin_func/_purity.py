"""A dry run of the loss on one example that refuses forward passes a score cannot be trusted with.

The forward pass must be a function of the checkpoint and the example: a module that updates state (running
statistics of a train-mode norm layer, spectral norm's power-iteration vectors, a custom counter) would write into
the checkpoint's or the model's tensors, and one that draws random numbers (train-mode dropout in custom code)
gives random scores. Every aten op of the dry run is inspected *before* it runs, so a refused write never happens.
The same run turns deep torch errors about outputs and dtypes into messages that name the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

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


def check_forward(module: nn.Module | None, loss: ExampleLossFn, state: Tensors, batch: Any, where: str) -> None:
    """Run ``loss`` on the first example of ``batch`` under the watch; raise with the fix on anything untrustworthy."""
    example = batch_of_one(example_at(batch, 0))
    with torch.no_grad(), _running_modules(module) as stack, _Watch(_protected(module, state, example), stack):
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
