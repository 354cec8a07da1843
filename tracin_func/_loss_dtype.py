"""A loss's own tensors (a criterion's class weights) against the dtype a call computes in.

A call converts the checkpoints and floating inputs to one dtype (``dtype=``, e.g. float64), and torch's losses refuse
a class weight of another ("expected scalar type Double but found Float"), which named no argument, and blamed the
data's first example, or told to convert token ids with ``x.float()``. An ``nn.Module`` criterion is run as a private
copy whose floating tensors are in the call's dtype; a tensor any other callable holds is named where it fails.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ._code import held_values
from ._loss import CriterionLoss, ExampleLossFn


def in_dtype(loss_fn: Any, dtype: torch.dtype) -> Any:
    """``loss_fn``, or where it is an ``nn.Module`` holding floating tensors of another dtype (buffers such as
    ``weight`` / ``pos_weight``, parameters, tensors set as attributes; its submodules' too) a copy of it holding them
    in ``dtype``. The user's criterion is never changed: each module is copied shallowly, with its own tensor dicts."""
    if not isinstance(loss_fn, nn.Module) or not any(_converts(t, dtype) for m in loss_fn.modules() for t in _own(m)):
        return loss_fn
    copies: dict[int, nn.Module] = {}

    def copied(module: nn.Module) -> nn.Module:
        if id(module) not in copies:  # (a submodule held twice is copied once)
            clone = copies[id(module)] = copy.copy(module)
            state = vars(clone)  # (set directly: nn.Module.__setattr__ would file a tensor as a buffer)
            state.update({k: _cast(v, dtype) for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
            state["_parameters"] = {k: _cast(p, dtype) for k, p in module._parameters.items()}
            state["_buffers"] = {k: _cast(b, dtype) for k, b in module._buffers.items()}
            state["_modules"] = {k: m if m is None else copied(m) for k, m in module._modules.items()}
        return copies[id(module)]

    return copied(loss_fn)


def _own(module: nn.Module) -> list[Any]:
    """A module's own parameters, buffers and tensor attributes (not its submodules')."""
    return [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]


CAST_FROM = "_tracin_func_cast_from"  # the attribute of a converted copy naming the tensor it copies


def _converts(t: Any, dtype: torch.dtype) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; a trainable parameter kept (a model's, such as a learned temperature the criterion holds,
    refused by the forward's check as read from the model: a copy would hide it)."""
    if t is None or not _converts(t, dtype) or isinstance(t, nn.Parameter) and t.requires_grad:
        return t
    cast = t.detach().to(dtype)
    cast = nn.Parameter(cast, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cast
    setattr(cast, CAST_FROM, t)  # (the loss check sees the model's tensor a criterion holds through its copy)
    return cast


# torch's names of the floating dtypes in its messages ("expected scalar type Double but found Float", "double !=
# float"), besides ``torch.float64``'s own
_TORCH_NAMES = {torch.float64: "double", torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}


def refuse_held_dtype(loss: ExampleLossFn, err: Exception, dtype: torch.dtype) -> None:
    """Raise naming the loss argument, the tensor and the fix where ``err``, the loss's run failing, names the call's
    ``dtype`` and the other floating dtype of a tensor the loss holds (class weights in a ``functools.partial``, a
    tensor a function closes over or loads as a global), or of a module's (a teacher: it blamed the model)."""
    name = getattr(loss, "name", None)
    user = loss.criterion if isinstance(loss, CriterionLoss) else getattr(loss, "fn", loss)
    if name is None or not _names(str(err), dtype):
        return
    for where, t in held_values(user):
        if isinstance(t, nn.Module):  # (a teacher: its tensors' dtype)
            held = next((u.dtype for u in [*t.parameters(), *t.buffers()] if u.is_floating_point()), dtype)
            if held != dtype and _names(str(err), held):
                raise TypeError(
                    f"`{name}` holds a {held} module ({where}: {type(t).__name__}) but the call computes in {dtype} "
                    f"(`dtype=`, or the checkpoints'), and the loss failed: {str(err).splitlines()[0]}. Convert the "
                    f"module to the call's dtype (`.to({dtype})`: the call converts no module the loss holds), or "
                    f"inside the loss its inputs to the module's dtype and its outputs back."
                ) from err
        elif isinstance(t, torch.Tensor) and _converts(t, dtype) and _names(str(err), t.dtype):
            raise TypeError(
                f"`{name}` holds a {t.dtype} tensor ({where}) but the call computes in {dtype} (`dtype=`, or the "
                f"checkpoints'), and the loss failed: {str(err).splitlines()[0]}. Convert the tensor to the call's "
                f"dtype (`.to({dtype})`), or inside the loss to its inputs' (`w.to(outputs.dtype)`); an nn.Module "
                f"criterion (e.g. `nn.CrossEntropyLoss(weight=w)`) is converted by the call itself."
            ) from err


def _names(message: str, dtype: torch.dtype) -> bool:
    """Whether torch's ``message`` names ``dtype`` (``torch.float32``, ``float32`` or ``Float``)."""
    words = {str(dtype).removeprefix("torch."), _TORCH_NAMES.get(dtype, "")} - {""}
    return any(re.search(rf"(?i)\b{w}\b", message) for w in words)
