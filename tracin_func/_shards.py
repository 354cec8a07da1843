"""Files of an on-disk index: shards of rows in the ``safetensors`` format and a JSON manifest, each made visible
only when complete (written under a temporary name, flushed to disk, then renamed), with checksums.

A shard holds ``self_influence`` ``[rows]`` and ``embeddings`` ``[rows, D]``; its ``safetensors`` metadata has one
key, ``tracin_func``, a JSON string with its row range, the index's fingerprint digest and its input rows' digest.
The bytes are a function of the tensors and that key only, so a rebuilt shard equals the first build byte for byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from ._fingerprint import tensor_bytes

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


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one, even if the process
    is killed at any moment: a temporary file, flushed and synced, then renamed over ``path``."""
    temporary = path + TEMPORARY
    with open(temporary, "wb") as f:
        f.write(data)
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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The ``safetensors`` serialisation of ``tensors`` (in the given order): an 8-byte little-endian header length,
    the JSON header (padded with spaces to 8 bytes), then the tensors' bytes. Written here because the library's
    own writer needs numpy, which is not a dependency; its reader reads these files."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    payload, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        payload.append(ctypes.string_at(t.data_ptr(), size) if size else b"")
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(payload)


def write_shard(path: str, embeddings: torch.Tensor, self_influence: torch.Tensor, info: Mapping[str, Any]) -> str:
    """Write one shard atomically and return its file's sha256. Its metadata holds ``info`` and the sha256 of its
    tensors' bytes (``payload``), which a resumed build checks (``file_and_payload_sha256``)."""
    tensors = {"self_influence": self_influence, "embeddings": embeddings}
    payload = hashlib.sha256()
    for t in tensors.values():  # (as the file lays them out, after its header)
        tensor_bytes(payload, t)
    meta = {**info, "payload": payload.hexdigest()}
    data = safetensors_bytes(tensors, {"tracin_func": json.dumps(meta, sort_keys=True)})
    write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


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
        raise ValueError(f"`{path}` is not a readable index shard ({type(err).__name__}: {err}).") from err
    return {**info, "shapes": shapes}


def read_rows(path: str, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``name`` of a shard, read through the file's memory map (only those rows)."""
    with safe_open(path, framework="pt") as f:
        return f.get_slice(name)[start:stop]
