"""memwatch's one set of checks of user settings and arguments, shared by the option groups and
every module that takes an integer, a fraction, a positive number, levels, a range or a shape: each
names the argument, its allowed range and the value it got, and raises
:class:`memwatch.errors.MemwatchError` (a ``ValueError``). It imports only :mod:`memwatch.errors`.

Example:
    >>> check_levels("sigmas", [0.3, 1])
    (0.3, 1.0)
    >>> check_fraction("onset.threshold", 1.5)
    Traceback (most recent call last):
    ...
    memwatch.errors.MemwatchError: `onset.threshold` must be a number in [0, 1), got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from memwatch.errors import MemwatchError

__all__ = [
    "check_cadence",
    "check_fraction",
    "check_int",
    "check_levels",
    "check_positive",
    "check_range",
    "check_shape",
]


def check_int(name: str, value: object, low: int, high: int | None = None, allow: str = "") -> int:
    """``value`` must be an integer in ``[low, high]`` (``high=None``: ``>= low``; ``allow`` adds
    e.g. ``"or None"`` to the message).

    Example:
        >>> check_int("k", 0, 1)
        Traceback (most recent call last):
        ...
        memwatch.errors.MemwatchError: `k` must be a positive integer, got 0
        >>> check_int("dim", 70000, 1, 65536)
        Traceback (most recent call last):
        ...
        memwatch.errors.MemwatchError: `dim` must be an integer in [1, 65536], got 70000
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        if high is not None:
            what = f"an integer in [{low}, {high}]"
        else:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise MemwatchError(f"`{name}` must be {what}{' ' + allow if allow else ''}, got {value!r}")
    return value


def check_cadence(name: str, value: int | None) -> int | None:
    """A check cadence: a positive integer or ``None``."""
    return None if value is None else check_int(name, value, 1, allow="or None")


def check_fraction(name: str, value: object, *, low_open: bool = False, high_closed: bool = False) -> float:
    """``value`` must be a number in ``[0, 1)`` (or ``(0, 1]`` etc. as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value <= 1 if high_closed else value < 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise MemwatchError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """``value`` must be a finite number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MemwatchError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


def check_range(name: str, value: object) -> tuple[float, float] | None:
    """``None`` or ``(low, high)`` with finite ``low < high``, as floats."""
    if value is None:
        return None
    ok = isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]):
        raise MemwatchError(f"`{name}` must be None or (low, high) with finite low < high, got {value!r}")
    return float(value[0]), float(value[1])


def check_levels(name: str, values: object, positive: bool = True) -> tuple[float, ...]:
    """A non-empty sequence of finite (positive) numbers, as floats."""
    if isinstance(values, (str, bytes, Tensor)) or not isinstance(values, Sequence) or len(values) == 0:
        raise MemwatchError(
            f"`{name}` must be a non-empty sequence of {'positive ' if positive else ''}numbers "
            f"(e.g. {name}=(0.3,)), got {values!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise MemwatchError(f"`{name}` must hold finite {'positive ' if positive else ''}numbers, got {values!r}")
        out.append(float(v))
    return tuple(out)


def check_shape(name: str, value: object) -> tuple[int, ...] | None:
    """``None`` or a non-empty shape of positive sizes, as a tuple of ints."""
    if value is None:
        return None
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not ok or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in value):
        raise MemwatchError(f"`{name}` must be a non-empty shape of positive sizes, got {value!r}")
    return tuple(value)
