"""Small argument checks shared by the public functions."""

from __future__ import annotations

import operator
import os
import re
import traceback
from typing import Any

import torch

# a line of the table of where each dispatch key's kernel is registered, which torch appends to an operator's
# NotImplementedError ("CPU: registered at /.../RegisterCPU.cpp:5713 [kernel]": about 50 lines)
_REGISTERED = re.compile(r"\w+: (fallthrough )?registered at \S+ \[[\w ]+\]")
# torch's missing-kernel boilerplate besides the table: its build advice and the list of backends (a sparse gradient's
# 'aten::view' quoted 60 of them)
_BOILERPLATE = re.compile(
    r" If you are a Facebook employee.*?possible resolutions\."
    r"| This could be because the operator doesn't exist for this backend.*?\(if using custom build\)\."
    r"| '[\w:.]+' is only available for these backends: \[.*?\]\."
)


def cause_of(err: Exception) -> str:
    """An error as a message quotes it: its type and its text, less torch's table of registered kernels."""
    text = "\n".join(line for line in str(err).splitlines() if not _REGISTERED.fullmatch(line.strip()))
    text = _BOILERPLATE.sub("", text).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__  # (a bare `assert`: no text)


def _integer(value: Any) -> int | None:
    """``value`` as an int where it is an integer: a Python or numpy one, or a 0-d integer tensor (what
    ``operator.index`` reads, less booleans and tensors of other shapes); else None."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and (value.dim() or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is an integer >= 1 (``_integer``: ``np.int64(3)`` and ``torch.tensor(3)`` too);
    otherwise a TypeError (not an integer) or ValueError naming ``name``. Callers use the int returned."""
    number = _integer(value)
    if number is None:
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if number < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return number


def seed_value(seed: Any) -> int:
    """``seed`` as an int if it is an integer in ``[0, 2**32)`` (``_integer``: ``np.int64(3)`` too); otherwise a
    ValueError."""
    number = _integer(seed)
    if number is None or not 0 <= number < 2**32:
        raise ValueError(f"`seed` must be an int in [0, 2**32), got {seed!r}.")
    return number


def boolean(value: Any, name: str) -> bool:
    """``value`` if it is True or False; otherwise a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def floating_dtypes_met(error: str) -> bool:
    """Whether torch's ``error`` says tensors of two floating dtypes met ("must have the same dtype, but got Double
    and Float", an op of one dtype's "expected scalar type Float but found Double", a convolution's "Input type (float)
    and bias type (double)", a grouped matrix product's "Expected mat_a to be Float32, BFloat16 or Float16 matrix, got
    Double", a per-channel fake-quantize's "Scale must be Float or BFloat16, found Double", a quantized model's
    "Quantize only works on Float Tensor, got Double"; not "expected scalar type Long but found Float", a target's)."""
    named = {word.lower() for word in re.findall(r"(?i)\b(double|float|half|bfloat16)\b", error)}
    expected = re.search("(?i)expected .+ to be|must be .+ found|only works on .+ got", error)
    said = expected or any(k in error.lower() for k in ("dtype", "scalar type", "type ("))
    return bool(said) and len(named) >= 2


def refusal(err: BaseException) -> bool:
    """Whether ``err`` is a refusal of ours: its message starts with the argument's name in backticks and this
    package raised it (torch's may start so too: "`lengths` array must be sorted ...", a model's packing failing)."""
    if not str(err).startswith("`"):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def in_model_code(err: BaseException) -> str:
    """``", at file:line (function): `code`"``: the innermost frame of ``err``'s traceback in the model's code (not
    torch's, not this library's), where the model did what vmap cannot; ``""`` if none."""
    library = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(library)]
    if not frames:
        return ""
    frame = frames[-1]
    where = frame.filename.split("site-packages" + os.sep)[-1]
    return f", at {where}:{frame.lineno} ({frame.name})" + (f": `{frame.line.strip()}`" if frame.line else "")
