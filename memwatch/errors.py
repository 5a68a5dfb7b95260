"""memwatch's one error type.

Every configuration or input mistake that memwatch detects raises :class:`MemwatchError`, a
``ValueError`` subclass, so ``except ValueError`` keeps working and ``except MemwatchError``
catches exactly memwatch's own complaints. Messages name the argument, what it must be and the
value received.
"""

from __future__ import annotations

__all__ = ["MemwatchError"]


class MemwatchError(ValueError):
    """A memwatch argument, input or setting is invalid (the message names it and the value).

    Example:
        >>> try:
        ...     raise MemwatchError("`k` must be an integer in [1, 64], got 0")
        ... except ValueError as err:
        ...     print(err)
        `k` must be an integer in [1, 64], got 0
    """
