"""Reading a function's code: the names it reads, the globals it loads and the values it closes over."""

from __future__ import annotations

import dis
import functools
import types
from typing import Any


def cell_value(cell: types.CellType) -> Any:
    """A closure cell's value (None for a cell not yet filled)."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def closure_values(fn: types.FunctionType) -> list[Any]:
    """The values ``fn`` closes over."""
    return [cell_value(cell) for cell in fn.__closure__ or ()]


def names_read(code: types.CodeType) -> set[str]:
    """The attribute and global names ``code`` (its nested functions' and comprehensions' too) reads."""
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return set(code.co_names).union(*map(names_read, nested))


@functools.lru_cache(maxsize=256)
def loaded_globals(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` (and the functions defined in it) loads: not its attribute names, which
    ``co_names`` holds too."""
    names = [i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    nested = [n for c in code.co_consts if isinstance(c, types.CodeType) for n in loaded_globals(c)]
    return tuple(dict.fromkeys([*names, *nested]))
