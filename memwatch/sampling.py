"""Deterministic DDIM (η = 0) probe sampler.

One step from ``t`` to the next, less noisy ``t'`` (Song et al. 2021):

    ε̂ = -σ_t s(x_t, t),   x̂_0 = (x_t - σ_t ε̂) / α_t,   x_{t'} = α_{t'} x̂_0 + σ_{t'} ε̂.

The start noise comes from an explicit ``generator`` (drawn on the CPU, so the same seed gives
the same probes on every device) and the update has no randomness: the same seed and weights
give bit-identical probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.score import DiffusionScore

__all__ = ["Trajectory", "sample", "sample_trajectory", "probe_noise"]


@dataclass(frozen=True)
class Trajectory:
    """Result of :func:`sample_trajectory`.

    Attributes:
        samples: ``[n, *shape]`` final x̂_0.
        states: requested timestep → ``[n, *shape]`` state x_t the sampler passed through at that
            exact timestep (it is inserted into the sampling grid).
        timesteps: the grid that was followed, noisiest first.
    """

    samples: Tensor
    states: dict[float, Tensor] = field(default_factory=dict)
    timesteps: Tensor | None = None


def probe_noise(
    n: int, shape: Sequence[int], *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal start noise ``[n, *shape]`` drawn on the CPU from ``generator``."""
    return torch.randn((n, *shape), generator=generator, dtype=dtype)


def sample_trajectory(
    score: DiffusionScore,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 50,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    cond: Tensor | None = None,
    states_at: Sequence[float] = (),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Trajectory:
    """Run DDIM from Gaussian noise and keep the states at ``states_at``.

    Args:
        score: the model's score.
        n, shape: number and shape of probes (ignored when ``noise`` is given).
        steps: number of sampler steps (the grid of ``schedule.sampling_timesteps``).
        generator: source of the start noise.
        noise: explicit standard-normal start noise ``[n, *shape]`` instead of ``generator``.
        cond: condition for conditional / guided sampling (``[n, ...]`` or one condition).
        states_at: timesteps (schedule units) at which to record ``x_t``.
        device, dtype: where and in which precision to run (default: the model's first parameter).

    Returns:
        :class:`Trajectory` with samples ``[n, *shape]`` and the requested states.
    """
    schedule = score.schedule
    if noise is None:
        if n is None or shape is None:
            raise MemwatchError("pass `noise`, or both `n` and `shape`")
        if n < 1:
            raise MemwatchError(f"`n` must be positive, got {n}")
        noise = probe_noise(n, tuple(shape), generator=generator, dtype=dtype)
    device = torch.device(device) if device is not None else score.device
    checked = [float(schedule.check_t(t, "states_at")) for t in states_at]
    grid = _grid_with(schedule.sampling_timesteps(steps), checked)

    t0 = grid[:1]
    start_scale = (schedule.alpha_bar(t0) + schedule.sigma(t0) ** 2).sqrt().item()
    x = (noise * start_scale).to(device=device, dtype=dtype)
    states: dict[float, Tensor] = {}
    x0_hat = x
    with torch.no_grad():
        for i, t in enumerate(grid):
            if float(t) in checked:
                states[float(t)] = x.clone()
            alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
            eps = -sigma * score(x, t, cond)
            x0_hat = (x - sigma * eps) / alpha
            if i + 1 < len(grid):
                t_next = grid[i + 1]
                x = float(schedule.alpha(t_next)) * x0_hat + float(schedule.sigma(t_next)) * eps
    return Trajectory(samples=x0_hat, states=states, timesteps=grid)


def sample(
    score: DiffusionScore,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 50,
    **kwargs: object,
) -> Tensor:
    """DDIM samples ``[n, *shape]``; the keywords of :func:`sample_trajectory` apply.

    Example:
        >>> from memwatch.schedules import NoiseSchedule
        >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), NoiseSchedule.linear(100))
        >>> g = torch.Generator().manual_seed(0)
        >>> sample(score, n=3, shape=(2,), steps=10, generator=g).shape
        torch.Size([3, 2])
    """
    return sample_trajectory(score, n, shape, steps, **kwargs).samples  # type: ignore[arg-type]


def _grid_with(grid: Tensor, extra: list[float]) -> Tensor:
    """Sampling grid with the ``extra`` timesteps inserted, sorted noisiest first, unique."""
    if not extra:
        return grid
    merged = torch.cat([grid, torch.tensor(extra, dtype=grid.dtype)])
    return torch.unique(merged).flip(0)
