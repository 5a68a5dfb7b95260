"""The measuring half of :class:`memwatch.Monitor`: what a check measures, for any module.

:class:`Probing` finds the module's score and the probes' shape, fixes the evaluation levels
(``sigmas``, or the calibrated ones), validates every signal's data in the probes' space, and
draws and measures the probes with its :class:`memwatch.meter.ProbeMeter` — all a live check
does before its decision, and all that
``memwatch scan`` runs on saved checkpoints. The rest of the monitor — the intake, the order of
a check, the agreement of ranks, the onset decision, the clean weights, state and reporting —
is :mod:`memwatch.monitor`; the Lightning hooks are :mod:`memwatch.callback`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from memwatch.calibration import DataScale
from memwatch.collective import Collective, SingleProcess
from memwatch.discovery import ScoreFn, check_score, find_score, measured_score, sample_shape_of
from memwatch.errors import MemwatchError
from memwatch.intake import batch_range
from memwatch.meter import ProbeMeter
from memwatch.options import DataOptions, ProbeOptions
from memwatch.probes import ProbeMeasurement, ProbeSet, evaluation_grid
from memwatch.sampling import sampler_settings
from memwatch.score import device_of
from memwatch.signals import CalibrationSignal, CopySignal, Run, SharpnessCheckOptions, Signal
from memwatch.signals.registry import find
from memwatch.timing import PhaseClock

__all__ = ["Probing"]

_RANGE_BATCHES = 8  # training batches whose value range bounds the probes (without `data.data_range`)


class Probing:
    """Prepare, calibrate and measure a module as the monitor's checks do (the base of
    :class:`memwatch.Monitor`, which composes :attr:`signals` once it is built).

    Args:
        score_fn: ``module -> DiffusionScore`` (``None``: :func:`memwatch.discovery.find_score`).
        num_probes: probes per check.
        sigmas: ``"auto"`` or the evaluation noise levels.
        data, probes, sharpness: the monitor's option groups.

    Attributes:
        meter: how the probes are measured (:class:`memwatch.meter.ProbeMeter`: the timesteps,
            the resolved sharpness settings, the conditions).
        signals: the monitor's signals, in the order a check runs them (:mod:`memwatch.signals.registry`).
        sample_shape: the probes' shape once known.
        collective: how the ranks agree (:mod:`memwatch.collective`; one process until a run attaches its own).
    """

    def __init__(
        self,
        score_fn: ScoreFn | None,
        num_probes: int,
        sigmas: tuple[float, ...] | str,
        data: DataOptions,
        probes: ProbeOptions,
        sharpness: SharpnessCheckOptions,
    ) -> None:
        self.score_fn, self.num_probes, self.sigmas, self.data, self.probes = score_fn, num_probes, sigmas, data, probes
        self.sharpness = sharpness
        self.sample_shape: tuple[int, ...] | None = data.sample_shape
        self.signals: dict[str, Signal] = {}
        self.collective: Collective = SingleProcess()
        self._forget()

    def _forget(self) -> None:
        """Forget the model and what was learned of it (the signals are composed anew)."""
        s = self.sharpness
        self.meter = ProbeMeter(s.measure_options(), s.spectrum_every_n_checks, s.spectrum_probes,
                                self.probes.conditions, self.probes.condition_first_steps)  # fmt: skip
        self._found: Any = None
        self._module: nn.Module | None = None  # the module :meth:`prepare` found its score on
        self._probe_set: ProbeSet | None = None
        self._seen_range: tuple[float, float] | None = None  # of the first training batches
        self._range_batches = 0

    @property
    def calibrating(self) -> bool:
        """Whether the noise levels come from the training data (``sigmas="auto"``, no ``probes.timesteps``)."""
        return self.sigmas == "auto" and self.probes.timesteps is None

    @property
    def calibrated_sigmas(self) -> tuple[float, ...] | None:
        """With ``sigmas="auto"``: the levels fixed at the first check (``None`` before)."""
        calibration = find(self.signals, CalibrationSignal)
        return None if calibration is None else calibration.sigmas

    @property
    def data_scale(self) -> DataScale | None:
        """With ``sigmas="auto"``: the training samples' scale the levels were calibrated from."""
        calibration = find(self.signals, CalibrationSignal)
        return None if calibration is None else calibration.scale

    @property
    def reference(self) -> Tensor | None:
        """A tensor ``reference_data`` as checked at fit start: ``[N, *shape]`` in the probes'
        space (through ``data.encode_fn``); ``None`` otherwise (``"batches"`` included)."""
        copies = find(self.signals, CopySignal)
        return None if copies is None else copies.reference

    @property
    def probe_set(self) -> ProbeSet:
        """The probes: the same start noise, sampler and measurement at every check.

        Raises:
            MemwatchError: the probe shape is still unknown (pass ``data.sample_shape``).
        """
        if self.sample_shape is None:
            raise MemwatchError("memwatch could not infer the probe shape; pass `data.sample_shape`")
        if self._probe_set is None or self._probe_set.timesteps != self.meter.timesteps:
            p = self.probes
            self._probe_set = ProbeSet(
                self.sample_shape, self.num_probes, p.sampler_steps, self.meter.timesteps, p.seed, p.sampler
            )
        return self._probe_set

    @property
    def sampler_settings(self) -> dict[str, Any]:
        """The settings the probes are drawn with (:func:`memwatch.sampling.sampler_settings`);
        known once the score is found (:meth:`prepare`)."""
        if self._found is None:
            raise MemwatchError("the probes' sampler is known once the model is: call prepare(pl_module) first")
        return sampler_settings(self._found.schedule, self.probes.sampler_steps, self.probes.sampler)

    def prepare(self, pl_module: nn.Module) -> None:
        """Find the module's score, the evaluation timesteps and (when known) the probe shape, and
        validate them: what fit start does, callable without a Trainer (``memwatch scan``).

        Raises:
            MemwatchError: no score is found, or a setting does not fit the model.
        """
        self._found = find_score(pl_module, self.score_fn, ema_attr=self.probes.ema_attr)
        self._module = pl_module
        if not self.calibrating or self.calibrated_sigmas is not None:
            self.use_levels(self.calibrated_sigmas or self.sigmas)
        if self.sample_shape is None:
            self.sample_shape = sample_shape_of(self._found)
        if self.sample_shape is not None:
            self._validate(pl_module)

    def measure_check(
        self, pl_module: nn.Module, rows: slice = slice(None), clock: PhaseClock | None = None, checks: int = 0
    ) -> ProbeMeasurement:
        """Draw the probes ``rows`` from the module's current weights (the EMA's, if watched) and
        measure their sharpness (and conditional metrics) as a check does — without the other
        signals, metrics, decisions or logging; each phase timed on ``clock``
        (:meth:`memwatch.probes.ProbeSet.measure`). Call :meth:`prepare` first (fit start does) and
        run it under :func:`memwatch.probes.isolated`. ``checks``: the checks so far (the spectrum's
        cadence counts them).

        Raises:
            MemwatchError: the monitor is not prepared, or the probe shape is unknown.
        """
        if self._found is None:
            raise MemwatchError("call `prepare(pl_module)` (or fit) before measuring")
        with measured_score(self._found, pl_module, self.probes.ema_attr) as score:
            return self.meter.measure(
                self.probe_set,
                score,
                rows=rows,
                device=device_of(pl_module),
                checks_done=checks,
                data_range=self.data.data_range or _proper(self._seen_range),
                clock=clock,
            )

    def _scoring(self, pl_module: nn.Module) -> Callable[[], Any]:
        """``() ->`` a context holding the score as a check measures it (the EMA's, if watched)."""
        return functools.partial(measured_score, self._found, pl_module, self.probes.ema_attr)

    def calibrate(self, samples: Tensor) -> tuple[float, ...]:
        """Fix the noise levels of ``sigmas="auto"`` (and what else the signals fix from training
        samples: :meth:`fit_data`) from training samples ``[m, *shape]`` in the probes' space.
        Call after :meth:`prepare` (or fit start).

        Returns:
            The calibrated σ_t, one per factor (also :attr:`calibrated_sigmas`; :attr:`data_scale`).

        Raises:
            MemwatchError: the monitor does not calibrate, has not found its model yet, or the
                samples have fewer than two distinct rows.
        """
        if not self.calibrating:
            raise MemwatchError(
                f'calibrate() needs sigmas="auto" and no `probes.timesteps`; got sigmas={self.sigmas!r}'
            )
        self.fit_data(samples)
        assert self.calibrated_sigmas is not None
        return self.calibrated_sigmas

    def fit_data(self, samples: Tensor) -> None:
        """Fix what the signals fix from training samples — the calibrated noise levels, the LID
        signal's data LID — from these ``[m, *shape]`` in the probes' space, as a live run does from
        the batches at its first check (``memwatch scan`` with its data;
        :meth:`memwatch.signals.Signal.fit_data`). Call after :meth:`prepare` (or fit start).

        Raises:
            MemwatchError: the model is not found yet, or a signal cannot fit these samples (e.g.
                fewer than two distinct rows to calibrate from).
        """
        if self._found is None or self._module is None:
            raise MemwatchError("fitting to training data needs the model: call prepare(pl_module) first (fit start)")
        run = Run(self._module, self._found, tuple(self.sample_shape or samples.shape[1:]), self.collective)
        for signal in self.signals.values():  # in order: the calibration's levels first, then what is fitted at them
            signal.fit_data(run, samples)

    def use_levels(self, sigmas: Sequence[float] | str) -> None:
        """Measure at these noise levels (or ``probes.timesteps``) from now on."""
        levels = None if sigmas == "auto" else sigmas
        p = self.probes
        self.meter.use_timesteps(evaluation_grid(self._found.schedule, levels, p.timesteps, p.sampler_steps))

    def _validate(self, pl_module: nn.Module) -> None:
        """Once the probe shape is known: the spectrum settings fit it, one dry call of the score
        (the EMA's, if watched) on it, and the signals' data in its space. Configuration errors
        are raised whatever ``report.raise_errors`` says."""
        assert self.sample_shape is not None and self._found is not None
        self.sample_shape = tuple(self.sample_shape)
        with measured_score(self._found, pl_module, self.probes.ema_attr) as score:
            check_score(score, self.sample_shape, device=device_of(pl_module))
            self.meter.prepare(score, self.sample_shape, device_of(pl_module))
            run = Run(pl_module, score, self.sample_shape, self.collective)  # the DDP layout: shards of a reference
            for signal in self.signals.values():
                signal.prepare(run)

    @property
    def pending(self) -> bool:
        """Whether a signal still waits for training samples (the noise levels, the data LID)."""
        return any(signal.pending for signal in self.signals.values())

    def see_range(self, batch: Any) -> None:
        """Widen the value range the probes are bounded by with a training batch's (the first
        :data:`_RANGE_BATCHES` batches, without ``data.data_range``)."""
        if self.data.data_range is None and self._range_batches < _RANGE_BATCHES:
            self._seen_range = batch_range(batch, self.data.select, self._seen_range)
            self._range_batches += 1


def _proper(span: tuple[float, float] | None) -> tuple[float, float] | None:
    """A range seen in the batches, or ``None`` when it is a single value (one distinct sample)."""
    return span if span is None or span[0] < span[1] else None
