"""Scoring test examples against an on-disk index: embed the test examples with the index's own projection, stream
its shards through one GEMM per block of rows (a running top-k, or the full matrix), and optionally re-rank the
proposed candidates with exact scores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ._data import select_rows
from ._distributed import laid_out, on_every_rank, set_up_on_every_rank, stack_top_k, summed
from ._driver import embedding_blocks
from ._fingerprint import differences, fingerprint
from ._index import BLOCK_BYTES, Index
from ._setup import Setup, in_use, make_setup
from ._topk import TopK, check_finite_scores, first_k, merge


def index_setup(
    index: Index,
    model: Any,
    checkpoints: Any,
    *,
    loss_fn: Any,
    test_loss_fn: Any,
    options: dict[str, Any],
    agreed: dict[str, Any],
) -> Setup:
    """The call's setup, refused when its checkpoints, parameters, loss or dtype are not the index's; on every rank
    where it fails on one, or where the ranks were given other ``agreed`` arguments or indexes of other settings (a
    setup failing on one rank, or test data of another size, left the others in a collective)."""

    def set_up() -> Setup:
        setup = make_setup(
            model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, projection=index.projection, **options
        )
        found = differences(index.fingerprint, fingerprint(setup, loss_fn))
        if found:
            raise ValueError(
                f"`train` is an index built with other settings than this call's: {'; '.join(found)} differ. Pass "
                f"the checkpoints, `params` / `layers`, `loss_fn` and `dtype` the index was built with, or rebuild "
                f"it with `tc.build_index(..., overwrite=True)`."
            )
        return setup

    # (the checkpoints: each rank's matched the index's fingerprint, every tensor's bytes, in `set_up`; the ranks
    # agreeing on the index's digest, which covers its fingerprint, agree on them without summing every tensor again)
    return set_up_on_every_rank(
        options.get("distributed"), set_up, checkpoints_compared=False,
        **{**agreed, "the index (its settings' digest)": index._manifest["digest"]},
    )  # fmt: skip


def _test_chunks(setup: Setup, test: Any, aggregate: bool) -> Iterator[torch.Tensor]:
    """Test embeddings ``[n, D]`` (with the test loss and the index's projection), in chunks within the test
    memory budget; one summed row with ``aggregate``."""
    test_setup = setup._replace(  # test examples: plain gradients, also with Adam-aware checkpoints
        train_loss=setup.test_loss,
        needs_target=(setup.needs_target[1],) * 2,
        checkpoints=[c._replace(adam=None) for c in setup.checkpoints],
    )
    rows, size, total = [], 0, None
    for _, block in embedding_blocks(test_setup, test, where="test"):
        if aggregate:
            total = block.sum(0, keepdim=True) if total is None else total + block.sum(0, keepdim=True)
            continue
        rows.append(block)
        size += block.numel() * block.element_size()
        if size >= setup.test_budget:
            yield torch.cat(rows)
            rows, size = [], 0
    if aggregate and total is not None:
        yield total
    elif rows:
        yield torch.cat(rows)


def _mine(index: Index, setup: Setup) -> list[int] | None:
    ranks = setup.ranks
    return None if ranks is None else [i for i in range(len(index.shards)) if i % ranks.world == ranks.rank]


_NON_FINITE_FIX = (
    "An index built before `tc.build_index` refused embeddings its `storage_dtype` cannot hold may hold infinities: "
    "rebuild it with `storage_dtype=torch.float32` and `overwrite=True`."
)


def _scores(index: Index, setup: Setup, queries: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, [n_test, b] scores)`` per block of this rank's shards; a block's scores stay within
    ``BLOCK_BYTES`` too."""
    rows = max(1, BLOCK_BYTES // max(1, queries.shape[0] * queries.element_size()))
    for offset, block in index.blocks(_mine(index, setup), rows):
        scores = _times(queries, block)
        check_finite_scores(scores, offset, _NON_FINITE_FIX)  # (the test rows are checked where embedded)
        yield offset, scores


_CONVERTED_BYTES = 16 << 20  # of a block's rows converted to the queries' dtype or device at once


def _times(queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``queries @ block.T``, the block's rows taken to the queries' dtype and device ``_CONVERTED_BYTES`` at a time:
    a whole block converted was held beside the stored one (a float64 query of float32 rows: 3x the block, found by
    review)."""
    if block.dtype == queries.dtype and block.device == queries.device:
        return queries @ block.T
    step = max(1, _CONVERTED_BYTES // max(1, block.shape[1] * queries.element_size()))
    parts = [queries @ block[i : i + step].to(queries.device, queries.dtype).T for i in range(0, len(block), step)]
    return torch.cat(parts, 1) if len(parts) != 1 else parts[0]


def index_influence(index: Index, setup: Setup, test: Any, *, aggregate: bool) -> torch.Tensor:
    """``[n_test, n_train]`` scores of the test examples against every row of ``index``."""

    like = torch.empty(0, device=setup.device, dtype=setup.dtype)

    def local() -> list[torch.Tensor]:  # (rows of other ranks' shards: zero, summed over the ranks below)
        with in_use(setup):
            chunks = _test_chunks(setup, test, aggregate)
            return [laid_out(_scores(index, setup, q), q.shape[0], len(index), like) for q in chunks]

    rows = [summed(part, setup.ranks) for part in on_every_rank(setup.ranks, local)]
    if not rows:
        raise ValueError("`test` holds no examples.")
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def index_top_k(
    index: Index, setup: Setup, test: Any, *, k: int, proponents: bool, aggregate: bool
) -> TopK:
    """The top-k rows of ``index`` for each test example, streaming its shards (memory: one block)."""

    def local() -> list[tuple[TopK | None, int]]:
        lists = []
        with in_use(setup):
            for q in _test_chunks(setup, test, aggregate):
                best = None
                for offset, block in _scores(index, setup, q):
                    best = merge(best, block, offset, k, largest=proponents)
                lists.append((best, q.shape[0]))
        return lists

    lists = on_every_rank(setup.ranks, local)
    if not lists:
        raise ValueError("`test` holds no examples.")
    return stack_top_k(lists, k, proponents, setup.ranks, torch.empty(0, device=setup.device, dtype=setup.dtype))


def rerank_candidates(proposed: TopK, k: int, proponents: bool, train: Any, exact_scores: Any) -> TopK:
    """Exact top-k among the proposed candidates: ``exact_scores(subset)`` gives ``[n_test, m]`` exact scores of
    the training examples ``subset`` (the union of every test example's candidates)."""
    candidates = proposed.indices
    union = torch.unique(candidates.cpu())
    scores = exact_scores(select_rows(train, union))
    positions = torch.searchsorted(union, candidates.cpu()).to(scores.device)
    exact = torch.gather(scores, 1, positions)
    return first_k(TopK(candidates.to(scores.device), exact), k, proponents)
