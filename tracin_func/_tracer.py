"""TracIn inside the training loop: an optax-style state that a loop threads through the steps it actually takes.

TracIn's own definition sums over the training steps, not over a few saved checkpoints: step ``t`` at parameters
``theta_t`` with learning rate ``lr_t`` on a batch of training examples adds
``lr_t <g(test_i; theta_t), g(z_j; theta_t)>`` to the score of every test example ``i`` and batch example ``z_j``.

Two forms, the same numbers:

- :func:`tracer` plans the call once (the optax way): it returns a :class:`Tracer`, a NamedTuple of pure functions
  ``init() -> TracerState`` and ``update(state, params, lr, batch, indices) -> TracerState`` that close over the
  plan (validated model spec, losses, per-layer routes, representation functions), which never changes after the
  factory returns. Each step then only checks its arguments against the plan and computes.
- :func:`tracer_init` / :func:`tracer_update`: the simple form, nothing to keep but the state; each update plans
  the call again (dry runs of the forward pass, the batching check, site discovery), which costs several training
  steps on a small model.

The call is planned like a scoring call, on the test batch, and the plan is reused for every training batch, as the
scorers plan on their first test batch and reuse it for every training batch. Each update is the scorers' pure
core on one "checkpoint" (the step's parameters): per layer factored inner products, gradients materialised from
layer factors, or ``vmap(grad)``; the test examples and the batch are differentiated once each, and the
``[n_test, B]`` inner products and ``[B]`` squared norms are scattered into the ``[n_test, n_train]`` and
``[n_train]`` totals with ``index_add`` (an example seen twice, in one step or in several, accumulates). The
gradient part runs eagerly (``torch.compiler.disable``) also inside a compiled training step: on CPU, compiling the
hooks and ``autograd.grad`` of the batched path costs a minute and runs slower than eager, and the dense
``vmap(grad)`` route compiled is still slower than the eager factored one. The learning rate and the state update
stay in the compiled graph.
"""

from __future__ import annotations

import math
import numbers
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import optree
import torch

from ._assemble import RepresentationFn
from ._checkpoints import Checkpoint, unprefixed
from ._context import check_precision, in_own_context
from ._data import as_dict, batch_size_of, check_batch_structure, to_device
from ._driver import naming_failures
from ._hooks import global_hook_ids
from ._layers import INSTANCE_OVERRIDES
from ._model import (
    check_runnable,
    copied_containers,
    holding,
    shared_by_copy,
    state_tensor,
    unsaved_on,
)
from ._plan import plan_call
from ._setup import Setup, in_use, make_setup, target_device
from ._state import FLAT_ABOVE, MODULE_SLOTS, NESTING, passes_from_here
from ._validate import positive_int


class TracerState(NamedTuple):
    """What a training loop carries between steps (a pytree of tensors; every update returns a new one).

    Attributes:
        scores: ``[n_test, n_train]``: ``sum_t lr_t <g(test_i; theta_t), g(z_j; theta_t)>`` over the steps ``t``
            whose batch held training example ``j``, in the state's dtype.
        self_influence: ``[n_train]``: ``sum_t lr_t |g(z_j; theta_t)|^2`` over the same steps.
        test: the test batch ``(x1, ..., xk, y)`` (or a dict for ``tc.ExampleLoss``), floating tensors in the
            state's dtype.
        steps: 0-d long tensor, the number of updates so far.
    """

    scores: torch.Tensor
    self_influence: torch.Tensor
    test: Any
    steps: torch.Tensor


class Tracer(NamedTuple):
    """A TracIn tracer planned once by :func:`tracer`: pure functions over an explicit :class:`TracerState`.

    Attributes:
        init: ``init() -> TracerState``: zero scores and the test batch (new tensors at each call).
        update: ``update(state, params, lr, batch, indices) -> TracerState``: one training step added, the old state
            unchanged; the arguments mean what they mean for :func:`tracer_update`.
    """

    init: Callable[[], TracerState]
    update: Callable[..., TracerState]


class _Planned(NamedTuple):
    """Everything a step needs besides its tensors, made once (per set of trainable parameters) and never changed.
    (The representation functions' ``Mapper`` may switch once from ``vmap`` to a per-example loop where vmap fails,
    as within one scoring call: the results are the same.)"""

    model: Any  # the user's model: checked for eval mode and hooks at each step, locked when the call runs on it
    train: RepresentationFn  # (diff, frozen, batch) -> Representation, for the training loss
    test: RepresentationFn  # the same for the test loss
    names: tuple[str, ...]  # differentiated parameters
    shapes: Mapping[str, tuple[int, ...]]  # every entry of `params`: its shape
    defaults: tuple[str, ...]  # model state entries not in `params` (buffers, parameters not given)
    needs_target: bool  # the training loss is a criterion: batches are `(x1, ..., xk, y)`
    shape: tuple[int, int]  # (n_test, n_train)
    device: torch.device
    dtype: torch.dtype
    setup: Setup  # the planning call's: its model spec, and the losses that name a step's failing example


def _checked_test(
    test: Any, n_train: Any, dtype: Any, device: Any
) -> tuple[Any, int, int, torch.dtype, torch.device]:
    """``(a copy of test on the target device in dtype, n_test, n_train, dtype, device)``, validated (``n_train``: an
    int)."""
    n_train = positive_int(n_train, "n_train")  # (the size of the training set; NumPy's and 0-d tensors too)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating torch.dtype such as torch.float64, got {dtype!r}.")
    dtype = dtype or torch.get_default_dtype()
    test = as_dict(test)
    n_test = batch_size_of(test, "`test`")  # every leaf a tensor with one batch size
    if n_test == 0:
        raise ValueError("`test` holds no examples; pass the test batch whose influences to trace.")
    leaves = optree.tree_leaves(test, none_is_leaf=True)
    target = target_device(device, lambda: leaves[0].device, "the test batch's")
    check_precision(dtype, target, "parameters and inputs are converted for each step")
    test = to_device(test, target, dtype, copy=True)  # (the user's tensors may be changed in place later)
    return test, n_test, n_train, dtype, target


def _zeros(test: Any, n_test: int, n_train: int, dtype: torch.dtype, device: torch.device) -> TracerState:
    return TracerState(
        scores=torch.zeros(n_test, n_train, dtype=dtype, device=device),
        self_influence=torch.zeros(n_train, dtype=dtype, device=device),
        test=test,
        steps=torch.zeros((), dtype=torch.long, device=device),
    )


def tracer_init(
    test: Any, *, n_train: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> TracerState:
    """The state of a TracIn tracer before the first step: zero scores and the test batch.

    Args:
        test: one batch of test examples ``(x1, ..., xk, y)`` (the model gets ``x1..xk``, the target comes last), or
            a dict / pytree of tensors with a leading batch dimension when the loss is a ``tc.ExampleLoss``.
        n_train: size of the training set: ``indices`` passed to :func:`tracer_update` lie in ``[0, n_train)``.
        dtype: floating dtype of the scores and of the computation (parameters and floating inputs are converted
            for each step, never changed). Default: ``torch.get_default_dtype()``.
        device: where the scores live and the gradients are computed. Default: the test batch's device.

    Returns:
        A :class:`TracerState` with ``scores`` ``[n_test, n_train]`` and ``self_influence`` ``[n_train]`` zeros.

    Example:
        >>> import torch, tracin_func as tc
        >>> test = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
        >>> state = tc.tracer_init(test, n_train=100)
        >>> state.scores.shape, state.self_influence.shape, int(state.steps)
        (torch.Size([3, 100]), torch.Size([100]), 0)
    """
    test, n_test, n_train, dtype, target = _checked_test(test, n_train, dtype, device)
    return _zeros(test, n_test, n_train, dtype, target)


@in_own_context
def tracer(
    model: Any,
    test: Any,
    *,
    n_train: int,
    loss_fn: Any,
    test_loss_fn: Any = None,
    params: Mapping[str, torch.Tensor] | None = None,
    factored: bool | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Tracer:
    """A TracIn tracer for a training loop, planned once: ``init()`` and ``update(state, params, lr, batch, indices)``.

    The call is validated and planned here, on the test batch (forward-pass checks, per-layer routes, whether one
    batched forward / backward gives every layer's factors), and the plan is kept in the returned functions; every
    step reuses it, as the scorers reuse the plan of their first test batch for every training batch. A step then
    costs its gradients, not a new plan (compare :func:`tracer_update`, which plans at every step). A step whose
    trainable parameters (``requires_grad``) are others than at planning (a backbone frozen after warm-up, or
    unfrozen) is planned for them, once per such set. The functions are pure: the state goes in and a new one comes
    out.

    Args:
        model: an ``nn.Module`` (called through ``functional_call``; never modified) or a pure function
            ``f(params, *inputs)``.
        test: one batch of test examples, as for :func:`tracer_init`.
        n_train: size of the training set: ``indices`` lie in ``[0, n_train)``.
        loss_fn: criterion ``loss_fn(outputs, targets)`` applied to one example at a time (as in the scorers), or
            ``tc.ExampleLoss(fn)``.
        test_loss_fn: the same for the test examples; defaults to ``loss_fn``.
        params: the parameter dict the loop will pass to ``update`` (its names and shapes are planned, its values
            only serve the planning dry runs): for an ``nn.Module`` by default ``dict(model.named_parameters())``,
            as a ``torch.optim`` loop passes; required for a pure function (the initial parameters). Every entry
            that is a trainable parameter of the model (``requires_grad``, as the scorers' default; for a pure
            function: every floating entry) is differentiated, frozen ones only read; the model's other state
            (buffers, parameters not given) is read from the model at each step.
        factored: as in :func:`tracin_func.influence` (``None``: per layer by cost; ``False``: ``vmap(grad)``).
        chunk_size: examples per ``vmap`` call (bounds activation memory).
        dtype: floating dtype of the scores and of the computation. Default: ``torch.get_default_dtype()``.
        device: where the scores live and the gradients are computed. Default: the test batch's device.

    Returns:
        A :class:`Tracer`. ``update(state, params, lr, batch, indices)`` takes ``params`` with exactly the planned
        names and shapes (anything else is refused: make a new tracer), ``lr`` a number or a 0-d tensor (a tensor
        inside ``torch.compile``), ``batch`` the step's training batch and ``indices`` its ``[B]`` dataset indices.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> tracer = tc.tracer(model, (x[:2], y[:2]), n_train=8, loss_fn=loss_fn)  # planned here, once
        >>> state = tracer.init()
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> for step in range(4):  # plain SGD on batches of 2
        ...     idx = torch.tensor([2 * step, 2 * step + 1])
        ...     state = tracer.update(state, params, 0.1, (x[idx], y[idx]), idx)
        ...     g = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (x[idx],)), y[idx]))(params)
        ...     params = {k: p - 0.1 * g[k] for k, p in params.items()}
        >>> state.scores.shape, int(state.steps)
        (torch.Size([2, 8]), 4)
        >>> bool((state.self_influence > 0).all())
        True
    """
    test, n_test, n_train, dtype, target = _checked_test(test, n_train, dtype, device)
    if params is None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "`params` is required when `model` is a function: pass the parameter dict the loop starts from "
                "(its names and shapes are planned)."
            )
        with holding(model):  # (not while a loss calling it has a checkpoint's tensors in it)
            params = dict(model.named_parameters())
    plan = partial(
        _plan, model, test, where="test", n_test=n_test, n_train=n_train, loss_fn=loss_fn, test_loss_fn=test_loss_fn,
        factored=factored, chunk_size=chunk_size, dtype=dtype, device=target,
    )

    def planned_as(params: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
        """What a plan holds of the model now: the parameters trainable (a backbone frozen after warm-up takes no
        step, an unfrozen one starts taking them: 10.5% off, silently), its modules and forward hooks, which the
        plan's copy of the modules keeps (a hook added or removed, a layer replaced since: 49-61% off), and its
        switches, which planning's checks depend on (``_switches``)."""
        if not isinstance(model, torch.nn.Module):
            return ()
        with holding(model):
            return frozenset(_selected(model, params)), _structure(model), _switches(model)

    first_as = planned_as(params)
    first = plan(params)
    plans, plans_lock = OrderedDict({first_as: first}), threading.Lock()

    @torch.compiler.disable  # (planning again inside a compiled step: eager, not traced)
    def planned_for(params: Mapping[str, torch.Tensor]) -> _Planned:
        # planned again for the model as it is now (``planned_as``); the last few plans kept (each holds a copy of
        # the model's modules: a set changing at every step would keep one per step)
        _check_params(first, params)
        if not isinstance(model, torch.nn.Module):
            return first
        now = planned_as(params)
        with plans_lock:  # (steps from several threads)
            planned = plans.get(now)
            if planned is not None:
                plans.move_to_end(now)
                return planned
        planned = plan(params)
        with plans_lock:
            plans[now] = planned
            if len(plans) > _PLANS_KEPT:
                plans.popitem(last=False)
        return planned

    def init() -> TracerState:  # (the test batch copied too: a state changed in place leaves the others alone)
        return _zeros(optree.tree_map(torch.clone, test), n_test, n_train, dtype, target)

    @in_own_context
    def update(
        state: TracerState,
        params: Mapping[str, torch.Tensor],
        lr: float | torch.Tensor,
        batch: Any,
        indices: torch.Tensor,
    ) -> TracerState:
        return _apply(state, lr, indices, lambda lr_, i: _products(planned_for(params), state, params, lr_, batch, i))

    return Tracer(init, update)


@in_own_context
def tracer_update(
    state: TracerState,
    model: Any,
    params: Mapping[str, torch.Tensor],
    lr: float | torch.Tensor,
    batch: Any,
    indices: torch.Tensor,
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    factored: bool | None = None,
    chunk_size: int | None = None,
) -> TracerState:
    """Add one training step to the TracIn scores: a new state, the old one unchanged (plans the call every time).

    ``scores[i, indices[b]] += lr * <grad test_loss(test_i; params), grad loss(batch_b; params)>`` and
    ``self_influence[indices[b]] += lr * |grad loss(batch_b; params)|^2`` for every example ``b`` of the batch
    (repeated indices accumulate). Call it with the parameters the step starts from and the step's learning rate,
    before or after computing the step's update, but with the parameters before it is applied.

    This is the simple form: nothing to keep but the state, but each call plans the call again (checks of the
    forward pass on a few examples, per-layer routes), which costs several training steps on a small model.
    :func:`tracer` plans once and gives the same numbers; prefer it in a loop of many steps.

    Args:
        state: from :func:`tracer_init` or a previous update.
        model: an ``nn.Module`` (called through ``functional_call``; never modified) or a pure function
            ``f(params, *inputs)``.
        params: ``{name: tensor}``, the parameters at this step; every entry that is a trainable parameter of the
            model (``requires_grad``; for a pure function: every floating entry) is differentiated, frozen ones only
            read; the model's other state (buffers, parameters not given) is taken from the model.
            ``dict(model.named_parameters())`` in a ``torch.optim`` loop (they are detached, never changed).
        lr: this step's learning rate, a number or a 0-d tensor (pass a tensor inside ``torch.compile``: a Python
            float is a constant there and recompiles for every new value). Finite and non-negative.
        batch: the step's training batch ``(x1, ..., xk, y)``, or any structure for a ``tc.ExampleLoss``.
        indices: ``[B]`` integer tensor, the dataset index of each example of ``batch``, in ``[0, n_train)``.
        loss_fn: criterion ``loss_fn(outputs, targets)`` applied to one example at a time (as in the scorers:
            ``"none"`` / ``"sum"`` sum its elements, ``"mean"`` averages them), or ``tc.ExampleLoss(fn)``.
        test_loss_fn: the same for the test examples; defaults to ``loss_fn``.
        factored: as in :func:`tracin_func.influence` (``None``: per layer by cost; ``False``: ``vmap(grad)``).
        chunk_size: examples per ``vmap`` call (bounds activation memory).

    Returns:
        A new :class:`TracerState`.

    Each step costs about one batched forward / backward over the test examples and one over the batch (with
    factored layers), plus planning the call. Inside ``torch.compile`` the gradient part runs eagerly (see the
    module's notes); the result is the same.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> state = tc.tracer_init((x[:2], y[:2]), n_train=8)
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> for step in range(4):  # plain SGD on batches of 2; index 0 is seen twice
        ...     idx = torch.tensor([2 * step % 8, (2 * step + 1) % 8]) if step < 3 else torch.tensor([0, 7])
        ...     state = tc.tracer_update(state, model, params, 0.1, (x[idx], y[idx]), idx, loss_fn=loss_fn)
        ...     g = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (x[idx],)), y[idx]))(params)
        ...     params = {k: p - 0.1 * g[k] for k, p in params.items()}
        >>> state.scores.shape, int(state.steps)
        (torch.Size([2, 8]), 4)
        >>> bool((state.self_influence[[0, 7]] > 0).all())
        True
    """

    def products(lr_: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _planned_products(
            state, model, params, lr_, batch, idx, loss_fn=loss_fn, test_loss_fn=test_loss_fn, factored=factored,
            chunk_size=chunk_size,
        )

    return _apply(state, lr, indices, products)


def _apply(
    state: TracerState,
    lr: float | torch.Tensor,
    indices: torch.Tensor,
    products: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> TracerState:
    """The step shared by both forms: type checks, ``lr`` as a 0-d tensor, the products, the scatter."""
    if not isinstance(state, TracerState):
        raise TypeError(
            f"`state` must be the `tc.TracerState` of `tc.tracer_init(...)` / `tracer.init()` or of the previous "
            f"update, got {type(state).__name__}."
        )
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
        got = f"a {indices.dtype} tensor of shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else (
            type(indices).__name__
        )
        raise TypeError(
            f"`indices` must be a 1-d integer tensor (the batch's dataset indices, e.g. `torch.tensor([...])`), "
            f"got {got}."
        )
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"`lr` must be a number or a floating 0-d tensor, got a {lr.dtype} tensor of shape "
                             f"{tuple(lr.shape)}.")
        lr = lr.detach().reshape(()).to(device=state.scores.device, dtype=state.scores.dtype)  # (no graph kept)
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):  # (numpy's float32 too)
        lr = torch.tensor(float(lr), device=state.scores.device, dtype=state.scores.dtype)
    else:
        raise TypeError(f"`lr` must be a number or a 0-d tensor, got {lr!r} of type {type(lr).__name__}.")
    indices = indices.to(state.scores.device)
    dots, sq_norms = products(lr, indices)
    return TracerState(
        scores=state.scores.index_add(1, indices, lr * dots),
        self_influence=state.self_influence.index_add(0, indices, lr * sq_norms),
        test=state.test,
        steps=state.steps + 1,
    )


def _check_values(state: TracerState, lr: torch.Tensor, batch: Any, indices: torch.Tensor, fix: str) -> None:
    """Checks that read tensor values (run eagerly, also inside a compiled step)."""
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"`lr` must be finite and non-negative (this step's learning rate), got {value}.")
    n = batch_size_of(batch, "`batch`")
    if n == 0:
        raise ValueError("`batch` holds no examples; pass the step's training batch (skip empty steps).")
    if indices.shape[0] != n:
        raise ValueError(
            f"`indices` has {indices.shape[0]} entries but `batch` holds {n} examples; pass one dataset index per "
            f"example of the batch."
        )
    n_train = state.scores.shape[1]
    if n and (bool((indices < 0).any()) or bool((indices >= n_train).any())):
        bad = indices[(indices < 0) | (indices >= n_train)].tolist()[:10]
        raise ValueError(
            f"`indices` {bad} are outside [0, n_train) = [0, {n_train}); pass dataset indices of the training set "
            f"(or a larger `n_train` to {fix})."
        )


def _selected(model: Any, params: Any) -> list[str]:
    """The names of ``params`` that are differentiated: the model's parameters, or a function's floating entries."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            f"`params` must be a non-empty dict {{name: tensor}} of the parameters at this step, e.g. "
            f"`dict(model.named_parameters())`; got {type(params).__name__}."
        )
    if isinstance(model, torch.nn.Module):
        named = dict(model.named_parameters())
        given = [n for n in params if n in named]
        if not given:
            raise ValueError(
                f"`params` holds none of the model's parameters (got {list(params)[:5]}, the model has "
                f"{list(named)[:5]}); pass `dict(model.named_parameters())` or the dict a functional loop updates."
            )
        # frozen parameters (a fine-tuned model's backbone) take no step: as in the scorers, they get no gradient
        # (counted, they put the scores 18-49% off TracIn over the steps taken)
        selected = [n for n in given if named[n].requires_grad]
        if not selected:
            raise ValueError(
                f"`params`: every parameter of the model in it is frozen (`requires_grad=False`: {given[:5]}), so no "
                f"step moves them and no gradient is counted; set `requires_grad=True` on those the loop trains."
            )
        return selected
    return [n for n, t in params.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _plan(
    model: Any,
    test: Any,
    params: Any,
    *,
    where: str,
    n_test: int,
    n_train: int,
    loss_fn: Any,
    test_loss_fn: Any,
    factored: bool | None,
    chunk_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
    train_batch: Any = None,
) -> _Planned:
    """Validate the call and plan it on the test batch ``test`` (on device), named ``where`` in messages; a single
    test example's plan checks its batching on ``train_batch`` (the step's, when planned per step; see
    ``plan_call``)."""
    with holding(model):
        check_runnable(model, _EVAL_IN_LOOP, _COMPILE_IN_LOOP)  # (before planning's own check: the loop's fixes)
        selected = _selected(model, params)
    setup = make_setup(
        model,
        [Checkpoint(params=params, lr=1.0)],  # the step's lr multiplies the products outside (a tensor)
        loss_fn=loss_fn,
        test_loss_fn=test_loss_fn,
        params=selected,
        strict=False,
        device=device,
        dtype=dtype,
        factored=factored,
        chunk_size=chunk_size,
        checkpoints_as="params",
    )
    check_batch_structure(test, f"`{where}`", needs_target=setup.needs_target[1])

    def scored() -> Any:
        check_batch_structure(train_batch, "`batch`", needs_target=setup.needs_target[0])
        return to_device(train_batch, device, dtype)

    with in_use(setup), naming_failures(setup.test_loss, setup, test, where, 0):
        # each training gradient meets the test examples and itself (the step's self-influence)
        planned = plan_call(setup, test, where, partners=n_test + 1, scored=None if train_batch is None else scored)
    return _Planned(
        model=model,
        train=planned.train,  # planned on a single test example: checks the batching on its first training batch
        test=planned.test,
        names=planned.plan.names,
        shapes={n: tuple(t.shape) for n, t in params.items()},
        defaults=tuple(n for n in setup.spec.defaults if n not in params),
        needs_target=setup.needs_target[0],
        shape=(n_test, n_train),
        device=device,
        dtype=dtype,
        setup=setup,
    )


_PLAIN = (bool, int, float, complex, str, type(None))
_EVAL_IN_LOOP = "Call `model.eval()` before `update` and, in a training loop, `model.train()` after it (the next step)."
_COMPILE_IN_LOOP = "compile the step instead: `torch.compile(tracer.update)`, with `lr` a 0-d tensor"
_PLANS_KEPT = 4  # a tracer's plans, one per set of trainable parameters, kept (each holds a copy of the modules)


def _following(planned: _Planned) -> None:
    """The plan's private copy of the model given the user's model's modes and settings now: train / eval switched
    since planning, a temperature an annealing loop sets (a plain value, a tensor held as a plain attribute, or an
    entry of a dict, list or tuple of those, changed in place), an object rebound (an activation function, a config
    object replaced): the copy was made at planning, and scored the model as it was then, silently (83-96% off; a
    rebound object 92-755%). (Parameters and buffers are read at each step: ``_live_state``.)"""
    model, private = planned.model, planned.setup.spec.module
    if not isinstance(model, torch.nn.Module) or private is None or private is model:
        return
    copies = dict(private.named_modules())
    for path, module in model.named_modules():
        mirror = copies.get(path)
        if mirror is None:
            continue
        mirror.training = module.training
        for name, value in vars(module).items():
            if name in MODULE_SLOTS:
                continue
            if _setting(value):
                if not _alike(vars(mirror).get(name, ...), value):
                    object.__setattr__(mirror, name, copied_containers(value, {}, {}))  # (tensors shared)
            elif shared_by_copy(name, value) and vars(mirror).get(name, ...) is not value:
                object.__setattr__(mirror, name, value)  # (an object rebound: shared, as the copy's others are)


def _structure(model: torch.nn.Module) -> tuple[Any, ...]:
    """The module tree by identity, with each module's class, its forward hooks (their handles' ids) and the methods
    set on it (a `forward` bound to it, which the copy rebinds to itself, or another callable, refused), and the
    global hooks: what a plan's private copy of the modules was made from, and checked against (a `forward` rebound
    or a class swapped after planning were scored as they were before, silently: 46-325% off)."""
    modules = tuple(
        (path, id(m), type(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks), _set_methods(m))
        for path, m in model.named_modules()
    )
    return (*modules, global_hook_ids())


def _set_methods(module: torch.nn.Module) -> tuple[tuple[str, Any], ...]:
    """The methods set on a module instance (``forward``, ``_conv_forward``: any callable; others: methods bound to a
    module), themselves: held by the plan's key, none is freed and its id given to the next (a stale plan reused,
    83-99% off), and a method bound again each call (``self._impl = self._plain``) equals the last."""
    return tuple(
        (k, v if _hashable(v) else _Held(v)) for k, v in vars(module).items()
        if k in INSTANCE_OVERRIDES and callable(v) or isinstance(v, types.MethodType) and isinstance(v.__self__,
                                                                                                      torch.nn.Module)
    )  # fmt: skip


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


class _Held:
    """An unhashable callable in a plan's key (a dataclass instance set as `_conv_forward`): held, by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Held) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _switches(model: torch.nn.Module) -> tuple[Any, ...]:
    """Each module's training flag and its settings that are switches (booleans, strings, None): a model switched to
    training mode, or a flag turning on its own dropout or a buffer's update, since planning draws random numbers or
    writes into its buffers, which planning's checks refuse; reused, the plan scored at random (77-117% off) and
    changed the user's buffers. Numbers and tensors (a temperature an annealing loop sets) are followed at each step
    (``_following``) without planning again."""
    return tuple(
        (path, module.training, *((k, v) for k, v in vars(module).items() if k not in MODULE_SLOTS and _switch(v)))
        for path, module in model.named_modules()
    )


def _switch(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str))


def _setting(value: Any, depth: int = NESTING) -> bool:
    """Whether ``value`` is a setting: a plain value or number (NumPy's too), a tensor, or a dict, list or tuple of
    them (subclasses too: a namedtuple, an OrderedDict), ``depth`` deep."""
    if isinstance(value, (*_PLAIN, numbers.Number, torch.Tensor)):
        return True
    if depth == 0 or not isinstance(value, (dict, list, tuple)) or len(value) > FLAT_ABOVE:
        return False
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    return all(_setting(item, depth - 1) for item in items)


def _alike(mine: Any, value: Any) -> bool:
    """Whether the copy's ``mine`` is the user's setting ``value`` now: the same tensor, an equal plain value,
    containers alike item by item."""
    if isinstance(value, torch.Tensor) or type(mine) is not type(value):
        return mine is value
    if isinstance(value, dict):
        return mine.keys() == value.keys() and all(_alike(mine[k], v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return len(mine) == len(value) and all(map(_alike, mine, value))
    return bool(mine == value)


def _check_params(planned: _Planned, params: Any) -> None:
    """``params`` has the planned names and shapes (cheap: no tensor values read)."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"`params` must be a dict {{name: tensor}} of the parameters at this step, with the names the tracer was "
            f"planned for; got {type(params).__name__}."
        )
    if params.keys() != planned.shapes.keys():
        missing = [n for n in planned.shapes if n not in params]
        unexpected = [n for n in params if n not in planned.shapes]
        stripped = unprefixed(unexpected)
        wrapper = (
            " They carry the prefix of a wrapper (DataParallel / DDP's `module.`, torch.compile's `_orig_mod.`): pass "
            "the wrapped module's `named_parameters()` (`model.module`, `model._orig_mod`)."
            if stripped is not None and set(stripped) <= set(missing)
            else ""
        )
        raise ValueError(
            f"`params` does not match the names the tracer was planned for: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}.{wrapper} Pass the same entries at every step (those of `tc.tracer(..., params=...)`, "
            f"by default `dict(model.named_parameters())`), or make a new tracer for the new ones."
        )
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`params[{name!r}]` is a {type(t).__name__}, not a torch.Tensor; pass tensors.")
        if tuple(t.shape) != planned.shapes[name]:
            raise ValueError(
                f"`params[{name!r}]` has shape {tuple(t.shape)} but the tracer was planned for shape "
                f"{planned.shapes[name]}; pass the parameters of the same architecture, or make a new tracer."
            )
    for name in planned.names:
        if not params[name].is_floating_point():
            raise TypeError(
                f"`params[{name!r}]` is a {params[name].dtype} tensor but is differentiated; pass a floating tensor."
            )


def _live_state(model: Any) -> dict[str, torch.Tensor]:
    """The user's model's tensors now, by name (none for a pure function)."""
    if not isinstance(model, torch.nn.Module):
        return {}
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.compiler.disable  # eager inside compiled code (see module notes)
def _products(
    planned: _Planned,
    state: TracerState,
    params: Mapping[str, torch.Tensor],
    lr: torch.Tensor,
    batch: Any,
    indices: torch.Tensor,
    fix: str = "`tc.tracer`",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<g(test_i), g(batch_b)> [n_test, B], |g(batch_b)|^2 [B])`` at ``params``, under a plan."""
    if (tuple(state.scores.shape), state.scores.dtype, state.scores.device) != (
        planned.shape, planned.dtype, planned.device
    ):
        raise ValueError(
            f"`state` holds {state.scores.dtype} scores of shape {tuple(state.scores.shape)} on "
            f"{state.scores.device}, but this tracer was made for {planned.dtype} [n_test, n_train] = "
            f"{list(planned.shape)} on {planned.device}; start from this tracer's `init()`."
        )
    batch = as_dict(batch)
    _check_values(state, lr, batch, indices, fix)
    check_runnable(planned.model, _EVAL_IN_LOOP, _COMPILE_IN_LOOP)  # (switched to training mode since planning?)
    check_batch_structure(batch, "`batch`", needs_target=planned.needs_target)
    batch = to_device(batch, planned.device, planned.dtype)

    spec = planned.setup.spec
    with in_use(planned.setup, passes_start=False), naming_failures(
        planned.setup.train_loss, planned.setup, batch, "batch", 0
    ):
        with holding(planned.model):  # the model as it is now, at one moment: its buffers (one rebound since planning
            live = _live_state(planned.model)  # too) and settings (undone as the call leaves the copy)
            _following(planned)
        move = partial(state_tensor, device=planned.device, dtype=planned.dtype)
        diff = {n: move(params[n]) for n in planned.names}
        frozen = {n: move(live.get(n, spec.defaults[n])) for n in planned.defaults}
        frozen.update({n: move(t) for n, t in params.items() if n not in diff})
        unsaved = {n: live.get(n, t) for n, t in spec.unsaved.items()}
        frozen.update(unsaved_on(unsaved, spec.following, planned.device, planned.dtype))  # (a CPU model on a GPU)
        frozen.update({n: t for n, t in unsaved.items() if n not in frozen and t is not spec.unsaved[n]})  # (rebound)
        with passes_from_here(spec.module):  # (the step's passes start from the copy as the model's settings are now)
            test_rep = planned.test(diff, frozen, state.test)
            rep = planned.train(diff, frozen, batch).formed()  # used twice: a norm and the dot
        sq_norms = rep.sq_norm()
        dots = test_rep.dot(rep)
    for bad, where in (~torch.isfinite(sq_norms), "`batch`"), (~torch.isfinite(dots).all(1), "`state.test`"):
        if bool(bad.any()):  # batch first: a non-finite training gradient makes whole columns non-finite
            raise FloatingPointError(
                f"Non-finite gradients for {where} examples {bad.nonzero().flatten().tolist()[:10]} (positions in "
                f"the batch) at this step: the loss or its gradient is NaN or infinite there. Check those inputs and "
                f"targets, the parameters and the dtype."
            )
    return dots, sq_norms


@torch.compiler.disable  # planned as a scoring call at every step; eager inside compiled code (see module notes)
def _planned_products(
    state: TracerState,
    model: Any,
    params: Mapping[str, torch.Tensor],
    lr: torch.Tensor,
    batch: Any,
    indices: torch.Tensor,
    *,
    loss_fn: Any,
    test_loss_fn: Any,
    factored: bool | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_products` under a plan made for this step only (:func:`tracer_update`)."""
    batch = as_dict(batch)
    _check_values(state, lr, batch, indices, "`tc.tracer_init`")  # before planning: cheap errors first
    planned = _plan(
        model, state.test, params, where="state.test", n_test=state.scores.shape[0], n_train=state.scores.shape[1],
        loss_fn=loss_fn, test_loss_fn=test_loss_fn, factored=factored, chunk_size=chunk_size,
        dtype=state.scores.dtype, device=state.scores.device, train_batch=batch,
    )
    return _products(planned, state, params, lr, batch, indices, "`tc.tracer_init`")
