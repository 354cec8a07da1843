"""Per-sample gradients: ``vmap(grad(loss))`` over a batch, with a per-example loop where vmap fails."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._loss import ExampleLossFn
from ._warn import warn

Tensors = Mapping[str, torch.Tensor]
GradFn = Callable[[Tensors, Tensors, Any], dict[str, torch.Tensor]]  # (diff, frozen, batch) -> {name: [B, ...]}


def batch_of_one(example: Any) -> Any:
    """Give every tensor of one example back its batch dimension, as the torch.func per-sample-gradient tutorial."""
    return optree.tree_map(lambda t: t.unsqueeze(0), example, none_is_leaf=True)


def scalar_loss(loss: ExampleLossFn, state: Tensors, batch: Any) -> torch.Tensor:
    out = loss(state, batch)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"The per-example loss must return a scalar, got {shape}.")
    return out.reshape(())


def example_at(batch: Any, i: int) -> Any:
    """Example ``i`` of ``batch``, without its batch dimension."""
    return optree.tree_map(lambda t: t[i], batch, none_is_leaf=True)


_FUNCTION_WITHOUT_SETUP_CONTEXT = (
    "The model runs a torch.autograd.Function without a `setup_context` method (e.g. BLOOM's GeLU), which "
    "torch.func (vmap, grad) cannot differentiate, so this call cannot compute per-example gradients one example at "
    "a time. Keep the default `factored=None` with a criterion `loss_fn` or a `tc.BatchLoss` (the batched path "
    "differentiates with plain autograd), or give the Function a `setup_context` "
    "(https://pytorch.org/docs/stable/notes/extending.func.html)."
)


class Mapper:
    """Maps per-example functions over batches for one scoring call.

    Uses ``vmap``; if vmap fails where a per-example loop works (no batching rule, e.g. ``nn.GRU`` on torch 2.13),
    it warns once naming the cause and every function of the call loops from then on. Results are identical.
    The only state is that switch, and a Mapper lives for one call.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.loop = False

    def over_batch(self, one: Callable[..., Any], n_static: int) -> Callable[..., Any]:
        """``f(*static, batch)`` stacking ``one(*static, example)`` over the examples of ``batch``."""
        fast = vmap(one, in_dims=(None,) * n_static + (0,), chunk_size=self.chunk_size)

        def slow(*args: Any) -> Any:
            *static, batch = args
            n = optree.tree_leaves(batch, none_is_leaf=True)[0].shape[0]
            outs = [one(*static, example_at(batch, i)) for i in range(n)]
            return optree.tree_map(lambda *xs: torch.stack(xs), *outs, none_is_leaf=True)

        def mapped(*args: Any) -> Any:
            if self.loop:
                return slow(*args)
            try:
                # The math attention kernel has vmap batching rules; the fused CPU kernels fall back to a slow loop.
                with sdpa_kernel(SDPBackend.MATH):
                    return fast(*args)
            except (RuntimeError, NotImplementedError) as vmap_error:
                try:
                    result = slow(*args)  # a genuine error in the loss raises here, from the loop
                except RuntimeError as err:
                    if "setup_context" not in str(err):
                        raise
                    raise RuntimeError(_FUNCTION_WITHOUT_SETUP_CONTEXT) from err
                self.loop = True
                warn(
                    f"torch.func.vmap failed on this model, so per-example gradients are computed with a loop "
                    f"instead (same results, slower){_in_model_code(vmap_error)}. The cause, in full: "
                    f"{type(vmap_error).__name__}: {str(vmap_error).strip()}",
                    RuntimeWarning,
                )
                return result

        return mapped


def _in_model_code(err: BaseException) -> str:
    """``", at file:line (function): `code`"``: the innermost frame of ``err``'s traceback in the model's code (not
    torch's, not this library's), where the model did what vmap cannot; ``""`` if none."""
    library = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(library)]
    if not frames:
        return ""
    frame = frames[-1]
    where = frame.filename.split("site-packages" + os.sep)[-1]
    return f", at {where}:{frame.lineno} ({frame.name})" + (f": `{frame.line.strip()}`" if frame.line else "")


def dense_grads(loss: ExampleLossFn, mapper: Mapper) -> GradFn:
    """``(diff, frozen, batch) -> {name: [B, *shape]}``, the per-sample gradients w.r.t. ``diff``."""

    def loss_of_example(diff: Tensors, frozen: Tensors, example: Any) -> torch.Tensor:
        return scalar_loss(loss, {**frozen, **diff}, batch_of_one(example))

    return mapper.over_batch(grad(loss_of_example), 2)
