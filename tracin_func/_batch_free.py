"""Layers run once for the whole batch (T5's and MPNet's relative position bias: an Embedding on ``[T, S]`` offsets
whose output every example adds to its attention scores; a layer fed tensors computed from followed ones alone,
DeBERTa's relative embeddings through its query and key layers), and parameters read directly, outside any layer's
call (BEiT's and Swin's relative position tables): each example's gradient of the layer's output, or of the
parameter, from the points where it meets the batch.

The output is followed through the ops that compute with it alone (a permute, a slice, a softmax: still one for the
whole batch) to each elementwise op (a selection by the batch's mask, ``torch.where`` or ``masked_fill``, and the
additive ``attn_mask`` of ``scaled_dot_product_attention`` count as such) or matrix product where it meets a tensor of
the batch (derived from the batch's inputs, its first dimension the batch's rows). There it gets a zero probe with a row
per row of the batch, whose gradient is each example's gradient of what met it; mapped back through the ops in between
(autograd, batched over examples) and summed over the meetings, these give each example's gradient of the layer's
output. A copy the model makes over the batch's rows (a row expanded, a block of rows tiled per example: DeBERTa's
heads by ``repeat``, Swin's mask per window plus its bias) meets each example's rows through that row or block. Any
other way of meeting the batch is refused, and so is an output whose whole gradient the examples' gradients do not sum
to (a path to the loss that never met the batch).

A parameter is a weight where it meets the batch in a matrix product (Falcon's ``input @ self.weight.T``, a hand-written
``F.linear(x, self.w, self.b)``, an einsum of two operands) or a convolution (Mamba's ``F.conv1d`` on its depthwise
layer's own weight): a copy per example would make that product a batched one, slower than vmap(grad).
There each example's gradient of the weight is its rows of the other operand times their output gradients (``x^T g``,
``x^H g`` for complex ones: a spectral layer's real weights viewed as complex), as a Linear layer's (a convolution's as
a convolution layer's); the product is taken out of autograd's own gradient of
the weight, which would compute it again, summed, and is exact by construction, outside the check of sums.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._grads import lasting_edge
from ._layers import ConvGeometry, conv_weight_grads
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
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
           torch.Tensor.bmm}
# Products of two operands, one the batch's and one a weight: (left, right) operands of ``left @ right``.
_OPERANDS = {torch.matmul: (0, 1), torch.Tensor.matmul: (0, 1), torch.Tensor.__matmul__: (0, 1),
             torch.Tensor.__rmatmul__: (1, 0), torch.mm: (0, 1), torch.Tensor.mm: (0, 1)}  # fmt: skip
# Convolutions (``F.conv1d`` to ``F.conv3d``): a weight meets each example's input in them as in a product (Mamba's
# depthwise causal convolution on its layer's own weight and bias, read directly; VideoMAE's Conv3d, no layer of a
# known kind, followed).
_CONVS = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# Transposed convolutions (``nn.ConvTranspose*d``: U-Nets', decoders' upsampling): the adjoint of the convolution of
# the same weight, so each example's weight gradient is that convolution's with input and output gradient swapped.
_TRANSPOSED_CONVS = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# Functional norms, whose weight and bias apply elementwise after normalising (nanoGPT's ``F.layer_norm`` on its own
# weight and bias): met as that product and sum (``norm_parts``).
NORM_ARGS = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
}
# Attention whose additive mask (added to each example's scores, broadcast) may be a followed output.
_ATTENTION = F.scaled_dot_product_attention
# Copies along the first dimension: of a row (MPNet's ``bias.expand(batch_size, ...).contiguous()``), or tiles of a
# block of rows (DeBERTa's position projections per head ``[H, 2 P, d]``, ``.repeat(batch_size, 1, 1)``); ops keeping
# them (the same op on the row or block gives the copy's): casts, clones, transposes of other dimensions.
_COPIES = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to}
_TILES = {torch.Tensor.repeat}
_KEEPING = {torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.to, torch.Tensor.type_as}
_TRANSPOSES = {torch.Tensor.transpose, torch.transpose}


def norm_parts(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """A functional norm's (``NORM_ARGS``) arguments without its weight and bias, and those (or None): the norm is
    the one without them, times the weight, plus the bias."""
    named = dict(zip(NORM_ARGS[func], args), **kwargs)
    weight, bias = named.get("weight"), named.get("bias")
    return {**named, "weight": None, **({"bias": None} if "bias" in NORM_ARGS[func] else {})}, weight, bias


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
        # followed tensors copied along their first dimension (``_COPIES``, ``_TILES``): id -> (the copy, the row or
        # block of rows copied, and both tensors' versions then: an in-place change since leaves the copy's rows other
        # than that block's)
        self._copies: dict[int, tuple[weakref.ref, torch.Tensor, int, int]] = {}
        self.roots: list[torch.Tensor] = []  # the followed outputs, one per call of a layer (or parameter read)
        self.named: list[str] = []  # what each root is, for errors
        self._weights: set[int] = set()  # roots that are weights in matrix products (parameters: see ``follow``)
        self.met: list[tuple[torch.Tensor, Any]] = []  # (what met the batch, its probe or gradient edge)
        # meetings in a weight's product, by index in ``met``: (the batch's operand, how (``_weight_product``), the
        # product's shape)
        self._products: dict[int, tuple[torch.Tensor, bool | str | _Conv, torch.Size, int]] = {}
        for t in optree.tree_leaves(batch, none_is_leaf=True):
            if isinstance(t, torch.Tensor):
                self._batch[id(t)] = weakref.ref(t)

    def follow(self, output: torch.Tensor, named: str, weight: bool = False) -> int:
        """Follow a layer call's output, or a parameter read directly (in the autograd graph), ``named`` (``"the
        output of 'path'"``); its index among ``roots``. ``weight``: a parameter, which meets the batch in matrix
        products as a weight (``x^T g`` per example): its copy per example made Falcon's batched pass (``input @
        self.weight.T``) 2.3x slower than vmap(grad)."""
        self.roots.append(output)
        self.named.append(named)
        if weight:
            self._weights.add(len(self.roots) - 1)
        self._followed[id(output)] = (weakref.ref(output), frozenset({len(self.roots) - 1}))
        return len(self.roots) - 1

    def free(self, t: Any) -> bool:
        """Whether ``t`` is computed from followed tensors alone, once for the whole batch (not a copy over it): a
        layer fed it runs once for the whole batch too."""
        return bool(self._roots_of(t)) and not self._copy(t)

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
        if not followed:  # (most ops, and every size and shape read: only a result of the batch to record)
            out = func(*args, **kwargs)
            results = op_tensors(out)
            if results and any(map(self._of_batch, tensors)):
                for t in results:
                    self._batch[id(t)] = weakref.ref(t)
            return out
        of_batch = [t for t in tensors if self._of_batch(t)]
        roots = self._roots(followed)
        if func in NORM_ARGS and of_batch:  # the weight and bias meet the normalised batch elementwise
            plain, weight, bias = norm_parts(func, args, kwargs)
            out = self.__torch_function__(func, types, (), plain)
            out = out if weight is None else self.__torch_function__(torch.mul, types, (out, weight))
            return out if bias is None else self.__torch_function__(torch.add, types, (out, bias))
        weighed = bool(of_batch) and bool(self._weights & roots)  # a parameter's use meets the batch
        if weighed and func is F.linear:
            return self._as_product(types, args, kwargs)
        if weighed and _is_conv(func) and _conv_named(func, args, kwargs).get("bias") is not None:
            return self._as_conv(func, types, args, kwargs)
        product = self._weight_product(func, args, kwargs) if weighed else None
        if product is not None:  # the weight's gradient from the product's rows: autograd's summed one is not formed
            args, kwargs = optree.tree_map(lambda a: a.detach() if a is product[0] else a, (args, kwargs),
                                           none_is_leaf=True)  # fmt: skip
        elif of_batch:
            args, kwargs = self._met(func, followed, of_batch, args, kwargs)
        out = func(*args, **kwargs)
        if product is not None:
            out = self._probed_product(out, *product)
        for t in op_tensors(out):
            if of_batch:
                self._batch[id(t)] = weakref.ref(t)
            else:
                self._followed[id(t)] = (weakref.ref(t), roots)
        if not of_batch and isinstance(out, torch.Tensor) and out.dim():
            row = self._copied_row(func, args, kwargs, out, followed[0] is args[0])
            if row is not None:
                self._copies[id(out)] = (weakref.ref(out), row, out._version, row._version)
        return out

    def _copied_row(self, func: Any, args: tuple[Any, ...], kwargs: Any, out: torch.Tensor, first: bool) -> Any:
        """The row or block of rows the followed ``out`` copies along its first dimension (``first``: a followed
        tensor is the op's first argument), computed as ``out`` from the rows or blocks of the arguments; else None."""
        if first and (func in _COPIES and _padded(args[0], out.dim())[0] == 1 or func in _TILES and _tiled(args)):
            return args[0]
        if first and func is torch.Tensor.__getitem__ and _copied_index(args, out):
            return args[0][args[1][:1]]  # (rows picked by one row of indices copied over the batch)
        if first and (func in _KEEPING or func in _TRANSPOSES and _rowwise(args, out)) and self._copy(args[0]):
            return func(self._copies[id(args[0])][1], *args[1:], **kwargs)  # the same op on the row or block
        if func in _ELEMENTWISE and not _in_place(func):
            return self._with_tiled_constants(func, args, kwargs, out)
        return None

    def _with_tiled_constants(self, func: Any, args: tuple[Any, ...], kwargs: Any, out: torch.Tensor) -> Any:
        """``func`` on followed rows broadcast over the batch's rows and constants (neither followed nor the batch's)
        tiled over them, a block per example (Swin's shifted windows: a mask per window, tiled per image, added to the
        position bias), computed on one block of each: the block ``out`` tiles; else None."""
        rows, n = out.shape[0], self.n
        if rows == 1 or rows % n:
            return None
        k, blocks = rows // n, []
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == out.dim() and a.shape[0] == rows:
                if self._roots_of(a):  # (followed rows of its own)
                    return None
                tiles = a.reshape(n, k, *a.shape[1:])
                if not torch.equal(tiles, tiles[:1].expand_as(tiles)):
                    return None
                a = a[:k]
            blocks.append(a)
        return func(*blocks, **kwargs)

    def _roots(self, followed: Sequence[torch.Tensor]) -> frozenset[int]:
        return frozenset().union(*map(self._roots_of, followed))

    def _as_product(self, types: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        """``F.linear(input, weight, bias)`` with a followed parameter among its weight and bias, as the ops it is
        (``input @ weight.t() + bias``) run through this mode: the weight's product and the bias's addition are then
        met as any."""
        named = dict(zip(("input", "weight", "bias"), args), **kwargs)
        weight = self.__torch_function__(torch.Tensor.t, types, (named["weight"],))
        out = self.__torch_function__(torch.matmul, types, (named["input"], weight))
        bias = named.get("bias")
        return out if bias is None else self.__torch_function__(torch.add, types, (out, bias))

    def _as_conv(self, func: Any, types: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
        """A convolution with a followed parameter among its weight and bias, as the ops it is (the convolution
        without its bias, then the bias added per channel) run through this mode, as ``_as_product``."""
        named = _conv_named(func, args, kwargs)
        out = self.__torch_function__(func, types, (), {**named, "bias": None})
        bias = named["bias"]
        per_channel = self.__torch_function__(torch.Tensor.reshape, types, (bias, (-1,) + (1,) * (out.dim() - 2)))
        return self.__torch_function__(torch.add, types, (out, per_channel))

    def _weight_product(
        self, func: Any, args: tuple[Any, ...], kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, bool | str | _Conv] | None:
        """``(weight, the batch's operand, how)`` where ``func`` is a matrix product (``how``: the weight on the left)
        or an einsum (``how``: the equation of each row's gradient of the weight) or a convolution without a bias
        (``how``: its ``_Conv``) of a followed weight (some root a parameter) and a tensor of the batch whose first
        dimension the output keeps (its rows), the weight broadcast over them; else None."""
        if _is_conv(func):
            return self._conv_weight(func, args, kwargs)
        if kwargs:
            return None
        if func is torch.einsum:
            return self._einsum_weight(args)
        if func not in _OPERANDS or len(args) != 2:
            return None
        left, right = (args[i] for i in _OPERANDS[func])
        if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor):
            return None
        on_left = bool(self._roots_of(left))
        weight, x = (left, right) if on_left else (right, left)
        if not self._batch_rows(x) or weight.dim() < 2:
            return None
        if x.dim() < (3 if on_left else 2):  # (a lone [B, k] right of a weight: its rows would be the output's columns)
            return None
        rows_kept = weight.dim() == 2 if x.dim() == 2 else weight.dim() <= x.dim() and _padded(weight, x.dim())[0] == 1
        return (weight, x, on_left) if rows_kept else None

    def _conv_weight(
        self, func: Any, args: tuple[Any, ...], kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, _Conv] | None:
        """A convolution (or a transposed one) of a followed weight over the batch's input, without a bias
        (``_as_conv``), its zero padding given as numbers: the weight, the input and the ``_Conv`` of each row's weight
        gradient."""
        named = _conv_named(func, args, kwargs)
        weight, x = named.get("weight"), named.get("input")
        if named.get("bias") is not None or not self._roots_of(weight) or not self._batch_rows(x):
            return None
        dims = weight.dim() - 2
        padding = named.get("padding", 0)
        padding = (0,) * dims if padding == "valid" else padding
        given = (named.get("stride", 1), 0 if isinstance(padding, str) else padding, named.get("dilation", 1))
        stride, numbers, dilation = ((v,) * dims if isinstance(v, int) else tuple(v) for v in given)
        if padding == "same":  # torch's numbers where even (an odd kernel's: VideoMAE's Conv3d(padding="same"))
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(t % 2 for t in totals):
                raise RuntimeError(
                    f"{self._named([weight])} meets the batch in a convolution padded by 'same' with an even kernel, "
                    f"which pads one side more than the other: pad the input with `F.pad` and convolve unpadded to "
                    f"stay on the batched path"
                )
            numbers = tuple(t // 2 for t in totals)
        padding = numbers
        geometry = ConvGeometry(tuple(weight.shape), named.get("groups", 1), stride, dilation)
        return weight, x, _Conv(geometry, padding, func in _TRANSPOSED_CONVS)

    def _einsum_weight(self, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """An einsum of two operands, a followed weight without the batch's letter and a tensor of the batch whose
        first letter (its rows) leads the output too, no letter repeated within a term (``"btd,hd->bth"``): the weight,
        the batch's operand and the equation of each row's gradient of the weight (``"btd,bth->bhd"``)."""
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        equation = args[0].replace(" ", "") if args and isinstance(args[0], str) else ""
        if len(operands) != 2 or "->" not in equation or "." in equation:
            return None
        terms, out = equation.split("->")
        terms = terms.split(",")
        at = [i for i, t in enumerate(operands) if self._roots_of(t)]
        if len(terms) != 2 or len(at) != 1 or not self._batch_rows(operands[1 - at[0]]):
            return None
        weight, x, w, xs = operands[at[0]], operands[1 - at[0]], terms[at[0]], terms[1 - at[0]]
        plain = all(len(set(t)) == len(t) for t in (w, xs, out)) and set(w) <= set(xs) | set(out)
        if not plain or not xs or xs[0] != out[:1] or xs[0] in w:
            return None
        return weight, x, f"{xs},{out}->{xs[0]}{w}"

    def _batch_rows(self, x: Any) -> bool:
        """Whether ``x`` is the batch's, not followed, with rows of the batch first: not of several examples merged
        into one dimension ([B T, k], packed rows), which the rows could not tell apart."""
        if not isinstance(x, torch.Tensor) or self._roots_of(x) or not self._of_batch(x) or not self._rows(x):
            return False
        return x.dim() > 2 or x.shape[0] == self.n

    def _probed_product(
        self, out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, how: bool | str | _Conv
    ) -> Any:
        """The product ``out``, whose gradient with ``x``'s rows gives each example's gradient of ``weight``
        (``cotangent``): taken where autograd passes it (``lasting_edge``), else at a zero probe added to it (a pass
        over the output)."""
        edge = lasting_edge(out) if out.requires_grad else None
        probe = torch.zeros_like(out, requires_grad=True) if edge is None else edge
        self._products[len(self.met)] = (x.detach(), how, out.shape, x._version)
        self.met.append((weight, probe))
        return out if edge is not None else out + probe

    def cotangent(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``[n, *t.shape]``: each example's gradient of the tensor of meeting ``i`` from its probe's gradient."""
        t = self.met[i][0]
        if i not in self._products:
            return _cotangent(t, g, self.n)
        x, how, shape, version = self._products[i]
        if x._version != version:  # (plain autograd may accept it: matmul keeps a folded copy of a strided operand)
            raise RuntimeError(
                "`model`: a tensor multiplied by a parameter read directly was changed in place after the product "
                "(`q @ self.w`, then `q /= scale`), so each example's gradient of that parameter cannot be formed "
                "from it. Pass `factored=False`, or change it out of place (`q = q / scale`)."
            )
        g, n = g.view(shape), self.n  # (an edge's gradient is its base's: F.linear's [B T, d] under a [B, T, d] view)
        x = x.conj()  # a complex product's gradient is the other operand's conjugate's (as autograd's: x^H g); a view
        if isinstance(how, (str, _Conv)):  # an einsum's, a convolution's: each row's, then rows per example summed
            if isinstance(how, _Conv):  # (a transposed one's: the convolution's from its output back to its input)
                given, back = (g, _adjoint_output(x, g, how)) if how.transposed else (x, g)
                per_row = conv_weight_grads(how.geometry, given, back, how.padding)
            else:
                per_row = torch.einsum(how, x, g)
            return per_row if per_row.shape[0] == n else per_row.reshape(n, -1, *t.shape).sum(1)
        on_left = how
        if t.dim() == 2:  # rows [n, R, d] of the batch's operand and the output gradient (all leading dimensions)
            x, g = (y.mT.reshape(n, -1, y.shape[-2]) if on_left else y.reshape(n, -1, y.shape[-1]) for y in (x, g))
            a, b = (g, x) if on_left else (x, g)  # the gradient a^T b, formed in t's memory layout (Falcon's weight.T)
            return (b.mT @ a).mT if t.stride(0) < t.stride(1) else a.mT @ b
        per_row = g @ x.mT if on_left else x.mT @ g  # [rows, ..., *t.shape[-2:]]: a weight with batch dimensions
        per_example = per_row.reshape(n, -1, *per_row.shape[1:]).sum(1)  # rows per example summed (folded)
        return per_example.sum_to_size(n, *_padded(t, per_row.dim())[1:]).reshape(n, *t.shape)

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
        in_place = _in_place(func)
        products = func in _MATMUL and rank >= 3 and all(t.dim() >= 2 for t in followed)  # batch dims broadcast
        if products and self._weights & self._roots(followed):
            raise RuntimeError(
                f"{self._named(followed)} meets the batch in a matrix product ({name}) other than as a weight "
                f"broadcast over its rows, and its copy per example would cost more than vmap(grad)"
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
                f"by a condition of the batch, matrix products and convolutions (transposed too) with a tensor whose "
                f"first dimension is the batch's, and the additive mask of scaled_dot_product_attention are followed; "
                f"a product with a batch `[B, d]` of two dimensions only where a parameter is read directly as its "
                f"weight, not a tensor computed from one: a hypernetwork's)"
            )
        probes = {id(t): self._probed(t, rank, rows) for t in followed}

        def probed(x: Any) -> Any:
            return probes.get(id(x), x) if isinstance(x, torch.Tensor) else x

        return optree.tree_map(probed, args, none_is_leaf=True), optree.tree_map(probed, kwargs, none_is_leaf=True)

    def _copied_block(self, t: torch.Tensor, rank: int, rows: int) -> torch.Tensor | None:
        """The row or block of rows ``t`` copies where the model copied it over the batch itself (all tiles the same:
        MPNet's bias expanded to the batch size, DeBERTa's projections per head tiled), through which each example's
        rows' gradient then passes: the row or block the copy was made from while neither changed since (mapped back
        through the copy, each example's gradient took a ``[B, *shape]`` tensor per example, MPNet's backward 0.3 s
        per batch of 100), else the copy's first; None where ``t`` is no such copy."""
        if not (_padded(t, rank)[0] == rows != 1 and self._copy(t)):
            return None
        _, block, version, block_version = self._copies[id(t)]
        k = _padded(block, t.dim())[0]
        tiles = t.reshape(rows // k, k, *t.shape[1:]) if rows % k == 0 else None
        if tiles is None or not torch.equal(tiles, tiles[:1].expand_as(tiles)):
            return None
        return block if t._version == version and block._version == block_version else t[:k]

    def _rows(self, t: torch.Tensor) -> int:
        """``t``'s rows of the batch dimension: its first dimension when a multiple of the examples', else 0."""
        return t.shape[0] if t.dim() >= 1 and t.shape[0] % self.n == 0 else 0

    def _probed(self, t: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
        """``t`` (or its copy over the batch) plus a zero probe ``[rows, ...]``: each row's gradient of ``t`` where it
        meets the batch. A row broadcast over the batch's rows (or copied by the model over them) gets the probe added
        directly, a block of rows tiled over them (``_copied_block``) in tiles: each example's rows hold whole tiles."""
        block = self._copied_block(t, rank, rows)
        source = t if block is None else block
        k = _padded(source, rank)[0]  # rows of its own where the batch's are: not broadcast over it, nor tiles
        if k != 1 and (block is None or rows // self.n % k):
            raise RuntimeError(f"{self._named([t])} meets the batch with rows of its own in the batch's dimension")
        shape = [rows, *_padded(t, rank)[1:]]
        probe = t.new_zeros(shape).requires_grad_()
        self.met.append((source, probe))
        if k == 1:
            return source + probe  # (broadcast to ``shape``)
        return (source + probe.view(rows // k, k, *shape[1:])).reshape(shape)  # (each tile plus its part of the probe)


class _Conv(NamedTuple):
    """How a convolution's weight met the batch (``Meetings._conv_weight``)."""

    geometry: ConvGeometry
    padding: tuple[int, ...]  # zero padding, left to the weight gradient's products
    transposed: bool = False  # a transposed convolution: its output is the convolution's input


def _adjoint_output(x: torch.Tensor, g: torch.Tensor, how: _Conv) -> torch.Tensor:
    """A transposed convolution's input ``x`` as the output of the convolution it is the adjoint of, run on its output
    gradient ``g``: zeros after it where ``output_padding`` reaches a stride or more (the convolution gives those
    positions too; nothing of ``x`` meets them)."""
    geometry = how.geometry
    dims = zip(g.shape[2:], how.padding, geometry.dilation, geometry.weight_shape[2:], geometry.stride)
    sizes = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, pad, dil, k, stride in dims]
    extra = [want - have for want, have in zip(sizes, x.shape[2:])]
    return F.pad(x, [p for e in reversed(extra) for p in (0, e)]) if any(extra) else x


def _is_conv(func: Any) -> bool:
    return func in _CONVS or func in _TRANSPOSED_CONVS


def _conv_named(func: Any, args: tuple[Any, ...], kwargs: Any) -> dict[str, Any]:
    """A convolution's (or a transposed one's) arguments by name."""
    return dict(zip(_TRANSPOSED_ARGS if func in _TRANSPOSED_CONVS else _CONV_ARGS, args), **kwargs)


def _padded(t: torch.Tensor, rank: int) -> list[int]:
    """``t``'s shape with leading 1s up to ``rank`` dims (as broadcasting aligns it)."""
    return [1] * (rank - t.dim()) + list(t.shape)


def _per_root(
    meetings: Meetings, probe_grads: list[torch.Tensor | None], n: int, products: bool
) -> list[torch.Tensor | None]:
    """Each root's per-example gradients ``[n, *root.shape]`` (None: none) from the probe gradients of its meetings
    in weight products (``products``), or of its others (rows per example summed: a folded batch), through autograd
    batched over the examples (the graph from the roots kept); a meeting of a root itself or of its transpose
    (Falcon's ``weight.T``) directly."""
    grads: list[Any] = [None] * len(meetings.roots)
    through: list[tuple[torch.Tensor, torch.Tensor]] = []  # (what met the batch, its examples' gradients)
    for i, g in enumerate(probe_grads):
        if g is None or (i in meetings._products) != products:
            continue
        t, cotangent = meetings.met[i][0], meetings.cotangent(i, g)
        root = _root_viewed(meetings.roots, t)
        if root is None:
            through.append((t, cotangent))
            continue
        at, transposed = root
        cotangent = cotangent.mT if transposed else cotangent
        grads[at] = cotangent if grads[at] is None else grads[at] + cotangent
    if through:
        outputs, cotangents = zip(*through)
        mapped = torch.autograd.grad(outputs, meetings.roots, cotangents, is_grads_batched=True, allow_unused=True)
        grads = [g if m is None else m if g is None else g + m for g, m in zip(grads, mapped)]
    return grads


def _root_viewed(roots: Sequence[torch.Tensor], t: torch.Tensor) -> tuple[int, bool] | None:
    """``(index, transposed)`` where ``t`` is a root or a 2-D root's transpose (a view of all of it) whose gradient
    autograd passes to the root as it is, else None."""
    base = t._base if t._is_view() else t
    at = next((i for i, r in enumerate(roots) if r is base), None)
    if at is None or t.storage_offset() != base.storage_offset() or not _bare_view(t, base):
        return None
    if t.shape == base.shape and t.stride() == base.stride():
        return at, False
    transposed = base.dim() == 2 and t.shape == base.shape[::-1] and t.stride() == base.stride()[::-1]
    return (at, True) if transposed else None


def _bare_view(t: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``t``, ``base`` or one view op of it, takes its gradient to ``base`` unchanged: no hook on either, no
    custom ``autograd.Function`` returning a view (gradient reversal's ``w.view_as(w)``) or chain of views between
    (their gradients were skipped: 56-70% off, silently)."""
    if base._backward_hooks or t._backward_hooks:
        return False
    node = t.grad_fn
    return t is base or type(node).__name__ in _VIEW_NODES and node.next_functions[0][0] is base.grad_fn


_VIEW_NODES = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "AliasBackward0",
               "SliceBackward0", "AsStridedBackward0"}  # fmt: skip


def _cotangent(t: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, *t.shape]``: a probe's gradient ``[rows, ...]`` summed over each example's rows (a folded batch; over
    its tiles of a block of rows), then over what broadcasting (or the model's copy over the batch) added to ``t``'s
    shape."""
    k = _padded(t, g.dim())[0]  # 1, or the rows of a block tiled over each example's (``Meetings._probed``)
    per_example = g.reshape(n, -1, k, *g.shape[1:]).sum(1)  # [n, k, ...]
    return per_example.sum_to_size(n, *_padded(t, g.dim())).reshape(n, *t.shape)


def per_example_outputs(
    meetings: Meetings, roots: Mapping[str, list[tuple[int, torch.Tensor]]], grads: Sequence[Any], n: int
) -> dict[str, list[torch.Tensor]]:
    """Per layer run once for the whole batch (``roots``: per call, its index among the followed outputs and the probe
    whose gradient is the output's whole gradient), per call: each example's gradient of its output ``[n, *shape]``
    from the meetings' probe gradients then the probes' (``grads``), checked to sum to the output's whole gradient."""
    met, whole = list(grads[: len(meetings.met)]), grads[len(meetings.met) :]
    checked, multiplied = _per_root(meetings, met, n, products=False), _per_root(meetings, met, n, products=True)
    wholes = iter(whole)
    out: dict[str, list[torch.Tensor]] = {}
    for path, calls in roots.items():
        out[path] = []
        for root, probe in calls:
            g, total = checked[root], next(wholes)  # (weight products, taken out of autograd, are exact by their rows)
            if g is None:
                unmet = total is not None and bool(total.any())
            else:
                total = torch.zeros_like(probe) if total is None else total
                unmet = bool((g.sum(0) - total).abs().max() > 1e-4 * max(g.abs().max(), total.abs().max()))
            if unmet:
                raise RuntimeError(
                    f"{meetings.named[root]}, computed once for the whole batch, reaches the loss other than through "
                    f"its meetings with the batch"
                )
            product = multiplied[root]
            g = g if product is None else product if g is None else g + product
            out[path].append(probe.new_zeros(n, *probe.shape) if g is None else g)
    return out


def _tiled(args: tuple[Any, ...]) -> bool:
    """Whether ``args`` of ``Tensor.repeat`` tile their tensor along its first dimension alone."""
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return len(sizes) == args[0].dim() >= 1 and all(s == 1 for s in sizes[1:])


def _copied_index(args: tuple[Any, ...], out: torch.Tensor) -> bool:
    """Whether ``args`` of ``Tensor.__getitem__`` pick rows by integer indices that are one row of them copied along
    the first dimension (Whisper's positions, ``arange(T).unsqueeze(0).repeat(B, 1)``, into its position table): the
    rows picked are then that row's picks copied."""
    index = args[1] if len(args) == 2 else None
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):  # (bool, uint8: masks)
        return False
    return index.dim() >= 1 and index.shape[0] == out.shape[0] > 1 and torch.equal(index, index[:1].expand_as(index))


def _rowwise(args: tuple[Any, ...], out: torch.Tensor) -> bool:
    """Whether ``args`` of a transpose leave the first dimension in place."""
    dims = args[1:3]
    return len(dims) == 2 and all(isinstance(d, int) and d % out.dim() != 0 for d in dims)


def _in_place(func: Any) -> bool:
    """Whether ``func`` changes its first argument in place (``add_``, ``__iadd__``)."""
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.startswith("__") or name.startswith("__i")
