"""Gradient representations: how a batch of per-example gradients is kept, and the operations scoring needs.

Every part offers the same operations, so scorers never look inside:
``dot(a, b) -> [Ba, Bb]``, ``sq_norm(a) -> [B]``, ``materialize(a) -> {name: [B, *shape]}``, ``total(a)`` (the
sum over examples, B = 1), ``take(a, rows)`` (the examples in a slice) and ``concat([a, b, ...])`` along examples.

- ``Dense``: materialised per-sample gradients, reduced leaf by leaf (never concatenated into one copy).
- ``Deferred``: a layer's per-sample gradients formed from its factors when scored, used while in cache.
- ``Factored``: a Linear / Conv / Embedding layer kept as input rows ``A`` and output gradients ``G``; inner
  products are exact without forming any per-sample gradient: ``<g_i, g_j> = sum((A_i A_j^T) * (G_i G_j^T))``.
- ``TokenRows``: an Embedding's test-side gradients as their non-zero rows, matched to training tokens by id.
- ``Rows``: an Embedding's materialised gradients on the rows its batch's ids touch.
- ``Tied``: a weight shared by several layers, kept as every use's factors.
- ``Zero``: parameters the forward pass does not use: every per-example gradient is zero.
- ``Representation``: the parts of one batch, summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial, reduce
from typing import Any, NamedTuple, TypeVar, Union

import optree
import torch
import torch.nn.functional as F

from ._layers import Site, channel_split, materialize, materialized_blocks, scatter_rows
from ._projection import kron_split, project_grad, project_outer, project_vector

_PAIR_BLOCK = 1 << 22  # elements of the [rows, m, T, S] kernel formed at once by Factored.dot
# Of a deferred layer's gradients formed at once (about L2-sized). Timed against 0.125 / 0.5 / 2 / 4 / 64 MB: digits
# CNN self-influence 0.30-0.35 s (0.46 / 0.32 / 0.40 / 0.34-0.56 / 0.46), tiny transformer influence 1.56-1.62 s (2.39 /
# 1.77 / 1.57 / 1.52 / 1.51), BERT influence 0.42 s (0.49 / 0.47 / 0.38 / 0.41 / 0.43). With freed batches kept
# (``_allocator``), 0.5 to 4 MB are within 5% of each other on the digits CNN.
_CHUNK_BYTES = 1 << 20
# On a GPU, a cost per kernel and no cache to stay in: a batch's gradients of a layer are formed at once up to this
# much (a batch of the automatic size holds them whole within 256 MB: ``auto_batch_size``). On an H200 (200 x 20, 3
# checkpoints), formed 1 MB at a time against at once, alternating, best of 5: GPT-2's influence 221 / 174 ms, BERT's
# 239 / 234 (in another run, best of 3: 316 / 203).
_DEVICE_CHUNK_BYTES = 1 << 28
# Examples per chunk from which a deferred layer is formed column-major chunk by chunk; in fewer, each element's write
# lands on a cache line of its own (20 examples of a 512 x 512 x 3 x 3 convolution one at a time: 374 ms, formed whole
# and copied 159 ms; 3 at a time 2.1 against 1.5 ms; 7 at a time 0.63 against 0.74 ms).
_COLUMN_CHUNK = 4
# Of a layer's gradients formed at once for all the examples a chunk is dotted with, or the test side formed whole,
# beyond which they are formed a block of output channels at a time (``Deferred._channel_blocks``): larger blocks leave
# the cache, and over 32 MB glibc serves each one with fresh pages (``_allocator``). Formed from unfolded input and
# dotted with 20 test examples, alone (one CPU thread): a 256-channel 3 x 3 convolution at 8 x 8, 20 examples (45 MB)
# 39.2 ms whole, in blocks of 32 / 16 / 8 / 4 / 2 MB 24.1 / 26.8 / 25.9 / 30.4 / 39.5; a 768 x 3072 Linear of 32
# tokens (180 MB) 119.4, 55.9 / 55.9 / 59.6 / 62.6 / 67.0 ms; its transpose 119.7, 81.9 / 60.7 / 59.7 / 64.9 / 80.6.
_BLOCK_BYTES = 16 << 20
# Factors scored from formed gradients (a batch with many more rows than planned) only when the smaller side's
# gradients, formed whole, take at most this much memory; else the factored products run, slower.
_FORMED_SIDE_BYTES = 256 << 20
# The factored products round as their terms do: an example's squared norm, sum_{s,t} (a_s . a_t) (g_s . g_t), to
# about eps times the sum of those terms' sizes, which exceeds the norm where its rows cancel (by kappa^2, kappa =
# sum_t |a_t| |g_t| / |sum_t a_t g_t^T|; a formed gradient rounds with kappa itself). Past this ratio a batch's
# gradients of the layer are formed to be multiplied: a Siamese encoder's two nearly equal rows (kappa 150 at a
# distance of 1e-2: 6e-4 off in float32, 6.5% at 1e-3; kappa 7, a ratio near 50: 4.8e-6, against 2.5e-7 formed);
# rows of random directions give about 1 (their products across rows are small), however many; ResNet-18's and
# MobileNet's factored convolutions stay below it.
_CANCELLING = 30.0
# Of a column-major side's squares formed at once by ``_sq_norms`` (64,000 x 20: 0.99 / 0.68 / 0.79 ms in blocks of 64
# KB / 256 KB / 1 MB; 1,000,000 x 20: 26 / 16 / 17 ms).
_NORM_BLOCK_BYTES = 256 << 10


# Products of per-example gradients on the CPU: a float32 product below 2^-126 (a subnormal) takes a microcode assist,
# about 100x an ordinary multiply-add. A language model's head gradient is its softmax times the hidden state, most
# entries tiny where the model is sure (1e-20: a logit 45 below the top), and two examples' tiny entries multiply to
# subnormals all through the products: a tied 500-token head's influence (200 x 20, 3 checkpoints, one thread) took
# 1.07 s, 0.10 s with subnormals flushed. torch's flush flag holds for the calling thread only (MKL's worker threads
# keep their own), so an operand whose first example is mostly tiny (a quarter of its nonzero entries below
# ``_TINY``: a head's softmax is every example's) is lifted instead: multiplied by a power of two (exact: only
# exponents change), and the products lowered by the same powers (exact again, but for a result that is itself
# subnormal; one past float32's range computed unlifted). The test side is lifted once per checkpoint
# (``Representation.lifted``: its largest entry to ``2^48``, the training side's entries unknown), a factor kernel's
# two operands where it runs (``_lifted_bmm``: the first example's largest entry to ``2^(top - _SPREAD)``, ``top`` as
# far as the sum of its products stays in range). A few tiny entries rarely meet in a product (a sure model's hidden
# layers: at full speed, where lifting cost 1.9x a kernel's time): not lifted. Not on other devices (subnormals at
# full speed on GPUs) nor in float64 (subnormal below 1e-308).
_LIFTED_TOP = 48
_LIFTED_DTYPES = (torch.float32, torch.bfloat16)  # (float16's range is too narrow to lift into)
_TINY = 2.0**-56
_SPREAD = 16
_LIFTED_SIZE = 1024  # entries of one example's operand: a smaller one's products cost little however slow (a digits
# MLP's 10-class head, its softmax mostly tiny: lifting its test side cost its influence 1-3%)


def _lift_for(tensors: Sequence[torch.Tensor], top: int = _LIFTED_TOP, *, every: bool = False) -> int:
    """The power ``t`` of two bringing the largest entry of ``tensors`` (``[B, ...]`` each) to ``2^top`` (at most
    2^63, whose square's inverse is a float32 normal number), or 0: not lifted (no tensor's first example of
    ``_LIFTED_SIZE`` entries or more mostly tiny, ``_TINY``; zeros, a non-finite entry, another dtype or device).
    ``every``: the largest of every example's entries (one pass over the tensors: the test side, once per
    checkpoint); else of the first example's, to ``2^(top - _SPREAD)`` (a factor kernel's, at each run): another
    whose entries pass ``2^_SPREAD`` times the first's may take a product past the range, which ``lowered`` then
    computes unlifted."""
    if not tensors or tensors[0].device.type != "cpu" or tensors[0].dtype not in _LIFTED_DTYPES:
        return 0
    firsts = [t[:1].abs() for t in tensors if t.numel()]
    if not any(f.numel() >= _LIFTED_SIZE and _mostly_tiny(f) for f in firsts):
        return 0
    read = [t for t in tensors if t.numel()] if every else firsts
    largest = max(max(float(t.amax()), -float(t.amin())) for t in read)
    if not 0 < largest < math.inf:
        return 0
    return max(0, min(top - (0 if every else _SPREAD) - math.frexp(largest)[1], 63))


def _mostly_tiny(magnitudes: torch.Tensor) -> bool:
    """Whether a quarter or more of the nonzero ``magnitudes`` are below ``_TINY``: fewer rarely meet in a product
    (a sure model's hidden layers: products at full speed, lifting only a cost, 1.9x a kernel's time)."""
    nonzero = int(torch.count_nonzero(magnitudes))
    tiny = int(torch.count_nonzero(magnitudes < _TINY)) - (magnitudes.numel() - nonzero)  # (zeros counted: less them)
    return 4 * tiny >= nonzero > 0


def _lifted_bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y.mT`` (rows ``[..., K]`` each), both lifted (see ``_LIFTED_TOP``) as far as the sum of its products,
    ``N K 2^(2 top)`` for ``N`` entries, stays below float32's largest: a factor kernel's products of output gradients
    with themselves (an example's squared norm, a tied weight's uses), which ``Representation.lifted`` does not
    reach."""
    entries = math.prod(x.shape[:-1]) * y.shape[-2]
    top = (125 - x.shape[-1].bit_length() - entries.bit_length()) // 2
    tx = _lift_for([x], top)
    ty = tx if y is x else _lift_for([y], top)  # (an example's own products: one gate)
    if not tx + ty:
        return x @ y.mT
    lifted_x = x * 2.0**tx
    lifted_y = lifted_x if y is x else y * 2.0**ty
    return lowered(lifted_x @ lifted_y.mT, tx + ty, lambda: x @ y.mT)


def _rows(g: torch.Tensor) -> torch.Tensor:
    """``[B, *shape] -> [B, numel]``, also for a 0-d parameter (``[B]``, e.g. a CLIP-style ``logit_scale``)."""
    return g.reshape(g.shape[0], -1)


# Columns one CPU norm or product sums at a time: it sums along a row in float32 lanes, an error growing with its
# length (4M columns: 1.6e-4 off, a 2000 x 2000 layer's self-influence under `factored=False`; in parts of 16K: 1e-7,
# at the same speed), the parts then summed.
_SUM_COLUMNS = 1 << 14


def _sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """``[B]``: the squared norm of each row of ``rows`` ``[B, K]`` without a squared copy of the whole: row-major
    by torch's norm in one pass (64,000 x 20: 0.22 against 0.65 ms squared and summed); column-major (``Deferred
    .column_major``: the test side) summed in blocks of its contiguous ``[K, B]`` (0.68 against 1.6-1.8 ms read across
    rows that stride by B; 64,000 x 200: 7.8 against 30 ms; on the CPU only: a GPU reduces across strides in one
    kernel, where blocks would each cost a launch)."""
    if rows.device.type != "cpu" or rows.is_contiguous() or not rows.T.is_contiguous():
        if rows.device.type != "cpu" or rows.shape[1] <= _SUM_COLUMNS:
            return torch.linalg.vector_norm(rows, dim=1).square_()
        parts = [torch.linalg.vector_norm(part, dim=1).square_() for part in rows.split(_SUM_COLUMNS, 1)]
        return torch.stack(parts, 1).sum(1)
    columns = rows.T
    block = max(1, _NORM_BLOCK_BYTES // (columns.shape[1] * columns.element_size()))
    return sum(part.square().sum(0) for part in columns.split(block))


def _added_up(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of ``terms``, each made for it (referenced nowhere else: a part's products), added into the first.
    Python's ``sum`` makes a tensor per term (``0 + t``, then each partial sum): an MLP's top-10 of 500 x 50,000 took
    1.09-1.33 s with it, 1.05-1.21 s so."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total = total.add_(term)
    return total


def _cat_examples(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along examples, column-major (``Deferred.column_major``) when every part is."""
    if not all(_rows(t).T.is_contiguous() for t in tensors):
        return torch.cat(tensors)
    n = sum(t.shape[0] for t in tensors)
    return torch.cat([_rows(t).T for t in tensors], dim=1).T.view(n, *tensors[0].shape[1:])


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for rows ``[Ba, K]``, ``[Bb, K]``, on the CPU summed over blocks of ``_SUM_COLUMNS`` columns: one
    GEMM's float32 error grows with K (a 1024 x 1024 Linear's materialised gradients against 4 test examples' read
    column-major, ``(b @ a.T).T``: 5.7e-4 of the largest score off, 270x a plain loop's; a review helper's trial). On
    the CPU this took (AMD EPYC, one thread) ``a @ b.T`` is as fast as or faster than that order (4 x 16 rows of 262K:
    1.2 against 3.6 ms; 20 x 100 of 1M: 77 against 93 ms) and blocks cost 0-10%. Against ``_NARROW`` or fewer rows
    (test examples), a block is summed one column after another: ``_NARROW_SUM_COLUMNS`` each (64 x 8 rows of 16K
    positive entries: 7.0e-6 of the largest off in one block, 3.8e-7 in 1K-column blocks, a plain loop's 4.9e-7; 1000
    x 8: 13.6 against 14.9 ms; found by a review helper at 1e-4, 100-200x a loop's)."""
    columns = _NARROW_SUM_COLUMNS if b.shape[0] <= _NARROW else _SUM_COLUMNS
    if a.device.type != "cpu" or a.shape[1] <= columns:
        return a @ b.T
    blocks = range(0, a.shape[1], columns)
    return _added_up(a[:, k : k + columns] @ b[:, k : k + columns].T for k in blocks)


_NARROW, _NARROW_SUM_COLUMNS = 8, 1 << 10


class Dense(NamedTuple):
    """Per-sample gradients ``{name: [B, *shape]}``."""

    grads: dict[str, torch.Tensor]

    def dot(self, other: Dense | Deferred) -> torch.Tensor:
        if isinstance(other, Deferred):  # its gradients formed here, chunk by chunk, used while in cache
            return other.dotted_by(self)
        return _added_up(_product(_rows(a), _rows(other.grads[name])) for name, a in self.grads.items())

    def sq_norm(self) -> torch.Tensor:
        return sum(_sq_norms(_rows(g)) for g in self.grads.values())

    def materialize(self) -> dict[str, torch.Tensor]:
        return self.grads

    def project(self, seed: int, k: int) -> torch.Tensor:
        return sum(project_grad(name, g, seed, k) for name, g in self.grads.items())

    def total(self) -> Dense:
        return Dense({name: g.sum(0, keepdim=True) for name, g in self.grads.items()})

    def channels(self, block: slice) -> Dense:
        """The gradients of a block of a layer's output channels (the weight's and the bias's dim 0; views)."""
        return Dense({name: g[:, block] for name, g in self.grads.items()})

    def take(self, rows: slice) -> Dense:
        return Dense({name: g[rows] for name, g in self.grads.items()})

    @staticmethod
    def concat(parts: Sequence[Dense]) -> Dense:
        return Dense({name: _cat_examples([p.grads[name] for p in parts]) for name in parts[0].grads})


class Deferred(NamedTuple):
    """One layer's per-example gradients, formed when scored, ``form(rows)`` giving those of the examples in the
    slice ``rows`` (``{name: [b, *shape]}``), in chunks of ``chunk`` examples, each reduced (dotted, normed) while
    in cache and dropped: no ``[B, *shape]`` tensor per layer is written out and read back, and the chunks reuse
    freed memory instead of faulting in fresh pages. Formed at each use: a caller using it more than once forms it
    first (``Representation.formed``; the test side, ``for_test``). A chunk dotted with as many examples as the
    other side has, the test side formed whole, or one example's gradients, are formed a block of output channels at
    a time where they would take more than ``_BLOCK_BYTES`` (``by_channels``, where ``channel_split`` allows it)."""

    site: Site
    form: Callable[[slice], dict[str, torch.Tensor]]
    n: int  # examples
    element_size: int  # bytes per element of the gradients
    chunk_bytes: int  # of gradients formed at once (``chunk_bytes``)
    # (rows, blocks of output channels) -> the gradients of each block in turn, or None: formed whole only
    by_channels: Callable[[slice, Sequence[slice]], Iterator[dict[str, torch.Tensor]]] | None = None
    # rows -> their factors (A [b, T, d_in], G [b, T, d_out]), which project cheaper where T is small, or None
    factors: Callable[[slice], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def chunk(self) -> int:
        """Examples formed at once (about ``chunk_bytes``)."""
        return max(1, self.chunk_bytes // (math.prod(self.site.weight_shape) * self.element_size))

    def _chunks(self, least: int = 1) -> list[slice]:
        size = max(self.chunk, least)
        return [slice(i, min(i + size, self.n)) for i in range(0, self.n, size)]

    def _channel_blocks(self, examples: int) -> list[slice] | None:
        """Blocks of output channels whose gradients for ``examples`` take about ``_BLOCK_BYTES`` each, or ``None``
        where all of them take no more (or the site is formed whole only)."""
        total = examples * math.prod(self.site.weight_shape) * self.element_size
        if self.by_channels is None or total <= _BLOCK_BYTES:
            return None
        channels = self.site.weight_shape[0]
        size = max(1, channels * _BLOCK_BYTES // total)
        return [slice(i, min(i + size, channels)) for i in range(0, channels, size)]

    def materialize(self) -> dict[str, torch.Tensor]:
        return self.form(slice(None))

    def column_major(self) -> Dense:
        """The gradients as column-major tensors (each ``[B, *shape]`` a view of a contiguous ``[numel, B]``, whose
        blocks of columns ``_product`` and ``_sq_norms`` read contiguous): formed chunk by chunk into them (no
        row-major copy of the whole), or, in chunks of fewer than ``_COLUMN_CHUNK`` examples, formed for every example
        at once, a block of output channels at a time (``_channel_blocks``) or whole, and copied a tensor at a
        time."""
        every = slice(0, self.n)
        if self.chunk >= _COLUMN_CHUNK:
            pieces = ((rows, slice(None), self.form(rows)) for rows in self._chunks())
        elif (blocks := self._channel_blocks(self.n)) is not None:
            pieces = ((every, block, part) for block, part in zip(blocks, self.by_channels(every, blocks)))
        else:
            grads = self.materialize()
            return Dense({name: _rows(g := grads.pop(name)).T.contiguous().T.view(g.shape) for name in list(grads)})
        out: dict[str, torch.Tensor] = {}
        for rows, block, grads in pieces:
            for name, g in grads.items():
                if name not in out:  # (a block's channels are the weight's and the bias's dim 0)
                    shape = g.shape[1:] if block == slice(None) else (self.site.weight_shape[0], *g.shape[2:])
                    out[name] = g.new_empty(math.prod(shape), self.n).T.view(self.n, *shape)
                out[name][(rows,) if block == slice(None) else (rows, block)] = g  # (a 0-d parameter's: [B])
        return Dense(out)

    def dotted_by(self, dense: Dense) -> torch.Tensor:
        """``dense.dot(self)``: ``[B_dense, n]``, in chunks of at least ``B_dense`` examples (``dense`` is read once
        per chunk: no more often than its rows' worth of these gradients are formed)."""
        return self._dots(dense).T

    def dot(self, other: Dense | Deferred) -> torch.Tensor:
        return self._dots(Dense(other.materialize()) if isinstance(other, Deferred) else other)

    def _dots(self, dense: Dense) -> torch.Tensor:
        """``[n, B_dense]``, chunk by chunk."""
        dotted = lambda part, block: part.dot(dense if block == slice(None) else dense.channels(block))  # noqa: E731
        return _joined([self._reduced(rows, dotted) for rows in self._chunks(_size(dense))])

    def sq_norm(self) -> torch.Tensor:
        return _joined([self._reduced(rows, lambda part, _: part.sq_norm()) for rows in self._chunks()])

    def _reduced(self, rows: slice, reduce: Callable[[Dense, slice], torch.Tensor]) -> torch.Tensor:
        """``reduce(gradients, channels)`` of the chunk's gradients formed whole (all channels), or summed over blocks
        of output channels formed one at a time where they would take more than ``_BLOCK_BYTES`` (ResNet-18's
        256-channel convolutions in its influence call, dotted with 20 test examples a chunk: 48 -> 40 ms;
        self-influence of a 1024 -> 4096 Linear over 256 tokens, 8 examples: 0.549-0.554 -> 0.528-0.546 s; one CPU
        thread)."""
        blocks = self._channel_blocks(rows.stop - rows.start)
        if blocks is None:
            return reduce(Dense(self.form(rows)), slice(None))
        return _added_up(reduce(Dense(part), block) for block, part in zip(blocks, self.by_channels(rows, blocks)))

    def project(self, seed: int, k: int) -> torch.Tensor:
        """From the factors (``Factored.project``: the same projection), in chunks of about ``_BLOCK_BYTES`` of them,
        where that takes fewer products than forming the gradients and projecting those (few rows per example), else
        from the formed gradients, chunk by chunk."""
        if self.factors is not None and self.n:
            a, g = self.factors(slice(0, 1))
            t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            k_rows, k_cols = kron_split(k)
            if t * (d_out * k_rows + d_in * k_cols + k) < d_in * d_out * (t + k_cols) + d_out * k:
                chunks = self._chunks(_BLOCK_BYTES // max(1, t * (d_in + d_out) * self.element_size))
                return _joined([Factored(self.site, *self.factors(rows)).project(seed, k) for rows in chunks])
        return _joined([Dense(self.form(rows)).project(seed, k) for rows in self._chunks()])

    def total(self) -> Dense:
        return Dense(self.materialize()).total()

    def take(self, rows: slice) -> Deferred:
        """The examples in ``rows``, formed from the same factors when scored."""
        lo, n = rows.start, rows.stop - rows.start
        within = partial(partial, _within, lo, n)
        factors = None if self.factors is None else within(self.factors)
        by_channels = None if self.by_channels is None else within(self.by_channels)
        return self._replace(form=within(self.form), n=n, by_channels=by_channels, factors=factors)

    @staticmethod
    def concat(parts: Sequence[Deferred]) -> Dense:
        return Dense.concat([Dense(p.materialize()) for p in parts])


def chunk_bytes(device: torch.device) -> int:
    """Of a layer's gradients formed at once: cache-sized on the CPU, a batch's (or 256 MB) on other devices."""
    return _CHUNK_BYTES if device.type == "cpu" else _DEVICE_CHUNK_BYTES


def _within(lo: int, n: int, fn: Callable[..., Any], rows: slice, *args: Any) -> Any:
    """``fn`` of the examples ``rows`` of the ``n`` from ``lo`` on (``Deferred.take``)."""
    start, stop, _ = rows.indices(n)
    return fn(slice(lo + start, lo + stop), *args)


def _materialized(site: Site, a: torch.Tensor, g: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
    return materialize(site, a[rows], g[rows])


def _materialized_rows(
    site: Site, a: torch.Tensor, g: torch.Tensor, rows: slice, blocks: Sequence[slice]
) -> Iterator[dict[str, torch.Tensor]]:
    return materialized_blocks(site, a[rows], g[rows], blocks)


def _size(dense: Dense) -> int:
    return next(iter(dense.grads.values())).shape[0]


def _joined(blocks: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=dim)


def _same_token(ids1: torch.Tensor, ids2: torch.Tensor) -> torch.Tensor:
    """Broadcast token equality; padding (-1) matches nothing."""
    return (ids1 == ids2) & (ids1 >= 0)


def _token_kernel(site: Site, a1: torch.Tensor, a2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, m, T, S]`` kernel of the inputs: dot products (plus 1 for the bias, a constant input), or token
    equality for an Embedding."""
    if site.kind == "embedding":
        return _same_token(a1[:, None, :, None], a2[None, :, None, :]).to(dtype)
    kernel = _products(a1, a2)
    return kernel + 1 if site.bias is not None else kernel


def _products(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``[n, m, T, S]`` row products of ``x1`` ``[n, T, d]`` and ``x2`` ``[m, S, d]``. A side whose rows are strided
    (a convolution's unfolded patches, ``[B, d, T]`` in memory: the training side's) is read in place, the other
    side's rows against each of its examples' patches: ``einsum`` copies it whole first. ResNet-18's convolutions,
    20 training examples, one CPU thread, alone: 256 channels at 8 x 8, 1 test example 3.4 against 2.6 ms, 20 alike
    (49 ms); 512 at 4 x 4, 1: 0.85 against 0.43 ms, 20: 6.6 against 7.8 ms, but alike within a whole influence call,
    where the copied side is out of cache."""
    (n, t), (m, s), d = x1.shape[:2], x2.shape[:2], x1.shape[2]  # (d given: a side of no rows has no -1 to infer)
    if x2.stride(-1) != 1:
        return torch.matmul(x1.reshape(n * t, d), x2.transpose(1, 2)).view(m, n, t, s).transpose(0, 1)
    if x1.stride(-1) != 1:
        return torch.matmul(x2.reshape(m * s, d), x1.transpose(1, 2)).view(n, m, s, t).transpose(2, 3)
    return torch.einsum("itd,jsd->ijts", x1, x2)


class Factored(NamedTuple):
    """One layer's factors: inputs ``a`` ``[B, T, d_in]`` (ids ``[B, T]`` for an Embedding) and output gradients
    ``g`` ``[B, T, d_out]``. A bias is a constant input 1: its gradient is ``g.sum(1)``. ``costed``: kept as factors
    because the plan's rows made that cheaper; a pair of batches with many more rows is scored from formed gradients.
    """

    site: Site
    a: torch.Tensor
    g: torch.Tensor
    costed: bool = False
    norms: torch.Tensor | None = None  # each example's squared norm, from the factors (``conditioned``)
    cancelling: bool = False  # some example's rows cancel past ``_CANCELLING``: formed to be multiplied

    def conditioned(self, shared: dict[tuple, torch.Tensor] | None = None) -> tuple[Factored, torch.Tensor] | None:
        """This part with its examples' squared norms, and (0-d) whether some example's rows cancel (the flag read
        by the caller: one read for a batch's parts); None where they cannot (one row, an Embedding's ids, a tied
        weight's uses: ``Tied``), or where rows so long that their norms are formed are checked only if multiplied
        as factors (``dot``). ``shared``: the row products of a batch's factors by where the factors lie, each
        computed once for the parts holding the same factors (an LSTM's input and hidden products, both of its
        gates' output gradients; the query, key and value projections of one input)."""
        if not self._may_cancel() or self._products_cost_more(self, norms=True):
            return None
        ka, kg = self._kernels(shared)
        terms = ka * kg if shared is not None else ka.mul_(kg)  # (shared kernels stay as they are)
        norms = terms.sum((1, 2))
        return self._replace(norms=norms), (terms.abs_().sum((1, 2)) > _CANCELLING * norms).any()

    def _may_cancel(self) -> bool:
        return self.site.kind != "embedding" and not self.site.tied and self.a.shape[1] > 1

    def _checked(self) -> Factored:
        """This part with ``cancelling`` decided where ``conditioned`` left it undecided (rows formed for their
        norms, multiplied here as factors)."""
        if self.norms is not None or self.cancelling or not self._may_cancel():
            return self
        part, cancelling = self._replace(costed=False).conditioned() or (self, False)
        return part._replace(costed=self.costed, cancelling=bool(cancelling))

    def dot(self, other: Factored) -> torch.Tensor:
        mine, theirs = (self, other) if self._products_cost_more(other) else (self._checked(), other._checked())
        a1, g1, a2, g2 = self.a, self.g, other.a, other.g
        if mine.cancelling or theirs.cancelling or self._products_cost_more(other):
            mine, theirs = self._formed(), other._formed()
            return _formed_dots(mine, theirs) if a2.shape[0] <= a1.shape[0] else _formed_dots(theirs, mine).T
        if self.site.kind != "embedding" and a1.shape[1] == 1 and a2.shape[1] == 1:
            ka = a1[:, 0] @ a2[:, 0].T
            return (ka.add_(1) if self.site.bias is not None else ka).mul_(g1[:, 0] @ g2[:, 0].T)
        rows = max(1, _PAIR_BLOCK // max(1, a2.shape[0] * a1.shape[1] * a2.shape[1]))
        blocks = []
        for i in range(0, a1.shape[0], rows):
            ka = _token_kernel(self.site, a1[i : i + rows], a2, g1.dtype)
            kg = _products(g1[i : i + rows], g2)
            blocks.append((ka * kg).sum((2, 3)))
        return _joined(blocks)

    def sq_norm(self) -> torch.Tensor:
        if self.site.kind == "embedding":  # each token's rows summed first: repeats whose gradients cancel add before
            return TokenRows.of(self).sq_norm()  # any product (the token kernel's products: 13x a formed one's error)
        if self.cancelling or self._products_cost_more(self, norms=True):
            return self._formed().sq_norm()
        return self._gram_norms() if self.norms is None else self.norms

    def _gram_norms(self) -> torch.Tensor:
        a, g = self.a, self.g
        if self.site.kind != "embedding" and a.shape[1] == 1:  # one row: products of norms (1500 MLP examples: 0.05
            na, ng = _sq_norms(a[:, 0]), _sq_norms(g[:, 0])  # against 0.14 ms as [1, 1] GEMMs)
            return (na.add_(1) if self.site.bias is not None else na).mul_(ng)
        ka, kg = self._kernels()
        return ka.mul_(kg).sum((1, 2))  # ka is fresh: in place

    def _kernels(self, shared: dict[tuple, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, T]`` each example's row products of inputs (token equality for an Embedding; plus 1 for a bias)
        and of output gradients; with ``shared`` (``conditioned``), read from it where computed for another part,
        or kept in it."""
        a, g = self.a, self.g
        if self.site.kind == "embedding":
            return _same_token(a[:, :, None], a[:, None, :]).to(g.dtype), _lifted_bmm(g, g)
        if shared is None:  # (no lookup by where factors lie here: `dot` and `sq_norm` run inside compiled code)
            ka = a @ a.transpose(1, 2)
            return ka.add_(1) if self.site.bias is not None else ka, _lifted_bmm(g, g)
        ka = _shared(shared, a, lambda: a @ a.transpose(1, 2))
        return ka + 1 if self.site.bias is not None else ka, _shared(shared, g, lambda: _lifted_bmm(g, g))

    def materialize(self) -> dict[str, torch.Tensor]:
        return materialize(self.site, self.a, self.g)

    def _products_cost_more(self, other: Factored, norms: bool = False) -> bool:
        """Whether this pair of batches' factored products (``norms``: each example's squared norm) cost over twice
        what forming their gradients and multiplying those does, when the plan chose factors by cost: for the rows
        of its first batch, and a later batch can have many more (longer sequences under dynamic padding)."""
        if not self.costed or self.site.kind == "embedding":
            return False
        (b1, t1), (b2, t2) = self.g.shape[:2], other.g.shape[:2]
        d_in, d_out = self.a.shape[2] + (self.site.bias is not None), self.g.shape[2]
        if norms:
            return t1 * t1 * (d_in + d_out) > 2 * (t1 + 1) * d_in * d_out
        side = min(b1, b2) * math.prod(self.site.weight_shape) * self.g.element_size()
        products, formed = b1 * b2 * t1 * t2 * (d_in + d_out), (b1 * b2 + b1 * t1 + b2 * t2) * d_in * d_out
        return products > 2 * formed and side <= _FORMED_SIDE_BYTES

    def _formed(self) -> Deferred:
        site, a, g = self.site, self.a, self.g
        split = partial(_materialized_rows, site, a, g) if channel_split(site, g.device) else None
        form = partial(_materialized, site, a, g)
        return Deferred(site, form, a.shape[0], g.element_size(), chunk_bytes(g.device), split)

    def project(self, seed: int, k: int) -> torch.Tensor:
        """Same projection as the materialised gradients get (``Dense.project``), computed from the factors."""
        site, a, g = self.site, self.a, self.g
        if site.kind == "embedding":
            return project_outer(site.weight, a, g, seed, k)
        rows, cols = (a, g) if site.transposed else (g, a)  # the weight's rows: d_out, or d_in for a Conv1D
        weight = project_outer(site.weight, rows, cols, seed, k) if site.weight is not None else None
        bias = project_vector(site.bias, g.sum(1), seed, k) if site.bias is not None else None
        return weight if bias is None else bias if weight is None else weight.add_(bias)

    def total(self) -> Factored:
        """The sum of B examples' gradients is one example whose rows are all of theirs (which may cancel)."""
        rows = self.g.shape[0] * self.g.shape[1]  # (0 where every row was dropped, its output gradients all 0)
        a, g = self.a.reshape(1, rows, *self.a.shape[2:]), self.g.reshape(1, rows, math.prod(self.g.shape[2:]))
        total = Factored(self.site, a, g, self.costed)
        checked = total.conditioned()
        return total if checked is None else checked[0]._replace(cancelling=bool(checked[1]))

    def take(self, rows: slice) -> Factored:
        norms = None if self.norms is None else self.norms[rows]
        return self._replace(a=self.a[rows], g=self.g[rows], norms=norms)

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
        norms = None if any(p.norms is None for p in parts) else torch.cat([p.norms for p in parts])
        return Factored(parts[0].site, a, g, parts[0].costed, norms, any(p.cancelling for p in parts))


def _shared(kernels: dict[tuple, torch.Tensor], x: torch.Tensor, product: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``product()`` of the factor ``x``, computed once for the factors lying where ``x`` does (``conditioned``)."""
    where = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.dtype)
    if where not in kernels:
        kernels[where] = product()
    return kernels[where]


def _formed_dots(larger: Deferred, smaller: Deferred) -> torch.Tensor:
    """``larger.dot(smaller)``, the smaller side formed whole, or in parts of at most ``_FORMED_SIDE_BYTES`` (rows that
    cancel are formed whatever their size: ``Factored.conditioned``), the larger in chunks against each."""
    per_example = math.prod(smaller.site.weight_shape) * smaller.element_size
    size = max(1, _FORMED_SIDE_BYTES // per_example)
    parts = [smaller.take(slice(i, min(i + size, smaller.n))) for i in range(0, smaller.n, size)] or [smaller]
    return _joined([larger.dot(part) for part in parts], dim=1)


class TokenRows(NamedTuple):
    """Test-side Embedding gradients kept as their non-zero rows: ``rows[k]`` is row ``token[k]`` of example
    ``example[k]``'s gradient, one entry per distinct (example, token), sorted by token; ``start`` ``[V + 1]`` indexes
    the entries of each token. A training token ``v`` with output gradient ``g`` contributes ``rows[k] . g`` to the
    examples of the entries of ``v`` only: at most ``n`` (usually about ``n T / V``) dot products of length ``d``
    per training token, where materialising costs ``V d`` per pair and the token kernel ``T^2 (d + 1)``."""

    site: Site
    n: int  # examples
    example: torch.Tensor  # [K]
    token: torch.Tensor  # [K]
    rows: torch.Tensor  # [K, d]
    start: torch.Tensor  # [V + 1]

    @staticmethod
    def build(site: Site, n: int, example: torch.Tensor, token: torch.Tensor, rows: torch.Tensor) -> TokenRows:
        """Sum the rows of equal (example, token) pairs (``token`` -1: padding, dropped) and index them by token."""
        vocab, keep = site.weight_shape[0], token >= 0
        example, token, rows = example[keep], token[keep], rows[keep]
        keys, inverse = torch.unique(token * n + example, return_inverse=True)  # sorted by token, then example
        summed = rows.new_zeros(keys.shape[0], rows.shape[-1]).index_add_(0, inverse, rows)
        token, example = keys // n, keys % n
        start = F.pad(torch.bincount(token, minlength=vocab).cumsum(0), (1, 0))
        return TokenRows(site, n, example, token, summed, start)

    @staticmethod
    def of(part: Factored) -> TokenRows:
        n, t = part.a.shape
        example = torch.arange(n, device=part.a.device).repeat_interleave(t)
        return TokenRows.build(part.site, n, example, part.a.reshape(-1), part.g.reshape(n * t, -1))

    @torch.compiler.disable  # sizes depend on the token ids: run eagerly inside compiled updates (no graph breaks)
    def dot(self, other: Factored) -> torch.Tensor:
        """``[n, m]`` against a training batch's factors, each of its examples' rows summed per token first where a
        token repeats: repeated tokens whose output gradients cancel add before any product (a Siamese bag of
        embeddings' shared tokens, multiplied each then summed: 20x a formed gradient's error in float32)."""
        m, t = other.a.shape
        if _repeats(other.a):
            theirs = TokenRows.of(other)
            token, g, owner = theirs.token, theirs.rows, theirs.example
        else:  # (no token twice in an example: its rows as they are, without sorting and summing them)
            token, g = other.a.reshape(-1), other.g.reshape(m * t, -1)
            keep = token >= 0
            owner = torch.arange(m, device=token.device).repeat_interleave(t)[keep]
            token, g = token[keep], g[keep]
        count = (self.start[1:] - self.start[:-1])[token]  # entries matching each training token
        out = g.new_zeros(self.n * m)
        ends = count.cumsum(0)
        budget = max(1, _PAIR_BLOCK // max(1, g.shape[-1]))
        lo = 0
        while lo < token.shape[0]:  # blocks of training tokens with at most ~budget matches each
            done = int(ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(torch.searchsorted(ends, done + budget, right=True)))
            c = count[lo:hi]
            which = torch.repeat_interleave(torch.arange(hi - lo, device=c.device), c)  # token of each match
            first = self.start[token[lo:hi]] - (ends[lo:hi] - c - done)  # entry index = first + match number
            entry = first[which] + torch.arange(which.shape[0], device=c.device)
            values = (self.rows[entry] * g[lo:hi][which]).sum(-1)
            out.index_add_(0, self.example[entry] * m + owner[lo:hi][which], values)
            lo = hi
        return out.view(self.n, m)

    def sq_norm(self) -> torch.Tensor:
        return self.rows.new_zeros(self.n).index_add_(0, self.example, self.rows.square().sum(-1))

    def materialize(self) -> dict[str, torch.Tensor]:
        vocab, d = self.site.weight_shape
        w = self.rows.new_zeros(self.n, vocab, d)
        w[self.example, self.token] = self.rows
        return {self.site.weight: w}

    def project(self, seed: int, k: int) -> torch.Tensor:
        return project_grad(self.site.weight, self.materialize()[self.site.weight], seed, k)

    def total(self) -> TokenRows:
        return TokenRows.build(self.site, 1, torch.zeros_like(self.example), self.token, self.rows)

    def take(self, rows: slice) -> TokenRows:
        keep = (self.example >= rows.start) & (self.example < rows.stop)
        example, token = self.example[keep] - rows.start, self.token[keep]
        return TokenRows.build(self.site, rows.stop - rows.start, example, token, self.rows[keep])

    @staticmethod
    def concat(parts: Sequence[TokenRows]) -> TokenRows:
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p.n)
        example = torch.cat([p.example + o for p, o in zip(parts, offsets)])
        token = torch.cat([p.token for p in parts])
        return TokenRows.build(parts[0].site, offsets[-1], example, token, torch.cat([p.rows for p in parts]))


def _repeats(ids: torch.Tensor) -> bool:
    """Whether some example of ``ids`` ``[B, T]`` holds a token (not padding, -1) twice."""
    ordered = ids.sort(1).values
    return bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any())


class Rows(NamedTuple):
    """An Embedding's materialised per-example gradients on the rows its batch's ids touch: ``ids`` ``[U]``
    (sorted), ``g`` ``[B, U, d]``; every other row is zero for every example. Two batches' gradients meet only on
    their common ids, so a table much larger than the ids in use (BERT's 512 positions, 32 used) costs ``U d`` per
    example and pair instead of ``V d``, and no zero-filled ``[B, V, d]`` tensor is ever written."""

    site: Site
    ids: torch.Tensor  # [U]
    g: torch.Tensor  # [B, U, d]

    @staticmethod
    @torch.compiler.disable  # sizes depend on the token ids: run eagerly inside compiled updates
    def of(site: Site, ids: torch.Tensor, g: torch.Tensor) -> Rows:
        """From factors: ``ids`` ``[B, T]`` (-1: padding) and output gradients ``g`` ``[B, T, d]``. Where every example
        reads the same ids in increasing order (positions, a ``[1, T]`` row broadcast over the batch), its rows are
        ``g`` itself: no sort of the ids and no scatter (for 250 examples of 32 positions 0.02 ms against 1.85)."""
        alike = bool(ids.shape[0]) and bool((ids == ids[:1]).all())  # every example the ids of the first
        if alike and _increasing(ids[0]):
            return Rows(site, ids[0].clone(), g.contiguous())
        some = ids[0] if alike else ids
        seen = torch.unique(some[some >= 0])
        slot = torch.where(ids >= 0, torch.searchsorted(seen, ids.contiguous()), -1)
        return Rows(site, seen, scatter_rows(slot, g, g.new_zeros(g.shape[0], seen.shape[0], g.shape[-1])))

    @torch.compiler.disable
    def dot(self, other: Rows) -> torch.Tensor:
        if torch.equal(self.ids, other.ids):  # e.g. positions: every batch uses the same
            return _rows(self.g) @ _rows(other.g).T
        mine, theirs = torch.isin(self.ids, other.ids), torch.isin(other.ids, self.ids)  # common ids, both sorted
        return _rows(self.g[:, mine]) @ _rows(other.g[:, theirs]).T

    def sq_norm(self) -> torch.Tensor:
        return _sq_norms(_rows(self.g))

    def materialize(self) -> dict[str, torch.Tensor]:
        w = self.g.new_zeros(self.g.shape[0], *self.site.weight_shape)
        w[:, self.ids] = self.g
        return {self.site.weight: w}

    def project(self, seed: int, k: int) -> torch.Tensor:
        return project_grad(self.site.weight, self.materialize()[self.site.weight], seed, k)

    def total(self) -> Rows:
        return Rows(self.site, self.ids, self.g.sum(0, keepdim=True))

    def take(self, rows: slice) -> Rows:
        return self._replace(g=self.g[rows])  # (the ids of all the examples: rows of zeros where others' are)

    def touched(self) -> Rows:
        """Copied, on the rows where some example's gradient is not zero only."""
        kept = self.g.ne(0).any(2).any(0)
        return Rows(self.site, self.ids[kept], self.g[:, kept])

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        ids = torch.unique(torch.cat([p.ids for p in parts]))
        g = parts[0].g.new_zeros(sum(p.g.shape[0] for p in parts), ids.shape[0], parts[0].g.shape[-1])
        start = 0
        for p in parts:
            g[start : start + p.g.shape[0], torch.searchsorted(ids, p.ids)] = p.g
            start += p.g.shape[0]
        return Rows(parts[0].site, ids, g)


def _increasing(ids: torch.Tensor) -> bool:
    """Whether ``ids`` ``[T]`` are valid (not -1, padding) and strictly increasing."""
    return bool((ids >= 0).all()) and bool((ids[1:] > ids[:-1]).all())


class Tied(NamedTuple):
    """A weight shared by several layers (GPT-2's token embedding and ``lm_head``) kept as every use's factors.

    In the shared tensor's ``[R, C]`` layout each use's gradient is ``sum_t row_t col_t^T``: an Embedding's rows are
    one-hot ids and its columns ``G``; a Linear's rows ``G`` and columns ``A`` (transformers' ``Conv1D``: the other
    way round). The squared norm of the summed gradient adds every pair of uses, ``sum_{s,t} <row_u[s], row_v[t]>
    <col_u[s], col_v[t]>``: ``T_u T_v`` products per pair of uses instead of a ``[B, R, C]`` gradient. Kept only by
    self-influence plans (each gradient meets itself); the other operations go through the materialised sum."""

    uses: tuple[Factored, ...]

    @property
    def site(self) -> Site:
        return self.uses[0].site

    def sq_norm(self) -> torch.Tensor:
        """From the uses' factors, unless some example's rows cancel past ``_CANCELLING`` (a Siamese pair's two
        branches through one weight: 47% off in float32 before): then from the summed gradient."""
        norms, sizes = 0, 0
        for u in self.uses:
            for v in self.uses:
                kernel = _tied_kernel(u, v)
                norms, sizes = norms + kernel.sum((1, 2)), sizes + kernel.abs().sum((1, 2))
        if bool((sizes > _CANCELLING * norms).any()):
            return Dense(self.materialize()).sq_norm()
        return norms

    def materialize(self) -> dict[str, torch.Tensor]:
        grads = [use.materialize()[self.site.weight] for use in self.uses]
        return {self.site.weight: sum(grads[1:], grads[0])}

    def dot(self, other: Tied) -> torch.Tensor:
        return Dense(self.materialize()).dot(Dense(other.materialize()))

    def project(self, seed: int, k: int) -> torch.Tensor:
        return sum(use.project(seed, k) for use in self.uses)

    def total(self) -> Tied:
        return Tied(tuple(use.total() for use in self.uses))

    def take(self, rows: slice) -> Tied:
        return Tied(tuple(use.take(rows) for use in self.uses))

    @staticmethod
    def concat(parts: Sequence[Tied]) -> Tied:
        return Tied(tuple(Factored.concat(uses) for uses in zip(*(p.uses for p in parts))))


class Zero(NamedTuple):
    """Parameters the plan found unused (``Plan.unused``): their per-example gradients are all zero."""

    shapes: dict[str, torch.Size]
    n: int
    like: torch.Tensor  # 0-d, of the gradients' dtype and device

    @staticmethod
    def of(params: dict[str, torch.Tensor], n: int) -> Zero:
        return Zero({name: p.shape for name, p in params.items()}, n, next(iter(params.values())).new_zeros(()))

    def dot(self, other: Zero) -> torch.Tensor:
        return self.like.new_zeros(self.n, other.n)

    def sq_norm(self) -> torch.Tensor:
        return self.like.new_zeros(self.n)

    def materialize(self) -> dict[str, torch.Tensor]:
        return {name: self.like.new_zeros(self.n, *shape) for name, shape in self.shapes.items()}

    def project(self, seed: int, k: int) -> torch.Tensor:
        return self.like.new_zeros(self.n, k)

    def total(self) -> Zero:
        return self._replace(n=1)

    def take(self, rows: slice) -> Zero:
        return self._replace(n=rows.stop - rows.start)

    @staticmethod
    def concat(parts: Sequence[Zero]) -> Zero:
        return parts[0]._replace(n=sum(p.n for p in parts))


def _rows_and_columns(use: Factored) -> tuple[torch.Tensor, torch.Tensor]:
    """A use's factors in the shared weight's ``[R, C]`` layout: (rows ``[B, T, R]`` or ids ``[B, T]``, columns)."""
    if use.site.kind == "embedding" or use.site.transposed:
        return use.a, use.g
    return use.g, use.a


def _tied_kernel(u: Factored, v: Factored) -> torch.Tensor:
    """``[B, T_u, T_v]``: ``<row_u[s], row_v[t]> <col_u[s], col_v[t]>`` per example."""
    (ru, cu), (rv, cv) = _rows_and_columns(u), _rows_and_columns(v)
    columns = _lifted_bmm(cu, cv)
    if ru.dim() == 2 and rv.dim() == 2:  # ids against ids
        return _same_token(ru[:, :, None], rv[:, None, :]).to(columns.dtype) * columns
    if ru.dim() == 2:  # ids against rows: the rows' entry at each id
        return _gathered(rv, ru).transpose(1, 2) * columns
    if rv.dim() == 2:
        return _gathered(ru, rv) * columns
    return _lifted_bmm(ru, rv) * columns


def _gathered(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T_rows, T_ids]``: ``rows[b, s, ids[b, t]]``, 0 for padding ids (-1)."""
    index = ids.clamp(min=0)[:, None, :].expand(-1, rows.shape[1], -1)
    return torch.gather(rows, 2, index) * (ids >= 0)[:, None, :].to(rows.dtype)


Part = Union[Dense, Deferred, Factored, TokenRows, Tied, Rows, Zero]


class Representation(NamedTuple):
    """The gradient representation of one batch: parts in a fixed order, over the parameters ``names``."""

    parts: tuple[Part, ...]
    names: tuple[str, ...]  # differentiated parameters, in the order ``flat`` lays them out
    lift: int = 0  # the parts hold the gradients times ``2^lift`` (``lifted``); what is read from them is lowered

    @property
    def size(self) -> int:
        first = self.parts[0]
        if isinstance(first, Dense):
            return next(iter(first.grads.values())).shape[0]
        if isinstance(first, Tied):
            first = first.uses[0]
        if isinstance(first, Rows):
            return first.g.shape[0]
        return first.n if isinstance(first, (TokenRows, Deferred, Zero)) else first.a.shape[0]

    def dot(self, other: Representation) -> torch.Tensor:
        return lowered(
            _added_up(a.dot(b) for a, b in zip(self.parts, other.parts)),
            self.lift + other.lift,
            lambda: self.unlifted().dot(other.unlifted()),
        )

    def sq_norm(self) -> torch.Tensor:
        return lowered(sum(p.sq_norm() for p in self.parts), 2 * self.lift, lambda: self.unlifted().sq_norm())

    def nonzero(self, device: torch.device) -> torch.Tensor:
        """``[B]`` on ``device`` (the gradients'): whether an example's gradient may be nonzero, some part's factors
        being nonzero (read where a squared norm rounded to 0: a gradient of 0, or one whose squares underflowed)."""
        return reduce(torch.logical_or, (_nonzero_rows(p, self.size, device) for p in self.parts))

    def formed_nonzero(self, i: int) -> bool:
        """Whether example ``i``'s gradient, formed, has a nonzero entry (factors of nonzero rows may sum to 0: a
        pair of identical inputs through a Siamese difference)."""
        return bool(self._replace(parts=tuple(p.take(slice(i, i + 1)) for p in self.parts)).flat().ne(0).any())

    def project(self, seed: int, k: int) -> torch.Tensor:
        """``[B, k]`` seeded projection; the same for a parameter whichever part holds it."""
        return lowered(sum(p.project(seed, k) for p in self.parts), self.lift, lambda: self.unlifted().project(seed, k))

    def flat(self) -> torch.Tensor:
        """``[B, P]`` per-example gradients, parameters in ``names`` order whatever the parts."""
        grads = {name: g for p in self.unlifted().parts for name, g in p.materialize().items()}
        return torch.cat([_rows(grads[name]) for name in self.names], dim=1)

    def total(self) -> Representation:
        return self._replace(parts=tuple(p.total() for p in self.parts))

    def split(self, n: int) -> tuple[Representation, Representation]:
        """The first ``n`` examples' representation, copied (it outlives the batch: a test side kept for every
        training batch), and the other examples' (views)."""
        head = self._replace(parts=tuple(_owned(p.take(slice(0, n))) for p in self.parts))
        tail = self._replace(parts=tuple(p.take(slice(n, self.size)) for p in self.parts))
        return head, tail

    def formed(self) -> Representation:
        """Deferred layers formed once: for a representation used more than once (a norm and a dot)."""
        if not any(isinstance(p, Deferred) for p in self.parts):
            return self
        return self._replace(parts=tuple(Dense(p.materialize()) if isinstance(p, Deferred) else p for p in self.parts))

    def lifted(self) -> Representation:
        """This side (formed) times the power of two ``2^lift`` bringing its largest entry below ``2^_LIFTED_TOP``,
        where products with it would otherwise meet float32's subnormals (see ``_LIFTED_TOP``); itself elsewhere."""
        rep = self.formed()
        return rep._at_lift(0 if self.lift else _lift_for([t for p in rep.parts for t in _gradients_of(p)], every=True))

    def unlifted(self) -> Representation:
        """The gradients themselves (exact: ``lifted`` changed exponents only)."""
        return self._at_lift(0)

    def _at_lift(self, lift: int) -> Representation:
        """The same gradients held times ``2^lift`` (exact: powers of two)."""
        if lift == self.lift:
            return self
        return Representation(tuple(_times(p, 2.0 ** (lift - self.lift)) for p in self.parts), self.names, lift)

    def for_test(self) -> Representation:
        """The test side, formed: Embedding factors summed into rows per (example, token), matched by each
        training batch; deferred layers formed column-major, dotted by every training batch at BLAS's fastest
        (``_product``)."""
        return Representation(tuple(map(_for_test, self.parts)), self.names)

    @staticmethod
    def concat(batches: Sequence[Representation]) -> Representation:
        if len(batches) == 1:
            return batches[0]
        lift = min(b.lift for b in batches)  # (each batch at the least lift: exact, entries at least the gradients')
        batches = [b._at_lift(lift) for b in batches]
        parts = tuple(type(ps[0]).concat(ps) for ps in zip(*(b.parts for b in batches)))
        return Representation(parts, batches[0].names, lift)


Lowered = TypeVar("Lowered", torch.Tensor, dict[str, torch.Tensor])


def lowered(value: Lowered, lift: int, again: Callable[[], Lowered]) -> Lowered:
    """``value`` (a tensor, or a dict of them), read from gradients lifted by ``2^lift``, at the gradients' own scale;
    ``again()``, from the gradients themselves, where lifting took some product past the dtype's range (see
    ``_LIFTED_TOP``), which would read inf."""
    if not lift:
        return value
    values = [value] if isinstance(value, torch.Tensor) else list(value.values())
    if not all(math.isfinite(v.sum()) for v in values):  # (a sum: 50x faster than ``isfinite().all()``; one past the
        return again()  # range, of finite values, is computed again too)
    factor = 2.0**-lift
    return value * factor if isinstance(value, torch.Tensor) else {k: v * factor for k, v in value.items()}


def _gradients_of(part: Part) -> list[torch.Tensor]:
    """The tensors ``part``'s gradients are linear in (``_times`` scales them)."""
    if isinstance(part, Dense):
        return list(part.grads.values())
    if isinstance(part, Tied):
        return [u.g for u in part.uses]
    if isinstance(part, (Factored, Rows)):
        return [part.g]
    return [part.rows] if isinstance(part, TokenRows) else []


def _nonzero_rows(part: Part, n: int, device: torch.device) -> torch.Tensor:
    """``[n]``: whether ``part``'s gradient of each example may be nonzero: a layer's inputs and output gradients both
    (a zero input row of a layer without bias gives it none), an Embedding's output gradients, a formed gradient."""
    rows = lambda t: t.reshape(n, -1).ne(0).any(1)  # noqa: E731
    if isinstance(part, Dense):
        return reduce(torch.logical_or, map(rows, part.grads.values()))
    if isinstance(part, Tied):
        return reduce(torch.logical_or, (_nonzero_rows(u, n, device) for u in part.uses))
    if isinstance(part, Factored):
        return rows(part.g) & (rows(part.a) if part.a.is_floating_point() else True)  # (ids: an Embedding's rows)
    if isinstance(part, Rows):
        return rows(part.g)
    if isinstance(part, TokenRows):  # (rows of 0: an example whose loss is 0, all its labels -100)
        held = part.rows.ne(0).any(1).to(torch.int64)
        return torch.zeros(n, dtype=torch.int64, device=device).index_add_(0, part.example, held) > 0
    return torch.zeros(n, dtype=torch.bool, device=device)  # (no gradient: Zero; a Deferred one is formed for norms)


def _times(part: Part, factor: float) -> Part:
    """``part`` with its gradients times ``factor`` (a power of two: exact), as a new part."""
    if isinstance(part, Dense):  # (a column-major side stays column-major: elementwise ops keep the strides)
        return Dense({name: g * factor for name, g in part.grads.items()})
    if isinstance(part, Tied):
        return Tied(tuple(_times(u, factor) for u in part.uses))
    if isinstance(part, Factored):  # (a bias's gradient is its output gradients' sum: scaled with them)
        norms = None if part.norms is None else part.norms * factor**2
        if norms is not None and not math.isfinite(norms.sum()):  # (past the range, lifted: formed again from the
            norms = None  # factors where read, unlifted then if need be; inf scaled back down stays inf)
        return part._replace(g=part.g * factor, norms=norms)
    if isinstance(part, Rows):
        return part._replace(g=part.g * factor)
    return part._replace(rows=part.rows * factor) if isinstance(part, TokenRows) else part


def _owned(part: Part) -> Part:
    """``part`` holding copies of its tensors; an Embedding's rows only those its examples' gradients touch (a slice of
    a batch's keeps the whole batch's ids: a long-context model's table, thousands of rows more per example)."""
    if isinstance(part, Rows):
        return part.touched()
    copied = lambda t: t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return optree.tree_map(copied, part, none_is_leaf=True)  # (contiguous: what ``for_test`` makes of factors)


def _for_test(part: Part) -> Part:
    """A deferred layer formed column-major; an Embedding's factors as token rows, another layer's with their rows
    contiguous (a convolution's unfolded patches are strided: ``_products`` would copy them for every training batch).
    (A dense part stays as it is: a column-major copy of it would briefly take twice its memory, all of the test
    side's on the dense paths.)"""
    if isinstance(part, Deferred):
        return part.column_major()
    if isinstance(part, Factored) and part.site.kind == "embedding":
        return TokenRows.of(part)
    return part._replace(a=part.a.contiguous(), g=part.g.contiguous()) if isinstance(part, Factored) else part
