"""Streaming top-k over column blocks of a score matrix: memory O(n_rows * k), whatever the number of columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from ._context import in_own_context
from ._validate import boolean, positive_int


class TopK(NamedTuple):
    """The k most influential training examples per test example.

    Attributes:
        indices: ``[n_test, k]`` long tensor, positions in the training data's iteration order.
        scores: ``[n_test, k]`` float tensor, sorted: descending for proponents, ascending for opponents; equal
            scores (duplicated examples) in the order of their indices, whatever the batch size or path (scores
            equal in exact arithmetic may differ in their last bit, between batches of other sizes, whose sums
            round otherwise, or between columns of one matrix product, which BLAS may sum in other orders: they
            are then ordered by those bits).
    """

    indices: torch.Tensor
    scores: torch.Tensor


def merge(best: TopK | None, block: torch.Tensor, offset: int, k: int, largest: bool) -> TopK:
    """Merge a score block ``[n_rows, b]`` whose first column is training example ``offset`` into ``best`` (whose
    examples come before it)."""
    candidate = _block_top(block, min(k, block.shape[1]), largest)
    candidate = TopK(candidate.indices + offset, candidate.scores)
    if best is None:
        return candidate
    both = TopK(torch.cat([best.indices, candidate.indices], 1), torch.cat([best.scores, candidate.scores], 1))
    return first_k(both, k, largest)


def first_k(candidates: TopK, k: int, largest: bool) -> TopK:
    """The ``k`` best of ``candidates`` (``[n, m]`` each), equal scores to the lower index: ``torch.topk`` leaves
    their order open, and duplicated examples' order moved with the batch size and the path."""
    order = candidates.indices.argsort(dim=1, stable=True)
    indices, scores = candidates.indices.gather(1, order), candidates.scores.gather(1, order)
    top, pos = scores.sort(dim=1, descending=largest, stable=True)
    return TopK(indices.gather(1, pos[:, :k]), top[:, :k])


def _block_top(block: torch.Tensor, k: int, largest: bool) -> TopK:
    """``first_k`` of a block's columns without sorting the block: ``torch.topk``'s, where no score equal to the
    k-th is left out; in the rows where one is (ties across the cut), those better than the k-th score and the first
    of those equal to it. (Finding those in every row took 10x ``topk``'s time: 126 against 12 ms for 100 x 65,536.)"""
    top = torch.topk(block, min(k + 1, block.shape[1]), dim=1, largest=largest, sorted=True)
    scores, columns = top.values[:, :k], top.indices[:, :k]
    if top.values.shape[1] > k and bool((cut := top.values[:, k - 1] == top.values[:, k]).any()):
        rows = cut.nonzero()[:, 0]
        sub, kth = block[rows], top.values[rows, k - 1 : k]
        better, tied = (sub > kth if largest else sub < kth), sub == kth
        keep = better | tied & (tied.cumsum(1) <= k - better.sum(1, keepdim=True))
        columns = columns.index_put((rows,), keep.nonzero()[:, 1].view(len(rows), k))  # (row-major: in order)
        scores = block.gather(1, columns)
    return first_k(TopK(columns, scores), k, largest)


def check_finite_scores(
    scores: torch.Tensor, offset: int, fix: str = "Recompute or drop them.", operands: tuple = ()
) -> None:
    """NaN would rank first (``topk`` orders it above every number): name the rows instead, and ``fix``. ``offset``:
    the training row of the first column; ``operands``: the embeddings multiplied, which, all finite, overflowed."""
    if scores.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(scores)):
        return
    bad = ~torch.isfinite(scores)
    rows, cols = bad.any(1).nonzero().flatten().tolist(), (bad.any(0).nonzero().flatten() + offset).tolist()
    pair = f"between `test` rows {rows[:10]} and `train` rows {cols[:10]}"
    if operands and all(bool(torch.isfinite(t).all()) for t in operands):
        wider = "float" if scores.dtype.itemsize < 4 else "double"
        raise FloatingPointError(
            f"Influence scores {pair} overflow {scores.dtype} (largest {torch.finfo(scores.dtype).max:.4g}), their "
            f"embeddings finite: pass the test embeddings in a wider dtype (`test.{wider}()`; the training rows are "
            f"converted to it)."
        )
    raise FloatingPointError(f"Non-finite influence scores {pair}: those embeddings hold NaN or infinite values. {fix}")


@in_own_context
def top_k_embeddings(
    test: torch.Tensor,
    train: torch.Tensor | Iterable[torch.Tensor],
    *,
    k: int,
    proponents: bool = True,
    block_size: int = 65536,
) -> TopK:
    """Exact top-k search of influence embeddings: one GEMM per block of training rows and a streaming merge.

    Memory is ``O(n_test * (block_size + k))`` whatever the number of training rows, which may be a tensor
    (sliced by ``block_size``; a memory-mapped one works) or any iterable of ``[b, D]`` blocks in order.

    Args:
        test: ``[n_test, D]`` embeddings of the test examples.
        train: ``[n_train, D]`` embeddings of the training examples, or an iterable of row blocks.
        k: how many to return per test example, ``1 <= k <= n_train``.
        proponents: highest scores (True) or lowest (False).
        block_size: training rows scored at once when ``train`` is a tensor.

    Returns:
        ``TopK(indices, scores)``, each ``[n_test, k]``, sorted as in :func:`top_k`.

    Example:
        >>> import torch, tracin_func as tc
        >>> train, test = torch.randn(1000, 8), torch.randn(2, 8)
        >>> top = tc.top_k_embeddings(test, train, k=3, block_size=128)
        >>> torch.equal(top.indices, (test @ train.T).topk(3).indices)
        True
    """
    k = positive_int(k, "k")
    block_size = positive_int(block_size, "block_size")
    boolean(proponents, "proponents")
    if not isinstance(test, torch.Tensor) or test.dim() != 2:
        raise ValueError(
            f"`test` must be a [n_test, D] tensor, got {type(test).__name__} {getattr(test, 'shape', '')}."
        )
    blocks = train
    if isinstance(train, torch.Tensor):
        if train.dim() != 2:
            raise ValueError(f"`train` must be a [n_train, D] tensor, got shape {tuple(train.shape)}.")
        blocks = (train[i : i + block_size] for i in range(0, train.shape[0], block_size))
    best, seen = None, 0
    for block in blocks:
        if not isinstance(block, torch.Tensor):
            raise TypeError(f"`train` must be a tensor or an iterable of tensors, got {type(block).__name__} rows "
                            f"(a numpy array: `torch.from_numpy`).")  # fmt: skip
        if block.dim() != 2 or block.shape[1] != test.shape[1]:
            raise ValueError(f"`train` rows have shape {tuple(block.shape[1:])}; expected width {test.shape[1]}.")
        block = block.to(device=test.device, dtype=test.dtype)
        scores = test @ block.T
        check_finite_scores(scores, seen, operands=(test, block))
        best, seen = merge(best, scores, seen, k, largest=proponents), seen + block.shape[0]
    if best is None:
        raise ValueError("`train` holds no embeddings (0 rows): pass the training examples' embeddings.")
    if seen < k:
        raise ValueError(f"`k`={k} exceeds the number of training rows ({seen}); pass `k <= {seen}`.")
    return best
