"""``nn.MultiheadAttention`` as factor sites: self-attention run unrolled on the call's private copy.

The fused ``F.multi_head_attention_forward`` uses ``in_proj_weight`` and ``out_proj.weight`` directly, so neither
is a layer call that hooks can see, and every transformer built from ``nn.MultiheadAttention`` (``nn.Transformer*``
layers, ViTs) fell to ``vmap(grad)``. Unrolled, the in-projection is one Linear-like product over the sequence,
``[q, k, v] = x W_in^T + b_in`` (a site with ``T`` rows per example, whose ``G`` is the gradient at ``[q, k, v]``),
the attention itself runs as torch computes it (scaled dot products, the same masks), and ``out_proj`` is called as
the module it is, an ordinary Linear site.

Cross-attention (a decoder's queries over an encoder's memory) projects each input with its third of the packed
weight. Unrolled, the product runs on the rows of all three inputs at once, ``[x_q; x_k; x_v] W_in^T`` (one row
block per input, ``x_k`` once when it is ``x_v``), and each input keeps its own third of the columns: the other
blocks get no gradient, so the site's factors give each third its own inputs' gradient. That costs up to 3x the
fused in-projection's products, but keeps the layer (and the model) on the batched path.

Only the exact class ``nn.MultiheadAttention`` (its own forward, no hooks or parametrizations; ``out_proj`` a plain
Linear without hooks, whose call is then the fused op's use of its weight and bias) with one packed in-projection
(``kdim = vdim = embed_dim``), no ``bias_k`` / ``bias_v`` / ``add_zero_attn`` and no active dropout is unrolled, on
batched inputs: other calls run the fused op, and planning then sees the product uncalled and keeps the dense route.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._layers import Hook, Site, not_exactly, product, wrapped

PRODUCT = "in_proj"  # the site path of a layer's in-projection: "<layer>.in_proj"


def why_not_unrolled(module: nn.MultiheadAttention) -> str:
    """Why an attention layer is not run unrolled, or ``""``."""
    name = type(module).__name__
    if not_exactly(module, nn.MultiheadAttention):
        return not_exactly(module, nn.MultiheadAttention)
    if not module._qkv_same_embed_dim:
        return f"{name} with kdim / vdim other than embed_dim has no unrolled form"
    if module.bias_k is not None or module.add_zero_attn:
        return f"{name} with bias_k / bias_v or add_zero_attn has no unrolled form"
    if module.training and module.dropout > 0:
        return f"{name} has attention dropout in training mode"
    proj = module.out_proj
    plain = type(proj) in (nn.Linear, NonDynamicallyQuantizableLinear)
    why = wrapped(proj) or ("" if plain else f"{type(proj).__name__} is not a plain Linear, whose forward may differ")
    if why:
        return f"{name}'s out_proj is called unrolled, where the fused op reads its weight and bias alone: {why}"
    return ""


def attention_sites(model: nn.Module, diff: set[str], users: Mapping[int, int]) -> dict[str, Site]:
    """The in-projections of unrollable attention layers holding differentiated parameters, keyed by site path
    (``users``: modules holding each parameter tensor; a shared one is left to the dense path)."""
    sites: dict[str, Site] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or why_not_unrolled(module):
            continue
        own = [module.in_proj_weight, module.in_proj_bias]
        if any(p is not None and users[id(p)] > 1 for p in own):
            continue
        prefix = f"{path}." if path else ""
        weight = f"{prefix}in_proj_weight" if f"{prefix}in_proj_weight" in diff else None
        bias = f"{prefix}in_proj_bias" if module.in_proj_bias is not None and f"{prefix}in_proj_bias" in diff else None
        if weight or bias:
            shape = tuple(module.in_proj_weight.shape)
            sites[prefix + PRODUCT] = Site(prefix + PRODUCT, "linear", weight, bias, shape, owner=path)
    return sites


def attention_forward(
    module: nn.MultiheadAttention,
    hooks: Mapping[str, Hook],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s forward with the in-projection a hooked product and ``out_proj`` called as a module; the
    fused op on unbatched or nested inputs (or an ``is_causal`` hint without a mask, which it refuses)."""
    inputs = (query, key, value)
    batched = all(isinstance(t, torch.Tensor) and t.dim() == 3 and not t.is_nested for t in inputs)
    if not batched or (is_causal and attn_mask is None):
        return type(module).forward(
            module, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    q, k, v = _projected(module, hooks, *inputs)
    (n, heads, length, _), embed = q.shape, module.embed_dim
    causal = is_causal and key_padding_mask is None and not need_weights  # the fused op's own rule
    mask = None if causal else _additive_mask(attn_mask, key_padding_mask, n, heads, q.dtype)
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        weights = (scores if mask is None else scores + mask).softmax(-1)  # [B, H, L, S]
        out = weights @ v
        weights = weights.mean(1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    out = module.out_proj(out.transpose(1, 2).reshape(n, length, embed))
    return (out if module.batch_first else out.transpose(0, 1)), weights


def _projected(
    module: nn.MultiheadAttention, hooks: Mapping[str, Hook], *inputs: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``q, k, v`` ``[B, H, L, D]`` of the inputs by one hooked product: self-attention's ``x W_in^T``, or
    cross-attention's over the rows of each distinct input, each keeping its own third of the columns."""
    distinct: list[torch.Tensor] = []
    block = []  # each input's block of rows: its place among the distinct inputs
    for t in inputs:  # query, key, value
        block.append(next((i for i, u in enumerate(distinct) if u is t), len(distinct)))
        if block[-1] == len(distinct):
            distinct.append(t)
    batch_first = [t if module.batch_first else t.transpose(0, 1) for t in distinct]  # [B, L, E]
    x = batch_first[0] if len(distinct) == 1 else torch.cat(batch_first, 1)  # [B, rows of every distinct input, E]
    projected = product(hooks, PRODUCT, x, module.in_proj_weight, module.in_proj_bias)
    # each block split once (self-attention's not at all): in the backward pass one `cat` joins q's, k's and v's
    # gradients, where a split per third adds two zero-filled copies to each (the tiny transformer: 0.1 s of 1.0)
    blocks = projected.split([t.shape[1] for t in batch_first], 1) if len(distinct) > 1 else (projected,)
    chunks = [b.chunk(3, -1) for b in blocks]
    thirds = (chunks[b][i] for i, b in enumerate(block))  # q's, k's, v's columns of its block
    return tuple(t.unflatten(-1, (module.num_heads, -1)).transpose(1, 2) for t in thirds)


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, heads: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Both masks as one additive float mask broadcasting to ``[B, H, L, S]`` (True in a boolean mask: masked)."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:  # (like the mask: a per-example one under vmap, torch's own way)
            return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:  # [L, S] or [B * H, L, S]
        mask = additive(attn_mask)
        mask = mask if mask.dim() == 2 else mask.view(n, heads, *mask.shape[1:])
    if key_padding_mask is not None:  # [B, S]
        padding = additive(key_padding_mask).view(n, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask
