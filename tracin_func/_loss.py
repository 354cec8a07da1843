"""Per-example losses: what is differentiated for one example."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

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
    the criterion is mapped over examples (``_capture.batched_factors``).
    """

    forward: Forward
    criterion: Callable[[Any, Any], torch.Tensor]

    def __call__(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        *inputs, target = batch
        return self.criterion(self.forward(state, *inputs), target).sum()


# Built-in criteria whose "none" output holds one loss per element with the batch first, so that the loss of one
# example under "mean" is the mean of its elements (when no class weights or ignored targets rescale it).
_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.KLDivLoss,
    nn.SoftMarginLoss,
)


def summed_example_losses(
    criterion: Callable[[Any, Any], torch.Tensor], output: Any, target: Any
) -> torch.Tensor | None:
    """``sum_i criterion(output_i, target_i)`` over a batch without mapping over examples, or ``None`` when that
    cannot be done exactly for this criterion (the caller then maps it over examples)."""
    reduction = getattr(criterion, "reduction", None)
    if reduction in ("none", "sum"):
        return criterion(output, target).sum()
    if reduction != "mean" or type(criterion) not in _ELEMENTWISE or getattr(criterion, "weight", None) is not None:
        return None
    ignore = getattr(criterion, "ignore_index", None)
    if ignore is not None and isinstance(target, torch.Tensor) and bool((target == ignore).any()):
        return None
    per_element = copy.copy(criterion)  # a shallow copy: the user's criterion keeps its reduction
    per_element.reduction = "none"
    losses = per_element(output, target)
    return losses.reshape(losses.shape[0], -1).mean(1).sum()
