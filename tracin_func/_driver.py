"""The impure edge of scoring: iterate the data in batches (progress bars, device moves), plan on the first batch,
fold the pure updates over checkpoints, check every result is finite, and name the example behind any failure.

Loop order: training blocks outside, checkpoints inside, test gradients computed once per checkpoint and kept, so
each training batch is differentiated once per checkpoint and no checkpoint is ever reloaded. Renormalised scores
take the test gradient norms once, with the test representations, and the training norms inside the update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ._data import (
    batch_size_of,
    check_batch_structure,
    iter_batches,
    num_batches,
    num_examples,
    slice_batch,
    to_device,
)
from ._loss import ExampleLossFn
from ._plan import plan_call
from ._purity import check_forward
from ._representations import Representation
from ._setup import Setup
from ._updates import Updates, inverse_norm


def batches(setup: Setup, data: Any, where: str, desc: str) -> Iterator[tuple[int, Any]]:
    """(offset, batch on device) pairs of the argument named ``where``, validated, with a progress bar."""
    needs_target = setup.needs_target[where == "test"]
    bar = tqdm(
        iter_batches(data, setup.batch_size, where),
        total=num_batches(data, setup.batch_size),
        desc=desc,
        unit="batch",
        disable=not setup.progress,
        leave=False,
    )
    offset = 0
    for i, batch in enumerate(bar):
        check_batch_structure(batch, f"`{where}` batch {i}", needs_target=needs_target)
        n = batch_size_of(batch, f"`{where}` batch {i}")
        yield offset, to_device(batch, setup.device, setup.dtype)
        offset += n


def _planned(setup: Setup, batch: Any, where: str) -> Updates:
    with naming_failures(setup.test_loss if where == "test" else setup.train_loss, setup, batch, where, 0):
        updates = plan_call(setup, batch, where).updates
    return Updates(*(torch.compile(fn) for fn in updates)) if setup.compile else updates


@contextmanager
def naming_failures(loss: ExampleLossFn, setup: Setup, batch: Any, where: str, offset: int) -> Iterator[None]:
    """Re-raise an error of a batch with the index of the first example whose loss alone raises (e.g. a class
    label outside the model's outputs), found by the same guarded dry run as planning; errors of our own (they
    start with the argument's name) and errors that no single example reproduces pass unchanged."""
    try:
        yield
    except Exception as err:
        if isinstance(err, FloatingPointError) or str(err).startswith("`"):
            raise
        for i in range(batch_size_of(batch, where)):
            try:
                check_forward(setup.spec.module, loss, setup.checkpoints[0].state, slice_batch(batch, i, i + 1), where)
            except Exception as cause:
                if str(cause).startswith("`"):
                    raise
                message = f"`{where}` example {offset + i} cannot be scored: {type(cause).__name__}: {cause}"
                try:
                    named = type(cause)(message)
                except Exception:
                    named = RuntimeError(message)
                raise named from cause
        raise


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


class Queries(NamedTuple):
    """The test side every training batch is scored against: the updates, one test representation per checkpoint
    and, for cosine scores, the test examples' inverse gradient norms per checkpoint."""

    updates: Updates
    reps: list[Representation]
    scales: list[torch.Tensor] | None  # per checkpoint ``1 / |g_test|`` [n_test] ("cosine"), else None
    normalize_train: bool  # divide by the training gradients' norms ("cosine", "train")
    sum_rows: bool  # aggregate over per-example test rows after scoring (a sum of cosines)


def test_representations(setup: Setup, test: Any, *, aggregate: bool, normalize: str | None = None) -> Queries:
    """The updates (planned on the first test batch) and one test representation per checkpoint, summed over
    test examples when ``aggregate``. With ``normalize="cosine"`` the test gradient norms come from the same
    representations (``sq_norm``, also the finiteness check), and ``aggregate`` sums per-example cosines: the rows
    stay per example and are summed after scoring."""
    cosine = normalize == "cosine"
    total = aggregate and not cosine
    updates, per_ckpt, scales = None, [[] for _ in setup.checkpoints], [[] for _ in setup.checkpoints]
    for offset, batch in batches(setup, test, "test", "test gradients"):
        updates = updates or _planned(setup, batch, "test")
        for c, ckpt in enumerate(setup.checkpoints):
            with naming_failures(setup.test_loss, setup, batch, "test", offset):
                rep = updates.test(ckpt, batch)
            sq_norm = rep.sq_norm()
            _check_finite(sq_norm, 0, offset, "test", c)
            if cosine:
                scales[c].append(inverse_norm(sq_norm))
            rep = rep.for_test()
            per_ckpt[c].append(rep.total() if total else rep)
    if updates is None:
        raise ValueError("`test` holds no examples.")
    reps = [Representation.concat(r) for r in per_ckpt]
    return Queries(
        updates,
        [r.total() for r in reps] if total else reps,
        [torch.cat(s) for s in scales] if cosine else None,
        normalize is not None,
        aggregate and cosine,
    )


def score_blocks(setup: Setup, queries: Queries, train: Any, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, scores [n_test, b])`` for each training batch: sum over checkpoints of lr <test, train>, each
    term normalised as ``queries`` says."""
    n_test = queries.reps[0].size
    for offset, batch in batches(setup, train, "train", desc):
        acc = torch.zeros(n_test, batch_size_of(batch, "train"), device=setup.device, dtype=setup.dtype)
        for c, (ckpt, test_rep) in enumerate(zip(setup.checkpoints, queries.reps)):
            scale = None if queries.scales is None else queries.scales[c]
            with naming_failures(setup.train_loss, setup, batch, "train", offset):
                acc = queries.updates.influence(acc, ckpt, test_rep, batch, scale, queries.normalize_train)
            _check_finite(acc, 1, offset, "train", c)
        yield offset, acc.sum(0, keepdim=True) if queries.sum_rows else acc


def self_scores(setup: Setup, data: Any) -> torch.Tensor:
    """``[n]``: sum over checkpoints of lr |grad|^2 for every example of ``data``."""
    updates, out = None, []
    for offset, batch in batches(setup, data, "data", "self-influence"):
        updates = updates or _planned(setup, batch, "data")
        acc = torch.zeros(batch_size_of(batch, "data"), device=setup.device, dtype=setup.dtype)
        for c, ckpt in enumerate(setup.checkpoints):
            with naming_failures(setup.train_loss, setup, batch, "data", offset):
                acc = updates.self_influence(acc, ckpt, batch)
            _check_finite(acc, 0, offset, "data", c)
        out.append(acc)
    if not out:
        raise ValueError("`data` holds no examples.")
    return torch.cat(out)


def embedding_rows(setup: Setup, data: Any) -> torch.Tensor:
    """``[n, C * P]``: per checkpoint ``sqrt(lr) * grad``, concatenated in checkpoint order."""
    n = num_examples(data)
    updates, out, blocks = None, None, []
    for offset, batch in batches(setup, data, "data", "embeddings"):
        updates = updates or _planned(setup, batch, "data")
        with naming_failures(setup.train_loss, setup, batch, "data", offset):
            rows = [updates.embedding(ckpt, batch) for ckpt in setup.checkpoints]
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
