"""Scoring across processes with ``torch.distributed``: each rank computes its own part of the training data and
every rank returns the same full result.

Parts: a ``Dataset`` or a batch is split into contiguous row ranges (rank ``r`` of ``W`` takes rows
``[r n / W, (r + 1) n / W)``); any other iterable by batch number (batch ``i`` belongs to rank ``i % W``); index
shards by shard number. Results are combined exactly: a matrix or vector is filled with this rank's entries and
zeros elsewhere and summed over ranks (adding zeros is exact); top-k lists are gathered and merged. A failure on
one rank is raised on every rank (naming it), so no rank waits forever in a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import optree
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ._data import Repeated, check_counted, loader_samplers, num_examples, rows_of
from ._topk import TopK, first_k

T = TypeVar("T")


class Ranks(NamedTuple):
    """This process's share of the work: ``rank`` of ``world`` in ``group`` (None: the default group)."""

    group: Any
    rank: int
    world: int


def resolve(distributed: Any) -> Ranks | None:
    """``False`` / ``None``: one process; ``True``: the default process group; a ``ProcessGroup``: that group."""
    if distributed is None or distributed is False:
        return None
    if distributed is not True and not (dist.is_available() and isinstance(distributed, dist.ProcessGroup)):
        raise TypeError(
            f"`distributed` must be False, True (the default process group) or a torch.distributed ProcessGroup, "
            f"got {distributed!r}."
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"`distributed`={distributed!r} needs an initialised process group: launch with `torchrun` and call "
            f"`torch.distributed.init_process_group()` first (backend 'gloo' on CPU, 'nccl' on GPUs)."
        )
    if distributed is True:
        return Ranks(None, dist.get_rank(), dist.get_world_size())
    return Ranks(distributed, dist.get_rank(distributed), dist.get_world_size(distributed))


def check_device(ranks: Ranks | None, device: torch.device) -> None:
    """NCCL reduces GPU tensors only: a call computing elsewhere is refused before any work, with the fix."""
    if ranks is not None and device.type != "cuda" and dist.get_backend(ranks.group) == "nccl":
        raise ValueError(
            f"`distributed` runs over NCCL, which reduces GPU tensors only, but the call computes on `device`="
            f"{str(device)!r}: pass `device='cuda'` (each rank on its own GPU: `torch.cuda.set_device(local_rank)`), "
            f"or a gloo process group (`torch.distributed.new_group(backend='gloo')`) to score on the CPU."
        )


def row_range(n: int, ranks: Ranks) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that belong to ``ranks.rank`` (contiguous, sizes differ by at most one)."""
    return ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world


def _collective_tensor(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """gloo reduces CPU tensors; NCCL device ones: move only when the backend needs it."""
    if dist.get_backend(ranks.group) == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def sum_over_ranks(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum of ``t`` over the ranks (each rank holds its entries and zeros elsewhere, so the sum is exact)."""
    moved = _collective_tensor(t, ranks)
    dist.all_reduce(moved, group=ranks.group)
    return moved.to(t.device)


def max_over_ranks(value: int, ranks: Ranks) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    t = t.cuda() if dist.get_backend(ranks.group) == "nccl" else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ranks.group)
    return int(t.item())


def gather_objects(value: Any, ranks: Ranks) -> list[Any]:
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value, group=ranks.group)
    return out


def merge_top_k(best: TopK | None, n_rows: int, k: int, largest: bool, ranks: Ranks, like: torch.Tensor) -> TopK:
    """The top-k over every rank's lists (a rank with fewer than ``k`` candidates pads with ``-1`` / infinity)."""
    pad = float("-inf") if largest else float("inf")
    scores = torch.full((n_rows, k), pad, dtype=like.dtype, device=like.device)
    indices = torch.full((n_rows, k), -1, dtype=torch.int64, device=like.device)
    if best is not None:
        scores[:, : best.scores.shape[1]] = best.scores
        indices[:, : best.indices.shape[1]] = best.indices
    gathered = [_collective_tensor(x, ranks) for x in (scores, indices)]
    lists = [[torch.empty_like(x) for _ in range(ranks.world)] for x in gathered]
    for out, x in zip(lists, gathered):
        dist.all_gather(out, x, group=ranks.group)
    top = first_k(TopK(torch.cat(lists[1], dim=1), torch.cat(lists[0], dim=1)), k, largest)
    return TopK(top.indices.to(like.device), top.scores.to(like.device))


def on_every_rank(ranks: Ranks | None, compute: Callable[[], T]) -> T:
    """Run this rank's ``compute``; if it raises on any rank, raise on every rank (the failing rank re-raises its
    own error, the others a RuntimeError naming it), so no rank is left waiting in the next collective."""
    if ranks is None:
        return compute()
    result, error = _outcome(compute)
    _raise_on_every_rank(ranks, error)
    return result


def _outcome(compute: Callable[[], T]) -> tuple[Any, BaseException | None]:
    try:
        return compute(), None
    except BaseException as err:  # reported to the other ranks, then re-raised (a KeyboardInterrupt too: the others
        return None, err  # waited for it in the next collective, or paired it with another call's; a review helper's)


def _raise_on_every_rank(ranks: Ranks | None, error: BaseException | None) -> None:
    """Raise ``error`` (this rank's, or None) here, and a RuntimeError naming it on the other ranks."""
    if ranks is None:
        if error is not None:
            raise error
        return
    failures = _gathered("the failures", None if error is None else f"{type(error).__name__}: {error}", ranks)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed, so this rank stops too: {message}")


def _gathered(step: str, value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, gathered at the call's ``step`` on every rank: raised on every rank where they are at
    different steps (ranks calling different scorers, or one a scorer on an index and another on data: a rank's
    compared arguments were read as another's failure, or a raw `KeyError`; a review helper's)."""
    seen = gather_objects((step, value), ranks)
    steps = [s for s, _ in seen]
    if any(s != steps[0] for s in steps):
        shown = [s if len(s) < 90 else s[:87] + "..." for s in steps]
        raise ValueError(
            f"The ranks are at different steps of a call: {shown} (rank by rank). With `distributed=`, every rank "
            f"makes the same call, with the same arguments."
        )
    return [v for _, v in seen]


def agree(ranks: Ranks | None, **values: Any) -> None:
    """Raise on every rank unless every rank holds the same ``values`` (e.g. data sizes): results are combined by
    position, so ranks that were given different data would mix unrelated rows."""
    if ranks is None:
        return
    seen = _gathered(f"the arguments compared ({', '.join(values)})", values, ranks)
    for key in values:
        per_rank = [v[key] for v in seen]
        if any(v != per_rank[0] for v in per_rank):
            shown = per_rank if len(repr(per_rank)) < 200 else "different values"
            raise ValueError(
                f"The ranks disagree on {key}: {shown} (rank by rank). With `distributed=`, pass every rank the "
                f"same arguments and the same, whole data: each rank takes its own share."
            )


def checked_on_every_rank(distributed: Any, check: Callable[[], T]) -> T:
    """A call's checks of its arguments (``check()``, returning the checked values) raised on every rank where they
    raise on one: a value refused on one rank alone (``k=0`` there) left the others in the call's first collective,
    where gloo failed with a connection error or waited 30 minutes. ``check`` runs before ``distributed`` is read:
    where both are wrong, the argument's error is raised (``distributed``'s hid it)."""
    result, error = _outcome(check)
    ranks, refused = _outcome(lambda: resolve(distributed))
    if refused is not None:  # (no group to tell the other ranks: they share this rank's `distributed` or hang)
        raise error if error is not None else refused
    _raise_on_every_rank(ranks, error)
    return result


def set_up_on_every_rank(
    distributed: Any, set_up: Callable[[], T], *, checkpoints_compared: bool = True, **agreed: Any
) -> T:
    """A call's checks and setup (``set_up()``, returning a ``Setup``) run on every rank, raised on every rank where
    they raise on one (before: the others waited in the first collective, 30 minutes by gloo's default), and refused
    where the ranks were given other ``agreed`` arguments or other checkpoints (mixed into one result, silently; a
    ``k`` given otherwise aborted the process in gloo's all_gather). ``checkpoints_compared=False``: the checkpoints
    are not summed here, where ``set_up`` checked them already against a digest the ranks agree on (an index's
    fingerprint: every tensor's bytes), which the sums would check a second time (a pass over every tensor)."""
    ranks = resolve(distributed)
    if ranks is None:
        return set_up()
    setup = on_every_rank(ranks, set_up)
    from ._fingerprint import describe_loss  # (it imports the setup, which imports this module)

    losses = (setup.train_loss, setup.test_loss)

    agree(
        ranks,
        **agreed,
        **{  # (in this order: the checkpoints' sums, taken in the call's dtype, differ where the dtype does)
            "the computation dtype (`dtype`)": str(setup.dtype),
            "the parameters differentiated (`params`, `layers`, `method`)": (setup.spec.diff_names, setup.method),
            "the options shaping the work (`factored`, `batch_size`, `chunk_size`, `test_memory_bytes`)": (
                setup.factored, None if setup.auto_batch else setup.batch_size, setup.chunk_size, setup.test_budget
            ),
            "the losses (`loss_fn`, `test_loss_fn`)": [describe_loss(loss, setup.spec.module) for loss in losses],
            **(
                {"the checkpoints (their learning rates, tensors' sums and optimizer states' sums)": _summary(setup)}
                if checkpoints_compared
                else {}
            ),
        },
    )
    return setup


_SUMMED = 1 << 20  # elements weighed by position at a time


def _summary(setup: Any) -> list[Any]:
    """Each checkpoint's learning rate and each tensor's name, shape and sum (its optimizer state's too, and its
    elements weighed by position: a permutation of equal sum is another), equal on every rank given equal ones."""

    def summed(t: torch.Tensor) -> tuple[Any, ...]:
        flat, weighted = t.detach().reshape(-1), torch.zeros((), dtype=torch.float64, device=t.device)
        for start in range(0, flat.numel(), _SUMMED):  # (in parts: no float64 copy of a whole tensor)
            part = flat[start : start + _SUMMED].to(torch.float64)
            positions = torch.arange(start + 1, start + part.numel() + 1, dtype=torch.float64, device=part.device)
            weighted += part @ positions
        return tuple(t.shape), repr(t.sum(dtype=torch.float64).item()), repr(weighted.item())  # (a NaN: alike)

    def tensors(tree: Any) -> list[torch.Tensor]:
        return [t for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor)]

    return [
        (float(c.lr), [(n, summed(t)) for n, t in sorted(c.state.items())], [summed(t) for t in tensors(c.adam)])
        for c in setup.checkpoints
    ]


def check_whole(data: Any, where: str, distributed: Any) -> None:
    """Refuse, where ``distributed`` is set, data a ``DistributedSampler`` already split: the training data each rank
    takes its share of, the test data every rank scores whole (split, each rank's test half was scored against its
    own share of the training rows and the halves summed, silently; an index built of one rank's rows)."""
    loader = data.data if isinstance(data, Repeated) else data  # (a DataLoader with a sampler of the user's)
    samplers = loader_samplers(loader) if isinstance(loader, DataLoader) and distributed not in (None, False) else ()
    if any(isinstance(sampler, DistributedSampler) for sampler in samplers):  # (also inside a BatchSampler)
        raise ValueError(
            f"{where} is a DataLoader with a DistributedSampler, which already gives each rank a part of it; with "
            f"`distributed=` every rank passes the whole data (the Dataset, or a DataLoader over all of it) and the "
            f"call shares it out."
        )


def share(data: Any, ranks: Ranks | None) -> tuple[Any, int, Ranks | None]:
    """``(this rank's data, the index of its first example, ranks to split by batch number or None)``: sized data
    (a batch, a ``Dataset``) by row range, any other iterable by batch number."""
    if ranks is None:
        return data, 0, None

    def check() -> int | None:
        check_whole(data, "The data", True)
        return num_examples(data)  # (in the check: a size that cannot be read on one rank is raised on every rank)

    n = on_every_rank(ranks, check)  # (refused on one rank only, it left the others in the next collective)
    agree(ranks, **{"the number of examples": n})
    if n is None:
        return data, 0, ranks
    start, stop = row_range(n, ranks)
    return rows_of(data, start, stop), start, None


def _length(block: Any, dim: int) -> int:
    return next(iter(block.values())).shape[dim] if isinstance(block, dict) else block.shape[dim]


def laid_out(
    blocks: Iterable[tuple[int, Any]],
    rows: int,
    n: int,
    like: torch.Tensor,
    *,
    into: Any = None,
    at: int = 0,
    where: str | None = None,
) -> Any:
    """``[rows, n]`` holding each ``(offset, [r, b])`` block at its columns (``{name: block}``: a result per name),
    written as the blocks come, zeros where none lands (other ranks' columns: ``summed``): the result is held once (its
    blocks kept, then joined, held it twice: a 400 MB influence matrix peaked at 800 MB). ``into``: a result an earlier
    call made, whose rows from ``at`` on the blocks' are (the chunks of test rows of one call: each chunk's result,
    then all joined, held it twice too). ``where``: the data of the ``n`` columns, counted before they were read, each
    of which must be written (one process). ``like``: the dtype and device of the result."""
    out, written = into, 0
    for offset, block in blocks:
        if out is None:
            zeros = lambda: torch.zeros(rows, n, dtype=like.dtype, device=like.device)  # noqa: E731
            out = {name: zeros() for name in block} if isinstance(block, dict) else zeros()
        for name, part in block.items() if isinstance(block, dict) else [(None, block)]:
            target = out if name is None else out[name]
            target.narrow(0, at, part.shape[0]).narrow(1, offset, part.shape[1]).copy_(part)
        written += part.shape[1]
    if where is not None:
        check_counted(written, n, where)
    return out if out is not None else torch.zeros(rows, n, dtype=like.dtype, device=like.device)


def summed(t: Any, ranks: Ranks | None) -> Any:
    """``t`` summed over the ranks (``laid_out`` results, each rank's columns; a dict of them, each), or ``t`` in one
    process."""
    if ranks is None:
        return t
    if isinstance(t, dict):
        return {name: sum_over_ranks(v, ranks) for name, v in t.items()}
    return sum_over_ranks(t, ranks)


def join(
    blocks: list[tuple[int, Any]], dim: int, ranks: Ranks | None, like: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """One result from ``(offset, block)`` pairs laid along ``dim`` (blocks are tensors or ``{name: tensor}``),
    over every rank when ``ranks`` is given (each rank fills its columns of a zero result, then a sum over ranks).
    None when no rank holds any block. ``like``: the dtype and device of the result."""
    if ranks is None:
        if not blocks:
            return None
        first = blocks[0][1]
        if isinstance(first, dict):
            return {key: torch.cat([b[key] for _, b in blocks], dim) for key in first}
        return torch.cat([b for _, b in blocks], dim)
    n = max_over_ranks(max((o + _length(b, dim) for o, b in blocks), default=0), ranks)
    shape_of = lambda b: {k: list(v.shape) for k, v in b.items()} if isinstance(b, dict) else list(b.shape)  # noqa: E731
    layouts = [x for x in gather_objects(shape_of(blocks[0][1]) if blocks else None, ranks) if x is not None]
    if not layouts:
        return None

    def assemble(shape: list[int], pick: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        shape[dim] = n
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        for offset, block in blocks:
            part = pick(block)
            out.narrow(dim, offset, part.shape[dim]).copy_(part)
        return sum_over_ranks(out, ranks)

    if isinstance(layouts[0], dict):
        return {key: assemble(shape, lambda b, key=key: b[key]) for key, shape in layouts[0].items()}
    return assemble(layouts[0], lambda b: b)


def stack_top_k(
    chunks: list[tuple[TopK | None, int]], k: int, largest: bool, ranks: Ranks | None, like: torch.Tensor
) -> TopK:
    """One ``TopK`` from the lists of consecutive test chunks ``(this rank's top-k or None, rows)``, merged over
    the ranks first when ``ranks`` is given."""
    if ranks is not None:
        chunks = [(merge_top_k(best, rows, k, largest, ranks, like), rows) for best, rows in chunks]
    if len(chunks) == 1:
        return chunks[0][0]
    return TopK(torch.cat([b.indices for b, _ in chunks]), torch.cat([b.scores for b, _ in chunks]))
