"""Gradient representations: how a batch of per-example gradients is kept, and the operations scoring needs.

Every part offers the same operations, so scorers never look inside:
``dot(a, b) -> [Ba, Bb]``, ``sq_norm(a) -> [B]``, ``materialize(a) -> {name: [B, *shape]}``, ``total(a)`` (the
sum over examples, B = 1) and ``concat([a, b, ...])`` along examples.

- ``Dense``: materialised per-sample gradients, reduced leaf by leaf (never concatenated into one copy).
- ``Factored``: a Linear / Conv / Embedding layer kept as input rows ``A`` and output gradients ``G``; inner
  products are exact without forming any per-sample gradient: ``<g_i, g_j> = sum((A_i A_j^T) * (G_i G_j^T))``.
- ``Gathered``: an Embedding's test-side gradients, materialised once and gathered by training tokens.
- ``Grads``: the parts of one batch, summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from ._layers import Site, materialize
from ._projection import project_grad, project_outer, project_vector

_PAIR_BLOCK = 1 << 22  # elements of the [rows, m, T, S] kernel formed at once by Factored.dot


class Dense(NamedTuple):
    """Per-sample gradients ``{name: [B, *shape]}``."""

    grads: dict[str, torch.Tensor]

    def dot(self, other: Dense) -> torch.Tensor:
        return sum(a.flatten(1) @ other.grads[name].flatten(1).T for name, a in self.grads.items())

    def sq_norm(self) -> torch.Tensor:
        return sum(g.flatten(1).square().sum(1) for g in self.grads.values())

    def materialize(self) -> dict[str, torch.Tensor]:
        return self.grads

    def project(self, seed: int, k: int) -> torch.Tensor:
        return sum(project_grad(name, g, seed, k) for name, g in self.grads.items())

    def total(self) -> Dense:
        return Dense({name: g.sum(0, keepdim=True) for name, g in self.grads.items()})

    @staticmethod
    def concat(parts: Sequence[Dense]) -> Dense:
        return Dense({name: torch.cat([p.grads[name] for p in parts]) for name in parts[0].grads})


def _token_kernel(site: Site, a1: torch.Tensor, a2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, m, T, S]`` kernel of the inputs: dot products (plus 1 for the bias, a constant input), or token
    equality for an Embedding."""
    if site.kind == "embedding":
        return ((a1[:, None, :, None] == a2[None, :, None, :]) & (a1 >= 0)[:, None, :, None]).to(dtype)
    kernel = torch.einsum("itd,jsd->ijts", a1, a2)
    return kernel + 1 if site.bias is not None else kernel


class Factored(NamedTuple):
    """One layer's factors: inputs ``a`` ``[B, T, d_in]`` (ids ``[B, T]`` for an Embedding) and output gradients
    ``g`` ``[B, T, d_out]``. A bias is a constant input 1: its gradient is ``g.sum(1)``."""

    site: Site
    a: torch.Tensor
    g: torch.Tensor

    def dot(self, other: Factored) -> torch.Tensor:
        a1, g1, a2, g2 = self.a, self.g, other.a, other.g
        if self.site.kind != "embedding" and a1.shape[1] == 1 and a2.shape[1] == 1:
            ka = a1[:, 0] @ a2[:, 0].T
            return (ka + 1 if self.site.bias is not None else ka) * (g1[:, 0] @ g2[:, 0].T)
        rows = max(1, _PAIR_BLOCK // max(1, a2.shape[0] * a1.shape[1] * a2.shape[1]))
        blocks = []
        for i in range(0, a1.shape[0], rows):
            ka = _token_kernel(self.site, a1[i : i + rows], a2, g1.dtype)
            kg = torch.einsum("itd,jsd->ijts", g1[i : i + rows], g2)
            blocks.append((ka * kg).sum((2, 3)))
        return torch.cat(blocks)

    def sq_norm(self) -> torch.Tensor:
        a, g = self.a, self.g
        if self.site.kind == "embedding":
            ka = ((a[:, :, None] == a[:, None, :]) & (a >= 0)[:, :, None]).to(g.dtype)
        else:
            ka = a @ a.transpose(1, 2) + (1 if self.site.bias is not None else 0)
        return (ka * (g @ g.transpose(1, 2))).sum((1, 2))

    def materialize(self) -> dict[str, torch.Tensor]:
        return materialize(self.site, self.a, self.g)

    def project(self, seed: int, k: int) -> torch.Tensor:
        """Same projection as the materialised gradients get (``Dense.project``), computed from the factors."""
        site, a, g = self.site, self.a, self.g
        out = g.new_zeros(g.shape[0], k)
        if site.kind == "embedding":
            out += project_outer(site.weight, a, g, seed, k)
            return out
        if site.weight is not None:
            out += project_outer(site.weight, g, a, seed, k)
        if site.bias is not None:
            out += project_vector(site.bias, g.sum(1), seed, k)
        return out

    def total(self) -> Factored:
        """The sum of B examples' gradients is one example whose rows are all of theirs."""
        rows = self.g.shape[0] * self.g.shape[1]
        return Factored(self.site, self.a.reshape(1, rows, *self.a.shape[2:]), self.g.reshape(1, rows, -1))

    @staticmethod
    def concat(parts: Sequence[Factored]) -> Factored:
        """Concatenate along examples, padding rows with inert zeros (ids with -1) when lengths differ."""
        t = max(p.a.shape[1] for p in parts)
        fill = -1 if parts[0].site.kind == "embedding" else 0

        def pad(x: torch.Tensor, value: float) -> torch.Tensor:
            widths = [0, 0] * (x.dim() - 2) + [0, t - x.shape[1]]
            return F.pad(x, widths, value=value) if t > x.shape[1] else x

        a = torch.cat([pad(p.a, fill) for p in parts])
        g = torch.cat([pad(p.g, 0.0) for p in parts])
        return Factored(parts[0].site, a, g)


class Gathered(NamedTuple):
    """Test-side Embedding gradients ``w`` ``[n, V, d]``, scored against training factors by gathering the rows of
    the training tokens: ``<W_i, sum_t e_(id_t) g_t^T> = sum_t W_i[id_t] . g_t``, ``T d`` flops per pair instead of
    ``V d`` (materialised) or ``T^2 (d + 1)`` (token kernel)."""

    site: Site
    w: torch.Tensor

    @staticmethod
    def of(part: Factored) -> Gathered:
        return Gathered(part.site, part.materialize()[part.site.weight])

    def dot(self, other: Factored) -> torch.Tensor:
        ids, g = other.a, other.g * (other.a >= 0).unsqueeze(-1)
        rows = max(1, _PAIR_BLOCK // max(1, self.w.shape[0] * ids.shape[1] * g.shape[-1]))
        blocks = []
        for j in range(0, ids.shape[0], rows):
            picked = self.w[:, ids[j : j + rows].clamp(min=0)]  # [n, m, T, d]
            blocks.append(torch.einsum("nmtd,mtd->nm", picked, g[j : j + rows]))
        return torch.cat(blocks, dim=1)

    def sq_norm(self) -> torch.Tensor:
        return self.w.flatten(1).square().sum(1)

    def materialize(self) -> dict[str, torch.Tensor]:
        return {self.site.weight: self.w}

    def project(self, seed: int, k: int) -> torch.Tensor:
        return project_grad(self.site.weight, self.w, seed, k)

    def total(self) -> Gathered:
        return Gathered(self.site, self.w.sum(0, keepdim=True))

    @staticmethod
    def concat(parts: Sequence[Gathered]) -> Gathered:
        return Gathered(parts[0].site, torch.cat([p.w for p in parts]))


Part = Union[Dense, Factored, Gathered]


class Grads(NamedTuple):
    """The gradient representation of one batch: parts in a fixed order, over the parameters ``names``."""

    parts: tuple[Part, ...]
    names: tuple[str, ...]  # differentiated parameters, in the order ``flat`` lays them out

    @property
    def size(self) -> int:
        first = self.parts[0]
        if isinstance(first, Dense):
            return next(iter(first.grads.values())).shape[0]
        return first.w.shape[0] if isinstance(first, Gathered) else first.a.shape[0]

    def dot(self, other: Grads) -> torch.Tensor:
        return sum(a.dot(b) for a, b in zip(self.parts, other.parts))

    def sq_norm(self) -> torch.Tensor:
        return sum(p.sq_norm() for p in self.parts)

    def project(self, seed: int, k: int) -> torch.Tensor:
        """``[B, k]`` seeded projection; the same for a parameter whichever part holds it."""
        return sum(p.project(seed, k) for p in self.parts)

    def flat(self) -> torch.Tensor:
        """``[B, P]`` per-example gradients, parameters in ``names`` order whatever the parts."""
        grads = {name: g for p in self.parts for name, g in p.materialize().items()}
        return torch.cat([grads[name].flatten(1) for name in self.names], dim=1)

    def total(self) -> Grads:
        return Grads(tuple(p.total() for p in self.parts), self.names)

    def for_test(self) -> Grads:
        """The test side: Embedding factors materialised once, to be gathered by each training batch."""
        parts = tuple(
            Gathered.of(p) if isinstance(p, Factored) and p.site.kind == "embedding" else p for p in self.parts
        )
        return Grads(parts, self.names)

    @staticmethod
    def concat(batches: Sequence[Grads]) -> Grads:
        if len(batches) == 1:
            return batches[0]
        parts = tuple(type(ps[0]).concat(ps) for ps in zip(*(b.parts for b in batches)))
        return Grads(parts, batches[0].names)
