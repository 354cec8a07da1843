"""Seeded random projections, generated on the fly from a counter-based hash: same on any device, never stored
but for the blocks a call generates, kept for its batches (up to 64 MB: ``blocks_kept``), never the whole matrix.

Entry ``(row, col)`` of the projection of a parameter block is ``±1/sqrt(k)`` with the sign drawn from
``hash(seed, block, row, col)``, so ``E[P P^T] = I`` and projected inner products are unbiased estimates of the
exact ones. Blocks (parameters, factors) use independent keys, so their projections can simply be summed.
Integer arithmetic on the device makes the matrix identical on CPU and GPU and for test and training data.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._validate import positive_int, seed_value
from ._warn import warn

_MASK = 0xFFFFFFFF
_ROWS_ELEMENTS = 1 << 22  # entries generated at once when projecting a dense block
_KEPT_BYTES = 1 << 26  # the most a call keeps of the blocks it generated (``blocks_kept``)
_kept = threading.local()  # this thread's call's blocks: {(key, start, stop, k, device, dtype): tensor}, their bytes


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values below 2**32.

    Multipliers stay below 2**31 so no product overflows int64: the same bits on every device.
    """
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK
    x = ((x ^ (x >> 15)) * 0x4C8F3CA5) & _MASK
    return x ^ (x >> 16)


@torch.compiler.assume_constant_result  # (a compiled update's constant: dynamo warned it cannot trace `zlib.crc32`)
def block_key(seed: int, name: str) -> int:
    """Key of one projected block: the seed and a stable hash of the block's name."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & _MASK


def signs(key: int, rows: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``[len(rows), k]`` entries ``±1/sqrt(k)`` for the given row indices (int64, on the target device)."""
    cols = torch.arange(k, device=rows.device, dtype=torch.int64)
    row_hash = _mix(rows.to(torch.int64) * 0x2545F491 + key)  # below 2**31 * 2**32: no int64 overflow
    bits = _mix(row_hash[:, None] ^ _mix(cols + key * 7 + 1)[None, :])
    return ((bits >> 15) & 1).to(dtype).mul_(2).sub_(1).div_(math.sqrt(k))


@contextmanager
def blocks_kept() -> Iterator[None]:
    """Within the block (one call), each block of projection rows is generated once and kept, up to 64 MB (an index
    build generated them again for every batch, checkpoint and layer: 23% of a profiled one); dropped at its end:
    nothing is kept between calls. Per thread (calls from threads keep their own)."""
    if getattr(_kept, "blocks", None) is not None:  # (nested: the outer call's)
        yield
        return
    _kept.blocks, _kept.bytes = {}, 0
    try:
        yield
    finally:
        _kept.blocks = None


def _signs_of_rows(key: int, start: int, stop: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``signs`` of rows ``start:stop``, kept for the call where ``blocks_kept`` is active and room is left (read
    only: callers multiply with it, never write into it)."""
    blocks = getattr(_kept, "blocks", None)
    name = (key, start, stop, k, device, dtype)
    if blocks is not None and name in blocks:
        return blocks[name]
    block = signs(key, torch.arange(start, stop, device=device), k, dtype)
    if blocks is not None and _kept.bytes + block.nbytes <= _KEPT_BYTES:
        blocks[name], _kept.bytes = block, _kept.bytes + block.nbytes
    return block


def project_dense(flat: torch.Tensor, key: int, k: int) -> torch.Tensor:
    """``flat [B, p] @ P [p, k]`` with ``P`` generated in row blocks."""
    step = max(1, _ROWS_ELEMENTS // k)
    out = None
    for start in range(0, flat.shape[1], step):
        stop = min(start + step, flat.shape[1])
        block = (flat[:, start:stop], _signs_of_rows(key, start, stop, k, flat.device, flat.dtype))
        out = block[0] @ block[1] if out is None else out.addmm_(*block)
    return flat.new_zeros(flat.shape[0], k) if out is None else out


def kron_split(k: int) -> tuple[int, int]:
    """``k = k_out * k_in`` with the two factors as close as possible (Kronecker-factored projections)."""
    k_out = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k_out, k // k_out


def projection_of(projection_dim: Any, seed: Any) -> tuple[int, int] | None:
    """``(k, seed)`` of the seeded projection ``projection_dim`` asks for, validated, or None (exact gradients); a
    ``seed`` given without it is refused: it chooses a projection, and none would be made (it was ignored)."""
    if projection_dim is None:
        if isinstance(seed, bool) or seed != 0:
            raise ValueError(
                f"`seed`={seed!r} chooses the random projection that `projection_dim=k` asks for, and no "
                f"`projection_dim` was given (the embeddings would be exact, the seed unused): pass `projection_dim` "
                f"too, or leave `seed` out."
            )
        return None
    return projection_dim_of(projection_dim), seed_value(seed)


def projection_dim_of(k: Any) -> int:
    """``projection_dim``, validated; warned where it splits lopsidedly (``kron_split``: a prime ``k`` gives ``1 x
    k``), which projects a matrix's rows onto so few directions that the estimate is far noisier (a 64 x 64 weight's
    RMS error relative to its gradients' norms: 0.118 at ``k = 1021 = 1 x 1021``, 0.044 at ``1024 = 32 x 32``)."""
    k = positive_int(k, "projection_dim")
    rows, cols = kron_split(k)
    if 4 * rows < math.isqrt(k):
        close = 1 << round(math.log2(k))
        warn(
            f"`projection_dim`={k} splits as {rows} x {cols} for the Kronecker-factored projections of matrix "
            f"parameters (rows x columns): their rows are projected onto {rows} direction(s), a much noisier "
            f"estimate. Choose a k with two close factors, e.g. {close} = {kron_split(close)[0]} x "
            f"{kron_split(close)[1]}.",
            UserWarning,
        )
    return k


def _factor(name: str, side: str, seed: int, n: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _signs_of_rows(block_key(seed, f"{name}/{side}"), 0, n, k, device, dtype)


def project_matrix(name: str, g: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """Project per-example gradients ``g [B, r, *rest]`` of a matrix-shaped parameter with ``P_rows ⊗ P_cols``."""
    k_r, k_c = kron_split(k)
    g = g.reshape(g.shape[0], g.shape[1], -1)
    p_r = _factor(name, "rows", seed, g.shape[1], k_r, g.device, g.dtype)
    p_c = _factor(name, "cols", seed, g.shape[2], k_c, g.device, g.dtype)
    return torch.einsum("brc,rk,cl->bkl", g, p_r, p_c).reshape(g.shape[0], k)


def project_outer(name: str, u: torch.Tensor, v: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """The same projection for gradients given as sums of outer products ``sum_t u_t v_t^T``: ``u [B, T, r]``,
    ``v [B, T, c]``, without forming them. ``u`` may instead be row indices ``[B, T]`` (one-hot rows, -1 = none)."""
    k_r, k_c = kron_split(k)
    p_c = _factor(name, "cols", seed, v.shape[-1], k_c, v.device, v.dtype)
    if not u.is_floating_point():  # (token ids: int64, or the int32 an Embedding takes too)
        key = block_key(seed, f"{name}/rows")
        ur = signs(key, u.clamp(min=0).reshape(-1), k_r, v.dtype).reshape(*u.shape, k_r) * (u >= 0).unsqueeze(-1)
    else:
        ur = u @ _factor(name, "rows", seed, u.shape[-1], k_r, u.device, u.dtype)
    return torch.einsum("btk,btl->bkl", ur, v @ p_c).reshape(v.shape[0], k)


def project_vector(name: str, g: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """Project per-example gradients ``g [B, p]`` of a vector-shaped parameter with a dense hashed matrix."""
    return project_dense(g, block_key(seed, name), k)


def project_grad(name: str, g: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """Project materialised per-example gradients ``[B, *shape]`` of parameter ``name`` to ``[B, k]``."""
    return project_matrix(name, g, seed, k) if g.dim() > 2 else project_vector(name, g.reshape(g.shape[0], -1), seed, k)
