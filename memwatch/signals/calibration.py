"""The calibration signal: the noise levels of ``sigmas="auto"``, from the training samples seen.

Until the first check it holds distinct training samples of the batches (in memory only,
:class:`memwatch.calibration.Reservoir`); at the first check rank zero measures their median
nearest-neighbour distance and the levels ``probes.sigma_factors`` × that distance (clamped inside
the schedule and below the sampler's first step), which every rank then uses; the monitor then
frees the samples unless the copies signal reads the batches too. The levels are kept in the monitor's state, so a
resumed run measures where it did (its samples were never saved).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from memwatch.calibration import DataScale, data_scale, level_range, relative_sigmas
from memwatch.errors import MemwatchError
from memwatch.intake import TrainingSamples
from memwatch.probes import first_sampler_timestep
from memwatch.schedules import NoiseSchedule
from memwatch.signals.base import Run, Signal
from memwatch.signals.context import SignalContext

__all__ = ["CalibrationSignal"]


class CalibrationSignal(Signal):
    """Noise levels relative to the training data's spacing (see the module docstring).

    Args:
        factors: ``probes.sigma_factors``.
        held: ``() ->`` the monitor's training samples (``None`` once it has freed them).
        first_timestep: ``schedule -> the timestep the probes' sampler starts at``.
        on_levels: called with the calibrated σ_t once they are fixed (the monitor measures there).
        seed: seed of the distance estimate's subsample.
    """

    name = "calibration"

    def __init__(
        self,
        factors: Sequence[float],
        *,
        held: Callable[[], TrainingSamples | None],
        first_timestep: Callable[[NoiseSchedule], float],
        on_levels: Callable[[tuple[float, ...]], None],
        seed: int,
    ) -> None:
        self.factors = tuple(factors)
        self.held = held
        self.first_timestep = first_timestep
        self.on_levels = on_levels
        self.seed = seed
        self.sigmas: tuple[float, ...] | None = None
        self.scale: DataScale | None = None

    @property
    def pending(self) -> bool:
        """Whether the levels are still to be fixed (the monitor then holds training samples for them)."""
        return self.sigmas is None

    def levels_for(self, samples: Tensor, schedule: NoiseSchedule) -> tuple[DataScale, tuple[float, ...]]:
        """The samples' scale and the noise levels calibrated from them (no state changes)."""
        floor, ceiling = level_range(schedule)
        first = float(schedule.noise_level(self.first_timestep(schedule)))  # the probes start there
        scale = data_scale(samples, generator=torch.Generator().manual_seed(self.seed + 2))
        return scale, relative_sigmas(scale, schedule, self.factors, floor=floor, ceiling=min(ceiling, first))

    def use(self, scale: DataScale | None, sigmas: tuple[float, ...]) -> None:
        """Keep the calibrated levels and measure at them from now on."""
        self.scale, self.sigmas = scale, tuple(sigmas)
        self.on_levels(self.sigmas)

    def fit_data(self, run: Run, samples: Tensor) -> None:
        """The levels calibrated from ``samples`` (rank-local: every rank is given the same)."""
        self.use(*self.levels_for(samples, run.score.schedule))

    def before_check(self, run: Run) -> None:
        """At the first check: rank zero's levels on every rank; then the samples are freed.

        Raises:
            MemwatchError: on every rank alike, when rank zero could not calibrate (e.g. fewer
                than two distinct training samples seen); the check is then skipped.
        """
        if self.sigmas is not None:
            return
        found, error = None, None
        if run.is_global_zero:
            try:
                held = self.held()
                if held is None or len(held) == 0:
                    raise MemwatchError("no training sample was taken from the batches (see the warnings above)")
                found = self.levels_for(held.samples, run.score.schedule)
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = f"{type(err).__name__}: {err}"
        found, error = run.broadcast((found, error))
        if error is not None:
            raise MemwatchError(f"sigmas='auto' could not calibrate the noise levels: {error}")
        self.use(*found)

    def state_dict(self) -> dict[str, Any]:
        return {"calibrated_sigmas": self.sigmas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("calibrated_sigmas") is not None:
            self.sigmas = tuple(state["calibrated_sigmas"])


def build(context: SignalContext) -> CalibrationSignal | None:
    """The calibration signal (with ``sigmas="auto"``)."""
    if not context.calibrating:
        return None
    steps = context.probes.sampler_steps
    return CalibrationSignal(
        context.probes.sigma_factors,
        held=context.held,
        first_timestep=lambda schedule: first_sampler_timestep(schedule, steps),
        on_levels=context.use_levels,
        seed=context.seed,
    )
