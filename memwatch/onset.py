"""Onset detection over a series of checks (layer 9): baseline calibration and patience.

Pure Python, no torch or Lightning import (a 0-d tensor value is accepted). The callback feeds
one scalar per check, e.g. the ``memorized_fraction`` from :mod:`memwatch.metrics`, and acts on
the returned :class:`OnsetDecision` (log ``onset``, save the last clean checkpoint, alert, stop).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.validation import check_int

__all__ = ["OnsetDecision", "OnsetDetector"]

_MODES = ("max", "min")


@dataclass
class OnsetDecision:
    """What one check means for training.

    Attributes:
        onset: memorization is declared at this check (True at exactly one check, the onset).
        memorizing: the detector is in the triggered state (True from the onset on).
        clean: this check counts as clean (finite value, no rule passed, no onset yet); the
            callback saves the "last clean checkpoint" on it.
        reason: human-readable explanation, e.g.
            ``"memorized_fraction=0.62 > 0.5 for 2 consecutive checks since step 300 (baseline 0.03)"``.
    """

    onset: bool
    memorizing: bool
    clean: bool
    reason: str


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _baseline_text(values: list[float], complete: int) -> str:
    """The baseline of the checks before this one, for reasons (rule 3).

    Example:
        >>> _baseline_text([0.1, 0.2], 3), _baseline_text([], 3)
        ('baseline 0.15 of the 2 checks so far', 'no baseline yet')
    """
    if not values:
        return "no baseline yet"
    mean = _fmt(sum(values) / len(values))
    if len(values) >= complete:
        return f"baseline {mean}"
    return f"baseline {mean} of the {len(values)} check{'s' if len(values) > 1 else ''} so far"


class OnsetDetector:
    """Declare memorization onset when a monitored value stays past a limit for ``patience`` checks.

    Rules, applied to each ``update(step, value)``:

    1. Every check is appended to :attr:`history` as ``(step, value)``.
    2. A non-finite value (NaN, ±inf: a failed measurement) is neither clean nor exceeding: it
       does not enter the baseline, and it neither advances nor resets the streak (the checks
       on either side of it count as consecutive). ``clean`` is False for it.
    3. Baseline: :attr:`baseline` is the mean of the first ``baseline_checks`` finite values at
       ``step >= min_steps``; ``None`` until that many were seen. It is computed whatever the rules
       (it is reported in reasons), but only ``min_delta`` uses it. A reason reports the baseline
       as it stood *before* its check, never one that includes the check itself: the mean of the
       baseline checks seen so far, saying how many while they are fewer than ``baseline_checks``.
    4. A finite value *passes* when, with ``>`` for ``mode="max"`` and ``<`` for ``mode="min"``
       (strict), ``value > threshold`` (if ``threshold`` is not None) or
       ``value > baseline + min_delta`` (``value < baseline - min_delta`` for ``"min"``; if
       ``min_delta`` is not None and the baseline was complete *before* this check, so the
       baseline checks are never compared with themselves). The threshold rule needs no baseline.
    5. A passing check at ``step >= min_steps`` *exceeds*: it extends the streak (the streak's
       first step is kept for the reason). A finite non-passing check at ``step >= min_steps``
       resets the streak to 0. Checks at ``step < min_steps`` never touch the streak.
    6. Onset is declared at the ``patience``-th consecutive exceeding check: that check returns
       ``onset=True``, ``memorizing=True`` and sets :attr:`onset_step` to its step.
    7. After onset every check returns ``onset=False``, ``memorizing=True``, ``clean=False``.
    8. ``clean`` is True for a finite value that does not pass (rule 4) while not memorizing,
       also before ``min_steps`` (a passing value before ``min_steps`` is not counted, but is
       not clean either). :attr:`last_clean_step` is the step of the latest clean check.

    Args:
        threshold: absolute limit on the value (e.g. 0.5 for ``memorized_fraction``); ``None``
            to use only ``min_delta``.
        min_delta: limit relative to the baseline, ``>= 0``; ``None`` to use only ``threshold``.
        baseline_checks: number of finite checks at ``step >= min_steps`` averaged into the
            baseline, ``>= 1``.
        patience: consecutive exceeding checks needed to declare onset, ``>= 1``.
        min_steps: checks before this global step do not count toward onset, ``>= 0``.
        mode: ``"max"`` if larger values mean memorization, ``"min"`` if smaller do (e.g. LID).
        monitor: name of the value, used in reasons only.

    Raises:
        ValueError: ``patience < 1``, ``baseline_checks < 1``, ``min_steps < 0``, ``mode`` not in
            ``("max", "min")``, ``min_delta < 0``, a non-finite ``threshold`` or ``min_delta``,
            or both ``threshold`` and ``min_delta`` None.

    Example:
        >>> det = OnsetDetector(threshold=0.5, patience=2, monitor="memorized_fraction")
        >>> for step, value in [(100, 0.1), (200, 0.7), (300, 0.2), (400, 0.6), (500, 0.8)]:
        ...     d = det.update(step, value)
        ...     print(step, d.onset, d.memorizing, d.clean)
        100 False False True
        200 False False False
        300 False False True
        400 False False False
        500 True True False
        >>> d.reason
        'memorized_fraction=0.8 > 0.5 for 2 consecutive checks since step 400 (baseline 0.3333)'
        >>> det.onset_step, det.last_clean_step
        (500, 300)
    """

    def __init__(
        self,
        threshold: float | None = 0.5,
        min_delta: float | None = None,
        baseline_checks: int = 3,
        patience: int = 2,
        min_steps: int = 0,
        mode: str = "max",
        monitor: str = "value",
    ) -> None:
        if mode not in _MODES:
            raise MemwatchError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if threshold is None and min_delta is None:
            raise MemwatchError(
                "`threshold` and `min_delta` are both None; give at least one "
                "(an absolute limit, a limit relative to the baseline, or both)"
            )
        if threshold is not None and not math.isfinite(float(threshold)):
            raise MemwatchError(f"`threshold` must be a finite float or None, got {threshold!r}")
        if min_delta is not None and not (math.isfinite(float(min_delta)) and min_delta >= 0):
            raise MemwatchError(f"`min_delta` must be a finite float >= 0 or None, got {min_delta!r}")
        for name, value, low in (
            ("baseline_checks", baseline_checks, 1),
            ("patience", patience, 1),
            ("min_steps", min_steps, 0),
        ):
            check_int(name, value, low)
        self.threshold = None if threshold is None else float(threshold)
        self.min_delta = None if min_delta is None else float(min_delta)
        self.baseline_checks = baseline_checks
        self.patience = patience
        self.min_steps = min_steps
        self.mode = mode
        self.monitor = monitor

        self.history: list[tuple[int, float]] = []
        self.baseline: float | None = None
        self.onset_step: int | None = None
        self.last_clean_step: int | None = None
        self._baseline_values: list[float] = []
        self._streak = 0
        self._streak_start: int | None = None

    @property
    def memorizing(self) -> bool:
        """True from the onset on."""
        return self.onset_step is not None

    @property
    def streak(self) -> int:
        """Consecutive exceeding checks in the current streak (frozen at ``patience`` after onset)."""
        return self._streak

    def _passes(self, value: float, baseline: float | None) -> tuple[bool, str]:
        """Pure rule 4: does a finite ``value`` pass, and the comparison as text."""
        sign = 1.0 if self.mode == "max" else -1.0
        op = ">" if self.mode == "max" else "<"
        parts = []
        if self.threshold is not None and sign * (value - self.threshold) > 0:
            parts.append(f"{op} {_fmt(self.threshold)}")
        if self.min_delta is not None and baseline is not None:
            limit = baseline + sign * self.min_delta
            if sign * (value - limit) > 0:
                pm = "+" if sign > 0 else "-"
                parts.append(f"{op} baseline {_fmt(baseline)} {pm} {_fmt(self.min_delta)}")
        return bool(parts), " and ".join(parts)

    def update(self, step: int, value: float) -> OnsetDecision:
        """Feed one check (its global ``step`` and the monitored ``value``) and get the decision.

        Raises:
            MemwatchError: ``step`` is not an int or ``value`` is not convertible to float.
        """
        try:
            step = operator.index(step)
        except TypeError:
            raise MemwatchError(f"`step` must be an int, got {type(step).__name__}") from None
        try:
            value = float(value)  # also a 0-d tensor
        except (TypeError, ValueError, RuntimeError):
            raise MemwatchError(f"`value` must be a float, got {value!r}") from None
        self.history.append((step, value))
        name = f"{self.monitor}={_fmt(value)}"

        if not math.isfinite(value):  # rule 2
            state = (
                f"memorizing since step {self.onset_step}"
                if self.memorizing
                else (f"streak unchanged at {self._streak}/{self.patience}")
            )
            return OnsetDecision(False, self.memorizing, False, f"{name} is not finite; ignored ({state})")

        baseline_before = self.baseline
        baseline_text = _baseline_text(list(self._baseline_values), self.baseline_checks)  # before this check
        counted = step >= self.min_steps
        if counted and self.baseline is None:  # rule 3
            self._baseline_values.append(value)
            if len(self._baseline_values) == self.baseline_checks:
                self.baseline = sum(self._baseline_values) / self.baseline_checks
        passes, how = self._passes(value, baseline_before)

        if self.memorizing:  # rule 7
            return OnsetDecision(False, True, False, f"{name}; memorizing since step {self.onset_step}")

        if not passes:  # rule 8 (and rule 5's reset)
            if counted:
                self._streak, self._streak_start = 0, None
            self.last_clean_step = step
            return OnsetDecision(False, False, True, f"{name} within limits ({baseline_text})")

        if not counted:
            return OnsetDecision(False, False, False, f"{name} {how}, not counted before min_steps={self.min_steps}")

        self._streak += 1  # rule 5
        if self._streak_start is None:
            self._streak_start = step
        span = (
            f"for {self._streak} consecutive check{'s' if self._streak > 1 else ''} "
            f"since step {self._streak_start} ({baseline_text})"
        )
        if self._streak >= self.patience:  # rule 6
            self.onset_step = step
            return OnsetDecision(True, True, False, f"{name} {how} {span}")
        return OnsetDecision(False, False, False, f"{name} {how} {span}; onset at {self.patience}")

    def state_dict(self) -> dict[str, Any]:
        """Counters, baseline and history as plain Python types.

        Safe for ``torch.load(weights_only=True)`` and JSON; the configuration is not included.
        """
        return {
            "history": [[s, v] for s, v in self.history],
            "baseline_values": list(self._baseline_values),
            "baseline": self.baseline,
            "streak": self._streak,
            "streak_start": self._streak_start,
            "onset_step": self.onset_step,
            "last_clean_step": self.last_clean_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the configuration comes from ``__init__``."""
        self.history = [(int(s), float(v)) for s, v in state_dict["history"]]
        self._baseline_values = [float(v) for v in state_dict["baseline_values"]]
        self.baseline = None if state_dict["baseline"] is None else float(state_dict["baseline"])
        self._streak = int(state_dict["streak"])
        self._streak_start = state_dict["streak_start"]
        self.onset_step = state_dict["onset_step"]
        self.last_clean_step = state_dict["last_clean_step"]
