"""Whether the prediction type and the schedule fit the network: a denoising check on training samples.

A wrong pair (a flow-matching network read as ``v_prediction`` on a VP schedule, an x₀ network
read as ε, …) still gives a score, and a score gives finite numbers. What it does not give is a
denoiser: with ``x_t = α_t x₀ + σ_t ε`` at a training sample ``x₀``, Tweedie's x̂₀ of the pair's
score misses ``x₀`` by ``(σ_t/α_t)(ε̂ - ε)``, and the posterior mean beats any other estimate —
in particular the two trivial ones, leaving the noise in (``x̂₀ = x_t/α_t``) and answering the
training mean (``x̂₀ = x̄``). Per noise level, in units of the noise itself:

    r = E‖ε̂ - ε‖² / d                           (the pair's relative denoising error)
    b = min(1, α_t² E‖x₀ - x̄‖² / (σ_t² d))     (the better trivial denoiser's)

:func:`check_consistency` reads the network's output under every prediction type the schedule
admits (one forward pass per level, :meth:`memwatch.DiffusionScore.noise_estimates`) at a small
level τ (the monitor's primary one, data units ``σ_t/α_t``) and at ``LARGE_FACTOR · τ``:

* ``"fits"``: the configured reading denoises at the small level (``r < DENOISES``; 1 is
  leaving the noise in) and stays within ``MISFIT_FACTOR · b`` at both levels;
* ``"wrong"``: it does not denoise at the small level and misfits at a level where another
  reading, which fits (as above), is ``MISFIT_FACTOR`` times better: the network's output reads
  as that prediction (named);
* ``"undecided"``: anything else — an untrained network (its output is noise: no reading
  denoises), a network not trained at the large level (EDM's ε at σ far above its training
  range), a schedule the network was not trained on. It cannot tell those apart, so it says so
  and judges nothing.

The rules were set on tiny MLPs trained 0 to 400 steps on digits and on four 2-D points, every
schedule × prediction pair of ``tests/model_setups.py`` read with its own pair (never ``"wrong"``)
and with the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.operators import map_chunks
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore, predictions_for

__all__ = ["DENOISES", "LARGE_FACTOR", "MISFIT_FACTOR", "Consistency", "check_consistency", "timestep_for_level"]

#: the large level is this multiple of the small one (data units)
LARGE_FACTOR = 10.0
#: a reading misfits at a level where its error exceeds this multiple of the trivial denoisers'
MISFIT_FACTOR = 4.0
#: a reading denoises when its error at the small level is below this (1 = leaving the noise in)
DENOISES = 0.9


@dataclass(frozen=True)
class Consistency:
    """What :func:`check_consistency` found.

    Attributes:
        prediction: the configured prediction type; schedule: the schedule's kind.
        verdict: ``"fits"``, ``"wrong"`` or ``"undecided"`` (see the module docstring).
        timesteps: the two timesteps measured (small level first).
        errors: prediction type -> its relative denoising error ``r`` at each timestep.
        baseline: ``b`` at each timestep.
        better: with ``"wrong"``, the reading that fits (``None`` when none does).
    """

    prediction: str
    schedule: str
    verdict: str
    timesteps: tuple[float, float]
    errors: dict[str, tuple[float, float]]
    baseline: tuple[float, float]
    better: str | None = None

    def describe(self) -> str:
        """The finding in words, naming the prediction, the schedule and the errors."""
        r = self.errors[self.prediction]
        head = (
            f"prediction={self.prediction!r} on this {self.schedule} schedule: its x̂₀ misses the training samples "
            f"by r = {r[0]:.3g} and {r[1]:.3g} of the noise at t = {self.timesteps[0]:g} and {self.timesteps[1]:g}, "
            f"where leaving the noise in or answering the training mean misses by {self.baseline[0]:.3g} and "
            f"{self.baseline[1]:.3g}"
        )
        if self.verdict == "wrong" and self.better is not None:
            return f"{head}; the network's output reads as prediction={self.better!r} instead"
        return head


def check_consistency(
    score: DiffusionScore, x0: Tensor, level: float, *, generator: torch.Generator, max_batch: int | None = None
) -> Consistency:
    """Whether ``score``'s prediction type and schedule fit its network, from training samples.

    Args:
        score: the model's score (eval mode; a conditional model is read with its ``null_cond``).
        x0: ``[m, *shape]`` training samples (``m >= 2``), in the probes' space.
        level: the small noise level τ in data units (``σ_t/α_t``), ``> 0``; the large one is
            ``LARGE_FACTOR · τ``. Each maps to the timestep nearest it (:func:`timestep_for_level`).
        generator: source of the noise ``ε`` (one draw per sample and level).
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
    schedule = score.schedule
    timesteps = (timestep_for_level(schedule, level), timestep_for_level(schedule, LARGE_FACTOR * level))
    x0 = x0.to(score.device, torch.float32)
    spread = float((x0 - x0.mean(0)).double().square().mean())  # E‖x₀ - x̄‖² / d
    names = predictions_for(schedule)
    errors: dict[str, list[float]] = {p: [] for p in names}
    baseline = []
    for t in timesteps:
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = alpha * x0 + sigma * eps

        def rows(r: slice, xt: Tensor = xt, eps: Tensor = eps, t: float = t) -> tuple[Tensor, ...]:
            with torch.no_grad():
                readings = score.noise_estimates(xt[r], t)
            return tuple((readings[p] - eps[r]).double().square().flatten(1).mean(1) for p in names)

        for p, per_row in zip(names, map_chunks(rows, x0.shape[0], max_batch)):
            errors[p].append(float(per_row.mean()))
        baseline.append(min(1.0, alpha**2 * spread / sigma**2))
    verdict, better = _verdict(score.prediction, errors, baseline)
    return Consistency(
        prediction=score.prediction,
        schedule=schedule.kind,
        verdict=verdict,
        timesteps=timesteps,
        errors={p: (r[0], r[1]) for p, r in errors.items()},
        baseline=(baseline[0], baseline[1]),
        better=better,
    )


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


def _verdict(prediction: str, errors: dict[str, list[float]], baseline: list[float]) -> tuple[str, str | None]:
    """``(verdict, better)`` by the rules of the module docstring."""

    def fits(r: list[float]) -> bool:
        return r[0] < DENOISES and all(v <= MISFIT_FACTOR * b for v, b in zip(r, baseline))  # NaN: no

    mine = errors[prediction]
    if fits(mine):
        return "fits", None
    misfit = [not m <= MISFIT_FACTOR * b for m, b in zip(mine, baseline)]
    good = {
        p: sum(math.log(max(v, 1e-300)) for v in r)
        for p, r in errors.items()
        if p != prediction
        and not mine[0] < DENOISES
        and fits(r)
        and any(bad and m > MISFIT_FACTOR * v for bad, m, v in zip(misfit, mine, r))
    }
    if good:
        return "wrong", min(good, key=good.__getitem__)
    return "undecided", None
