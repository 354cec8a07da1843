"""The impure edge of scoring: iterate the data in batches (progress bars, device moves), plan on the first batch,
fold the pure updates over checkpoints, check every result is finite, and name the example behind any failure.

Loop order: training blocks outside, checkpoints inside, test gradients computed once per checkpoint and kept, so
each training batch is differentiated once per checkpoint and no checkpoint is ever reloaded. A test side of one batch
is differentiated in the first training batch's pass (``Joining``). Renormalised scores
take the test gradient norms once, with the test representations, and the training norms inside the update.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, NamedTuple, Optional

import optree
import torch
from tqdm.auto import tqdm

from ._batching import MixedBatch, checked_as
from ._capture import batched_factors
from ._data import (
    BatchSize,
    batch_size_of,
    check_batch_structure,
    check_counted,
    count_batches,
    extreme_rows,
    is_single_batch,
    iter_batches,
    joined_rows,
    nbytes,
    num_batches,
    num_examples,
    select_rows,
    sized_automatically,
    slice_batch,
    to_device,
    warn_tensors_per_example,
)
from ._distributed import Ranks
from ._grads import refuse_recomputed, scalar_loss
from ._loss import CriterionLoss, ExampleLossFn
from ._plan import Plan, checked_forward, plan_call
from ._projection import blocks_kept
from ._representations import Representation
from ._setup import Setup, auto_batch_size, even_batches
from ._updates import Updates, renormalising
from ._validate import cause_of, floating_dtypes_met, refusal


def batches(
    setup: Setup,
    data: Any,
    where: str,
    desc: str,
    *,
    start: int = 0,
    ranks: Ranks | None = None,
    batch_size: BatchSize | None = None,
    reads: ReadAlike | None = None,
) -> Iterator[tuple[int, Any]]:
    """(offset, batch on device) pairs of the argument named ``where``, validated, with a progress bar. Offsets
    count from ``start``; with ``ranks`` only the batches whose number belongs to that rank are yielded (the others
    are read for their size only). ``batch_size`` (default ``setup.batch_size``) may be a callable asked before
    each batch (the automatic size, known once the first batch is planned). ``reads``: the call's passes over the
    data, each of which must give the first's examples again."""
    needs_target = setup.needs_target[where == "test"]
    size = setup.batch_size if batch_size is None else batch_size
    rows = num_examples(data) if callable(size) else None  # the progress bar's total follows the size
    bar = tqdm(
        iter_batches(data, size, where),
        total=num_batches(data, size),
        desc=desc,
        unit="batch",
        disable=not setup.progress,
        leave=False,
    )
    offset = start
    for i, batch in enumerate(bar):
        mine = ranks is None or i % ranks.world == ranks.rank
        if mine:
            check_batch_structure(batch, f"`{where}` batch {i}", needs_target=needs_target)
        n = batch_size_of(batch, f"`{where}` batch {i}")
        if reads is not None:
            reads.see(batch, n, offset - start, where)
        if mine and n:  # (an empty batch, a bucketing sampler's empty bucket, holds no example to score)
            yield offset, to_device(batch, setup.device, setup.dtype)
        offset += n
        if rows is not None:
            bar.total = i + 1 + count_batches(rows - (offset - start), size)
    if reads is not None:
        reads.recorded()
    counted = _COUNTED.get()
    if counted is not None and ranks is not None:
        counted.append(offset - start)


# the examples each pass of `batches` split by batch number inside a `counting_reads` block read, in turn
_COUNTED: ContextVar[list[int] | None] = ContextVar("_COUNTED", default=None)


@contextmanager
def counting_reads() -> Iterator[list[int]]:
    """The number of examples each pass of ``batches`` split by batch number (``ranks``) inside the block read, in
    turn: ranks splitting iterable data so each read all of it, so ranks given different data disagree there."""
    counted: list[int] = []
    token = _COUNTED.set(counted)
    try:
        yield counted
    finally:
        _COUNTED.reset(token)


class ReadAlike:
    """A call's passes over its training data, one per chunk of test examples: each example's digest on the first
    pass (``_digests``), which every later pass must give again. A Dataset drawing in ``__getitem__`` (random
    augmentation) or a ``collate_fn`` masking at random gave each chunk's scores other draws of the examples,
    silently; only the first batch was compared, which an augmentation of some examples alone (a class's) may leave
    alike (a review helper's)."""

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None  # [n, k] after the first pass
        self._seen: list[torch.Tensor] = []

    def see(self, batch: Any, n: int, row: int, where: str) -> None:
        if not n:  # (an empty batch: no example)
            return
        digests = _digests(batch, n)
        if self.first is None:
            self._seen.append(digests)
            return
        kept = self.first[row : row + n].to(digests.device)  # (rows past the first read's: its count is checked)
        digests = digests[: len(kept)]
        if kept.shape != digests.shape or not torch.equal(kept, digests):
            unlike = row + int((kept != digests).any(1).nonzero()[0, 0]) if kept.shape == digests.shape else row
            raise ValueError(
                f"`{where}` gave example {unlike} another value when read again (random augmentation: a Dataset "
                f"drawing in `__getitem__`, a DataLoader's `collate_fn` masking or adding noise), and this call reads "
                f"it once per chunk of test examples (their representations past `test_memory_bytes`): each chunk's "
                f"scores would be of other draws. Switch the augmentation off for scoring (or draw it from a "
                f"generator seeded by the example's index), or pass fewer test examples or a larger "
                f"`test_memory_bytes`, so that they make one chunk."
            )

    def recorded(self) -> None:
        """The first pass ended (later passes: nothing to keep)."""
        if self.first is None:
            self.first = torch.cat(self._seen) if self._seen else torch.zeros(0, 0, dtype=torch.int64)
            self._seen = []


def _digests(batch: Any, n: int) -> torch.Tensor:
    """``[n, 2 k]``: each example's sum and position-weighted sum of the bits of each of the ``k`` tensors holding a
    row per example, as integers (wrapping): exact whatever the batch it comes in (float sums rounded otherwise in
    a batch of another size: unchanged data was refused), equal on a pass that gives it again, unequal (but for a
    contrived draw) on one that changes its values or their order."""
    columns = []
    for t in optree.tree_leaves(batch, none_is_leaf=True):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n:
            bits = _bits(t).reshape(n, -1)
            weights = torch.arange(1, bits.shape[1] + 1, dtype=torch.int64, device=bits.device)
            columns += [bits.sum(1), (bits * weights).sum(1)]
    return torch.stack(columns, 1) if columns else torch.zeros(n, 0, dtype=torch.int64)


_SAME_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # (itemsize: an integer of its bits)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as int64: its elements' bits (a floating one's, NaN's too), a complex one's parts'."""
    t = t.to_dense() if t.layout != torch.strided else t  # (a sparse input's values)
    t = torch.view_as_real(t.resolve_conj()) if t.is_complex() else t.resolve_conj().resolve_neg()
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    return t.contiguous().view(_SAME_WIDTH[t.element_size()]).to(torch.int64)


Scored = Optional[Callable[[], Any]]  # reads the first examples of the data a plan scores in batches (see plan_call)


class Planned(NamedTuple):
    updates: Updates
    batch_size: BatchSize  # of the batches after the planned one: the automatic size follows the plan
    most: int  # examples per batch at most


def _planned(
    setup: Setup,
    batch: Any,
    where: str,
    offset: int,
    *,
    self_only: bool = False,
    partners: int | None = None,
    scored: Scored = None,
    sized_by: Scored = None,
    pool: Any = None,
    read: Sequence[tuple[str, Any, int]] = (),
) -> Planned:
    loss = setup.test_loss if where == "test" else setup.train_loss
    with naming_failures(loss, setup, batch, where, offset, read):
        planned = plan_call(
            setup, batch, where, self_only=self_only, partners=partners, scored=scored, sized_by=sized_by, pool=pool
        )
    updates = Updates(*(torch.compile(fn) for fn in planned.updates)) if setup.compile else planned.updates
    most = most_per_batch(setup, planned.plan)
    return Planned(updates, even_batches(most) if setup.auto_batch else most, most)


def most_per_batch(setup: Setup, plan: Plan) -> int:
    """Examples per batch at most: ``batch_size=``, or the automatic size for the plan's bytes per example."""
    if not setup.auto_batch:
        return setup.batch_size
    return auto_batch_size(plan.example_bytes, setup.device, tensor_bytes=plan.tensor_bytes)


# Planning reads an example or two (the forward check, discovery) and the batching check's first four.
_PLANNING_EXAMPLES = 4


def planned_batches(
    setup: Setup,
    data: Any,
    where: str,
    desc: str,
    *,
    self_only: bool = False,
    partners: int | None = None,
    scored: Scored = None,
    sized_by: Scored = None,
    beside: Any = None,
    read: Sequence[tuple[str, Any, int]] = (),
    **where_from: Any,
) -> Iterator[tuple[Planned, int, Any]]:
    """``batches`` of ``data``, the call planned on the first: (plan, offset, batch) triples. With the automatic
    size, a batch or a ``Dataset`` is planned on its first examples, so that the plan sizes every batch, the first
    too (not a guess made before the plan: 128 + 72 of 200 examples where the plan asks for one batch or two of 100);
    a ``DataLoader``'s or other iterable's batches are the user's. ``scored``: other data the plan scores in
    batches (influence's training data; see ``plan_call``), and ``partners`` the products each of its gradients takes
    part in. ``beside``: that data's ``checking_pool``, for the batching check to pick its examples among too (one loss
    scores both); ``read``: that data, named, and the index of its first example (``(name, data, start)``), where a
    failure of planning is looked for (``naming_failures``)."""
    planned: Planned | None = None
    read = ((where, data, where_from.get("start", 0)), *read)
    if setup.auto_batch and num_examples(data):
        head, start = first_examples(setup, data, where), where_from.get("start", 0)
        planned = _planned(
            setup, head, where, start, self_only=self_only, partners=partners, scored=scored, sized_by=sized_by,
            pool=planning_pool(setup, head, data, where, beside), read=read,
        )

    def size(left: int) -> int:  # the automatic size, once the plan says how large an example's gradients are
        return setup.batch_size if planned is None else _size(planned.batch_size, left)

    passes = batches(setup, data, where, desc, batch_size=size if setup.auto_batch else None, **where_from)
    for offset, batch in _first_looked_at(data, passes, where_from.get("start", 0)):
        planned = planned or _planned(
            setup, batch, where, offset, self_only=self_only, partners=partners, scored=scored, sized_by=sized_by,
            pool=joined_pool(batch, beside), read=read,
        )
        yield planned, offset, batch


def _first_looked_at(data: Any, passes: Iterator[tuple[int, Any]], start: int) -> Iterator[tuple[int, Any]]:
    """``passes`` (``batches`` of ``data`` from ``start``), ``data`` (a single batch) or its first batch looked at for
    tensors per example (``warn_tensors_per_example``)."""
    single = is_single_batch(data)
    if single:
        warn_tensors_per_example(data)
    for offset, batch in passes:
        if offset == start and not single:
            warn_tensors_per_example(batch)
        yield offset, batch


def planning_pool(setup: Setup, head: Any, data: Any, where: str, beside: Any = None) -> Any:
    """The examples the batching check picks among where a call plans on ``head``, the first examples of ``data``
    the automatic size cuts: those and more of ``data``'s (``checking_pool``), and ``beside`` (the other side's, one
    loss scoring both); None for ``head`` alone."""
    more = checking_pool(setup, data, where) if num_examples(data) > _PLANNING_EXAMPLES else None
    return joined_pool(head, more, beside)


def joined_pool(examples: Any, *others: Any) -> Any:
    """``examples`` (the first is the one planned on) with each of ``others`` whose rows join them, or None for
    ``examples`` alone."""
    pool = examples
    for rows in others:
        joined = None if rows is None else joined_rows(pool, rows)  # (None where not alike: another width)
        pool = pool if joined is None else joined
    return None if pool is examples else pool


def first_examples(setup: Setup, data: Any, where: str) -> Any:
    """The first examples of ``data`` (a batch's or a ``Dataset``'s as many as planning reads, an iterable's first
    batch), checked and on device; None when it holds none (the call says so where it reads the data), or its first
    batch is empty (a bucketing sampler's empty bucket: skipped where the data is scored). ``data`` (a single batch)
    or its first batch looked at for tensors per example, before planning runs the loss on rows cut from them."""
    head = next(iter_batches(data, _PLANNING_EXAMPLES, where), None)
    if head is not None and (is_single_batch(data) or not sized_automatically(data)):  # (a Dataset's head is cut
        warn_tensors_per_example(data if is_single_batch(data) else head)  # by planning: its scored batches tell)
    if head is None or not batch_size_of(head, f"`{where}`" if is_single_batch(data) else f"`{where}` batch 0"):
        return None
    check_batch_structure(head, f"`{where}` batch 0", needs_target=setup.needs_target[where == "test"])
    return to_device(head, setup.device, setup.dtype)


def checking_pool(setup: Setup, data: Any, where: str) -> Any:
    """Those of a single batch's first examples (``_CHECKING_POOL_EXAMPLES`` at most, ``_CHECKING_POOL_BYTES`` of
    data) at the ends of each padding signal's range (``extreme_rows``), on device, for the batching check to pick
    its own among (``_batching.checked_rows``), so that the first batch the plan sizes rarely reaches beyond them (each
    batch that does is checked again); None for other data, or where not one example fits in those bytes."""
    rows = _pool_rows(data, where)
    return None if rows is None else to_device(select_rows(data, rows), setup.device, setup.dtype)


def _pool_rows(data: Any, where: str) -> torch.Tensor | None:
    """The indices of ``checking_pool``'s examples in ``data``, or None."""
    if not is_single_batch(data) or not (n := batch_size_of(data, f"`{where}`")):
        return None
    k = min(n, _CHECKING_POOL_EXAMPLES, _CHECKING_POOL_BYTES // max(1, nbytes(data) // n))
    return extreme_rows(slice_batch(data, 0, k)) if k else None


_CHECKING_POOL_EXAMPLES, _CHECKING_POOL_BYTES = 4096, 16 << 20


def _size(batch_size: BatchSize, left: int) -> int:
    return batch_size(left) if callable(batch_size) else batch_size


def _an_examples_error(err: Exception) -> bool:
    """Whether ``err`` may be an example's own (torch's, the model's), which running examples alone can name: not a
    refusal of ours (it starts with the argument's name), a non-finite score (named where it is checked), nor a
    DataLoader's worker process dying (torch raises it from a signal handler, wherever the call then is: it was
    blamed on the model's batched pass, `factored=False` advised; a review helper's)."""
    return not (isinstance(err, FloatingPointError) or refusal(err) or _WORKER_DIED in str(err))


_WORKER_DIED = "DataLoader worker (pid"  # (torch's "DataLoader worker (pid(s) ...) exited unexpectedly")


@contextmanager
def naming_failures(
    loss: ExampleLossFn, setup: Setup, batch: Any, where: str, offset: int, read: Sequence[tuple[str, Any]] = ()
) -> Iterator[None]:
    """Re-raise an error of a batch with the index of the first example whose loss alone raises (e.g. a class
    label outside the model's outputs), found by the same guarded dry run as planning; errors of our own (they
    start with the argument's name) and errors that no single example reproduces pass unchanged. ``read``: other
    data planning read examples of (``(name, data, index of its first example)``: the first ones and the batching
    check's pool), tried after ``batch``'s."""
    try:
        yield
    except Exception as err:
        if not _an_examples_error(err):
            raise
        for name, index, example in _candidates(batch, where, offset, read):
            example = to_device(example, setup.device, setup.dtype)
            try:
                checked_forward(setup, loss, example, name)
            except Exception as cause:
                if refusal(cause):
                    raise
                message = f"`{name}` example {index} cannot be scored: {type(cause).__name__}: {cause}"
                if "no rule registered for HigherOrderOperator" in str(cause):  # (torch's hint: change our mode)
                    message = f"`{name}` example {index} cannot be scored: {_HIGHER_ORDER}"
                elif "more than 1 value per channel" in str(cause):
                    message += f". {_ONE_VALUE_PER_CHANNEL}"
                elif "does not require grad and does not have a grad_fn" in str(cause):
                    message += f". {_GRADIENT_IN_THE_LOSS}"
                elif "cannot register a hook on a tensor that doesn't require gradient" in str(cause):
                    message += f". {_HOOK_WITHOUT_GRADIENT}"
                elif isinstance(loss, CriterionLoss) and "positional argument" in str(cause):
                    inputs = _POSITIONAL_INPUTS if _raised_by_model(setup.spec.module, cause) else _CRITERION_ARGUMENTS
                    message += f". {inputs}"
                elif narrow := _narrow_integer_target(str(cause), example):
                    message += f". {narrow}"
                elif isinstance(loss, CriterionLoss) and (held := _weights_of(loss.criterion, cause)) and _raised_in(
                    loss.criterion, cause
                ):
                    message += (
                        f". `loss_fn` holds {held}: each example's loss is computed alone, so a criterion's weights "
                        f"must broadcast against one example's outputs (one per class or output), not hold one per "
                        f"example: pass sample weights in the data, read by a `tc.BatchLoss` weighting each example's "
                        f"loss"
                    )
                elif "index out of range in self" in str(cause):
                    inputs = example[:-1] if isinstance(loss, CriterionLoss) else example  # (not the target)
                    message += f". {_past_an_embedding(inputs, setup.spec.module)}"
                elif "values to unpack" in str(cause) and any(  # (``((x1, x2), (y, w))`` given alone: a review
                    n == name and isinstance(d, tuple) and not is_single_batch(d) for n, d, _ in read  # helper's)
                ):
                    message += f". {_READ_AS_BATCHES}"
                elif floating_dtypes_met(str(cause)):
                    message += (
                        f". The call computes in {setup.dtype} (`dtype=`: parameters and inputs converted), and the "
                        f"model makes a tensor of another dtype itself (a mask, a `.float()` / `.double()` cast) "
                        f"or runs an op that takes one dtype only (quantization's fake-quant, a grouped matrix "
                        f"product as transformers' `grouped_mm` experts run: float32), or holds one an earlier "
                        f"forward computed (a cache of class embeddings filled before the call: clear it first, or "
                        f"every checkpoint would be scored with it): pass the dtype the model computes in, or have it "
                        f"follow its input's (Mixture-of-experts models of transformers: "
                        f"`model.config._experts_implementation = 'eager'` for float64)"
                    )
                try:
                    named = type(cause)(message)
                except Exception:
                    named = RuntimeError(message)
                raise named from cause
            cause = _backward_error(loss, setup, example)
            if isinstance(cause, RuntimeError):
                refuse_recomputed(cause)  # (the model's checkpointing, not the example)
            if cause is not None:
                why = cause_of(cause).rstrip('.')
                if "returned nan values" in str(cause) and torch.is_anomaly_enabled():
                    raise ValueError(
                        f"`{name}` example {index} cannot be scored: its gradient is not finite, which anomaly mode "
                        f"(`torch.autograd.set_detect_anomaly(True)`, on) raises as an error ({why}). Fix the example "
                        f"or the op; with anomaly mode off, a call names every example whose gradient is not finite."
                    ) from err
                fix = _CUDNN_RNN_FIX if "cudnn RNN backward" in str(cause) else (
                    "Make `torch.autograd.grad` of one example's loss work first "
                    "(`torch.autograd.set_detect_anomaly(True)` names the op that fails)."
                )  # fmt: skip
                raise ValueError(
                    f"`{name}` example {index} cannot be scored: the backward pass of its loss fails, with plain "
                    f"autograd too ({why}). {fix}"
                ) from err
        if _in_batched_pass(err):
            n = batch_size_of(batch, where)
            raise ValueError(
                f"`{where}` examples {offset}-{offset + n - 1} (a batch of {n}) cannot be scored batched: the model's "
                f"batched forward / backward fails on them ({cause_of(err)}), while each of them alone runs, and the "
                f"examples the call was planned on did not show it. Pass `factored=False` (each example's gradient "
                f"by vmap(grad), or one at a time), or keep the model's computation the same for any batch."
            ) from err
        raise


def _in_batched_pass(err: Exception) -> bool:
    """Whether ``err`` was raised inside a scoring pass's batched forward / backward (``batched_factors``, not
    planning's: ``plan_call``), not memory running out (CUDA's or the CPU allocator's: a smaller batch is the fix)."""
    if isinstance(err, torch.OutOfMemoryError) or any(s in str(err).lower() for s in _OUT_OF_MEMORY):
        return False
    codes = set()  # (by identity: a code object dynamo rewrote may hold a dict, unhashable, and hid dynamo's error)
    tb = err.__traceback__
    while tb is not None:
        codes.add(id(tb.tb_frame.f_code))
        tb = tb.tb_next
    return id(batched_factors.__code__) in codes and id(plan_call.__code__) not in codes


_OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def _candidates(
    batch: Any, where: str, offset: int, read: Sequence[tuple[str, Any, int]]
) -> Iterator[tuple[str, int, Any]]:
    """``(name, index, example)``: ``batch``'s examples, then those planning read of the ``read`` data (single
    batches: their first examples and ``checking_pool``'s)."""
    yield from ((where, offset + i, slice_batch(batch, i, i + 1)) for i in range(batch_size_of(batch, where)))
    for name, data, start in read:
        if not is_single_batch(data):
            continue
        pool = _pool_rows(data, name)
        rows = range(min(_PLANNING_EXAMPLES, batch_size_of(data, name)))
        for i in dict.fromkeys([*rows, *([] if pool is None else pool.tolist())]):
            yield name, start + i, slice_batch(data, i, i + 1)


def _weights_of(criterion: Any, cause: BaseException) -> str:
    """A criterion's weight tensors (``weight=``, ``pos_weight=``; a partial's keywords) whose rows make the shape
    torch's broadcast error names (one example's loss against weights of several rows: a full-batch GLM's sample
    weights raised it, blaming the data; a review helper's), in words, or ``""``."""
    rows = re.search(r"broadcast shape \[(\d+)", str(cause))
    keywords = getattr(criterion, "keywords", None) or {}
    held = [(name, getattr(criterion, name, None) if name not in keywords else keywords[name])
            for name in ("weight", "pos_weight")]  # fmt: skip
    return ", ".join(f"`{name}` of shape {list(t.shape)}" for name, t in held if rows and isinstance(t, torch.Tensor)
                     and t.dim() and 1 < t.shape[0] == int(rows.group(1)))  # fmt: skip


def _raised_in(criterion: Any, cause: BaseException) -> bool:
    """Whether ``cause`` was raised within ``criterion``'s call (not the model's: its broadcast bug was told of the
    criterion's weights; a sweep's find)."""
    called = getattr(criterion, "func", criterion)  # (a partial's function)
    code = getattr(type(called).forward if isinstance(called, torch.nn.Module) else called, "__code__", None)
    tb, codes = cause.__traceback__, set()
    while tb is not None:
        codes.add(tb.tb_frame.f_code)
        tb = tb.tb_next
    return code in codes


def _past_an_embedding(example: Any, module: Any) -> str:
    """What to say of torch's "index out of range in self" (an embedding's lookup past its size, or negative): the
    example's integer inputs' ranges and the model's embeddings' sizes (RoBERTa's one token type given BERT's two, a
    token id past the vocabulary: named neither input nor size before; a review helper's)."""
    named = example.items() if isinstance(example, Mapping) else (
        (f"input {i}", x) for i, x in enumerate(example if isinstance(example, (tuple, list)) else [example]))
    ranges = [f"{name} {int(x.min())}..{int(x.max())}" for name, x in named if isinstance(x, torch.Tensor)
              and x.numel() and not x.is_floating_point() and x.dtype != torch.bool]  # fmt: skip
    sizes = [f"{path} {m.num_embeddings}" for path, m in (module.named_modules() if module is not None else ())
             if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]  # fmt: skip
    return (
        f"An index is negative or at or past an embedding's size: the example's integer inputs range over "
        f"{', '.join(ranges) or '-'}; the model's embeddings hold {', '.join(sizes[:8]) or '-'} rows (ids from "
        f"another tokenizer or config, a `token_type_ids` the model has no second type for, padding of -100)"
    )


def _narrow_integer_target(error: str, example: Any) -> str | None:
    """Where torch's ``error`` is a loss's on an example's integer target other than int64 (from NumPy's int32, a
    uint8 mask: "expected target dtype to be Long", "result type Double can't be cast to ... Byte"), what to say of
    it: a tuple example's last entry, a dict example's ``labels`` (Hugging Face's)."""
    if isinstance(example, (tuple, list)) and len(example) > 1:
        target, name, held = example[-1], "target is", "y"
    elif isinstance(example, Mapping):
        target, name, held = example.get("labels"), "`labels` are", "labels"
    else:
        return None
    narrow = isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dtype != torch.int64
    if not (narrow and ("target dtype" in error or "can't be cast to the desired output type" in error)):
        return None
    return (
        f"Its {name} {target.dtype}: class indices are `{held}.long()`, probabilities and binary targets "
        f"`{held}.float()`"
    )


_HIGHER_ORDER = (  # (torch's own message asked to change the library's dispatch mode: a review helper's)
    "the model calls one of torch's higher-order ops (`torch.cond`, `torch.while_loop`, ...), which the call's checks, "
    "a torch dispatch mode, cannot run (and torch then leaves the op unusable in the process: its own bug); write the "
    "branch as `torch.where` over both branches"
)
_READ_AS_BATCHES = (
    "The data, a tuple holding no tensor at its top level, was read as batches, each its own: if it is one batch, "
    "`((x1, x2), (y, w))`, give it as `[batch]` (a batch given alone holds a tensor at its top level)"
)
# torch's BatchNorm over a batch of one example of one value per channel
_ONE_VALUE_PER_CHANNEL = (
    "A BatchNorm without running statistics (`track_running_stats=False`) normalises over the batch even in eval "
    "mode, and one example alone (as its gradient is defined here) holds one value per channel: keep running "
    "statistics (`track_running_stats=True`, the default) for scoring"
)

# a loss or forward taking a gradient itself (an input-gradient penalty), run by the checks without gradients
_GRADIENT_IN_THE_LOSS = (
    "Where the loss or the model takes a gradient itself (`torch.autograd.grad`, an input-gradient penalty), take it "
    "under `with torch.enable_grad():`: the library's checks run the loss with gradients off, as `torch.no_grad()` "
    "does (the gradients scored are taken by the library); and one with respect to an input (a PINN's coordinates) "
    "of that input made a leaf there, `x = batch[0].detach().requires_grad_()`: inputs are given as values, without "
    "`requires_grad`; one with respect to the model's parameters (a MAML inner step), of those made leaves where they "
    "need it, `p = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}`: the "
    "checks give the parameters as values too"
)

# a gradient hook put on in the forward, on a tensor the call does not differentiate
_HOOK_WITHOUT_GRADIENT = (
    "The forward puts a gradient hook on a tensor that needs no gradient in this run: the call runs the forward on "
    "the checkpoint's tensors, which need none where they are not scored and in its checks (the model's parameters "
    "always do). Put the hook on only where one is taken: `if t.requires_grad: t.register_hook(fn)`"
)

# a criterion's batch handed to a forward of other arguments
_POSITIONAL_INPUTS = (
    "A criterion's batch `(x1, ..., xk, y)` gives the model every element but the last, positionally: inputs it "
    "takes by keyword (`mask=`) need a dict batch and a `tc.BatchLoss` / `tc.ExampleLoss` calling it, and values no "
    "input takes (metadata) must be left out of the batch (by the `collate_fn`); a batch given alone holds a tensor "
    "at its top level, so one of nested inputs and targets, `((x1, x2), (y1, y2))`, reads as two batches: give it as "
    "`[batch]` or `(x1, x2, (y1, y2))`"
)

# a criterion of more arguments than outputs and targets
_CRITERION_ARGUMENTS = (
    "A criterion is called as `loss_fn(outputs, targets)`: one taking more (`nn.GaussianNLLLoss`'s `var`, a model's "
    "output too) needs a `tc.BatchLoss` / `tc.ExampleLoss` calling it with them"
)


def _raised_by_model(module: Any, cause: BaseException) -> bool:
    """Whether ``cause`` (torch's "missing ... positional argument") names a forward of the model's layers: else the
    criterion's own call, or a function it calls (`functools.partial(F.gaussian_nll_loss)`: a review helper's)."""
    named = str(cause)
    return module is None or any(f"{type(m).__name__}.forward()" in named for m in module.modules())


# a recurrent layer the library does not unroll (a subclass, `proj_size`), on a GPU
_CUDNN_RNN_FIX = (
    "cuDNN's recurrent kernels have no backward in eval mode, and this layer runs them: score with cuDNN off for the "
    "call (`with torch.backends.cudnn.flags(enabled=False): ...`: torch's own kernels, the same function), or on the "
    "CPU."
)


def _backward_error(loss: ExampleLossFn, setup: Setup, example: Any) -> Exception | None:
    """What plain autograd raises differentiating the loss of ``example`` (a batch of one) at the first checkpoint,
    without any of the call's hooks (RWKV in eval mode changes a tensor its backward pass needs in place), or None."""
    state = setup.checkpoints[0].state
    leaves = {n: state[n].detach().requires_grad_() for n in setup.spec.diff_names}
    try:
        with torch.enable_grad():
            total = scalar_loss(loss, {**state, **leaves}, example)
            if total.requires_grad:
                torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    except Exception as err:
        return err
    return None


def _check_finite(values: Any, example_dim: int, offset: int, where: str, ckpt: int) -> None:
    """Raise naming the examples (along ``example_dim`` of ``values``, or of each entry of a per-layer dict)
    whose scores are NaN or infinite."""
    if isinstance(values, dict):
        for v in values.values():
            _check_finite(v, example_dim, offset, where, ckpt)
        return
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)  # (min and max propagate NaN: one cheap pass, one device sync)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    finite = torch.isfinite(values)
    other = [d for d in range(values.dim()) if d != example_dim % values.dim()]
    bad = ((~finite).any(dim=other) if other else ~finite).nonzero().flatten() + offset
    every = 1 < len(bad) == values.shape[example_dim]  # (a statistic over the batch, NaN for one example alone)
    alone = (
        " Every example's is: a weight of the checkpoint not finite, or a loss NaN for any example alone (each "
        "example's loss is computed alone, where a statistic over the batch can be NaN: `(r - r.mean()) / r.std()` "
        "of one value; compute such statistics beforehand and pass them with the data)." if every else ""
    )
    raise FloatingPointError(
        f"Non-finite gradients for `{where}` examples {bad.tolist()[:10]} at checkpoints[{ckpt}]: the loss or its "
        f"gradient is NaN or infinite there, or so large that its products (times the checkpoint's `lr`) overflow "
        f"{values.dtype}"
        f"{'' if values.dtype == torch.float64 else ' (pass `dtype=torch.float64`)'}.{alone} Check those inputs and "
        f"targets, the checkpoint's weights, and the dtype "
        f"(and whether `factored=False`, one example at a time, is finite: some models' batched backward pass is not, "
        f"like Longformer's with different numbers of global tokens per example)."
    )


class Joining(NamedTuple):
    """A test batch whose representations the first training batch computes with its own, in one pass per
    checkpoint: a pass of a few test examples costs nearly a whole batch's in per-operation overhead (the unrolled
    LSTM's of 20 examples 6.5 ms, of 200 training examples 22.5 ms)."""

    offset: int
    batch: Any
    total: bool  # kept summed over its examples (a plain aggregate)
    cosine: bool  # its inverse norms kept too
    most: int  # examples per batch at most (``Planned.most``)


class Queries(NamedTuple):
    """The test side every training batch is scored against: the updates, one test representation per checkpoint
    and, for cosine scores, the test examples' inverse gradient norms per checkpoint; or the test batch the first
    training batch represents with its own (``joining``: the lists are empty until then)."""

    updates: Updates
    batch_size: BatchSize  # of the training batches (the automatic size follows the plan)
    reps: list[Representation]
    scales: list[torch.Tensor] | None  # per checkpoint ``1 / |g_test|`` [n_test] ("cosine"), else None
    normalize_train: bool  # divide by the training gradients' norms ("cosine", "train")
    sum_rows: bool  # aggregate over per-example test rows after scoring (a sum of cosines)
    rows: int  # of each score block before ``sum_rows``: the test examples (1 where summed)
    joining: Joining | None = None


# Test examples join the first training batch's pass where both fit in a batch, or where they are at most this share
# of it (beyond the memory the batch size was planned for by that share at most).
_JOINED_SHARE = 8


_SCORE_BLOCK_BYTES = 1 << 24  # one training batch's scores against a chunk of test rows, at most (automatic size)


def most_against(setup: Setup, most: int, rows: int) -> int:
    """Training examples per batch at most, ``most`` held by the automatic size to score blocks ``[rows, b]`` of
    ``_SCORE_BLOCK_BYTES`` (each about four times over, by its layers' products): 50,000 test rows took 6 GB in
    batches of 3,000."""
    fits = max(16, _SCORE_BLOCK_BYTES // max(1, rows * setup.dtype.itemsize))
    return min(most, fits) if setup.auto_batch else most


def query_chunks(
    setup: Setup,
    test: Any,
    *,
    aggregate: bool,
    normalize: str | None = None,
    budget: int | None = None,
    train: Any = None,
    train_start: int = 0,
) -> Iterator[Queries]:
    """The test side in chunks: the updates (planned on the first test batch) and one test representation per
    checkpoint, for consecutive test batches whose representations (over all checkpoints) reach ``budget`` bytes
    (None, or a plain ``aggregate``: one chunk). Each chunk is scored against the whole training data before the next
    one is formed, so memory is bounded by the budget whatever the number of test examples. Test data of one batch,
    scored by the training data's loss, comes unrepresented (``Queries.joining``: ``score_blocks`` represents it).

    Summed over test examples when ``aggregate``. With ``normalize="cosine"`` the test gradient norms come from
    the same representations (``sq_norm``, also the finiteness check), and ``aggregate`` sums per-example
    cosines: the rows stay per example and are summed after scoring."""
    cosine = normalize == "cosine"
    total = aggregate and not cosine
    one_loss = train is not None and setup.test_loss is setup.train_loss  # (a lone test batch joins a training pass)
    per_ckpt, scales, size = [[] for _ in setup.checkpoints], [[] for _ in setup.checkpoints], 0

    def queries(
        planned: Planned, reps: list[Representation], cosines: Any, rows: int, joining: Joining | None = None
    ) -> Queries:
        normalize_train, sum_rows = normalize is not None, aggregate and cosine
        return Queries(
            planned.updates, blocked(planned, rows), reps, cosines, normalize_train, sum_rows, rows, joining
        )

    def blocked(planned: Planned, rows: int) -> BatchSize:
        most = most_against(setup, planned.most, rows)
        return even_batches(most) if most < planned.most else planned.batch_size

    def chunk(planned: Planned) -> Queries:
        reps = []
        for c in range(len(per_ckpt)):  # (each checkpoint's batches let go once joined: the chunk is not held twice)
            parts, per_ckpt[c] = per_ckpt[c], []
            reps.append(Representation.concat(parts))
            del parts
        reps = [r.total() for r in reps] if total else reps
        return queries(planned, reps, [torch.cat(s) for s in scales] if cosine else None, reps[0].size)

    def represent(planned: Planned, offset: int, batch: Any) -> int:  # -> bytes kept
        kept = 0
        for c, ckpt in enumerate(setup.checkpoints):
            with naming_failures(setup.test_loss, setup, batch, "test", offset):
                rep = planned.updates.test(ckpt, batch)
            rep, scale = finished_test(rep, offset, c, total=total, cosine=cosine)
            if cosine:
                scales[c].append(scale)
            per_ckpt[c].append(rep)
            kept += nbytes(rep)
        return kept

    # the products each training gradient takes part in, where known: one per test example (few, one prediction's,
    # make factored products cheaper than forming a wide layer's training gradients) and its own norm where scores
    # are divided by it (a sum meets the rows of all of them: not counted)
    n_test = None if total else num_examples(test)
    partners = None if n_test is None else n_test + (normalize is not None)
    test_batches = planned_batches(
        setup, test, "test", "test gradients", partners=partners, **reading_training(setup, train, "train"),
        read=() if train is None else (("train", train, train_start),),
    )
    # a chunk of several batches is joined a checkpoint at a time: its batches' and one checkpoint's joined copy at once
    joined = lambda size: size + size // len(setup.checkpoints)  # noqa: E731  (found by review at 1.7-1.9x the budget)
    planned, held, kept, last = None, None, None, 0  # held: the first test batch, while it may be the only one
    for i, (planned, offset, batch) in enumerate(test_batches):
        if i == 0 and one_loss:
            held = (offset, batch)
            continue
        for at, rows in [held, (offset, batch)] if held else [(offset, batch)]:
            if budget is not None and not total and size and joined(size + last) > budget:  # (as large as the last)
                yield chunk(kept)
                per_ckpt, scales, size = [[] for _ in setup.checkpoints], [[] for _ in setup.checkpoints], 0
            kept, last = planned, represent(planned, at, rows)
            size += last
        held = None
    if planned is None:
        raise ValueError("`test` holds no examples.")
    if held is not None:
        rows = 1 if total else batch_size_of(held[1], "test")
        yield queries(planned, [], [] if cosine else None, rows, Joining(*held, total, cosine, planned.most))
    elif per_ckpt[0]:
        yield chunk(planned)


def reading_training(setup: Setup, train: Any, where: str) -> dict[str, Any]:
    """``planned_batches``' ``scored``, ``sized_by`` and ``beside`` for test data planned with training data ``train``
    (None: none). Its first examples check the plan's batching where the test data's first batch cannot (one
    example): read only then (a one-pass iterator comes wrapped to keep its first batch: ``_data.Replayed``); those of
    a batch or a Dataset, whose batches the automatic size cuts, size them (not a loader's: the user's); and with one
    loss for both sides, the check picks its examples among the training data's first too (those at the ends of its
    padding's ranges): where those reach beyond the test data's, the first training batch was checked again."""
    if train is None:
        return {"scored": None, "sized_by": None, "beside": None}
    scored = partial(first_examples, setup, train, where)
    one_loss = setup.test_loss is setup.train_loss
    return {
        "scored": scored,
        "sized_by": scored if sized_automatically(train) else None,
        "beside": checking_pool(setup, train, where) if one_loss else None,
    }


def finished_test(
    rep: Representation, offset: int, c: int, *, total: bool, cosine: bool
) -> tuple[Representation, torch.Tensor | None]:
    """A test batch's representation at checkpoint ``c`` as every training batch reads it (``for_test``; summed
    over its examples where ``total``), checked finite, and its examples' inverse norms where ``cosine``."""
    rep = rep.for_test().lifted()
    sq_norm = rep.sq_norm()
    _check_finite(sq_norm, 0, offset, "test", c)
    return rep.total() if total else rep, renormalising(rep, sq_norm, "test", offset) if cosine else None


def score_blocks(
    setup: Setup,
    queries: Queries,
    train: Any,
    desc: str,
    *,
    start: int = 0,
    ranks: Ranks | None = None,
    per_layer: bool = False,
    reads: ReadAlike | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(offset, scores [n_test, b])`` for each training batch (of this rank): sum over checkpoints of
    lr <test, train>, each term normalised as ``queries`` says; with ``per_layer`` a dict layer -> scores. The test
    batch ``queries.joining`` is represented with the first training batch (joined to it where alike: one pass).
    ``reads``: as ``batches`` takes it, shared by the call's chunks."""
    module, updates, joining = setup.spec.module is not None, queries.updates, queries.joining
    reps, scales = list(queries.reps), None if queries.scales is None else list(queries.scales)
    n_test = 0 if joining is None else batch_size_of(joining.batch, "test")

    def batch_scores(offset: int, batch: Any, joined: Any, mixed: Sequence[int]) -> Any:
        """The batch's scores, its checkpoints in turn; the test batch's representations added to ``reps`` (from a
        pass over ``joined`` where given, or of their own); ``mixed``: the examples of the joined batch found mixing,
        each checked in its own batch."""
        acc: Any = None
        if not per_layer:
            acc = torch.zeros(queries.rows, batch_size_of(batch, "train"), device=setup.device, dtype=setup.dtype)
        for c, ckpt in enumerate(setup.checkpoints):
            scored = batch  # or its representation, from the pass that represented the test batch too
            if joining is not None:
                pair = None if joined is None else _joined_pass(updates, ckpt, joined, n_test)
                if pair is None:
                    joined = None  # (a joined pass that raised is not tried again)
                    with naming_failures(setup.test_loss, setup, joining.batch, "test", joining.offset):
                        with checked_as(rows=_test_rows_checked(n_test) if mixed else ()):
                            pair = updates.test(ckpt, joining.batch), batch
                (test_rep, scored), pair = pair, None  # (held on, its training part kept the batch's storage all call)
                test_rep, scale = finished_test(test_rep, joining.offset, c, total=joining.total, cosine=joining.cosine)
                reps.append(test_rep)
                if joining.cosine:
                    scales.append(scale)
            scale = None if scales is None else scales[c]
            with naming_failures(setup.train_loss, setup, batch, "train", offset), checked_as(
                rows=[i - n_test for i in mixed if i >= n_test], every=bool(mixed)
            ):
                if per_layer:
                    acc = updates.influence_by_layer(
                        acc, ckpt, reps[c], scored, scale, queries.normalize_train, module=module
                    )
                else:
                    acc = updates.influence(acc, ckpt, reps[c], scored, scale, queries.normalize_train)
            _check_finite(acc, 1, offset, "train", c)
        return acc

    passes = batches(setup, train, "train", desc, start=start, ranks=ranks, batch_size=queries.batch_size, reads=reads)
    for offset, batch in _first_looked_at(train, passes, start):
        joined, b = None, batch_size_of(batch, "train")
        if joining is not None and (n_test + b <= joining.most or n_test * _JOINED_SHARE <= b):
            joined = joined_rows(joining.batch, batch)  # (None where not alike: padded to another width)
        try:
            acc = batch_scores(offset, batch, joined, ())
        except _JoinedMixing as found:  # (the checkpoints before scored from that pass too: all again, apart)
            del reps[len(queries.reps) :]
            if scales is not None:
                del scales[len(queries.scales) :]
            acc = batch_scores(offset, batch, None, (found.example,))
        joining = None
        if queries.sum_rows:
            acc = {k: v.sum(0, keepdim=True) for k, v in acc.items()} if per_layer else acc.sum(0, keepdim=True)
        yield offset, acc


_TEST_ROWS_CHECKED = 64  # a test batch scored apart from the training batch it was joined to: its rows checked


def _test_rows_checked(n_test: int) -> range:
    """The test examples checked at every checkpoint where a joined pass found mixing and the test batch is scored
    alone: all of them, or as many spread along the batch. The pass found examples mixing with some in the joined
    batch, which may be test examples mixing among themselves only at some checkpoints (a branch on a batch maximum
    behind a gate): one example a checkpoint, picked in turn, let a test example mixing at the earlier checkpoints
    only be scored batched (4.5% off, silently)."""
    return range(0, n_test, -(-n_test // _TEST_ROWS_CHECKED))


class _JoinedMixing(Exception):
    """A joined pass's spot check found its ``example`` (an index in the joined batch) mixing with others."""

    def __init__(self, example: int) -> None:
        super().__init__(example)
        self.example = example


def _joined_pass(updates: Updates, ckpt: Any, joined: Any, n_test: int) -> tuple[Representation, Representation] | None:
    """The test and training representations from one pass over a test batch joined to a training batch; where that
    pass raises an example's error, None: each batch alone then names the example behind it, or scores (a joined
    batch larger than the memory left). Where its spot check finds it mixing its examples, ``_JoinedMixing``: the
    joining is ours, so each batch alone is then scored, checked at that example (the model may mix only examples of
    both batches, which the user never batched together). Other refusals of the call (ours: they start with the
    argument's name) are raised as they are."""
    try:
        with checked_as(test_in_front=n_test):
            return updates.with_test(ckpt, joined, n_test)
    except MixedBatch as err:
        raise _JoinedMixing(err.example) from None
    except Exception as err:
        if not _an_examples_error(err):
            raise
        return None


def self_blocks(
    setup: Setup, data: Any, *, start: int = 0, ranks: Ranks | None = None, per_layer: bool = False
) -> Iterator[tuple[int, Any]]:
    """``(offset, [b])`` per batch: sum over checkpoints of lr |grad|^2; with ``per_layer`` a dict layer -> [b]."""
    module = setup.spec.module is not None
    blocks = planned_batches(setup, data, "data", "self-influence", self_only=True, start=start, ranks=ranks)
    for (updates, *_), offset, batch in blocks:
        acc: Any = None
        if not per_layer:
            acc = torch.zeros(batch_size_of(batch, "data"), device=setup.device, dtype=setup.dtype)
        for c, ckpt in enumerate(setup.checkpoints):
            with naming_failures(setup.train_loss, setup, batch, "data", offset):
                if per_layer:
                    acc = updates.self_influence_by_layer(acc, ckpt, batch, module=module)
                else:
                    acc = updates.self_influence(acc, ckpt, batch)
            _check_finite(acc, 0, offset, "data", c)
        yield offset, acc


def embedding_parts(
    setup: Setup,
    data: Any,
    *,
    start: int = 0,
    ranks: Ranks | None = None,
    with_self: bool = False,
    where: str = "data",
) -> Iterator[tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor | None]]]]:
    """``(offset, parts)`` per batch; ``parts`` yields, checkpoint by checkpoint as it computes them (so that a
    consumer may store each before the next exists), ``sqrt(lr) * grad`` ``[b, P]`` (or its projection) and, with
    ``with_self``, ``lr |grad|^2`` ``[b]`` from the same gradients (exact, also when the embeddings are projected),
    else None. Each batch's parts are to be consumed before the next batch. Projections generate their blocks of
    random signs once for all the batches (``blocks_kept``)."""
    with blocks_kept():
        for (updates, *_), offset, batch in planned_batches(setup, data, where, "embeddings", start=start, ranks=ranks):
            yield offset, _checkpoint_parts(setup, updates, batch, offset, where, with_self)


def _checkpoint_parts(
    setup: Setup, updates: Updates, batch: Any, offset: int, where: str, with_self: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for c, ckpt in enumerate(setup.checkpoints):
        with naming_failures(setup.train_loss, setup, batch, where, offset):
            rows, self_terms = updates.embedding(ckpt, batch, with_self)
        _check_finite(rows, 0, offset, where, c)
        yield rows, self_terms


def embedding_blocks(
    setup: Setup, data: Any, *, start: int = 0, ranks: Ranks | None = None, where: str = "data"
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, [b, C * P])`` per batch: ``embedding_parts``' checkpoints concatenated in checkpoint order."""
    for offset, parts in embedding_parts(setup, data, start=start, ranks=ranks, where=where):
        yield offset, torch.cat([rows for rows, _ in parts], dim=1)


def collect_rows(
    blocks: Iterable[tuple[int, torch.Tensor]], n: int | None, start: int = 0, where: str = "data"
) -> torch.Tensor | None:
    """The blocks' rows in one tensor (None when there are none): written into place when the number of rows
    ``n`` is known (no second copy), each of them (``where``: the data they are of, counted before it was read),
    concatenated otherwise. Offsets count from ``start``."""
    out, parts, written = None, [], 0
    for offset, block in blocks:
        if n is None:
            parts.append(block)
            continue
        if out is None:
            out = block.new_empty(n, *block.shape[1:])
        out[offset - start : offset - start + block.shape[0]] = block
        written += block.shape[0]
    if n is None:
        return torch.cat(parts) if parts else None
    check_counted(written, n, where)
    return out
