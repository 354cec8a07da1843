"""Say what a call does: how every differentiated parameter is handled (its route) and why."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ._api import Options, _check_normalize, _check_options
from ._checkpoints import Checkpoint
from ._context import in_own_context
from ._data import as_dict, batch_size_of, num_examples, sized_automatically, slice_batch
from ._driver import (
    batches,
    first_examples,
    joined_pool,
    most_against,
    most_per_batch,
    naming_failures,
    planning_pool,
    reading_training,
)
from ._plan import LOWERED_LOOP, plan_call, split_state
from ._setup import in_use, make_setup
from ._validate import positive_int
from ._warn import silenced

if TYPE_CHECKING:
    from typing_extensions import Unpack


_QUESTIONS = ("influence", "self_influence")


class Route(NamedTuple):
    """One differentiated parameter: ``route`` is ``"factored"`` (exact inner products of layer inputs and output
    gradients, no per-sample gradient), ``"materialised"`` (per-sample gradients from those factors), ``"vmap"``
    (``vmap(grad)`` over examples), ``"loop"`` (one example at a time: vmap, or torch.func itself, failed on the
    model) or ``"unused"`` (the forward pass and the loss do not use it: zero gradients)."""

    parameter: str
    route: str
    reason: str


class Explanation(NamedTuple):
    """The plan of a call, printable as a table."""

    routes: tuple[Route, ...]
    batching: str  # one batched forward / backward per batch, or vmap over examples, and why
    batch_size: int | None  # examples per batch at most: ``batch_size=`` or the plan's automatic size (None: the
    # batches of a DataLoader or iterable, used as they are)
    example_bytes: int  # what one example's gradients hold under the plan until scored (factors, per-sample gradients)
    tensor_bytes: int  # the largest tensor one example's forward makes (CPU batches keep it within 16 MB)
    checked_later: str = ""  # what the examples planned on could not show, checked on a later batch that can

    def __str__(self) -> str:
        width = max(len("parameter"), *(len(r.parameter) for r in self.routes))
        counts = Counter(r.route for r in self.routes)
        size = "the data's own batches" if self.batch_size is None else f"at most {self.batch_size} examples"
        lines = [
            f"batching: {self.batching}",
            f"batch size: {size} (per example: {self.example_bytes / 1024:,.1f} KB of gradients, "
            f"{self.tensor_bytes / 1024:,.1f} KB in the forward's largest tensor)",
            "routes: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        ]
        lines.append(f"{'parameter':<{width}}  {'route':<12}  reason")
        lines += [f"{r.parameter:<{width}}  {r.route:<12}  {r.reason}" for r in self.routes]
        return "\n".join(lines + ([f"checked later: {self.checked_later}"] if self.checked_later else []))


@in_own_context
def explain(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    data: Any,
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    question: str = "influence",
    test: Any = None,
    n_test: int | None = None,
    normalize: str | None = None,
    **options: Unpack[Options],
) -> Explanation:
    """How a scoring call with these arguments handles every differentiated parameter, and why.

    The call is planned exactly as a scorer plans it, on the first batch of ``data``, and that batch's gradients
    are computed once at the first checkpoint to see whether ``vmap`` runs or falls back to a loop. Use it to see
    why a model is slower than expected and what to change (``params=``, ``factored=``, the model's layers).
    ``question="self_influence"`` plans as :func:`self_influence` does (a gradient that meets only itself is
    factored more often); ``"influence"`` (the default) as the other scorers do, for ``n_test`` test examples (as
    :func:`influence` and the top-k calls do with a batch of them; None, the default: too many to count, as with
    test data given as a ``DataLoader`` or summed, ``aggregate=True`` without cosine): with few, one prediction's, a
    wide layer is kept as factors where their products with those few cost less than forming its training gradients;
    ``normalize`` as given to that call (a renormalised one also takes each training gradient's own norm).

    Args:
        model, checkpoints, loss_fn, test_loss_fn, options: as in :func:`influence`.
        data: the data the call scores in batches (its training data; self-influence's data); its first batch is
            planned on, unless ``test`` is given.
        question: ``"influence"`` or ``"self_influence"``.
        test: the call's test data (``question="influence"``), or None: an influence call plans on its first test
            examples, checked and sized against the training data's first (where they differ in shape, other
            lengths, the routes may differ from those planned on ``data``).
        n_test: the call's test examples (``question="influence"``): by default ``test``'s, or None.
        normalize: the call's ``normalize=``.

    Returns:
        :class:`Explanation`: ``routes`` (one :class:`Route` per parameter, in order), ``batching``, the most
        examples per batch the call takes (``batch_size``), the bytes one example's gradients hold under the plan
        until scored (``example_bytes``: factors where a layer keeps them, per-sample gradients of the rest) and
        those of the largest tensor its forward makes (``tensor_bytes``), which the automatic batch size follows;
        ``print`` it for a table.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> plan = tc.explain(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss())
        >>> [(r.parameter, r.route) for r in plan.routes][:2]
        [('0.weight', 'factored'), ('0.bias', 'factored')]
        >>> print(plan.batching)
        one batched forward / backward gives every layer's factors
    """
    _check_options(options, "explain")
    data = as_dict(data)
    if question not in _QUESTIONS:
        raise ValueError(f"`question` must be one of {_QUESTIONS}, got {question!r}.")
    for name, value in (("n_test", n_test), ("test", test), ("normalize", normalize)):
        if value is not None and question != "influence":
            raise ValueError(f'`{name}` is for question="influence" (got {question!r}): self-influence has none.')
    test = None if test is None else as_dict(test)
    n_test = positive_int(n_test, "n_test") if n_test is not None else None if test is None else num_examples(test)
    normalize = _check_normalize(normalize)
    partners = None if n_test is None else n_test + (normalize is not None)
    setup = make_setup(model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, **options)
    with in_use(setup):
        offset, batch = next(iter(batches(setup, data, "data", "explain")), (0, None))
        if batch is None:
            raise ValueError("`data` holds no examples.")
        queries = None if test is None else first_examples(setup, test, "test")
        if test is not None and queries is None:
            raise ValueError("`test` holds no examples.")
        with silenced():  # (the explanation says it all)
            automatic = setup.auto_batch and sized_automatically(data)
            if queries is None:
                pool = planning_pool(setup, batch, data, "data") if automatic else None
                with naming_failures(setup.train_loss, setup, batch, "data", offset):
                    self_only = question == "self_influence"
                    planned = plan_call(setup, batch, "data", self_only=self_only, partners=partners, pool=pool)
            else:  # (as the call plans: on the first test examples, reading the training data's first)
                reading = reading_training(setup, data, "data")
                beside = reading.pop("beside")
                sized = setup.auto_batch and num_examples(test)  # (as the call's: its first examples, else a batch)
                pool = planning_pool(setup, queries, test, "test", beside) if sized else joined_pool(queries, beside)
                with naming_failures(setup.test_loss, setup, queries, "test", 0):
                    planned = plan_call(setup, queries, "test", partners=partners, pool=pool, **reading)
            if automatic:  # (as large as the call's first, which the plan sizes)
                batch = slice_batch(batch, 0, most_per_batch(setup, planned.plan))
            with naming_failures(setup.train_loss, setup, batch, "data", 0):
                acc = torch.zeros(batch_size_of(batch, "data"), device=setup.device, dtype=setup.dtype)
                planned.updates.self_influence(acc, setup.checkpoints[0], batch)
            tested, where = (batch, "data") if queries is None else (queries, "test")
            if setup.test_loss is not setup.train_loss or queries is not None:  # (vmap may fail on it alone: both
                with naming_failures(setup.test_loss, setup, tested, where, 0):  # then loop)
                    planned.test(*split_state(setup.checkpoints[0].state, planned.plan.names), tested)
    plan, mapper = planned.plan, planned.mapper
    adam = any(c.adam is not None for c in setup.checkpoints)
    routes = []
    for name in plan.names:
        route = plan.route(name)  # (off the batched path, factors too come from vmap, and loop where it failed)
        looped = (route == "vmap" or not plan.batched and route != "unused") and mapper.loop
        reason = plan.reasons[name]
        if looped and route != "vmap":  # (a site's reason says how its factors would be used; they come from each
            reason = f"{reason}; its factors from each example alone"  # example's own run here)
        elif not plan.batched and route in ("factored", "materialised"):  # (the header says vmap(grad): the table did
            reason = f"{reason}; its factors by vmap(grad) over examples"  # not, a review helper's)
        route = "loop" if looped else route
        if adam and route == "factored":  # (``_adam``: the update has no factored form)
            route, reason = "materialised", f"{reason}; formed from factors for the Adam checkpoints' updates"
        routes.append(Route(name, route, reason))
    looping = (  # (said where a route loops: vmap may have failed only in a check of the batched path; not where
        "" if not any(r.route == "loop" for r in routes) or plan.batching == LOWERED_LOOP  # the plan chose the loop)
        else "; vmap failed on this model, so examples run one at a time by plain autograd" if mapper.plain
        else "; vmap failed on this model, so examples run one at a time"
    )  # fmt: skip
    batching = plan.batching + looping
    size = most_per_batch(setup, plan) if num_examples(data) else None
    size = most_against(setup, size, n_test) if size and n_test else size  # (its score blocks' rows)
    checked_later = _CHECKED_LATER.get(plan.unchecked, "")
    return Explanation(tuple(routes), batching, size, plan.example_bytes, plan.tensor_bytes, checked_later)


_CHECKED_LATER = {
    "batching": "the examples planned on (one, or of equal inputs) cannot show how the model batches them: the "
    "batching is checked on the first batch whose inputs differ",
    "lengths": "the examples planned on end alike in some tensor (no padding, or as much), which cannot show whether "
    "the model reads the padding a longer example adds there: checked on each batch whose examples end unlike there",
    "packed": "the examples planned on are packed sequences of one length, which cannot show whether the model reads "
    "the padding a longer example adds: checked on the first batch whose lengths differ",
}
