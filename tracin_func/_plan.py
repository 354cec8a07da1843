"""Planning a call on its first batch: check the forward pass, choose the parameters (all selected, or the last
layer's), decide per layer how gradients are obtained, check that a batched pass gives each example its own
(``_batching``), and build the pure updates for that plan."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from ._adam import check_one_lr, warn_matched_by_position, warn_unstepped
from ._assemble import RepresentationFn, representation_fn, rows_with_gradient, worth_dropping
from ._attention import PRODUCT as ATTENTION_PRODUCT
from ._bags import PRODUCT as BAG_PRODUCT
from ._batching import (
    COMPUTED_IN,
    FAILURES,
    BatchingCheck,
    batching_refused,
    checked_rows,
    checking_batches,
    mixing,
    refused_on,
    shows_batching,
    spot_check,
)
from ._capture import BeyondFactors, Discovery, LayerFactors, discover
from ._data import examples_in, nbytes, select_rows
from ._grads import Mapper, Tensors
from ._last_layer import last_layer_params
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
from ._loss import BatchedLoss, CriterionLoss, ExampleLossFn
from ._purity import LOWER, ForwardBytes, check_forward, check_reads, coarsest
from ._recurrent import UNROLLED_KINDS, packed_calls, recurrent_sites, why_not_run_unrolled
from ._representations import Representation
from ._setup import Setup
from ._state import as_found
from ._updates import Updates, make_updates
from ._validate import cause_of, refusal
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
    # (``checking_batches``): "batching" (one example, or examples of equal inputs: their batched and single runs
    # are the same), "lengths" / "packed" (examples of one length: whether the model reads the padding a longer one
    # adds; as ``BatchingCheck.unshown``)
    unchecked: str = ""
    # the range of each column of ``padding`` among the examples checked (``_range``), followed per batch
    # (``checking_batches``); None where no check ran (refused, or "batching" unchecked)
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
    sized_by: Callable[[], Any] | None = None,
    pool: Any = None,
) -> PlannedCall:
    """Check the forward pass and plan a call on ``batch`` (on device) of the argument named ``where``; warn when
    the plan leaves the batched path although layers could give factors. ``self_only``: every gradient meets only
    itself (self-influence), which changes what factoring saves, as do few ``partners`` (the products each training
    gradient takes part in, where known: one per test example, and its own norm where taken; one prediction's
    proponents). ``scored``: reads the first examples of other data the plan scores in batches (influence's training
    data), which the batching check runs on when ``batch`` holds a single example (whose batched and lone runs are
    the same); called only then. ``sized_by``: reads them where the plan's size cuts their batches, which it then
    holds for them too (``_sized_for_training``). ``pool``: more examples (the same data's first, ``batch`` first,
    then maybe the training data's), which the batching check picks its examples among."""
    module = setup.spec.module
    losses = [setup.train_loss] if setup.test_loss is setup.train_loss else [setup.train_loss, setup.test_loss]
    made = [_checked_on_either(setup, loss, batch, where) for loss in losses]
    names = scored_names(setup, batch)
    if setup.method == "last_layer":  # (chosen now: a loss reading the head's own weight, checked as differentiated)
        for loss in losses:
            check_reads(setup.spec.module, loss, [c.state for c in setup.checkpoints], batch, names)
    check_one_lr([c.adam for c in setup.checkpoints], names)
    warn_matched_by_position([c.adam for c in setup.checkpoints], names)
    factored = True if setup.method == "last_layer" else setup.factored
    checked_at = split_state(setup.checkpoints[-1].state, names)  # see ``make_plan``
    mapper = Mapper(setup.chunk_size)
    lowered = any(m.lowered for m in made) and setup.dtype not in LOWER
    if lowered:  # each example's gradient as autograd takes it alone: batched kernels (the factors', vmap's) round
        factored, mapper.loop, mapper.plain = False, True, True  # a lower precision otherwise (1e-3 off in bfloat16)
    token = COMPUTED_IN.set(coarsest(m.precision for m in made))
    try:
        plan = make_plan(
            module, names, losses, *checked_at, batch, mapper, factored=factored, self_only=self_only,
            partners=partners, scored=scored, pool=pool,
        )
        # each batch's spot check's tolerance, as planning's (at 1e-4, a DEQ solved to its batch's largest residual
        # was scored batched in float64, 2e-4 off, silently; a review helper's)
        within = mixing(setup.dtype)
    finally:
        COMPUTED_IN.reset(token)
    warn_unstepped([c.adam for c in setup.checkpoints], [n for n in names if n not in plan.unused])
    if lowered:
        plan = plan._replace(batching=LOWERED_LOOP)
        warn(f"This call runs {LOWERED_LOOP}.", SlowPathWarning)
    per_example = plan.dense or not plan.batched  # (vmap(grad): each example's backward through what all read)
    plan = plan._replace(tensor_bytes=max(max(m.example, m.held if per_example else 0) for m in made))
    if any(c.adam is not None for c in setup.checkpoints):  # Adam's updates are formed per example beside the formed
        dense = 2 * sum(t.nbytes for t in checked_at[0].values())  # gradients (``_adam``): sized as the plan's, a
        plan = plan._replace(example_bytes=max(plan.example_bytes, dense))  # batch of them took 7 GB, not 64 MB
    if setup.method == "last_layer":  # (factored as that method is, not as an option the user passed)
        said = {n: 'method="last_layer": factored' if why == _FACTORED else why for n, why in plan.reasons.items()}
        plan = plan._replace(reasons=said)
    if sized_by is not None:
        plan = _sized_for_training(setup, plan, batch, sized_by())
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
        states = [c.state for c in setup.checkpoints]
        witness = spot_check(loss, states, names, module, within) if plan.batched else None
        reps[id(loss)] = representation_fn(module, loss, plan, mapper, compiled=setup.compile, witness=witness)
        if plan.batched:  # (checked on the examples planned on, or left to the first batch that can show it; off it,
            rep = reps[id(loss)]  # each example's or chunk's run starts from the model as found: ``Mapper``)
            rep = checking_batches(rep, module, loss, plan, mapper, checked_at, setup.compile, witness)
            reps[id(loss)] = _from_found(rep)
    train, test = reps[id(setup.train_loss)], reps[id(setup.test_loss)]
    return PlannedCall(plan, mapper, make_updates(train, test, names, projection=setup.projection), train, test)


LOWERED_LOOP = (
    "a loop over examples by plain autograd: the forward computes in float16 or bfloat16 (a `torch.autocast` it "
    "enters, a cast of its own), whose products round otherwise in batched kernels (the layers' factors, vmap's) than "
    "in one example's alone (1e-3 off in bfloat16), so each example's gradient is taken as autograd takes it alone"
)


def _from_found(rep: RepresentationFn) -> RepresentationFn:
    """``rep``, each batch's pass started from the model as the call found it (``as_found``)."""

    def from_found(diff: Tensors, frozen: Tensors, batch: Any) -> Representation:
        as_found()
        return rep(diff, frozen, batch)

    return from_found


def _sized_for_training(setup: Setup, plan: Plan, batch: Any, train: Any) -> Plan:
    """``plan``, made on test examples (``batch``), with bytes per example that hold for the training examples too
    (``train``: the first), whose batches it sizes: short queries scored against long documents had their training
    batches sized by the queries (8 times the budget and more). Where the training examples are larger, the largest
    tensor of one's forward is measured and the bytes kept per example scaled by their data's over the test ones' (the
    rows a layer takes grow with them); a training example that fails is left to the scoring pass to name."""
    if train is None or not examples_in(train):
        return plan
    ratio = (nbytes(train) / examples_in(train)) / max(1, nbytes(batch) / examples_in(batch))
    if ratio <= 1:
        return plan
    try:
        tensor_bytes = _checked_on_either(setup, setup.train_loss, train, "train").example
    except Exception as err:
        if refusal(err):
            raise
        return plan
    example_bytes = max(plan.example_bytes, math.ceil(plan.example_bytes * ratio))
    return plan._replace(tensor_bytes=max(plan.tensor_bytes, tensor_bytes), example_bytes=example_bytes)


def checked_forward(setup: Setup, loss: ExampleLossFn, batch: Any, where: str) -> ForwardBytes:
    """``check_forward`` of ``loss`` on the first example of ``batch`` at the call's checkpoints: it may not compute
    with the model's own parameters differentiated (with ``method="last_layer"``, chosen later: none here, the head
    in ``plan_call``), nor with a tensor of the model that a checkpoint holds another value of."""
    differentiated = () if setup.method == "last_layer" else setup.spec.diff_names
    states = [c.state for c in setup.checkpoints]
    return check_forward(setup.spec.module, loss, states, batch, where, differentiated)


def scored_names(setup: Setup, batch: Any) -> Sequence[str]:
    """The parameters a call planned on ``batch`` (on device) differentiates: those selected, or with
    ``method='last_layer'`` the last nn.Linear the loss of its first example reaches (``last_layer_params``)."""
    spec = setup.spec
    if setup.method != "last_layer":
        names = spec.diff_names
    else:
        assert spec.module is not None  # checked when the call was set up
        first = setup.checkpoints[0].state
        names = last_layer_params(spec.module, setup.train_loss, first, batch, spec.aliases, spec.diff_names)
    hooked = [n for n in names if n in spec.hooked]
    if hooked:
        raise ValueError(
            f"`model` parameter {hooked[0]!r} has a gradient hook (`register_hook`), which changes its gradient as "
            f"the model trains. The call differentiates each checkpoint's tensors, which the hook is not on, so "
            f"each example's gradient would be the loss's own, silently. Remove it (`handle.remove()`) before "
            f"scoring, to score the loss's own gradients."
        )
    return names


def _checked_on_either(setup: Setup, loss: ExampleLossFn, batch: Any, where: str) -> ForwardBytes:
    """``check_forward`` of ``loss`` on ``batch``; a failure of the other side's loss (``test_loss_fn`` on training
    data, or ``loss_fn`` on test data) is refused saying so: the two are planned together, on one batch."""
    own = setup.test_loss if where == "test" else setup.train_loss
    try:
        return checked_forward(setup, loss, batch, where)
    except Exception as err:
        if loss is own or refusal(err):
            raise
        other = "loss_fn" if where == "test" else "test_loss_fn"
        raise ValueError(
            f"`{other}` fails on `{where}`'s first batch ({cause_of(err)}). A call planning "
            f"`loss_fn` and `test_loss_fn` apart runs both on the batch it plans on, so that both sides' gradients "
            f"take the same routes: give `train` and `test` batches of one structure (a test set without labels: a "
            f"placeholder label column the test loss ignores), each loss reading what it needs."
        ) from err


def split_state(state: Tensors, names: Sequence[str]) -> tuple[Tensors, Tensors]:
    """``(differentiated, frozen)`` tensors of a checkpoint's state."""
    return {n: state[n] for n in names}, {n: t for n, t in state.items() if n not in names}


def _rows_per_example(site: Site, shapes: Sequence[tuple[int, ...] | None]) -> int:
    """``T``: rows of ``A`` / ``G`` per example, over all calls of the layer (shapes of a batch of one); none for an
    "expanded" site, which has no factors (its output need not even be a tensor: XLNet's whole model holds a row)."""
    if site.kind == "expanded":
        return 0
    return sum(math.prod(s[2:]) if site.kind == "conv" else math.prod(s[:-1]) for s in shapes)


def _at_longest(rows: int, layer: nn.Module, on_packed: Sequence[tuple[nn.Module, torch.Tensor]], first: int) -> int:
    """A packed layer's rows per example (its steps) at the longest sequence the checked examples pack, not the first
    example's own length (``on_packed[:first]``): a short first example sized batches of long ones (3 to 6 times the
    memory budget) and kept factors that every batch then formed."""
    own = [int(t.max()) for m, t in on_packed[:first] if m is layer]
    longest = max((int(t.max()) for m, t in on_packed if m is layer), default=0)
    return math.ceil(rows * longest / max(1, *own)) if own else rows


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
_FACTORED = "factored=True"
_BEYOND_FACTORS = "a part of its gradient no layer's factors hold (see the batching)"
_UNUSED = "not used by the forward pass or the loss on the first example: zero gradients (a batch using it is refused)"
_UNUSED_ON_VMAP = "not used by the forward pass or the loss on the first example; vmap runs anyway (per example)"


_COPIES_DID_NOT_FIT = "its copies over the batch did not fit how its layer uses it: at another rank, or not elementwise"


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
    first, which the batching check picks its own among (``checked_rows``: the ends of each padding signal's range,
    so that later batches rarely reach beyond them)."""
    partners = 1 if self_only else partners
    sites = {}
    if module is not None and factored is not False:
        sites = {**factorable_sites(module, names), **recurrent_sites(module, names)}
    reasons = {n: _why_dense(module, n, factored) for n in _not_in_sites(names, sites.values())}
    tied = _held_twice(sites.values())
    kernel, rows_of = set(), {}
    modules = dict(module.named_modules()) if module is not None else {}
    truth: list[dict[str, torch.Tensor]] = []  # per loss: the first example's gradients of "expanded" parameters
    idle: dict[str, Site] = {}  # modules holding a tied tensor that no loss calls: its other uses are its sites
    unfollowed: set[str] = set()  # parameters of layers called on inputs without a batch dimension: never followed
    unused = set(names)  # parameters no loss reaches: not even through a site's call
    called: set[str] = set()  # sites called under some loss so far
    first_calls: dict[str, list[tuple[int, ...] | None]] = {}  # the first loss's output shapes per site
    packed: set[str] = set()  # layers run unrolled on a PackedSequence: on the batched path only (`_unpacked`)
    # the batching check's examples, picked from the pool once (the first is batch's, whose gradients are the expanded
    # sites' truth): the check and discovery, given four or fewer, run them all
    pool = batch if pool is None else pool
    examples = select_rows(pool, checked_rows(pool, losses)) if sites else pool
    beyond = ""  # why no layer may give factors, found as they were discovered
    for i, loss in enumerate(losses if sites else ()):
        try:  # (on the first example, then the others checked: a model may differentiate on some alone)
            with packed_calls() as on_packed:
                calls, leaked, unreached, _ = _discovered(module, loss, sites, diff, frozen, batch, reasons)
                first_packed = len(on_packed)  # (the first example's; the checked examples' after)
                reached = _reached_elsewhere(module, loss, list(sites.values()), diff, frozen, examples, leaked)
        except BeyondFactors as err:
            beyond = err.reason
            reasons.update({n: _BEYOND_FACTORS for site in sites.values() for n in site.names})
            sites = {}
            break
        packed |= {path for path, layer in modules.items() if any(layer is m for m, _ in on_packed[:first_packed])}
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
            elif calls[path] and site.kind == "embedding" and min(map(len, calls[path])) < 2:  # (a 0-d index: a raw
                # IndexError before, splitting its rows)
                _drop(sites, site, "is called on an input without a batch dimension (a lookup of one 0-d index)",
                      reasons)  # fmt: skip
                continue
            elif calls[path] and not token_wise(modules.get(path), site) and any(s[0] != 1 for s in calls[path]):
                rows = next(s[0] for s in calls[path] if s[0] != 1)
                unbatched = site.kind in ("linear", "conv") and min(map(len, calls[path])) < len(site.weight_shape)
                unfollowed |= set(site.names) if unbatched else set()  # (followed, torch's shape error was the cause)
                _drop(sites, site, "is called on an input without a batch dimension (a loop over the batch's "
                                   "examples, say)" if unbatched else  # (its channels were told as rows: a review's)
                                   f"sees {rows} rows for one example (the model merges the batch with another "
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
                    why = (
                        f"a layer whose forward did not call `F.{func}` on its own parameters and settings (or was "
                        "not called)"
                    )
                elif not calls[path]:
                    why = "not called as a module"
                else:
                    why = "also used outside the layer (tied weight, direct use or a term of the loss)"
                _drop(sites, site, f"is {why}", reasons)
                continue
            called.add(path)
            rows = rows_of[path] = _rows_per_example(site, calls[path])
            if site.owner in packed:
                rows = rows_of[path] = _at_longest(rows, modules[site.owner], on_packed, first_packed)
            if site.kernel_ok and (factored or _kernel_is_cheaper(site, rows, partners)):
                kernel.add(path)  # a kept Embedding is never materialised on the training side (see TokenRows)
            reasons.update(_site_reasons(site, _why_site(site, rows, factored, path in kernel, partners), tied))
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
    followable = [n for n in left if n not in unfollowed]
    followed = _followed(module, followable, diff) if left and sites and all(map(_batchable, losses)) else {}
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
        why = "`factored=False`" if factored is False else beyond or "no layer gives factors"
        return plan._replace(batching=f"vmap(grad) over examples: {why}")
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
    batch_shows = shows_batching(examples, losses)
    head = scored() if scored is not None and not batch_shows else None
    head_shows = head is not None and shows_batching(head, losses[:1])

    def checked_on(plan: Plan) -> BatchingCheck:
        if head_shows:  # check the training loss on its data
            return refused_on(module, losses[0], plan, diff, frozen, head, mapper)
        return batching_refused(module, losses, plan, {**frozen, **diff}, examples, mapper, truth)

    # (checked unused: the first examples together reaching one, the call runs vmap(grad); an adaptive softmax's
    # tail clusters, one reached per example, were refused at the first batch: a review helper's)
    plan = plan._replace(unused=tuple(n for n in names if n in unused))
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
            expanded = {n for site in readings[0].sites if site.kind == "expanded" for n in site.names}
            reasons.update(dict.fromkeys(expanded & set(plan.names), _COPIES_DID_NOT_FIT))  # (wrapped as followed)
    refused, seen = check.reason, check.seen
    plan = plan._replace(batch_free=frozenset(check.batch_free))
    unchecked = check.unshown if batch_shows or head_shows else "batching"
    shown = check.shown if batch_shows or head_shows else None
    if refused:  # (unused: checked only; per example, vmap(grad) takes every gradient, zero or not)
        unbatched = _factorless(plan) if check.factorless else _unpacked(_unexpanded(plan), packed)
        return unbatched._replace(batching=f"vmap(grad) over examples: {refused}", unused=())
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


def _discovered(
    module: nn.Module, loss: ExampleLossFn, sites: dict[str, Site], diff: Tensors, frozen: Tensors, batch: Any,
    reasons: dict[str, str],
) -> Discovery:
    """``discover`` on ``sites``, less those whose layer ran another weight or bias than its parameter's
    (``Discovery.foreign``; dropped from ``sites``, found again without them: their other calls were detached)."""
    while (found := discover(module, loss, list(sites.values()), diff, frozen, batch)).foreign:
        for path in found.foreign:
            if path in sites:  # (unless dropped with a tied partner)
                _drop(sites, sites[path], _FOREIGN_TENSORS, reasons)
    return found


_FOREIGN_TENSORS = (
    "is called with another weight or bias than its parameter (`torch.func.functional_call` on the layer, a masked "
    "or generated weight) or one computed in the forward"
)


def _reached_elsewhere(
    module: nn.Module, loss: ExampleLossFn, sites: list[Site], diff: Tensors, frozen: Tensors, examples: Any,
    leaked: Tensors,
) -> set[str]:
    """The parameters gradient reaches with every site's own use detached (``leaked``: on the first example) on the
    first example or on the others the batching check runs (``checked_rows``): another use of a site's parameter may
    give an example no gradient (an empty bag, a feature that is zero: 3-75% off, silently, when only the first
    example was asked)."""
    reached = _reached(leaked)
    rows = [row for row in checked_rows(examples, [loss]).tolist() if row]  # (the first example's: ``leaked``)
    run = partial(discover, module, loss, sites, diff, frozen)
    if rows and _batchable(loss):  # in one run (summed over those examples, a use's gradients cancel exactly only by
        try:  # construction), unless the model fails on them together: the batching check refuses it then
            return reached | _reached(run(select_rows(examples, torch.tensor(rows)), whole=True)[1])
        except BeyondFactors:  # (not a failure of the examples run together: each alone would find it again)
            raise
        except FAILURES:  # (as the batching check catches)
            pass
    for row in rows:
        reached |= _reached(run(select_rows(examples, torch.tensor([row])))[1])
    return reached


def _reached(leaked: Tensors) -> set[str]:
    """The names of ``leaked``'s nonzero gradients (a sparse one's: an `EmbeddingBag(sparse=True)` given offsets)."""
    return {n for n, g in leaked.items() if bool((g.coalesce().values() if g.is_sparse else g).ne(0).any())}


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
        attr = name.rpartition(".")[2]
        if attr not in ("weight", "bias"):  # (loralib's Linear subclass with its `lora_A`, `lora_B`)
            return (
                f"{attr!r} is not the layer's weight or bias (a parameter {type(owner).__name__} adds: a layer's "
                f"factors give those two only)"
            )
        mine = module.get_parameter(name)
        held = sum(any(p is mine for p in m.parameters(recurse=False)) for m in module.modules())
        whose = "its tensor is" if held > 1 else "a tensor of its layer is"
        return f"{whose} shared with a module that is not a factor site (weight tying)"
    if isinstance(owner, UNROLLED_KINDS):
        return why_not_run_unrolled(owner) or "the layer shares a parameter with another module (weight tying)"
    return why_not_a_site(owner)


def _site_reasons(site: Site, why: str, tied: Collection[str]) -> dict[str, str]:
    """Each of ``site``'s parameters' reason, ``why``; a tied site's say which of its tensors is shared (its bias,
    maybe: "tied weight" was said of it and of the layer's weight beside it, a review helper's)."""
    if not site.tied:
        return dict.fromkeys(site.names, why)
    shared = "bias" if site.bias in tied and site.weight not in tied else "weight"
    beside = f"its layer's {shared} is tied: per-example gradients from factors, formed with the {shared}'s"
    own = "tied {}: per-example gradients of every use from factors, summed"  # (by its name: its first layer's)
    return {n: own.format(n.rpartition(".")[2]) if n in tied else beside for n in site.names}


def _held_twice(sites: Iterable[Site]) -> set[str]:
    """The parameters of several sites: a tied tensor (a tied site's other parameters are its own)."""
    counts = Counter(n for site in sites for n in site.names)
    return {n for n, count in counts.items() if count > 1}


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
    if site.adjoint:
        return "transposed convolution: per-example gradients from its input and output gradient"
    if not site.kernel_ok:
        return "grouped convolution: per-example gradients from factors" if site.groups > 1 else "norm layer"
    if factored:
        return _FACTORED
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
