"""The batching check: whether one batched forward / backward gives each example the factors it gets run alone, so
that a model mixing a batch's examples (batch statistics, a sort, padding read across examples) is never scored
batched. Planning checks a few first examples (``batching_refused``); a batch that shows what they could not (padding
beyond their range, packed sequences of other lengths) is checked on examples of its own (``checking_batches``);
and each batch's spot check runs one of its examples alone (``spot_check``). ``docs/batching_check.md`` tells why
each part is there and what it cannot see."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache, partial
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._assemble import RepresentationFn, representation_fn, rows_with_gradient
from ._capture import (
    SORTED_BATCH,
    BatchableLoss,
    LayerFactors,
    Unbatchable,
    Witness,
    batched_factors,
    discover,
    gradients_at,
)
from ._checkpoints import same_values
from ._context import lowered_note
from ._data import distinct_examples, examples_in, padding, select_rows, slice_batch, uncopied_rows
from ._encoders import ENCODERS, on_traced_path
from ._grads import Mapper, Tensors, in_dynamo
from ._layers import Site
from ._loss import BatchedLoss, CriterionLoss, ExampleLossFn, batch_losses, floating_leaves
from ._recurrent import packed_calls
from ._representations import Representation
from ._state import as_found
from ._validate import cause_of, in_model_code, refusal

if TYPE_CHECKING:
    from ._plan import Plan


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
    # refused on a layer's numbers: the reason to give once the refusal stands, named otherwise where the examples,
    # each run as two copies of itself, get the batch's factors there (``_copied_alike``: its runs only then)
    named: Callable[[str], str] | None = None


_WIDE_CHECK_BYTES = 4 << 30  # the most a float64 copy of the state may take for the check asked again in float64


def _unbatchable(err: Unbatchable, vary: bool = False) -> BatchingCheck:
    """The refusal ``err`` raised; ``vary``: the examples alone call some layer differently (a mixture of experts
    routing them by ``topk``, which the batch-order watch refuses too), so that no layer may take factors."""
    return BatchingCheck(err.reason, {}, factorless=err.factorless or vary)


def _vary_alone(alone: Sequence[Mapping[str, LayerFactors]]) -> bool:
    """Whether examples run alone call a layer a different number of times or on rows of other shapes."""
    return any(_concat_examples([one[path] for one in alone]) is None for path in alone[0])


def _vary_plainly(
    module: nn.Module, loss: BatchableLoss, plan: Plan, state: Tensors, few: Any, n: int, mapper: Mapper
) -> bool:
    """``_vary_alone`` for the first examples run alone with the plan's plain sites only (its parameters copied over
    the batch, or followed to it, left out: a forward with them failed), where it tells whether any layer may take
    factors on the vmap path: a recurrent cell stepped as often as the batch's longest example says, beside a raw
    parameter met in a `cat`, kept its factors, planned on the first example, and later examples were refused (a
    review helper's). False where they fail alone too."""
    if n < 2:  # (one example: nothing to vary)
        return False
    layers = dict(module.named_modules())

    def kept(site: Site) -> bool:  # (a recurrent layer's products are the batched path's only where it is fed packed
        fused = isinstance(layers.get(site.owner), nn.RNNBase)  # sequences, which the vmap path runs fused; a cell's
        return site.kind not in ("expanded", "followed") and not fused  # are stepped there too)

    plain = plan._replace(sites=tuple(filter(kept, plan.sites)), batch_free=frozenset())
    try:
        alone = [batched_factors(module, loss, plain, state, one, mapper) for one in _singles(few, n)]
    except Exception:  # (the vmap path meets it again, named there)
        return False
    return _vary_alone(alone)


def batching_refused(
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
    check = check._replace(reason=check.reason + lowered_note(floating[0].device if floating else None, narrow))
    if narrow == torch.float64 or 8 * sum(map(torch.numel, floating)) > _WIDE_CHECK_BYTES:
        return _named(check)
    try:  # (no float64 on some devices, or a model's own low-precision tensors meeting float64 ones: it stands)
        wide_state, wide_batch, wide_truth = _floating_as(torch.float64, (state, batch, truth))
        with _Widened():
            wide = _compared(module, losses, plan, wide_state, wide_batch, mapper, wide_truth)
        states, batches = (state, wide_state), (batch, wide_batch)
        same = not wide.reason and _computes_alike(losses, states, batches, check.seen, wide.seen)
    except (RuntimeError, TypeError, ValueError):
        return _named(check)
    if same:
        return wide._replace(seen=_floating_as(narrow, wide.seen))
    if not wide.reason:  # (alike in float64, but the model computes otherwise there: rounding cannot be told apart)
        check = check._replace(reason=check.reason + _UNLIKE_IN_FLOAT64.format(dtype=str(narrow).replace("torch.", "")))
    return _named(check)


_UNLIKE_IN_FLOAT64 = (
    "; run again in float64, the first examples got the same factors batched and alone, but the model computes "
    "otherwise in float64 than in {dtype} (its outputs or a layer's inputs more than 1e-4 apart: a model that "
    "sensitive to rounding, or one branching on its dtype, `torch.finfo(x.dtype)`), so {dtype} rounding cannot be "
    "told from examples interacting here; a model computing the same function in float64 (no such branch) takes the "
    "batched path with `dtype=torch.float64`"
)


def _named(check: BatchingCheck) -> BatchingCheck:
    """A refusal that stands, with the reason it gives (``BatchingCheck.named``)."""
    return check if check.named is None else check._replace(reason=check.named(check.reason), named=None)


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
    rows = checked_rows(batches[0], losses)
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
    """``batching_refused`` at the state's own precision."""
    few = select_rows(batch, checked_rows(batch, losses))
    n = examples_in(few)
    # together: the first examples, then copies, so that a model reordering its batch moves some row to another
    # example. A model ordering it by an order made outside torch (Python's `sorted`), unseen by the batch-order watch,
    # may find the first examples in order already, but never these, whose keys are not monotone unless all equal;
    # and none of these orders is left as it is by a reversal (`h.flip(0)`), a roll, halves or blocks of rows swapped
    # (`h.view(-1, 2, d).flip(0)`), first or last two swapped (two examples: but for the first two and the last two
    # swapped). Each copy leaves an exchange with its example unseen: a first check with one copy of the first missed
    # a reversal (two examples of one gradient at the second and fourth rows, 8% off), `[0, 1, 0, 1]` a roll by two
    # (21%) and a swap of halves (14%), `[0, 1, 2, 3, 0, 1]` blocks of two reversed (44%), silently. A single example:
    # two copies of it, which show a batch of one computing otherwise (a kernel's path for one example, scored batched
    # in batches of one: 3.6% off, silently)
    order = [0, 0] if n == 1 else [0, 1, 1, 0, 1] if n == 2 else [*range(n), 0, n - 1]

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
        except Exception as err:  # copies of an "expanded" site's parameters break a shape the layer assumes (a
            if isinstance(err, Unbatchable):  # ValueError too: `B, T, C = x.shape` of a 4-d output, RWKV's), a
                return _unbatchable(err)  # followed output meets the batch in a way not followed, or factors cannot
            if not expanded and not plan.follows or not isinstance(err, FAILURES) and not in_dynamo(err):
                raise  # be taken; (dynamo, compiling a function of the model's, fails on followed tensors: its raw
                # "Guard failed on the same frame it was created" on the default path)
            _raise_refusal(err)
            copied = [n for site in expanded for n in site.names]
            ways = ((f"parameters copied over the batch ({', '.join(map(repr, copied[:3]))})", expanded),
                    ("uses followed to the batch", plan.follows))  # fmt: skip
            what = " and ".join(way for way, taken in ways if taken)
            vary = _vary_plainly(module, loss, plan, state, few, n, mapper)
            varying = "; the first examples alone run a layer another number of times, or on other numbers of rows"
            reshaped = (  # (`start[None].expand(B, H)` of a learned start vector: torch's expand error alone before)
                "; a forward using such a parameter otherwise than broadcast as it is over the batch (reshaped "
                "first, `p[None].expand(B, -1)`; `torch.diag(p)`) cannot take a copy per example: broadcast it as it "
                "is (`p.expand(B, -1)`, `x * p`) to stay on the batched path; one given whole to an op that wants it "
                "of its own shape (`F.group_norm(x, G, w, b)`, `F.batch_norm`) applied after the op, broadcast over "
                "its channels (`F.group_norm(x, G) * w[:, None, None] + b[:, None, None]` for `[B, C, H, W]`, "
                "`w[:, None]` for `[B, C, T]`, `w` for `[B, C]`), or torch's layer for the op and the input's rank "
                "(`nn.GroupNorm`; `nn.BatchNorm1d` for `[B, C]` and `[B, C, T]`, `nn.BatchNorm2d` for images)"
                if expanded and not plan.follows else ""
            )
            return BatchingCheck(f"a forward with {what} failed ({cause_of(err)}{in_model_code(err)})"
                                 f"{varying if vary else reshaped}", {}, factorless=vary)  # fmt: skip
        try:
            # a sort along another dimension as long as the rows run together (each example's tokens) is told from a
            # sort of the batch by one row more (it was refused, falsely)
            try:
                together, on_packed = together_in(loss, plan, order)
            except Unbatchable as err:
                if not err.reason.startswith(SORTED_BATCH):
                    raise
                order = [*order, order[-1]]
                together, on_packed = together_in(loss, plan, order)
        except FAILURES as err:  # e.g. a broadcast row given a row per example breaks a shape the model assumes (one
            # example's copies: an `assert` of a batch of one, too), or
            if isinstance(err, Unbatchable):  # the copies an order the model asks of its batch (packing with
                return _unbatchable(err, _vary_alone(alone))  # `enforce_sorted=True`): the examples as given, then
            _raise_refusal(err)
            try:
                order = list(range(n))
                together, on_packed = together_in(loss, plan, order)
            except FAILURES as again:  # (a model taking one example at a time: GPT-2's classifier without a pad id)
                _raise_refusal(again)
                hint = _rows_of_ones(expanded, state)  # (the first examples' own failure: not their copies')
                copied = ", ".join(repr(n) for site in expanded for n in site.names[:3])  # (alone: one copy each)
                copies = f" with parameters copied over the batch ({copied})" if copied else ""
                return BatchingCheck(
                    f"a batched forward{copies} failed where examples alone ran ({cause_of(again)}"
                    f"{in_model_code(again)}){hint}", {}
                )
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
        several = len(order) > 1  # (a lone example run again, where its copies failed, shows no layer's rows)
        batch_free = [
            path  # as many elements for the first examples (or one's copies) as for the first alone
            for path, (xs, gs) in together.items()
            if several and xs and list(map(torch.numel, xs + gs)) == list(map(torch.numel, sum(alone[0][path], [])))
            and any(map(torch.numel, xs + gs))  # (no rows alone, none together: no gradient, nothing to follow)
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
                    f"failed ({cause_of(err)})",
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
        # (a convolution over frames folded into the batch, its weight followed: time-major frames were told as
        # examples interacting, a review helper's)
        merging = {site.path for site in plan.sites if site.kind == "followed"} if plan.fold == 1 else set(together)
        for path, (xs, gs) in together.items():
            singles = alike[path]
            per_example = all(t.shape[0] == len(order) for t in xs + gs)  # not: rows that did not split into examples
            same = singles is None or len(singles) == len(xs) + len(gs) and all(  # (None: its live rows are, above)
                map(_close_rows, singles, [*xs, *gs])
            )
            if not (per_example and (same or path in linear and _same_live_rows(ordered, together, path))):
                inputs_alike = per_example and singles is not None and all(map(_close_rows, singles, xs))
                folded = plan.fold > 1 and per_example and all(t.dim() > 1 and t.shape[1] == plan.fold for t in xs)
                where = (  # (a siamese GRU's `torch.cat([a, b])` was said to interact or reorder: a review helper's)
                    "the gradients of its parameters' copies, one per example: the forward uses a copied parameter "
                    "otherwise than broadcast over the batch (reduced whole, `p.sum()`, as a flow's log-determinant "
                    "`logs.sum()` does, whose copies' sum holds every example's), or examples interact after it"
                    if path in {site.path for site in expanded}
                    else
                    f"the model folds {plan.fold} rows per example into the batch dimension, and they are not each "
                    f"example's own there: joined part by part (a pair's `torch.cat([a, b])` puts every example's "
                    f"first part before any second; `torch.stack([a, b], 1).flatten(0, 1)` keeps each example's rows "
                    f"together), or examples interact"
                    if folded and not inputs_alike
                    else  # (gradients come from later: a later layer, or the loss, mixes the examples)
                    "its output gradients, its inputs alike: examples interact after it, in a later layer (e.g. "
                    "through batch statistics, or one holding the batch in a dimension other than the first, or the "
                    "second in every call: sequence-first) or in the loss (a batch mean, in-batch negatives: each "
                    "example's loss is its own, computed alone)" + (
                        "; or the model folds rows of each example into the batch dimension other than example by "
                        "example (frames time-major, `x.transpose(0, 1).reshape(T * B, ...)`, where "
                        "`x.reshape(B * T, ...)` keeps each example's rows together)" if path in merging else ""
                    )
                    if inputs_alike
                    else "examples interact, e.g. through batch statistics; the model reorders its batch by an order "
                    "made outside torch, such as Python's `sorted`; or the layer's input holds the batch in a "
                    "dimension other than the first, or the second in every call: sequence-first"
                )
                alone_only = (  # (one example: run together were its copies already)
                    partial(_copied_alike, module, loss, plan, state, few, mapper, path, together, order)
                    if n > 1
                    else lambda: True
                )
                return BatchingCheck(  # (an RNN's h0.expand(-1, B, -1) gave each example the first one's copy)
                    f"a batched forward changed the first examples' factors at {path!r} ({where})"
                    f"{_rows_of_ones(expanded, state)}",
                    _kept_on_refusal(seen, together, n),
                    rounding=True,
                    named=partial(_alone_only_named, where, alone_only) if per_example else None,
                )
            seen.setdefault(path, _first_rows((xs, gs), n))
    return BatchingCheck("", seen, tuple(plan.batch_free), unshown=unshown, shown=shown)


_ALONE_ONLY = (
    "each example alone gets other factors there than with the others, where two copies of itself get theirs: a "
    "batch of one computes them otherwise (a kernel's own path for one example: torch "
    "2.13's CPU BatchNorm backward, given its output gradient in channels-last order with a short batch stride, "
    "permutes its input gradient, which vmap(grad), running kernels on the whole batch, does not meet; or the model's "
    "code for one example, such as `squeeze()`)"
)


def _alone_only_named(where: str, alone_only: Callable[[], bool], reason: str) -> str:
    return reason.replace(f"({where})", f"({_ALONE_ONLY})", 1) if alone_only() else reason


def _copied_alike(
    module: nn.Module,
    loss: BatchableLoss,
    plan: Plan,
    state: Tensors,
    few: Any,
    mapper: Mapper,
    path: str,
    together: Mapping[str, LayerFactors],
    order: Sequence[int],
) -> bool:
    """Whether each of the first examples, run as two copies of itself, gets at layer ``path`` the factors it got at
    each of its rows run with the others (``together``, in ``order``; where alone it got others): the difference is a
    batch of one's, which the refusal then names (a kernel's path for one example gave CvT's lone examples wrong
    gradients; "examples interact" misled). Its copies' rows too: a batch dropping the examples past a capacity drops
    copies."""
    try:
        pairs = [batched_factors(module, loss, plan, state, select_rows(few, torch.tensor([i, i])), mapper)
                 for i in range(max(order) + 1)]  # fmt: skip
    except FAILURES:
        return False
    if not all(path in pair for pair in pairs):
        return False
    firsts = _concat_examples([_first_rows(pairs[i][path], 1) for i in order])
    rows = sum(together[path], [])
    return firsts is not None and len(firsts) == len(rows) and all(map(_close_rows, firsts, rows))


def _first_rows(factors: LayerFactors, n: int) -> LayerFactors:
    """A layer's factors of the first ``n`` rows of the examples run together (not the copy after them)."""
    xs, gs = factors
    return [x[:n] for x in xs], [g[:n] for g in gs]


def _rows_of_ones(expanded: Sequence[Site], state: Tensors) -> str:
    """A hint where a row ``[1, 1, ...]`` copied over the batch in its first dimension may be broadcast by the model
    over another: an RNN's learned initial state ``h0.expand(1, B, H)``, which fails on the copies, or
    ``h0.expand(-1, B, -1)`` / ``h0.repeat(1, B, 1)``, which give every example the first one's (review helpers')."""
    rows = [(n, tuple(state[n].shape)) for s in expanded for n in s.names]
    name, shape = next(((n, shape) for n, shape in rows if len(shape) > 2 and shape[1] == 1), (None, ()))
    if name is None:
        return ""
    row = [1, *shape[2:]]
    return (
        f"; {name!r} {list(shape)} is copied over the batch in its first dimension, which a model expanding it over "
        f"another (an RNN's learned initial state, `h0.expand(1, B, H)` or `h0.repeat(1, B, 1)`) cannot take: hold it "
        f"as {row} and expand that (`h0.expand(B, ...).unsqueeze(0)`) to stay on the batched path"
    )


def _kept_on_refusal(seen: dict[str, LayerFactors], together: Mapping[str, LayerFactors], n: int) -> dict:
    """What a refusal on compared numbers keeps for ``_computes_alike``: each layer's factors on the first examples
    run together, the first loss's where it has them (as a check that passes keeps them)."""
    return {**{path: _first_rows(factors, n) for path, factors in together.items()}, **seen}


def checked_rows(batch: Any, losses: Sequence[BatchableLoss]) -> torch.Tensor:
    """The examples of ``batch`` a check runs: four at most, in the batch's order (packing with
    ``enforce_sorted=True`` needs a batch sorted by length to stay sorted). Four or fewer are taken as given, less
    copies: the planning head, planning's own picks (``make_plan``), or a re-check's, which may differ only in a
    tensor narrower than the widest (captions of one image). A copy hides a reordering of the batch (the test data's
    first examples joined to the same first training examples, reversed by ``h.flip(0)``, gave every row its own)."""
    n = examples_in(batch)
    picked = distinct_examples(_inputs(batch, losses), 4) if n > 4 else uncopied_rows(batch)
    return torch.tensor(sorted(picked) if len(picked) > 1 else range(min(4, n)))


def refused_on(
    module: nn.Module, loss: BatchableLoss, plan: Plan, diff: Tensors, frozen: Tensors, batch: Any, mapper: Mapper
) -> BatchingCheck:
    """``batching_refused`` for one loss on ``batch`` (its "expanded" sites' truth too), other data than the plan was
    made on (training examples, when it was made on a single test example)."""
    truth = [_true_expanded(module, loss, plan, diff, frozen, batch)]
    return batching_refused(module, [loss], plan, {**frozen, **diff}, batch, mapper, truth)


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


def shows_batching(batch: Any, losses: Sequence[ExampleLossFn]) -> bool:
    """Whether ``batch`` holds examples whose inputs differ: run together, equal ones get what one alone gets."""
    return len(distinct_examples(_inputs(batch, losses), 2, widest_only=True)) > 1


def _singles(batch: Any, n: int) -> list[Any]:
    return [slice_batch(batch, i, i + 1) for i in range(n)]


# how a model's forward fails on a batch it cannot take: torch's errors, and a model's own for a batch of one only
# (``assert x.shape[0] == 1``, an index past a batch of one: raised raw from planning, a review helper's)
FAILURES = (RuntimeError, TypeError, ValueError, AssertionError, LookupError)


def _raise_refusal(err: Exception) -> None:
    """Raise ``err`` where it is a refusal of the call (ours: it names the argument first), not the model failing."""
    if not isinstance(err, RuntimeError) and refusal(err):
        raise err


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
        if x.dim() == 0 or x.shape[:-1] != g.shape[:-1] or not x.is_floating_point():  # (0-d: a row per call)
            return None
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        live = rows_with_gradient(g[None])[0]
        if live.any():
            xs.append(x[live])
            gs.append(g[live])
    return xs + gs


def _close_rows(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``_close`` for each row (example) on its own scale, or within rounding of the largest row's (``_allowed``);
    non-finite entries where both have them alike (a model whose loss is NaN for an example, alone too: the call
    then names it, not an interaction)."""
    if x.shape != y.shape or x.dtype != y.dtype or torch.equal(x, y):
        return x.shape == y.shape and x.dtype == y.dtype
    if not x.is_floating_point():
        return False
    allowed = _allowed(y.nan_to_num(0, 0, 0))
    if bool(((x - y).abs().reshape(len(x), -1).amax(1) <= allowed).all()):
        return True
    d = _differences(x, y)
    return d is not None and bool((d.abs().reshape(len(x), -1).amax(1) <= allowed).all())


def _differences(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``x - y``, zero where the entries are alike (NaN in both too); None where a non-finite entry is unlike."""
    alike = (x == y) | x.isnan() & y.isnan()
    return torch.where(alike, 0, x - y) if bool(alike[~(x.isfinite() & y.isfinite())].all()) else None


_ROUNDING = 1e3  # times the dtype's eps, of the largest row's scale: a difference no larger is rounding


def _allowed(y: torch.Tensor) -> torch.Tensor:
    """Each row's allowed difference: 1e-4 of its largest entry, or ``_ROUNDING`` eps of the largest row's, where
    more (a row zero but for rounding: BERT's first query gradient of an example of one token, whose attention weight
    is 1, is about 1e-19 in float64, batched and alone; on its own scale it was refused as mixing)."""
    scale = y.abs().reshape(len(y), -1).amax(1)
    floor = float(scale.max()) * _ROUNDING * torch.finfo(y.dtype).eps if len(scale) else 0.0
    return (mixing(y.dtype) * scale).clamp(min=floor)


def mixing(dtype: torch.dtype) -> float:
    """The least relative difference taken for examples mixing, not rounding: 1e-4, or 1e9 float64 eps (2.2e-7)
    where the model computes in float64 throughout (``COMPUTED_IN``, planning's: at 1e-4, a margin head folding its
    batch's feature norms into its running statistics at AdaFace's rate, 7e-5 of the outputs, was scored batched,
    0.75% off, silently; a review helper's). Rounding reaches far above eps where a row's entries cancel (MobileViT's
    attention gradients in float64, 7e-9 of their row); GPT-Neo's attention computes in float32 in a float64
    model."""
    coarsest = COMPUTED_IN.get()
    if not (dtype.is_floating_point or dtype.is_complex) or coarsest is None:
        return 1e-4
    return min(1e-4, 1e9 * max(torch.finfo(dtype).eps, torch.finfo(coarsest).eps))


# the coarsest floating dtype the model's ops compute in (``_purity.ForwardBytes.precision``), where planning knows
COMPUTED_IN: ContextVar[torch.dtype | None] = ContextVar("COMPUTED_IN", default=None)


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float rounding (a batched GEMM may sum in another order), relative to the largest finite entry;
    non-finite entries where both have them alike (an example's NaN gradient: the call names it, not a mixing)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.is_floating_point() or torch.equal(x, y):
        return torch.equal(x, y)
    d = _differences(x, y)
    return d is not None and bool(d.abs().max() <= mixing(y.dtype) * y.nan_to_num(0, 0, 0).abs().max())


def checking_batches(
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
    own at its ends. ``witness``: ``batched_factors``'s for every reading's representation (``spot_check``)."""
    # the reading the batches run under, with "packed" while packed sequences of lengths that differ are unseen (else
    # "lengths"), and its rep; set once checked (threads may both check the first batch: the same answer)
    reading_left: list[tuple[Plan, str, RepresentationFn]] = []
    shown = dict(plan.padding_shown or ())  # the range each column of ``padding`` took in a check
    if plan.unchecked != "batching":  # ("": padding followed)
        reading_left.append((plan, plan.unchecked or "lengths", rep))

    def verdict(examples: Any) -> tuple[Plan, BatchingCheck]:
        """The reading ``examples`` pass the check under (at ``checked_at``), and that check; raises where they show
        the model mixes them or runs a layer once for the whole batch."""
        reading, check = plan, refused_on(module, loss, plan, *checked_at, examples, mapper)
        if check.reason and plan.seq_first:  # one example's [T, 1, d] read batch-first after all?
            flat = plan._replace(seq_first=frozenset())
            retried = refused_on(module, loss, flat, *checked_at, examples, mapper)
            reading, check = (flat, retried) if not retried.reason else (plan, check)
        unseen = sorted(set(check.batch_free) - plan.batch_free)  # (a lone example's layers all look batch-free)
        if check.reason:
            apart = "examples alone differ" if _ALONE_ONLY in check.reason else "a batch's examples do not stay apart"
            shows = f"{apart} ({check.reason})"
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
        n = examples_in(batch)
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
        if examples_in(batch) < 2:
            return rep_of(plan, eager=True)(diff, frozen, batch)
        if not reading_left:
            reading, check = verdict(batch)
            if not shows_batching(batch, [loss]):
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
# examples the call's first check runs alone: a third to a half of a batch mixing (nodes of a subgraph the batch
# induces, each with neighbours among the others) was missed where the one example checked had none (92-99% off,
# silently, in 5 of 6 random graphs); 8 miss it in 2 of 16 test graphs (11 of 16 with one), at 7 more forwards of one
# example each (GPT-2's self-influence, 200 examples: 6.6 ms of 412)
_FIRST_CHECKED = 8

# how the driver built the batch a pass runs (``checked_as``): its test examples in front of a training batch's, and
# examples each check takes whatever the turn
_LAYOUT: ContextVar[tuple[int, tuple[int, ...], bool]] = ContextVar("_LAYOUT", default=(0, (), False))


@contextmanager
def checked_as(*, test_in_front: int = 0, rows: Sequence[int] = (), every: bool = False) -> Iterator[None]:
    """Spot checks inside the block: of a batch whose first ``test_in_front`` examples are a test batch joined to a
    training batch (each check takes one of them too: their gradients enter every score of the batch, and a model
    mixing them with a training example mixes examples the user never batched), taking examples ``rows`` of each
    batch checked too (the example a joined batch found mixing, in its own batch), and, with ``every`` or ``rows``, at
    every checkpoint (each batch of a joined pair scored apart is a first batch: the pair's pass was checked at the
    checkpoints before its find, which it no longer scores)."""
    token = _LAYOUT.set((test_in_front, tuple(rows), every or bool(rows)))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def spot_check(
    loss: BatchableLoss,
    states: Sequence[Tensors],
    names: Collection[str],
    module: nn.Module | None,
    within: float = 1e-4,
) -> Witness:
    """A ``Witness`` (``batched_factors``) that runs one example of each batch of two or more alone and refuses the
    call where the batch gave it other outputs or losses (``_alike_alone``, ``within`` of their scale: planning's
    ``mixing``) by more than rounding (``_rounding_only``).
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
    model imputing NaNs from the batch mixes those examples alone). Each check costs one forward of one example (and
    a backward through a criterion whose losses hold no part per example). ``module``'s encoders run alone as in
    the batch (``on_traced_path``: a frozen one would take torch's inference path alone, zeros at padded positions)."""
    encoders = [m for m in module.modules() if isinstance(m, ENCODERS)] if module is not None else []
    picks, test_picks, odd_picks, batches = itertools.count(1), itertools.count(1), itertools.count(), itertools.count()
    distinct: dict[frozenset[int], Tensors] = {}  # each state by its tensors (a checkpoint given twice: once)
    for state in states:
        distinct.setdefault(frozenset(map(id, state.values())), state)
    checkpoint_of, states = {key: c for c, key in enumerate(distinct)}, list(distinct.values())
    runs = cache(partial(_frozen_runs, states, names))  # (compared on the first check only)
    # the batch last seen, its number, the checkpoints it was checked at, its examples of inputs not finite (read once)
    current: list[Any] = [None, 0, set(), None]
    current_first = [True]

    @torch.compiler.disable  # (eager inside compiled updates)
    def witness(state: Tensors, batch: Any, together: Witnessed) -> None:
        n = examples_in(batch)
        if n < 2:
            return
        if batch is not current[0]:
            current[:] = [batch, next(batches), set(), None]
        c = checkpoint_of.get(frozenset(map(id, state.values())))
        in_front, rows, every = _LAYOUT.get()
        if c is not None and not every:
            turn = runs()[c]
            if (current[1] and c != turn[-1 - current[1] % len(turn)]) or c in current[2]:  # (the first: each)
                return
            current[2].add(c)
        first, current_first[0] = current_first[0], False  # the call's first check: more examples (below)
        checked = list(dict.fromkeys(
            in_front + int((n - in_front) * (next(picks) * _GOLDEN % 1))
            for _ in range(min(_FIRST_CHECKED, n - in_front) if first else 1)
        ))  # fmt: skip
        if in_front:
            checked.append(int(in_front * (next(test_picks) * _GOLDEN % 1)))
        checked += [i for i in rows if i not in checked and i < n]
        if current[3] is None:
            current[3] = _not_finite(_inputs(batch, [loss]), n)
        odd = current[3]
        if odd and checked[0] not in odd:  # (all examples not finite: an additive mask of -inf, say)
            checked.append(odd[next(odd_picks) % len(odd)])
        for i in checked:
            one = torch.tensor([i])
            with on_traced_path(encoders):
                alone = _witnessed(loss, state, names, select_rows(batch, one), bool(together[2]))
                alike = _alike_alone(together, alone, n, i, within=within)
                if alike or _rounding_only(loss, state, names, batch, one, together, alone):
                    continue
            outputs = (together[0], None, []), (alone[0], None, [])
            if together[0] and _alike_alone(*outputs, n, i, within=within):  # (outputs alike)
                raise MixedBatch(
                    f"`{loss.name}`: example {i} of a batch of {n} got another loss or gradient at its outputs from "
                    f"the criterion run on the whole batch than alone, so the criterion mixes a batch's examples (hard "
                    f"examples mined over the batch, a sum divided by a batch statistic, outputs broadcast against "
                    f"every example's targets: `[B, 1]` against `[B]`, which torch warns of); scored batched, its "
                    f"scores would be wrong. Give it as `tc.ExampleLoss` (each example alone), or pass "
                    f"`factored=False`.",
                    i,
                )
            if isinstance(loss, BatchedLoss):  # (its losses are what is compared: the model's or its own mixing)
                raise MixedBatch(
                    f"`{loss.name}`: example {i} of a batch of {n} got another loss in the batch than alone, so the "
                    f"model or the loss mixes a batch's examples (a `tc.BatchLoss` must give each example its own "
                    f"loss, not the batch's mean: Hugging Face's `outputs.loss` is one; the model: statistics over "
                    f"larger batches, a frozen gate at another checkpoint); scored batched, its scores would be wrong. "
                    f"Compute each example's loss from the outputs (`tc.causal_lm_loss`, "
                    f"`tc.sequence_classification_loss`), or pass `factored=False`.",
                    i,
                )
            raise MixedBatch(
                f"`model`: example {i} of a batch of {n} got other outputs in the batch than alone, so the model mixes "
                f"a batch's examples in a way the first examples it was planned on could not show (statistics over "
                f"larger batches or over examples unlike the first; at another checkpoint than the last: a frozen "
                f"gate, or a branch on a batch statistic); scored batched, its scores would be wrong. Pass "
                f"`factored=False`, or keep each example's computation its own.",
                i,
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
    return a.keys() == b.keys() and all(t is b[k] or same_values(t, b[k]) for k, t in a.items())


class MixedBatch(ValueError):
    """A batch that gave an example (its index in the batch: ``example``) other outputs than it gets alone
    (``spot_check``)."""

    def __init__(self, message: str, example: int) -> None:
        super().__init__(message)
        self.example = example


# what a forward gave its examples: outputs, losses, the losses' sum's gradient at each output
Witnessed = tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]


def _witnessed(
    loss: BatchableLoss, state: Tensors, names: Collection[str], batch: Any, gradients: bool = False
) -> Witnessed:
    """What the forward gives ``batch``'s examples, as ``batched_factors`` shows its witness; run as the batched pass
    runs, its parameters ``names`` differentiated (under ``no_grad``, ``nn.TransformerEncoder`` takes a fused path
    that gives padded positions zeros, which the batched pass computes). ``gradients``: a criterion's gradient at the
    outputs too, as the batch's witness has it (its losses holding no part per example)."""
    as_found()  # (each run, alone or the batch, from the model as the call found it: `_state.as_found`)
    state = {k: t.detach().requires_grad_() if k in names else t for k, t in state.items()}
    with torch.enable_grad():
        if isinstance(loss, BatchedLoss):
            return [], loss.per_example(state, batch).detach(), []
        out = loss.forward(state, *batch[:-1])
        losses = batch_losses(loss.criterion, out, batch[-1])
        shown = floating_leaves(out)
        if losses is None or not gradients:
            return [t.detach() for t in shown], None if losses is None else losses.detach(), []
        live = [t for t in shown if t.requires_grad]
        grads = torch.autograd.grad(losses.sum(), live, allow_unused=True) if live else ()
    return [t.detach() for t in shown], losses.detach(), gradients_at(shown, live, grads)


def _alike_alone(
    together: Witnessed, alone: Witnessed, n: int, i: int, loosely: bool = False, within: float = 1e-4
) -> bool:
    """Whether what example ``i`` gets alone is close to a part of the batch's that may hold it (``_example_parts``),
    each output and its losses within ``within`` of the example's own scale (``_scale``) or of their own size;
    ``loosely``, of the batch's scale (losses: or 1). Outputs whose shapes tell no part are not compared."""
    for t, a, least in _pairs(together, alone):
        parts = list(_example_parts(t, a.shape, n, i))
        if not parts or not a.numel():
            continue
        scale = max(least, _scale(t)) if loosely else _scale(a)
        if not any(_close_within(a, part, scale, relative=True, within=within) for part in parts):
            return False
    return True


_FLOAT64_ROUNDING = 1e-10  # of a batch's scale: float64's rounding of its largest terms, many times over


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
    more than ``_WIDE_CHECK_BYTES``, or that float64 fails on; for a float64 state, loosely within 1e-10 of the
    batch's scale (a least-squares fit's residuals of 1e-15, rounding only, were refused as mixing: a review
    helper's)."""
    n, i = examples_in(batch), int(one[0])
    floating = [t for t in state.values() if t.is_floating_point()]
    if not floating:
        return False
    if floating[0].dtype == torch.float64:
        return _alike_alone(together, alone, n, i, loosely=True, within=_FLOAT64_ROUNDING)
    if 8 * sum(map(torch.numel, floating)) > _WIDE_CHECK_BYTES:
        return _alike_alone(together, alone, n, i, loosely=True)
    try:  # (see ``batching_refused``)
        wide_state, wide_batch = _floating_as(torch.float64, (state, batch))
        with _Widened():
            wide = [
                _witnessed(loss, wide_state, names, b, bool(together[2]))
                for b in (wide_batch, select_rows(wide_batch, one))
            ]
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
    """Outputs, losses and the gradients at the outputs of two runs side by side, with the least scale each is
    compared on loosely. A criterion run on the whole batch is compared by its gradient at the outputs too, which is
    the batched pass's own: a sum (``reduction="sum"``), or fewer losses than examples, holds no example's part to
    compare, and a criterion mixing the batch there (hard examples mined over it, a sum divided by a batch
    statistic) leaves every output alike (57-99% off, silently, before)."""
    pairs = [(t, a, 0.0) for t, a in zip(x[0], y[0])] if len(x[0]) == len(y[0]) else []
    pairs += [(t, a, 1.0) for t, a in zip(x[2], y[2])] if len(x[2]) == len(y[2]) else []  # (a loss's scale, as below)
    return pairs + ([(x[1], y[1], 1.0)] if x[1] is not None and y[1] is not None else [])


def _largest(t: torch.Tensor) -> float:
    return t.nan_to_num(0, 0, 0).abs().max().item() if t.numel() else 0.0


_SAMPLED = 4096  # entries an output's small size is estimated from
_OUTLYING = 1e3  # entries this many times a small one's size are no scale of the others (a mask's -1e4, finfo.min)


def _scale(t: torch.Tensor) -> float:
    """The largest of ``t``'s entries but those ``_OUTLYING`` times its small ones (its nonzero entries' 10th
    percentile, estimated on a sample): the largest entry alone let a mask's -1e4 among logits near 1 hide mixing
    of 16-24% in every other entry (a review helper's trial)."""
    if not t.numel():
        return 0.0
    size = t.detach().nan_to_num(0, 0, 0).abs().flatten()
    largest = size.max().item()
    sample = size[:: max(1, size.numel() // _SAMPLED)]
    sample = sample[sample > 0]
    small = sample.kthvalue(max(1, sample.numel() // 10)).values.item() if sample.numel() else largest
    if largest <= _OUTLYING * small:  # (as usual: one pass)
        return largest
    return size.masked_fill_(size > _OUTLYING * small, 0).max().item()


def _close_within(a: torch.Tensor, b: torch.Tensor, scale: float, relative: bool = False, within: float = 1e-4) -> bool:
    """Equal up to ``within * scale`` (``relative``: or to ``within`` of their own size), or both NaN (or like
    infinities), entry by entry."""
    alike = a.shape == b.shape and a.dtype == b.dtype
    return alike and torch.allclose(a, b, rtol=within if relative else 0, atol=within * scale, equal_nan=True)


def _example_parts(t: torch.Tensor, shape: torch.Size, n: int, i: int) -> Iterator[torch.Tensor]:
    """The parts of a batch's output ``t`` that may hold example ``i``'s output of ``shape`` alone: along a dimension
    ``n`` times as long, its ``i``-th block or every ``n``-th entry from the ``i``-th (the batch first or second in a
    flattened ``[B T, C]``; ``[B, C]`` or ``[T, B, C]`` alike), a dimension of ``n`` that alone is squeezed, or the
    start or end of example ``i``'s row along the one dimension the batch pads (an output cut to the batch's
    longest)."""
    if t.dim() == len(shape) and t.dim() > 1 and t.shape[0] == n and shape[0] == 1:
        longer = [d for d in range(1, t.dim()) if t.shape[d] != shape[d]]
        if 0 < len(longer) <= 3 and all(t.shape[d] > shape[d] for d in longer):  # (a pair's scores [B, L, L] too)
            for starts in itertools.product(*[(0, t.shape[d] - shape[d]) for d in longer]):
                part = t[i : i + 1]
                for d, start in zip(longer, starts):
                    part = part.narrow(d, start, shape[d])
                yield part
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
