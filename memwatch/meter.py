"""``ProbeMeter``: how a check measures its probes — the core measurement every signal reads.

The meter holds what :meth:`memwatch.probes.ProbeSet.measure` is called with at every check:

* the **evaluation timesteps** (primary first), fixed at the run's start or by the calibration;
* the **sharpness settings**, resolved for the sample dimension ``d`` and the device once the
  probes' shape is known: at image scale (``method="auto"``, ``d >`` :data:`memwatch.sharpness.DENSE_MAX_DIM`)
  the cheap trace tier at every check and the Lanczos spectrum every
  ``spectrum_every_n_checks``-th check on ``spectrum_probes`` probes; every model call bounded
  by the memory there is (:func:`memwatch.memory.default_max_batch`) unless ``max_batch`` is given;
* the **conditions** of a classifier-free-guidance model (``probes.conditions``), parsed again
  once the null condition's shape is known, with one dry call of the model.

The signals read what it measured from the check's :class:`memwatch.probes.ProbeMeasurement`
(``Draft.measurement``); the monitor owns the meter (:class:`memwatch.probing.Probing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from memwatch.conditional import parse_conditions
from memwatch.discovery import check_score
from memwatch.errors import MemwatchError
from memwatch.memory import default_max_batch
from memwatch.probes import ProbeMeasurement, ProbeSet
from memwatch.score import DiffusionScore
from memwatch.sharpness import DENSE_MAX_DIM, SharpnessOptions
from memwatch.timing import PhaseClock
from memwatch.validation import check_int

__all__ = ["ProbeMeter"]


class ProbeMeter:
    """What a check measures of its probes, and how (see the module docstring).

    Args:
        options: the spectrum settings as the user gave them (``SharpnessCheckOptions.measure_options()``).
        spectrum_every_n_checks: on the trace tier, the Lanczos spectrum every n-th check (≥ 1).
        spectrum_probes: the spectrum on this many probes per process (``None``: all of them).
        conditions: ``probes.conditions`` as the user gave them (``None``: an unconditional check).
        condition_first_steps: noisiest sampler steps the conditional metrics average over.

    Attributes:
        timesteps: the evaluation timesteps, primary first (empty until :meth:`use_timesteps`).
        options: the settings every check measures with (resolved by :meth:`prepare`).
        tiered: whether the trace tier runs at every check and the spectrum every n-th.
        conditions: condition name → its condition tensor (empty without ``conditions``).
    """

    def __init__(
        self,
        options: SharpnessOptions,
        spectrum_every_n_checks: int = 1,
        spectrum_probes: int | None = None,
        conditions: Any = None,
        condition_first_steps: int | None = None,
    ) -> None:
        self.given, self.given_conditions = options, conditions
        self.spectrum_every_n_checks = check_int("sharpness.spectrum_every_n_checks", spectrum_every_n_checks, 1)
        self.spectrum_probes = spectrum_probes
        self.condition_first_steps = condition_first_steps
        self.timesteps: list[float] = []
        self.options = options
        self.tiered = False
        self.conditions: dict[str, Tensor] = {} if conditions is None else parse_conditions(conditions)

    @property
    def max_batch(self) -> int | None:
        """Rows per model call (the resolved bound once :meth:`prepare` ran; ``None``: unbounded)."""
        return self.options.max_batch

    def use_timesteps(self, timesteps: Sequence[float]) -> None:
        """Measure at these evaluation timesteps (primary first) from now on."""
        self.timesteps = list(timesteps)

    def prepare(self, score: DiffusionScore, shape: tuple[int, ...], device: torch.device) -> None:
        """Resolve the settings for probes of ``shape`` on ``device`` (the trace tier at image scale,
        a memory bound), and parse the conditions for ``score`` with one dry call of the first.

        Raises:
            MemwatchError: ``k`` (or another spectrum setting) does not fit the sample dimension,
                or a condition does not fit the model.
        """
        dim = math.prod(shape)
        base = self.given
        if base.k > dim:
            raise MemwatchError(f"`sharpness.k`={base.k} is larger than the sample dimension d={dim} (shape {shape})")
        base.check_dim(dim)
        self.tiered = base.method == "auto" and dim > DENSE_MAX_DIM
        resolved = base.replace(method="trace") if self.tiered else base
        if base.max_batch is None:  # every model call of a check bounded by the memory there is
            resolved = resolved.replace(max_batch=default_max_batch(dim, device=device))
        self.options = resolved
        if self.given_conditions is not None:
            self.conditions = parse_conditions(self.given_conditions, null_cond_shape=score.cond_shape)
            for cond in list(self.conditions.values())[:1]:
                check_score(score, shape, device=device, cond=cond)

    def spectrum_options(self, checks_done: int) -> SharpnessOptions | None:
        """The Lanczos settings when a check after ``checks_done`` others also measures the
        spectrum (every n-th check of the trace tier); ``None`` otherwise."""
        due = self.tiered and checks_done % self.spectrum_every_n_checks == 0
        return self.options.replace(method="lanczos") if due else None

    def measure(
        self,
        probes: ProbeSet,
        score: DiffusionScore,
        *,
        rows: slice = slice(None),
        device: torch.device | None = None,
        checks_done: int = 0,
        data_range: tuple[float, float] | None = None,
        clock: PhaseClock | None = None,
    ) -> ProbeMeasurement:
        """Draw the probes ``rows`` of ``probes`` from ``score`` and measure them as a check after
        ``checks_done`` others does (:meth:`memwatch.probes.ProbeSet.measure`; the spectrum when due,
        each condition's probes), each phase timed on ``clock``.

        Raises:
            MemwatchError: the meter has no timesteps (:meth:`use_timesteps`) or ``probes`` are
                measured at others.
        """
        if not self.timesteps or list(probes.timesteps) != self.timesteps:
            raise MemwatchError(
                f"the probes are measured at {list(probes.timesteps)}, the meter at {self.timesteps}: "
                "fix the evaluation timesteps first (use_timesteps)"
            )
        return probes.measure(
            score,
            options=self.options,
            spectrum_options=self.spectrum_options(checks_done),
            spectrum_probes=self.spectrum_probes,
            rows=rows,
            device=device,
            conditions=self.conditions or None,
            condition_first_steps=self.condition_first_steps,
            data_range=data_range,
            clock=clock,
        )
