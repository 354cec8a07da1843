"""Reading a function's code: the names it reads and the values it closes over."""

from __future__ import annotations

import types
from typing import Any


def closure_values(fn: types.FunctionType) -> list[Any]:
    """The values ``fn`` closes over (cells not yet filled left out)."""
    values = []
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:
            continue
    return values


def names_read(code: types.CodeType) -> set[str]:
    """The attribute and global names ``code`` (its nested functions' and comprehensions' too) reads."""
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return set(code.co_names).union(*map(names_read, nested))
