"""Checkpoints that alias one tensor: kept in memory during training without a copy (``dict(model.state_dict())``,
``optimizer.state_dict()`` hold references to the live tensors, which every later step changes in place), all of
them score the weights (and Adam moments) as they are at the end, silently (54% off in a review's repro). Told
apart from copies by where their values live, never by reading them: the check costs no pass over the data.

One checkpoint object given twice is left alone: it counts twice, as asked. Tied weights within one checkpoint are
never compared (tensors are compared under one name across checkpoints).

Example:
    >>> import torch
    >>> w = torch.zeros(2)
    >>> first_shared([{"w": w}, {"w": w}, {"w": w.clone()}], [object(), object(), object()], ["w"])
    (0, 1, 'w')
    >>> first_shared([{"w": w}, {"w": w}], [None, None], ["w"]) is None  # one object given twice
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ._warn import warn

_COPY = "`{k: v.detach().clone() for k, v in model.state_dict().items()}`"


def storage_key(t: Any) -> tuple[Any, ...] | None:
    """Where a tensor's values live (its storage's address, its offset, shape, strides, dtype, device), read without
    its values; None for anything else and tensors with no storage of their own (empty, meta, wrapper subclasses)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        address = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # (functional and wrapper tensors have none to share)
        return None
    return None if address == 0 else (t.device, address, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def first_shared(
    tensors: Sequence[Mapping[str, Any]], owners: Sequence[Any], names: Iterable[str]
) -> tuple[int, int, str] | None:
    """``(i, j, name)``: the first two of ``tensors`` (one mapping per checkpoint) holding one storage under ``name``
    whose ``owners`` (the checkpoint objects) are distinct, else None (at once for one: a tracer's step)."""
    if len(tensors) < 2:
        return None
    for name in names:
        seen: dict[tuple[Any, ...], int] = {}
        for j, held in enumerate(tensors):
            key = storage_key(held.get(name))
            if key is None:
                continue
            i = seen.setdefault(key, j)
            if owners[i] is not owners[j]:
                return i, j, name
    return None


def warn_aliased_params(checkpoints: Sequence[Any], names: Iterable[str], function: bool = False) -> None:
    """Warn when two checkpoints hold the very same tensor for a differentiated parameter (``names``); ``function``:
    a pure function's checkpoints, whose loop may leave an entry it does not train as it is."""
    shared = first_shared([c.params for c in checkpoints], checkpoints, names)
    if shared is None:
        return
    i, j, name = shared
    held = f"`checkpoints[{i}]` and `checkpoints[{j}]` hold the very same tensor for {name!r} (one storage, not copies)"
    if function:
        warn(
            f"{held}: right where the training loop left that entry as it was (one it does not update, which is then "
            f"scored at the same values: leave it out of `params=` if it is not trained), wrong where it updates "
            f"tensors in place (`p.sub_(...)`): both would score the values it holds now. Copy them when saving: "
            f"`{{k: v.detach().clone() for k, v in params.items()}}`.",
            UserWarning,
        )
        return
    warn(
        f"{held}: most likely both alias the model's live weights (`dict(model.state_dict())` keeps references, "
        f"which training changes in place), so both score the weights as they are now, not as they were when "
        f"saved. Copy them when saving: {_COPY} (and `copy.deepcopy(optimizer.state_dict())`). One checkpoint "
        f"object given twice is not warned about.",
        UserWarning,
    )


def warn_aliased_moments(checkpoints: Sequence[Any], states: Sequence[Mapping[str, Any]], names: Iterable[str]) -> None:
    """Warn when two checkpoints' Adam states (``states``: one ``{name: AdamParam}`` per checkpoint, the user's
    tensors) hold the very same moment tensor for a differentiated parameter (``names``)."""
    names = list(names)
    for moment in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        held = [{n: getattr(s, moment) for n, s in state.items()} for state in states]
        shared = first_shared(held, checkpoints, names)
        if shared is not None:
            i, j, name = shared
            warn(
                f"`checkpoints[{i}].optimizer_state` and `checkpoints[{j}].optimizer_state` hold the very same "
                f"{moment} tensor for {name!r} (one storage, not copies): most likely both alias the optimizer's live "
                f"state (`optimizer.state_dict()` keeps references, which training changes in place), so both score "
                f"the moments as they are now. Copy it when saving: `copy.deepcopy(optimizer.state_dict())`. One "
                f"checkpoint object given twice is not warned about.",
                UserWarning,
            )
            return
