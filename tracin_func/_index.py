"""An influence index on disk, read-only: every training example's influence embedding and exact self-influence,
in shards of rows (``safetensors`` files) listed by a JSON manifest. ``docs/index_format.md`` describes the format.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._shards import file_sha256, read_rows, shard_info
from ._validate import boolean, cause_of

FORMAT = "tracin_func.index"
VERSION = 4  # 2: the fingerprint's `model` part; 3: what it describes of the model and the loss widened; 4: and
# the model's buffers that no checkpoint holds
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 28  # rows of embeddings read at once when streaming an index


def _rebuild_hint(path: str, sentence: bool = False) -> str:
    """The fix for a damaged index, as a clause or (``sentence``) capitalised (``str.capitalize`` would lower the rest:
    `overwrite=true`, the path)."""
    rebuild = "Rebuild" if sentence else "rebuild"
    return (
        f"{rebuild} it by running the same `tc.build_index({path!r}, ...)` call again (it redoes missing or damaged "
        f"shards), or with `overwrite=True`"
    )


def read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest of the index at ``path``; None when the directory holds none. Raises when it is unreadable or
    is not an index manifest."""
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`{file}` is not a readable index manifest ({err}); rebuild the index with `tc.build_index({path!r}, "
            f"..., overwrite=True)`."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"`{file}` is not a tracin_func index manifest (no `\"format\": \"{FORMAT}\"`).")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"`{file}` has index format version {manifest.get('version')!r}; this tracin_func reads version "
            f"{VERSION}. Build it again with `tc.build_index({path!r}, ..., overwrite=True)`."
        )
    return manifest


LAYOUT = ("rows", "shard_size", "dim", "projection", "storage_dtype")  # the manifest's keys its digest covers


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of a manifest's layout and fingerprint, which every shard carries."""
    covered = {**{key: manifest[key] for key in LAYOUT}, "fingerprint": manifest["fingerprint"]}
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()


def check_manifest(path: str, manifest: dict[str, Any]) -> None:
    """Raise where a complete index's manifest lacks a key, no longer matches its digest (its rows, dtype or
    fingerprint edited: the rows counted and the dtype read back followed the edit, silently) or lists shards that
    do not cover its rows once, in order."""
    missing = [key for key in (*LAYOUT, "fingerprint", "digest", "shards") if key not in manifest]
    if missing:
        raise ValueError(f"The manifest of the index at `{path}` lacks {missing}; {_rebuild_hint(path)}.")
    if manifest_digest(manifest) != manifest["digest"]:
        raise ValueError(
            f"The manifest of the index at `{path}` was changed since its build (its settings no longer match its "
            f"digest); {_rebuild_hint(path)}."
        )
    stops = [0] + [shard["stop"] for shard in manifest["shards"]]
    if [shard["start"] for shard in manifest["shards"]] != stops[:-1] or stops[-1] != manifest["rows"]:
        raise ValueError(
            f"The shards the manifest of the index at `{path}` lists do not cover its {manifest['rows']} rows once, in "
            f"order; {_rebuild_hint(path)}."
        )


def check_shard(
    path: str, shard: dict[str, Any], manifest: dict[str, Any], *, checksum: bool, data: str | None = None
) -> None:
    """Raise naming the shard when its file is missing, unreadable, of other rows or shapes than the manifest says,
    (``data``: the digest of the input rows its build computed) of other input rows, or (``checksum``) when its bytes
    differ from the manifest's sha256."""
    file = os.path.join(path, shard["file"])
    if not os.path.exists(file):
        raise ValueError(f"Index shard `{file}` is missing; {_rebuild_hint(path)}.")
    try:
        info = shard_info(file)
    except ValueError as err:
        raise ValueError(f"{err} {_rebuild_hint(path, sentence=True)}.") from err
    if info.get("digest") != manifest["digest"]:  # (another build's, of other settings, written over this one's)
        raise ValueError(
            f"Index shard `{file}` was written by a build of other settings than the manifest's; "
            f"{_rebuild_hint(path)}."
        )
    rows = shard["stop"] - shard["start"]
    expected = {"embeddings": [rows, manifest["dim"]], "self_influence": [rows]}
    if info.get("rows") != [shard["start"], shard["stop"]] or info["shapes"] != expected:
        raise ValueError(
            f"Index shard `{file}` holds rows {info.get('rows')} with shapes {info['shapes']}, but the manifest lists "
            f"rows [{shard['start']}, {shard['stop']}) with shapes {expected}; {_rebuild_hint(path)}."
        )
    if data is not None and info.get("data") != data:  # (two builds of one path over other data: each ended with
        raise ValueError(  # both's rows, silently, before)
            f"Index shard `{file}` holds other training rows than this build's: another `tc.build_index` of the same "
            f"settings over other data wrote it meanwhile. Run one build per `path` at a time; the same call, run "
            f"alone, redoes the shards that are not its own."
        )
    if checksum and file_sha256(file) != shard["sha256"]:
        raise ValueError(
            f"Index shard `{file}` is corrupt (its sha256 differs from the manifest's); {_rebuild_hint(path)}."
        )


class Index:
    """A read-only, memory-mapped influence index (from :func:`open_index` or :func:`build_index`).

    Pass it as ``train`` to :func:`influence` and :func:`top_k`: test examples are embedded with the index's own
    projection and seed, and the shards are streamed through one GEMM per block of rows.

    Attributes:
        path: the index directory.
        dim: width ``D`` of an embedding row (``C * projection_dim``, or ``C * P`` unprojected).
        projection: ``(projection_dim, seed)``, or None for exact (unprojected) gradients.
        storage_dtype: dtype of the stored embeddings.
    """

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = os.path.abspath(path)  # (the same directory after a `chdir`)
        self._manifest = manifest
        # each shard file as opened: one replaced since (a build writing the index again) is refused, not read
        self._files = {s["file"]: _identity(os.path.join(self.path, s["file"])) for s in manifest["shards"]}
        self.dim: int = manifest["dim"]
        projection = manifest["projection"]
        self.projection = None if projection is None else (projection["dim"], projection["seed"])
        self.storage_dtype: torch.dtype = getattr(torch, manifest["storage_dtype"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the stored numbers depend on (checkpoints, parameters, loss, dtype), as written at build time."""
        return dict(self._manifest["fingerprint"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._manifest["shards"]]

    def __len__(self) -> int:
        return self._manifest["rows"]

    def __repr__(self) -> str:
        kind = "exact gradients" if self.projection is None else f"projection_dim={self.projection[0]}"
        return f"Index({self.path!r}, rows={len(self)}, dim={self.dim}, {kind}, shards={len(self.shards)})"

    def _read(self, shard: dict[str, Any], name: str, start: int, stop: int) -> torch.Tensor:
        file = os.path.join(self.path, shard["file"])
        if _identity(file) != self._files[shard["file"]]:
            raise ValueError(
                f"Index shard `{file}` changed since the index was opened (another build wrote it, or it was "
                f"damaged): open the index again (`tc.open_index({self.path!r})` checks it), or "
                f"{_rebuild_hint(self.path)}."
            )
        try:
            return read_rows(file, name, start, stop)
        except Exception as err:
            raise ValueError(
                f"Index shard `{file}` cannot be read ({cause_of(err)}); {_rebuild_hint(self.path)}."
            ) from err

    def self_influence(self) -> torch.Tensor:
        """``[n]``: every training example's exact self-influence ``sum_c lr_c |g_c|^2`` (from the unprojected
        gradients, in the computation dtype of the build)."""
        return torch.cat([self._read(s, "self_influence", 0, s["stop"] - s["start"]) for s in self._manifest["shards"]])

    def embeddings(self, rows: Sequence[int] | torch.Tensor | slice | None = None) -> torch.Tensor:
        """``[len(rows), D]`` embeddings of the given rows (all rows when None), in the storage dtype; only the
        shards holding them are read."""
        n = len(self)
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice):
            rows = range(*rows.indices(n))
        if isinstance(rows, range):  # (torch.as_tensor takes no negative step)
            rows = torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64)
        empty = isinstance(rows, (list, tuple)) and len(rows) == 0  # (an empty selection: no dtype to read)
        rows = torch.as_tensor(rows, dtype=torch.int64 if empty else None)
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(
                f"`rows` must hold row numbers (integers), got {rows.dtype}"
                + (": for a mask, pass `mask.nonzero().flatten()`." if rows.dtype == torch.bool else ".")
            )
        rows = rows.to(torch.int64).reshape(-1)
        if rows.numel() and (int(rows.min()) < -n or int(rows.max()) >= n):
            raise IndexError(f"`rows` must lie in [-{n}, {n}) for an index of {n} rows.")
        rows = torch.where(rows < 0, rows + n, rows)
        out = torch.empty(rows.numel(), self.dim, dtype=self.storage_dtype)
        for shard in self._manifest["shards"]:
            inside = ((rows >= shard["start"]) & (rows < shard["stop"])).nonzero().flatten()
            if inside.numel():
                local = rows[inside] - shard["start"]
                lo, hi = int(local.min()), int(local.max()) + 1
                out[inside] = self._read(shard, "embeddings", lo, hi)[local - lo]
        return out

    def blocks(
        self, shard_numbers: Sequence[int] | None = None, max_rows: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, [b, D] embeddings)`` for the given shards (all by default), in blocks of about
        ``BLOCK_BYTES`` (and at most ``max_rows`` rows): memory is bounded by a block, not by the index."""
        shards = self._manifest["shards"]
        step = max(1, BLOCK_BYTES // max(1, self.dim * self.storage_dtype.itemsize))
        step = min(step, max_rows or step)
        for number in range(len(shards)) if shard_numbers is None else shard_numbers:
            shard = shards[number]
            for start in range(0, shard["stop"] - shard["start"], step):
                stop = min(start + step, shard["stop"] - shard["start"])
                yield shard["start"] + start, self._read(shard, "embeddings", start, stop)


def _identity(file: str) -> tuple[int, int, int] | None:
    """A file's inode, size and modification time (None if missing): ``os.replace`` of another file changes it."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_index(path: str | os.PathLike, *, verify: bool = True) -> Index:
    """Open an index written by :func:`build_index`, read-only and memory-mapped.

    Args:
        path: the index directory.
        verify: check every shard's sha256 against the manifest (one read of the whole index, about 1 GB/s).
            Without it, only each shard's header, rows and shapes are checked (and again whenever it is read).

    Returns:
        An :class:`Index`: ``len(index)``, ``index.self_influence()``, ``index.embeddings(rows)``, and ``train``
        for :func:`influence` / :func:`top_k`.

    Example:
        >>> import tempfile, torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> path = tempfile.mkdtemp()
        >>> _ = tc.build_index(path, model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss(), shard_size=4)
        >>> index = tc.open_index(path)
        >>> len(index), index.dim, len(index.shards)
        (10, 15, 3)
    """
    path, verify = os.fspath(path), boolean(verify, "verify")
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"`{path}` holds no index (no {MANIFEST}); build one with `tc.build_index({path!r}, ...)`.")
    if not manifest.get("complete"):
        raise ValueError(f"The index at `{path}` is incomplete (its build was interrupted); {_rebuild_hint(path)}.")
    check_manifest(path, manifest)
    for shard in manifest["shards"]:
        check_shard(path, shard, manifest, checksum=verify)
    return Index(path, manifest)
