"""Factored gradients: layer inputs ``A`` and output gradients ``G`` of Linear / Conv / Embedding layers, obtained
functionally, and the per-call plan of which layers are handled that way.

A zero "probe" is added to each factored layer's output and differentiated (``G``); the layer's input rows are
kept (``A``). Forward hooks do both; they live only for the duration of the call and are removed in ``finally``
blocks, so the user's module keeps no trace. Two ways to run them:

- batched: one ordinary forward / backward over the whole batch, the criterion mapped over examples. Used when
  every differentiated parameter is factored and the loss is a criterion, after checking on the first examples
  that batching does not change them (examples do not interact in the forward pass).
- vmapped: ``vmap(grad)`` over examples, differentiating the probes and, in the same pass, the parameters of
  other layers (LayerNorm, attention in-projections, custom layers) densely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.func import grad

from ._grads import Mapper, Tensors, batch_of_one, dense_grads, example_at, scalar_loss
from ._layers import (
    Site,
    factorable_sites,
    input_rows,
    layer_output,
    output_rows,
    per_example_grads,
    recorded_input,
)
from ._loss import CriterionLoss, ExampleLossFn, summed_example_losses
from ._reps import Dense, Factored, Grads

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
RepFn = Callable[[Tensors, Tensors, Any], Grads]  # (diff, frozen, batch) -> Grads
Factors = dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]  # path -> per call: inputs, output grads


class Plan(NamedTuple):
    """How each differentiated parameter is handled in one call; decided on its first batch."""

    names: tuple[str, ...]  # all differentiated parameters, in the user's order
    dense: tuple[str, ...]  # differentiated by vmap(grad)
    sites: tuple[Site, ...]  # layers whose gradients are obtained as factors
    kernel: frozenset[str]  # paths of sites kept as factors (the others are materialised next to dense grads)
    batched: bool  # factors from one batched forward / backward (else vmapped)


@contextmanager
def _hooked(modules: Mapping[str, nn.Module], hooks: Mapping[str, Hook]) -> Iterator[None]:
    handles = [modules[path].register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first(batch: Any, n: int = 1) -> Any:
    return _slice(batch, 0, n)


def _slice(batch: Any, start: int, stop: int) -> Any:
    return optree.tree_map(lambda t: t[start:stop], batch, none_is_leaf=True)


def _discover(
    model: nn.Module,
    loss: ExampleLossFn,
    sites: Sequence[Site],
    diff: Tensors,
    frozen: Tensors,
    batch: Any,
    mapper: Mapper,
) -> tuple[dict[str, list[tuple[int, ...]]], dict[str, torch.Tensor]]:
    """Run the first example of ``batch`` under ``vmap(grad)`` with each site's own parameter use detached.

    Returns each site's output shapes (one per call) and the gradient that still reaches each differentiated
    parameter: a site's parameters must get none, since another use (a direct ``F.linear(x, layer.weight)``,
    a regulariser in the loss) would be missed by its factors; a non-zero entry sends that layer to vmap(grad).
    """
    modules = dict(model.named_modules())
    calls: dict[str, list[tuple[int, ...]]] = {s.path: [] for s in sites}

    def hook_for(site: Site) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
            calls[site.path].append(tuple(output.shape))
            return layer_output(module, site, args[0], detach=True)

        return hook

    def loss_of_example(diff: Tensors, frozen: Tensors, example: Any) -> torch.Tensor:
        with _hooked(modules, {s.path: hook_for(s) for s in sites}):
            return scalar_loss(loss, {**frozen, **diff}, batch_of_one(example))

    leaked = grad(loss_of_example)(diff, frozen, example_at(batch, 0))  # one example: no vmap needed
    return calls, leaked


def _rows_per_example(site: Site, shapes: Sequence[tuple[int, ...]]) -> int:
    """``T``: rows of ``A`` / ``G`` per example, over all calls of the layer (shapes of a batch of one)."""
    return sum(math.prod(s[2:]) if site.kind == "conv" else math.prod(s[:-1]) for s in shapes)


def _kernel_is_cheaper(site: Site, rows: int) -> bool:
    """One pair's inner product: factored ``T^2 (d_in + d_out)`` against materialised ``d_in d_out`` flops."""
    d_out, d_in = site.weight_shape[0], math.prod(site.weight_shape[1:]) + (site.bias is not None)
    return rows * rows * (d_in + d_out) < d_in * d_out


def make_plan(
    model: Any,
    names: Sequence[str],
    losses: Sequence[ExampleLossFn],
    diff: Tensors,
    frozen: Tensors,
    batch: Any,
    mapper: Mapper,
    *,
    factored: bool | None,
) -> Plan:
    """Plan one call: which layers give factors, which of those are scored by factored inner products (a cost
    model for ``factored=None``, all for ``True``; ``False`` uses vmap(grad) for everything), and how factors are
    obtained."""
    sites = factorable_sites(model, names) if isinstance(model, nn.Module) and factored is not False else {}
    kernel = set()
    for loss in losses if sites else ():
        calls, leaked = _discover(model, loss, list(sites.values()), diff, frozen, batch, mapper)
        for path, site in list(sites.items()):
            if not calls[path] or any(bool(leaked[n].ne(0).any()) for n in site.names):
                del sites[path]  # not called as a module, or its parameters are also used elsewhere
            elif site.kind != "norm" and (
                factored or site.kind == "embedding" or _kernel_is_cheaper(site, _rows_per_example(site, calls[path]))
            ):
                kernel.add(path)  # an Embedding is never materialised on the training side (see TokenRows)
    dense = _not_in_sites(names, sites.values())
    if dense:  # vmap(grad) runs anyway: a layer whose gradients would be materialised is cheaper left to it
        sites = {path: site for path, site in sites.items() if path in kernel}
        dense = _not_in_sites(names, sites.values())
    plan = Plan(tuple(names), dense, tuple(sites.values()), frozenset(kernel & set(sites)), batched=False)
    if sites and not dense and all(isinstance(loss, CriterionLoss) for loss in losses):
        plan = plan._replace(batched=_batching_is_exact(model, losses, plan, {**frozen, **diff}, batch, mapper))
    return plan


def _not_in_sites(names: Sequence[str], sites: Iterable[Site]) -> tuple[str, ...]:
    in_sites = {n for site in sites for n in site.names}
    return tuple(n for n in names if n not in in_sites)


def _batching_is_exact(
    model: nn.Module, losses: Sequence[ExampleLossFn], plan: Plan, state: Tensors, batch: Any, mapper: Mapper
) -> bool:
    """Whether a batched forward gives each example the factors it gets alone (no interaction across examples)."""
    few = _first(batch, 4)
    n = optree.tree_leaves(few, none_is_leaf=True)[0].shape[0]
    for loss in losses:
        together = _batched_factors(model, loss, plan, state, few, mapper)
        alone = [_batched_factors(model, loss, plan, state, _slice(few, i, i + 1), mapper) for i in range(n)]
        for path, (xs, gs) in together.items():
            singles = _concat_examples([a[path] for a in alone])
            if singles is None or len(singles) != len(xs) + len(gs) or not all(map(_close, singles, [*xs, *gs])):
                return False
    return True


def _concat_examples(factors: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> list[torch.Tensor] | None:
    """One layer's inputs then output gradients per call, concatenated over examples that were run alone; None
    when the examples called the layer a different number of times or with different shapes."""
    if len({len(xs) for xs, _ in factors}) > 1:
        return None
    per_call = list(zip(*(xs + gs for xs, gs in factors)))
    if any(t.shape[1:] != ts[0].shape[1:] for ts in per_call for t in ts):
        return None
    return [torch.cat(ts) for ts in per_call]


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float rounding (a batched GEMM may sum in another order), relative to the largest entry."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.is_floating_point() or torch.equal(x, y):
        return torch.equal(x, y)
    return bool((x - y).abs().max() <= 1e-4 * y.abs().max())


def _batched_factors(
    model: nn.Module, loss: CriterionLoss, plan: Plan, state: Tensors, batch: Any, mapper: Mapper
) -> Factors:
    """Each site's inputs and output gradients from one forward / backward over the whole batch."""
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}
    probes: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}

    def hook_for(site: Site) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
            probe = torch.zeros_like(output, requires_grad=True)
            inputs[site.path].append(recorded_input(module, site, args[0]).detach())
            probes[site.path].append(probe)
            return output + probe

        return hook

    def criterion_of_example(example: tuple[Any, Any]) -> torch.Tensor:
        output, target = batch_of_one(example)
        return loss.criterion(output, target).sum()

    *model_inputs, target = batch
    with torch.enable_grad():
        with _hooked(modules, {s.path: hook_for(s) for s in plan.sites}):
            output = loss.forward(state, *model_inputs)
        total = summed_example_losses(loss.criterion, output, target)
        if total is None:
            total = mapper.over_batch(criterion_of_example, 0)((output, target)).sum()
        flat = [p for s in plan.sites for p in probes[s.path]]
        grads = torch.autograd.grad(total, flat, allow_unused=True)
    grads = iter(torch.zeros_like(p) if g is None else g for g, p in zip(grads, flat))
    return {s.path: (inputs[s.path], [next(grads) for _ in probes[s.path]]) for s in plan.sites}


def _vmapped_factors(
    model: nn.Module, loss: ExampleLossFn, plan: Plan, mapper: Mapper
) -> Callable[[Tensors, Tensors, Any], tuple[dict[str, torch.Tensor], Factors]]:
    """``(diff, frozen, batch) -> (dense grads, factors)`` in one ``vmap(grad)`` pass over examples."""
    modules = dict(model.named_modules())
    factored_names = {n for s in plan.sites for n in s.names}
    probe_shapes: dict[Any, dict[str, list[tuple[int, ...]]]] = {}  # per example signature, found once per call

    def loss_of_example(dense: Tensors, probes: Mapping[str, Sequence[torch.Tensor]], frozen: Tensors, example: Any):
        inputs: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}

        def hook_for(site: Site) -> Hook:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
                k = len(inputs[site.path])
                if k >= len(probes[site.path]):
                    raise RuntimeError(f"Layer {site.path!r} was called more often than when the call was planned.")
                inputs[site.path].append(recorded_input(module, site, args[0]))
                return output + probes[site.path][k]

            return hook

        with _hooked(modules, {s.path: hook_for(s) for s in plan.sites}):
            out = scalar_loss(loss, {**frozen, **dense}, batch_of_one(example))
        return out, inputs

    mapped = mapper.over_batch(grad(loss_of_example, argnums=(0, 1), has_aux=True), 3)

    def factors(diff: Tensors, frozen: Tensors, batch: Any) -> tuple[dict[str, torch.Tensor], Factors]:
        signature = tuple((tuple(t.shape[1:]), t.dtype) for t in optree.tree_leaves(batch, none_is_leaf=True))
        if signature not in probe_shapes:
            probe_shapes[signature] = _discover(model, loss, plan.sites, diff, frozen, batch, mapper)[0]
        dtype, device = next(iter(diff.values())).dtype, next(iter(diff.values())).device
        probes = {
            path: [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
            for path, shapes in probe_shapes[signature].items()
        }
        dense = {n: diff[n] for n in plan.dense}
        held = {**frozen, **{n: diff[n] for n in factored_names}}
        (dense_grads_, probe_grads), inputs = mapped(dense, probes, held, batch)
        out = {}
        for site in plan.sites:
            xs, gs = inputs[site.path], probe_grads[site.path]
            if len(xs) != len(gs):
                raise RuntimeError(f"Layer {site.path!r} was called differently than when the call was planned.")
            out[site.path] = ([x[:, 0] for x in xs], [g[:, 0] for g in gs])  # drop each example's batch of one
        return dense_grads_, out

    return factors


def _assemble(model: nn.Module, plan: Plan, dense: dict[str, torch.Tensor], factors: Factors) -> Grads:
    """Kernel sites become factored parts; the other sites are materialised next to the dense gradients."""
    modules = dict(model.named_modules())
    parts: list[Any] = []
    dense = dict(dense)
    for site in plan.sites:
        module, (xs, gs) = modules[site.path], factors[site.path]
        if site.path in plan.kernel:
            a = _cat([input_rows(module, site, x) for x in xs], dim=1)
            g = _cat([output_rows(site, g) for g in gs], dim=1)
            parts.append(Factored(site, a, g))
            continue
        for x, g in zip(xs, gs):
            for name, grad_ in per_example_grads(module, site, x, g).items():
                dense[name] = dense[name] + grad_ if name in dense else grad_
    if dense:
        parts.insert(0, Dense(dense))
    return Grads(tuple(parts), plan.names)


def _cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)  # a layer called once: no copy


def representation_fn(model: Any, loss: ExampleLossFn, plan: Plan, mapper: Mapper) -> RepFn:
    """``(diff, frozen, batch) -> Grads`` for one loss under ``plan``."""
    if not plan.sites:
        grads = dense_grads(loss, mapper)
        return lambda diff, frozen, batch: Grads((Dense(grads(diff, frozen, batch)),), plan.names)
    if plan.batched and isinstance(loss, CriterionLoss):
        return lambda diff, frozen, batch: _assemble(
            model, plan, {}, _batched_factors(model, loss, plan, {**frozen, **diff}, batch, mapper)
        )
    vmapped = _vmapped_factors(model, loss, plan, mapper)
    return lambda diff, frozen, batch: _assemble(model, plan, *vmapped(diff, frozen, batch))


def last_layer_params(model: nn.Module, loss: ExampleLossFn, ckpt: Any, batch: Any) -> list[str]:
    """Parameter names of the last ``nn.Linear`` called when computing the loss of the first example of ``batch``."""
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []

    def hook_for(path: str) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            order.append(path)

        return hook

    with torch.no_grad(), _hooked(linears, {path: hook_for(path) for path in linears}):
        loss({**ckpt.frozen, **ckpt.diff}, _first(batch))
    if not order:
        raise ValueError("`method='last_layer'` found no nn.Linear called by the model; select `layers=` instead.")
    module = linears[order[-1]]
    prefix = f"{order[-1]}." if order[-1] else ""
    return [prefix + name for name, _ in module.named_parameters(recurse=False)]
