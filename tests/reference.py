"""The float64 ground truth every numeric path is checked against: TracIn by its definition, one backward per example.

:func:`reference_scores` computes TracIn with a plain float64 for-loop, one ``torch.autograd.grad`` call per example
per checkpoint, on a deep copy of the model loaded with each checkpoint: no ``vmap``, no ``functional_call`` and no
code of the library (``tc.Checkpoint`` and ``tc.ExampleLoss`` are only read as containers). It is the one reference
of the test suite; the test models and tasks it is run on live in :mod:`tests.models`.

Example:
    >>> from tests.models import mlp_task
    >>> task = mlp_task()
    >>> ref = reference_scores(task.model, task.checkpoints, task.train, task.test, loss_fn=task.loss_fn)
    >>> ref.influence.shape, ref.self_influence.shape
    (torch.Size([4, 10]), torch.Size([10]))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

import tracin_func as tc

DTYPE = torch.float64

Names = Union[Sequence[str], Callable[[str], bool], None]


@dataclass(frozen=True)
class Reference:
    """Ground-truth TracIn quantities, all float64."""

    influence: torch.Tensor  # [n_test, n_train]
    self_influence: torch.Tensor  # [n_train]
    train_embeddings: torch.Tensor  # [n_train, C * P]
    test_embeddings: torch.Tensor  # [n_test, C * P]


def _num_examples(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return first.shape[0]


def _example(batch: Any, i: int) -> Any:
    """Example ``i`` as a batch of one, floating tensors in float64."""

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t[i : i + 1]
        return t.to(DTYPE) if t.is_floating_point() else t

    return {k: take(v) for k, v in batch.items()} if isinstance(batch, Mapping) else tuple(map(take, batch))


def _criterion_loss(loss_fn: Any, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The criterion on one example, summed: ``"none"`` / ``"sum"`` sum the example's elements; ``"mean"`` is torch's
    own mean over them (class weights and ignored targets as torch weighs them on that example)."""
    return loss_fn(outputs, target).sum()


def _selected(available: Sequence[str], default: Sequence[str], params: Names) -> list[str]:
    if params is None:
        return list(default)
    if callable(params):
        return [n for n in available if params(n)]
    return list(params)


def _wide(t: torch.Tensor) -> torch.dtype:
    """``t``'s dtype in the reference: float64 for floating tensors, complex128 for complex ones."""
    return DTYPE if t.is_floating_point() else torch.complex128 if t.is_complex() else t.dtype


def _state_of(model: Any, ckpt: tc.Checkpoint, params: Names) -> tuple[dict[str, torch.Tensor], list[str], Callable]:
    """Checkpoint tensors in float64 (the selected ones require grad), their selected names, and ``forward``."""
    if isinstance(model, nn.Module):  # (complex tensors in complex128: `Module.to(float64)` would keep real parts)
        module = copy.deepcopy(model)._apply(lambda t: t.to(_wide(t)))
        held = ckpt.params  # (a module's extra state, not a tensor: loaded as it is)
        floating = {k: v.detach().to(_wide(v)) for k, v in held.items() if torch.is_tensor(v) and _wide(v) != v.dtype}
        module.load_state_dict({**held, **floating})
        module.requires_grad_(False)
        named = dict(module.named_parameters())
        default = [n for n, p in model.named_parameters() if p.requires_grad]
        names = _selected(list(named), default, params)
        for n in names:
            named[n].requires_grad_(True)
        # (the parameters under their own names too: a state-dict hook may save them under others)
        return {**module.state_dict(keep_vars=True), **named}, names, lambda state, *inputs: module(*inputs)
    floating = [k for k, v in ckpt.params.items() if v.is_floating_point()]
    names = _selected(list(ckpt.params), floating, params)
    state = {
        k: v.detach().to(DTYPE).requires_grad_(k in names) if v.is_floating_point() else v
        for k, v in ckpt.params.items()
    }
    return state, names, lambda state, *inputs: model(state, *inputs)


def reference_grads(model: Any, ckpt: tc.Checkpoint, data: Any, loss_fn: Any, params: Names = None) -> torch.Tensor:
    """``[n, P]`` float64 per-example gradients at ``ckpt``, one ``torch.autograd.grad`` call per example.

    Columns: the selected parameters flattened and concatenated in selection order (by default the model's
    ``named_parameters()`` order, or the checkpoint's key order for a pure function).
    """
    state, names, forward = _state_of(model, ckpt, params)
    leaves = [state[n] for n in names]
    rows = []
    for i in range(_num_examples(data)):
        example = _example(data, i)
        if isinstance(loss_fn, tc.ExampleLoss):
            loss = loss_fn.fn(state, example)
        else:
            *inputs, target = example
            loss = _criterion_loss(loss_fn, forward(state, *inputs), target)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # an unused parameter's gradient is 0
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]
        rows.append(torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads]))  # (sparse=True)
    return torch.stack(rows)


def reference_scores(
    model: Any,
    checkpoints: Sequence[tc.Checkpoint],
    train: Any,
    test: Any = None,
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    params: Names = None,
) -> Reference:
    """TracIn by the definition: ``S = sum_c lr_c G_test_c @ G_train_c.T``, ``self = sum_c lr_c |g|^2``,
    ``embeddings = cat_c sqrt(lr_c) g``. ``test`` defaults to ``train``; ``test_loss_fn`` to ``loss_fn``."""
    test = train if test is None else test
    test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
    influence, self_influence, train_emb, test_emb = 0, 0, [], []
    for ckpt in checkpoints:
        lr = float(ckpt.lr)
        g_train = reference_grads(model, ckpt, train, loss_fn, params)
        g_test = reference_grads(model, ckpt, test, test_loss_fn, params)
        influence = influence + lr * g_test @ g_train.T
        self_influence = self_influence + lr * g_train.square().sum(1)
        train_emb.append(math.sqrt(lr) * g_train)
        test_emb.append(math.sqrt(lr) * g_test)
    return Reference(influence, self_influence, torch.cat(train_emb, 1), torch.cat(test_emb, 1))


class FormulaBatchNorm2d(nn.Module):
    """An eval-mode ``BatchNorm2d`` written as its formula (elementwise ops, whose gradients torch computes alike at
    any batch size: its CPU kernel permutes a lone example's input gradient given a channels-last output gradient with
    a short batch stride), its parameters and buffers under the same names."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(norm, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return (x - self.running_mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]


def with_formula_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``BatchNorm2d`` written as its formula (``FormulaBatchNorm2d``)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, FormulaBatchNorm2d(m))
    return twin
