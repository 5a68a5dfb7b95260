"""What a signal is: the hooks a check calls, and what a signal sees of the run.

A check of :class:`memwatch.Monitor` runs in a fixed order on every rank:

1. the training samples staged since the last check are drained into what the signals read
   (:class:`memwatch.intake.TrainingSamples`: the calibration's reservoir, the copy index);
2. :meth:`Signal.before_check` — every rank, collectives allowed (calibration agrees here).
3. the probes are drawn and their sharpness measured by the monitor's meter
   (:class:`memwatch.meter.ProbeMeter`), into the check's :class:`memwatch.probes.ProbeMeasurement`;
4. :meth:`Signal.measure` — rank-local, in the isolation of the measurement (eval mode, frozen
   parameters, isolated RNG); a fault here makes only this signal's values NaN;
5. :meth:`Signal.contribute` — every rank, after every rank measured: collectives allowed; the
   signal adds its synced values to the :class:`Draft` and returns its reading (kept under its
   name, ``check.readings[name]`` of :class:`memwatch.reporting.CheckResult`), in the order of
   the monitor's signals (each after those it names in :attr:`Signal.after`: the sharpness
   summary reads the copies' ratios).

Each signal keeps its own state (:meth:`Signal.state_dict`), saved in the monitor's checkpoint
state under its :attr:`Signal.name`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from memwatch.collective import Collective, SingleProcess
from memwatch.probes import ProbeMeasurement
from memwatch.score import DiffusionScore, device_of
from memwatch.timing import PhaseClock

__all__ = ["Draft", "Run", "Signal", "contribute_all", "gathered", "measure_all", "nan_values", "timed"]


@dataclass
class Run:
    """What a signal sees of the run at its start and at a check.

    Attributes:
        module: the module under training (a LightningModule or any ``nn.Module``).
        score: its score as found at the start (or at this check).
        sample_shape: the probes' shape.
        collective: how the ranks agree (:mod:`memwatch.collective`; one process by default).
        step: the global step of the check (0 at the start).
        raise_errors: re-raise faults instead of warning.
    """

    module: nn.Module
    score: DiffusionScore
    sample_shape: tuple[int, ...]
    collective: Collective = field(default_factory=SingleProcess)
    step: int = 0
    raise_errors: bool = False

    @property
    def device(self) -> torch.device:
        """Where the module runs (:func:`memwatch.score.device_of`: a plain ``nn.Module`` too)."""
        return device_of(self.module)

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def rank(self) -> int:
        return self.collective.rank

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank zero's ``obj`` on every rank."""
        return self.collective.broadcast(obj)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one collective)."""
        return self.collective.all_true(flag)


@dataclass
class Draft:
    """A check being assembled: the probes' measurement, the values logged so far and the
    signals' readings, each under its signal's name (``CheckResult.readings``)."""

    measurement: ProbeMeasurement
    values: dict[str, float] = field(default_factory=dict)
    readings: dict[str, Any] = field(default_factory=dict)

    def with_measurement(self, **changes: Any) -> None:
        """Replace fields of the measurement (e.g. the copies' ``nn_ratio``)."""
        self.measurement = dataclasses.replace(self.measurement, **changes)


class Signal:
    """One thing a check measures. Subclasses override the hooks they need; the defaults do nothing.

    Attributes:
        name: the signal's key in the monitor's state and in its ``signals`` mapping.
        value_names: the values it logs (NaN when it could not measure at a check).
        phase_names: the names its hooks' costs are timed under (:meth:`phase`).
        after: the signals whose hooks run before this one's at a check, by name (those not
            composed impose nothing; ``"*"``: every other signal); the registry orders by them.
        reads_reservoir: it reads the training samples' reservoir at every check, so the monitor
            keeps the reservoir for the whole run (otherwise it is freed once nothing is :attr:`pending`).
    """

    name: ClassVar[str] = ""
    value_names: tuple[str, ...] = ()
    #: hook -> the name its cost is timed under (``memwatch/time/<name>``); default: the signal's name
    phase_names: ClassVar[Mapping[str, str]] = {}
    after: ClassVar[tuple[str, ...]] = ()
    reads_reservoir: ClassVar[bool] = False

    @property
    def pending(self) -> bool:
        """Whether the signal still waits for training samples to fix something from (the monitor
        holds them until no signal is pending)."""
        return False

    def phase(self, hook: str) -> str | None:
        """The phase ``hook`` (``"before_check"``, ``"measure"``, ``"contribute"``) is timed as, or
        ``None`` when this signal does not override it (it costs nothing)."""
        if getattr(type(self), hook) is getattr(Signal, hook):
            return None
        return self.phase_names.get(hook, self.name)

    def prepare(self, run: Run) -> None:
        """Fit start (or ``memwatch scan``): the probes' space is known; validate the signal's data there."""

    def fit_data(self, run: Run, samples: Tensor) -> None:
        """Fix what this signal fixes from training samples, from these ``[m, *shape]`` in the
        probes' space instead of the batches (``memwatch scan`` with its data; :meth:`memwatch.Monitor.calibrate`)."""

    def before_check(self, run: Run) -> None:
        """Every rank, before the probes are drawn; collectives allowed."""

    def measure(self, run: Run, score: DiffusionScore, measurement: ProbeMeasurement) -> Any:
        """Rank-local measurement at this check, in the isolation of the probes' measurement;
        what it returns is handed to :meth:`contribute`."""
        return None

    def contribute(self, run: Run, draft: Draft, measured: Any) -> Any:
        """Every rank, after every rank measured: add synced values to ``draft``; what it returns
        (its reading of this check, ``None``: none) is kept as ``check.readings[name]``."""
        return None

    def unmeasured(self, draft: Draft) -> None:
        """This signal failed on some rank at this check: its values are NaN."""
        draft.values.update(nan_values(self.value_names))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called only when the checkpoint holds this signal's state)."""


_FAILED = object()  # a signal's measurement that raised


def measure_all(
    signals: Mapping[str, Signal],
    run: Run,
    measurement: ProbeMeasurement,
    score: Callable[[], AbstractContextManager[DiffusionScore]],
    clock: PhaseClock | None = None,
) -> dict[str, Any]:
    """Every signal's rank-local :meth:`Signal.measure` (each in ``score()``'s context, timed on
    ``clock`` as its :meth:`Signal.phase`); a fault makes only that signal's values NaN (a
    warning), unless ``run.raise_errors`` on one process."""
    out = {}
    for name, signal in signals.items():
        try:
            with score() as measured, timed(clock, signal, "measure"):
                out[name] = signal.measure(run, measured, measurement)
        except Exception as err:  # noqa: BLE001 - the other signals still report
            if run.raise_errors and run.world_size == 1:
                raise
            warnings.warn(
                f"memwatch: the {name} signal failed at step {run.step}: {err!r}; its values are NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            out[name] = _FAILED
    return out


def contribute_all(
    signals: Mapping[str, Signal],
    run: Run,
    measurement: ProbeMeasurement,
    measured: Mapping[str, Any],
    clock: PhaseClock | None = None,
) -> Draft:
    """Every signal's synced values and readings, in order, into a new :class:`Draft` (each timed on
    ``clock``); a signal that failed on any rank is :meth:`Signal.unmeasured` on every rank
    (collectives on every rank)."""
    draft = Draft(measurement)
    for name, signal in signals.items():
        if run.all_true(measured.get(name) is not _FAILED):
            with timed(clock, signal, "contribute"):
                reading = signal.contribute(run, draft, measured.get(name))
            if reading is not None:
                draft.readings[name] = reading
        else:
            signal.unmeasured(draft)
    return draft


def timed(clock: PhaseClock | None, signal: Signal, hook: str) -> AbstractContextManager[None]:
    """``clock``'s phase for ``signal``'s ``hook`` (:meth:`Signal.phase`), or no timing."""
    phase = signal.phase(hook)
    return contextlib.nullcontext() if clock is None or phase is None else clock.phase(phase)


def nan_values(names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``{name: NaN}`` for values that were not measured."""
    return dict.fromkeys(names, math.nan)


def gathered(x: Tensor) -> Tensor:
    """``x`` of every rank, concatenated in rank order (shards may differ in length), on the CPU;
    ``x`` alone outside distributed runs."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x.cpu()
    return torch.cat([t.cpu() for t in gather_all_tensors(x)])
