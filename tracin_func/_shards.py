"""Files of an on-disk index: shards of rows in the ``safetensors`` format and a JSON manifest, each made visible
only when complete (written under a temporary name, flushed to disk, then renamed), with checksums.

A shard holds ``self_influence`` ``[rows]`` and ``embeddings`` ``[rows, D]``; its ``safetensors`` metadata has one
key, ``tracin_func``, a JSON string with its row range, the index's fingerprint digest and its input rows' digest.
The bytes are a function of the tensors and that key only, so a rebuilt shard equals the first build byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from ._fingerprint import memory_of
from ._validate import cause_of

TEMPORARY = ".partial"  # suffix of files being written; never read, removed on the next build


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): the rename is what counts
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str, *chunks: Any) -> None:
    """Write ``chunks`` (bytes-like: ``bytes``, a tensor's memory) one after the other to ``path`` so that readers see
    either the old file or the whole new one, even if the process is killed at any moment: a temporary file, flushed
    and synced, then renamed over ``path``."""
    temporary = path + TEMPORARY
    with open(temporary, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.replace(temporary, path)
    except FileNotFoundError as err:  # (a build starting removes the files a killed one was writing)
        raise RuntimeError(
            f"`{temporary}` was removed while being written: another `tc.build_index` of the same directory started "
            f"meanwhile. Run one build of an index at a time (the same call again resumes it)."
        ) from err
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, content: Mapping[str, Any]) -> None:
    write_atomically(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The head of the ``safetensors`` serialisation of ``tensors`` (in the given order), which their bytes follow: an
    8-byte little-endian header length, then the JSON header (padded with spaces to 8 bytes). Written here because
    the library's own writer needs numpy, which is not a dependency; its reader reads these files."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shard(path: str, embeddings: torch.Tensor, self_influence: torch.Tensor, info: Mapping[str, Any]) -> str:
    """Write one shard atomically and return its file's sha256. Its metadata holds ``info`` and the sha256 of its
    tensors' bytes (``payload``), which a resumed build checks (``file_and_payload_sha256``). The rows are written
    from the tensors' memory (contiguous CPU tensors are not copied): a build holds one shard's rows, not five."""
    tensors = {"self_influence": self_influence, "embeddings": embeddings}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    rows = [memory_of(t) for t in tensors.values()]  # (as the file lays them out, after its header; in place)
    payload = hashlib.sha256()
    for part in rows:
        payload.update(part)
    meta = {**info, "payload": payload.hexdigest()}
    head = safetensors_header(tensors, {"tracin_func": json.dumps(meta, sort_keys=True)})
    whole = hashlib.sha256(head)
    for part in rows:
        whole.update(part)
    write_atomically(path, head, *rows)
    return whole.hexdigest()


def file_and_payload_sha256(path: str) -> tuple[str, str]:
    """The sha256 of a shard file and of its tensors' bytes (after its header: what ``payload`` names), in one read."""
    whole, payload = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        whole.update(head + f.read(struct.unpack("<Q", head)[0]))
        while chunk := f.read(1 << 24):
            whole.update(chunk)
            payload.update(chunk)
    return whole.hexdigest(), payload.hexdigest()


def shard_info(path: str) -> dict[str, Any]:
    """The row range and fingerprint a shard was written with, and its tensors' shapes; raises ``ValueError``
    naming the file when it is not a readable shard (truncated, overwritten, another format)."""
    try:
        with safe_open(path, framework="pt") as f:
            info = json.loads((f.metadata() or {})["tracin_func"])
            shapes = {name: list(f.get_slice(name).get_shape()) for name in ("embeddings", "self_influence")}
    except Exception as err:
        raise ValueError(f"`{path}` is not a readable index shard ({cause_of(err)}).") from err
    return {**info, "shapes": shapes}


def read_rows(path: str, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``name`` of a shard, read through the file's memory map (only those rows)."""
    with safe_open(path, framework="pt") as f:
        return f.get_slice(name)[start:stop]
