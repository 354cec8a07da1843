"""Small argument checks shared by the public functions."""

from __future__ import annotations

from typing import Any


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1; otherwise a TypeError (not an int) or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def seed_value(seed: Any) -> int:
    """``seed`` if it is an int in ``[0, 2**32)``; otherwise a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be an int in [0, 2**32), got {seed!r}.")
    return seed


def boolean(value: Any, name: str) -> bool:
    """``value`` if it is True or False; otherwise a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value
