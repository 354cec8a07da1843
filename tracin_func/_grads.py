"""Per-sample gradients: ``vmap(grad(loss))`` over a batch, with a per-example loop where vmap fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch.func import grad, vmap

from ._loss import ExampleLossFn

Grads = dict[str, torch.Tensor]  # {name: [B, *shape]}
GradFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Any], Grads]


def _one_example_loss(loss: ExampleLossFn) -> Callable[..., torch.Tensor]:
    """Loss of ONE example without its batch dimension: restore it (batch of one), as the torch.func tutorial."""

    def loss_of_example(
        diff: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], example: Any
    ) -> torch.Tensor:
        batch = optree.tree_map(lambda t: t.unsqueeze(0), example, none_is_leaf=True)
        out = loss({**frozen, **diff}, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"The per-example loss must return a scalar, got {shape}.")
        return out.reshape(())

    return loss_of_example


def vmapped_grads(loss: ExampleLossFn, chunk_size: int | None = None) -> GradFn:
    """``(diff, frozen, batch) -> {name: [B, *shape]}``: a pure function, safe under ``torch.compile``."""
    return vmap(grad(_one_example_loss(loss)), in_dims=(None, None, 0), chunk_size=chunk_size)


def _example(batch: Any, i: int) -> Any:
    return optree.tree_map(lambda t: t[i], batch, none_is_leaf=True)


def looped_grads(loss: ExampleLossFn) -> GradFn:
    """The same function as :func:`vmapped_grads`, one ``grad`` call per example."""
    one = grad(_one_example_loss(loss))

    def grads(diff: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], batch: Any) -> Grads:
        n = optree.tree_leaves(batch, none_is_leaf=True)[0].shape[0]
        per_example = [one(diff, frozen, _example(batch, i)) for i in range(n)]
        return {name: torch.stack([g[name] for g in per_example]) for name in diff}

    return grads


def with_loop_fallback(loss: ExampleLossFn, chunk_size: int | None = None) -> GradFn:
    """vmapped gradients; if vmap fails where a per-example loop works (no batching rule, e.g. ``nn.GRU``), warn
    once naming the cause and loop from then on. Results are identical either way."""
    fast, slow = vmapped_grads(loss, chunk_size), looped_grads(loss)
    use_loop = False

    def grads(diff: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor], batch: Any) -> Grads:
        nonlocal use_loop
        if use_loop:
            return slow(diff, frozen, batch)
        try:
            return fast(diff, frozen, batch)
        except (RuntimeError, NotImplementedError) as vmap_error:
            result = slow(diff, frozen, batch)  # a genuine error in the loss raises here, from the loop
            use_loop = True
            cause = str(vmap_error).strip().splitlines()[0][:300]
            warnings.warn(
                f"torch.func.vmap failed on this model ({type(vmap_error).__name__}: {cause}); computing per-example "
                f"gradients with a loop instead (same results, slower).",
                RuntimeWarning,
                stacklevel=2,
            )
            return result

    return grads
