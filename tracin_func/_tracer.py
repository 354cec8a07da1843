"""TracIn inside the training loop: an optax-style state that a loop threads through the steps it actually takes.

TracIn's own definition sums over the training steps, not over a few saved checkpoints: step ``t`` at parameters
``theta_t`` with learning rate ``lr_t`` on a batch of training examples adds
``lr_t <g(test_i; theta_t), g(z_j; theta_t)>`` to the score of every test example ``i`` and batch example ``z_j``.
:func:`tracer_init` makes the state (zero scores and the test batch), :func:`tracer_update` adds one step and
returns a new state; nothing is mutated, so a functional (JAX-style) loop and a plain ``torch.optim`` loop use it
the same way.

Each update is the scorers' pure core on one "checkpoint" (the step's parameters): the call is validated and
planned as a scoring call (per layer: factored inner products, gradients materialised from layer factors, or
``vmap(grad)``), the test examples and the batch are differentiated once each, and the ``[n_test, B]`` inner
products and ``[B]`` squared norms are scattered into the ``[n_test, n_train]`` and ``[n_train]`` totals with
``index_add`` (an example seen twice, in one step or in several, accumulates). The gradient part runs eagerly
(``torch.compiler.disable``) also inside a compiled training step: on CPU, compiling the hooks and ``autograd.grad``
of the batched path costs a minute and runs slower than eager, and the dense ``vmap(grad)`` route compiled is
still slower than the eager factored one. The learning rate and the state update stay in the compiled graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import optree
import torch

from ._assemble import representation_fn
from ._checkpoints import Checkpoint
from ._data import batch_size_of, check_batch_structure, to_device
from ._model import exclusive_use
from ._plan import plan_call
from ._setup import make_setup


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
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"`n_train` must be a positive int (the size of the training set), got {n_train!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating torch.dtype such as torch.float64, got {dtype!r}.")
    dtype = dtype or torch.get_default_dtype()
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"`dtype`={dtype}: sums of gradient inner products in half precision lose most of their digits; pass "
            f"`dtype=torch.float32` (parameters and inputs are converted for each step)."
        )
    n_test = batch_size_of(test, "`test`")  # every leaf a tensor with one batch size
    leaves = optree.tree_leaves(test, none_is_leaf=True)
    try:
        target = torch.device(device) if device is not None else leaves[0].device
        torch.empty(0, device=target)
    except Exception as err:
        why = str(err).splitlines()[0]
        raise ValueError(f"`device`={device!r} is not available ({why}); pass e.g. `device='cpu'`.") from err
    test = to_device(test, target, dtype)
    return TracerState(
        scores=torch.zeros(n_test, n_train, dtype=dtype, device=target),
        self_influence=torch.zeros(n_train, dtype=dtype, device=target),
        test=test,
        steps=torch.zeros((), dtype=torch.long, device=target),
    )


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
    """Add one training step to the TracIn scores: a new state, the old one unchanged.

    ``scores[i, indices[b]] += lr * <grad test_loss(test_i; params), grad loss(batch_b; params)>`` and
    ``self_influence[indices[b]] += lr * |grad loss(batch_b; params)|^2`` for every example ``b`` of the batch
    (repeated indices accumulate). Call it with the parameters the step starts from and the step's learning rate,
    before or after computing the step's update, but with the parameters before it is applied.

    Args:
        state: from :func:`tracer_init` or a previous update.
        model: an ``nn.Module`` (called through ``functional_call``; never modified) or a pure function
            ``f(params, *inputs)``.
        params: ``{name: tensor}``, the parameters at this step; every entry that is a parameter of the model (for
            a pure function: every floating entry) is differentiated; the model's other state (buffers, parameters
            not given) is taken from the model. ``dict(model.named_parameters())`` in a ``torch.optim`` loop (they
            are detached, never changed).
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
    factored layers), plus planning the call (checks of the forward pass on a few examples), which is done at every
    step because the state holds only tensors. Inside ``torch.compile`` the gradient part runs eagerly (see the
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
    if not isinstance(state, TracerState):
        raise TypeError(
            f"`state` must be the `tc.TracerState` of `tc.tracer_init(...)` or of the previous update, got "
            f"{type(state).__name__}."
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
        lr = lr.reshape(()).to(device=state.scores.device, dtype=state.scores.dtype)
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr = torch.tensor(float(lr), device=state.scores.device, dtype=state.scores.dtype)
    else:
        raise TypeError(f"`lr` must be a number or a 0-d tensor, got {lr!r} of type {type(lr).__name__}.")
    indices = indices.to(state.scores.device)
    dots, sq_norms = _products(
        state, model, params, lr, batch, indices, loss_fn=loss_fn, test_loss_fn=test_loss_fn, factored=factored,
        chunk_size=chunk_size,
    )
    return TracerState(
        scores=state.scores.index_add(1, indices, lr * dots),
        self_influence=state.self_influence.index_add(0, indices, lr * sq_norms),
        test=state.test,
        steps=state.steps + 1,
    )


def _check_values(state: TracerState, lr: torch.Tensor, batch: Any, indices: torch.Tensor) -> None:
    """Checks that read tensor values (run eagerly, also inside a compiled step)."""
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"`lr` must be finite and non-negative (this step's learning rate), got {value}.")
    n = batch_size_of(batch, "`batch`")
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
            f"(or a larger `n_train` to `tc.tracer_init`)."
        )


@torch.compiler.disable  # validated and planned as a scoring call; eager inside compiled code (see module notes)
def _products(
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
    """``(<g(test_i), g(batch_b)> [n_test, B], |g(batch_b)|^2 [B])`` at ``params``."""
    _check_values(state, lr, batch, indices)
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            f"`params` must be a non-empty dict {{name: tensor}} of the parameters at this step, e.g. "
            f"`dict(model.named_parameters())`; got {type(params).__name__}."
        )
    if isinstance(model, torch.nn.Module):
        named = dict(model.named_parameters())
        selected = [n for n in params if n in named]
        if not selected:
            raise ValueError(
                f"`params` holds none of the model's parameters (got {list(params)[:5]}, the model has "
                f"{list(named)[:5]}); pass `dict(model.named_parameters())` or the dict a functional loop updates."
            )
    else:
        selected = [n for n, t in params.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    setup = make_setup(
        model,
        [Checkpoint(params=params, lr=1.0)],  # the step's lr multiplies the products outside (a tensor)
        loss_fn=loss_fn,
        test_loss_fn=test_loss_fn,
        params=selected,
        strict=False,
        device=state.scores.device,
        dtype=state.scores.dtype,
        factored=factored,
        chunk_size=chunk_size,
    )
    test = state.test
    check_batch_structure(test, "`state.test`", needs_target=setup.needs_target[1])
    check_batch_structure(batch, "`batch`", needs_target=setup.needs_target[0])
    batch = to_device(batch, setup.device, setup.dtype)
    ckpt = setup.checkpoints[0]
    with exclusive_use(model, setup.spec):
        planned = plan_call(setup, batch, "batch")
        names = planned.plan.names
        diff = {n: ckpt.state[n] for n in names}
        frozen = {n: t for n, t in ckpt.state.items() if n not in diff}
        train_rep = representation_fn(setup.spec.module, setup.train_loss, planned.plan, planned.mapper)
        test_rep = planned.updates.test(ckpt, test)
        rep = train_rep(diff, frozen, batch)
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
