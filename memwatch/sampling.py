"""Deterministic DDIM (η = 0) probe sampler, stepped the way the model's own pipeline steps.

One DDIM step from ``t`` to a less noisy ``t'`` (Song et al. 2021):

    ε̂ = -σ_t s(x_t, t),   x̂_0 = (x_t - σ_t ε̂) / α_t,   x_{t'} = α_{t'} x̂_0 + σ_{t'} ε̂.

Two implementations of that step, chosen by the score's schedule:

* **diffusers** — the schedule came from ``NoiseSchedule.from_diffusers(scheduler)`` and carries
  the scheduler's config. The probes are stepped by diffusers' own
  ``DDIMScheduler.from_config(config)`` (as ``DDIMPipeline`` builds it), so ``clip_sample`` /
  ``clip_sample_range``, ``thresholding`` (``dynamic_thresholding_ratio``, ``sample_max_value``),
  ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` act on x̂_0 and on the grid
  exactly as in the pipeline. The scheduler is fed ε̂ with ``prediction_type="epsilon"``
  (:class:`~memwatch.score.DiffusionScore` has already converted v / x₀ / score predictions); the
  result is the pipeline's, up to float rounding, whatever the original prediction type.
* **memwatch** — any other schedule (linear, cosine, ``from_alphas_cumprod``, VP, EDM/VE): the
  update above on ``schedule.sampling_timesteps(steps)``, without clipping.

States at the evaluation timesteps ``states_at`` are x_t at exactly the requested t:

* diffusers: the main trajectory is the pipeline's grid, untouched. A requested t that is the
  grid's first timestep gets the start noise (the pipeline's own x there); a t reached exactly
  by a pipeline step (``prev_timestep == t``) gets that step's result; any other t gets a side
  DDIM step from the nearest noisier grid state t_j: ``x_t = √ᾱ_t x̂_0(t_j) + √(1-ᾱ_t) ε̂(t_j)``,
  with x̂_0 clipped / thresholded as the pipeline clips it, and ε̂ unclipped as the pipeline
  uses it. A t noisier than the grid's first timestep cannot be reached and is refused.
* memwatch: the requested timesteps are inserted into the grid.

Flow matching (a ``"flow"`` schedule, ``x_t = (1 - σ_t) x_0 + σ_t ε``) is sampled by Euler steps
on the flow ODE, ``x_{σ'} = x_σ + (σ' - σ) û(x_σ)`` with the velocity ``û = ε̂ - x̂_0``
(:meth:`~memwatch.score.DiffusionScore.velocity`, the network's own output for
``"flow_prediction"``) — the DDIM step above written for this interpolant — down to σ = 0:

* diffusers: the schedule came from a ``FlowMatch*`` scheduler; its config's
  ``FlowMatchEulerDiscreteScheduler`` (:meth:`~memwatch.schedules.NoiseSchedule.flow_scheduler`,
  μ of dynamic shifting from the probes' shape) is stepped as the SD3 / Flux pipelines step it.
  A requested t on the grid gets the state the pipeline has there; any other t a side Euler step
  from the nearest noisier grid state.
* memwatch: ``schedule.sampling_timesteps(steps)`` (uniform in t) with the requested timesteps
  inserted.

The start noise comes from an explicit ``generator`` (drawn on the CPU, so the same seed gives
the same probes on every device) and the update has no randomness: the same seed and weights
give bit-identical probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore, broadcast_condition
from memwatch.validation import check_int

__all__ = [
    "ProbeSampler",
    "Trajectory",
    "check_trajectory",
    "excursion",
    "expected_range",
    "out_of_range",
    "probe_noise",
    "sample",
    "sample_trajectory",
    "sampler_settings",
    "sampler_summary",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Trajectory:
    """Result of :func:`sample_trajectory` (or of a user's :class:`ProbeSampler`).

    Attributes:
        samples: ``[n, *shape]`` the sampler's output (diffusers: the last step's ``prev_sample``,
            what the pipeline returns; memwatch: x̂_0 at the last grid timestep).
        states: ``{float(t): [n, *shape]}`` for each requested ``t`` of ``states_at``, keyed by
            exactly the value passed, holding x_t at exactly that ``t``.
        timesteps: the grid the sampler followed ``[steps]`` (or more, see the module docstring),
            noisiest first.
        data_range: ``(low, high)`` the sampler projects x̂_0 into (see :func:`expected_range`),
            ``None`` when it does not clip.
    """

    samples: Tensor
    states: dict[float, Tensor] = field(default_factory=dict)
    timesteps: Tensor | None = None
    data_range: tuple[float, float] | None = None


class ProbeSampler(Protocol):
    """A probe sampler: anything called like :func:`sample_trajectory` with these keywords.

    ``sampler(score, noise=noise, steps=steps, cond=cond, states_at=states_at, device=device,
    max_batch=max_batch) -> Trajectory`` must be deterministic given ``noise`` ``[n, *shape]``,
    return ``samples`` shaped like ``noise`` and, for every ``t`` of ``states_at``, a state x_t at
    exactly that ``t`` under the key ``float(t)``; :func:`check_trajectory` verifies the shapes and
    keys. :func:`sample_trajectory` is the default implementation.

    Example — 100 steps whatever the caller asks, with memwatch's DDIM:

        >>> def sampler(score, *, noise, steps, cond, states_at, device, max_batch):
        ...     return sample_trajectory(score, noise=noise, steps=100, cond=cond, states_at=states_at,
        ...                              device=device, max_batch=max_batch)
        >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), NoiseSchedule.linear(100))
        >>> noise = probe_noise(2, (3,), generator=torch.Generator().manual_seed(0))
        >>> traj = sampler(score, noise=noise, steps=10, cond=None, states_at=[50.0], device=None, max_batch=None)
        >>> check_trajectory(traj, noise, [50.0]).states[50.0].shape
        torch.Size([2, 3])

    To draw probes with a diffusers pipeline instead (one that takes ``latents``), run it with
    ``latents=noise``, ``num_inference_steps=steps``, ``output_type="latent"`` and a
    ``callback_on_step_end`` that keeps ``callback_kwargs["latents"]``: after the step at grid
    timestep t, a DDIM-family scheduler's latents are the state at ``t - T // steps``
    (``T = scheduler.config.num_train_timesteps``; with "leading" spacing, the next grid timestep),
    so key them by that value and choose ``states_at`` among those values.
    """

    def __call__(
        self,
        score: DiffusionScore,
        *,
        noise: Tensor,
        steps: int,
        cond: Tensor | None,
        states_at: Sequence[float],
        device: torch.device | str | None,
        max_batch: int | None,
    ) -> Trajectory: ...


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
    cond: Tensor | int | None = None,
    states_at: Sequence[float] = (),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    max_batch: int | None = None,
) -> Trajectory:
    """Run deterministic DDIM (flow matching: Euler) from Gaussian noise and keep the states at ``states_at``.

    Steps with diffusers' ``DDIMScheduler`` (flow matching: ``FlowMatchEulerDiscreteScheduler``)
    when the schedule carries a diffusers config, else with memwatch's own DDIM (Euler) (see the
    module docstring for both and for how states are taken).

    Args:
        score: the model's score.
        n, shape: number and shape of probes (ignored when ``noise`` is given).
        steps: number of sampler steps, ``>= 2`` (``<= T`` with a diffusers config).
        generator: source of the start noise.
        noise: explicit standard-normal start noise ``[n, *shape]`` instead of ``generator``.
        cond: condition for conditional / guided sampling (``[n, ...]``, ``[1, ...]`` or one label).
        states_at: timesteps (schedule units) at which to record x_t; keys of ``states`` are
            ``float(t)`` of these values.
        device, dtype: where and in which precision to run (default device: the model's).
        max_batch: at most this many rows go through the model per call (probes and their
            conditions are chunked alike); ``None`` = all at once.

    Returns:
        :class:`Trajectory` with samples ``[n, *shape]`` and the requested states.

    Raises:
        MemwatchError: neither ``noise`` nor ``n`` and ``shape``; a timestep of ``states_at``
            outside the schedule (or noisier than the diffusers grid's first timestep); bad
            ``steps`` or ``max_batch``.
    """
    if max_batch is not None:
        check_int("max_batch", max_batch, 1, allow="or None")
    if noise is None:
        if n is None or shape is None:
            raise MemwatchError("pass `noise`, or both `n` and `shape`")
        if n < 1:
            raise MemwatchError(f"`n` must be positive, got {n}")
        noise = probe_noise(n, tuple(shape), generator=generator, dtype=dtype)
    schedule = score.schedule
    run_device = torch.device(device) if device is not None else score.device
    requested = {float(t): schedule.check_t(float(t), "states_at").to(torch.float64) for t in states_at}
    x = noise.to(device=run_device, dtype=dtype)
    eps = _eps_fn(score, cond, x.shape[0], run_device, max_batch)
    velocity = _batched(score.velocity, cond, x.shape[0], run_device, max_batch)
    data_range = None
    with torch.no_grad():
        if schedule.kind == "flow" and schedule.scheduler_config is not None:
            euler = schedule.flow_scheduler(steps, tuple(noise.shape[1:]))
            samples, states = _diffusers_euler(euler, velocity, x, requested)
            grid = euler.timesteps.cpu()
        elif schedule.kind == "flow":
            samples, states, grid = _memwatch_euler(schedule, velocity, x, steps, requested)
        elif schedule.scheduler_config is not None:
            ddim = schedule.ddim_scheduler(steps, prediction_type="epsilon")
            samples, states = _diffusers_ddim(ddim, eps, x, requested)
            grid, data_range = ddim.timesteps.cpu(), _clip_range(ddim.config)
        else:
            samples, states, grid = _memwatch_ddim(schedule, eps, x, steps, requested)
    return Trajectory(samples=samples, states=states, timesteps=grid, data_range=data_range)


def sample(
    score: DiffusionScore,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 50,
    **kwargs: object,
) -> Tensor:
    """DDIM samples ``[n, *shape]``; the keywords of :func:`sample_trajectory` apply.

    Example:
        >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), NoiseSchedule.linear(100))
        >>> g = torch.Generator().manual_seed(0)
        >>> sample(score, n=3, shape=(2,), steps=10, generator=g).shape
        torch.Size([3, 2])
    """
    return sample_trajectory(score, n, shape, steps, **kwargs).samples  # type: ignore[arg-type]


def check_trajectory(traj: Any, noise: Tensor, states_at: Sequence[float]) -> Trajectory:
    """Check what a probe sampler returned: a :class:`Trajectory` whose ``samples`` and every
    requested state are tensors shaped like ``noise`` ``[n, *shape]``, states keyed by ``float(t)``.

    Returns:
        ``traj``, unchanged.

    Raises:
        MemwatchError: naming ``sampler``, with what was expected and what came back.

    Example:
        >>> traj = Trajectory(samples=torch.zeros(2, 3), states={5.0: torch.zeros(2, 3)})
        >>> check_trajectory(traj, torch.zeros(2, 3), [5]) is traj
        True
    """
    expected = tuple(noise.shape)
    if not isinstance(traj, Trajectory):
        raise MemwatchError(f"`sampler` must return a memwatch.Trajectory, got {type(traj).__name__}")
    if not isinstance(traj.samples, Tensor) or tuple(traj.samples.shape) != expected:
        got = tuple(traj.samples.shape) if isinstance(traj.samples, Tensor) else type(traj.samples).__name__
        raise MemwatchError(f"`sampler` returned samples of shape {got}, expected {expected} (the shape of `noise`)")
    missing = [float(t) for t in states_at if float(t) not in traj.states]
    if missing:
        raise MemwatchError(
            f"`sampler` returned no state at timestep(s) {missing} of `states_at` (states must be keyed by "
            f"float(t)); it returned states at {sorted(traj.states)}"
        )
    for t in states_at:
        state = traj.states[float(t)]
        if not isinstance(state, Tensor) or tuple(state.shape) != expected:
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise MemwatchError(f"`sampler` returned a state of shape {got} at t={float(t):g}, expected {expected}")
    return traj


def expected_range(schedule: NoiseSchedule) -> tuple[float, float] | None:
    """The range ``(low, high)`` the probe sampler projects x̂_0 into, from the diffusers config.

    ``thresholding`` (which diffusers applies before ``clip_sample``) clamps x̂_0 to ``[-s, s]``
    and divides by s, so x̂_0 lies in ``[-1, 1]`` (``sample_max_value`` caps the percentile s, not
    the output); ``clip_sample`` clamps it to ``[-clip_sample_range, clip_sample_range]``. Without
    either, or without a diffusers config, ``None``: the sampler promises no range.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> expected_range(NoiseSchedule.from_diffusers(DDPMScheduler(clip_sample_range=2.0)))
        (-2.0, 2.0)
    """
    if schedule.scheduler_config is None or schedule.kind == "flow":
        return None
    return _clip_range(schedule.ddim_scheduler(2).config)  # the values DDIM applies, defaults filled in


def sampler_settings(schedule: NoiseSchedule, steps: int, sampler: object | None = None) -> dict[str, Any]:
    """The settings the probes are drawn with, as plain values for a run's config.

    The same weights give other probes under other settings (a ``DDPMScheduler`` with
    ``clip_sample=True`` projects x̂_0 into ``[-1, 1]`` at every step, one without does not), so a
    run says which ones its numbers come from.

    Args:
        schedule: the score's schedule.
        steps: the sampler's steps (``probes.sampler_steps``).
        sampler: the user's :class:`ProbeSampler` (``probes.sampler``), or ``None`` for the default.

    Returns:
        ``{"sampler": ..., "steps": ...}`` and, for the diffusers DDIM stepping, ``scheduler`` (the
        class the config came from), ``clip_sample``, ``clip_sample_range``, ``thresholding``,
        ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one`` as DDIM applies them.

    Example:
        >>> sampler_settings(NoiseSchedule.linear(1000), 50)
        {'sampler': 'memwatch DDIM', 'steps': 50, 'clip_sample': False}
    """
    if sampler is not None:
        name = getattr(sampler, "__qualname__", None) or type(sampler).__qualname__
        return {"sampler": name, "steps": steps}
    if schedule.kind == "flow":  # the flow ODE's Euler steps: no clipping to speak of
        if schedule.scheduler_config is None:
            return {"sampler": "memwatch Euler (flow)", "steps": steps}
        config = schedule.flow_scheduler(steps).config
        shift = {k: config[k] for k in ("shift", "use_dynamic_shifting") if k in config}
        return {"sampler": "diffusers FlowMatchEulerDiscreteScheduler", "scheduler": schedule.scheduler_class,
                "steps": steps, **shift}  # fmt: skip
    if schedule.scheduler_config is None:
        return {"sampler": "memwatch DDIM", "steps": steps, "clip_sample": False}
    config = schedule.ddim_scheduler(steps).config  # the values DDIM applies, defaults filled in
    keys = ("clip_sample", "clip_sample_range", "thresholding", "timestep_spacing", "steps_offset", "set_alpha_to_one")
    return {
        "sampler": "diffusers DDIMScheduler",
        "scheduler": schedule.scheduler_class,
        "steps": steps,
        **{k: config[k] for k in keys},
    }


def sampler_summary(settings: dict[str, Any]) -> str:
    """:func:`sampler_settings` in a few words, for a console line.

    Example:
        >>> sampler_summary({"sampler": "memwatch DDIM", "steps": 50, "clip_sample": False})
        'memwatch DDIM, 50 steps, no clipping'
    """
    words = [settings["sampler"], f"{settings['steps']} steps"]
    if "shift" in settings:  # flow matching: the model's own Euler steps
        words[0] = f"Euler of the {settings['scheduler']} config"
        words.append("dynamic shift" if settings.get("use_dynamic_shifting") else f"shift {settings['shift']:g}")
    elif "scheduler" in settings:
        words[0] = f"DDIM of the {settings['scheduler']} config"
        words.append(f"{settings['timestep_spacing']} spacing")
    if settings.get("thresholding"):
        words.append("thresholding")
    elif settings.get("clip_sample"):
        words.append(f"clip ±{settings['clip_sample_range']:g}")
    elif "clip_sample" in settings:
        words.append("no clipping")
    return ", ".join(words)


def excursion(samples: Tensor, low: float, high: float) -> Tensor:
    """How far each probe ``[n, *shape]`` reaches beyond the data range ``[low, high]``: ``[n]``
    float64, the largest distance of an element outside it in units of ``high - low`` (0 inside,
    ``inf`` for a probe that is not finite).

    Example:
        >>> excursion(torch.tensor([[0.5, -1.0], [0.0, 3.5], [float("nan"), 0.0]]), -1.0, 1.0)
        tensor([0.0000, 1.2500,    inf], dtype=torch.float64)
    """
    flat = (samples.flatten(1) if samples.ndim > 1 else samples[:, None]).to(torch.float64)
    beyond = torch.maximum(low - flat, flat - high).clamp(min=0).amax(1) / (high - low)
    return torch.where(torch.isfinite(flat).all(1), beyond, math.inf)


def out_of_range(samples: Tensor, low: float, high: float, tolerance: float = 0.5) -> Tensor:
    """Probes that left the data range ``[low, high]`` by far: ``[n]`` bool.

    A probe ``[*shape]`` is flagged when any element lies below ``low - tolerance·(high - low)``
    or above ``high + tolerance·(high - low)``, or is not finite.

    Args:
        samples: ``[n, *shape]``.
        low, high: the data range, ``low < high`` (e.g. :attr:`Trajectory.data_range`).
        tolerance: allowed excursion as a fraction of the range's width, ``>= 0`` (default 0.5:
            for ``[-1, 1]``, flagged outside ``[-2, 2]``).

    Raises:
        MemwatchError: ``low >= high``, or a negative / non-finite ``tolerance``.

    Example:
        >>> out_of_range(torch.tensor([[0.5, -1.0], [0.0, 3.5], [float("nan"), 0.0]]), -1.0, 1.0)
        tensor([False,  True,  True])
    """
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise MemwatchError(f"need finite `low` < `high`, got low={low}, high={high}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise MemwatchError(f"`tolerance` must be a finite number >= 0, got {tolerance}")
    margin = tolerance * (high - low)
    flat = samples.flatten(1) if samples.ndim > 1 else samples[:, None]
    inside = (flat >= low - margin) & (flat <= high + margin)  # NaN compares False
    return ~inside.all(dim=1)


# ------------------------------------------------------------------------------ private
def _batched(
    fn: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    cond: Any,
    n: int,
    device: torch.device,
    max_batch: int | None,
) -> EpsFn:
    """``(x [n, *shape], t) -> fn(x, t, cond)``, called on at most ``max_batch`` rows at a time."""
    cond_b = None if cond is None else broadcast_condition(cond, n, "cond").to(device)
    step = min(max_batch or n, n)

    def batched(x: Tensor, t: Tensor) -> Tensor:
        parts = [fn(x[i : i + step], t, None if cond_b is None else cond_b[i : i + step]) for i in range(0, n, step)]
        return torch.cat(parts)

    return batched


def _eps_fn(score: DiffusionScore, cond: Any, n: int, device: torch.device, max_batch: int | None) -> EpsFn:
    """``(x [n, *shape], t) -> ε̂ = -σ_t s(x, t, cond)``, the model called on at most ``max_batch`` rows at a time."""
    scores = _batched(score, cond, n, device, max_batch)

    def eps(x: Tensor, t: Tensor) -> Tensor:
        sigma = score.sigma(torch.as_tensor(t)).to(x.device, x.dtype)
        return -sigma * scores(x, t)

    return eps


def _with_requested(
    schedule: NoiseSchedule, steps: int, requested: dict[float, Tensor]
) -> tuple[Tensor, set[float], float]:
    """memwatch's grid ``schedule.sampling_timesteps(steps)`` with the requested timesteps inserted
    (noisiest first), the values to keep states at, and the start noise's scale ``√(α_T² + σ_T²)``."""
    grid = schedule.sampling_timesteps(steps)
    if requested:
        extra = torch.stack(list(requested.values())).to(grid.dtype)
        grid = torch.unique(torch.cat([grid, extra])).flip(0)
    keep = {float(t.to(grid.dtype)) for t in requested.values()}
    start_scale = float((schedule.alpha_bar(grid[:1]) + schedule.sigma(grid[:1]) ** 2).sqrt())
    return grid, keep, start_scale


def _memwatch_ddim(
    schedule: NoiseSchedule, eps_fn: EpsFn, x: Tensor, steps: int, requested: dict[float, Tensor]
) -> tuple[Tensor, dict[float, Tensor], Tensor]:
    """memwatch's DDIM on ``schedule.sampling_timesteps(steps)`` with the requested timesteps inserted."""
    grid, keep, start_scale = _with_requested(schedule, steps, requested)
    x = x * start_scale
    at: dict[float, Tensor] = {}
    x0_hat = x
    for i, t in enumerate(grid):
        if float(t) in keep:
            at[float(t)] = x
        eps = eps_fn(x, t)
        x0_hat = (x - float(schedule.sigma(t)) * eps) / float(schedule.alpha(t))
        if i + 1 < len(grid):
            t_next = grid[i + 1]
            x = float(schedule.alpha(t_next)) * x0_hat + float(schedule.sigma(t_next)) * eps
    states = {key: at[float(t.to(grid.dtype))] for key, t in requested.items()}
    return x0_hat, states, grid


def _memwatch_euler(
    schedule: NoiseSchedule, velocity: EpsFn, x: Tensor, steps: int, requested: dict[float, Tensor]
) -> tuple[Tensor, dict[float, Tensor], Tensor]:
    """Euler on the flow ODE over ``schedule.sampling_timesteps(steps)`` (requested timesteps
    inserted) and a last step to σ = 0; returns the samples, the states and the grid."""
    grid, keep, start_scale = _with_requested(schedule, steps, requested)
    x = x * start_scale
    sigmas = torch.cat([schedule.sigma(grid), torch.zeros(1, dtype=torch.float64)])
    at: dict[float, Tensor] = {}
    for i, t in enumerate(grid):
        if float(t) in keep:
            at[float(t)] = x
        x = x + float(sigmas[i + 1] - sigmas[i]) * velocity(x, t)
    states = {key: at[float(t.to(grid.dtype))] for key, t in requested.items()}
    return x, states, grid


def _diffusers_euler(
    euler: Any, velocity: EpsFn, x: Tensor, requested: dict[float, Tensor]
) -> tuple[Tensor, dict[float, Tensor]]:
    """The SD3 / Flux pipelines' loop with diffusers' ``FlowMatchEulerDiscreteScheduler`` ``euler``
    (timesteps set, fed û); states as in the module docstring."""
    grid = euler.timesteps  # starts at the schedule's t_max (σ_max · T), so every requested t is reached
    scale = float(euler.config.num_train_timesteps)
    wanted = {key: float(t) for key, t in requested.items()}
    euler.set_begin_index(0)
    states: dict[float, Tensor] = {}
    for i, t in enumerate(grid):
        v = velocity(x, t)
        lower = float(grid[i + 1]) if i + 1 < len(grid) else 0.0
        for key, tau in wanted.items():  # states whose nearest noisier (or equal) grid timestep is t
            if lower < tau <= float(t):
                states[key] = x if tau == float(t) else x + (tau / scale - float(euler.sigmas[i])) * v
        x = euler.step(v, t, x).prev_sample
    return x, states


def _diffusers_ddim(
    ddim: Any, eps_fn: EpsFn, x: Tensor, requested: dict[float, Tensor]
) -> tuple[Tensor, dict[float, Tensor]]:
    """The ``DDIMPipeline`` loop with diffusers' ``DDIMScheduler`` ``ddim`` (timesteps set, fed ε̂);
    states as in the module docstring."""
    grid = ddim.timesteps
    first = int(grid[0])
    wanted = {key: int(t) for key, t in requested.items()}
    too_noisy = sorted(key for key, t in wanted.items() if t > first)
    if too_noisy:
        raise MemwatchError(
            f"`states_at` must be at most {first}, the first timestep of this {ddim.config.timestep_spacing!r}-spaced "
            f"{ddim.num_inference_steps}-step DDIM grid (a noisier state is never reached), got {too_noisy}"
        )
    jump = ddim.config.num_train_timesteps // ddim.num_inference_steps  # diffusers' prev_timestep offset
    x = x * ddim.init_noise_sigma
    states = {key: x.clone() for key, t in wanted.items() if t == first}
    for i, t in enumerate(grid):
        eps = eps_fn(x, t)
        out = ddim.step(eps, t, x)
        lower = int(grid[i + 1]) if i + 1 < len(grid) else -1
        for key, tau in wanted.items():  # states whose nearest noisier grid timestep is t
            if lower <= tau < int(t):
                on_path = tau == int(t) - jump
                states[key] = out.prev_sample if on_path else _ddim_to(ddim, out.pred_original_sample, eps, tau)
        x = out.prev_sample
    return x, states


def _clip_range(config: Any) -> tuple[float, float] | None:
    """``(low, high)`` a DDIM config projects x̂_0 into (thresholding first, as diffusers applies it)."""
    if config.thresholding:
        return (-1.0, 1.0)
    if config.clip_sample:
        return (-float(config.clip_sample_range), float(config.clip_sample_range))
    return None


def _ddim_to(ddim: Any, x0_hat: Tensor, eps: Tensor, t: int) -> Tensor:
    """Side DDIM step to exactly ``t``: ``√ᾱ_t x̂_0 + √(1-ᾱ_t) ε̂`` with diffusers' ``ᾱ``."""
    alpha_bar = ddim.alphas_cumprod[t]
    return alpha_bar**0.5 * x0_hat + (1 - alpha_bar) ** 0.5 * eps
