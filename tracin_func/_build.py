"""Building an index: embed every training example once, shard by shard, crash-safe and resumable, on one process
or across ``torch.distributed`` ranks (shard ``i`` is built by rank ``i % W``)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import optree
import torch
from tqdm.auto import tqdm

from ._api import _check_options
from ._checkpoints import Checkpoint
from ._context import in_own_context
from ._data import RowStream, as_dict, counted_examples, iter_batches, num_examples, replayable, rows_of
from ._distributed import (
    Ranks,
    agree,
    check_whole,
    checked_on_every_rank,
    gather_objects,
    on_every_rank,
    set_up_on_every_rank,
)
from ._driver import embedding_parts, first_examples, naming_failures
from ._fingerprint import differences, fingerprint, tensor_bytes
from ._index import FORMAT, LAYOUT, MANIFEST, VERSION, Index, check_shard, manifest_digest, open_index, read_manifest
from ._plan import scored_names
from ._projection import projection_of
from ._setup import Setup, in_use, make_setup
from ._shards import TEMPORARY, file_and_payload_sha256, file_sha256, shard_info, shard_name, write_json, write_shard
from ._validate import boolean, positive_int

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._api import Options

SHARD_BYTES = 1 << 28  # default shard size: about 256 MB of embeddings
STORAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _embedded_names(setup: Setup, train: Any) -> Sequence[str]:
    """The parameters whose gradients the embeddings hold, as the shards' plans choose them (the last layer: on the
    first example, which plans the first shard)."""
    if setup.method != "last_layer":
        return setup.spec.diff_names
    head = first_examples(setup, train, "train")
    with in_use(setup), naming_failures(setup.train_loss, setup, head, "train", 0):
        return scored_names(setup, head)


def _plan_manifest(
    setup: Setup, names: Sequence[str], loss_fn: Any, n: int, shard_size: int | None, storage_dtype: torch.dtype
) -> dict[str, Any]:
    """The manifest of an index still being built (``complete: false``, no shard list yet) whose embeddings hold the
    gradients of ``names``; shards of about ``SHARD_BYTES`` of embeddings unless ``shard_size`` is given."""
    state = setup.checkpoints[0].state
    k = setup.projection[0] if setup.projection else sum(state[name].numel() for name in names)
    dim = len(setup.checkpoints) * k
    prints = fingerprint(setup, loss_fn)
    layout = {
        "rows": n,
        "shard_size": shard_size or max(1, min(n, SHARD_BYTES // max(1, dim * storage_dtype.itemsize))),
        "dim": dim,
        "projection": None if setup.projection is None else {"dim": setup.projection[0], "seed": setup.projection[1]},
        "storage_dtype": str(storage_dtype).replace("torch.", ""),
    }
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, **layout, "fingerprint": prints}
    return {**manifest, "digest": manifest_digest(manifest)}


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _what_differs(stored: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    found = differences(stored.get("fingerprint", {}), planned["fingerprint"])
    for key in LAYOUT:
        if stored.get(key) != planned[key]:
            found.append(f"`{key}` ({stored.get(key)!r} -> {planned[key]!r})")
    return found


def _content_digest(manifest: dict[str, Any]) -> str | None:
    """The digest of what a stored manifest says (None where it lacks a part)."""
    try:
        return manifest_digest(manifest)
    except KeyError:
        return None


def _ours(name: str) -> bool:
    base = name[: -len(TEMPORARY)] if name.endswith(TEMPORARY) else name
    return base == MANIFEST or (base.startswith("shard-") and base.endswith(".safetensors"))


def _shards_only(path: str, entries: list[str]) -> bool:
    """Whether a directory without a manifest holds index shards of this library only (readable as such)."""
    names = [name for name in entries if name != MANIFEST]
    if not all(_ours(name) and not name.endswith(TEMPORARY) for name in names):
        return False
    try:
        return all("digest" in shard_info(os.path.join(path, name)) for name in names)
    except ValueError:
        return False


def _prepare_directory(path: str, planned: dict[str, Any], overwrite: bool) -> None:
    """Make ``path`` ready for this build: new, resumed (same plan), rebuilt (a complete index of the same plan: its
    damaged shards removed) or, with ``overwrite``, replacing an index of another plan. Until the build ends the
    manifest says ``complete: false``, from before a shard is written (a complete index that needs none written again
    is left untouched). A directory that is not an index is never touched."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`path`={path!r} is a file; pass a directory for the index.")
    os.makedirs(path, exist_ok=True)
    manifest = os.path.join(path, MANIFEST)
    try:
        stored = read_manifest(path)
    except ValueError as err:
        if not _maybe_ours(path, manifest):  # (a `manifest.json` of another program)
            others = sorted(n for n in os.listdir(path) if not _ours(n))
            if others and isinstance(err.__cause__, ValueError):  # (not JSON: an index's cut short, or another's)
                raise ValueError(
                    f"`{manifest}` is not a readable index manifest ({err.__cause__}), beside files that are no "
                    f"index's ({others[:5]}): it is not told for an index's damaged manifest, and is never replaced, "
                    f"even with `overwrite=True`. Move those files out (then `overwrite=True` rebuilds the index), or "
                    f"pass a new or empty directory."
                ) from None
            never = "It is never replaced, even with `overwrite=True`: pass a new or empty directory."
            raise ValueError(f"{err} {never}") from None
        if not overwrite:
            raise
        stored = {}  # an unreadable manifest of ours: replaced, with the shards it described
    written = [n for n in os.listdir(path) if n.endswith(TEMPORARY) and _ours(n)]  # (files a killed build was
    entries = [n for n in os.listdir(path) if n not in written]  # writing: never complete, never read)
    if stored is None and entries and _shards_only(path, entries):  # its manifest lost: each shard is checked
        entries = []  # against this plan as it is resumed (``_complete``), and redone where it does not match
    if stored is None and entries:
        raise ValueError(
            f"`path`={path!r} is not empty and holds no tracin_func index ({sorted(entries)[:5]}); it is never "
            f"deleted, even with `overwrite=True`. Pass a new or empty directory."
        )
    for name in written:  # (an index's folder, or an empty one: ours to clean)
        os.remove(os.path.join(path, name))
    if stored is None or _content_digest(stored) == planned["digest"] != stored.get("digest"):  # (new; or its digest
        write_json(manifest, planned)  # alone edited, which `open_index` tells the same call to repair: resumed)
    elif stored.get("digest") != planned["digest"]:
        if not overwrite:
            found = _what_differs(stored, planned)
            raise ValueError(
                f"`path`={path!r} holds an index built with other settings: {'; '.join(found) or 'its fingerprint'} "
                f"differ. Pass `overwrite=True` to replace it, or another `path`."
            )
        write_json(manifest, planned)  # first: from now on the old shards do not belong to the index
        for name in entries:
            if _ours(name) and name != MANIFEST:
                os.remove(os.path.join(path, name))
    elif stored.get("complete"):  # left as it is unless a shard is redone (``_mark_incomplete``)
        damaged = [shard["file"] for shard in stored["shards"] if _damaged(os.path.join(path, shard["file"]), shard)]
        if damaged:
            write_json(manifest, planned)
        for name in damaged:
            os.remove(os.path.join(path, name))  # redone below


def _maybe_ours(path: str, manifest: str) -> bool:
    """Whether a manifest that cannot be read as an index's may be one damaged (truncated, edited): JSON of no other
    format, beside an index's files alone (another program's ``manifest.json`` is never replaced)."""
    try:
        with open(manifest, encoding="utf-8") as f:
            content = json.load(f)
    except ValueError:  # (not JSON: cut short, say)
        content = {"format": FORMAT}
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        return False
    return all(_ours(name) for name in os.listdir(path))


def _damaged(file: str, shard: dict[str, Any]) -> bool:
    return os.path.exists(file) and file_sha256(file) != shard["sha256"]


_SHARED_WAIT_S = 10.0  # how long a rank looks for rank 0's file (a network filesystem may show it late)


def _check_shared(path: str, ranks: Ranks) -> None:
    """Refuse, on every rank, a ``path`` that is not one directory all ranks see: rank 0 writes a file of a name drawn
    for this build there and every rank looks for it (``_SHARED_WAIT_S`` at most). Ranks given folders of their own
    each built part of an index and were told to build it again, which failed alike."""
    name = f"shard-ranks-{gather_objects(secrets.token_hex(8), ranks)[0]}.safetensors{TEMPORARY}"  # (a build removes
    file = os.path.join(path, name)  # such a file, as one a killed build was writing)

    def write() -> None:
        if ranks.rank == 0:
            open(file, "wb").close()

    def look() -> None:
        waited = time.monotonic() + _SHARED_WAIT_S
        while not os.path.exists(file):
            if time.monotonic() > waited:
                raise ValueError(
                    f"`path`={path!r} is not one directory every rank sees: rank {ranks.rank} does not see the file "
                    f"rank 0 wrote there. The ranks build one index in one directory; pass a `path` on a filesystem "
                    f"they share (or build it in one process)."
                )
            time.sleep(0.05)

    on_every_rank(ranks, write)
    try:
        on_every_rank(ranks, look)
    finally:
        if ranks.rank == 0:
            os.remove(file)


def _mark_incomplete(path: str, planned: dict[str, Any]) -> None:
    """Before a shard of a complete index is written again (its input rows changed): from now on it is incomplete."""
    if (read_manifest(path) or {}).get("complete"):
        write_json(os.path.join(path, MANIFEST), planned)


@contextmanager
def _writing(path: str) -> Iterator[None]:
    """Name ``path`` and the folder where the build cannot write, rather than a temporary file's name."""
    try:
        yield
    except PermissionError as err:
        folder = os.path.dirname(os.path.abspath(err.filename)) if err.filename else path
        raise PermissionError(
            f"`path`={path!r}: the index cannot be written in `{folder}` ({err.strerror or err}); pass a directory "
            f"this process may write to."
        ) from err


def _complete(path: str, file: str, start: int, stop: int, planned: dict[str, Any]) -> dict[str, Any] | None:
    """The info of a finished shard of this plan on disk (a shard file exists only once fully written), else None."""
    full = os.path.join(path, file)
    if not os.path.exists(full):
        return None
    try:
        info = shard_info(full)
    except ValueError:
        return None
    rows = stop - start
    expected = {"embeddings": [rows, planned["dim"]], "self_influence": [rows]}
    fits = info.get("rows") == [start, stop] and info.get("digest") == planned["digest"] and info["shapes"] == expected
    return info if fits else None


def _hashed(batches: Iterable[Any], digests: list[Any]) -> Iterator[Any]:
    """``batches`` unchanged, each tensor hashed into the digest of its position among the batch's tensors: one
    digest per position over all rows, so the result does not depend on where batches start; it starts from the
    position's dtype and an example's shape (the same bytes reshaped were taken for the same data). Other leaves
    (a string per example) are left to the batch checks after, which refuse them."""
    for batch in batches:
        tensors = [t for t in optree.tree_leaves(batch, none_is_leaf=True) if isinstance(t, torch.Tensor)]
        for i, leaf in enumerate(tensors):
            if len(digests) <= i:
                digests.append(hashlib.sha256(f"{leaf.dtype}{tuple(leaf.shape[1:])}".encode()))
            tensor_bytes(digests[i], leaf)
        yield batch


def _rows_digest(digests: list[Any]) -> str:
    return hashlib.sha256("".join(d.hexdigest() for d in digests).encode()).hexdigest()


def _shard_batches(setup: Setup, train: Any, start: int, stop: int) -> Iterator[Any]:
    """The batches of examples ``start:stop`` of ``train``: sized data's in batches of ``batch_size``, a stream's
    (``RowStream``: an iterable of batches) as it gives them, cut to those rows."""
    if isinstance(train, RowStream):
        return train.rows(start, stop)
    return iter_batches(rows_of(train, start, stop), setup.batch_size, "train")


def _data_digest(setup: Setup, train: Any, start: int, stop: int) -> str:
    digests: list[Any] = []
    for _ in _hashed(_shard_batches(setup, train, start, stop), digests):
        pass
    return _rows_digest(digests)


def unmatched_rows(index: Any, setup: Setup, train: Any, rows: torch.Tensor) -> tuple[int, int] | None:
    """The first row range of ``index`` holding some of ``rows`` whose input rows ``train`` does not hold as the index
    was built from them (each shard keeps a digest of its input rows), or None."""
    for shard in index.shards:
        if not bool(((rows >= shard["start"]) & (rows < shard["stop"])).any()):
            continue
        built = shard_info(os.path.join(index.path, shard["file"])).get("data")
        if built is not None and built != _data_digest(setup, train, shard["start"], shard["stop"]):
            return shard["start"], shard["stop"]
    return None


def _check_disk(path: str, missing_rows: int, planned: dict[str, Any], self_itemsize: int) -> None:
    itemsize = getattr(torch, planned["storage_dtype"]).itemsize
    needed = missing_rows * (planned["dim"] * itemsize + self_itemsize)
    free = shutil.disk_usage(path).free
    if needed > free:
        raise ValueError(
            f"The index needs about {needed / 2**30:.2f} GiB for {missing_rows} more rows of {planned['dim']} values, "
            f"but `{path}` has {free / 2**30:.2f} GiB free. Pass `projection_dim=` (e.g. 1024), a smaller "
            f"`storage_dtype` (torch.bfloat16), fewer `params`, or another `path`."
        )


def _overflowed(part: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Which rows of ``part`` (embeddings, computed finite: checked where embedded) their storage dtype rounds to
    infinity (``stored``), and their largest magnitude (0 where none)."""
    rows = ~torch.isfinite(stored).all(1)
    return rows.cpu(), float(part[rows].abs().max()) if bool(rows.any()) else 0.0


def _refuse_unstorable(rows: torch.Tensor, largest: float, dtype: torch.dtype, start: int) -> None:
    """Refuse a shard whose ``rows`` (a mask; ``start``: the training row of the first) the storage ``dtype`` cannot
    hold: they would score NaN, silently. Decided on the whole shard, every checkpoint's columns (per part, the
    advice could name a dtype the next part overflows too)."""
    if not bool(rows.any()):
        return
    by_size = sorted(STORAGE_DTYPES, key=lambda d: d.itemsize)
    wider = [f"`storage_dtype={d}`" for d in by_size if torch.finfo(d).max > largest]  # (the smallest first)
    raise ValueError(
        f"`storage_dtype`={dtype} cannot hold the embeddings of `train` rows "
        f"{(rows.nonzero().flatten() + start).tolist()[:10]}: their largest magnitude, {largest:.4g}, exceeds its "
        f"maximum {torch.finfo(dtype).max:.4g}. Pass {' or '.join(wider[:2])}, and `overwrite=True` to replace this "
        f"build."
    )


def _shard_rows(
    setup: Setup, train: Any, start: int, stop: int, storage_dtype: torch.dtype, bar: Any
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Embeddings ``[rows, D]`` in ``storage_dtype`` and self-influences ``[rows]``, on the CPU, each checkpoint's
    columns written into place as computed (the shard's rows exist once, beside one checkpoint's of a batch: a build
    held five copies of them), and the digest of the input rows of one shard. ``bar``: the build's progress bar,
    advanced batch by batch (each shard opened a bar of its own, of no known length)."""
    digests: list[Any] = []
    data = _hashed(_shard_batches(setup, train, start, stop), digests)
    setup = setup._replace(progress=False)
    embeddings: torch.Tensor | None = None
    self_influence = torch.zeros(stop - start, dtype=setup.dtype)
    unstorable, largest = torch.zeros(stop - start, dtype=torch.bool), 0.0
    narrower = torch.finfo(storage_dtype).max < torch.finfo(setup.dtype).max  # (rounding past its largest: infinity)
    for offset, parts in embedding_parts(setup, data, start=start, with_self=True, where="train"):
        column, at = 0, offset - start
        for part, self_term in parts:
            if embeddings is None:  # (D: each checkpoint's columns alike)
                embeddings = torch.empty(stop - start, part.shape[1] * len(setup.checkpoints), dtype=storage_dtype)
            rows = slice(at, at + part.shape[0])
            stored = part.to(storage_dtype)
            if narrower:  # (finite in a dtype no wider: stored finite; the check's syncs spared)
                overflowed, most = _overflowed(part, stored)
                unstorable[rows] |= overflowed
                largest = max(largest, most)
            embeddings[rows, column : column + part.shape[1]] = stored
            self_influence[rows] += self_term.cpu()
            column += part.shape[1]
        bar.update(rows.stop - rows.start)
    _refuse_unstorable(unstorable, largest, storage_dtype, start)
    assert embeddings is not None  # (a shard holds rows)
    return embeddings, self_influence, _rows_digest(digests)


@in_own_context
def build_index(
    path: str | os.PathLike,
    model: Any,
    checkpoints: Iterable[Checkpoint],
    train: Any,
    *,
    loss_fn: Any,
    projection_dim: int | None = None,
    seed: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    shard_size: int | None = None,
    overwrite: bool = False,
    **options: Unpack[Options],
) -> Index:
    """Embed every training example once and write the embeddings and exact self-influences under ``path``.

    The embeddings are those of :func:`embeddings` (``sqrt(lr_c) * grad`` per checkpoint, projected with the
    same seeded projection when ``projection_dim`` is given); each example's self-influence is computed from
    the unprojected gradients, so it is exact even when the embeddings are projected. Shards of ``shard_size``
    rows are ``safetensors`` files, each made visible only when complete; the JSON manifest lists them with
    their sha256 and a fingerprint of everything the numbers depend on (``docs/index_format.md``).

    **Resumable:** after the process was killed (at any moment), the same call skips the complete shards, redoes
    the rest and ends with an index identical byte for byte to an uninterrupted build. A call whose fingerprint
    (checkpoints, learning rates, parameters, loss, dtype, projection, rows, shard size) differs from the
    directory's refuses, saying what differs; ``overwrite=True`` replaces it. A directory that is not an index
    is never deleted. The size is checked against the free disk space first.

    **Distributed:** with ``distributed=True`` (or a process group), shard ``i`` is built by rank ``i % W``; one
    rank writes the manifest after every shard is done, and every rank returns the opened index. ``path`` is one
    directory every rank sees (a shared filesystem; checked).

    Args:
        path: directory of the index (created if needed).
        model, checkpoints, loss_fn, **options: as in :func:`influence` (``progress=True`` shows a bar over rows).
        train: the training data: a batch, a ``Dataset``, or data read more than once as an iterable of batches
            (a DataLoader, an ``IterableDataset``, a list of batches), counted by one pass so that shards have fixed
            row ranges, then read once to check finished shards and once to build the others; a pass that yields
            other rows than the count is refused.
        projection_dim, seed: as in :func:`embeddings`; None stores exact gradients (``C * P`` values a row).
        storage_dtype: dtype of the stored embeddings (self-influence is kept in the computation dtype); refused,
            naming the rows, where it cannot hold an embedding (float16's largest is 65504: bfloat16 has float32's
            range).
        shard_size: rows per shard; default about 256 MB of embeddings per shard.
        overwrite: replace an index of other settings at ``path``.

    Returns:
        The opened :class:`Index`.

    Example:
        >>> import tempfile, torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> index = tc.build_index(tempfile.mkdtemp(), model, ckpts, (x, y), loss_fn=loss, storage_dtype=torch.float64)
        >>> torch.allclose(index.self_influence(), tc.self_influence(model, ckpts, (x, y), loss_fn=loss))
        True
        >>> top = tc.top_k(model, ckpts, index, (x[:2], y[:2]), k=3, loss_fn=loss)
        >>> torch.equal(top.indices, tc.top_k(model, ckpts, (x, y), (x[:2], y[:2]), k=3, loss_fn=loss).indices)
        True
    """

    def checked() -> tuple[tuple[int, int] | None, int | None, str, Any, int | None]:  # (the path and the data
        _check_options(options, "build_index")  # read here too: reading them may fail on one rank)
        projection = projection_of(projection_dim, seed)
        if storage_dtype not in STORAGE_DTYPES:
            allowed = [str(d) for d in STORAGE_DTYPES]
            raise TypeError(f"`storage_dtype` must be one of {allowed}, got {storage_dtype!r}.")
        rows = None if shard_size is None else positive_int(shard_size, "shard_size")
        boolean(overwrite, "overwrite")
        try:
            directory = os.fspath(path)
        except TypeError as err:
            raise TypeError(f"`path` must be the index directory, a str or os.PathLike: {err}.") from err
        data = as_dict(train)
        check_whole(data, "`train`", options.get("distributed"))
        n = num_examples(data)
        if n is None and isinstance(data, Iterable) and not isinstance(data, (Iterator, torch.Tensor)):
            data = replayable(data)  # (each pass checked to start as the first did)
            n = counted_examples(data, "train")  # (an iterable of batches: read once for its size)
        return projection, rows, directory, data, n

    projection, shard_size, path, train, n = checked_on_every_rank(options.get("distributed"), checked)

    def set_up() -> Setup:
        if n is None:
            raise TypeError(
                f"`train` must be read more than once to be indexed (its size, then its shards: a batch `(x1, ..., "
                f"y)`, a Dataset, a DataLoader or a list of batches), got {type(train).__name__}; pass the data "
                f"the iterator reads."
            )
        if n == 0:
            raise ValueError("`train` holds no examples.")
        return make_setup(model, checkpoints, loss_fn=loss_fn, projection=projection, **options)

    setup = set_up_on_every_rank(options.get("distributed"), set_up)
    names = on_every_rank(setup.ranks, lambda: _embedded_names(setup, train))
    source = train if num_examples(train) is not None else RowStream(train, n, "train")  # (shards read in order)
    planned = _plan_manifest(setup, names, loss_fn, n, shard_size, storage_dtype)
    ranges = _shard_ranges(n, planned["shard_size"])
    ranks = setup.ranks
    agree(ranks, **{"the index's settings (its digest)": planned["digest"]})
    mine = [i for i in range(len(ranges)) if ranks is None or i % ranks.world == ranks.rank]

    def prepare() -> None:
        if ranks is None or ranks.rank == 0:
            with _writing(path):
                _prepare_directory(path, planned, overwrite)
            missing = sum(b - a for i, (a, b) in enumerate(ranges) if not _complete(path, shard_name(i), a, b, planned))
            _check_disk(path, missing, planned, setup.dtype.itemsize)

    on_every_rank(ranks, prepare)  # rank 0 prepares; the others wait for its outcome
    if ranks is not None:
        _check_shared(path, ranks)

    def kept_mine() -> dict[int, tuple[str, str]]:
        kept = {}  # shard -> (its file's sha256, its input rows' digest)
        for i in mine:  # a finished shard is kept when its input rows are unchanged (read, not differentiated)
            info = _complete(path, shard_name(i), *ranges[i], planned)
            if info is not None and info.get("data") == _data_digest(setup, source, *ranges[i]):
                whole, payload = file_and_payload_sha256(os.path.join(path, shard_name(i)))
                if payload == info.get("payload"):  # (else damaged since it was written: redone)
                    kept[i] = whole, info["data"]
        return kept

    done = on_every_rank(ranks, kept_mine)
    redone = len(done) < len(mine)
    if ranks is not None:
        redone = any(gather_objects(redone, ranks))

    def mark() -> None:
        if redone and (ranks is None or ranks.rank == 0):
            with _writing(path):
                _mark_incomplete(path, planned)

    on_every_rank(ranks, mark)

    def build_mine() -> dict[int, tuple[str, str]]:
        todo = [i for i in mine if i not in done]
        rows = sum(ranges[i][1] - ranges[i][0] for i in mine)
        bar = tqdm(
            total=rows,
            initial=rows - sum(ranges[i][1] - ranges[i][0] for i in todo),
            desc="index rows" if ranks is None else f"index rows (rank {ranks.rank})",
            unit="row",
            disable=not setup.progress,
            leave=False,
        )
        with in_use(setup), bar:
            for i in todo:
                start, stop = ranges[i]
                embeddings, self_influence, data = _shard_rows(setup, source, start, stop, storage_dtype, bar)
                info = {"rows": [start, stop], "digest": planned["digest"], "data": data}
                file = os.path.join(path, shard_name(i))
                with _writing(path):
                    done[i] = write_shard(file, embeddings, self_influence, info), data
                del embeddings, self_influence  # (kept while the next shard was made: two shards' rows at once)
        return done

    checksums = on_every_rank(ranks, build_mine)
    if ranks is not None:
        checksums = {i: sums for part in gather_objects(checksums, ranks) for i, sums in part.items()}
    manifest = {
        **planned,
        "complete": True,
        "shards": [
            {"file": shard_name(i), "start": a, "stop": b, "sha256": checksums[i][0]} for i, (a, b) in enumerate(ranges)
        ],
    }

    def finish() -> None:
        if ranks is None or ranks.rank == 0:
            for i, shard in enumerate(manifest["shards"]):
                check_shard(path, shard, manifest, checksum=False, data=checksums[i][1])
            if read_manifest(path) != json.loads(json.dumps(manifest)):  # (a complete index rebuilt: left untouched)
                with _writing(path):
                    write_json(os.path.join(path, MANIFEST), manifest)

    on_every_rank(ranks, finish)
    return open_index(path, verify=False)
