"""Data at the edge: turn a batch, a Dataset, a DataLoader or an iterable of batches into batches on a device."""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Union

import optree
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from ._warn import warn

Batch = Any  # a tuple (x1, ..., xk, y) of tensors, or a dict / pytree of tensors with a leading batch dim


def as_dict(data: Any) -> Any:
    """A batch given as a mapping other than a dict (transformers' ``BatchEncoding``, a ``UserDict``, a dict subclass
    such as an ``EasyDict``: optree takes one for a leaf, so it was read as an iterable of its keys) as a dict of its
    entries, and a list or tuple subclass as a list or tuple, also where dicts, lists and tuples hold one; anything
    else as it is."""
    if not _holds_other_container(data):
        return data
    if isinstance(data, Mapping):
        return {k: as_dict(v) for k, v in data.items()}
    items = [as_dict(v) for v in data]
    if _namedtuple(data):
        return type(data)(*items)
    return items if isinstance(data, list) else tuple(items)


_OPTREE_NODES = (dict, OrderedDict, defaultdict, list, tuple)  # (and namedtuples): what optree walks into


def _namedtuple(data: Any) -> bool:
    """Whether ``data`` is a namedtuple, by its type's ``_fields`` (the instance's: an attribute dict's
    ``__getattr__``, a key lookup, raised KeyError or said yes)."""
    return isinstance(data, tuple) and hasattr(type(data), "_fields")


def _holds_other_container(data: Any, depth: int = 8) -> bool:
    if isinstance(data, (Mapping, list, tuple)) and type(data) not in _OPTREE_NODES and not _namedtuple(data):
        return True
    within = data.values() if isinstance(data, dict) else data if isinstance(data, (list, tuple)) else ()
    return depth > 0 and any(_holds_other_container(v, depth - 1) for v in within)


def is_single_batch(data: Any) -> bool:
    """A tuple / list of tensors, or a dict whose leaves are tensors, is one batch; a list of tuples is not."""
    if isinstance(data, Mapping):  # (any tensor: a batch, whose other values `batch_size_of` names)
        return any(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(data, none_is_leaf=True))
    # A tuple / list holding any tensor directly is meant as a batch (a list of batches holds tuples); its other
    # elements are then reported by `batch_size_of` rather than silently read as batches.
    return isinstance(data, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in data)


def batch_size_of(batch: Batch, where: str) -> int:
    """Leading size shared by all tensors of ``batch``; raise if they disagree or a leaf is not a tensor."""
    _refuse_entries_per_example(batch, where)
    leaves = optree.tree_leaves(batch, none_is_leaf=True)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 for leaf in leaves):
        kind = lambda x: f"Tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
        if isinstance(batch, Mapping):
            kinds = [f"{k!r}: {kind(v)}" for k, v in batch.items()]
        else:
            kinds = [kind(x) for x in (batch if isinstance(batch, (tuple, list)) else leaves)]
        scalar = any(isinstance(leaf, torch.Tensor) and leaf.dim() == 0 for leaf in leaves)
        hint = (
            " A 0-d tensor is one example's (batch the examples: a DataLoader with a `batch_size`, not None), or a "
            "value shared by the batch (keep it in the loss or the model, not the batch)."
            if scalar
            else ""
        )
        if any(type(leaf).__module__ == "numpy" for leaf in leaves):
            hint += " Convert numpy arrays with `torch.from_numpy(a)`."
        hint += _object_hint(leaves)
        shape = "`{'input_ids': ids, 'labels': y}`, each" if isinstance(batch, Mapping) else "`(x, y)` or `(x1, x2, y)`"
        raise TypeError(
            f"{where}: every element of a batch must be a tensor with a leading batch dimension, got {kinds[:6]}"
            f"{_first_not_a_row(batch)}. Pass batches like {shape} with one row per example.{hint}"
        )
    odd = next((leaf for leaf in leaves if leaf.device.type == "meta" or leaf.layout != torch.strided), None)
    if odd is not None:  # (torch's raw errors where the batch was cut into examples)
        what = "on the 'meta' device, which holds no values" if odd.device.type == "meta" else f"{odd.layout}"
        fix = "load the data onto a real device" if odd.device.type == "meta" else "pass it dense (`.to_dense()`)"
        raise ValueError(
            f"{where}: a tensor of shape {list(odd.shape)} is {what}; the batch cannot be cut into examples: {fix}."
        )
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(
            f"{where}: the tensors of a batch disagree on the batch size (their first dimension): shapes {shapes[:6]}. "
            f"Give every tensor of a batch one row per example (inputs and labels alike); a tensor shared by every "
            f"example (a causal mask, a table) belongs in the model or the loss, not the batch: one whose first "
            f"dimension happened to equal the batch's would be cut into rows, one per example."
        )
    return sizes.pop()


def _refuse_entries_per_example(batch: Batch, where: str) -> None:
    """Refuse a list of dicts inside a batch (torchvision's detection targets: one dict per image, its boxes, a
    number of its own): each of their tensors would be cut into rows as the batch's, an image given other images'
    boxes, silently where each held as many as the batch has images (169-343% off; a review helper's). A list of
    dicts of the batch's rows each, not as long as the batch, is a batch's."""
    lists = [x for x in _nodes(batch) if isinstance(x, (list, tuple)) and x and all(isinstance(e, Mapping) for e in x)]
    if not lists:
        return
    leaves = [t for t in optree.tree_leaves(batch, none_is_leaf=True) if isinstance(t, torch.Tensor) and t.dim()]
    rows = {t.shape[0] for t in leaves if not any(t is u for x in lists for u in optree.tree_leaves(x))}
    for entries in lists:
        inner = [t for t in optree.tree_leaves(entries) if isinstance(t, torch.Tensor)]
        if len(entries) in rows or any(t.dim() == 0 or t.shape[0] not in rows for t in inner):
            raise ValueError(
                f"{where}: the batch holds a list of {len(entries)} dicts, one per example (detection targets, say), "
                f"whose tensors cannot be cut into examples (each one's rows would be read as examples'). Pad them "
                f"into tensors with a row per example (`boxes [B, M, 4]` and a count `[B]`), read by a "
                f"`tc.BatchLoss`; or, for tensors of the batch's rows, pass a dict of them instead of a list."
            )


def warn_tensors_per_example(batch: Batch) -> None:
    """Warn of a list or tuple inside a batch holding as many tensors as each has rows: read as tensors of every
    example's rows (several targets), which one tensor per example (detection targets, an image's boxes, as many as
    the batch has images) would silently not be (23-28% off; a review helper's); a tensor of those rows each is not
    told apart. Of a call's first batch only (a loader's last, of 2 examples and 2 targets, was warned of)."""
    for node in _nodes(batch):
        if not isinstance(node, (list, tuple)) or len(node) < 2:
            continue
        if all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == len(node) for t in node):
            warn(
                f"A batch holds a {type(node).__name__} of {len(node)} tensors of {len(node)} rows each, "
                f"read as {len(node)} tensors of the batch's examples' rows, each cut into examples. If it holds one "
                f"tensor per example instead (an image's targets), its scores are wrong: pad those into one tensor "
                f"with a row per example (`boxes [B, M, 4]` and a count `[B]`).",
                UserWarning,
            )
            return


def _nodes(tree: Any) -> Iterator[Any]:
    """Every container inside ``tree`` (not ``tree`` itself), depth first."""
    inner = tree.values() if isinstance(tree, Mapping) else tree if isinstance(tree, (list, tuple)) else ()
    for value in inner:
        if isinstance(value, (Mapping, list, tuple)):
            yield value
            yield from _nodes(value)


def _first_not_a_row(batch: Batch) -> str:
    """Where the first leaf of ``batch`` that is no tensor of rows sits, when it is nested (a list of strings inside a
    dict), for the batch's error."""
    paths, leaves, _ = optree.tree_flatten_with_path(batch, none_is_leaf=True)
    for path, leaf in zip(paths, leaves):
        if len(path) > 1 and not (isinstance(leaf, torch.Tensor) and leaf.dim() > 0):
            return f" (the first not one: `batch{''.join(f'[{step!r}]' for step in path)}`, a {type(leaf).__name__})"
    return ""


def _object_hint(leaves: Sequence[Any]) -> str:
    """For a batch held by an object (a dataclass, a plain class), which is one leaf: how to pass its tensors."""
    held = (dataclasses.is_dataclass(x) or hasattr(x, "__dict__") and not callable(x) for x in leaves
            if not isinstance(x, (torch.Tensor, type)))  # fmt: skip
    if not any(held):
        return ""
    return (
        " An object holding the batch's tensors (a dataclass) is one value to the library: pass them as a dict "
        "(`dataclasses.asdict(batch)`, `vars(batch)`), read by key in a `tc.BatchLoss` / `tc.ExampleLoss`."
    )


def check_batch_structure(batch: Batch, where: str, *, needs_target: bool) -> None:
    """A criterion needs ``(x1, ..., xk, y)``; a per-example loss takes any structure."""
    if not needs_target:
        return
    if isinstance(batch, Mapping):
        raise TypeError(
            f"{where}: a dict batch (keys {list(batch)[:6]}) needs a per-example loss; wrap your loss as "
            f"`tc.ExampleLoss(lambda params, batch: ...)`, or pass tuples `(x1, ..., xk, y)` (a batch given alone "
            f"holds a tensor at its top level: `(inputs, y)` with a dict of inputs reads as batches, one the dict; "
            f"give it as `[batch]`)."
        )
    if not isinstance(batch, (tuple, list)):
        hint = _object_hint([batch])
        raise TypeError(f"{where}: expected a batch `(x1, ..., xk, y)`, got {type(batch).__name__}.{hint}")
    if len(batch) < 2:
        raise ValueError(
            f"{where}: a batch of {len(batch)} element has no target; pass `(x1, ..., xk, y)` with the target last "
            f"(the model gets `x1..xk`)."
        )


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of every tensor of ``batch``."""
    return optree.tree_map(lambda t: t[start:stop], batch, none_is_leaf=True)


BatchSize = Union[int, Callable[[int], int]]  # examples per batch, or remaining examples -> the next batch's size


def iter_batches(data: Any, batch_size: BatchSize, where: str) -> Iterator[Batch]:
    """Yield batches of ``data`` in order: a single batch is cut into slices and a ``Dataset`` read in batches of
    ``batch_size`` (a callable is asked before each batch: the automatic size is known once the first batch is
    planned), a ``DataLoader`` or any other iterable of batches is used as is."""
    if is_single_batch(data):
        for rows in _row_ranges(batch_size_of(data, f"`{where}`"), batch_size):
            yield slice_batch(data, rows.start, rows.stop)
        return
    repeated = data if isinstance(data, Repeated) else None
    data = data.data if repeated is not None else data
    if type(data) is TensorDataset:  # its rows sliced, as its items collated give them (read row by row, a
        for rows in _row_ranges(len(data), batch_size):  # 200,000 examples' self-influence took 1.85x as long)
            yield [t[rows.start : rows.stop] for t in data.tensors]
        return
    if _map_style(data):
        size = _sized(data)
        if size is None:
            raise TypeError(
                f"`{where}` is a Dataset without `__len__` ({type(data).__name__}): its examples cannot be counted "
                f"or read in batches. Define `__len__` (its number of examples), or pass an iterable of batches."
            )
        batches = (list(rows) for rows in _row_ranges(size, batch_size))
        data = DataLoader(data, batch_sampler=batches, generator=torch.Generator())  # read lazily, in order
    if isinstance(data, DataLoader):
        check_stable_order(data, where)
    if _holds_numpy(data):
        raise TypeError(
            f"`{where}` holds numpy arrays; convert them with `torch.from_numpy(a)` (e.g. "
            f"`tuple(map(torch.from_numpy, arrays))`)."
        )
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"`{where}` must be a batch `(x1, ..., xk, y)`, a Dataset, a DataLoader or an iterable of batches; "
            f"got {type(data).__name__}.{_object_hint([data])}"
        )
    batches = _opened(data)
    batches = map(as_dict, _collated(batches if repeated is None else repeated.checked(batches, where), where))
    streams = isinstance(data, DataLoader) and isinstance(data.dataset, torch.utils.data.IterableDataset)
    yield from _as_declared(batches, data, where) if streams else batches


def _as_declared(batches: Iterator[Batch], loader: DataLoader, where: str) -> Iterator[Batch]:
    """The batches of a DataLoader over an ``IterableDataset``, refused once they pass the length it declares, or at
    the pass's end where they fall short: a dataset that does not split its examples among the loader's workers
    (``get_worker_info``) gives each worker all of them, each example scored once per worker (silently, before
    2026-12-07; a review helper's)."""
    of_examples, declared, got = loader.batch_size is not None, _sized(loader.dataset), 0
    for batch in batches:
        got += batch_size_of(batch, f"`{where}`'s batches") if of_examples else 1
        if declared is not None and got > declared:
            _refuse_declared(loader.dataset, declared, f"more than {declared}", of_examples, where, loader.num_workers)
        yield batch
    if declared is not None and got != declared:
        _refuse_declared(loader.dataset, declared, f"{got}", of_examples, where, loader.num_workers)


def _refuse_declared(sized: Any, declared: int, got: str, of_examples: bool, where: str, workers: int = 0) -> None:
    what = "examples" if of_examples else "batches (its items: each one a batch, as it is read)"
    split = (
        f" Read by {workers} workers, an IterableDataset gives each of them all its examples unless its `__iter__` "
        f"splits them (by `torch.utils.data.get_worker_info()`)."
        if workers > 1
        else ""
    )
    raise ValueError(
        f"`{where}` declares a length of {declared} (`__len__` of its {type(sized).__name__}) but its iteration "
        f"yielded {got} {what}.{split} Make `__len__` return the number of items its iteration yields."
    )


# the DataLoader iterators of the running call (``closing_workers``): their worker processes, shut down where it fails
_OPENED: ContextVar[list[Any] | None] = ContextVar("_OPENED", default=None)


def _opened(data: Any) -> Iterator[Any]:
    """``iter(data)``, noted for the running call where it starts worker processes (``closing_workers``)."""
    batches = iter(data)
    opened = _OPENED.get()  # (the iterator's own flag: a loader wrapped by another iterable keeps its persistent ones)
    if opened is not None and hasattr(batches, "_shutdown_workers") and not getattr(batches, "_persistent_workers", 1):
        opened.append(batches)
    return batches


@contextmanager
def closing_workers() -> Iterator[None]:
    """A call's scope: where it fails, the worker processes of the DataLoaders it read are shut down (the error's
    traceback keeps the iterators, and they their workers, until collected: a failed call left them running; a review
    helper's). A DataLoader's ``persistent_workers`` are its own to keep."""
    token = _OPENED.set([])
    try:
        yield
    except BaseException:
        for batches in _OPENED.get() or ():
            batches._shutdown_workers()
        raise
    finally:
        _OPENED.reset(token)


def _collated(batches: Iterator[Any], where: str) -> Iterator[Any]:
    """``batches``, with a DataLoader's default collate failing on a Dataset's items named as ``where``'s."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except TypeError as err:
            if not str(err).startswith("default_collate"):
                raise
            raise TypeError(
                f"`{where}`: {err}. A Dataset's items must be tensors, or tuples / lists / dicts of them: return one "
                f"from `__getitem__` (a dataclass's fields as a dict), or give a DataLoader whose `collate_fn` builds "
                f"such batches."
            ) from err
        except RuntimeError as err:  # (torch.stack's, inside the default collate: a tokenized text's items)
            if not str(err).startswith("stack expects each tensor to be equal size"):
                raise
            raise ValueError(
                f"`{where}`: its Dataset's items differ in shape ({err}), so they cannot be stacked into batches. Give "
                f"a DataLoader whose `collate_fn` pads them (with `shuffle=False`), or pass `batch_size=1`."
            ) from err
        yield batch


class Replayed:
    """A one-pass iterator of batches whose first batch may be read before the pass (planning reads the training
    data's first examples when a single test example cannot check the batching): every iteration starts with that
    batch again, then goes on with the iterator."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = batches
        self._head: list[Any] = []
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        if not self._head:
            self._head.extend(itertools.islice(self._batches, 1))
        yield from self._head
        self._passes += bool(self._head)  # (reading the first batch alone is no pass; an empty one has no second)
        if self._passes > 1:
            raise ValueError(
                "`train` is a one-pass iterator (a generator), which this call needs to read more than once: once per "
                "chunk of test examples (more than `test_memory_bytes` holds). Pass a list of batches, a Dataset or "
                "a DataLoader, or a larger `test_memory_bytes`."
            )
        yield from self._batches


class Repeated:
    """An iterable of batches that is no list, Dataset or DataLoader over one (a DataLoader over an
    ``IterableDataset``, an object whose ``__iter__`` streams), which a call may iterate more than once (planning
    reads its first batch, test examples in chunks read it all again): each pass must start with the first pass's
    first batch. One that is a single pass (``__iter__`` returning a stored iterator) started its second pass at its
    second batch, so that every score went to another example, silently; one that changes between passes (random
    augmentations) would score other examples than it planned on."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self._head: list[Any] | None = None  # the first pass's first batch (none: it held none)
        self._n: int | None = None  # the first whole pass's examples

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # (TypeError where unknown, as for the data itself)

    def checked(self, batches: Iterator[Any], where: str) -> Iterator[Any]:
        head = list(itertools.islice(batches, 1))
        if self._head is None:
            self._head = head
        elif len(head) != len(self._head) or head and not same_batch(head[0], self._head[0]):
            raise ValueError(f"`{where}` gave another first batch when iterated again{self._why_and_fix()}")
        n = 0
        for batch in itertools.chain(head, batches):
            n += batch_size_of(batch, f"`{where}`'s batches")
            yield batch
        if self._n is None:
            self._n = n
        elif n != self._n:
            raise ValueError(
                f"`{where}` gave {n} examples when iterated again, {self._n} before (an iterable that changes between "
                f"passes), and this call reads it more than once: its scores would name other examples on each pass. "
                f"Pass a list of batches, a Dataset or a DataLoader over a map-style Dataset."
            )

    def _why_and_fix(self) -> str:
        data = self.data
        if isinstance(data, DataLoader) and _map_style(data.dataset):  # (with a sampler of the user's: ``replayable``)
            sampler = next(s for s in loader_samplers(data) if not _ordered(s))
            given = "batch_sampler" if sampler is data.batch_sampler else "sampler"
            return (
                f", and this call reads it more than once: a DataLoader whose {given} ({type(sampler).__name__}) is "
                f"not torch's sequential one or a list is checked to give the same batches on every pass (one "
                f"drawing at random would give each pass's scores to other examples). Pass its order as a list, "
                f"drawn once (`{given}=list(your_{given})`), which a Dataset augmenting at random may then read as "
                f"it does with torch's samplers."
            )
        return (
            " (an iterable that is a single pass, such as one whose `__iter__` returns a stored iterator, or one that "
            "changes between passes), and this call reads it more than once. Pass a list of batches, a Dataset, a "
            "DataLoader over a map-style Dataset, or the iterator itself (`iter(data)`: read once, its first batch "
            "kept)."
        )


def same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold equal values in one structure."""
    leaves, spec = optree.tree_flatten(a, none_is_leaf=True)
    others, other_spec = optree.tree_flatten(b, none_is_leaf=True)
    return _same_structure(a, spec, b, other_spec) and all(map(_same_leaf, leaves, others))


def _same_structure(a: Any, spec: Any, b: Any, other_spec: Any) -> bool:
    """Whether batches ``a`` and ``b`` (of treespecs ``spec`` and ``other_spec``) are of one structure, their dicts'
    keys in one order: optree's treespecs are equal for dicts of the same keys in any order (a loss reading a dict's
    values by position, ``a, c, y = batch.values()``, was given a training batch joined to a test batch in the test's
    key order: 64% off)."""
    return spec == other_spec and _key_orders(a) == _key_orders(b)


def _key_orders(tree: Any) -> list[tuple[Any, ...]]:
    """The keys of every mapping in ``tree``, in order, depth first."""
    if isinstance(tree, Mapping):
        return [tuple(tree), *(order for value in tree.values() for order in _key_orders(value))]
    if isinstance(tree, (list, tuple)):
        return [order for value in tree for order in _key_orders(value)]
    return []


def _same_leaf(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and same_values(x, y)
    return x is y or x == y


def same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``x`` and ``y`` hold the same values in one shape and dtype, NaN where the other holds NaN (a NaN
    feature read again, a NaN buffer)."""
    x, y = x.detach(), y.detach()
    if x.shape != y.shape or x.dtype != y.dtype or x.layout != y.layout:
        return False
    if x.is_sparse:  # (a sparse buffer: its entries where it has them)
        x, y = x.coalesce(), y.coalesce()
        return same_values(x.indices(), y.indices()) and same_values(x.values(), y.values())
    if x.layout != torch.strided:
        x, y = x.to_dense(), y.to_dense()
    if x.is_floating_point() or x.is_complex():
        return torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)
    return torch.equal(x, y)


def sized_automatically(data: Any) -> bool:
    """Whether the automatic batch size cuts ``data`` into batches: a batch or a map-style ``Dataset`` (a loader's or
    another iterable's batches are the user's)."""
    return is_single_batch(data) or _map_style(data)


def replayable(data: Any) -> Any:
    """``data``, a one-pass iterator wrapped so that its first batch can be read twice (``Replayed``), and any other
    iterable that is not known to give the same batches on every pass wrapped to check that it does (``Repeated``)."""
    if isinstance(data, Iterator):
        return Replayed(data)
    mapped = _map_style(data)
    loads_mapped = (
        isinstance(data, DataLoader)
        and not isinstance(data.dataset, torch.utils.data.IterableDataset)
        and all(map(_ordered, loader_samplers(data)))
    )
    plain = is_single_batch(data) or isinstance(data, (tuple, list, Mapping, torch.Tensor)) or mapped or loads_mapped
    return data if plain or not isinstance(data, Iterable) else Repeated(data)


def _row_ranges(n: int, batch_size: BatchSize) -> Iterator[range]:
    start = 0
    while start < n:
        stop = min(n, start + (batch_size(n - start) if callable(batch_size) else batch_size))
        yield range(start, stop)
        start = stop


def count_batches(n: int, batch_size: BatchSize) -> int:
    """Batches that ``n`` examples take at ``batch_size`` as it stands."""
    return sum(1 for _ in _row_ranges(n, batch_size))


def _holds_numpy(data: Any) -> bool:
    elements = data.values() if isinstance(data, Mapping) else data if isinstance(data, (tuple, list)) else [data]
    return any(type(x).__module__ == "numpy" for x in elements)


_SHUFFLING_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _ordered(sampler: Any) -> bool:
    """Whether ``sampler`` gives one order on every pass: torch's sequential ones (not a subclass, which may shuffle)
    and sequences. A DataLoader with another (the user's own, which may draw at random) is checked on every pass as
    any other iterable (``Repeated``)."""
    return type(sampler) in (SequentialSampler, BatchSampler) or isinstance(sampler, (list, tuple, range))


def check_stable_order(loader: DataLoader, where: str) -> None:
    """Refuse a DataLoader whose iteration order changes between passes (a shuffling sampler, workers' batches out of
    order) or that drops examples: result index ``j`` is the j-th example in iteration order, and every example must
    be scored. A BatchSampler may also come as the ``sampler`` (with ``batch_size=None``), around another."""
    if getattr(loader, "in_order", True) is False and loader.num_workers > 0:
        raise ValueError(
            f"`{where}` is a DataLoader with `in_order=False`: its workers' batches come as they finish, so result "
            f"indices would name different examples on every pass (silently, before 2026-12-07). Pass `in_order=True` "
            f"(the default)."
        )
    chain = list(loader_samplers(loader))
    shuffling = (s for s in chain if isinstance(s, _SHUFFLING_SAMPLERS) or getattr(s, "shuffle", False) is True)
    sampler = next(shuffling, None)
    if sampler is not None:  # (a bucketing batch sampler may shuffle its batches around a sequential one)
        raise ValueError(
            f"`{where}` is a DataLoader that shuffles ({type(sampler).__name__}): result indices would name "
            f"different examples on every pass. Pass a DataLoader with `shuffle=False` and a sequential sampler, or "
            f"the Dataset itself."
        )
    size = _sized(chain[-1])
    if loader.drop_last and (size is None or isinstance(loader.dataset, torch.utils.data.IterableDataset)):
        raise ValueError(
            f"`{where}` is a DataLoader with `drop_last=True` over data of unknown size (an IterableDataset), which "
            f"may leave out its last examples. Pass `drop_last=False` so that every example is scored."
        )
    for batches, inner in zip(chain, chain[1:]):  # each BatchSampler and what it batches
        dropped = _sized(inner) % batches.batch_size if batches.drop_last and _sized(inner) is not None else 0
        if dropped:
            raise ValueError(
                f"`{where}` is a DataLoader with `drop_last=True`, which leaves out its last {dropped} examples. "
                f"Pass `drop_last=False` so that every example is scored."
            )


def loader_samplers(loader: DataLoader) -> Iterator[Any]:
    """A DataLoader's batch sampler (a BatchSampler may also come as the ``sampler``, with ``batch_size=None``), and
    while it is a BatchSampler, the sampler it batches (a batch sampler may have no length: not read for truth)."""
    return sampler_chain(loader.sampler if loader.batch_sampler is None else loader.batch_sampler)


def sampler_chain(sampler: Any) -> Iterator[Any]:
    """``sampler``, and while it is a BatchSampler, the sampler it batches."""
    yield sampler
    while isinstance(sampler, BatchSampler):
        sampler = sampler.sampler
        yield sampler


def _map_style(data: Any) -> bool:
    """Whether ``data`` is a Dataset read by index (not an ``IterableDataset``)."""
    return isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset)


def _sized(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def num_batches(data: Any, batch_size: BatchSize) -> int | None:
    """Number of batches ``iter_batches`` yields, when known without iterating (for progress bars)."""
    if is_single_batch(data) or _map_style(data):
        n = num_examples(data)
        return None if n is None else count_batches(n, batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def num_examples(data: Any) -> int | None:
    """Number of examples in ``data`` when known without iterating (a single batch or a sized Dataset)."""
    if is_single_batch(data):
        sizes = [t.shape[0] for t in optree.tree_leaves(data) if isinstance(t, torch.Tensor) and t.dim()]
        return sizes[0] if sizes else None
    if _map_style(data):
        return _sized(data)
    return None


def known_examples(data: Any) -> int | None:
    """Number of examples in ``data`` where known for certain before reading it: a single batch or a sized Dataset
    (``num_examples``), a list or tuple of batches (their rows), a DataLoader batching a sized Dataset in order with
    torch's own collation (one row per item). Results then take their place as they come (no second copy)."""
    n = num_examples(data)
    if n is not None:
        return n
    if isinstance(data, (list, tuple)):
        try:
            return sum(batch_size_of(as_dict(batch), "") for batch in data)
        except (TypeError, ValueError):  # (named where the batch is read)
            return None
    torch_batching = isinstance(data, DataLoader) and data.batch_size is not None and not data.drop_last
    if torch_batching and data.collate_fn is default_collate and type(data.sampler) is SequentialSampler:
        return _sized(data.dataset) if _map_style(data.dataset) else None
    return None


def check_counted(written: int, n: int, where: str) -> None:
    """Raise where data counted as ``n`` examples before it was read (``known_examples``) gave ``written``."""
    if written != n:
        raise ValueError(
            f"`{where}` gave {written} examples but was counted as {n} before it was read (a DataLoader's by its "
            f"dataset's `__len__`): make `__len__` the number of examples it yields."
        )


COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}  # complex tensors follow ``dtype=``


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None, copy: bool = False) -> Batch:
    """Move every tensor to ``device``; cast floating tensors to ``dtype`` when given, complex ones to its complex
    dtype (integers stay integers); ``copy``: new tensors even where nothing changes.
    Detached: inputs that require grad (features of a backbone) or carry a forward-mode tangent would tie the scores
    to their graph or give them a tangent (wrong on the factored path)."""

    complex_dtype = COMPLEX.get(dtype)

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()  # (a graph's, or forward-mode AD's tangent: read as values)
        if t.is_inference():  # (a frozen backbone's features made under inference_mode: no version counter to read)
            t = t.clone()
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype, copy=copy)
        if complex_dtype is not None and t.is_complex():
            return t.to(device=device, dtype=complex_dtype, copy=copy)
        return t.to(device=device, copy=copy)

    return optree.tree_map(move, batch, none_is_leaf=True)


def sequential_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """``dataset`` in an unshuffled ``DataLoader`` with its own generator, so iterating never draws from the global
    RNG (a DataLoader otherwise takes a seed from it on every iteration)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())


def nbytes(tree: Any) -> int:
    """The bytes of the tensors in ``tree``."""
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def examples_in(batch: Batch) -> int:
    """Examples in one batch (``batch_size_of`` checked it): its first tensor's leading size, also where no tensor is
    at its top level (``((x1, x2), (y1, y2))`` from a DataLoader's collate_fn), which ``num_examples`` takes for many
    batches."""
    return next((t.shape[0] for t in optree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()), 0)


def rows_of(data: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of sized data: a batch or a ``TensorDataset`` is sliced, a ``Dataset`` becomes a
    ``Subset``."""
    if is_single_batch(data):
        return slice_batch(data, start, stop)
    if type(data) is TensorDataset:
        return TensorDataset(*(t[start:stop] for t in data.tensors))
    return Subset(data, range(start, stop))


def counted_examples(data: Any, where: str) -> int:
    """The examples of an iterable of batches of no known size (an ``IterableDataset``, a ``DataLoader``, a list of
    batches), counted by one pass over it; a length it declares is checked against that pass: torch's convention,
    the items it yields (a DataLoader over an ``IterableDataset``: the dataset's examples; any other iterable: its
    batches, as it is read)."""
    n = batches = 0
    for i, batch in enumerate(iter_batches(data, 1, where)):
        n += batch_size_of(batch, f"`{where}` batch {i}")
        batches += 1
    inner = data.data if isinstance(data, Repeated) else data
    if isinstance(inner, DataLoader) and not isinstance(inner.dataset, torch.utils.data.IterableDataset):
        return n  # (a map-style dataset read through its sampler: a subset of it is no change)
    of_examples = isinstance(inner, DataLoader) and inner.batch_size is not None  # (batching its dataset's examples)
    sized = inner.dataset if of_examples else inner
    declared, got = _sized(sized), n if of_examples else batches
    if declared is not None and declared != got:
        _refuse_declared(sized, declared, f"{got}", of_examples, where)
    return n


class RowStream:
    """Rows of an iterable of batches of ``n`` examples (``counted_examples``), as ranges in order: a range at or after
    the last one read continues the pass (its batches cut to it), an earlier one starts another pass, so that an index
    build reads the data once to check its finished shards and once to build the others, not once per shard. A pass
    that yields fewer examples than a range asks, or more than ``n``, is refused: the data changed since it was
    counted, and its rows would go to other examples' shards."""

    def __init__(self, data: Any, n: int, where: str) -> None:
        self.data, self.n, self.where = data, n, where
        self._pass: tuple[Iterator[Any], int] | None = None  # the batches left, and the rows read before them
        self._held: tuple[Batch, int] | None = None  # a batch read in part, and the row it starts at
        self._read = 0  # the row after the last one given

    def rows(self, start: int, stop: int) -> Iterator[Batch]:
        if self._pass is None or start < self._read:
            self._pass, self._held = (iter(iter_batches(self.data, 1, self.where)), 0), None
        (batches, offset), held, self._pass = self._pass, self._held, None  # (a pass left unfinished is not continued)
        while held is not None or offset < stop:
            if held is None:
                batch = next(batches, None)
                if batch is None:
                    self._changed(f"{offset}")
                held, offset = (batch, offset), offset + batch_size_of(batch, f"`{self.where}`'s batches")
            batch, first = held
            low, high = max(start, first), min(stop, offset)
            if low < high:
                yield slice_batch(batch, low - first, high - first)
            if offset > stop:
                break
            held = None
        if offset > self.n or stop == self.n and any(batch_size_of(b, f"`{self.where}`'s batches") for b in batches):
            self._changed(f"more than {self.n}")
        self._pass, self._held, self._read = (batches, offset), held, stop

    def _changed(self, got: str) -> None:
        raise ValueError(
            f"`{self.where}` yielded {got} examples when read again, but {self.n} when its size was counted: an "
            f"iterable that changes between passes cannot be indexed (its rows would go to other examples' shards). "
            f"Pass data that gives the same examples on every pass (a Dataset, a list of batches)."
        )


def distinct_examples(batch: Batch, k: int, *, widest_only: bool = False) -> list[int]:
    """Indices of ``batch``'s first example and of the next ones unlike every one taken, up to ``k``, those that
    span how far its padding varies first, then those padded unlike the ones taken (``padding``): unlike in its
    widest tensors (most elements per example: the model's inputs, rather than a label or an index), else in any.
    Examples run together that all are equal show no more of how a model batches them than one does (centring over
    the batch gives them what it gives one alone), nor do examples that differ only in their labels (centring the
    inputs), nor, of a model that reads the padding a longer example adds, examples of one length. ``widest_only``:
    no fallback to the other tensors."""
    rows, widest = _rows(batch)
    padded = padded_rows(batch)
    taken = _unlike_rows(widest or rows, k, padded)
    return taken if len(taken) > 1 or widest_only else _unlike_rows(rows, k, padded)


def padding(batch: Batch) -> dict[tuple[str, str], torch.Tensor]:
    """``{column: [B]}``: each example's padding, as far as the data shows it: every signal that may show it, each a
    column named by how and where it is read (so that batches of one structure name theirs alike; the batching check
    follows each on its own, so a signal that is no padding costs a check at most, never a score): the zeros at the
    start and at the end of a dict batch's attention masks (Hugging Face's ``attention_mask``,
    ``decoder_attention_mask``: ``("said start", key)``; the side padded may change), the ones of each mask found
    among the other tensors (integer or boolean 0 / 1, wider than one per example, every row ones then zeros or zeros
    then ones: token type ids of pairs too), and the runs of equal values (NaN too) at both ends of every tensor wider
    than one per example, and of the widest (whatever the padding id and side: equal for examples of one length; 1
    mostly, unpadded; ``_ends``; a named mask's tensors too: it may not say all their padding); and the lengths each
    ``[B]`` tensor may hold (``("told", where)``, ``_length``: beside clips padded so that no run shows it)."""
    named = {k: t for k, t in batch.items() if str(k).endswith("attention_mask")} if isinstance(batch, Mapping) else {}
    said = {}
    if named and all(isinstance(t, torch.Tensor) and t.dim() == 2 and _is_mask(t) for t in named.values()):
        for k, t in named.items():  # (a mask's zeros at an end: what follows its ones)
            said[("said start", str(k))], said[("said end", str(k))] = _run(t, first=True), _run(t)
        batch = {k: t for k, t in batch.items() if k not in named}
        if not optree.tree_leaves(batch):
            return said
    rows, widest = _rows(batch)
    paths, leaves = optree.tree_paths(batch, none_is_leaf=True), optree.tree_leaves(batch, none_is_leaf=True)
    found = [(p, r) for p, r in zip(paths, rows) if r.shape[1] > 1 and _is_mask(r)]
    columns = {("mask", str(p)): r.to(torch.int64).sum(1) for p, r in found}
    width = max((t.shape[1] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 1), default=0)
    keyed = isinstance(batch, Mapping)
    lengths = {p: _length(r, width) for p, r in zip(paths, rows) if r.shape[1] == 1 and _may_be_lengths(p, keyed)}
    columns |= {("told", str(p)): n for p, n in lengths.items() if n is not None}
    for p, t, r in zip(paths, leaves, rows):
        ends = _ends(t) if r.shape[1] > 1 or any(r is w for w in widest) else {}
        columns |= {(how, str(p)): run for how, run in ends.items()}
    none = {("none", ""): torch.zeros(len(rows[0]), dtype=torch.int64, device=rows[0].device)}
    return {**said, **columns} or none


def _ends(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{how: [B]}``: the runs at both ends of each example of ``t`` ``[B, ...]``: of its entries, flattened, for
    two dimensions or less; of its whole positions for more (``[B, T, d]`` padded with a vector), and of each of a
    few items along dimension 1 on its own (``[B, k, T]`` pairs or choices, ``[B, k, T, d]``: a sum may stay within
    a range while one item's padding goes beyond it), or of its lines along the last dimension (many): their sum,
    least and most (ten choices flattened and cut to the longest: the least tells it, the sum may not)."""
    if t.dim() <= 2 or t.shape[1] == 1:
        rows = t.reshape(len(t), -1)
        return {side: _end_run(rows, side == "start") for side in _SIDES}
    ends = {f"positions {side}": _position_run(t, side == "start") for side in _SIDES}
    if t.shape[1] <= _FEW_ITEMS:
        return ends | {f"item {i} {how}": run for i in range(t.shape[1]) for how, run in _ends(t[:, i]).items()}
    lines = t.flatten(0, -2)  # (a copy, once, where the items are a view)
    for side in _SIDES:
        runs = _end_run(lines, side == "start", tail=4).view(len(t), -1)  # (a line of one entry: a run of 1)
        ends |= {f"lines {side}": runs.sum(1), f"lines {side} least": runs.amin(1), f"lines {side} most": runs.amax(1)}
    return ends


_SIDES = ("start", "end")
_FEW_ITEMS = 8  # items along dimension 1 followed each on its own


def padded_rows(batch: Batch) -> torch.Tensor:
    """``[B, k]``: the columns of ``padding``, side by side."""
    return torch.stack(list(padding(batch).values()), 1)


def _may_be_lengths(path: tuple, in_dict: bool) -> bool:
    """Whether the ``[B]`` tensor at ``path`` may hold lengths: any of a tuple's (its target is left out), a dict's
    named so: a length, a size, a count or a number (``lengths``, ``wav_lens``, ``seq_sizes``, ``frame_count``,
    ``num_frames``, ``n_samples``; not ``labels``, ``start_positions``)."""
    key = str(path[0]).lower()
    return not in_dict or key.startswith("n_") or any(word in key for word in ("len", "size", "count", "num"))


def _length(rows: torch.Tensor, width: int) -> torch.Tensor | None:
    """``[B]``: the lengths ``rows`` ``[B, 1]`` may hold, or None: integers from 0 to ``width`` (not an index into a
    larger dataset), or fractions of it from 0 to 1 (SpeechBrain's relative lengths: on ``width + 1`` levels)."""
    if rows.is_complex() or rows.dtype == torch.bool or not bool(((rows >= 0) & (rows <= width)).all()):
        return None
    if not rows.is_floating_point():
        return rows[:, 0]
    return (rows[:, 0] * width).round().long() if bool((rows <= 1).all()) else None


def _is_mask(rows: torch.Tensor) -> bool:
    """Whether ``rows`` ``[B, n]`` look like an attention mask: 0 / 1 integers, each row ones then zeros (or zeros
    then ones), some one in every row."""
    if rows.is_floating_point() or not bool((rows.eq(0) | rows.eq(1)).all()) or not bool(rows.any(1).all()):
        return False
    steps = rows[:, 1:].to(torch.int8) - rows[:, :-1].to(torch.int8)
    return bool((steps <= 0).all()) or bool((steps >= 0).all())


def _position_run(t: torch.Tensor, first: bool) -> torch.Tensor:
    """``[B]``: how many positions (``t[:, i]``, whole) at the start (``first``) or the end of each example of ``t``
    equal the one there (NaN too), read 4 at a time first (100 images ``[3, 32, 32]``: a channel's rows compared 4 at
    a time, not 32)."""
    return _end_run(t.flatten(2), first, tail=4)


def _end_run(rows: torch.Tensor, first: bool, tail: int = 64) -> torch.Tensor:
    """``[B]``: how many entries (``rows`` ``[B, n]``) or whole positions (``[B, n, d]``) at the start (``first``) or
    the end of each example equal the one there (NaN too), read in the ``tail`` there first (most rows end there),
    then in full where all of those do."""
    end = rows[:, :tail] if first else rows[:, -tail:]  # that end's entries
    run = _run(_unlike_positions(end, first) if end.dim() > 2 else _unlike_end(end, first), first)
    longer = run == end.shape[1]
    if end.shape[1] < rows.shape[1] and bool(longer.any()):
        run[longer] = _end_run(rows[longer], first, rows.shape[1])
    return run


def _unlike_positions(x: torch.Tensor, first: bool) -> torch.Tensor:
    """``[B, n]``: whether each whole position ``x[:, i]`` (``[B, n, d]``) differs from the one at the start (``first``)
    or the end, read in its first ``_PROBED`` entries first (an image's channels, a token's embedding differ there),
    in full for the examples whose position next to that one matched there: the run is 1 wherever that one differs,
    whatever the others (200 images ``[3, 32, 32]``, both ends: 0.12 against 2.8 ms read in full)."""
    unlike = _unlike_end(x[:, :, :_PROBED], first).any(2)
    if x.shape[1] > 1 and x.shape[2] > _PROBED:
        matched = ~unlike[:, 1 if first else -2]
        if bool(matched.any()):
            unlike[matched] = _unlike_end(x[matched], first).any(2)
    return unlike


_PROBED = 8


def _unlike_end(x: torch.Tensor, first: bool) -> torch.Tensor:
    """Where ``x`` ``[B, n, ...]`` differs from its first (``first``) or last entry along dimension 1 (NaN padding
    runs like any value)."""
    last = x[:, :1] if first else x[:, -1:]
    unlike = x != last
    if x.is_floating_point() and bool(last.isnan().any()):
        unlike &= ~(x.isnan() & last.isnan())
    return unlike


def _run(unlike: torch.Tensor, first: bool = False) -> torch.Tensor:
    """``[B]``: the entries of each row of ``unlike`` ``[B, n]`` (bool, or a 0 / 1 mask) before its first (``first``)
    or after its last True or 1 (all ``n`` where none is): a run at an end, a mask's zeros there. That one's place
    as the most of its row times places counted from the other end (int32, no flipped copy): 3x faster than counting
    the zeros of a cumulative sum (``[200, 3072]``: 0.55 against 1.6 ms)."""
    n = unlike.shape[1]
    if n == 0:
        return torch.zeros(len(unlike), dtype=torch.int64, device=unlike.device)
    step = (n, 0, -1) if first else (1, n + 1, 1)
    places = torch.arange(*step, dtype=torch.int32, device=unlike.device)
    return (n - (unlike * places).amax(1)).long()


def _rows(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batch's tensors as rows ``[B, *]``, and those of them with the most elements per example."""
    rows = [t.flatten(1) if t.dim() > 1 else t[:, None] for t in optree.tree_leaves(batch, none_is_leaf=True)]
    most = max(r.shape[1] for r in rows)
    return rows, [r for r in rows if r.shape[1] == most and most > 0]


def _unlike_rows(rows: list[torch.Tensor], k: int, padded: torch.Tensor) -> list[int]:
    """The first row and the next ones unlike every one taken in some of ``rows`` (``[B, *]`` each), up to ``k``:
    first those at an end of the range of a ``padded`` column (``[B, c]``) that the ones taken fall short of (the
    first of those at the most such ends), so that a check spans how far the batch's padding varies, then those
    whose ``padded`` row is unlike every one taken."""
    taken, unlike = [0], torch.ones(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
    low, high = padded.min(0).values, padded.max(0).values
    while len(taken) < k:
        unlike &= torch.stack([(r != r[taken[-1]]).any(1) for r in rows]).any(0)  # (NaN differs: another example)
        if not bool(unlike.any()):
            break
        short = ((padded == low) & (padded[taken].min(0).values > low)) | (
            (padded == high) & (padded[taken].max(0).values < high)
        )
        ends = short.sum(1) * unlike  # (the most at once: four examples may need to span many ranges)
        if bool(ends.any()):
            taken.append(int(ends.argmax()))
            continue
        new = unlike & (padded[:, None] != padded[taken][None]).any(2).all(1)
        taken.append(int(next(c for c in (new, unlike) if bool(c.any())).nonzero()[0]))
    return taken


def uncopied_rows(batch: Batch) -> list[int]:
    """The indices of the examples of ``batch`` that no earlier one equals in every tensor (NaN differs)."""
    rows = [t.flatten(1) if t.dim() > 1 else t[:, None] for t in optree.tree_leaves(batch)
            if isinstance(t, torch.Tensor) and t.dim()]
    kept: list[int] = []
    for i in range(examples_in(batch)):
        if not any(all(bool((r[i] == r[j]).all()) for r in rows) for j in kept):
            kept.append(i)
    return kept


def extreme_rows(batch: Batch) -> torch.Tensor:
    """The indices of the examples of ``batch`` at an end of the range of some column of its ``padding`` (the first
    of each), in order: they span every range the whole batch does."""
    columns = padded_rows(batch)
    return torch.cat([columns.argmin(0), columns.argmax(0)]).unique()


def joined_rows(first: Batch, then: Batch) -> Batch | None:
    """The examples of batch ``first`` followed by those of batch ``then``, or None where they are not alike
    (another structure, dtype, device or shape beyond the batch dimension: padded to another width)."""
    leaves, spec = optree.tree_flatten(first, none_is_leaf=True)
    others, other_spec = optree.tree_flatten(then, none_is_leaf=True)
    alike = _same_structure(first, spec, then, other_spec) and all(
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dim() > 0
        and (a.dtype, a.device, a.shape[1:]) == (b.dtype, b.device, b.shape[1:])
        for a, b in zip(leaves, others)
    )
    return optree.tree_unflatten(spec, [torch.cat(pair) for pair in zip(leaves, others)]) if alike else None


def select_rows(data: Any, indices: torch.Tensor) -> Any:
    """Examples ``indices`` (in that order) of sized data: a ``Dataset``, or a batch (also one whose top level holds no
    tensor, ``((x1, x2), (y1, y2))``, which ``is_single_batch`` cannot tell from a list of batches)."""
    if isinstance(data, Dataset):
        return Subset(data, indices.tolist())
    return optree.tree_map(lambda t: t[indices.to(t.device)], data, none_is_leaf=True)
