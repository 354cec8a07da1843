"""The pure core of every scorer: functions of one checkpoint and one batch, folded over checkpoints by the driver.

Each is a pure function of its arguments (the driver may wrap it in ``torch.compile``). A checkpoint arrives whole
(``CheckpointState``); the planned names say which of its tensors are differentiated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ._assemble import RepresentationFn
from ._model import CheckpointState
from ._representations import Representation


class Updates(NamedTuple):
    """Pure per-checkpoint updates, one per scorer."""

    # (acc, ckpt, test_rep, batch, test_scale=None, normalize_train=False) -> acc + lr <test, train>  [n_test, B],
    # each row times ``test_scale`` [n_test] and each column divided by the training gradient's norm when asked
    influence: Callable[..., torch.Tensor]
    self_influence: Callable[..., torch.Tensor]  # (acc, ckpt, batch) -> acc + lr |train|^2  [B]
    embedding: Callable[..., torch.Tensor]  # (ckpt, batch) -> sqrt(lr) train gradients [B, P] (or projected [B, k])
    test: Callable[..., Representation]  # (ckpt, batch) -> test gradient representation


def inverse_norm(sq_norm: torch.Tensor) -> torch.Tensor:
    """``1 / |g|`` per example from ``|g|^2``, and 0 for a zero gradient: a cosine with a zero gradient is defined
    as 0 (not NaN). A factored ``|g|^2`` of a zero gradient may round to a tiny negative: it counts as zero."""
    norm = sq_norm.clamp(min=0).sqrt()
    return torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))


def make_updates(
    train: RepresentationFn,
    test: RepresentationFn,
    names: Sequence[str],
    *,
    projection: tuple[int, int] | None = None,
) -> Updates:
    """The updates of every scorer, differentiating ``names`` with the given representation functions.

    ``projection = (k, seed)`` makes ``embedding`` return seeded ``[B, k]`` projections instead of full gradients.
    """
    differentiated = frozenset(names)

    def split(ckpt: CheckpointState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        diff = {n: ckpt.state[n] for n in names}
        return diff, {n: t for n, t in ckpt.state.items() if n not in differentiated}

    def influence(
        acc: torch.Tensor,
        ckpt: CheckpointState,
        test_rep: Representation,
        batch: Any,
        test_scale: torch.Tensor | None = None,
        normalize_train: bool = False,
    ) -> torch.Tensor:
        """``test_scale``: the test examples' ``1 / |g|`` at this checkpoint (cosine scores), computed once by the
        caller; ``normalize_train``: divide by the training gradients' norms, from the same representation (the
        batch is differentiated once)."""
        rep = train(*split(ckpt), batch)
        scores = test_rep.dot(rep)
        if test_scale is not None:
            scores = scores * test_scale[:, None]
        if normalize_train:
            scores = scores * inverse_norm(rep.sq_norm())
        return acc + ckpt.lr * scores

    def self_influence(acc: torch.Tensor, ckpt: CheckpointState, batch: Any) -> torch.Tensor:
        return acc + ckpt.lr * train(*split(ckpt), batch).sq_norm()

    def embedding(ckpt: CheckpointState, batch: Any) -> torch.Tensor:
        rep = train(*split(ckpt), batch)
        rows = rep.flat() if projection is None else rep.project(projection[1], projection[0])
        return rows.mul_(ckpt.lr.sqrt())

    def test_representation(ckpt: CheckpointState, batch: Any) -> Representation:
        return test(*split(ckpt), batch)

    return Updates(influence, self_influence, embedding, test_representation)
