"""The stateless scorer: pure per-checkpoint updates, folded over checkpoints for each block of training data.

Loop order (DESIGN.md): training blocks outside, checkpoints inside, test gradients computed once per checkpoint
and cached. Each checkpoint is prepared once per call; each training batch is differentiated once per checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ._data import batch_size_of, check_batch_structure, iter_batches, num_batches, num_examples, to_device
from ._factored import RepFn
from ._model import Prepared
from ._reps import Grads


class Updates(NamedTuple):
    """Pure functions of one checkpoint and one batch; each may be wrapped by ``torch.compile``."""

    cross: Callable[..., torch.Tensor]  # (acc, diff, frozen, lr, test_rep, batch) -> acc + lr <test, train>
    self: Callable[..., torch.Tensor]  # (acc, diff, frozen, lr, batch) -> acc + lr |train|^2
    embed: Callable[..., torch.Tensor]  # (diff, frozen, lr, batch) -> sqrt(lr) train gradients, [B, P]
    test: Callable[..., Grads]  # (diff, frozen, batch) -> test gradient representation


def make_updates(
    train: RepFn, test: RepFn, *, projection: tuple[int, int] | None = None, compile: bool = False
) -> Updates:
    """The per-checkpoint updates of every scorer, built on the given gradient-representation functions.

    ``projection = (k, seed)`` makes ``embed`` return seeded ``[B, k]`` projections instead of full gradients.
    """

    def cross(acc, diff, frozen, lr, test_rep: Grads, batch):
        return acc + lr * test_rep.dot(train(diff, frozen, batch))

    def self_(acc, diff, frozen, lr, batch):
        return acc + lr * train(diff, frozen, batch).sq_norm()

    def embed(diff, frozen, lr, batch):
        rep = train(diff, frozen, batch)
        return (rep.flat() if projection is None else rep.project(projection[1], projection[0])).mul_(lr.sqrt())

    updates = Updates(cross, self_, embed, test)
    if compile:
        updates = Updates(*(torch.compile(fn) for fn in updates))
    return updates


class Engine(NamedTuple):
    """The updates and the checkpoints split for them, planned on the first batch of a call."""

    updates: Updates
    checkpoints: list[Prepared]


class Run(NamedTuple):
    """Everything a scoring call needs, validated and prepared once."""

    checkpoints: list[Prepared]
    build: Callable[[Any], Engine]  # from the first batch (on device): plan the layers, build the updates
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    needs_target: tuple[bool, bool]  # (train, test): a criterion needs (x..., y) batches
    progress: bool


def _batches(run: Run, data: Any, where: str, desc: str) -> Iterator[tuple[int, Any]]:
    """(offset, batch on device) pairs of the argument named ``where``, validated, with a progress bar."""
    needs_target = run.needs_target[where == "test"]
    bar = tqdm(
        iter_batches(data, run.batch_size, where),
        total=num_batches(data, run.batch_size),
        desc=desc,
        unit="batch",
        disable=not run.progress,
        leave=False,
    )
    offset = 0
    for i, batch in enumerate(bar):
        check_batch_structure(batch, f"`{where}` batch {i}", needs_target=needs_target)
        n = batch_size_of(batch, f"`{where}` batch {i}")
        yield offset, to_device(batch, run.device, run.dtype)
        offset += n


def _check_finite(values: torch.Tensor, example_dim: int, offset: int, where: str, ckpt: int) -> None:
    """Raise naming the examples (along ``example_dim`` of ``values``) whose scores are NaN or infinite."""
    if values.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(values)):
        return  # min and max propagate NaN: one cheap pass instead of an elementwise check
    finite = torch.isfinite(values)
    other = [d for d in range(values.dim()) if d != example_dim % values.dim()]
    bad = ((~finite).any(dim=other) if other else ~finite).nonzero().flatten() + offset
    raise FloatingPointError(
        f"Non-finite gradients for `{where}` examples {bad.tolist()[:10]} at checkpoints[{ckpt}]: the loss or its "
        f"gradient is NaN or infinite there. Check those inputs and targets, the checkpoint's weights, and the dtype."
    )


def representations_of_test_data(run: Run, test: Any, *, aggregate: bool) -> tuple[Engine, list[Grads]]:
    """The engine (planned on the first test batch) and one test representation per checkpoint, summed over
    test examples when ``aggregate``."""
    engine, per_ckpt = None, [[] for _ in run.checkpoints]
    for offset, batch in _batches(run, test, "test", "test gradients"):
        engine = engine or run.build(batch)
        for c, ckpt in enumerate(engine.checkpoints):
            rep = engine.updates.test(ckpt.diff, ckpt.frozen, batch)
            _check_finite(rep.sq_norm(), 0, offset, "test", c)
            rep = rep.for_test()
            per_ckpt[c].append(rep.total() if aggregate else rep)
    if engine is None:
        raise ValueError("`test` holds no examples.")
    reps = [Grads.concat(r) for r in per_ckpt]
    return engine, [r.total() for r in reps] if aggregate else reps


def score_blocks(
    run: Run, engine: Engine, test_reps: list[Grads], train: Any, desc: str
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, scores [n_test, b])`` for each training batch: sum over checkpoints of lr <test, train>."""
    n_test = test_reps[0].size
    for offset, batch in _batches(run, train, "train", desc):
        acc = torch.zeros(n_test, batch_size_of(batch, "train"), device=run.device, dtype=_acc_dtype(run))
        for c, (ckpt, test_rep) in enumerate(zip(engine.checkpoints, test_reps)):
            acc = engine.updates.cross(acc, ckpt.diff, ckpt.frozen, ckpt.lr, test_rep, batch)
            _check_finite(acc, 1, offset, "train", c)
        yield offset, acc


def self_scores(run: Run, data: Any) -> torch.Tensor:
    """``[n]``: sum over checkpoints of lr |grad|^2 for every example of ``data``."""
    engine, out = None, []
    for offset, batch in _batches(run, data, "data", "self-influence"):
        engine = engine or run.build(batch)
        acc = torch.zeros(batch_size_of(batch, "data"), device=run.device, dtype=_acc_dtype(run))
        for c, ckpt in enumerate(engine.checkpoints):
            acc = engine.updates.self(acc, ckpt.diff, ckpt.frozen, ckpt.lr, batch)
            _check_finite(acc, 0, offset, "data", c)
        out.append(acc)
    if not out:
        raise ValueError("`data` holds no examples.")
    return torch.cat(out)


def embedding_rows(run: Run, data: Any) -> torch.Tensor:
    """``[n, C * P]``: per checkpoint ``sqrt(lr) * grad``, concatenated in checkpoint order."""
    n = num_examples(data)
    engine, out, blocks = None, None, []
    for offset, batch in _batches(run, data, "data", "embeddings"):
        engine = engine or run.build(batch)
        rows = [engine.updates.embed(c.diff, c.frozen, c.lr, batch) for c in engine.checkpoints]
        for c, r in enumerate(rows):
            _check_finite(r, 0, offset, "data", c)
        if n is None:
            blocks.append(torch.cat(rows, dim=1))
            continue
        if out is None:  # the size is known: write every batch into place (no second copy)
            out = rows[0].new_empty(n, sum(r.shape[1] for r in rows))
        torch.cat(rows, dim=1, out=out[offset : offset + rows[0].shape[0]])
    if out is None and not blocks:
        raise ValueError("`data` holds no examples.")
    return out if out is not None else torch.cat(blocks)


def _acc_dtype(run: Run) -> torch.dtype:
    return run.checkpoints[0].lr.dtype
