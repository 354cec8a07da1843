"""Per-example losses: what is differentiated for one example."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._model import Forward

ExampleLossFn = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]  # (state, batch of one) -> scalar


@dataclass(frozen=True)
class ExampleLoss:
    """A per-example loss written against the parameters, for full control (e.g. dict batches).

    ``fn(params, batch)`` gets the full state dict of one checkpoint (differentiated and frozen tensors) and a
    batch holding ONE example (every tensor keeps a leading dimension of size 1), and returns a scalar.

    Example:
        >>> import torch, tracin_func as tc
        >>> from torch.func import functional_call
        >>> model = torch.nn.Linear(3, 2)
        >>> def loss(params, batch):
        ...     logits = functional_call(model, params, (batch["x"],))
        ...     return torch.nn.functional.cross_entropy(logits, batch["label"])
        >>> data = {"x": torch.randn(4, 3), "label": torch.tensor([0, 1, 1, 0])}
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> tc.self_influence(model, ckpts, data, loss_fn=tc.ExampleLoss(loss)).shape
        torch.Size([4])
    """

    fn: ExampleLossFn


def example_loss(forward: Forward, loss_fn: Any, name: str) -> ExampleLossFn:
    """The loss of one example as a function of the state.

    A criterion ``loss_fn(outputs, targets)`` is applied to a batch of one and its output summed: for
    ``reduction="none"`` / ``"sum"`` that is the sum over the example's elements, for ``"mean"`` their mean,
    and a callable without ``.reduction`` gives whatever it reduces to (as Captum defines the per-example loss).
    """
    if isinstance(loss_fn, ExampleLoss):
        return loss_fn.fn
    if not callable(loss_fn):
        raise TypeError(
            f"`{name}` must be a criterion `loss_fn(outputs, targets)` or `tc.ExampleLoss(fn)`, got {loss_fn!r}."
        )
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"`{name}.reduction` must be 'none', 'sum' or 'mean', got {reduction!r}.")

    return CriterionLoss(forward, loss_fn)


class CriterionLoss(NamedTuple):
    """``criterion(forward(state, *inputs), target).sum()`` for a batch ``(*inputs, target)`` of one example.

    Kept apart from an opaque ``ExampleLoss`` so that the forward pass can run on a whole batch at once and only
    the criterion is mapped over examples (see ``_factored.batched_representation_fn``).
    """

    forward: Forward
    criterion: Callable[[Any, Any], torch.Tensor]

    def __call__(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        *inputs, target = batch
        return self.criterion(self.forward(state, *inputs), target).sum()
