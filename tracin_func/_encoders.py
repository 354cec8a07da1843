"""torch's ``nn.TransformerEncoder`` and ``TransformerEncoderLayer`` take an inference fast path (nested tensors, one
fused kernel per layer) only where no gradient is traced and no torch function mode is active: the path a scoring pass
runs must be the one the user's model runs (``on_traced_path``, ``encoders_set_aside``)."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optree
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._code import held_values
from ._state import put_back_forwards

ENCODERS = (nn.TransformerEncoder, nn.TransformerEncoderLayer)


@contextmanager
def on_traced_path(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The encoders among ``modules`` run the path autograd runs when a gradient reaches them (``_off_fast_path``),
    for the duration of the block."""
    handles = []
    try:  # (registered inside: an interruption while registering would leave some)
        for m in modules:
            if isinstance(m, ENCODERS):
                handles.append(m.register_forward_pre_hook(_off_fast_path, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _off_fast_path(encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An ``nn.TransformerEncoder`` or ``TransformerEncoderLayer`` whose input and weights need no gradient (its
    weights' gradients come from factors, or it is frozen) takes its inference fast path: the encoder turns a padded
    batch into nested tensors, which no layer's hook can take factors of (torch's "NestedTensor layer_norm requires
    weight and bias") and which give padded positions zeros, and the layer runs one fused kernel, calling none of its
    layers ("called fewer times on an example than on the batch's first", scoring its attention's input projection
    alone). Its input plus a zero that needs a gradient, it runs the path autograd runs in training."""
    src = args[0] if args else kwargs.get("src")
    if not isinstance(src, torch.Tensor) or src.requires_grad or not torch.is_grad_enabled():
        return None
    src = src + torch.zeros((), dtype=src.dtype, device=src.device, requires_grad=True)
    return ((src, *args[1:]), kwargs) if args else (args, {**kwargs, "src": src})


@contextmanager
def encoders_set_aside(module: nn.Module, held: bool = False) -> Iterator[None]:
    """Within the block (a call, under the module's lock: the call's copy or the user's module a loss calls), an
    ``nn.TransformerEncoder`` or ``TransformerEncoderLayer`` called with gradients off (under ``torch.no_grad()`` in
    the model's forward: a frozen feature extractor, a teacher's pass) runs with the library's torch function modes
    set aside, so that torch takes its inference fast path as it does in the user's model: an encoder then turns a
    padded batch into nested tensors, which give padded positions zeros. Under any torch function mode torch computes
    those positions instead (a model reading them, a mean over every token, scored 35-219% off its own backward,
    silently, on every route; 33% through a ``tc.BatchLoss`` while the call's copy alone was wrapped). Its ``forward``
    wrapped (hooks left the modes popped on an interruption, which ``always_call`` hooks do not see), and each
    encoder's own ``forward`` attribute, if any, set again after. ``held``: a teacher the losses hold, which gives no
    factors: also where gradients are on but its input and weights need none, as torch decides (a frozen teacher
    called without `no_grad()`: 6% off)."""
    wrapped: list[tuple[nn.Module, Any]] = []
    try:
        for m in module.modules():
            if isinstance(m, ENCODERS):
                wrapped.append((m, vars(m).get("forward")))
                object.__setattr__(m, "forward", _modes_set_aside(m, m.forward, held))
        yield
    finally:
        put_back_forwards(wrapped)


def held_encoders(losses: Iterable[Any], module: nn.Module | None) -> list[nn.Module]:
    """The modules a call's losses hold (a criterion that is one; what ``held_values`` finds in a loss function: a
    teacher it closes over or loads as a global, a partial's argument) that hold an encoder and are no part of
    ``module``: set aside as the model's are (a teacher's encoder run under ``torch.no_grad()`` in the loss took the
    path torch takes under a mode, computing padded positions its own call gives zeros: 27-52% off, silently; a
    review helper's); also in a container, a namespace or a bound method's object that one of those is. A teacher
    reached otherwise (deeper, or through an object the loss receives) is not found."""
    own = {id(m) for m in module.modules()} if module is not None else set()
    found: dict[int, nn.Module] = {}
    for loss in {id(loss): loss for loss in losses}.values():  # (the test side's loss is often the training side's)
        user = getattr(loss, "criterion", getattr(loss, "fn", loss))
        for value in [user, *(v for _, v in held_values(user))]:
            found.update((id(m), m) for m in _modules_within(value) if id(m) not in own)
    return [m for m in found.values() if any(isinstance(layer, ENCODERS) for layer in m.modules())]


def _modules_within(value: Any, depth: int = 4, budget: int = 10_000, each: int = 100) -> Iterator[nn.Module]:
    """``value`` if a module, else the modules it holds ``depth`` levels deep, breadth first: a container's items, a
    bound method's object (`Distiller(teacher).loss`), a plain object's attributes (a `SimpleNamespace`, a config
    dict's dicts: a teacher three levels down was missed, 227% off). Every item is looked at; each object is looked
    into once, ``budget`` of them at most, and ``each`` at most of one container's items (a list of 12,000 data rows
    spent the budget before a config's dict beside it: 11-58% off). An object that fails being looked at (a dead weak
    proxy, a mapping whose items raise) is passed over."""
    if _is_module(value):
        yield value
        return
    level, opened = [value], set()
    for _ in range(depth):
        deeper: list[Any] = []
        for v in level:
            if len(opened) >= budget:
                return
            if id(v) in opened:
                continue
            try:
                inner = _held_by(v)
                items = None if inner is None else list(inner)
            except Exception:
                continue
            if items is None:
                continue
            opened.add(id(v))
            others = 0
            for t in items:
                if _is_module(t):
                    yield t
                elif others < each:
                    deeper.append(t)
                    others += 1
        level = deeper


def _is_module(value: Any) -> bool:
    try:
        return isinstance(value, nn.Module)
    except Exception:  # (a dead weak proxy raises ReferenceError)
        return False


def _held_by(value: Any) -> Iterable[Any] | None:
    """What ``_modules_within`` looks into: a bound method's object, a mapping's values, a collection's items, a plain
    object's attributes; None for a class, a Python module, a function or a tensor (an object of no ``__dict__``
    raises: passed over)."""
    if isinstance(value, types.MethodType):
        return [value.__self__]
    if isinstance(value, Mapping):
        return value.values()
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, (type, types.ModuleType, types.FunctionType, torch.Tensor)):
        return None
    return vars(value).values()


def _modes_set_aside(encoder: nn.Module, forward: Callable[..., Any], held: bool) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and (not held or _needs_gradient(encoder, (args, kwargs))):
            return forward(*args, **kwargs)
        popped = _library_modes_popped()
        try:
            return forward(*args, **kwargs)
        finally:
            for mode in reversed(popped):
                torch._C._push_on_torch_function_stack(mode)

    return run


def _needs_gradient(encoder: nn.Module, inputs: Any) -> bool:
    """Whether a tensor among ``inputs`` or ``encoder``'s weights needs a gradient: torch's traced path then."""
    tensors = [*optree.tree_leaves(inputs, none_is_leaf=True), *encoder.parameters()]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _library_modes_popped() -> list[TorchFunctionMode]:
    """The library's torch function modes on top of the stack, popped (the user's own, and any below them, stay)."""
    popped = []
    while (depth := torch._C._len_torch_function_stack()) and type(
        torch._C._get_function_stack_at(depth - 1)
    ).__module__.startswith(__package__ + "."):
        popped.append(torch._C._pop_torch_function_stack())
    return popped
