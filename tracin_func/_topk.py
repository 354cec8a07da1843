"""Streaming top-k over column blocks of a score matrix: memory O(n_rows * k), whatever the number of columns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """The k most influential training examples per test example.

    Attributes:
        indices: ``[n_test, k]`` long tensor, positions in the training data's iteration order.
        scores: ``[n_test, k]`` float tensor, sorted: descending for proponents, ascending for opponents.
    """

    indices: torch.Tensor
    scores: torch.Tensor


def merge(best: TopK | None, block: torch.Tensor, offset: int, k: int, largest: bool) -> TopK:
    """Merge a score block ``[n_rows, b]`` whose first column is training example ``offset`` into ``best``."""
    kb = min(k, block.shape[1])
    scores, idx = torch.topk(block, kb, dim=1, largest=largest, sorted=True)
    candidate = TopK(idx + offset, scores)
    if best is None:
        return candidate
    scores = torch.cat([best.scores, candidate.scores], dim=1)
    indices = torch.cat([best.indices, candidate.indices], dim=1)
    scores, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest, sorted=True)
    return TopK(torch.gather(indices, 1, pos), scores)
