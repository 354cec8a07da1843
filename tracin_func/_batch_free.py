"""Layers run once for the whole batch (T5's and MPNet's relative position bias: an Embedding on ``[T, S]`` offsets
whose output every example adds to its attention scores), and parameters read directly, outside any layer's call
(BEiT's and Swin's relative position tables): each example's gradient of the layer's output, or of the parameter, from
the points where it meets the batch.

The output is followed through the ops that compute with it alone (a permute, a slice, a softmax: still one for the
whole batch) to each elementwise op (a selection by the batch's mask, ``torch.where`` or ``masked_fill``, and the
additive ``attn_mask`` of ``scaled_dot_product_attention`` count as such) or matrix product where it meets a tensor of
the batch (derived from the batch's inputs, its first dimension the batch's rows). There it gets a zero probe with a row
per row of the batch, whose gradient is each example's gradient of what met it; mapped back through the ops in between
(autograd, batched over examples) and summed over the meetings, these give each example's gradient of the layer's
output. Any other way of meeting the batch is refused, and so is an output whose whole gradient the examples' gradients
do not sum to (a path to the loss that never met the batch). A parameter meets the batch elementwise only: in a matrix
product it would be a weight copied per example, slower than vmap(grad).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._purity import op_tensors

# Ops that broadcast their operands elementwise: a row for the whole batch meets each example's row alike.
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.add_, torch.Tensor.sub_, torch.Tensor.mul_, torch.Tensor.div_,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
    torch.Tensor.__truediv__, torch.Tensor.__itruediv__,
}  # fmt: skip
# Elementwise selections: the position of the condition (or mask), which must come from the batch, not the output
# followed (``torch.where(mask, bias, min)``: transformers' SDPA mask over T5's position bias).
_SELECTIONS = {torch.where: 0, torch.Tensor.where: 1, torch.Tensor.masked_fill: 1}
_CONDITION_KEYWORDS = ("condition", "mask")
# Products broadcasting their operands' batch dimensions (a matrix for the whole batch times each example's).
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}
# Attention whose additive mask (added to each example's scores, broadcast) may be a followed output.
_ATTENTION = F.scaled_dot_product_attention
# Copies along the first dimension (MPNet's ``bias.expand(batch_size, ...).contiguous()``), and ops keeping them.
_COPIES = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to}
_KEEPING = {torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.to, torch.Tensor.type_as}


class Meetings(TorchFunctionMode):
    """Active during a batched forward of ``n`` examples: follows the outputs of layers run once for the whole batch
    (``follow``) and the tensors of the batch, and gives each meeting of the two a probe with a row per row of the
    batch (``n`` rows, or a multiple where the model folds an example's items into its batch).
    """

    def __init__(self, batch: Any, n: int) -> None:
        super().__init__()
        self.n = n
        self._batch: dict[int, weakref.ref] = {}  # id -> the tensor, for tensors derived from the batch's inputs
        self._followed: dict[int, tuple[weakref.ref, frozenset[int]]] = {}  # id -> (tensor, indices of its roots)
        # followed tensors copied along their first dimension (from size 1): id -> (the copy, the row copied, and
        # both tensors' versions then: an in-place change since leaves the copy's rows other than that row)
        self._copies: dict[int, tuple[weakref.ref, torch.Tensor, int, int]] = {}
        self.roots: list[torch.Tensor] = []  # the followed outputs, one per call of a layer (or parameter read)
        self.named: list[str] = []  # what each root is, for errors
        self._unmultiplied: set[int] = set()  # roots refused in matrix products (parameters: see ``follow``)
        self.met: list[tuple[torch.Tensor, torch.Tensor]] = []  # (what met the batch, its probe)
        for t in optree.tree_leaves(batch, none_is_leaf=True):
            if isinstance(t, torch.Tensor):
                self._batch[id(t)] = weakref.ref(t)

    def follow(self, output: torch.Tensor, named: str, products: bool = True) -> int:
        """Follow a layer call's output, or a parameter read directly (in the autograd graph), ``named`` (``"the
        output of 'path'"``); its index among ``roots``. ``products=False``: refuse its meeting the batch in a matrix
        product, where it is a weight (Falcon's ``input @ self.weight.T``), whose copy per example made the batched
        pass 2.3x slower than vmap(grad)."""
        self.roots.append(output)
        self.named.append(named)
        if not products:
            self._unmultiplied.add(len(self.roots) - 1)
        self._followed[id(output)] = (weakref.ref(output), frozenset({len(self.roots) - 1}))
        return len(self.roots) - 1

    def _roots_of(self, t: Any) -> frozenset[int]:
        entry = self._followed.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else frozenset()

    def _of_batch(self, t: Any) -> bool:
        ref = self._batch.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = op_tensors(args, kwargs)
        followed = [t for t in tensors if self._roots_of(t)]
        of_batch = [t for t in tensors if self._of_batch(t)]
        if followed and of_batch:
            args, kwargs = self._met(func, followed, of_batch, args, kwargs)
        out = func(*args, **kwargs)
        roots = frozenset().union(*map(self._roots_of, followed))
        for t in op_tensors(out):
            if of_batch:
                self._batch[id(t)] = weakref.ref(t)
            elif roots:
                self._followed[id(t)] = (weakref.ref(t), roots)
        if roots and isinstance(out, torch.Tensor) and out.dim() and followed[0] is args[0]:
            row = None
            if func in _COPIES and _padded(args[0], out.dim())[0] == 1:
                row = args[0]
            elif func in _KEEPING and self._copy(args[0]):  # the same op on the row (a dtype cast, a clone)
                row = func(self._copies[id(args[0])][1], *args[1:], **kwargs)
            if row is not None:
                self._copies[id(out)] = (weakref.ref(out), row, out._version, row._version)
        return out

    def _selected(self, func: Any, args: tuple[Any, ...], kwargs: Any) -> bool:
        """Whether ``func`` selects elementwise (``torch.where``, ``masked_fill``) by a condition that is not followed:
        the followed values then meet the batch's condition elementwise (the condition carries no gradient)."""
        if func not in _SELECTIONS:
            return False
        given = [kwargs[k] for k in _CONDITION_KEYWORDS if k in kwargs]
        condition = given[0] if given else args[_SELECTIONS[func]] if len(args) > _SELECTIONS[func] else None
        return not self._roots_of(condition)

    def _added_mask(self, func: Any, args: tuple[Any, ...], kwargs: Any) -> bool:
        """Whether ``func`` is ``scaled_dot_product_attention`` with only its additive ``attn_mask`` followed: added
        to each example's scores, broadcast, as an elementwise op would."""
        if func is not _ATTENTION:
            return False
        named = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        return all(not self._roots_of(named.get(k)) for k in ("query", "key", "value"))

    def _named(self, followed: Sequence[torch.Tensor]) -> str:
        """What the followed tensors come from (computed once for the whole batch)."""
        named = sorted({self.named[i] for t in followed for i in self._roots_of(t)})
        return f"{' and '.join(named)}, computed once for the whole batch,"

    def _copy(self, t: torch.Tensor) -> bool:
        entry = self._copies.get(id(t))
        return entry is not None and entry[0]() is t

    def _met(
        self, func: Any, followed: list[torch.Tensor], of_batch: list[torch.Tensor], args: Any, kwargs: Any
    ) -> tuple[Any, Any]:
        """``args`` and ``kwargs`` with each followed tensor plus its probe."""
        batched = [t for t in of_batch if self._rows(t)]
        rank = max((t.dim() for t in batched), default=0)
        rows = max((t.shape[0] for t in batched if t.dim() == rank), default=0)
        name = getattr(func, "__name__", str(func))
        in_place = name.endswith("_") and not name.startswith("__") or name.startswith("__i")
        products = func in _MATMUL and rank >= 3 and all(t.dim() >= 2 for t in followed)  # batch dims broadcast
        if products and self._unmultiplied & set().union(*map(self._roots_of, followed)):
            raise RuntimeError(
                f"{self._named(followed)} meets the batch in a matrix product ({name}), whose copy per example costs "
                f"more than vmap(grad)"
            )
        elementwise = func in _ELEMENTWISE or self._selected(func, args, kwargs) or self._added_mask(func, args, kwargs)
        if (
            not (elementwise or products)
            or not batched
            or any(t.dim() > rank for t in followed)
            or (in_place and self._roots_of(args[0]))
        ):
            raise RuntimeError(
                f"{self._named(followed)} meets the batch in {name} (only elementwise ops, not in place, selections "
                f"by a condition of the batch, matrix products with a tensor whose first dimension is the batch's, "
                f"and the additive mask of scaled_dot_product_attention are followed)"
            )
        probes = {
            id(t): self._probed(self._first_copy(t, rank, rows), [rows, *_padded(t, rank)[1:]], self._named([t]))
            for t in followed
        }

        def probed(x: Any) -> Any:
            return probes.get(id(x), x) if isinstance(x, torch.Tensor) else x

        return optree.tree_map(probed, args, none_is_leaf=True), optree.tree_map(probed, kwargs, none_is_leaf=True)

    def _first_copy(self, t: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
        """``t``, or the row it copies where the model copied it over the batch itself (all rows the same, from size
        1: MPNet's bias expanded to the batch size), through which each example's rows' gradient then passes: the row
        the copy was made from while neither changed since (mapped back through the copy, each example's gradient
        took a ``[B, *shape]`` tensor per example, MPNet's backward 0.3 s per batch of 100), else the copy's first."""
        if not (_padded(t, rank)[0] == rows != 1 and self._copy(t) and torch.equal(t, t[:1].expand_as(t))):
            return t
        _, row, version, row_version = self._copies[id(t)]
        return row if t._version == version and row._version == row_version else t[:1]

    def _rows(self, t: torch.Tensor) -> int:
        """``t``'s rows of the batch dimension: its first dimension when a multiple of the examples', else 0."""
        return t.shape[0] if t.dim() >= 1 and t.shape[0] % self.n == 0 else 0

    def _probed(self, t: torch.Tensor, shape: Any, named: str) -> torch.Tensor:
        """``t`` (or its copy over the batch, of ``shape``) plus a zero probe of ``shape`` ``[rows, ...]``: each row's
        gradient of ``t`` where it meets the batch."""
        if _padded(t, len(shape))[0] != 1:  # a dimension of its own where the batch's is: not broadcast over it
            raise RuntimeError(f"{named} meets the batch with rows of its own in the batch's dimension")
        probe = t.new_zeros(shape).requires_grad_()
        self.met.append((t, probe))
        return t + probe  # (broadcast to ``shape``)


def _padded(t: torch.Tensor, rank: int) -> list[int]:
    """``t``'s shape with leading 1s up to ``rank`` dims (as broadcasting aligns it)."""
    return [1] * (rank - t.dim()) + list(t.shape)


def _per_root(meetings: Meetings, probe_grads: list[torch.Tensor | None], n: int) -> list[torch.Tensor]:
    """Each root's per-example gradients ``[n, *root.shape]`` from its meetings' probe gradients (rows per example
    summed: a folded batch), through autograd batched over the examples (the graph from the roots kept)."""
    grads: Any = [None] * len(meetings.roots)
    reached = [(t, g) for (t, _), g in zip(meetings.met, probe_grads) if g is not None]
    if reached:
        cotangents = [_cotangent(t, g, n) for t, g in reached]
        outputs = [t for t, _ in reached]
        grads = torch.autograd.grad(outputs, meetings.roots, cotangents, is_grads_batched=True, allow_unused=True)
    return [r.new_zeros(n, *r.shape) if g is None else g for g, r in zip(grads, meetings.roots)]


def _cotangent(t: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, *t.shape]``: a probe's gradient ``[rows, ...]`` summed over each example's rows (a folded batch), then
    over what broadcasting (or the model's copy over the batch) added to ``t``'s shape."""
    per_example = g.reshape(n, -1, *g.shape[1:]).sum(1, keepdim=True)  # [n, 1, ...]
    return per_example.sum_to_size(n, *_padded(t, g.dim())).reshape(n, *t.shape)


def per_example_outputs(
    meetings: Meetings, roots: Mapping[str, list[tuple[int, torch.Tensor]]], grads: Sequence[Any], n: int
) -> dict[str, list[torch.Tensor]]:
    """Per layer run once for the whole batch (``roots``: per call, its index among the followed outputs and the probe
    whose gradient is the output's whole gradient), per call: each example's gradient of its output ``[n, *shape]``
    from the meetings' probe gradients then the probes' (``grads``), checked to sum to the output's whole gradient."""
    met, whole = grads[: len(meetings.met)], grads[len(meetings.met) :]
    per_root = _per_root(meetings, list(met), n)
    wholes = iter(whole)
    out: dict[str, list[torch.Tensor]] = {}
    for path, calls in roots.items():
        out[path] = []
        for root, probe in calls:
            g, total = per_root[root], next(wholes)
            total = torch.zeros_like(probe) if total is None else total
            if (g.sum(0) - total).abs().max() > 1e-4 * max(g.abs().max(), total.abs().max()):
                raise RuntimeError(
                    f"{meetings.named[root]}, computed once for the whole batch, reaches the loss other than through "
                    f"its meetings with the batch"
                )
            out[path].append(g)
    return out
