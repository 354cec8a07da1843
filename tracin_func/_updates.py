"""The pure core of every scorer: functions of one checkpoint and one batch, folded over checkpoints by the driver.

Each is a pure function of its arguments (the driver may wrap it in ``torch.compile``). A checkpoint arrives whole
(``CheckpointState``); the planned names say which of its tensors are differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any, NamedTuple

import torch

from ._adam import adam_representation, dense, row_dots
from ._assemble import RepresentationFn
from ._model import CheckpointState
from ._per_layer import dots_by_layer, sq_norms_by_layer, sum_by_layer
from ._representations import Representation


class Updates(NamedTuple):
    """Pure per-checkpoint updates, one per scorer."""

    # (acc, ckpt, test_rep, batch, test_scale=None, normalize_train=False) -> acc + lr <test, train>  [n_test, B],
    # each row times ``test_scale`` [n_test] and each column divided by the training gradient's norm when asked
    influence: Callable[..., torch.Tensor]
    self_influence: Callable[..., torch.Tensor]  # (acc, ckpt, batch) -> acc + lr |train|^2  [B]
    # (ckpt, batch, with_self=False) -> (sqrt(lr) train gradients [B, P] (or projected [B, k]), lr |train|^2 [B]
    # from the same gradients when ``with_self``, else None)
    embedding: Callable[..., tuple[torch.Tensor, Any]]
    test: Callable[..., Representation]  # (ckpt, batch) -> test gradient representation
    # (ckpt, batch, n) -> (the test representation of the batch's first n examples, the training one of the others),
    # from one pass (where the test and training losses are one); the latter scored in place of a batch
    with_test: Callable[..., tuple[Representation, Representation]]
    # per-layer forms of ``influence`` / ``self_influence`` (``acc``: a dict layer -> tensor, or None at the first
    # checkpoint; keyword ``module``: how names map to layers, see ``_per_layer``): the entries sum to the total
    influence_by_layer: Callable[..., dict[str, torch.Tensor]]
    self_influence_by_layer: Callable[..., dict[str, torch.Tensor]]


def inverse_norm(sq_norm: torch.Tensor) -> torch.Tensor:
    """``1 / |g|`` per example from ``|g|^2``, and 0 for a zero gradient: a cosine with a zero gradient is defined
    as 0 (not NaN). A factored ``|g|^2`` of a zero gradient may round to a tiny negative: it counts as zero. One that
    overflowed the dtype gives NaN, refused with the scores (its reciprocal, 0, scored the example 0, silently)."""
    norm = sq_norm.clamp(min=0).sqrt()
    inverse = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
    return torch.where(norm.isinf(), torch.full_like(norm, math.nan), inverse)


# Renormalised scores: an example's squared norm below the dtype's normal range has lost precision (a subnormal), or
# rounded to 0 (in float32 a sure prediction's gradient, a logit 50 below the top: entries 1e-21, its cosine O(1),
# scored 0 or 0.8% off, silently; in float64 entries of 1e-160: 5.7e-5 off, or 0 with a false "no gradient" warning);
# and a cosine of two gradients whose norms multiply below 2^26 times its least normal number (float32: 2^-100) reads
# their inner product among subnormals (both sure: refused as not finite, its inverse norms' product overflowing).
# Refused, naming float64, or in float64 a scaled loss (a cosine does not change with the loss's scale).
_PAIR_MARGIN = 2.0**26


def _wider(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return ("Multiply the loss by a constant c that brings its gradients into range (2.0**500, say): cosines do "
                "not change with it, and `\"train\"` scores are c times the loss's")  # fmt: skip
    return "Pass `dtype=torch.float64`"


def renormalising(rep: Representation, sq_norm: torch.Tensor, where: str, offset: int | None) -> torch.Tensor:
    """``inverse_norm(sq_norm)``, ``sq_norm`` being ``rep``'s, refused where the dtype's range cannot hold an
    example's squared norm but its gradient is not zero (``where``: the argument; ``offset``: its batch's first
    example's index, where known)."""
    _refuse_underflowed(rep, sq_norm, where, offset)
    return inverse_norm(sq_norm)


@torch.compiler.disable  # (values read: eager inside compiled updates, without dynamo's graph-break warning)
def _refuse_underflowed(rep: Representation, sq_norm: torch.Tensor, where: str, offset: int | None) -> None:
    tiny = torch.finfo(sq_norm.dtype).tiny
    if not bool((sq_norm < tiny).any()):
        return
    subnormal = (sq_norm < tiny) & (sq_norm > 0)
    maybe = (sq_norm == 0) & rep.nonzero(sq_norm.device)  # (a gradient of 0, or squares underflowed: formed to tell)
    small = [int(i) for i in subnormal.nonzero()[:, 0]] or [
        i for i in maybe.nonzero()[:, 0].tolist() if rep.formed_nonzero(i)
    ][:1]
    if small:
        i = small[0]
        which = f"`{where}` example {offset + i}" if offset is not None else f"a `{where}` example ({i} in a batch)"
        least = f"{math.sqrt(tiny):.0e}"
        raise ValueError(
            f"`normalize`: {which} has a gradient too small for its squared norm to be taken in "
            f"{str(sq_norm.dtype).replace('torch.', '')} (entries of {least} and less: a sure prediction's), so its "
            f"renormalised scores would be wrong. {_wider(sq_norm.dtype)}."
        )


@torch.compiler.disable  # (values read, as above)
def _check_pairs(test_inverse: torch.Tensor, train_inverse: torch.Tensor) -> None:
    """Refuse cosines of a test and a training gradient whose norms multiply below ``_PAIR_MARGIN`` times the dtype's
    least normal number: their inner product is read among subnormals."""
    least = torch.finfo(train_inverse.dtype).tiny * _PAIR_MARGIN
    if float(test_inverse.max()) * float(train_inverse.max()) > 1 / least:
        raise ValueError(
            f"`normalize`: a `test` example's and a `train` example's gradients are both so small (their norms "
            f"multiply below 2^{math.log2(least):.0f}: sure predictions') that their cosine cannot be computed in "
            f"{str(train_inverse.dtype).replace('torch.', '')}. {_wider(train_inverse.dtype)}."
        )


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
        rep, _ = train_side(ckpt, batch)
        rep = rep.formed() if normalize_train else rep  # used twice: a norm and the dot
        factors = weights(ckpt, rep, test_scale, normalize_train)  # (first: its checks run eagerly when compiled)
        return reduce(torch.Tensor.mul_, factors, test_rep.dot(rep)).add_(acc)  # (products: fresh)

    def weights(
        ckpt: CheckpointState, rep: Representation, test_scale: torch.Tensor | None, normalize_train: bool
    ) -> list[torch.Tensor]:
        """What multiplies ``<test, train>``, in turn: when renormalised, the test norms' inverses and the training
        ones' (broadcast over ``[n_test, B]``), then ``lr``. One at a time: their product, or ``lr`` times it, leaves
        the dtype's range where the cosine and ``lr`` times it do not (large gradients and a small ``lr``)."""
        factors = [] if test_scale is None else [test_scale[:, None]]
        if normalize_train:
            inverse = renormalising(rep, rep.sq_norm(), "train", None)
            if test_scale is not None:
                _check_pairs(test_scale, inverse)
            factors.append(inverse)
        return [*factors, ckpt.lr]

    def train_side(ckpt: CheckpointState, batch: Any) -> tuple[Representation, Representation | None]:
        """The training representation scored against test gradients, and the plain gradients when it holds Adam
        updates instead (a checkpoint with an optimizer state; see ``_adam``), else None. ``batch`` may be its plain
        representation already (``with_test``'s)."""
        diff, frozen = split(ckpt)
        rep = batch if isinstance(batch, Representation) else train(diff, frozen, batch)
        if ckpt.adam is None:
            return rep, None
        grads, updates = adam_representation(rep, ckpt.adam, diff)
        return updates, grads

    def self_terms(rep: Representation, grads: Representation | None, module: bool | None) -> Any:
        """``|g|^2`` per example, or ``<g, u>`` with Adam updates ``u`` (``rep``; ``grads`` the plain gradients);
        per layer unless ``module`` is None."""
        if grads is None:
            return rep.sq_norm() if module is None else sq_norms_by_layer(rep, module=module)
        per_name = row_dots(grads, rep)
        return sum(per_name.values()) if module is None else sum_by_layer(per_name, module=module)

    def self_influence(acc: torch.Tensor, ckpt: CheckpointState, batch: Any) -> torch.Tensor:
        return acc + ckpt.lr * self_terms(*train_side(ckpt, batch), None)

    def influence_by_layer(
        acc: dict[str, torch.Tensor] | None,
        ckpt: CheckpointState,
        test_rep: Representation,
        batch: Any,
        test_scale: torch.Tensor | None = None,
        normalize_train: bool = False,
        *,
        module: bool,
    ) -> dict[str, torch.Tensor]:
        """``influence`` split by layer. Renormalised scores divide each layer's inner product by the norms of the
        whole gradients, so the layers' shares sum to the renormalised total."""
        rep, _ = train_side(ckpt, batch)
        rep = rep.formed() if normalize_train else rep
        factors = weights(ckpt, rep, test_scale, normalize_train)
        dots = dots_by_layer(test_rep, rep, module=module)
        scores = {layer: reduce(torch.mul, factors, s) for layer, s in dots.items()}
        return scores if acc is None else {layer: acc[layer] + s for layer, s in scores.items()}

    def self_influence_by_layer(
        acc: dict[str, torch.Tensor] | None, ckpt: CheckpointState, batch: Any, *, module: bool
    ) -> dict[str, torch.Tensor]:
        norms = self_terms(*train_side(ckpt, batch), module)
        return {layer: ckpt.lr * s if acc is None else acc[layer] + ckpt.lr * s for layer, s in norms.items()}

    def embedding(ckpt: CheckpointState, batch: Any, with_self: bool = False) -> tuple[torch.Tensor, Any]:
        rep, grads = train_side(ckpt, batch)
        rep = rep.formed() if with_self else rep
        rows = rep.flat() if projection is None else rep.project(projection[1], projection[0])
        if not with_self:
            return rows.mul_(ckpt.lr.sqrt()), None
        return rows.mul_(ckpt.lr.sqrt()), ckpt.lr * self_terms(rep, grads, None)

    def test_representation(ckpt: CheckpointState, batch: Any) -> Representation:
        """Test gradients; dense when the checkpoint carries Adam state (the training side is dense then)."""
        rep = test(*split(ckpt), batch)
        return rep if ckpt.adam is None else dense(rep)

    def with_test(ckpt: CheckpointState, batch: Any, n: int) -> tuple[Representation, Representation]:
        test_rep, train_rep = train(*split(ckpt), batch).split(n)
        return (test_rep if ckpt.adam is None else dense(test_rep)), train_rep

    by_layer = (influence_by_layer, self_influence_by_layer)
    return Updates(influence, self_influence, embedding, test_representation, with_test, *by_layer)
