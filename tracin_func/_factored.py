"""Factored gradients: layer inputs and output gradients of Linear / Conv / Embedding layers, obtained functionally.

A zero "probe" is added to each factored layer's output and differentiated (``G``); the layer's input rows are
returned as auxiliary outputs (``A``). Forward hooks do both; they live only for the duration of the call and
are removed in ``finally`` blocks, so the user's module keeps no trace. Parameters of other layers (LayerNorm,
attention in-projections, custom layers) are differentiated densely in the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import optree
import torch
from torch import nn
from torch.func import grad

from ._grads import Tensors, batch_of_one, dense_grads, over_batch, scalar_loss
from ._layers import Site, factorable_sites, input_rows, layer_output, output_rows
from ._loss import ExampleLossFn
from ._reps import Dense, Factored, Grads

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
RepFn = Callable[[Tensors, Tensors, Any], Grads]  # (diff, frozen, batch) -> Grads


class Plan(NamedTuple):
    """Which differentiated parameters go through which path; decided once per call."""

    names: tuple[str, ...]  # all differentiated parameters, in the user's order
    dense: tuple[str, ...]
    sites: tuple[Site, ...]  # factored layers


@contextmanager
def _hooked(modules: Mapping[str, nn.Module], hooks: Mapping[str, Hook]) -> Iterator[None]:
    handles = [modules[path].register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Probe(NamedTuple):
    shape: tuple[int, ...]  # the layer output's shape for a batch of one
    dtype: torch.dtype


def _discover(
    model: nn.Module, loss: ExampleLossFn, sites: Sequence[Site], diff: Tensors, frozen: Tensors, batch: Any
) -> tuple[dict[str, list[_Probe]], dict[str, torch.Tensor]]:
    """Run a batch of one example under ``vmap(grad)`` with the factored layers' own parameter use detached.

    Returns each site's output shapes per call and the gradient that still reaches each differentiated parameter:
    a factored layer's parameters must get none (any other use, e.g. a direct ``F.linear(x, layer.weight)``,
    would be missed by its factors), so a non-zero entry sends that layer to the dense path.
    """
    modules = dict(model.named_modules())
    calls: dict[str, list[_Probe]] = {s.path: [] for s in sites}

    def hook_for(site: Site) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
            calls[site.path].append(_Probe(tuple(output.shape), output.dtype))
            return layer_output(module, site, args[0], detach=True)

        return hook

    def loss_of_example(diff: Tensors, frozen: Tensors, example: Any) -> torch.Tensor:
        with _hooked(modules, {s.path: hook_for(s) for s in sites}):
            return scalar_loss(loss, {**frozen, **diff}, batch_of_one(example))

    leaked = over_batch(grad(loss_of_example), 2)(diff, frozen, batch)
    return calls, leaked


def make_plan(
    model: Any,
    names: Sequence[str],
    losses: Sequence[ExampleLossFn],
    diff: Tensors,
    frozen: Tensors,
    batch: Any,
    *,
    factored: bool | None,
) -> Plan:
    """Choose per layer: factored when a cost model says so (``factored=None``), always (``True``) or never.

    The cost model compares one pair's inner product: factored costs ``T^2 (d_in + d_out)``, dense ``d_in d_out``.
    """
    sites = factorable_sites(model, names) if isinstance(model, nn.Module) and factored is not False else {}
    chosen = []
    if sites:
        for loss in losses:
            calls, leaked = _discover(model, loss, list(sites.values()), diff, frozen, _first_example(batch))
            for path, site in list(sites.items()):
                if not calls[path] or any(bool(leaked[n].ne(0).any()) for n in site.names):
                    del sites[path]  # not called as a module, or its parameters are also used elsewhere
                    continue
                if factored is None and not _factored_is_cheaper(site, calls[path]):
                    del sites[path]
        chosen = list(sites.values())
    in_sites = {n for s in chosen for n in s.names}
    return Plan(tuple(names), tuple(n for n in names if n not in in_sites), tuple(chosen))


def _first_example(batch: Any) -> Any:
    return optree.tree_map(lambda t: t[:1], batch, none_is_leaf=True)


def _factored_is_cheaper(site: Site, calls: Sequence[_Probe]) -> bool:
    d_out = site.weight_shape[0]
    if site.kind == "embedding":
        d_in, d_out = site.weight_shape[0], site.weight_shape[1]
        rows = sum(_numel(p.shape[:-1]) for p in calls)
        return rows * rows * (d_out + 1) < d_in * d_out
    d_in = _numel(site.weight_shape[1:]) + (site.bias is not None)
    if site.kind == "conv":
        rows = sum(_numel(p.shape[2:]) for p in calls)
    else:
        rows = sum(_numel(p.shape[:-1]) for p in calls)
    return rows * rows * (d_in + d_out) < d_in * d_out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def representation_fn(model: Any, loss: ExampleLossFn, plan: Plan, chunk_size: int | None = None) -> RepFn:
    """``(diff, frozen, batch) -> Grads``: dense parts by ``vmap(grad)``, factored layers by probes, in one pass."""
    if not plan.sites:
        grads = dense_grads(loss, chunk_size)
        return lambda diff, frozen, batch: Grads((Dense(grads(diff, frozen, batch)),), plan.names)

    modules = dict(model.named_modules())
    factored_names = {n for s in plan.sites for n in s.names}
    probe_shapes: dict[Any, dict[str, list[_Probe]]] = {}  # per example signature, discovered once per call

    def loss_of_example(dense: Tensors, probes: Mapping[str, Sequence[torch.Tensor]], frozen: Tensors, example: Any):
        rows: dict[str, list[torch.Tensor]] = {s.path: [] for s in plan.sites}

        def hook_for(site: Site) -> Hook:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
                k = len(rows[site.path])
                if k >= len(probes[site.path]):
                    raise RuntimeError(f"Layer {site.path!r} was called more often than when it was planned.")
                rows[site.path].append(input_rows(module, site, args[0]))
                return output + probes[site.path][k]

            return hook

        with _hooked(modules, {s.path: hook_for(s) for s in plan.sites}):
            out = scalar_loss(loss, {**frozen, **dense}, batch_of_one(example))
        return out, {path: torch.cat(r) for path, r in rows.items()}

    mapped = over_batch(grad(loss_of_example, argnums=(0, 1), has_aux=True), 3, chunk_size)

    def representation(diff: Tensors, frozen: Tensors, batch: Any) -> Grads:
        signature = tuple((tuple(t.shape[1:]), t.dtype) for t in optree.tree_leaves(batch, none_is_leaf=True))
        if signature not in probe_shapes:
            probe_shapes[signature] = _discover(model, loss, plan.sites, diff, frozen, _first_example(batch))[0]
        shapes = probe_shapes[signature]
        device = next(iter(diff.values())).device
        probes = {
            path: [torch.zeros(p.shape, dtype=p.dtype, device=device) for p in calls] for path, calls in shapes.items()
        }
        dense = {n: diff[n] for n in plan.dense}
        held = {**frozen, **{n: diff[n] for n in factored_names}}
        (dense_grads_, probe_grads), inputs = mapped(dense, probes, held, batch)
        parts: list[Any] = [Dense(dense_grads_)] if plan.dense else []
        for site in plan.sites:
            g = torch.cat([output_rows(site, pg) for pg in probe_grads[site.path]], dim=1)
            a = inputs[site.path]
            if a.shape[1] != g.shape[1]:
                raise RuntimeError(f"Layer {site.path!r} was called differently than when it was planned.")
            parts.append(Factored(site, a, g))
        return Grads(tuple(parts), plan.names)

    return representation


def last_layer_params(model: nn.Module, loss: ExampleLossFn, ckpt: Any, batch: Any) -> list[str]:
    """Parameter names of the last ``nn.Linear`` called when computing the loss of the first example of ``batch``."""
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []

    def hook_for(path: str) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            order.append(path)

        return hook

    with torch.no_grad(), _hooked(linears, {path: hook_for(path) for path in linears}):
        loss({**ckpt.frozen, **ckpt.diff}, _first_example(batch))
    if not order:
        raise ValueError("`method='last_layer'` found no nn.Linear called by the model; select `layers=` instead.")
    module = linears[order[-1]]
    prefix = f"{order[-1]}." if order[-1] else ""
    return [prefix + name for name, _ in module.named_parameters(recurse=False)]
