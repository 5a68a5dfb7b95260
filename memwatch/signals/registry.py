"""Which signals a monitor is made of: one factory per signal module, in the order a check runs them.

A factory takes the monitor's :class:`memwatch.signals.context.SignalContext` (its option groups
and the few services it offers) and returns its signal, or ``None`` when the settings do not ask
for it. The order a check runs them in is declared by the signals (:attr:`Signal.after`: the
calibration fixes the levels before the LID signal reads them, the copies' ratios feed the
sharpness summary and the alarm, the consistency check after every other); :data:`FACTORIES`
orders the rest. A new signal is one module with a ``build`` factory and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from memwatch.errors import MemwatchError
from memwatch.signals import alarm, calibration, conditional, consistency, copies, lid, lossgap, sharpness
from memwatch.signals.base import Signal
from memwatch.signals.context import SignalContext

__all__ = ["FACTORIES", "compose", "find"]

S = TypeVar("S", bound=Signal)

FACTORIES: tuple[Callable[[SignalContext], Signal | None], ...] = (
    calibration.build,
    copies.build,
    sharpness.build,
    lid.build,
    alarm.build,
    conditional.build,
    lossgap.build,
    consistency.build,  # it declares itself last (after every other)
)


def compose(context: SignalContext) -> dict[str, Signal]:
    """``{name: signal}`` of a monitor's ``context``, in the order a check runs them: each after
    the signals it names in :attr:`Signal.after`, otherwise in the order of :data:`FACTORIES`.

    Raises:
        MemwatchError: the signals' declared order is circular.
    """
    waiting = [s for s in (factory(context) for factory in FACTORIES) if s is not None]
    names, ordered = {s.name for s in waiting}, {}
    while waiting:
        ready = next((s for s in waiting if _needs(s, names) <= ordered.keys()), None)
        if ready is None:
            raise MemwatchError(f"the signals' declared order is circular: {[(s.name, s.after) for s in waiting]}")
        waiting.remove(ready)
        ordered[ready.name] = ready
    return ordered


def _needs(signal: Signal, names: set[str]) -> set[str]:
    """The composed signals ``signal`` runs after (every other one for ``"*"``)."""
    return names - {signal.name} if "*" in signal.after else set(signal.after) & names


def find(signals: Mapping[str, Signal], kind: type[S]) -> S | None:
    """The composed signal of type ``kind`` (``None`` when the settings left it out): typed, for the
    monitor's own views of one signal (the calibrated levels, the reference of the copies)."""
    return next((s for s in signals.values() if isinstance(s, kind)), None)
