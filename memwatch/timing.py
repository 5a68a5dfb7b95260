"""The phases of a check, each timed under its own name.

A check does several things of very different cost — the data LID's local PCA at the first check,
drawing the probes, their sharpness, the LID's forward passes, the copy search, publishing — and a
person reading "32 probes sampled, 9 s" must not be handed the cost of another phase. A
:class:`PhaseClock` times each phase on its own (``time.perf_counter``) with the rise of the
process's peak resident memory during it (``ru_maxrss``, host memory: what the phase itself
added to the high-water mark; 0 when an earlier phase had already reached it), and tells a
listener after each one.

Example:
    >>> clock = PhaseClock()
    >>> with clock.phase("sampling", " (50 steps)"):
    ...     pass
    >>> list(clock.seconds), clock.seconds["sampling"] >= 0
    (['sampling'], True)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

__all__ = ["PhaseClock", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (NaN where the platform has no ``resource``)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class PhaseClock:
    """Seconds and peak-memory rise per named phase of one check.

    Args:
        on_phase: called after each phase with ``(name + detail, seconds, peak_mb)`` (e.g. a
            console line); ``None``: nothing is called.

    Attributes:
        seconds: phase name -> wall seconds, summed over the phase's runs in this check.
        peak_mb: phase name -> MB the process's peak resident memory rose by during it (summed).
    """

    def __init__(self, on_phase: Callable[[str, float, float], None] | None = None) -> None:
        self.on_phase = on_phase
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Time the block as phase ``name`` (``detail``: words for the listener only, e.g. the timestep)."""
        before, started = peak_rss_mb(), time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            rise = max(0.0, peak_rss_mb() - before) if before == before else 0.0  # NaN: not measurable here
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.peak_mb[name] = self.peak_mb.get(name, 0.0) + rise
            if self.on_phase is not None:
                self.on_phase(name + detail, seconds, rise)

    def values(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` for the logged values."""
        return {f"time/{name}": s for name, s in self.seconds.items()}
