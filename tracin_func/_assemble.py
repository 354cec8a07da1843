"""From captured factors and dense gradients to the gradient representation of a batch, for one loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ._capture import Factors, Witness, batched_factors, vmapped_factors
from ._grads import Mapper, Tensors, dense_grads
from ._layers import (
    Site,
    channel_split,
    input_rows,
    materialized_blocks,
    output_rows,
    per_example_blocks,
    scatter_rows,
    site_layer,
    through_parametrization,
)
from ._loss import BatchedLoss, CriterionLoss, ExampleLossFn
from ._representations import Deferred, Dense, Factored, Part, Representation, Rows, Tied, Zero, chunk_bytes

if TYPE_CHECKING:
    from ._plan import Plan

RepresentationFn = Callable[[Tensors, Tensors, Any], Representation]  # (diff, frozen, batch) -> Representation


def assemble(
    module: nn.Module, plan: Plan, dense: dict[str, torch.Tensor], factors: Factors, state: Tensors
) -> Representation:
    """Kernel sites become factored parts, other Embeddings the rows their ids touch; the other sites are
    materialised: Linears and Convs when scored (``Deferred``; a tied weight's uses together, ``_tied_blocks``; a
    parametrized weight's through its parametrization, at ``state``), the others next to the dense gradients."""
    modules = dict(module.named_modules())
    parts: list[Part] = []
    dense = dict(dense)
    owned: set[str] = set()  # names whose tensor in ``dense`` was made here, aliasing nothing: safe to add into
    tied: dict[str, _TiedUses] = {}  # a tied weight's uses, formed together when scored
    for site in sorted(plan.sites, key=_scattered_last):
        layer, (xs, gs) = site_layer(modules, site), factors[site.path]
        if not gs and site.kind not in ("expanded", "followed"):  # (no call to take factors of: a raw error before)
            raise ValueError(
                f"`model`: layer {site.path!r} is not called with gradients on this batch (not called, or under "
                f"`torch.no_grad()`), where it was on the examples the call was planned on: the model's layers depend "
                f"on each batch's values, which factors planned once cannot follow. Pass `factored=False` (every "
                f"gradient by `vmap(grad)`, or one example at a time)."
            )
        if site.kind == "embedding" and site.weight in tied and site.path not in plan.kernel:
            rows = [(input_rows(layer, site, x), output_rows(site, g)) for x, g in zip(xs, gs)]
            tied[site.weight].scattered.extend(rows)  # its rows added into the other uses' gradients when formed
            continue
        if site.kind == "embedding" and site.weight in owned and site.path not in plan.kernel:
            for x, g in zip(xs, gs):  # a tied weight's Embedding use: its rows added into the other uses' gradient
                scatter_rows(input_rows(layer, site, x), output_rows(site, g), dense[site.weight])
            continue
        rows_kept = site.kind == "embedding" and not site.tied  # materialised on the rows its ids touch only
        if site.kind in ("expanded", "followed"):  # its "output gradients" are its per-example gradients
            grads = [dict(zip(site.names, gs))]
        else:
            trimmed = site.path in plan.trimmed
            if site.path in plan.kernel or site.owner is not None or rows_kept or trimmed:  # owner: unrolled
                a = _cat([input_rows(layer, site, x) for x in xs], dim=1)  # every call (time step) at once
                g = _cat([output_rows(site, g) for g in gs], dim=1)
                a, g = _live_rows(a, g) if trimmed else (a, g)
                if site.path in plan.kernel or rows_kept:
                    parts.append(Factored(site, a, g, plan.costed) if site.path in plan.kernel else Rows.of(site, a, g))
                    continue
                blocks_for, calls = partial(partial, materialized_blocks), [(a, g)]  # every step's rows at once
                rows_of = partial(_chunk_of, a, g)
            else:
                blocks_for, calls = partial(partial, per_example_blocks, layer), list(zip(xs, gs))
                rows_of = partial(_rows_of, layer, site, calls)
            blocks_of = blocks_for(site)
            if site.kind in ("linear", "conv") and not site.tied:  # formed when scored
                by_channels = partial(_form, blocks_of, calls)
                form = partial(_whole, by_channels)
                if site.reparam:
                    form = partial(_mapped, through_parametrization(module, site, state), form)
                split = by_channels if channel_split(site, gs[0].device) else None
                factor_rows = site.groups == 1 and not (site.reparam or site.adjoint)  # (what Factored takes)
                rows_of = rows_of if factor_rows else None
                n, size, device = gs[0].shape[0], gs[0].element_size(), gs[0].device
                parts.append(Deferred(site, form, n, size, chunk_bytes(device), split, rows_of))
                continue
            if site.kind in ("linear", "conv") and site.tied and site.weight and not site.reparam:  # its weight formed
                weight = site._replace(bias=None)  # when scored, with the other uses; a bias next to the dense ones
                uses = tied.setdefault(site.weight, _TiedUses([], [], [], gs[0]))
                uses.sites.append(weight)
                uses.forms.append(partial(_form, blocks_for(weight), calls))
                if site.bias is None:
                    continue
                blocks_of = blocks_for(site._replace(weight=None))
            grads = [next(blocks_of(x, g, (None,))) for x, g in calls]
        captured = {t.untyped_storage().data_ptr() for t in (*xs, *gs)}  # a grad may alias one (a norm's bias)
        for grads_ in grads:
            for name, grad_ in grads_.items():
                if name in owned:  # a tied weight's next use: add in place, no new [B, *shape] tensor
                    dense[name].add_(grad_)
                    continue
                fresh = name in dense or grad_.untyped_storage().data_ptr() not in captured  # a sum is always new
                dense[name] = dense[name] + grad_ if name in dense else grad_
                if fresh:
                    owned.add(name)
    for name, uses in tied.items():
        by_channels, like = partial(_tied_blocks, name, uses.forms, uses.scattered), uses.like
        split = by_channels if all(channel_split(s, like.device) for s in uses.sites) else None
        n, size, chunk = like.shape[0], like.element_size(), chunk_bytes(like.device)
        parts.append(Deferred(uses.sites[0], partial(_whole, by_channels), n, size, chunk, split))
    if dense:
        parts.insert(0, Dense(dense))
    return Representation(_tied_uses_together(_conditioned(parts)), plan.names)


@torch.compiler.disable  # (eager in compiled updates: where factors lie is no value dynamo traces; its guards on
def _conditioned(parts: list[Part]) -> list[Part]:  # the shared products' keys recompiled every batch)
    """Factored parts with their examples' squared norms and whether their rows cancel (``Factored.conditioned``),
    the flags read at once (one device sync a batch)."""
    shared: dict[tuple, torch.Tensor] = {}
    checked = {i: c for i, part in enumerate(parts) if isinstance(part, Factored) and (c := part.conditioned(shared))}
    flags = torch.stack([flag for _, flag in checked.values()]).tolist() if checked else []
    for (i, (part, _)), cancelling in zip(checked.items(), flags):
        parts[i] = part._replace(cancelling=cancelling)
    return parts


class _TiedUses(NamedTuple):
    """A materialised tied weight's uses in a batch: each Linear-like use's site (the weight's only) and ``_form``,
    each call of its Embedding uses' ``(ids, rows)``, and a tensor of the batch's output gradients."""

    sites: list[Site]
    forms: list[Callable[[slice, Sequence[slice | None]], Iterator[dict[str, torch.Tensor]]]]
    scattered: list[tuple[torch.Tensor, torch.Tensor]]
    like: torch.Tensor


def _tied_blocks(
    name: str,
    forms: Sequence[Callable[[slice, Sequence[slice | None]], Iterator[dict[str, torch.Tensor]]]],
    scattered: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: slice,
    blocks: Sequence[slice | None] = (None,),
) -> Iterator[dict[str, torch.Tensor]]:
    """A tied weight's per-example gradients of the examples in ``rows``, a block of its rows (output channels) at a
    time (``None``: all): its Linear-like uses' summed, its Embedding uses' rows in the block added in place. Formed
    when scored, chunk by chunk (``Deferred``): GPT-2's tied table formed whole for a batch of 100-120 examples
    (``[B, 1000, 64]``) took 9-21 ms (fresh pages, out of cache), the same products alone 2.8 ms (110 examples)."""
    for block, uses in zip(blocks, zip(*(form(rows, blocks) for form in forms))):
        out = sum((grads[name] for grads in uses[1:]), uses[0][name])
        out = out.contiguous() if scattered else out
        for ids, g in scattered:
            ids = ids[rows]
            if block is not None:  # (-1: a row outside the block, as padding)
                ids = torch.where((ids >= block.start) & (ids < block.stop), ids - block.start, -1)
            scatter_rows(ids, g[rows], out)
        yield {name: out}


def _form(
    blocks_of: Callable[[torch.Tensor, torch.Tensor, Sequence[slice | None]], Iterator[dict[str, torch.Tensor]]],
    calls: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: slice,
    blocks: Sequence[slice | None] = (None,),
) -> Iterator[dict[str, torch.Tensor]]:
    """The per-example gradients of the examples in ``rows`` from each call's factors, summed over the calls, a block
    of output channels at a time (``None``: all of them)."""
    for parts in zip(*(blocks_of(x[rows], g[rows], blocks) for x, g in calls)):
        out = parts[0]
        for grads in parts[1:]:
            out = {name: out[name] + grad for name, grad in grads.items()}
        yield out


def _chunk_of(a: torch.Tensor, g: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return a[rows], g[rows]


def _rows_of(
    layer: nn.Module, site: Site, calls: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(A, G)`` of the examples in ``rows``: every call's input rows and output gradients, joined."""
    a = _cat([input_rows(layer, site, x[rows]) for x, _ in calls], dim=1)
    return a, _cat([output_rows(site, g[rows]) for _, g in calls], dim=1)


def _whole(by_channels: Callable[[slice], Iterator[dict[str, torch.Tensor]]], rows: slice) -> dict[str, torch.Tensor]:
    return next(by_channels(rows))


def _mapped(
    mapping: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    form: Callable[[slice], dict[str, torch.Tensor]],
    rows: slice,
) -> dict[str, torch.Tensor]:
    return mapping(form(rows))


def rows_with_gradient(g: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: whether each row of output gradients ``g`` ``[B, T, d_out]`` is not zero (NaN counts as not): its
    largest or least entry is not (two float reductions, no ``|g|`` copy: 0.62 against 0.93 ms for ``|g|`` summed, on
    ``[220, 32, 256]``; bool reductions are slower on CPU, 2.2 ms)."""
    if not g.shape[2]:  # (no entries: no row is live; a reduction over none is refused)
        return torch.zeros(g.shape[:2], dtype=torch.bool, device=g.device)
    return g.amax(2).ne(0) | g.amin(2).ne(0)


def worth_dropping(live: int, rows: int) -> bool:
    """Whether keeping ``live`` of ``rows`` rows per example saves more than copying them costs: at most half."""
    return 2 * live <= rows


@torch.compiler.disable  # sizes depend on the gradients: run eagerly inside compiled updates
def _live_rows(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of each example's rows whose output gradient is not zero, gathered to the front (in order), when every
    example has at most half its rows live (dropping fewer saves less than the copies cost): the rows left out add
    nothing to any gradient, and an example with fewer live rows takes zero-gradient ones to fill up. All kept when an
    input is not finite (``0 * inf`` is NaN in the gradient, which the call reports)."""
    live = rows_with_gradient(g)
    t = int(live.sum(1).max()) if live.numel() else 0
    if not worth_dropping(t, live.shape[1]) or not bool(a.sum().isfinite()):
        return a, g
    if bool((live == live[:1]).all()):  # every example's in the same places (a classifier reading its first token)
        rows = live[0].nonzero()[:, 0]
        return a[:, rows], g[:, rows]
    rows = torch.argsort(live.logical_not().to(torch.uint8), dim=1, stable=True)[:, :t, None]  # live rows first
    return a.gather(1, rows.expand(-1, -1, a.shape[2])), g.gather(1, rows.expand(-1, -1, g.shape[2]))


def _tied_uses_together(parts: list[Part]) -> tuple[Part, ...]:
    """The kept factors of a tied weight's uses as one ``Tied`` part (at its first use's place)."""
    uses: dict[str, list[Factored]] = {}
    for p in parts:
        if isinstance(p, Factored) and p.site.tied:
            uses.setdefault(p.site.weight, []).append(p)
    out: list[Part] = []
    for p in parts:
        if not (isinstance(p, Factored) and p.site.tied):
            out.append(p)
        elif p is uses[p.site.weight][0]:
            out.append(Tied(tuple(uses[p.site.weight])))
    return tuple(out)


def _scattered_last(site: Site) -> bool:
    """Sort key: a tied weight's Embedding uses after its other uses, so that their rows are scattered into the
    gradient those made (no zero-filled ``[B, V, d]`` tensor and no second pass to add it)."""
    return site.tied and site.kind == "embedding"


def _cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)  # a layer called once: no copy


def representation_fn(
    module: nn.Module | None,
    loss: ExampleLossFn,
    plan: Plan,
    mapper: Mapper,
    *,
    compiled: bool = False,
    witness: Witness | None = None,
) -> RepresentationFn:
    """``(diff, frozen, batch) -> Representation`` for one loss under ``plan``; ``compiled``: run under
    ``torch.compile``, where autograd's nodes are the compiled graph's; ``witness``: shown each batched forward's
    outputs (both: see ``batched_factors``)."""
    if not plan.sites:
        grads = dense_grads(loss, mapper)
        return lambda diff, frozen, batch: Representation((Dense(grads(diff, frozen, batch)),), plan.names)
    assert module is not None  # sites exist only on modules
    if plan.batched and isinstance(loss, (CriterionLoss, BatchedLoss)):

        # what is computed once for the whole batch is followed by a function mode and a second backward pass through
        # its part of the graph, kept (retain_graph): eager inside compiled updates, which refuse a kept graph
        capture = torch.compiler.disable(batched_factors) if plan.follows else batched_factors

        def batched(diff: Tensors, frozen: Tensors, batch: Any) -> Representation:
            state = {**frozen, **diff}
            factors = capture(module, loss, plan, state, batch, mapper, compiled=compiled, witness=witness)
            rep = assemble(module, plan, {}, factors, state)
            if not plan.unused:
                return rep
            return rep._replace(parts=(*rep.parts, Zero.of({n: diff[n] for n in plan.unused}, rep.size)))

        return batched
    vmapped = vmapped_factors(module, loss, plan, mapper)
    return lambda diff, frozen, batch: assemble(module, plan, *vmapped(diff, frozen, batch), {**frozen, **diff})
