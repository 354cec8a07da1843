"""Files of an on-disk index: shards of rows in the ``safetensors`` format and a JSON manifest, each made visible
only when complete (written under a temporary name, flushed to disk, then renamed), with checksums.

A shard holds ``self_influence`` ``[rows]`` and ``embeddings`` ``[rows, D]``; its ``safetensors`` metadata has one
key, ``tracin_func``, a JSON string with its row range and the index's fingerprint digest (one key, because the
library writes several keys in a random order, and a rebuilt shard must equal the first build byte for byte).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

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
    os.replace(temporary, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, content: Mapping[str, Any]) -> None:
    write_atomically(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())


def write_shard(path: str, embeddings: torch.Tensor, self_influence: torch.Tensor, info: Mapping[str, Any]) -> str:
    """Write one shard atomically and return its file's sha256."""
    tensors = {"self_influence": self_influence, "embeddings": embeddings}
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = save(tensors, metadata={"tracin_func": json.dumps(dict(info), sort_keys=True)})
    write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


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
