"""Gradient representations: what a batch of per-example gradients is kept as, and the operations scoring needs.

Every representation offers the same operations, so scorers never look inside:
``dot(a, b) -> [Ba, Bb]``, ``sq_norm(a) -> [B]``, ``flat(a) -> [B, P]``, ``total(a)`` (sum over examples, B = 1)
and ``concat([a, b, ...])`` (along examples). ``Dense`` holds materialised per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Dense(NamedTuple):
    """Per-sample gradients ``{name: [B, *shape]}``, reduced leaf by leaf (never concatenated into one copy)."""

    grads: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return next(iter(self.grads.values())).shape[0]

    def dot(self, other: Dense) -> torch.Tensor:
        out = None
        for name, a in self.grads.items():
            term = a.flatten(1) @ other.grads[name].flatten(1).T
            out = term if out is None else out + term
        return out

    def sq_norm(self) -> torch.Tensor:
        return sum(g.flatten(1).square().sum(1) for g in self.grads.values())

    def flat(self) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in self.grads.values()], dim=1)

    def total(self) -> Dense:
        return Dense({name: g.sum(0, keepdim=True) for name, g in self.grads.items()})

    def scale(self, factor: torch.Tensor) -> Dense:
        return Dense({name: g * factor for name, g in self.grads.items()})

    @staticmethod
    def concat(reps: Sequence[Dense]) -> Dense:
        if len(reps) == 1:
            return reps[0]
        return Dense({name: torch.cat([r.grads[name] for r in reps]) for name in reps[0].grads})
