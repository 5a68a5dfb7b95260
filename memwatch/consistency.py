"""Whether the prediction type and the schedule fit the network: a denoising check on training samples.

A wrong pair (a flow-matching network read as ``v_prediction`` on a VP schedule, an x₀ network
read as ε, …) still gives a score, and a score gives finite numbers. What it does not give is a
denoiser. With ``x_t = α_t x₀ + σ_t ε`` at a training sample ``x₀``, each prediction type ``p``
reads the network's output as ``ε̂_p = a_p · output + c_p(x_t)`` (:func:`memwatch.score.eps_offset`
is ``c_p``), so the output has to explain ``ε - c_p(x_t)``: the noise for an ε network, the sample
for an x₀ one (scaled), the velocity for a flow one. Per noise level and reading, in units of ε:

    r_p = E‖ε̂_p - ε‖² / d                              (the reading's denoising error)
    u_p = r_p / (E‖ε - c_p(x_t) - mean‖² / d)            (the share of its target it leaves unexplained)

A trained network explains its own target better than the target's mean does (``u < 1``) at the
levels it was trained on; read as another type it leaves a share ≥ 1 somewhere, or explains it
but denoises clearly worse than its own reading. :func:`check_consistency` reads the output of one
forward pass per level under every prediction type the schedule admits
(:meth:`memwatch.DiffusionScore.noise_estimates`), at a small level τ (the monitor's primary one,
data units ``σ_t/α_t``) and at ``LARGE_FACTOR · τ``. A reading *explains* the network when
``u < DENOISES`` at τ and ``u < 1`` at the large level. Then:

* ``"wrong"``: an explaining reading *dominates* the configured one (denoises within ``TIE`` of it
  at both levels and ``BETTER`` times better at one); where none of this schedule does and the
  configured one does not explain, a reading of the *other family's* schedule on the same time
  axis that dominates it (flow matching for a DDPM / VP schedule, DDPM / VP for a flow one: the
  plausible mix-up, :func:`other_family`): the network's output reads as that one (named, with
  its schedule);
* ``"fits"``: else, when the configured reading explains;
* ``"undecided"``: else — an untrained network (its output is noise), one trained on a schedule
  neither family's reading here matches, or a wrong reading no other one beats by enough. It
  cannot tell those apart, so it says so and judges nothing.

Explaining alone does not make a rival: where the best ε̂ is nearly proportional to ``x_t`` (data
with as many dimensions as it has, at a small level) a scaled identity explains an x₀ target too,
so a rival must also denoise clearly better.

The rules were set on the exact denoisers of a Gaussian mixture (every pair of the four schedules
below read with every other prediction: all right), on 64-dimensional digits MLPs trained 300 and
1000 steps with each schedule × prediction pair (read with its own: 26 of 32 ``"fits"`` and 6
``"undecided"``, never ``"wrong"``; of the 96 other readings of the same schedule, 72 ``"wrong"``
with the right one named and 24 ``"undecided"``: networks whose own reading does not explain
yet — EDM's score network never learns — and ε networks read as v on DDPM / EDM or as the flow
velocity, which their ε reading beats by less than ``BETTER``) and on untrained ones
(``"undecided"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.operators import map_chunks
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore, eps_offset, predictions_for

__all__ = [
    "BETTER", "DENOISES", "LARGE_FACTOR", "TIE", "Consistency", "check_consistency", "other_family",
    "timestep_for_level",
]  # fmt: skip

#: the large level is this multiple of the small one (data units)
LARGE_FACTOR = 10.0
#: a reading explains the network when the share it leaves unexplained at the small level is below this
DENOISES = 0.9
#: a reading dominates another when its error is within ``TIE`` times the other's at both levels ...
TIE = 1.25
#: ... and ``BETTER`` times smaller at one
BETTER = 2.0


@dataclass(frozen=True)
class Consistency:
    """What :func:`check_consistency` found.

    Attributes:
        prediction: the configured prediction type; schedule: the schedule's kind.
        verdict: ``"fits"``, ``"wrong"`` or ``"undecided"`` (see the module docstring).
        timesteps: the two timesteps measured (small level first).
        errors: prediction type -> its denoising error ``r`` at each level (units of ε, per dimension).
        unexplained: prediction type -> the share ``u`` of its target it leaves unexplained at each level.
        better: with ``"wrong"``, the reading the network's output reads as.
        better_schedule: its schedule's kind when that is the other family's (``None``: this schedule).
    """

    prediction: str
    schedule: str
    verdict: str
    timesteps: tuple[float, float]
    errors: dict[str, tuple[float, float]]
    unexplained: dict[str, tuple[float, float]] = field(default_factory=dict)
    better: str | None = None
    better_schedule: str | None = None

    def describe(self) -> str:
        """The finding in words, naming the prediction, the schedule and the errors."""
        r, u = self.errors[self.prediction], self.unexplained[self.prediction]
        head = (
            f"prediction={self.prediction!r} on this {self.schedule} schedule: read so, the network's output misses "
            f"the noise of training samples by r = {r[0]:.3g} and {r[1]:.3g} (units of the noise) and leaves "
            f"{u[0]:.3g} and {u[1]:.3g} of its target unexplained (1: no better than the target's mean) at "
            f"t = {self.timesteps[0]:g} and {self.timesteps[1]:g}"
        )
        if self.verdict != "wrong" or self.better is None:
            return head
        where = "" if self.better_schedule is None else f" on a {self.better_schedule} schedule"
        return f"{head}; the network's output reads as prediction={self.better!r}{where} instead"


def check_consistency(
    score: DiffusionScore, x0: Tensor, level: float, *, generator: torch.Generator, max_batch: int | None = None
) -> Consistency:
    """Whether ``score``'s prediction type and schedule fit its network, from training samples.

    Args:
        score: the model's score (eval mode; a conditional model is read with its ``null_cond``).
        x0: ``[m, *shape]`` training samples (``m >= 2``), in the probes' space.
        level: the small noise level τ in data units (``σ_t/α_t``), ``> 0``; the large one is
            ``LARGE_FACTOR · τ``. Each maps to the timestep nearest it (:func:`timestep_for_level`).
        generator: source of the noise ``ε`` (one draw per sample and level; the other family's
            schedule, when read, sees the same draws).
        max_batch: rows per model call (default: all ``m`` at once; halved on out-of-memory).

    Returns:
        :class:`Consistency`.

    Raises:
        MemwatchError: fewer than two samples, or a level that is not finite and positive.
    """
    if x0.ndim < 2 or x0.shape[0] < 2:
        raise MemwatchError(f"`x0` must hold at least two samples [m, *shape], got shape {tuple(x0.shape)}")
    if not (math.isfinite(level) and level > 0):
        raise MemwatchError(f"`level` must be finite and > 0, got {level!r}")
    x0 = x0.to(score.device, torch.float32)
    noises = [torch.randn(x0.shape, generator=generator).to(x0.device) for _ in range(2)]
    mine = _Readings.measure(score, x0, noises, level, max_batch)
    verdict, better, better_schedule = _verdict(score.prediction, mine), None, None
    if verdict[0] == "undecided" and (other := other_family(score.schedule)) is not None:
        theirs = _Readings.measure(score.with_schedule(other, score.prediction if score.prediction in
                                   predictions_for(other) else "epsilon"), x0, noises, level, max_batch)  # fmt: skip
        found = theirs.dominating(mine.errors[score.prediction])
        if found is not None:
            verdict, better_schedule = ("wrong", found), other.kind
    verdict, better = verdict
    return Consistency(
        prediction=score.prediction,
        schedule=score.schedule.kind,
        verdict=verdict,
        timesteps=mine.timesteps,
        errors=mine.errors,
        unexplained=mine.unexplained,
        better=better,
        better_schedule=better_schedule,
    )


def other_family(schedule: NoiseSchedule) -> NoiseSchedule | None:
    """The other family's schedule on the same time axis, for the flow-matching / diffusion mix-up:
    flow matching with ``T`` steps for a DDPM schedule of ``T`` steps (``t = σ·T``), with ``t = σ``
    for a VP one; DDPM (linear betas) for a flow schedule in diffusers' units ``t = σ·T``, VP for
    one with ``t = σ``. ``None`` for VE / EDM (no flow model shares its time axis).

    Example:
        >>> other_family(NoiseSchedule.linear(1000)).kind, other_family(NoiseSchedule.flow(1000)).num_timesteps
        ('flow', 1000)
    """
    if schedule.kind == "discrete":
        return NoiseSchedule.flow(schedule.num_timesteps)
    if schedule.kind == "vp":
        return NoiseSchedule.flow()
    if schedule.kind == "flow":
        return NoiseSchedule.linear(int(schedule.time_scale)) if schedule.time_scale > 1 else NoiseSchedule.vp()
    return None


def timestep_for_level(schedule: NoiseSchedule, level: float) -> float:
    """The timestep whose noise in data units ``σ_t/α_t`` is nearest ``level`` (in log scale),
    clamped to the schedule's range (for every kind; :meth:`NoiseSchedule.timestep_for_sigma`
    speaks ``σ_t`` for DDPM / VP).

    Example:
        >>> timestep_for_level(NoiseSchedule.flow(1000), 1.0), timestep_for_level(NoiseSchedule.edm(), 3.0)
        (500.0, 3.0)
    """
    if schedule.kind in ("flow", "ve"):
        return float(schedule.timestep_for_sigma(level))
    if schedule.is_discrete:
        grid = torch.arange(schedule.num_timesteps, dtype=torch.float64)
    else:
        grid = torch.linspace(schedule.t_min, schedule.t_max, 4097, dtype=torch.float64)
    ratio = schedule.sigma(grid) / schedule.alpha(grid)
    return float(grid[(ratio.log() - math.log(level)).abs().argmin()])


@dataclass(frozen=True)
class _Readings:
    """``r`` and ``u`` of every prediction type a schedule admits, at the two levels."""

    timesteps: tuple[float, float]
    errors: dict[str, tuple[float, float]]
    unexplained: dict[str, tuple[float, float]]

    @classmethod
    def measure(
        cls, score: DiffusionScore, x0: Tensor, noises: list[Tensor], level: float, max_batch: int | None
    ) -> _Readings:
        schedule = score.schedule
        timesteps = (timestep_for_level(schedule, level), timestep_for_level(schedule, LARGE_FACTOR * level))
        names = predictions_for(schedule)
        errors: dict[str, list[float]] = {p: [] for p in names}
        unexplained: dict[str, list[float]] = {p: [] for p in names}
        for t, eps in zip(timesteps, noises):
            alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
            xt = alpha * x0 + sigma * eps

            def rows(r: slice, xt: Tensor = xt, eps: Tensor = eps, t: float = t) -> tuple[Tensor, ...]:
                with torch.no_grad():
                    readings = score.noise_estimates(xt[r], t)
                return tuple((readings[p] - eps[r]).double().square().flatten(1).mean(1) for p in names)

            for p, per_row in zip(names, map_chunks(rows, x0.shape[0], max_batch)):
                target = (eps - eps_offset(p, xt, alpha, sigma)).double()
                r = float(per_row.mean())
                errors[p].append(r)
                unexplained[p].append(r / float((target - target.mean(0)).square().mean()))
        return cls(
            timesteps=timesteps,
            errors={p: (v[0], v[1]) for p, v in errors.items()},
            unexplained={p: (v[0], v[1]) for p, v in unexplained.items()},
        )

    def explains(self, p: str) -> bool:
        u = self.unexplained[p]
        return u[0] < DENOISES and u[1] < 1.0  # NaN: no

    def dominating(self, errors: tuple[float, float], exclude: str | None = None) -> str | None:
        """The explaining reading (other than ``exclude``) that dominates a reading of ``errors``
        (denoises within ``TIE`` of it at both levels and ``BETTER`` times better at one), the
        best of them, or ``None``."""
        found = [
            q
            for q in self.errors
            if q != exclude
            and self.explains(q)
            and all(rq <= TIE * r for rq, r in zip(self.errors[q], errors))
            and any(BETTER * rq <= r for rq, r in zip(self.errors[q], errors))
        ]
        return min(found, key=lambda q: sum(self.errors[q]), default=None)


def _verdict(prediction: str, readings: _Readings) -> tuple[str, str | None]:
    """``(verdict, better)`` on one schedule, by the rules of the module docstring."""
    better = readings.dominating(readings.errors[prediction], exclude=prediction)
    if better is not None:
        return "wrong", better
    return ("fits" if readings.explains(prediction) else "undecided"), None
