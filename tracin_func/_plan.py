"""Planning a call on its first batch: check the forward pass, choose the parameters (all selected, or the last
layer's), decide per layer how gradients are obtained, and build the pure updates for that plan."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._assemble import RepresentationFn, representation_fn, rows_with_gradient, worth_dropping
from ._attention import PRODUCT as ATTENTION_PRODUCT
from ._bags import PRODUCT as BAG_PRODUCT
from ._capture import BatchableLoss, Hook, Unbatchable, Witness, batched_factors, discover, hooked
from ._data import distinct_examples, num_examples, padding, select_rows, slice_batch
from ._grads import Mapper, Tensors
from ._layers import (
    Site,
    broadcast_row,
    call_site,
    factorable_sites,
    global_hooks_present,
    input_rows,
    output_rows,
    site_kind,
    site_layer,
    token_wise,
    why_not_a_site,
)
from ._loss import BatchedLoss, CriterionLoss, ExampleLossFn, batch_losses, floating_leaves
from ._purity import check_forward
from ._recurrent import UNROLLED_KINDS, packed_calls, recurrent_sites, why_not_run_unrolled
from ._representations import Representation
from ._setup import Setup
from ._state import leaving_no_trace
from ._updates import Updates, make_updates
from ._warn import warn


class Plan(NamedTuple):
    """How each differentiated parameter is handled in one call."""

    names: tuple[str, ...]  # all differentiated parameters, in the user's order
    dense: tuple[str, ...]  # differentiated by vmap(grad)
    sites: tuple[Site, ...]  # layers whose gradients are obtained as factors
    kernel: frozenset[str]  # paths of sites kept as factors (the others are materialised next to dense grads)
    batched: bool  # factors from one batched forward / backward (else vmapped)
    reasons: Mapping[str, str]  # parameter name -> why it takes its route (for `tc.explain` and warnings)
    batching: str  # why the call runs one batched pass, or not
    example_bytes: int  # what one example's representation holds until scored (``_example_bytes``)
    tensor_bytes: int = 0  # the largest tensor one example's forward makes (``check_forward``): a batch's scale with it
    trimmed: frozenset[str] = frozenset()  # paths of Linears whose rows of zero output gradient are dropped per batch
    costed: bool = True  # kernel sites chosen by the cost model (factored=None), not all forced (factored=True)
    # modules holding a tied tensor of sites that the forward did not call when planned: refused if called later
    uncalled: tuple[str, ...] = ()
    # parameters the forward and the loss do not use, on a batched plan: zero gradients (refused if used later); a
    # plan that runs vmap(grad) anyway keeps them in ``dense``
    unused: tuple[str, ...] = ()
    # what the batching check could not show on the examples planned on, and checks on the first batches that can
    # (``_checking_batches``): "batching" (one example, or examples of equal inputs: their batched and single runs
    # are the same), "lengths" / "packed" (examples of one length: whether the model reads the padding a longer one
    # adds; as ``BatchingCheck.unshown``)
    unchecked: str = ""
    # the range of each column of ``padding`` among the examples checked (``_range``), followed per batch
    # (``_checking_batches``); None where no check ran (refused, or "batching" unchecked)
    padding_shown: tuple[tuple[tuple[str, str], tuple[int, int]], ...] | None = None
    # rows of the batch dimension per example where the model folds an example's items into its batch (``[B, C, T]``
    # ids run as ``[B C, T]``: multiple choice); a row broadcast over the batch meets ``B fold`` rows
    fold: int = 1
    # paths of sites run once for the whole batch (T5's relative position bias: no batch dimension), whose output is
    # followed to where it meets the batch (``_batch_free``)
    batch_free: frozenset[str] = frozenset()
    # paths of token-wise sites fed sequence-first (``[T, B, d]``: ``batch_first=False`` transformers, Longformer's
    # attention), whose factors are taken with the batch dimension moved first
    seq_first: frozenset[str] = frozenset()

    @property
    def follows(self) -> bool:
        """Whether a batched pass follows tensors computed once for the whole batch to where they meet it: the
        outputs of the ``batch_free`` sites, the parameters of the "followed" ones (``_batch_free``)."""
        return bool(self.batch_free) or any(s.kind == "followed" for s in self.sites)

    def route(self, name: str) -> str:
        """``"factored"`` (inner products of factors), ``"materialised"`` (from factors), ``"unused"`` or ``"vmap"``."""
        if name in self.unused:
            return "unused"
        site = next((s for s in self.sites if name in s.names), None)
        return "vmap" if site is None else "factored" if site.path in self.kernel else "materialised"


class SlowPathWarning(UserWarning):
    """A call leaves the batched path (one forward / backward per batch) for ``vmap(grad)`` over examples."""


class PlannedCall(NamedTuple):
    plan: Plan
    mapper: Mapper  # says, once used, whether vmap fell back to a per-example loop
    updates: Updates
    train: RepresentationFn  # (diff, frozen, batch) -> Representation, for the training loss
    test: RepresentationFn  # the same for the test loss


def plan_call(
    setup: Setup,
    batch: Any,
    where: str,
    *,
    self_only: bool = False,
    partners: int | None = None,
    scored: Callable[[], Any] | None = None,
    pool: Any = None,
) -> PlannedCall:
    """Check the forward pass and plan a call on ``batch`` (on device) of the argument named ``where``; warn when the
    plan leaves the batched path although layers could give factors. ``self_only``: every gradient meets only itself
    (self-influence), which changes what factoring saves, as do few ``partners`` (the products each training gradient
    takes part in, where known: one per test example, and its own norm where taken; one prediction's proponents).
    ``scored``: reads the first examples of other data the plan scores in batches (influence's training data), which the
    batching check runs on when ``batch`` holds a single example (whose batched and lone runs are the same); called only
    then. ``pool``: more examples (the same data's first, ``batch`` first, then maybe the training data's), which the
    batching check picks its examples among."""
    module, first = setup.spec.module, setup.checkpoints[0].state
    losses = [setup.train_loss] if setup.test_loss is setup.train_loss else [setup.train_loss, setup.test_loss]
    tensor_bytes = max(check_forward(module, loss, first, batch, where) for loss in losses)
    names, factored = setup.spec.diff_names, setup.factored
    if setup.method == "last_layer":
        assert module is not None  # checked when the call was set up
        names, factored = last_layer_params(module, setup.train_loss, first, batch, setup.spec.aliases), True
    checked_at = _split(setup.checkpoints[-1].state, names)  # see ``make_plan``
    mapper = Mapper(setup.chunk_size)
    plan = make_plan(
        module, names, losses, *checked_at, batch, mapper, factored=factored, self_only=self_only, partners=partners,
        scored=scored, pool=pool,
    )._replace(tensor_bytes=tensor_bytes)
    if module is not None and factored is not False and not plan.batched:
        causes = sorted(plan.dense, key=lambda n: plan.reasons[n] in (_TO_VMAP, _UNUSED_ON_VMAP))  # root causes first
        slow = [f"{n!r} ({plan.reasons[n]})" for n in causes[:3]]
        warn(
            f"This call runs {plan.batching}"
            + (f"; through vmap(grad): {', '.join(slow)}{', ...' if len(causes) > 3 else ''}" if slow else "")
            + ". `tc.explain(model, checkpoints, data, loss_fn=...)` shows every parameter's route and why.",
            SlowPathWarning,
        )
    reps = {}
    for loss in losses:
        witness = _spot_check(loss, [c.state for c in setup.checkpoints], names) if plan.batched else None
        reps[id(loss)] = representation_fn(module, loss, plan, mapper, compiled=setup.compile, witness=witness)
        if plan.batched:  # (checked on the examples planned on, or left to the first batch that can show it)
            checking = _checking_batches(
                reps[id(loss)], module, loss, plan, mapper, checked_at, setup.compile, witness
            )
            reps[id(loss)] = checking
    train, test = reps[id(setup.train_loss)], reps[id(setup.test_loss)]
    return PlannedCall(plan, mapper, make_updates(train, test, names, projection=setup.projection), train, test)


def _split(state: Tensors, names: Sequence[str]) -> tuple[Tensors, Tensors]:
    """``(differentiated, frozen)`` tensors of a checkpoint's state."""
    return {n: state[n] for n in names}, {n: t for n, t in state.items() if n not in names}


def _checking_batches(
    rep: RepresentationFn,
    module: nn.Module,
    loss: BatchableLoss,
    plan: Plan,
    mapper: Mapper,
    checked_at: tuple[Tensors, Tensors],
    compiled: bool,
    witness: Witness,
) -> RepresentationFn:
    """``rep`` checking its batches of two or more examples for what the plan's examples could not show
    (``Plan.unchecked``): a model that mixes a batch's examples is refused there, never scored batched. Examples of
    one length (padded alike, or packed) show nothing of the padding a longer example adds, nor of an order by
    length. Packed sequences: a batch whose own lengths are one too is exact (no padding, no order; the lengths are
    recorded by scoring the batch eagerly); the first whose lengths differ is checked on an example of each, which
    shows the packed layers. Padding in the data is followed by what shows it (``padding``'s columns: each attention
    mask, the ends of each tensor), packed or not, each within the range it took in a check (``_range``): a batch
    where one varies beyond it (the decoder's ids of other lengths, where the first examples varied only the
    encoder's mask; padded examples, where the first examples' ends varied by a repeated last token; shorter
    examples than any checked; a tensor beside packed ones cut to the batch's longest) is checked on examples of its
    own at its ends. ``witness``: ``batched_factors``'s for every reading's representation (``_spot_check``)."""
    # the reading the batches run under, with "packed" while packed sequences of lengths that differ are unseen (else
    # "lengths"), and its rep; set once checked (threads may both check the first batch: the same answer)
    reading_left: list[tuple[Plan, str, RepresentationFn]] = []
    shown = dict(plan.padding_shown or ())  # the range each column of ``padding`` took in a check
    if plan.unchecked != "batching":  # ("": padding followed)
        reading_left.append((plan, plan.unchecked or "lengths", rep))

    def verdict(examples: Any) -> tuple[Plan, BatchingCheck]:
        """The reading ``examples`` pass the check under (at ``checked_at``), and that check; raises where they show
        the model mixes them or runs a layer once for the whole batch."""
        reading, check = plan, _refused_on(module, loss, plan, *checked_at, examples, mapper)
        if check.reason and plan.seq_first:  # one example's [T, 1, d] read batch-first after all?
            flat = plan._replace(seq_first=frozenset())
            retried = _refused_on(module, loss, flat, *checked_at, examples, mapper)
            reading, check = (flat, retried) if not retried.reason else (plan, check)
        unseen = sorted(set(check.batch_free) - plan.batch_free)  # (a lone example's layers all look batch-free)
        if check.reason:
            shows = f"the model does not keep a batch's examples apart ({check.reason})"
        elif unseen:
            shows = f"{unseen[0]!r} runs once for the whole batch, which the plan could not follow"
        else:
            return reading, check
        raise ValueError(
            f"`model`: the call was planned on examples that could not show how the model batches them (a single "
            f"example, examples of equal inputs, or examples of one length, packed or padded alike, or padded less "
            f"unlike than a later batch's), so planning could not check it; the first batch of two or more examples "
            f"that could shows that {shows}. Pass "
            f"`factored=False`, or plan on two or more examples that differ (a first batch of two or more; for a "
            f"tracer, two or more test examples)."
        )

    def rep_of(reading: Plan, eager: bool = False) -> RepresentationFn:
        if reading is plan and not (eager and compiled):
            return rep
        return representation_fn(module, loss, reading, mapper, compiled=compiled and not eager, witness=witness)

    def checked(reading: Plan, check: BatchingCheck) -> None:
        """Keep what ``check`` showed: its reading, whether packed lengths are still unseen, its padding's ranges."""
        unseen = "packed" if check.unshown == "packed" and (not reading_left or reading_left[0][1] == "packed") else ""
        shown.update({k: _joined(r, shown.get(k)) for k, r in check.shown or ()})
        reading_left[:] = [(reading, unseen or "lengths", rep_of(reading))]

    # the last batch's tensors, padding and the padding's ranges (each checkpoint scores a batch)
    last: list[tuple[list[Any], dict, dict]] = []

    def columns_of(batch: Any) -> tuple[dict[tuple[str, str], torch.Tensor], dict[tuple[str, str], tuple[int, int]]]:
        """``batch``'s padding (``padding``) and the range of each column (``_ranges``), read once for all
        checkpoints."""
        tensors = optree.tree_leaves(batch, none_is_leaf=True)
        seen = last[-1] if last else None  # (one read: threads may replace it)
        if seen is None or len(seen[0]) != len(tensors) or any(a is not b for a, b in zip(seen[0], tensors)):
            columns = {k: t.cpu() for k, t in padding(_inputs(batch, [loss])).items()}
            seen = (tensors, columns, _ranges(columns))
            last[:] = [seen]
        return seen[1], seen[2]

    @torch.compiler.disable  # (eager inside compiled updates)
    def unshown_in(batch: Any) -> list[torch.Tensor]:
        """The columns of ``batch``'s padding that vary beyond the range they took in the checks."""
        columns, ranges = columns_of(batch)
        return [t for k, t in columns.items() if not _within(ranges[k], shown.get(k))]

    def padding_shown(batch: Any) -> Plan:
        """Check ``batch`` on examples of its own until no column of its padding varies beyond the range it took in
        the checks (each check spans the first such column's range: one per column at most); the reading they pass
        under. The ranges the check showed are read as the batch names its columns: a few examples may find a count
        that tells their padding by chance (labels beside a mask), the batch not."""
        while varied := unshown_in(batch):
            picked = torch.tensor(_showing(varied))
            reading, check = verdict(select_rows(batch, picked))  # (four or fewer: the check runs them all)
            spanned = tuple(_ranges({k: t[picked] for k, t in columns_of(batch)[0].items()}).items())
            checked(reading, check._replace(shown=spanned))
        return reading_left[0][0]

    def packed_shown(batch: Any, on_packed: list) -> None:
        """Check ``batch`` on an example of each length of its packed sequences, where they differ and have not been
        shown."""
        if reading_left[0][1] != "packed" or not on_packed:
            return
        n = num_examples(batch)
        varied = next((t.cpu() for t in _packed_lengths(on_packed, n) if not _alike(t)), None)
        if varied is None:
            return  # one length in the whole batch: no padding, no order by length: exact
        # (k sequences an example, as consecutive rows: a siamese model's [B, 2, T] pairs)
        each = _first_of_each(varied.view(n, -1)) if len(varied) % n == 0 else None
        reading, check = verdict(select_rows(batch, torch.tensor(each))) if each else (plan, None)
        if check is None or check.unshown == "packed":
            raise ValueError(
                "`model`: the call was planned on packed sequences of one length, which cannot show whether the model "
                "reads the padding a longer example adds, and the first batch whose lengths differ does not pack its "
                "examples in its own order (or as many sequences each, in a row), so no check could pick examples of "
                "other lengths. Pass `factored=False`."
            )
        checked(reading, check)

    @torch.compiler.disable  # eager inside compiled updates: a batch that needs a check, or whose packed lengths do
    def rechecking(diff: Tensors, frozen: Tensors, batch: Any) -> Representation:
        if num_examples(batch) < 2:
            return rep_of(plan, eager=True)(diff, frozen, batch)
        if not reading_left:
            reading, check = verdict(batch)
            if not _shows_batching(batch, [loss]):
                return rep_of(reading, eager=True)(diff, frozen, batch)
            checked(reading, check)
        reading, mixed = reading_left[0][0], None
        with packed_calls() as on_packed:
            try:
                out = rep_of(reading, eager=True)(diff, frozen, batch)
            except MixedBatch as err:  # the checks below name the cause where they can
                mixed = err
        packed_shown(batch, on_packed)
        shown_in = padding_shown(batch)
        if mixed is not None:
            raise mixed
        return out if shown_in is reading else rep_of(shown_in, eager=True)(diff, frozen, batch)

    def checking(diff: Tensors, frozen: Tensors, batch: Any) -> Representation:
        if reading_left and reading_left[0][1] == "lengths" and not unshown_in(batch):  # exact, or shown
            return reading_left[0][2](diff, frozen, batch)
        return rechecking(diff, frozen, batch)

    return checking


_GOLDEN = (math.sqrt(5) - 1) / 2  # the k-th example checked is at k * this (mod 1) along its batch


def _spot_check(loss: BatchableLoss, states: Sequence[Tensors], names: Collection[str]) -> Witness:
    """A ``Witness`` (``batched_factors``) that runs one example of each batch of two or more alone and refuses the
    call where the batch gave it other outputs or losses (``_alike_alone``) by more than rounding (``_rounding_only``).
    Planning's check runs a few first examples at the last checkpoint, which cannot show mixing that depends on the
    batch (statistics over larger batches, a maximum the first examples share, NaNs they lack) or on another
    checkpoint (a frozen gate, zero at the last; a branch on a batch statistic of activations the weights grow).

    The driver scores a batch at each of the call's checkpoints (``states``) in turn: the first batch is checked at
    every checkpoint, the k-th after it at the k-th checkpoint from the last (mod their number) of each run of
    consecutive checkpoints whose frozen tensors (those not in ``names``) are alike, so that a check runs once per
    batch where they are all alike and at each where they differ (a gate, BatchNorm's statistics), the checkpoints
    taking turns, the last (furthest from initialisation, in training order) first. A state that is none of them (a
    tracer's step) is checked at each batch. The example checked moves along the batch from check to check; where it
    has finite inputs and some of the batch's examples do not, one of those is checked too, moving along them (a
    model imputing NaNs from the batch mixes those examples alone). Each check costs one forward of one example."""
    picks, odd_picks, batches = itertools.count(1), itertools.count(), itertools.count()
    distinct: dict[frozenset[int], Tensors] = {}  # each state by its tensors (a checkpoint given twice: once)
    for state in states:
        distinct.setdefault(frozenset(map(id, state.values())), state)
    checkpoint_of, states = {key: c for c, key in enumerate(distinct)}, list(distinct.values())
    runs = cache(partial(_frozen_runs, states, names))  # (compared on the first check only)
    current: list[Any] = [None, 0, set()]  # the batch last seen, its number, the checkpoints it was checked at

    @torch.compiler.disable  # (eager inside compiled updates)
    def witness(state: Tensors, batch: Any, together: Witnessed) -> None:
        n = num_examples(batch)
        if n < 2:
            return
        if batch is not current[0]:
            current[:] = [batch, next(batches), set()]
        c = checkpoint_of.get(frozenset(map(id, state.values())))
        if c is not None:
            turn = runs()[c]
            if (current[1] and c != turn[-1 - current[1] % len(turn)]) or c in current[2]:  # (the first: each)
                return
            current[2].add(c)
        checked = [int(n * (next(picks) * _GOLDEN % 1))]
        odd = _not_finite(_inputs(batch, [loss]), n)
        if odd and checked[0] not in odd:  # (all examples not finite: an additive mask of -inf, say)
            checked.append(odd[next(odd_picks) % len(odd)])
        for i in checked:
            one = torch.tensor([i])
            alone = _witnessed(loss, state, names, select_rows(batch, one))
            if _alike_alone(together, alone, n, i) or _rounding_only(loss, state, names, batch, one, together, alone):
                continue
            raise MixedBatch(
                f"`model`: example {i} of a batch of {n} got other outputs in the batch than alone, so the model mixes "
                f"a batch's examples in a way the first examples it was planned on could not show (statistics over "
                f"larger batches or over examples unlike the first; at another checkpoint than the last: a frozen "
                f"gate, or a branch on a batch statistic); scored batched, its scores would be wrong. Pass "
                f"`factored=False`, or keep each example's computation its own."
            )

    return witness


def _not_finite(inputs: Any, n: int) -> list[int]:
    """The examples of a batch of ``n`` whose floating inputs hold a NaN or an infinity."""
    rows = [t.reshape(n, -1) for t in optree.tree_leaves(inputs) if isinstance(t, torch.Tensor)
            and t.is_floating_point() and t.dim() > 0 and t.shape[0] == n]  # fmt: skip
    if all(bool(r.sum().isfinite()) for r in rows):  # (one reduction each; a sum past the largest float: looked at)
        return []
    return torch.cat([~r.isfinite().all(1, keepdim=True) for r in rows], 1).any(1).nonzero()[:, 0].tolist()


def _frozen_runs(states: Sequence[Tensors], names: Collection[str]) -> list[tuple[int, ...]]:
    """For each state, the run of consecutive states whose tensors not in ``names`` equal its own (itself among
    them): each compared with the one before it only."""
    frozen = [{k: t for k, t in state.items() if k not in names} for state in states]
    runs = [[0]] if states else []
    for c in range(1, len(states)):
        if _same_tensors(frozen[c], frozen[c - 1]):
            runs[-1].append(c)
        else:
            runs.append([c])
    return [tuple(run) for run in runs for _ in run]


def _same_tensors(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(t is b[k] or torch.equal(t, b[k]) for k, t in a.items())


class MixedBatch(ValueError):
    """A batch that gave an example other outputs than it gets alone (``_spot_check``)."""


Witnessed = tuple[list[torch.Tensor], torch.Tensor | None]  # what a forward gave its examples: outputs, losses


def _witnessed(loss: BatchableLoss, state: Tensors, names: Collection[str], batch: Any) -> Witnessed:
    """What the forward gives ``batch``'s examples, as ``batched_factors`` shows its witness; run as the batched pass
    runs, its parameters ``names`` differentiated (under ``no_grad``, ``nn.TransformerEncoder`` takes a fused path
    that gives padded positions zeros, which the batched pass computes)."""
    state = {k: t.detach().requires_grad_() if k in names else t for k, t in state.items()}
    with torch.enable_grad():
        if isinstance(loss, BatchedLoss):
            return [], loss.per_example(state, batch).detach()
        out = loss.forward(state, *batch[:-1])
        losses = batch_losses(loss.criterion, out, batch[-1])
    return [t.detach() for t in floating_leaves(out)], None if losses is None else losses.detach()


def _alike_alone(together: Witnessed, alone: Witnessed, n: int, i: int, loosely: bool = False) -> bool:
    """Whether what example ``i`` gets alone is close to a part of the batch's that may hold it (``_example_parts``),
    each output and its losses within 1e-4 of the example's own largest entry; ``loosely``, of the batch's largest
    (losses: or 1). Outputs whose shapes tell no part are not compared."""
    for t, a, least in _pairs(together, alone):
        parts = list(_example_parts(t, a.shape, n, i))
        if not parts or not a.numel():
            continue
        scale = max(least, _largest(t)) if loosely else _largest(a)
        if not any(_close_within(a, part, scale) for part in parts):
            return False
    return True


def _rounding_only(
    loss: BatchableLoss,
    state: Tensors,
    names: Collection[str],
    batch: Any,
    one: torch.Tensor,
    together: Witnessed,
    alone: Witnessed,
) -> bool:
    """Whether example ``one`` of ``batch`` differs alone from its part of the batch's by rounding only: alike when
    both are run again in float64, where the model computes as in its own precision (its outputs within 1e-4 of the
    batch's largest entry). A small loss or output is a difference of larger terms (``logsumexp(z) - z_y`` of a
    well-fitted example, ``w h + b`` of a binary logit near zero), whose float32 rounding is theirs: 3e-4 to 5e-4 of
    its own size between a batch and the example alone. Decided loosely for a state whose float64 copy would take
    more than ``_WIDE_CHECK_BYTES``, or that float64 fails on; never for a float64 state."""
    n, i = num_examples(batch), int(one[0])
    floating = [t for t in state.values() if t.is_floating_point()]
    if not floating or floating[0].dtype == torch.float64:
        return False
    if 8 * sum(map(torch.numel, floating)) > _WIDE_CHECK_BYTES:
        return _alike_alone(together, alone, n, i, loosely=True)
    try:  # (see ``_batching_refused``)
        wide_state, wide_batch = _floating_as(torch.float64, (state, batch))
        with _Widened():
            wide = [_witnessed(loss, wide_state, names, b) for b in (wide_batch, select_rows(wide_batch, one))]
    except (RuntimeError, TypeError, ValueError):
        return _alike_alone(together, alone, n, i, loosely=True)
    narrow, scales = floating[0].dtype, [_largest(t) for t in together[0]]
    computes_alike = all(  # (outputs: a loss of them can be further off, its own rounding theirs times a residual)
        _close_within(t, w.to(narrow), scale)
        for mine, theirs in ((together, wide[0]), (alone, wide[1]))
        for t, w, scale in zip(mine[0], theirs[0], scales)
        if t.shape == w.shape
    )
    return computes_alike and _alike_alone(wide[0], wide[1], n, i)


def _pairs(x: Witnessed, y: Witnessed) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Outputs and losses of two runs side by side, with the least scale each is compared on loosely."""
    pairs = [(t, a, 0.0) for t, a in zip(x[0], y[0])] if len(x[0]) == len(y[0]) else []
    return pairs + ([(x[1], y[1], 1.0)] if x[1] is not None and y[1] is not None else [])


def _largest(t: torch.Tensor) -> float:
    return t.nan_to_num(0, 0, 0).abs().max().item() if t.numel() else 0.0


def _close_within(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    """Equal up to ``1e-4 * scale``, or both NaN (or like infinities), entry by entry."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=1e-4 * scale, equal_nan=True)


def _example_parts(t: torch.Tensor, shape: torch.Size, n: int, i: int) -> Iterator[torch.Tensor]:
    """The parts of a batch's output ``t`` that may hold example ``i``'s output of ``shape`` alone: along a dimension
    ``n`` times as long, its ``i``-th block or every ``n``-th entry from the ``i``-th (the batch first or second in a
    flattened ``[B T, C]``; ``[B, C]`` or ``[T, B, C]`` alike), a dimension of ``n`` that alone is squeezed, or the
    start or end of example ``i``'s row along the one dimension the batch pads (an output cut to the batch's
    longest)."""
    if t.dim() == len(shape) and t.dim() > 1 and t.shape[0] == n and shape[0] == 1:
        longer = [d for d in range(1, t.dim()) if t.shape[d] != shape[d]]
        if len(longer) == 1 and t.shape[longer[0]] > shape[longer[0]]:
            d, k = longer[0], shape[longer[0]]
            yield from (t[i : i + 1].narrow(d, start, k) for start in (0, t.shape[d] - k))
            return
    if t.dim() == len(shape):
        for d, k in enumerate(shape):
            if t.shape[d] == n * k and t.shape[:d] + t.shape[d + 1 :] == shape[:d] + shape[d + 1 :]:
                yield t.narrow(d, i * k, k)
                if k > 1:
                    yield t.unflatten(d, (k, n)).select(d + 1, i)
    elif t.dim() == len(shape) + 1:
        for d in range(t.dim()):
            if t.shape[d] == n and t.shape[:d] + t.shape[d + 1 :] == shape:
                yield t.select(d, i)


def _packed_lengths(on_packed: Sequence[tuple[nn.Module, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """Each of ``n`` examples' lengths: those of every layer run on a ``PackedSequence`` in the batch's order
    (``[n, k]``, so that examples of each combination are picked), then each such layer's alone."""
    every = [lengths for _, lengths in on_packed]
    return ([torch.stack(every, 1)] if all(len(t) == n for t in every) else []) + every


def _alike(t: torch.Tensor) -> bool:
    return bool((t == t[:1]).all())


def _showing(columns: Sequence[torch.Tensor]) -> list[int]:
    """Four examples at most among which ``columns`` (``[B]`` each) span their range in the batch: the first of the
    least and of the greatest value of each, column by column, then the first ones unlike every one taken (padding
    between the extremes: a model cutting its batch to the longest may read none at either end)."""
    taken: list[int] = []
    for t in columns:
        taken += [i for i in dict.fromkeys((int(t.argmin()), int(t.argmax()))) if i not in taken][: 4 - len(taken)]
    rows = torch.stack(list(columns), 1)
    while len(taken) < 4 and bool((unlike := (rows[:, None] != rows[taken][None]).any(2).all(1)).any()):
        taken.append(int(unlike.nonzero()[0]))
    return sorted(taken)


def _ranges(columns: Mapping[Any, torch.Tensor]) -> dict[Any, tuple[int, int]]:
    """The values each column of ``padding`` takes among examples, its least and most (all columns in two
    reductions). A run at an end may be content (a repeated last token), and a model may read the padding only past
    a threshold (its cut rounded up to a multiple of 8): a check shows the padding only within the range its examples
    took, a named mask's too."""
    rows = torch.stack([t.long() for t in columns.values()], 1)
    return dict(zip(columns, zip(rows.amin(0).tolist(), rows.amax(0).tolist())))


def _within(values: tuple[int, int], shown: tuple[int, int] | None) -> bool:
    """Whether a batch's range of a column needs no check beyond ``shown``: one value (no padding, or as much), or
    within what a check took."""
    return values[0] == values[1] or shown is not None and shown[0] <= values[0] and values[1] <= shown[1]


def _joined(values: tuple[int, int], shown: tuple[int, int] | None) -> tuple[int, int]:
    return values if shown is None else (min(values[0], shown[0]), max(values[1], shown[1]))


def _first_of_each(values: torch.Tensor) -> list[int]:
    """The first index of each value (row) of ``values``, in order, four at most."""
    group = torch.unique(values.reshape(len(values), -1), dim=0, return_inverse=True)[1]
    return sorted(int((group == g).nonzero()[0]) for g in group.unique())[:4]


def _rows_per_example(site: Site, shapes: Sequence[tuple[int, ...] | None]) -> int:
    """``T``: rows of ``A`` / ``G`` per example, over all calls of the layer (shapes of a batch of one); none for an
    "expanded" site, which has no factors (its output need not even be a tensor: XLNet's whole model holds a row)."""
    if site.kind == "expanded":
        return 0
    return sum(math.prod(s[2:]) if site.kind == "conv" else math.prod(s[:-1]) for s in shapes)


def _pair_costs(site: Site, rows: int, partners: int | None) -> tuple[int, int]:
    """Flops of one gradient's inner products with its ``partners`` (the test examples a training gradient meets, and
    itself where its norm is taken too; 1: itself alone, for self-influence): factored ``P T^2 (d_in + d_out)``,
    materialised ``(T + P) d_in d_out``, forming it once (``T d_in d_out``) and a product per partner. ``None``:
    partners too many to count (an influence call's test examples, not known in advance), where the forming is shared
    by all of them: one pair's inner product, ``T^2 (d_in + d_out)`` against ``d_in d_out``."""
    d_in, d_out = _widths(site)
    if partners is None:
        return rows * rows * (d_in + d_out), d_in * d_out
    return partners * rows * rows * (d_in + d_out), (rows + partners) * d_in * d_out


def _widths(site: Site) -> tuple[int, int]:
    """``d_in`` (a bias is one more, constant, input) and ``d_out`` of a site's factor rows."""
    return math.prod(site.weight_shape[1:]) + (site.bias is not None), site.weight_shape[0]


# An Embedding's test side kept as token rows costs about T^2 / V gathered row products per pair (uniform tokens;
# more when few ids recur in every example, like positions), each far slower than a GEMM's multiply-add; the
# materialised gradient costs V d per pair in a GEMM. Token rows are kept when V >= _TOKEN_ROWS_MIN_RATIO * T, else
# (GPT-2's positions, BERT's token types: every test row matches every training row) it is materialised.
_TOKEN_ROWS_MIN_RATIO = 8


_TO_VMAP = "materialising costs less inside vmap(grad), which runs anyway"
_UNUSED = "not used by the forward pass or the loss on the first example: zero gradients (a batch using it is refused)"
_UNUSED_ON_VMAP = "not used by the forward pass or the loss on the first example (zero gradients); vmap runs anyway"


def _followed_reason(why: str) -> str:
    """The route's reason for a followed parameter, with why it is outside factor sites."""
    return f"followed: used outside a factor site's call ({why}), each example's gradient where its uses meet the batch"


def _kernel_is_cheaper(site: Site, rows: int, partners: int | None) -> bool:
    if site.kind == "embedding":
        return site.weight_shape[0] >= _TOKEN_ROWS_MIN_RATIO * rows
    factored, materialised = _pair_costs(site, rows, partners)
    return factored < materialised


def make_plan(
    module: nn.Module | None,
    names: Sequence[str],
    losses: Sequence[ExampleLossFn],
    diff: Tensors,
    frozen: Tensors,
    batch: Any,
    mapper: Mapper,
    *,
    factored: bool | None,
    self_only: bool = False,
    partners: int | None = None,
    scored: Callable[[], Any] | None = None,
    pool: Any = None,
) -> Plan:
    """Which layers give factors, which of those are scored by factored inner products (a cost model for
    ``factored=None``, all for ``True``; ``False`` uses vmap(grad) for everything), and how factors are obtained.
    ``diff``, ``frozen``: the state discovery and the batching check run at, the call's last checkpoint's
    (``plan_call``), where a path mixing examples, or another use of a parameter, behind a gate that is zero at
    initialisation shows.
    ``self_only``: each gradient is only multiplied with itself (self-influence); else ``partners``: the products each
    training gradient takes part in, where known (``_pair_costs``). ``pool``: more examples, ``batch``'s
    first, which the batching check picks its own among (``_checked_rows``: the ends of each padding signal's range,
    so that later batches rarely reach beyond them)."""
    partners = 1 if self_only else partners
    sites = {}
    if module is not None and factored is not False:
        sites = {**factorable_sites(module, names), **recurrent_sites(module, names)}
    reasons = {n: _why_dense(module, n, factored) for n in _not_in_sites(names, sites.values())}
    kernel, rows_of = set(), {}
    modules = dict(module.named_modules()) if module is not None else {}
    truth: list[dict[str, torch.Tensor]] = []  # per loss: the first example's gradients of "expanded" parameters
    idle: dict[str, Site] = {}  # modules holding a tied tensor that no loss calls: its other uses are its sites
    unused = set(names)  # parameters no loss reaches: not even through a site's call
    called: set[str] = set()  # sites called under some loss so far
    first_calls: dict[str, list[tuple[int, ...] | None]] = {}  # the first loss's output shapes per site
    packed: set[str] = set()  # layers run unrolled on a PackedSequence: on the batched path only (`_unpacked`)
    # the batching check's examples, picked from the pool once (the first is batch's, whose gradients are the expanded
    # sites' truth): the check and discovery, given four or fewer, run them all
    pool = batch if pool is None else pool
    examples = select_rows(pool, _checked_rows(pool, losses)) if sites else pool
    for i, loss in enumerate(losses if sites else ()):
        with packed_calls() as on_packed:
            calls, leaked, unreached = discover(module, loss, list(sites.values()), diff, frozen, batch)
        reached = _reached_elsewhere(module, loss, list(sites.values()), diff, frozen, examples, leaked)
        packed |= {path for path, layer in modules.items() if any(layer is m for m, _ in on_packed)}
        first_calls = first_calls or calls
        detached = {n for p, s in sites.items() if calls[p] and s.kind != "expanded" for n in s.names}
        unused &= unreached - detached
        truth.append({n: leaked[n] for s in sites.values() if s.kind == "expanded" for n in s.names})
        for path, site in list(sites.items()):
            if path not in sites:  # dropped with a tied partner
                continue
            if site.kind == "expanded" and calls[path]:
                why = _why_not_expanded(site, calls[path], diff)
                if why:
                    del sites[path]
                    reasons.update({n: why for n in site.names})
                    continue
                sites[path] = site = site._replace(rank=len(calls[path][0] or ()))
            elif calls[path] and not token_wise(modules.get(path), site) and any(s[0] != 1 for s in calls[path]):
                rows = next(s[0] for s in calls[path] if s[0] != 1)
                _drop(sites, site, f"sees {rows} rows for one example (the model merges the batch with another "
                                   f"dimension)", reasons)  # fmt: skip
                continue
            elif (i == 0 or path in idle) and _idle_tied_use(site, sites, calls, reached):
                idle[path] = site
                continue
            elif not calls[path] or path in idle or _leaks(site, reached):
                if calls[path] and path in idle or not calls[path] and path in called:
                    why = "called under one loss and not the other"
                elif site.owner is not None and not calls[path]:
                    why = (
                        "not run unrolled (an unbatched or nested input or bags given by offsets run the fused op)"
                    )
                elif not calls[path] and call_site(modules[path]) is not None:
                    func = call_site(modules[path]).__name__
                    why = f"a layer whose forward did not call `F.{func}` on its own parameters (or was not called)"
                elif not calls[path]:
                    why = "not called as a module"
                else:
                    why = "also used outside the layer (tied weight, direct use or a term of the loss)"
                _drop(sites, site, f"is {why}", reasons)
                continue
            called.add(path)
            rows = rows_of[path] = _rows_per_example(site, calls[path])
            if site.kernel_ok and (factored or _kernel_is_cheaper(site, rows, partners)):
                kernel.add(path)  # a kept Embedding is never materialised on the training side (see TokenRows)
            reasons.update({n: _why_site(site, rows, factored, path in kernel, partners) for n in site.names})
    for path in idle:
        sites.pop(path, None)  # (unless dropped with a partner)
    seq_first = _sequence_first(sites, first_calls, modules)
    fold = _folded_rows(_without(sites, seq_first), first_calls, modules)
    if self_only and factored is not False:
        kernel |= _tied_kept(sites, rows_of, factored, reasons)
    dense = _not_in_sites(names, sites.values())
    unused &= set(dense) if sites else set()
    reasons.update({n: _UNUSED_ON_VMAP for n in unused})  # unless the call is batched (below)
    left = [n for n in dense if n not in unused]
    followed = _followed(module, left, diff) if left and sites and all(map(_batchable, losses)) else {}
    if left and len(followed) == len(left):  # all or none: with one left to vmap(grad), following gains nothing
        sites.update(followed)
        dense = _not_in_sites(names, sites.values())
    if set(dense) - unused:  # vmap(grad) runs anyway: a layer whose gradients would be materialised is cheaper left
        # to it, except an unrolled layer's product (a recurrent layer's fused op has no batching rule: a loop)
        for path, site in list(sites.items()):
            if path not in kernel and site.owner is None:
                del sites[path]
                reasons.update({n: _TO_VMAP for n in site.names})
        dense = _not_in_sites(names, sites.values())
    kernel &= set(sites)
    size = _example_bytes(sites.values(), kernel, rows_of, {}, names, diff)
    plan = Plan(tuple(names), dense, tuple(sites.values()), frozenset(kernel), False, reasons, "", size)
    covered = {n for s in sites.values() for n in s.names}
    uncalled = tuple(p for p, s in idle.items() if set(s.names) <= covered)
    plan = plan._replace(costed=not factored, uncalled=uncalled, fold=fold, seq_first=seq_first)
    if not sites:
        return plan._replace(batching="vmap(grad) over examples: no layer gives factors")
    if set(dense) - unused:
        why = f"vmap(grad) over examples, for {len(set(dense) - unused)} parameter(s) outside factor sites"
        return _unpacked(plan, packed)._replace(batching=why)
    if not all(map(_batchable, losses)):
        why = (
            "vmap(grad) over examples: a tc.ExampleLoss is computed one example at a time (a tc.BatchLoss runs whole "
            "batches, as do tc.causal_lm_loss, tc.seq2seq_lm_loss, tc.sequence_classification_loss and "
            "tc.token_classification_loss for Hugging Face models)"
        )
        return _unpacked(_unexpanded(plan), packed)._replace(batching=why)
    batch_shows = _shows_batching(examples, losses)
    head = scored() if scored is not None and not batch_shows else None
    head_shows = head is not None and _shows_batching(head, losses[:1])

    def checked_on(plan: Plan) -> BatchingCheck:
        if head_shows:  # check the training loss on its data
            return _refused_on(module, losses[0], plan, diff, frozen, head, mapper)
        return _batching_refused(module, losses, plan, {**frozen, **diff}, examples, mapper, truth)

    readings = _readings(plan, sites, first_calls, modules)
    plan, check = readings[0], checked_on(readings[0])
    for reading in readings[1:]:  # fewer layers read sequence-first, while refused
        if not check.reason:
            break
        retried = checked_on(reading)
        if not retried.reason:
            plan, check = reading, retried
    plan = readings[-1] if check.reason else plan  # (the first refusal kept: what the batch shows read as planned)
    if check.reason and plan.fold > 1:  # rows broadcast over a part of the model that does not fold (a context)?
        unfolded = checked_on(plan._replace(fold=1))
        if not unfolded.reason:
            plan, check = plan._replace(fold=1), unfolded
    instead = _followed_instead(module, plan, diff) if check.reason else None
    if instead is not None:  # copies of vectors the layer does not use as planned: its uses followed instead
        retried = checked_on(instead)
        if not retried.reason:
            plan, check = instead, retried
    refused, seen = check.reason, check.seen
    plan = plan._replace(batch_free=frozenset(check.batch_free))
    unchecked = check.unshown if batch_shows or head_shows else "batching"
    shown = check.shown if batch_shows or head_shows else None
    if refused:
        unbatched = _factorless(plan) if check.factorless else _unpacked(_unexpanded(plan), packed)
        return unbatched._replace(batching=f"vmap(grad) over examples: {refused}")
    trimmed = set()
    for site in plan.sites:  # rows of zero output gradient (ignored by the loss) are dropped per batch
        if site.kind != "linear" or site.owner is not None or not _called(seen, site.path):
            continue
        rows, counts = rows_of[site.path], _live_rows_per_example(site, seen[site.path][1])
        live = max(counts)
        if not worth_dropping(live, rows):
            continue
        trimmed.add(site.path)
        # the cost model takes the fewer rows only when every first example has as many, and some: rows the model
        # itself ignores (all but a classifier's token), not padding or a saturated loss, which later batches can fill
        if site.kernel_ok and factored is None and 0 < live == min(counts):
            (kernel.add if _kernel_is_cheaper(site, live, partners) else kernel.discard)(site.path)
            why = f"{_why_site(site, live, factored, site.path in kernel, partners)}: {live} of {rows} rows carry"
            reasons.update({n: f"{why} gradient in each of the first examples" for n in site.names})
    for site in plan.sites if not (factored or self_only) else ():  # token rows pay per matching pair of tokens:
        if site.kind != "embedding" or site.path not in kernel or not _called(seen, site.path):  # how often ids recur
            continue
        matches = _matches_per_pair(_seen_ids(modules, site, seen), site.weight_shape[0])
        kept = _TOKEN_MATCH_COST * matches < site.weight_shape[0]
        if not kept:
            kernel.discard(site.path)
        reasons[site.weight] = _why_token_rows(site, matches, kept)
    used = [n for n in names if n not in unused]
    held = _held_entries(plan.sites, kernel, rows_of, seen, modules)
    size = _example_bytes(plan.sites, kernel, rows_of, held, used, diff)
    reasons.update({n: _UNUSED for n in unused})
    reasons.update({n: _followed_reason(reasons[n]) for s in plan.sites if s.kind == "followed" for n in s.names})
    batching = "one batched forward / backward gives every layer's factors"
    unused_names = tuple(n for n in names if n in unused)
    return plan._replace(batched=True, batching=batching, kernel=frozenset(kernel), trimmed=frozenset(trimmed),
                         example_bytes=size, dense=(), unused=unused_names, unchecked=unchecked,
                         padding_shown=shown)


def _batchable(loss: ExampleLossFn) -> bool:
    """Whether a loss runs whole batches (a criterion, a ``tc.BatchLoss``), not one example at a time."""
    return isinstance(loss, (CriterionLoss, BatchedLoss))


def _followed(module: nn.Module, names: Sequence[str], diff: Tensors) -> dict[str, Site]:
    """A "followed" site per parameter outside factor sites that the model reads directly (a relative-position table
    indexed by a buffer, a layer scale): its uses are followed to where they meet the batch (``_batch_free``), which
    gives each example its gradient in the batched pass; planning's batching check compares them with the first
    examples' own. Not a tensor under several names (tied): the followed copy would stand for one of them only."""
    counts = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    held = {n: p for n, p in module.named_parameters()}
    return {
        n: Site(n, "followed", None, None, tuple(diff[n].shape), others=(n,))
        for n in names
        if n in held and counts[id(held[n])] == 1 and diff[n].is_floating_point()
    }


def _followed_instead(module: nn.Module, plan: Plan, diff: Tensors) -> Plan | None:
    """``plan`` with its "expanded" sites' parameters followed instead (``_followed``), or None when it has none or
    one cannot be. Copies expanded to a layer's output rank fail where the layer uses its vectors at another rank (a
    model's own vector applied to its hidden states, ``[B, T, d]``, the output ``[B, classes]``) or otherwise than
    elementwise; followed, each use is met where it is."""
    expanded = [s for s in plan.sites if s.kind == "expanded"]
    names = [n for s in expanded for n in s.names]
    followed = _followed(module, names, diff) if expanded else {}
    if not names or len(followed) < len(names):
        return None
    return plan._replace(sites=(*(s for s in plan.sites if s.kind != "expanded"), *followed.values()))


def _folded_rows(
    sites: Mapping[str, Site], calls: Mapping[str, list[tuple[int, ...] | None]], modules: Mapping[str, nn.Module]
) -> int:
    """Rows of the batch dimension per example (``Plan.fold``): the one leading size other than 1 of one example's
    sequences (``[C, T, d]``) at token-wise layers, when at least as many calls have it as have 1 (not a few layers run
    once for the whole batch: T5's ``[T, S, H]`` bias); else 1. The batching check refuses a fold that broadcast rows
    then do not fit."""
    sizes = Counter(
        shape[0]
        for path, site in sites.items()
        if token_wise(modules.get(path), site)
        for shape in calls.get(path, ())
        if shape is not None and len(shape) >= 3
    )
    folds = [size for size in sizes if size != 1]
    return folds[0] if len(folds) == 1 and sizes[folds[0]] >= sizes[1] else 1


def _sequence_first(
    sites: Mapping[str, Site], calls: Mapping[str, list[tuple[int, ...] | None]], modules: Mapping[str, nn.Module]
) -> frozenset[str]:
    """Token-wise sites whose every call on one example gave ``[T, 1, ...]`` (the example's batch of one second),
    when some call's ``T`` is other than 1 (a sequence, not a batch-first layer's single row): sequence-first layers,
    which the batching check then checks with their batch dimension second."""
    second = {
        path
        for path, site in sites.items()
        if token_wise(modules.get(path), site)
        and calls.get(path)
        and all(s is not None and len(s) >= 3 and s[1] == 1 for s in calls[path])
    }
    return frozenset(second) if any(s[0] != 1 for path in second for s in calls[path]) else frozenset()


def _readings(
    plan: Plan, sites: Mapping[str, Site], calls: Mapping[str, list[tuple[int, ...] | None]], modules: Mapping
) -> list[Plan]:
    """``plan``, then with fewer sites read sequence-first, for the batching check to try in turn: only those whose
    calls show a sequence (``[1, 1, ...]`` is also a batch-first layer's single row), then none (batch-first, its fold
    from every site)."""
    if not plan.seq_first:
        return [plan]
    sequences = frozenset(p for p in plan.seq_first if any(s[0] != 1 for s in calls[p]))
    fewer = [plan._replace(seq_first=sequences, fold=_folded_rows(_without(sites, sequences), calls, modules))]
    batch_first = plan._replace(seq_first=frozenset(), fold=_folded_rows(sites, calls, modules))
    return [plan, *(fewer if sequences != plan.seq_first else []), batch_first]


def _without(sites: Mapping[str, Site], paths: frozenset[str]) -> dict[str, Site]:
    return {p: s for p, s in sites.items() if p not in paths}


# One gathered row product of a token-rows dot costs about as much as this many multiply-adds of a materialised
# gradient's GEMM (BERT's position embedding, V = 512, every one of T = 32 positions matching: 1.11 s kept as token
# rows, 1.03 s materialised).
_TOKEN_MATCH_COST = 16


def _idle_tied_use(site: Site, sites: Mapping[str, Site], calls: Mapping[str, list], reached: set[str]) -> bool:
    """Whether ``site`` holds only tied tensors and is not called, while other modules holding them are (T5's and
    BART's ``shared`` Embedding, whose tensor the encoder's and decoder's embeddings and the LM head use), and
    nothing else uses them: the called modules' factors then give their whole gradient. (A parameter of its own,
    a bias, would have no site left to give its gradient if a later batch called it.)"""
    if not site.tied or calls[site.path] or _leaks(site, reached):
        return False
    held = {n for p, s in sites.items() if p != site.path and calls[p] for n in s.names}
    return set(site.names) <= held


def _leaks(site: Site, reached: set[str]) -> bool:
    """Whether gradient reaches ``site``'s parameters with its own use detached (``_reached_elsewhere``): another
    use."""
    return not reached.isdisjoint(site.names)


def _reached_elsewhere(
    module: nn.Module, loss: ExampleLossFn, sites: list[Site], diff: Tensors, frozen: Tensors, examples: Any,
    leaked: Tensors,
) -> set[str]:
    """The parameters gradient reaches with every site's own use detached (``leaked``: on the first example) on the
    first example or on the others the batching check runs (``_checked_rows``): another use of a site's parameter may
    give an example no gradient (an empty bag, a feature that is zero: 3-75% off, silently, when only the first
    example was asked)."""
    reached = _reached(leaked)
    rows = [row for row in _checked_rows(examples, [loss]).tolist() if row]  # (the first example's: ``leaked``)
    run = partial(discover, module, loss, sites, diff, frozen)
    if rows and _batchable(loss):  # in one run (summed over those examples, a use's gradients cancel exactly only by
        try:  # construction), unless the model fails on them together: the batching check refuses it then
            return reached | _reached(run(select_rows(examples, torch.tensor(rows)), whole=True)[1])
        except RuntimeError:
            pass
    for row in rows:
        reached |= _reached(run(select_rows(examples, torch.tensor([row])))[1])
    return reached


def _reached(leaked: Tensors) -> set[str]:
    return {n for n, g in leaked.items() if bool(g.ne(0).any())}


def _drop(sites: dict[str, Site], site: Site, why: str, reasons: dict[str, str]) -> None:
    """Remove ``site`` and every other site holding one of its tensors (a tied tensor's gradient sums every use: all
    its uses are sites, or none); ``why`` completes "'path' ..."."""
    for other in [p for p, s in sites.items() if p != site.path and set(s.names) & set(site.names)]:
        reasons.update({n: f"tied to {site.path!r}, which {why}" for n in sites.pop(other).names})
    del sites[site.path]
    reasons.update({n: f"{site.path!r} {why}" for n in site.names})


def _called(seen: Mapping[str, LayerFactors], path: str) -> bool:
    """Whether the first examples run together called the layer at ``path`` (not: a layer the test loss alone calls,
    an expert none of them is routed to)."""
    return bool(seen.get(path, ([], []))[1])


def _live_rows_per_example(site: Site, gs: Sequence[torch.Tensor]) -> list[int]:
    """Each example's rows (over all calls) whose output gradient is not zero: a row the loss ignores (any but the
    token a classifier reads, padding) adds nothing to any gradient."""
    return torch.cat([rows_with_gradient(output_rows(site, g)) for g in gs], 1).sum(1).tolist()


def _matches_per_pair(ids: torch.Tensor, vocab: int) -> float:
    """Mean number of equal (non-padding) id pairs between two different examples of ``ids`` ``[n, T]``, from
    per-example id counts (``[n, V]``: no ``[n, n, T, T]`` comparison for long sequences)."""
    n = ids.shape[0]
    if n < 2:
        return 0.0
    valid = ids >= 0  # padding (-1) matches nothing
    rows = torch.arange(n, device=ids.device)[:, None].expand_as(ids)[valid]
    counts = torch.zeros(n, vocab, dtype=torch.float64, device=ids.device)
    counts.index_put_((rows, ids[valid]), torch.ones_like(rows, dtype=torch.float64), accumulate=True)
    equal = counts @ counts.T  # [n, n]: sum over ids of count_i(v) count_j(v)
    return float((equal.sum() - equal.diagonal().sum()) / (n * (n - 1)))


def _why_not_expanded(site: Site, shapes: Sequence[tuple[int, ...] | None], diff: Tensors) -> str:
    """Why an "expanded" site cannot take copies of its vectors (``""`` when it can, or has rows only): its calls'
    outputs must be tensors of one rank, with a batch dimension and the vectors' dimensions, which sets the copies'
    shape."""
    vectors = [diff[n] for n in site.names if not broadcast_row(diff[n])]
    if not vectors:
        return ""
    if any(s is None for s in shapes):
        return f"{site.path!r} has no factored form, and its output is not a tensor"
    if len({len(s) for s in shapes}) == 1 and len(shapes[0]) > max(v.dim() for v in vectors):
        return ""
    return f"{site.path!r} has no factored form, and its outputs {[list(s) for s in shapes]} have no one batched rank"


def _factorless(plan: Plan) -> Plan:
    """The plan for vmap(grad) over examples of every parameter: no layer's factors (rows whose examples vary per
    example, which factors planned on one example cannot follow)."""
    why = "vmap(grad) for every parameter: a layer's rows are not each example's own (see the batching)"
    reasons = {**plan.reasons, **{n: why for s in plan.sites for n in s.names}}
    return plan._replace(sites=(), kernel=frozenset(), dense=plan.names, reasons=reasons, seq_first=frozenset())


def _unpacked(plan: Plan, packed: Collection[str]) -> Plan:
    """``plan`` off the batched path, without the products of the ``packed`` layers (run on a PackedSequence, whose
    unrolled steps are as many as each example's length): their parameters join the dense ones (the fused op)."""
    why = "runs on a PackedSequence, unrolled on the batched path only (steps differ per example)"
    return _to_dense(plan, [s for s in plan.sites if s.owner in packed], lambda site: f"{site.owner!r} {why}")


def _unexpanded(plan: Plan) -> Plan:
    """The plan for vmap(grad) over examples: "expanded" sites' parameters join the dense ones (their copies need
    the batched pass), "followed" ones too (with the reason they are outside factor sites), and so do the layers that
    would be materialised, as when planned with dense parameters."""
    batched_only = ("expanded", "followed")
    if not any(s.kind in batched_only for s in plan.sites):
        return plan
    left = [s for s in plan.sites if s.kind in batched_only or (s.path not in plan.kernel and s.owner is None)]

    def why(site: Site) -> str:
        if site.kind == "expanded":
            return "copies expanded over the batch need the batched pass"
        return plan.reasons[site.path] if site.kind == "followed" else _TO_VMAP

    return _to_dense(plan, left, why)


def _to_dense(plan: Plan, left: Sequence[Site], why: Callable[[Site], str]) -> Plan:
    """``plan`` without the sites ``left``, whose parameters join the dense ones (each site's reason: ``why``)."""
    if not left:
        return plan
    names = {n for s in left for n in s.names}
    dense = tuple(n for n in plan.names if n in names or n in plan.dense)
    reasons = {**plan.reasons, **{n: why(site) for site in left for n in site.names}}
    return plan._replace(sites=tuple(s for s in plan.sites if s not in left), dense=dense, reasons=reasons)


def _why_token_rows(site: Site, matches: float, kept: bool) -> str:
    vocab, cost = site.weight_shape[0], _TOKEN_MATCH_COST
    seen = f"{matches:.1f} equal ids per pair of the first examples"
    if kept:
        return f"Embedding: test gradients kept as token rows ({seen}, {cost} x {matches:.1f} < V = {vocab})"
    return f"Embedding: {seen}: {cost} x {matches:.1f} >= V = {vocab}, materialising costs less"


def _tied_kept(
    sites: Mapping[str, Site], rows: Mapping[str, int], factored: bool | None, reasons: dict[str, str]
) -> set[str]:
    """Paths of tied-weight uses that a self-influence plan keeps as factors (``_representations.Tied``): every use
    a bias-free Linear or an Embedding, and, for ``factored=None``, the products of all pairs of uses cheaper than
    materialising each use and the norm of their sum."""
    groups: dict[str, list[Site]] = {}
    for site in sites.values():
        if site.tied and site.path in rows:
            groups.setdefault(site.weight, []).append(site)
    kept = set()
    for weight, uses in groups.items():
        if any(u.kind not in ("linear", "embedding") or u.bias is not None or u.owner is not None for u in uses):
            continue
        r, c = uses[0].weight_shape
        t = {u.path: rows[u.path] for u in uses}
        row_width = {(u.path, v.path): r if u.kind == v.kind == "linear" else 1 for u in uses for v in uses}
        pairs = sum(t[u] * t[v] * (c + width) for (u, v), width in row_width.items())
        materialised = sum((t[u.path] if u.kind == "linear" else 1) * r * c for u in uses) + r * c
        if factored or pairs < materialised:
            kept.update(u.path for u in uses)
            sign = "" if factored else f": {pairs} < materialising each use and the norm of their sum, {materialised}"
            reasons[weight] = f"tied weight, every use's factors and the products between uses{sign}"
    return kept


def _example_bytes(
    sites: Iterable[Site], kernel: Collection[str], rows: Mapping[str, int], held: Mapping[str, int],
    names: Sequence[str], diff: Tensors,
) -> int:
    """Bytes one example's representation holds until its batch is scored: ``T (d_in + d_out)`` factor entries per
    kernel site (``T (1 + d)`` for an Embedding: an id and an output gradient row), the entries ``held`` by other
    sites where those are not their gradients (``_held_entries``), a per-sample gradient of every other parameter."""
    kept = [site for site in sites if site.path in kernel]
    widths = [1 + site.weight_shape[-1] if site.kind == "embedding" else sum(_widths(site)) for site in kept]
    factors = sum(rows[site.path] * width for site, width in zip(kept, widths)) + sum(held.values())
    covered = {n for site in sites if site.path in kernel or site.path in held for n in site.names}
    per_sample = sum(diff[n].numel() for n in names if n not in covered)
    return (factors + per_sample) * next(iter(diff.values())).element_size() if diff else 0


def _held_entries(
    sites: Iterable[Site], kernel: Collection[str], rows: Mapping[str, int], seen: Mapping[str, LayerFactors],
    modules: Mapping[str, nn.Module],
) -> dict[str, int]:
    """Entries per example that sites outside the kernel hold until their batch is scored (``_assemble``), where
    those are not their gradients: an untied Linear's factors, ``T (d_in + d_out)`` (formed when scored:
    ``Deferred``), and an untied Embedding's rows, ``U d``, where every first example reads the same ``U`` ids
    (positions: materialised on the rows a batch's ids touch, which elsewhere grow with the batch, up to the whole
    table). A convolution's factors (its input and output gradient) may outgrow its gradient: counted as that."""
    held = {}
    for site in sites:
        if site.path in kernel or site.tied:
            continue
        if site.kind == "linear":
            held[site.path] = rows[site.path] * sum(_widths(site))
        elif site.kind == "embedding" and _called(seen, site.path):
            shared = _shared_ids(_seen_ids(modules, site, seen))
            if shared is not None:
                held[site.path] = shared * site.weight_shape[-1]
    return held


def _seen_ids(modules: Mapping[str, nn.Module], site: Site, seen: Mapping[str, LayerFactors]) -> torch.Tensor:
    """``[n, T]``: the ids an Embedding site read on the first examples the batching check ran (-1: padding)."""
    return torch.cat([input_rows(site_layer(modules, site), site, x) for x in seen[site.path][0]], 1)


def _shared_ids(ids: torch.Tensor) -> int | None:
    """How many ids each row of ``ids`` ``[n, T]`` reads (padding, -1, aside) where every row reads the same ones,
    else None."""
    sets = [torch.unique(row[row >= 0]) for row in ids]
    return len(sets[0]) if all(torch.equal(s, sets[0]) for s in sets) else None


def _why_dense(module: nn.Module | None, name: str, factored: bool | None) -> str:
    if factored is False:
        return "factored=False"
    if module is None:
        return "the model is a function: it has no layers to factor"
    if global_hooks_present():
        return "global module hooks are registered: no layer is provably plain"
    owner = dict(module.named_modules()).get(name.rpartition(".")[0])
    if owner is None:
        return "not a parameter of a layer"
    if site_kind(owner) is not None:
        return "its tensor is shared with a module that is not a factor site (weight tying)"
    if isinstance(owner, UNROLLED_KINDS):
        return why_not_run_unrolled(owner) or "the layer shares a parameter with another module (weight tying)"
    return why_not_a_site(owner)


def _why_site(site: Site, rows: int, factored: bool | None, kernel: bool, partners: int | None) -> str:
    if site.owner is not None:
        key = site.path.rpartition(".")[2]
        plain = _why_site(site._replace(owner=None), rows, factored, kernel, partners)
        if key == ATTENTION_PRODUCT:
            return f"unrolled attention, in-projection: {plain}"
        if key == BAG_PRODUCT:
            return f"unrolled EmbeddingBag, lookup: {plain}"
        product = "input-to-hidden" if key.startswith("ih") else "hidden-to-hidden"
        return f"unrolled recurrent layer, {product} product: {plain}"
    if site.tied:
        return "tied weight: per-example gradients of every use from factors, summed"
    if site.kind == "expanded":
        return "expanded: per-example gradients of copies over the batch (a vector used elementwise, a [1, ...] row)"
    if site.reparam:
        return "parametrized weight: per-example gradients of the weight from factors, then through its parametrization"
    if not site.kernel_ok:
        return "grouped convolution: per-example gradients from factors" if site.groups > 1 else "norm layer"
    if factored:
        return "factored=True"
    if site.kind == "embedding":
        vocab, ratio = site.weight_shape[0], _TOKEN_ROWS_MIN_RATIO
        if kernel:
            return f"Embedding: test gradients kept as token rows (V = {vocab} >= {ratio} T, T = {rows})"
        return f"Embedding: V = {vocab} < {ratio} T (T = {rows}): ids recur densely, materialising costs less"
    factored_cost, materialised_cost = _pair_costs(site, rows, partners)
    sign = "<" if kernel else ">="
    if partners is None or partners == 1:
        products, materialised = "T^2 (d_in + d_out)", "d_in d_out" if partners is None else "(T + 1) d_in d_out"
        sizes = f"T = {rows}"
    else:
        products, materialised, sizes = "P T^2 (d_in + d_out)", "(T + P) d_in d_out", f"T = {rows}, P = {partners}"
    return f"{products} = {factored_cost} {sign} {materialised} = {materialised_cost} ({sizes})"


def _not_in_sites(names: Sequence[str], sites: Iterable[Site]) -> tuple[str, ...]:
    in_sites = {n for site in sites for n in site.names}
    return tuple(n for n in names if n not in in_sites)


LayerFactors = tuple[list[torch.Tensor], list[torch.Tensor]]  # one layer's inputs and output gradients, per call


class BatchingCheck(NamedTuple):
    reason: str  # why batching is refused, or ""
    seen: dict[str, LayerFactors]  # each site's factors on the first examples (also where refused on compared numbers)
    batch_free: tuple[str, ...] = ()  # sites run once for the whole batch (``Plan.batch_free``), when not refused
    factorless: bool = False  # refused so that no layer's factors can be taken per example either
    # what the examples could not show: "lengths" (of one length, padded alike: whether the model reads the padding a
    # longer example adds) or "packed" (packed sequences of one length); "" nothing
    unshown: str = ""
    shown: tuple[tuple[tuple[str, str], tuple[int, int]], ...] | None = None  # ``_range``s of ``padding``'s columns
    rounding: bool = False  # refused on a comparison of numbers, which float rounding may have failed


_WIDE_CHECK_BYTES = 4 << 30  # the most a float64 copy of the state may take for the check asked again in float64


def _unbatchable(err: Unbatchable, vary: bool = False) -> BatchingCheck:
    """The refusal ``err`` raised; ``vary``: the examples alone call some layer differently (a mixture of experts
    routing them by ``topk``, which the batch-order watch refuses too), so that no layer may take factors."""
    return BatchingCheck(err.reason, {}, factorless=err.factorless or vary)


def _vary_alone(alone: Sequence[Mapping[str, LayerFactors]]) -> bool:
    """Whether examples run alone call a layer a different number of times or on rows of other shapes."""
    return any(_concat_examples([one[path] for one in alone]) is None for path in alone[0])


def _batching_refused(
    module: nn.Module,
    losses: Sequence[BatchableLoss],
    plan: Plan,
    state: Tensors,
    batch: Any,
    mapper: Mapper,
    truth: Sequence[Mapping[str, torch.Tensor]],
) -> BatchingCheck:
    """Why a batched forward does not give each example the factors it gets alone (examples interact), or ``""``,
    and each site's inputs and output gradients on the first examples run together (per call).

    Each layer's inputs and output gradients on the first examples run together must equal theirs run one at a
    time: this refuses batch statistics and any other mixing of examples, and accepts rows the model computes once
    and broadcasts over the batch (position ids ``[1, T]``), which get a row per example (``batched_factors``).
    An "expanded" site's copies must also give the first example its true gradient (``truth``, per loss). A layer
    that gives as many factors for the first examples together as for the first alone runs once for the whole
    batch: the examples run together again with its output followed to the batch (``batch_free``).

    A refusal on compared numbers is checked again in float64 when the state is of lower precision: the batched and
    the lone runs round differently, which can flip a max-pool's or a ReLU's choice (ResNet-18 in float32: 0.5% of
    one example's output gradient at its first convolution, the others within 1e-6), as no mixing of examples does.
    Tensors the forward makes are widened too (``_Widened``), and float64 decides only where the model computes alike
    in both (``_computes_alike``). Not for a state whose float64 copy would take more than
    ``_WIDE_CHECK_BYTES``: its refusal stands.
    """
    check = _compared(module, losses, plan, state, batch, mapper, truth)
    if not check.rounding:
        return check
    floating = [t for t in state.values() if t.is_floating_point()]
    narrow = floating[0].dtype if floating else torch.float64
    check = check._replace(reason=check.reason + tf32_note(floating[0].device if floating else None, narrow))
    if narrow == torch.float64 or 8 * sum(map(torch.numel, floating)) > _WIDE_CHECK_BYTES:
        return check
    try:  # (no float64 on some devices, or a model's own low-precision tensors meeting float64 ones: it stands)
        wide_state, wide_batch, wide_truth = _floating_as(torch.float64, (state, batch, truth))
        with _Widened():
            wide = _compared(module, losses, plan, wide_state, wide_batch, mapper, wide_truth)
        states, batches = (state, wide_state), (batch, wide_batch)
        same = not wide.reason and _computes_alike(losses, states, batches, check.seen, wide.seen)
    except (RuntimeError, TypeError, ValueError):
        return check
    return wide._replace(seen=_floating_as(narrow, wide.seen)) if same else check


def tf32_note(device: torch.device | None, dtype: torch.dtype) -> str:
    """Why a float32 comparison on a GPU may fail by rounding alone: TF32 products (10 bits of mantissa, PyTorch's
    default for cuDNN convolutions), whose rounding differs between batched and lone runs far beyond float32's. On an
    H200, ResNet-18 and the MobileNet-style net left the batched path with it and stayed batched without it (their
    influence 1.25-1.31 s against 0.80-0.83 s, 0.91-1.31 s against 0.46-0.49 s); ``""`` where it does not apply."""
    if device is None or device.type != "cuda" or dtype != torch.float32:
        return ""
    on = [flag for flag, value in (("torch.backends.cudnn.allow_tf32", torch.backends.cudnn.allow_tf32),
                                   ("torch.backends.cuda.matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32))
          if value]  # fmt: skip
    if not on:
        return ""
    return (
        f". TF32 is on ({' and '.join(f'`{flag}`' for flag in on)}): its rounding, about 1e-3, differs between a batch "
        f"and an example alone, which this check cannot tell from examples interacting; set "
        f"{' and '.join(f'`{flag} = False`' for flag in on)} for full float32 products and the batched path"
    )


def _computes_alike(
    losses: Sequence[BatchableLoss],
    states: Any,
    batches: Any,
    own: Mapping[str, LayerFactors],
    wide: Mapping[str, LayerFactors],
) -> bool:
    """Whether the model computes the same in float64 as in its own precision: every layer's inputs (``own``, ``wide``:
    each layer's factors on the checked examples run together, as the two checks saw them) and its outputs (a
    criterion's inputs, a ``tc.BatchLoss``'s losses) close in both. A model whose semantics depend on the dtype
    (padding found as ``torch.finfo(x.dtype).min``, a branch on ``x.dtype``, also after its last layer) would
    otherwise be judged on what it does in float64 only (85% and 254% off, silently, before this check); a
    max-pool's flipped choice leaves them alike (a near-tie)."""
    rows = _checked_rows(batches[0], losses)
    own_out = _outputs(losses[0], states[0], select_rows(batches[0], rows))
    with _Widened():
        wide_out = _outputs(losses[0], states[1], select_rows(batches[1], rows))
    pairs = [(xs, wide[path][0]) for path, (xs, _) in own.items()] + [(own_out, wide_out)]
    return all(
        len(mine) == len(theirs) and all(map(_close_rows, mine, [t.to(m.dtype) for m, t in zip(mine, theirs)]))
        for mine, theirs in pairs
    )


def _outputs(loss: BatchableLoss, state: Tensors, batch: Any) -> list[torch.Tensor]:
    """The model's floating outputs on ``batch`` (a criterion's inputs), or a ``tc.BatchLoss``'s losses."""
    with torch.no_grad():
        if isinstance(loss, BatchedLoss):
            return [loss.per_example(state, batch)]
        out = loss.forward(state, *batch[:-1])
    return floating_leaves(out)


def _floating_as(dtype: torch.dtype, tree: Any) -> Any:
    """``tree`` with its floating tensors cast to ``dtype``."""
    return optree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


class _Widened(TorchFunctionMode):
    """Floating tensors of a lower precision widened to float64 as ops make them: a forward that casts its input
    (``x.float() / 255``, a one-hot made float) or makes tensors of the default dtype (``torch.zeros`` states) runs
    in float64 throughout. (The cast still rounds, but elementwise: alike in a batch and alone.)"""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return _floating_as(torch.float64, func(*args, **(kwargs or {})))  # (a float64 tensor: itself)


def _compared(
    module: nn.Module,
    losses: Sequence[BatchableLoss],
    plan: Plan,
    state: Tensors,
    batch: Any,
    mapper: Mapper,
    truth: Sequence[Mapping[str, torch.Tensor]],
) -> BatchingCheck:
    """``_batching_refused`` at the state's own precision."""
    few = select_rows(batch, _checked_rows(batch, losses))
    n = num_examples(few)
    # together: the first examples and a copy of the first after them (two: both twice, or reversing them would
    # leave the batch as it was). A model ordering its batch by an order made outside torch (Python's `sorted`),
    # unseen by the batch-order watch, may find the first examples in order already, but never these, whose keys are
    # not monotone unless all equal: its rows then land on other examples
    order = {1: [0], 2: [0, 1, 0, 1]}.get(n, [*range(n), 0])

    def together_in(loss: BatchableLoss, plan: Plan, order: list[int]) -> tuple[dict[str, LayerFactors], list]:
        with packed_calls() as on_packed:
            rows = select_rows(few, torch.tensor(order))
            return batched_factors(module, loss, plan, state, rows, mapper, refuse_recomputing=True), on_packed
    seen: dict[str, LayerFactors] = {}
    unshown, shown = "", None
    expanded = [s for s in plan.sites if s.kind == "expanded"]
    linear = {s.path for s in plan.sites if s.kind == "linear"}
    for loss, true in zip(losses, truth):
        try:
            alone = [batched_factors(module, loss, plan, state, one, mapper) for one in _singles(few, n)]
        except RuntimeError as err:  # copies of an "expanded" site's parameters break a shape the layer assumes, a
            if isinstance(err, Unbatchable):  # followed output meets the batch in a way not followed, or factors
                return _unbatchable(err)  # cannot be taken
            if not expanded and not plan.follows:
                raise
            ways = (("parameters copied over the batch", expanded), ("uses followed to the batch", plan.follows))
            what = " and ".join(way for way, taken in ways if taken)
            return BatchingCheck(f"a forward with {what} failed ({_cause(err)})", {})
        try:
            together, on_packed = together_in(loss, plan, order)
        except RuntimeError as err:  # e.g. a broadcast row given a row per example breaks a shape the model assumes,
            if isinstance(err, Unbatchable):  # or the copies an order the model asks of its batch (packing with
                return _unbatchable(err, _vary_alone(alone))  # `enforce_sorted=True`): the examples as given, then
            try:
                order = list(range(n))
                together, on_packed = together_in(loss, plan, order)
            except RuntimeError:
                return BatchingCheck(f"a batched forward failed where examples alone ran ({_cause(err)})", {})
        # what shows padding in the data (each mask, each tensor's ends) shows it as far as it varies, packed too (a
        # second input the model cuts to the batch's longest)
        shown = tuple(_ranges(padding(_inputs(few, losses))).items())
        # examples of one length (packed, or padded alike) cannot show whether the model reads the padding a longer
        # example adds (`pad_packed_sequence` pads to the batch's longest), nor an order by length: exact, no proof
        if on_packed and (n < 2 or all(map(_alike, _packed_lengths(on_packed, n)))):  # (one may be fixed)
            unshown = "packed"
        else:
            unshown = "lengths" if any(low == high for _, (low, high) in shown) else ""
        for site in expanded:
            if not all(map(_close, (g[0] for g in alone[0][site.path][1]), (true[name] for name in site.names))):
                return BatchingCheck(
                    f"copies of {site.path!r}'s parameters expanded over the batch did not give the first example "
                    f"its gradient (the layer does not use them elementwise or broadcast over the batch)",
                    _kept_on_refusal(seen, together, n),
                    rounding=True,
                )
        batch_free = [
            path  # as many elements for the first examples as for the first alone
            for path, (xs, gs) in together.items()
            if n > 1 and xs and list(map(torch.numel, xs + gs)) == list(map(torch.numel, sum(alone[0][path], [])))
        ]
        if batch_free:  # run again with their outputs followed to where they meet the batch (``_batch_free``); alone,
            # an example's factors there are its own (a token-wise layer's rows get the example dimension, ``[1, T S]``)
            plan = plan._replace(batch_free=plan.batch_free | frozenset(batch_free))
            try:
                together = together_in(loss, plan, order)[0]
            except RuntimeError as err:
                return BatchingCheck(
                    f"{batch_free[0]!r} runs once for the whole batch (its input has no batch dimension, like T5's "
                    f"relative position bias, which every example then adds), and following its output to the batch "
                    f"failed ({_cause(err)})",
                    {},
                )
        ordered = [alone[i] for i in order]  # each row of the examples together, run alone
        alike = {path: _concat_examples([a[path] for a in ordered]) for path in together}
        for path, singles in alike.items():
            if singles is None and not (path in linear and _same_live_rows(ordered, together, path)):
                unlike = (
                    ", and run together they change its rows of nonzero output gradient (examples interact, or the "
                    "model reorders its batch by an order made outside torch, such as Python's `sorted`)"
                    if path in linear
                    else ""
                )
                return BatchingCheck(  # (the per-example path's factors are planned once too: every gradient dense)
                    f"layer {path!r} runs another number of times, or on other numbers of rows, for each of the first "
                    f"examples alone, which factors planned on one example cannot follow{unlike}",
                    {},
                    factorless=True,
                )
        for path, (xs, gs) in together.items():
            singles = alike[path]
            per_example = all(t.shape[0] == len(order) for t in xs + gs)  # not: rows that did not split into examples
            same = singles is None or len(singles) == len(xs) + len(gs) and all(  # (None: its live rows are, above)
                map(_close_rows, singles, [*xs, *gs])
            )
            if not (per_example and (same or path in linear and _same_live_rows(ordered, together, path))):
                return BatchingCheck(
                    f"a batched forward changed the first examples' factors at {path!r} (examples interact, e.g. "
                    f"through batch statistics; the model reorders its batch by an order made outside torch, such "
                    f"as Python's `sorted`; or the layer's input holds the batch in a dimension other than the "
                    f"first, or the second in every call: sequence-first)",
                    _kept_on_refusal(seen, together, n),
                    rounding=True,
                )
            seen.setdefault(path, _first_rows((xs, gs), n))
    return BatchingCheck("", seen, tuple(plan.batch_free), unshown=unshown, shown=shown)


def _first_rows(factors: LayerFactors, n: int) -> LayerFactors:
    """A layer's factors of the first ``n`` rows of the examples run together (not the copy after them)."""
    xs, gs = factors
    return [x[:n] for x in xs], [g[:n] for g in gs]


def _kept_on_refusal(seen: dict[str, LayerFactors], together: Mapping[str, LayerFactors], n: int) -> dict:
    """What a refusal on compared numbers keeps for ``_computes_alike``: each layer's factors on the first examples
    run together, the first loss's where it has them (as a check that passes keeps them)."""
    return {**{path: _first_rows(factors, n) for path, factors in together.items()}, **seen}


def _checked_rows(batch: Any, losses: Sequence[BatchableLoss]) -> torch.Tensor:
    """The examples of ``batch`` a check runs: four at most, in the batch's order (packing with
    ``enforce_sorted=True`` needs a batch sorted by length to stay sorted). Four or fewer are taken as given: the
    planning head, planning's own picks (``make_plan``), or a re-check's, which may differ only in a tensor narrower
    than the widest (captions of one image), and a copy adds nothing to miss."""
    n = num_examples(batch)
    picked = distinct_examples(_inputs(batch, losses), 4) if n > 4 else []
    return torch.tensor(sorted(picked) if len(picked) > 1 else range(min(4, n)))


def _refused_on(
    module: nn.Module, loss: BatchableLoss, plan: Plan, diff: Tensors, frozen: Tensors, batch: Any, mapper: Mapper
) -> BatchingCheck:
    """``_batching_refused`` for one loss on ``batch`` (its "expanded" sites' truth too), other data than the plan was
    made on (training examples, when it was made on a single test example)."""
    truth = [_true_expanded(module, loss, plan, diff, frozen, batch)]
    return _batching_refused(module, [loss], plan, {**frozen, **diff}, batch, mapper, truth)


def _true_expanded(
    module: nn.Module, loss: ExampleLossFn, plan: Plan, diff: Tensors, frozen: Tensors, batch: Any
) -> dict[str, torch.Tensor]:
    """The first example's true gradients of the "expanded" sites' parameters (discovery on ``batch``)."""
    names = [n for s in plan.sites if s.kind == "expanded" for n in s.names]
    sites = [s for s in plan.sites if s.kind != "followed"]  # (a parameter, not a layer to hook)
    leaked = discover(module, loss, sites, diff, frozen, batch)[1] if names else {}
    return {n: leaked[n] for n in names}


def _inputs(batch: Any, losses: Sequence[ExampleLossFn]) -> Any:
    """What the model reads of ``batch``: a criterion's batch less its target (which may be the widest tensor: soft
    labels), any other batch whole."""
    criteria = all(isinstance(loss, CriterionLoss) for loss in losses)
    return batch[:-1] if criteria and isinstance(batch, (tuple, list)) and len(batch) > 1 else batch


def _shows_batching(batch: Any, losses: Sequence[ExampleLossFn]) -> bool:
    """Whether ``batch`` holds examples whose inputs differ: run together, equal ones get what one alone gets."""
    return len(distinct_examples(_inputs(batch, losses), 2, widest_only=True)) > 1


def _singles(batch: Any, n: int) -> list[Any]:
    return [slice_batch(batch, i, i + 1) for i in range(n)]


def _cause(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip()}"


def _concat_examples(factors: Sequence[LayerFactors]) -> list[torch.Tensor] | None:
    """One layer's inputs then output gradients per call, concatenated over examples that were run alone; None
    when the examples called the layer a different number of times or with different shapes."""
    if len({len(xs) for xs, _ in factors}) > 1:
        return None
    per_call = list(zip(*(xs + gs for xs, gs in factors)))
    if any(t.shape[1:] != ts[0].shape[1:] for ts in per_call for t in ts):
        return None
    return [torch.cat(ts) for ts in per_call]


def _same_live_rows(
    alone: Sequence[Mapping[str, LayerFactors]], together: Mapping[str, LayerFactors], path: str
) -> bool:
    """Whether Linear-like layer ``path`` gives each example the same rows of nonzero output gradient (and their
    inputs), alone and together: the batch may add rows of zero gradient, as the steps past an example's end that a
    packed sequence's longest example makes every example run (their state held)."""
    xs, gs = together[path]
    if len(xs) != len(gs) or any(t.shape[0] != len(alone) for t in xs + gs):
        return False
    pairs = [(_live_rows(one[path], 0), _live_rows((xs, gs), i)) for i, one in enumerate(alone)]
    return all(
        a is not None and t is not None and len(a) == len(t) and all(map(_close, a, t))  # (each on its own scale)
        for a, t in pairs
    )


def _live_rows(factors: LayerFactors, i: int) -> list[torch.Tensor] | None:
    """Batch row ``i``'s rows of a Linear-like layer's inputs, then of its output gradients, per call that has any,
    less the rows of zero output gradient (which add nothing to any gradient); None for other layers."""
    xs, gs = [], []
    for x, g in zip(*factors):
        x, g = x[i], g[i]
        if x.shape[:-1] != g.shape[:-1] or not x.is_floating_point():
            return None
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        live = rows_with_gradient(g[None])[0]
        if live.any():
            xs.append(x[live])
            gs.append(g[live])
    return xs + gs


def _close_rows(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``_close`` for each row (example) on its own scale; non-finite entries where both have them alike (a model
    whose loss is NaN for an example, alone too: the call then names it, not an interaction)."""
    if x.shape != y.shape or x.dtype != y.dtype or torch.equal(x, y):
        return x.shape == y.shape and x.dtype == y.dtype
    if not x.is_floating_point():
        return False
    err, scale = (x - y).abs().reshape(len(x), -1).amax(1), y.abs().reshape(len(y), -1).amax(1)
    if bool((err <= 1e-4 * scale).all()):
        return True
    alike = (x == y) | x.isnan() & y.isnan()
    if bool(y.isfinite().all()) or not bool(alike[~y.isfinite()].all()):
        return False
    err = torch.where(alike, 0, x - y).abs().reshape(len(x), -1).amax(1)
    return bool((err <= 1e-4 * y.nan_to_num(0, 0, 0).abs().reshape(len(y), -1).amax(1)).all())


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float rounding (a batched GEMM may sum in another order), relative to the largest entry."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.is_floating_point() or torch.equal(x, y):
        return torch.equal(x, y)
    return bool((x - y).abs().max() <= 1e-4 * y.abs().max())


def last_layer_params(
    module: nn.Module, loss: ExampleLossFn, state: Tensors, batch: Any, aliases: Mapping[str, str]
) -> list[str]:
    """Parameter names of the last ``nn.Linear`` called when computing the loss of the first example of ``batch``.

    A tied weight (``aliases``: e.g. GPT-2's ``lm_head.weight``, the token embedding's) is refused: its gradient
    includes the other uses of the shared tensor, so "the last layer's" gradient is not defined by that layer.
    """
    linears = {path: m for path, m in module.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []

    def hook_for(path: str) -> Hook:
        def hook(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            order.append(path)

        return hook

    with torch.no_grad(), leaving_no_trace(module), hooked(module, {path: hook_for(path) for path in linears}):
        loss(state, slice_batch(batch, 0, 1))
    if not order:
        raise ValueError("`method='last_layer'` found no nn.Linear called by the model; select `layers=` instead.")
    prefix = f"{order[-1]}." if order[-1] else ""
    names = [prefix + name for name, _ in linears[order[-1]].named_parameters()]  # a parametrized weight's tensors
    tied = [n for n in names if n in aliases]
    if tied:
        owner = aliases[tied[0]]
        raise ValueError(
            f"`method='last_layer'`: the last nn.Linear {order[-1]!r} shares its weight {tied[0]!r} with {owner!r} "
            f"(weight tying), whose gradient sums every use of the shared tensor. Score that tensor exactly with "
            f"`params=[{owner!r}]` (or add the layer's other parameters) and the default `method='exact'`."
        )
    return names
