"""Which signals a monitor is made of: one factory per signal module, in the order a check runs them.

A factory takes the monitor (it reads its option groups and the few services it offers:
``held_samples``, ``signals``, ``use_levels``) and returns its signal,
or ``None`` when the monitor's settings do not ask for it. The order matters: calibration fixes
the levels first, the copies' ratios feed the sharpness summary and the alarm. A new signal is one module with
a ``build`` factory and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memwatch.signals import alarm, calibration, conditional, copies, lid, lossgap, sharpness
from memwatch.signals.base import Signal

__all__ = ["FACTORIES", "compose"]

FACTORIES: tuple[Callable[[Any], Signal | None], ...] = (
    calibration.build,
    copies.build,
    sharpness.build,
    lid.build,
    alarm.build,
    conditional.build,
    lossgap.build,
)


def compose(monitor: Any) -> dict[str, Signal]:
    """``{name: signal}`` of ``monitor``, in the order a check runs them."""
    signals = (factory(monitor) for factory in FACTORIES)
    return {s.name: s for s in signals if s is not None}
