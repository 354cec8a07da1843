"""The model as a function shape: which parameters are differentiated, and checkpoints split accordingly."""

from __future__ import annotations

import copy
import inspect
import os
import threading
import types
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple, Union

import optree
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel

from ._checkpoints import (
    AVERAGED_COUNT,
    COMPILED_INSIDE,
    LR_KEYS,
    STATE_KEYS,
    Checkpoint,
    check_lr,
    leading_prefixes,
    leading_wrappers,
    unprefixed,
    wrapper_prefix,
)
from ._data import COMPLEX
from ._encoders import encoders_set_aside, held_encoders
from ._hooks import HOOKS_PUT_BACK, on_copies
from ._recurrent import recurrent_unrolled
from ._state import CONTAINERS, FLAT_ABOVE, MODULE_SLOTS, NESTING, leaving_no_trace, passes_from_here
from ._warn import warn

Forward = Callable[..., Any]  # forward(state, *inputs) -> outputs
ParamSelector = Union[Sequence[str], Callable[[str], bool], None]

# Modules whose training-mode forward couples examples or draws random numbers: scores would be meaningless.
_TRAIN_MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class CheckpointState(NamedTuple):
    """One checkpoint ready for the pure core: its full state (parameters and buffers) on the target device and in
    the computation dtype, and its learning rate."""

    state: dict[str, torch.Tensor]
    lr: torch.Tensor  # 0-d, so compiled code does not specialise on its value
    adam: Any = None  # {name: _adam.AdamParam} when the checkpoint carries an Adam / AdamW optimizer state


class ModelSpec(NamedTuple):
    """What the core needs from the user's model: a forward function and the names it takes."""

    forward: Forward
    module: nn.Module | None  # the module that runs: a private copy of the user's (see `private_copy`) or the
    # user's own when a loss calls it directly; None for a pure function
    diff_names: tuple[str, ...]
    expected: frozenset[str] | None  # state-dict names a checkpoint must hold; None for a pure function
    aliases: Mapping[str, str]  # tied names (second name of a shared tensor) -> the first: accepted, not passed on
    defaults: Mapping[str, torch.Tensor]  # the model's own state, used for names a checkpoint omits (strict=False)
    unsaved: Mapping[str, torch.Tensor] = {}  # buffers no state dict holds (``persistent=False``): the model's own
    private: bool = False  # ``module`` is the call's private copy (not the user's, which a loss calls)
    # unsaved floating buffers in a dtype of the model's parameters, converted with them (a float32 ``inv_freq``
    # kept in a bfloat16 model is not)
    following: frozenset[str] = frozenset()
    # state-dict entries no functional call can set, the model's own: modules' ``get_extra_state()``, a quantized
    # layer's packed weights (``_settable``)
    extra: Mapping[str, Any] = {}
    counts: frozenset[str] = frozenset()  # counters no output reads (``_counts``): taken from the model where missing
    hooked: frozenset[str] = frozenset()  # parameters with a gradient hook (``register_hook``): refused if scored


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _released_in_child() -> None:
    """A process forked while another thread held a model's lock (a call running there) inherits it held, by no
    thread of its own: a call in the child (a DataLoader worker's) waited forever (a review helper's)."""
    for lock in (_LOCKS_GUARD, HOOKS_PUT_BACK, *list(_LOCKS.values())):
        lock._at_fork_reinit()  # type: ignore[attr-defined]  (threading's own locks are reset so)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_released_in_child)


@contextmanager
def exclusive_use(spec: ModelSpec, *losses: Any, passes_start: bool = True) -> Iterator[None]:
    """Hold the module a call runs on for the whole call: the user's (a loss calling it: ``tc.ExampleLoss``,
    ``tc.BatchLoss``) or a private copy (uncontended, except a tracer's, which every step of every thread uses):
    concurrent calls on it then run one after the other instead of swapping tensors into it at the same time. The
    layers' own attributes are as they were after the call (what the forward passes stored in them, say attention
    maps appended to a list, is undone). Recurrent layers run as unrolled cells for the whole call
    (``_recurrent.recurrent_unrolled``: the same function; on the user's module too, under its lock: a loss calling
    it ran the fused op under vmap, one example at a time in float64), and encoders called without gradients take
    torch's path as in the user's model (``_encoders.encoders_set_aside``; a teacher's the losses hold too). Each
    scoring pass starts from the layers' attributes as they are then (``_state.as_found``; not ``passes_start``: as
    a block inside sets them, a tracer's step after it has set the copy's settings as the model's). The ``losses``'
    criteria that are modules are left as they were too (one keeping its last loss in an attribute kept vmap's,
    unusable after the call)."""
    criteria = {id(c): c for c in (getattr(loss, "criterion", None) for loss in losses) if isinstance(c, nn.Module)}
    teachers = held_encoders(losses, spec.module)
    with ExitStack() as stack:
        stack.enter_context(holding(spec.module, *teachers))  # (in one order: two threads' teachers in two deadlocked)
        stack.callback(_own_flat_weights, spec.module)
        if spec.module is not None:
            for block in (leaving_no_trace, recurrent_unrolled, encoders_set_aside):
                stack.enter_context(block(spec.module))
        for criterion in criteria.values():
            stack.enter_context(leaving_no_trace(criterion))
        for teacher in teachers:
            stack.enter_context(encoders_set_aside(teacher, held=True))
        if passes_start:
            stack.enter_context(passes_from_here(spec.module))
        yield


def _own_flat_weights(module: nn.Module | None) -> None:
    """A recurrent layer's list of its weights for the fused op set to its own again: ``functional_call`` swapping
    a checkpoint's tensors in left the last ones there after the call (a loss calling the user's module: kept alive,
    the checkpoint's values; a sweep's), until the layer's next forward."""
    for m in module.modules() if module is not None else ():
        if isinstance(m, nn.RNNBase) and hasattr(m, "_init_flat_weights"):
            m._init_flat_weights()


@contextmanager
def holding(*models: Any) -> Iterator[None]:
    """The lock of every module of the ``models``' trees (none for a function), taken in one order by every thread: a
    call reading or running a model waits for another's on any model sharing a layer with it (a backbone under two
    heads: a loss calling one swapped the checkpoint's tensors into the other's layers, 170-830% off)."""
    modules = sorted({id(m): m for model in models if isinstance(model, nn.Module) for m in model.modules()}.items())
    with ExitStack() as stack:
        for _, m in modules:
            stack.enter_context(_lock_of(m))
        yield


def _lock_of(module: nn.Module) -> threading.RLock:
    """The lock calls on ``module`` hold (``holding``)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(module, threading.RLock())


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the user's tensors but not its module objects or containers.

    ``functional_call`` swaps checkpoint tensors into the modules it calls and planning registers forward hooks;
    both happen on this copy only, so the user's modules are never touched and concurrent calls (threads) never
    see each other's tensors or hooks. The per-module dicts and sets (parameters, buffers, submodules, hooks) are
    copied, and so are the containers a layer keeps (a list its forward appends attention maps to: concurrent calls
    would fill and restore the same list), shared ones staying shared within the copy; a layer of the tree held in
    an attribute or a container (a plain list of layers the forward loops over) is its copy, so that the call's
    tensors reach it. Tensors, weight tying and every other attribute are shared with the user's modules.
    """
    copies: dict[int, nn.Module] = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            clone = object.__new__(type(module))  # not copy.copy: parametrized modules refuse to be pickled
            for key, value in vars(module).items():
                object.__setattr__(clone, key, copy.copy(value) if isinstance(value, (dict, set)) else value)
            # `module.compile()`'s compiled call is bound to the user's module (its weights, not the checkpoint's):
            # the copy runs eagerly (`compile=True` compiles the call's own updates)
            object.__setattr__(clone, "_compiled_call_impl", None)
            copies[id(module)] = clone
            for name, child in module._modules.items():
                clone._modules[name] = None if child is None else copy_of(child)
        return copies[id(module)]

    with HOOKS_PUT_BACK:  # (the user's hooks as no copy's run has removed them, each copy's put back where that run
        root = copy_of(model)  # removes them)
        containers: dict[int, Any] = {}  # the copy of each container, by identity: shared ones stay shared
        for clone in copies.values():
            for key, value in vars(clone).items():
                if key not in MODULE_SLOTS:
                    object.__setattr__(clone, key, copied_containers(value, copies, containers))
        for name, module in model.named_modules(remove_duplicate=False):
            _rebind_instance_forward(name, module, copies)
        on_copies(model, copies)
    return root


def shared_by_copy(name: str, value: Any) -> bool:
    """Whether ``private_copy`` shares a module's attribute ``name`` = ``value`` with the user's module: not a module
    or a container (copied), a method bound to a module (rebound to the copy) or the compiled call (dropped)."""
    bound = isinstance(value, types.MethodType) and isinstance(value.__self__, nn.Module)
    return not (isinstance(value, (nn.Module, *CONTAINERS)) or bound or name == "_compiled_call_impl")


def copied_containers(
    value: Any, copies: Mapping[int, nn.Module], containers: dict[int, Any], depth: int = NESTING
) -> Any:
    """``value`` with the tree's modules in it replaced by their copies and its containers (dicts, lists, sets,
    deques, tuples, subclasses too) copied, once each, ``depth`` levels deep (large ones at once, not walked);
    other objects shared."""
    if isinstance(value, nn.Module):
        return copies.get(id(value), value)
    rebound = _rebound(value, copies)
    if rebound is not None:
        return rebound
    if depth == 0 or not isinstance(value, CONTAINERS):
        return value
    if id(value) in containers:
        return containers[id(value)]
    if len(value) > FLAT_ABOVE:  # (a vocabulary: items neither modules nor mutated in place, taken to be)
        copied = value if isinstance(value, tuple) else _shallow(value)
    else:
        if isinstance(value, dict):
            items = [(k, copied_containers(v, copies, containers, depth - 1)) for k, v in value.items()]
        else:
            items = [copied_containers(v, copies, containers, depth - 1) for v in value]
        copied = _rebuilt(value, items)
    containers[id(value)] = copied
    return copied


def _rebound(value: Any, copies: Mapping[int, nn.Module]) -> types.MethodType | None:
    """``value``, a method bound to a module of the tree (``self._body = self._impl``: it would read the user's
    module's weights, not the checkpoint's), bound to that module's copy instead; one compiled (``torch.compile(
    self._impl)``) is rebound uncompiled, as the copy's compiled call is dropped. None for anything else."""
    # (only a function is looked into: an object's own ``__getattr__`` may raise anything, a config's KeyError)
    method = getattr(value, "_torchdynamo_orig_callable", value) if isinstance(value, types.FunctionType) else value
    if isinstance(method, types.MethodType) and id(method.__self__) in copies:
        return types.MethodType(method.__func__, copies[id(method.__self__)])
    return None


def _shallow(container: Any) -> Any:
    try:
        return copy.copy(container)
    except Exception:  # a subclass that cannot be copied: shared, as any other object
        return container


def _rebuilt(container: Any, items: list[Any]) -> Any:
    """A container like ``container`` (its type: a subclass's state, like a defaultdict's factory, copied too) with
    ``items`` (``(key, value)`` pairs for a dict)."""
    if isinstance(container, tuple):
        if type(container) is tuple:
            return tuple(items)
        return type(container)._make(items) if hasattr(container, "_fields") else container  # a namedtuple
    copied = _shallow(container)
    if copied is container:
        return container
    copied.clear()
    (copied.update if isinstance(copied, (dict, set)) else copied.extend)(items)
    return copied


def _rebind_instance_forward(name: str, module: nn.Module, copies: dict[int, nn.Module]) -> None:
    """A ``forward`` set on a module instance would still run on the user's module (with the user's weights, not
    the checkpoint's): a method bound to a module of the tree is rebound to that module's copy; anything else that
    could hold the user's module (a partial, a closure) is refused."""
    forward = vars(module).get("forward")
    if forward is None or _rebound(forward, copies) is not None:  # (rebound with the other attributes)
        return
    if isinstance(forward, types.MethodType) and not isinstance(forward.__self__, nn.Module):
        return  # bound to a plain object: holds no module state
    if type(module).__module__.startswith("torch.export") and type(module).__name__ == "GuardsFn":
        raise ValueError(
            "`model` is a `torch.export` program's module (`ep.module()`), whose guards check its inputs' shapes "
            "against the example it was exported with (a function torch sets on its `_guards_fn` module); scoring "
            "runs it on other batch sizes. Score the original module, or export with a dynamic batch dimension "
            "(`dynamic_shapes={'x': {0: torch.export.Dim('batch')}}`) and pass `ep.module(check_guards=False)`."
        )
    raise ValueError(
        f"`model` module {name or '(root)'!r} ({type(module).__name__}) has a `forward` set on the instance "
        f"({type(forward).__name__}). Scores run a private copy of the model with the checkpoint's weights, and such "
        f"a function may still read the original module's. Define the behaviour in a subclass's `forward`, or bind "
        f"it as a method of that module (`module.forward = types.MethodType(fn, module)`)."
    )


def check_runnable(
    model: Any,
    eval_fix: str = "Call `model.eval()` before scoring.",
    compile_fix: str = "pass `compile=True` to compile the scoring",
) -> None:
    """Raise where the model cannot be scored as it stands: a ``torch.compile`` wrapper (``compile_fix``: how to
    compile instead), training mode (``eval_fix``: what the refusal advises), backward hooks, or a
    ``torch.nn.utils.parametrize.cached()`` block around the call (a function's too, whose modules are not seen: one
    calling a parametrized module was scored at one cached weight, 30-45% off, silently; a review helper's)."""
    if not isinstance(model, nn.Module):
        if parametrize._cache_enabled:
            raise ValueError(
                "`model` is a function and the call runs inside `torch.nn.utils.parametrize.cached()`, whose cache "
                "keeps one value per "
                "parametrized tensor (the first checkpoint's, or one computed before the call) for every checkpoint: "
                "a function calling a parametrized module would be scored at it. Call the scorer outside the "
                "`cached()` block."
            )
        return
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(
            f"`model` is a {type(model).__name__} wrapper, whose forward torch's stateless API cannot run with a "
            f"checkpoint's tensors. Pass the module it wraps (`model.module`); checkpoints saved from the wrapper "
            f"carry a `module.` prefix, which `tc.load_checkpoints` strips."
        )
    compiled = next((name for name, m in model.named_modules() if _compile_wrapper(m)), None)
    if compiled == "":
        raise ValueError(
            "`model` is a `torch.compile` wrapper, whose compiled forward runs the original module with its own "
            "weights, not each checkpoint's. Pass the module itself (`model._orig_mod`), and "
            f"{compile_fix}."
        )
    if compiled is not None:
        raise ValueError(
            f"`model` module {compiled!r} is a `torch.compile` wrapper, whose compiled forward runs the original "
            f"module with its own weights, not each checkpoint's. Put the module it wraps back in its place (its "
            f"`._orig_mod`; `module.compile()` compiles in place, which scores as it is), and {compile_fix}."
        )
    check_not_scripted(model)
    lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if nn.parameter.is_lazy(t)]
    if lazy:
        raise ValueError(
            f"`model` has uninitialized tensors ({_names(lazy)}): a lazy layer (`nn.LazyLinear`, ...) takes its "
            f"shapes on its first forward. Run the model once on a batch (`model(x[:1])`) before scoring, or remove "
            f"a lazy layer its forward never runs."
        )
    check_eval_mode(model, eval_fix)
    check_no_backward_hooks(model)
    if parametrize._cache_enabled and any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(
            "`model` has parametrized tensors and the call runs inside `torch.nn.utils.parametrize.cached()`, whose "
            "cache keeps one value per tensor (the first checkpoint's, or one computed before the call) for every "
            "checkpoint. Call the scorer outside the `cached()` block."
        )


def _compile_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def check_not_scripted(model: nn.Module) -> None:
    """Raise if a module of the tree is TorchScript (``torch.jit.script`` / ``trace``): its compiled forward runs the
    weights it holds, which torch.func can neither swap for a checkpoint's nor differentiate per example, and its
    module containers are TorchScript's own, which the call's private copy would write into."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            raise ValueError(
                f"`model` module {name or '(root)'!r} ({type(module).__name__}) is a TorchScript module "
                f"(`torch.jit.script` / `torch.jit.trace`), whose compiled forward cannot run a checkpoint's tensors "
                f"under torch.func. Score the Python module it was made from (a scripted function called in `forward` "
                f"is fine{'' if module.state_dict() else _SCRIPT_ITS_FUNCTION})."
            )


_SCRIPT_ITS_FUNCTION = ": this one holds no tensors, so script the function its forward computes and call that"


def check_no_backward_hooks(model: Any) -> None:
    """Raise if a module has backward hooks: torch.func transforms cannot run through them."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise ValueError(
                f"`model` has a backward hook on {type(module).__name__} {name or '(root)'!r}; torch.func transforms "
                f"cannot run through it. Remove it (`handle.remove()`) before scoring; to keep a change it makes to "
                f"gradients, make it in the forward with a hook on the tensor whose gradient it changes "
                f"(`if h.requires_grad: h.register_hook(fn)`), which the call runs for each example."
            )


def check_eval_mode(model: Any, fix: str) -> None:
    """Raise, advising ``fix``, if a module whose training-mode output couples or randomises examples is in training
    mode."""
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        if module.training and isinstance(module, _TRAIN_MODE_SENSITIVE):
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0:
                continue
            raise ValueError(
                f"`model` has {type(module).__name__} {name or '(root)'!r} in training mode, which makes per-example "
                f"gradients depend on the batch or on random numbers. {fix}"
            )


def _layer_names(
    model: nn.Module,
    layers: Sequence[str],
    available: Sequence[str],
    default: Collection[str],
    aliases: Mapping[str, str],
) -> list[str]:
    modules = dict(model.named_modules(remove_duplicate=False))  # (a module under two names: T5's shared embedding)
    selected = []
    for layer in layers:
        if layer not in modules:
            raise ValueError(
                f"`layers` names unknown module {layer!r}; modules with parameters: "
                f"{sorted(n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False)))[:20]}."
            )
        prefix = f"{layer}." if layer else ""
        under = list(dict.fromkeys(aliases.get(n, n) for n in [*available, *aliases] if n.startswith(prefix)))
        if not under:
            raise ValueError(f"`layers` entry {layer!r} has no differentiable parameters under it.")
        trained = [n for n in under if n in default]
        if not trained:
            raise ValueError(
                f"`layers` entry {layer!r} holds only frozen parameters ({_names(under)}: `requires_grad=False`), "
                f"which training never moved; name them in `params=` to differentiate them all the same."
            )
        selected += [n for n in trained if n not in selected]
    return selected


def select_params(
    available: Sequence[str],
    default: Sequence[str],
    params: ParamSelector,
    layers: Sequence[str] | None,
    model: Any,
    aliases: Mapping[str, str] = {},  # noqa: B006  (read only)
) -> tuple[str, ...]:
    """Names of the differentiated parameters, from ``params`` (names or a predicate) or ``layers`` (modules). A tied
    tensor's other names (``aliases``: GPT-2's ``lm_head.weight``) select it under its first name: ``layers=
    ['lm_head']`` selected the head's bias alone, silently, and ``params=['lm_head.weight']`` was unknown.

    ``layers`` and a predicate choose among ``default`` (the trainable parameters, or a function's floating entries:
    a LoRA block's frozen base was differentiated, 190% off, silently); a list of names may name any of
    ``available``."""
    if params is not None and layers is not None:
        raise ValueError("Pass either `params` or `layers`, not both.")
    trainable = frozenset(default)  # (membership below, per name: a list made it quadratic)
    if layers is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`layers`={layers!r} names modules of an `nn.Module` model, but the model is a function: pass "
                f"`params=` (the names of its parameter dict's entries, e.g. `params={list(available)[:1]!r}`)."
            )
        if isinstance(layers, str):
            raise TypeError(f"`layers` must be a list of module names, e.g. `layers=[{layers!r}]`; got {layers!r}.")
        names = _layer_names(model, layers, available, trainable, aliases)
    elif params is None:
        names = list(default)
    elif callable(params):
        chosen = [n for n in available if params(n) or any(params(a) for a, first in aliases.items() if first == n)]
        names = [n for n in chosen if n in trainable]
        if chosen and not names:
            raise ValueError(
                f"`params` selects only frozen parameters ({_names(chosen)}: `requires_grad=False`; a predicate "
                f"chooses among the trainable ones); name them in a list to differentiate them all the same."
            )
    elif isinstance(params, str):
        raise TypeError(
            f"`params` must be a list of names or a predicate, got the string {params!r}; use `[{params!r}]`."
        )
    else:
        params = list(params)  # (a generator: read twice below)
        if not all(isinstance(n, str) for n in params):
            other = next(n for n in params if not isinstance(n, str))
            raise TypeError(
                f"`params` must hold parameter names, got a {type(other).__name__}; e.g. "
                f"`[name for name, p in model.named_parameters() if ...]`."
            )
        unknown = [n for n in params if n not in available and n not in aliases]
        if unknown:
            owned = _buffer_names(model)
            buffers = [n for n in unknown if n in owned]
            are = "is a buffer, which holds" if len(buffers) == 1 else "are buffers, which hold"
            held = f" ({_names(buffers)} {are} no gradient: an `nn.Parameter` is scored)" if buffers else ""
            raise ValueError(f"`params` names unknown parameters {unknown}{held}; available: {list(available)[:20]}.")
        names = list(dict.fromkeys(aliases.get(n, n) for n in params))
    if not names:
        frozen = (
            f": every parameter is frozen (`requires_grad=False`); name those to score in `params=` (e.g. "
            f"{list(available)[:3]}; with the default `method='exact'`: `method='last_layer'` scores the trainable "
            f"parameters of the last layer)" if params is None and layers is None and available and not default else ""
        )
        packed = [p for p, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized") and
                  not type(m).__name__.endswith("PackedParams")] if isinstance(model, nn.Module) else []  # fmt: skip
        if packed and not available:
            frozen = (
                f": its quantized layers ({packed[:3]}) hold packed integer weights, not parameters; score the float "
                f"model (before `torch.ao.quantization.quantize_dynamic` or `convert`)"
            )
        raise ValueError(
            f"No parameters selected to differentiate (`params`={params!r}, `layers`={layers!r}){frozen}."
        )
    return tuple(names)


def _buffer_names(model: Any) -> set[str]:
    return {n for n, _ in model.named_buffers()} if isinstance(model, nn.Module) else set()


def model_spec(
    model: Any,
    first_params: Mapping[str, torch.Tensor],
    params: ParamSelector,
    layers: Sequence[str] | None,
    *,
    private: bool,
) -> ModelSpec:
    """Build the function shape of ``model``: an ``nn.Module`` or a pure function ``f(params, *inputs)``.

    ``private``: run a private copy of the module tree (see ``private_copy``). Not possible when a user's loss
    calls the module itself (``tc.ExampleLoss``): then the call runs on the user's module, under its lock.
    """
    check_runnable(model)
    if isinstance(model, nn.Module):
        with holding(model):  # not while a call on the user's module (its loss calls it) has swapped tensors in
            named = dict(model.named_parameters())  # de-duplicated: a tied tensor appears under its first name
            state = model.state_dict(keep_vars=True)
            _refuse_saved_otherwise(model, state)
            extra = {n: state.pop(n) for n in _extra_state_names(model) if n in state}
            # (entries no functional call can set, a layer's own `_save_to_state_dict`'s: a quantized layer's packed
            # weights, and scale, which it runs with as it holds them; not a parameter itself under another name, a
            # state-dict hook's renaming: taken below as its second name)
            own = {id(p) for p in named.values()}
            unsettable = [n for n, v in state.items() if not _settable(model, n, v) and id(v) not in own]
            extra.update({n: state.pop(n) for n in unsettable})
            counts = frozenset(_counts(model))
            unsaved = {n: t for n, t in model.named_buffers() if n not in state}  # (persistent=False)
            floating = {t.dtype for t in named.values() if t.is_floating_point()}
            following = frozenset(n for n, t in unsaved.items() if t.is_floating_point() and t.dtype in floating)
            module = private_copy(model) if private else model
        first_name = {id(p): n for n, p in named.items()}
        aliases = {n: first_name[id(t)] for n, t in state.items() if n not in named and id(t) in first_name}
        trainable = [n for n, p in named.items() if p.requires_grad]
        diff = select_params(list(named), trainable, params, layers, model, aliases)
        held = {a: f for a, f in aliases.items() if _settable(model, a, state[a])}  # (not a hook's name for it)

        def forward(state: Mapping[str, torch.Tensor], *inputs: Any) -> Any:
            # each tied name given its first name's tensor here, so that functional_call need not find the ties by
            # walking every module at every forward (MobileNet's 244 tensors: 0.97 against 0.51 ms a call)
            untied = {**state, **{alias: state[first] for alias, first in held.items() if first in state}}
            return functional_call(module, untied, inputs, tie_weights=False)

        # a tensor a state-dict hook saves under another name than its own (torch's `checkpoint_wrapper` drops
        # `_checkpoint_wrapped_module.`), taken as a tied tensor's second name (its own was refused as unexpected)
        renamed = {first: state[alias] for alias, first in aliases.items() if first not in state}
        defaults = {n: t.detach() for n, t in {**renamed, **state}.items() if n not in aliases}
        expected = frozenset(state) | frozenset(renamed)
        hooked = frozenset(n for n, p in named.items() if p._backward_hooks)  # (a private copy holds none)
        return ModelSpec(
            forward, module, diff, expected, aliases, defaults, unsaved, private, following, extra, counts, hooked
        )
    if not callable(model):
        raise TypeError(f"`model` must be an nn.Module or a function f(params, *inputs), got {type(model).__name__}.")
    if not isinstance(first_params, Mapping):
        raise TypeError(
            f"`checkpoints[0].params` must map parameter names to tensors (a flat dict), got a "
            f"{type(first_params).__name__}."
        )
    nested = [n for n, t in first_params.items() if not isinstance(t, torch.Tensor)]
    if nested:
        raise TypeError(
            f"`checkpoints[0].params` maps {nested[0]!r} to a {type(first_params[nested[0]]).__name__}: a pure "
            f"function's parameters are a flat dict of tensors (nested ones flattened to names such as "
            f"`'enc.w'`, as `optree.tree_flatten_with_path` or `torch.utils._pytree` give them)."
        )
    # (complex ones too: refused as parameters, as a module's are, unless `params=` leaves them out; skipped, a
    # spectral filter's part in the scores was dropped, 11% off, silently)
    trained = [n for n, t in first_params.items() if t.is_floating_point() or t.is_complex()]
    diff = select_params(list(first_params), trained, params, layers, model)
    return ModelSpec(_in_order(model, tuple(first_params)), None, diff, None, {}, {})


def _in_order(function: Callable[..., Any], order: Sequence[str]) -> Forward:
    """``function(params, *inputs)`` given its entries in ``order`` (the first checkpoint's), whatever order the call
    built the dict in: the differentiated entries were put after the frozen ones, so a function reading them in order
    (``for w in params.values()``) computed another network (2.7x off)."""

    def forward(state: Mapping[str, Any], *inputs: Any) -> Any:
        ordered = {n: state[n] for n in order if n in state}
        return function({**ordered, **{n: t for n, t in state.items() if n not in ordered}}, *inputs)

    forward.user_function = function  # type: ignore[attr-defined]  (what an index's fingerprint describes)
    return forward


def _settable(model: nn.Module, name: str, value: Any) -> bool:
    """Whether a functional call can set the state-dict entry ``name`` = ``value``: a tensor for a tensor the module
    holds under that name (a parameter, a buffer, or a tensor attribute its own ``_save_to_state_dict`` saves), not
    a quantized layer's packed weights or a float it saves as a tensor."""
    path, _, attribute = name.rpartition(".")
    try:  # (a name no module attribute holds: a hook's or a layer's own saving, `SCB`, `weight.absmax`, set by none)
        module = model.get_submodule(path)
    except AttributeError:
        return False
    held = {**module._parameters, **module._buffers, **vars(module)}.get(attribute)  # (not a property: no setter)
    return isinstance(value, torch.Tensor) and isinstance(held, torch.Tensor)


def _refuse_saved_otherwise(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise where the state dict holds a parameter or buffer in another form than the tensor itself (a layer's own
    `_save_to_state_dict` saving a transpose, a state-dict hook scaling it, read back by its loading code): its
    checkpoints hold that form, which a functional call would run as the tensor (27-45% off, silently; a sweep's)."""
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        saved = state.get(name)
        if saved is None or saved is tensor or not isinstance(saved, torch.Tensor):
            continue
        if saved.shape != tensor.shape or not torch.equal(saved.detach(), tensor.detach()):
            raise ValueError(
                f"`model`'s `state_dict()` holds {name!r} in another form than the tensor itself (its module's own "
                f"`_save_to_state_dict` or a state-dict hook changes it, its loading code changing it back), so a "
                f"checkpoint of it would be run as the tensor. Give checkpoints of the tensors themselves: "
                f"`{{**dict(model.named_parameters()), **dict(model.named_buffers())}}` (copied), saved as training "
                f"runs."
            )


def _extra_state_names(model: nn.Module) -> list[str]:
    """The state-dict names of the entries modules add with ``get_extra_state()`` (not tensors of the model)."""
    suffix = nn.modules.module._EXTRA_STATE_KEY_SUFFIX
    return [
        f"{path}.{suffix}" if path else suffix
        for path, m in model.named_modules()
        if type(m).get_extra_state is not nn.Module.get_extra_state
    ]


def _counts(model: nn.Module) -> Iterator[str]:
    """Counters no output reads: BatchNorm's step counts. (Not an ``AveragedModel``'s ``n_averaged``: a debiased
    average divides by ``1 - decay ** n_averaged``, in a subclass, a forward set on it or a module around it.)"""
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None:
            yield f"{path}.num_batches_tracked" if path else "num_batches_tracked"


def _names(names: list[str], limit: int = 10) -> str:
    return str(names[:limit])[:-1] + (", ...]" if len(names) > limit else "]")


def _check_tensor(value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        if nn.parameter.is_lazy(value):
            raise ValueError(
                f"{where} is an uninitialized tensor (a lazy layer's, saved before the model's first forward): save "
                f"the checkpoints after the model has run once."
            )
        if value.device.type == "meta":
            raise ValueError(
                f"{where} is on the meta device: it holds no values. Load real weights (e.g. `tc.load_checkpoints`, "
                f"or `model.to_empty(...)` then `load_state_dict`) before scoring."
            )
        return
    fix = "convert it with `torch.from_numpy(a)`" if type(value).__module__ == "numpy" else "pass tensors"
    raise TypeError(f"{where} is a {type(value).__name__}, not a torch.Tensor; {fix}.")


def computation_dtype(states: Sequence[Mapping[str, torch.Tensor]], saved: Sequence[Mapping[str, Any]]) -> torch.dtype:
    """The one floating dtype of the checked checkpoint states, when ``dtype=None``; ``saved``: the checkpoints' own
    entries (the states' others are the model's, filled in)."""
    floating = sorted({t.dtype for state in states for t in state.values() if t.is_floating_point()}, key=str)
    if len(floating) > 1:
        held = [t for s in saved for t in s.values() if isinstance(t, torch.Tensor)]  # (extra state: any value)
        own = sorted({t.dtype for t in held if t.is_floating_point()}, key=str)
        mix = (  # (the model's values fill the entries a checkpoint lacks: `strict=False`, its own buffers)
            f"hold {own[0]} tensors and the model's own values filling the entries they lack (`strict=False`, "
            f"unsaved buffers) {', '.join(str(d) for d in floating if d not in own)} ones" if len(own) == 1
            else f"mix the floating dtypes {[str(d) for d in floating]}"
        )  # fmt: skip
        raise ValueError(
            f"`checkpoints` {mix}; pass `dtype=torch.float32` (or torch.float64) to compute in one dtype (tensors are "
            f"converted for the call, never changed)."
        )
    dtype = floating[0] if floating else torch.get_default_dtype()
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"`checkpoints` hold {dtype} tensors: inner products of gradients in half precision lose most of their "
            f"digits. Pass `dtype=torch.float32` to compute in float32 (tensors are converted for the call)."
        )
    return dtype


def checked_state(
    spec: ModelSpec, ckpt: Checkpoint, where: str, *, shapes: Mapping[str, tuple[int, ...]], strict: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The full state of one checkpoint, validated against the model: names, tensors on a real device, shapes; and
    the differentiated parameters it lacks, taken from the model (``warn_taken_from_model``).
    ``where``: the argument messages name (``checkpoints[0]``; a tracer's ``params``).

    ``shapes``: the shape every tensor must have (the model's own; for a pure function, the first checkpoint's).
    Missing entries are taken from the model when not ``strict``; tied aliases are dropped.
    """
    if not isinstance(ckpt, Checkpoint):
        raise TypeError(
            f"`{where}` is a {type(ckpt).__name__}; wrap it as `tc.Checkpoint(params=state_dict, lr=...)` "
            f"or load files with `tc.load_checkpoints`."
        )
    check_lr(ckpt.lr, where)
    if not isinstance(ckpt.params, Mapping):
        called = " (call it: `model.state_dict()`)" if inspect.ismethod(ckpt.params) else ""
        raise TypeError(
            f"`{where}.params` must map parameter names to tensors, like `dict(model.state_dict())`; got a "
            f"{type(ckpt.params).__name__}{called}."
        )
    state = dict(ckpt.params)
    if spec.expected is None and set(state) != set(shapes):  # (a pure function's: the first checkpoint's names)
        differ = sorted(set(state) ^ set(shapes))
        raise ValueError(
            f"`{where}` holds other names than `checkpoints[0]` ({_names(differ)} in one of them only): a function's "
            f"checkpoints must hold the same entries, or it would compute with some that are not differentiated."
        )
    taken: list[str] = []
    if spec.expected is not None:
        state = _weight_norm_names(_wrapped_child_names(state, spec.expected), spec.expected)
        _refuse_other_extra_state(state, spec.extra, where)
        state = {n: t for n, t in state.items() if n not in spec.extra}
        # a tied tensor saved under its other name only (GPT-2's lm_head.weight): it is the first name's value
        saved_as = {first: state[alias] for alias, first in spec.aliases.items() if alias in state}
        state = {**saved_as, **state}
        unexpected = sorted(set(state) - spec.expected)
        missing = sorted(spec.expected - set(state) - set(spec.aliases))
        # (a BatchNorm's step count, which older or converted checkpoints lack: torch's loading keeps the model's
        # too, and it never changes an output in eval mode)
        missing = [n for n in missing if n not in spec.counts]
        if unexpected or (missing and strict):
            fix = "" if unexpected else ", or pass `strict=False` to take missing entries from the model"
            if not unexpected and set(missing) - set(spec.diff_names):  # (escnn's filter, set by `model.eval()`)
                fix += (
                    " (each then holds the model's value at every checkpoint: a buffer the model computes from its "
                    "parameters, a cache `model.eval()` fills, would score every checkpoint at the model's own and "
                    "give those parameters no gradient)"
                )
            unsaved = [n for n in unexpected if n in spec.unsaved]
            if unsaved:
                fix += (
                    f" ({_names(unsaved)}: buffers the model registers with `persistent=False`, which it does not "
                    f"save and scoring takes from the model; drop them from the checkpoint)"
                )
            averaged = AVERAGED_COUNT in unexpected  # (torch's AveragedModel: EMA / SWA weights, its count beside them)
            stripped = unprefixed([n for n in unexpected if n != AVERAGED_COUNT])
            inside = any(COMPILED_INSIDE in n for n in unexpected)  # (a compiled submodule's)
            if stripped is not None and set(stripped) <= spec.expected:
                leading = "".join(f".removeprefix({p!r})" for p in leading_wrappers(unexpected))
                fix = (
                    f" (its names carry torch.compile's `_orig_mod.` inside them: pass `{{k{leading}.replace("
                    f"{COMPILED_INSIDE!r}, '.'): v for k, v in state.items()}}`, or load the files with "
                    f"`tc.load_checkpoints`, which strips it)"
                    if inside else
                    " (its names carry the prefix of a wrapper: DataParallel / DDP's `module.`, torch.compile's "
                    "`_orig_mod.`; save the wrapped module's `state_dict()` (`model.module`, `model._orig_mod`), "
                    "or load the files with `tc.load_checkpoints`, which strips it)"
                    if not averaged else " (torch's `AveragedModel`'s: its average's entries under `module.` and "
                    "their count `n_averaged`; pass `averaged.module.state_dict()`, or load its files with "
                    "`tc.load_checkpoints`, which takes them)"
                )
            fix = fix or _prefix_hint(missing, unexpected, spec.expected, strict) or _file_hint(state, unexpected)
            if not fix and not missing:  # (a GraphModule of the net the checkpoints were saved from: a review's)
                fix = (
                    " (entries of tensors the model does not hold: a `torch.fx` GraphModule keeps only the modules its "
                    "graph calls, a head used in training only may be left out; drop them, `{k: v for k, v in "
                    "state.items() if k in model.state_dict()}`, where the model computes what was trained)"
                )
            # (an AveragedModel's files as tc.load_checkpoints reads them, scored with it: its count, which a debiased
            # average's forward reads, is not the model's to take)
            averaged_files = unexpected and wrapper_prefix(unexpected, spec.expected - {AVERAGED_COUNT})
            if AVERAGED_COUNT in missing and averaged_files:  # (the net it averages: where its forward is torch's)
                own = spec.module
                plain = isinstance(own, AveragedModel) and type(own).forward is AveragedModel.forward and not (
                    "forward" in vars(own) or own._forward_hooks or own._forward_pre_hooks)  # (set on it: its own)
                net = "score the net it averages with them, `averaged.module`, or " if plain else ""
                fix = (
                    f" (an `AveragedModel`'s entries without its `module.` prefix and its `{AVERAGED_COUNT}` count, "
                    f"as `tc.load_checkpoints` reads its files: {net}give the `AveragedModel` its own `state_dict()` "
                    f"(`torch.load`))"
                )
            if set(missing) & set(LR_KEYS):
                fix += (
                    f". A file's flat {sorted(set(missing) & set(LR_KEYS))} entry is read as the learning rate: save "
                    f"`{{'model_state_dict': state, 'learning_rate': lr}}` instead"
                )
            raise ValueError(
                f"`{where}` does not match the model: missing {_names(missing)}, unexpected "
                f"{_names(unexpected)}. Save the model's `state_dict()`{fix}."
            )
        taken = [n for n in spec.diff_names if n not in state]
        state = {**{n: spec.defaults[n] for n in spec.defaults if n not in state}, **state}
        for alias, first in spec.aliases.items():
            if alias in state and state[alias] is not state[first] and not torch.equal(state[alias], state[first]):
                raise ValueError(
                    f"`{where}` holds different values for {first!r} and {alias!r}, which are one "
                    f"tensor in the model (tied weights): only one could be used. Save the checkpoint from the tied "
                    f"model (its `state_dict()` holds one tensor under both names), or untie the model's weights."
                )
        state = {n: t for n, t in state.items() if n not in spec.aliases}
    missing_diff = [n for n in spec.diff_names if n not in state]
    if missing_diff:
        raise ValueError(f"`{where}` lacks the differentiated parameters {missing_diff[:10]}.")
    differentiated = set(spec.diff_names)
    # integers for a frozen floating tensor: in the wider of the checkpoint's own floating dtype, where it has one, and
    # the model's (the model's alone made a float64 checkpoint a mix of dtypes, refused as such; a half-precision
    # checkpoint's would round them)
    held = {t.dtype for t in ckpt.params.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    for name, t in list(state.items()):
        _check_tensor(t, f"`{where}[{name!r}]`")
        own = spec.defaults.get(name)
        if own is not None and not (own.is_floating_point() or own.is_complex()) and t.is_floating_point():
            state[name] = t = _as_model_holds(t, own.dtype, f"`{where}[{name!r}]`")
        elif own is not None and own.is_floating_point() and not (t.is_floating_point() or t.is_complex()):
            if name not in differentiated:  # (integers or booleans for a frozen floating tensor: as loading does)
                wider = torch.promote_types(next(iter(held)), own.dtype) if len(held) == 1 else own.dtype
                state[name] = t = t.to(wider)
        if name in differentiated and not t.is_floating_point():
            fix = (
                "complex parameters are not scored: hold it as a real tensor `[..., 2]` viewed with "
                "`torch.view_as_complex` in the forward (its real and imaginary parts scored as the real gradients an "
                "SGD step on them takes), or leave it out of the differentiated parameters (`params=`)"
                if t.is_complex()
                else "save the checkpoint from the model's floating weights (or convert the entry with `.float()`)"
            )  # fmt: skip
            raise TypeError(f"`{where}[{name!r}]` holds {t.dtype} values for a differentiated parameter; {fix}.")
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise ValueError(
                f"`{where}[{name!r}]` has shape {tuple(t.shape)} but the model's has shape "
                f"{shapes[name]}; save the checkpoint from the same architecture (a broadcastable shape would give "
                f"wrong scores silently)."
            )

    return state, taken


def _file_hint(params: Mapping[str, Any], unexpected: Sequence[str]) -> str:
    """How to give a training file's dict as a checkpoint (its state dict nested under ``model``, a flat learning
    rate beside it), where ``params`` is one, else ``""``."""
    nested = next((k for k in STATE_KEYS if k in unexpected and isinstance(params[k], Mapping)), None)
    if nested is not None:
        return (
            f" (a training file's dict, its state dict under {nested!r}: pass `tc.Checkpoint(saved[{nested!r}], lr)`, "
            f"or load the files with `tc.load_checkpoints`, which reads that layout)"
        )
    rates = [k for k in LR_KEYS if k in unexpected and not (isinstance(params[k], torch.Tensor) and params[k].dim())]
    if rates:
        return (
            f" ({rates[0]!r} is a learning rate, not a tensor of the model: pass it as `lr=` and leave it out of the "
            f"state, or load the files with `tc.load_checkpoints`, which reads it)"
        )
    return ""


def warn_taken_from_model(taken: Sequence[list[str]], where: str) -> None:
    """Warn, once for a call, of the differentiated parameters checkpoints lack (``taken``: each one's, from
    ``checked_state``), scored at the model's own values (``strict=False``); ``where``: the checkpoints' argument."""
    lacking = [i for i, names in enumerate(taken) if names]
    if not lacking:
        return
    names = list(dict.fromkeys(n for i in lacking for n in taken[i]))
    fix = "Leave them out of `params=` to score only what the checkpoints hold"
    if len(lacking) == len(taken):
        which, there = f"`{where}` lack", ", the same at every checkpoint"
    else:  # (a class-incremental head: the checkpoints holding it are scored at theirs)
        which = f"`{where}{lacking[:10]}` lack{'s' if len(lacking) == 1 else ''}"
        there = " there, at the others the checkpoint's own"
        fix += ", and score them (`params=`) in a call of their own over the checkpoints holding them, adding up"
    warn(
        f"{which} the differentiated parameters {_names(names)}: scored at the model's own values (`strict=False`)"
        f"{there}. {fix}.",
        UserWarning,
    )


def _weight_norm_names(state: dict[str, Any], expected: frozenset[str]) -> dict[str, Any]:
    """``state`` with ``torch.nn.utils.weight_norm``'s ``{name}_g`` / ``{name}_v`` entries named as
    ``parametrizations.weight_norm`` holds them, ``parametrizations.{name}.original0`` / ``original1``, where the
    model holds those, as its loading's compatibility hook does (a checkpoint of the old API was refused)."""
    renamed = {}
    for key in state:
        if key.endswith("_g") and key not in expected:
            prefix, _, name = key[:-2].rpartition(".")
            prefix = f"{prefix}." if prefix else ""
            v, new = f"{prefix}{name}_v", f"{prefix}parametrizations.{name}.original"
            unheld = not {new + "0", new + "1"} & set(state)  # (beside them: left to the refusal of extra entries)
            if v in state and v not in expected and {new + "0", new + "1"} <= expected and unheld:
                renamed.update({key: new + "0", v: new + "1"})
    return {renamed.get(k, k): t for k, t in state.items()} if renamed else state


def _wrapped_child_names(state: dict[str, Any], expected: frozenset[str]) -> dict[str, Any]:
    """``state`` named as the model does where the model's names all carry a wrapper's prefix the checkpoint's lack
    (a model whose only child is named ``module``, an EMA wrapper's: ``tc.load_checkpoints`` strips that prefix from
    files, as it strips DataParallel's), else ``state``."""
    if not state or expected.intersection(state):
        return state
    prefix = wrapper_prefix(state, expected)
    return state if prefix is None else {prefix + n: t for n, t in state.items()}


def _prefix_hint(
    missing: Sequence[str], unexpected: Sequence[str], expected: Collection[str], strict: bool = True
) -> str:
    """How to match a checkpoint whose names all carry a prefix the model's do not (a LightningModule's ``model.``,
    an EMA wrapper's), lack one the model's carry (saved from a submodule), or carry one where the model's carry
    another (``model.module.`` for ``model.``); ``""`` where none explains them. Not
    ``strict``: the names it lacks need no explaining (an adapter-only file, which found no hint before)."""
    # the checkpoint's names carry it (not: extra ones)
    for prefix in leading_prefixes(unexpected[0]) if unexpected else []:
        stripped = {n[len(prefix) :] for n in unexpected if n.startswith(prefix)}
        explained = not strict or missing and set(missing) <= stripped
        if explained and len(stripped) == len(unexpected) and stripped <= set(expected):
            return (
                f" (its names all carry the prefix {prefix!r}, the model's do not: pass "
                f"`{{k.removeprefix({prefix!r}): v for k, v in state.items()}}`)"
            )
    for prefix in dict.fromkeys(p for n in missing for p in leading_prefixes(n)) if unexpected else []:  # the
        under = {n[len(prefix) :] for n in expected if n.startswith(prefix)}  # model's names carry it
        if set(unexpected) <= under:  # (beside names of the wrapper's own: a temperature-scaling wrapper's `T`)
            others = [n for n in missing if not n.startswith(prefix)]
            beside = f"; it lacks {others[:3]} beside them" if others else ""
            return (
                f" (the model's names carry the prefix {prefix!r}, its do not: it was saved from that submodule; "
                f"pass `{{{prefix!r} + k: v for k, v in state.items()}}`, or score the submodule{beside})"
            )
    for theirs in leading_prefixes(unexpected[0]) if missing and unexpected else []:  # one prefix for another (a
        for ours in leading_prefixes(missing[0]):  # wrapper saved around a submodule: `model.module.` for `model.`)
            renamed = {ours + n[len(theirs) :] for n in unexpected if n.startswith(theirs)}
            if len(renamed) == len(unexpected) and set(missing) <= renamed <= set(expected):
                return (
                    f" (its names carry the prefix {theirs!r} where the model's carry {ours!r}: pass `{{({ours!r} + "
                    f"k.removeprefix({theirs!r}) if k.startswith({theirs!r}) else k): v for k, v in state.items()}}`)"
                )
    return ""


def _refuse_other_extra_state(state: Mapping[str, Any], extra: Mapping[str, Any], where: str) -> None:
    """Raise where a checkpoint holds a module's extra state (``get_extra_state()``, or an entry of no parameter or
    buffer: a quantized layer's packed weights) other than the model's."""
    for name in extra.keys() & state.keys():
        if not _same_values(state[name], extra[name]):
            raise ValueError(
                f"`{where}[{name!r}]` holds a value the model keeps outside its parameters and buffers (a module's "
                f"extra state, `get_extra_state()`; a quantized layer's packed weights; a name a layer or a state-dict "
                f"hook saves in place of its own) other than the model's, and "
                f"scoring, which runs the model with each checkpoint's tensors, cannot set it. Load that checkpoint "
                f"into the model (`model.load_state_dict`) and score it alone (scores add up over checkpoints), or "
                f"drop the entry to score with the model's."
            )


def _same_values(a: Any, b: Any) -> bool:
    """Whether two values (tensors, or containers of tensors and plain values) are equal, leaf by leaf (the same
    object too: a dynamically quantized LSTM's packed weights, whose `==` raises)."""
    if a is b:
        return True
    leaves_a, tree_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, tree_b = optree.tree_flatten(b, none_is_leaf=True)
    if tree_a != tree_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if x is y:
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
                return False
            if not torch.equal(x.cpu(), y.cpu()) and not _equal_with_nans(x.cpu(), y.cpu()):
                return False
        else:
            try:
                if not bool(x == y):
                    return False
            except Exception:
                return False
    return True


def _equal_with_nans(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two tensors of one shape are equal but for NaNs at the same places (a sentinel)."""
    if not (x.is_floating_point() and y.is_floating_point() and x.dtype == y.dtype):
        return False
    return bool(((x == y) | (x.isnan() & y.isnan())).all())


def _as_model_holds(t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A checkpoint's floating entry for a buffer the model holds as integers or booleans (a whole checkpoint
    converted, ``{k: v.half()}``: masks and indices came out floating, which the forward cannot use), back in the
    model's dtype as ``load_state_dict`` would, where that keeps every value."""
    back = t.to(dtype)
    if not torch.equal(back.to(t.dtype), t):
        raise ValueError(
            f"{where} holds {t.dtype} values for a buffer the model holds as {dtype}, and not all of them are "
            f"{dtype} values; save the checkpoint with that entry as the model holds it (convert floating entries "
            f"only: `{{k: v.half() if v.is_floating_point() else v for k, v in state.items()}}`)."
        )
    return back


def state_tensor(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint's (or a step's) tensor as a call reads it: detached, on ``device``, in ``dtype`` where floating
    (complex: of its precision, as complex inputs are; a float32 checkpoint's complex64 filter scored with
    ``dtype=torch.float64`` met complex128 inputs), and not an inference tensor (copied in an evaluation's
    ``inference_mode``: no gradient can be taken of it)."""
    to = dtype if t.is_floating_point() else (COMPLEX.get(dtype, t.dtype) if t.is_complex() else t.dtype)
    t = t.detach().to(device=device, dtype=to)
    return t.clone() if t.is_inference() else t


def converted(
    state: Mapping[str, torch.Tensor],
    lr: Any,
    device: torch.device,
    dtype: torch.dtype,
    unsaved: Mapping[str, torch.Tensor],
    following: frozenset[str],
) -> CheckpointState:
    """A checked state on ``device`` with floating tensors in ``dtype`` (the same tensors when already there).

    ``unsaved``: buffers no checkpoint holds (``persistent=False``, e.g. BERT's ``position_ids``), passed along where
    they live on another device than the computation's (a CPU model scored with ``device="cuda"``) or, ``following``
    the model's dtype, are in another than ``dtype`` (converted, as the model's parameters are); the model keeps its
    own."""

    lr = torch.as_tensor(lr, dtype=dtype, device=device).detach().reshape(())
    moved = {n: state_tensor(t, device, dtype) for n, t in state.items()}
    return CheckpointState({**unsaved_on(unsaved, following, device, dtype), **moved}, lr)


def unsaved_on(
    unsaved: Mapping[str, torch.Tensor], following: frozenset[str], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The buffers no checkpoint holds that live on another device than ``device``, or that follow the model's dtype
    (``following``) and are in another than ``dtype``, moved and converted there (a float64 model's scored in float32
    failed in its forward)."""

    def to(name: str, t: torch.Tensor) -> torch.dtype:
        return dtype if name in following else t.dtype

    return {n: t.detach().to(device, to(n, t)) for n, t in unsaved.items() if (t.device, t.dtype) != (device, to(n, t))}
