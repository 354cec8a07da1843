"""``nn.EmbeddingBag`` as a factor site: a bag of ids run unrolled on the call's private copy, as a lookup and a sum.

The fused ``F.embedding_bag`` reduces each bag's rows before anything can see them, so the layer fell to
``vmap(grad)``, whose per-example gradients are dense ``[V, d]`` tables (100x the plain backward pass and more, and
memory growing with the vocabulary). Unrolled, a bag ``[B, N]`` of ids is an Embedding lookup ``[B, N, d]`` (a site
with ``N`` rows per example, whose ``G`` is the gradient at each looked-up row), then the weighted sum over the bag
that the layer computes: ``mode="sum"`` (times ``per_sample_weights`` when given) or ``"mean"``, with ids equal to
``padding_idx`` left out of both (a bag of padding only gives zeros, as the fused op). Each row's gradient is its
bag's output gradient times its weight (zero for padding), so the lookup's factors are exact.

Only the exact class (its own forward, no hooks or parametrizations) with ``mode`` ``"sum"`` or ``"mean"``, no
``max_norm`` and no ``scale_grad_by_freq`` (which scales by counts over the whole batch) is unrolled, and only on
bags of fixed size (``input`` ``[B, N]``, no ``offsets``): a flat input with ``offsets`` runs the fused op, and
planning then sees the product uncalled and keeps the dense route.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import Hook, Site, Weights, not_exactly

PRODUCT = "lookup"  # the site path of a bag's lookup: "<layer>.lookup"


def why_not_unrolled(module: nn.EmbeddingBag) -> str:
    """Why an EmbeddingBag is not run unrolled, or ``""``."""
    name = type(module).__name__
    if not_exactly(module, nn.EmbeddingBag):
        return not_exactly(module, nn.EmbeddingBag)
    if module._parameters.get("weight") is None:
        return f"{name}'s weight is not its own parameter (a wrapper sets it)"
    if module.mode not in ("sum", "mean"):
        return f"{name} with mode={module.mode!r} has no unrolled form (only 'sum' and 'mean')"
    if module.max_norm is not None or module.scale_grad_by_freq:
        return f"{name} with max_norm or scale_grad_by_freq has no unrolled form"
    return ""


def bag_sites(model: nn.Module, diff: set[str], users: Mapping[int, int]) -> dict[str, Site]:
    """The lookups of unrollable EmbeddingBags whose weight is differentiated, keyed by site path (``users``:
    modules holding each parameter tensor; a shared one is left to the dense path)."""
    sites: dict[str, Site] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.EmbeddingBag) or why_not_unrolled(module) or users[id(module.weight)] > 1:
            continue
        weight = f"{path}.weight" if path else "weight"
        if weight in diff:
            site = f"{path}.{PRODUCT}" if path else PRODUCT
            sites[site] = Site(site, "embedding", weight, None, tuple(module.weight.shape), owner=path)
    return sites


def bag_forward(
    module: nn.EmbeddingBag,
    hooks: Mapping[str, Hook],
    input: torch.Tensor,
    offsets: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``module``'s forward as a hooked lookup and a weighted sum over each bag; the fused op on a flat input with
    ``offsets``."""
    flat = not isinstance(input, torch.Tensor) or input.dim() != 2 or offsets is not None
    if flat or (per_sample_weights is not None and module.mode != "sum"):  # (the latter: the fused op's error)
        return type(module).forward(module, input, offsets, per_sample_weights)
    rows = F.embedding(input, module.weight)  # [B, N, d]
    kept = torch.ones_like(input, dtype=torch.bool) if module.padding_idx is None else input != module.padding_idx
    hook = hooks.get(PRODUCT)
    if hook is not None:
        replaced = hook(Weights(module.weight, None, module.padding_idx), (input,), rows)
        rows = rows if replaced is None else replaced
    weights = kept.to(rows.dtype)
    if per_sample_weights is not None:
        weights = weights * per_sample_weights
    if module.mode == "mean":
        weights = weights / kept.sum(1, keepdim=True).clamp(min=1)
    return (weights.unsqueeze(1) @ rows).squeeze(1)  # [B, 1, N] @ [B, N, d]
