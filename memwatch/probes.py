"""What one check measures for a model, without a Trainer: draw the probes, measure them.

A *probe* is a sample drawn from the model under training from a fixed start noise (the same
seeds at every check), by the model's own sampler. :class:`ProbeSet` holds everything that
makes a check's probes and measurements repeatable — the start noise, the sampler and its step
count, the evaluation timesteps, the spectrum options, the seed of the Lanczos / trace vectors —
and :meth:`ProbeSet.measure` returns per-probe results for a given score:

* the final samples ``[n, *shape]``,
* a :class:`memwatch.SharpnessResult` at every evaluation timestep (primary first),
* with training data given, the nearest-neighbour ground truth (``d₁/d₂`` and the nearest
  item's index, for attribution),
* with conditions given, per condition the conditional metrics of :mod:`memwatch.conditional`.

The callback, ``memwatch scan`` and the demo all go through this one code path, so the same
weights give the same numbers wherever they are measured.

Example:
    >>> from memwatch.schedules import NoiseSchedule
    >>> from memwatch.score import DiffusionScore
    >>> score = DiffusionScore(lambda x, t: 0.1 * x, NoiseSchedule.linear(100))
    >>> probes = ProbeSet((2,), num_probes=4, sampler_steps=5, timesteps=evaluation_timesteps(score.schedule, (0.3,)))
    >>> m = probes.measure(score, options=SharpnessOptions(k=2))
    >>> m.samples.shape, m.primary.sharp_fraction.shape
    (torch.Size([4, 2]), torch.Size([4]))
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.groundtruth import nearest_neighbours, ratio_of
from memwatch.operators import JacobianPath, is_out_of_memory, select_jvp_mode
from memwatch.sampling import (
    ProbeSampler,
    Trajectory,
    check_trajectory,
    out_of_range,
    probe_noise,
    sample_trajectory,
)
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore, device_of
from memwatch.sharpness import SharpnessOptions, SharpnessResult, hessian_score_norm, measure_sharpness
from memwatch.timing import PhaseClock

__all__ = [
    "ProbeMeasurement",
    "ProbeSet",
    "evaluation_grid",
    "evaluation_timesteps",
    "first_sampler_timestep",
    "isolated",
    "parameters_finite",
    "shard",
]

#: per-probe conditional metrics kept for each condition (names logged under ``cond/{name}/``)
CONDITION_METRICS = ("hessian_score_diff", "score_diff", "sharp_fraction_mean")


@dataclass(frozen=True)
class ProbeMeasurement:
    """Per-probe results of one measurement (all on the CPU).

    Attributes:
        samples: ``[n, *shape]`` the probes' final samples.
        results: evaluation timestep → :class:`memwatch.SharpnessResult` of the probes' states
            there, the primary timestep first.
        nn_ratio: ``[n]`` ``d₁/d₂`` of each probe to the reference data (``None`` without it).
        nearest: ``[n]`` index of each probe's nearest reference item (``None`` without it).
        conditional: ``{condition name: {metric: [n]}}`` with the metrics of
            ``CONDITION_METRICS`` (``None`` without conditions).
        out_of_range: ``[n]`` bool, probes that left the data range by far (all False when no
            range is known: see :meth:`ProbeSet.measure`).
        data_range: the ``(low, high)`` range the probes were held against, or ``None``.
        spectrum: the full spectrum (Lanczos) at the primary timestep when it was asked for on
            top of a cheap trace-tier measurement (``spectrum_options``), of the first
            ``spectrum_probes`` probes, else ``None``.
        hessian_score_norm: ``[n]`` Jeon et al.'s unconditional detector ``‖H s‖`` at the
            sampler's first (noisiest) state, one reverse-mode product per probe
            (:func:`memwatch.sharpness.hessian_score_norm`).
    """

    samples: Tensor
    results: dict[float, SharpnessResult]
    nn_ratio: Tensor | None = None
    nearest: Tensor | None = None
    conditional: dict[str, dict[str, Tensor]] | None = None
    out_of_range: Tensor | None = None
    data_range: tuple[float, float] | None = None
    spectrum: SharpnessResult | None = None
    hessian_score_norm: Tensor | None = None

    @property
    def primary(self) -> SharpnessResult:
        """The result at the primary (first) evaluation timestep."""
        return next(iter(self.results.values()))


def evaluation_timesteps(
    schedule: NoiseSchedule,
    sigmas: Sequence[float] | None = None,
    timesteps: Sequence[float] | None = None,
    *,
    name: str = "sigmas",
) -> list[float]:
    """The evaluation timesteps in the schedule's units, primary first, without repeats.

    ``timesteps`` (schedule units) win over ``sigmas`` (noise levels, each mapped to the timestep
    whose :meth:`~memwatch.schedules.NoiseSchedule.noise_level` is nearest: σ_t, or σ_t / α_t for
    flow). ``name`` is the argument the errors name.

    Raises:
        MemwatchError: a σ outside the schedule's range ``[σ(t_min), σ(t_max)]`` (it would be
            silently clamped to an end of the schedule) or a timestep outside ``[t_min, t_max]``.

    Example:
        >>> evaluation_timesteps(NoiseSchedule.linear(1000), (0.3, 0.5))
        [92.0, 164.0]
    """
    if timesteps is not None:
        times = [float(schedule.check_t(t, "timesteps")) for t in timesteps]
    else:
        if not sigmas:
            raise MemwatchError(f"`{name}` must be a non-empty sequence of noise levels, got {sigmas!r}")
        lo, hi = float(schedule.noise_level(schedule.t_min)), float(schedule.noise_level(schedule.t_max))
        for s in sigmas:
            if not lo <= s <= hi:
                raise MemwatchError(
                    f"`{name}` must lie in this {schedule.kind} schedule's range [{lo:.4g}, {hi:.4g}] of noise levels "
                    f"(NoiseSchedule.noise_level), got {s!r}"
                )
        times = [float(schedule.timestep_for_sigma(s)) for s in sigmas]
    return list(dict.fromkeys(times))


def first_sampler_timestep(schedule: NoiseSchedule, sampler_steps: int) -> float:
    """The timestep a ``sampler_steps``-step probe grid starts at (schedule units)."""
    return float(schedule.sampling_timesteps(sampler_steps)[0])


def evaluation_grid(
    schedule: NoiseSchedule, sigmas: Sequence[float] | None, timesteps: Sequence[float] | None, sampler_steps: int
) -> list[float]:
    """:func:`evaluation_timesteps` that the probes' sampler passes through: every one at or
    below its first step (a diffusers grid may start below the schedule's last step, e.g. at 980
    of 999).

    Raises:
        MemwatchError: a level maps above the sampler's first step (naming ``probes.timesteps``
            or ``sigmas``), or as :func:`evaluation_timesteps`.
    """
    times = evaluation_timesteps(schedule, sigmas, timesteps)
    first = first_sampler_timestep(schedule, sampler_steps)
    if max(times) > first:
        name = "probes.timesteps" if timesteps is not None else "sigmas"
        raise MemwatchError(
            f"`{name}` must map to timesteps at or below the sampler's first step ({first:g} for "
            f"probes.sampler_steps={sampler_steps}), got timestep {max(times):g}"
        )
    return times


def shard(n: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous share of ``n`` probes (the first ``n % world_size`` ranks get one more).

    Example:
        >>> [shard(5, 2, r) for r in (0, 1)]
        [slice(0, 3, None), slice(3, 5, None)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@contextlib.contextmanager
def isolated(pl_module: nn.Module) -> Iterator[None]:
    """Run a measurement as a check does: eval mode, frozen parameters, no autocast, isolated RNG;
    modes, ``requires_grad`` flags and the RNG state are restored afterwards (training is
    bit-identical with and without the measurement)."""
    modes = {m: m.training for m in pl_module.modules()}
    grads = {p: p.requires_grad for p in pl_module.parameters()}
    device_type = device_of(pl_module).type
    try:
        with isolate_rng(), torch.autocast(device_type=device_type, enabled=False):
            pl_module.eval()
            for p in grads:
                p.requires_grad_(False)
            yield
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def parameters_finite(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite: one pass over the weights and one device
    synchronization, far cheaper than the probes. A NaN or Inf weight (a diverged training step)
    makes every measurement of the model NaN, so a check asks this first.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> before = parameters_finite(net)
        >>> _ = net.weight.data[0, 0].fill_(float("nan"))
        >>> before, parameters_finite(net)
        (True, False)
    """
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class ProbeSet:
    """The probes of a monitor: the same start noise, sampler and measurement at every check.

    Args:
        shape: probe shape (one sample, without the batch axis), e.g. ``(3, 32, 32)``.
        num_probes: number of probes ``n``.
        sampler_steps: steps of the probe sampler.
        timesteps: evaluation timesteps in schedule units, primary first (see
            :func:`evaluation_timesteps`).
        seed: seed of the start noise; ``seed + 1`` seeds the Lanczos / trace vectors.
        sampler: the probe sampler (:class:`memwatch.sampling.ProbeSampler`); default
            :func:`memwatch.sample_trajectory`, which steps the way the model's own diffusers
            scheduler does when the schedule came from one.

    Raises:
        MemwatchError: an empty or non-positive ``shape``, ``num_probes < 1`` or ``sampler_steps < 2``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_probes: int,
        sampler_steps: int,
        timesteps: Sequence[float],
        seed: int = 0,
        sampler: ProbeSampler | None = None,
    ) -> None:
        if len(shape) == 0 or any(int(s) < 1 for s in shape):
            raise MemwatchError(f"`sample_shape` must be a non-empty shape of positive sizes, got {tuple(shape)!r}")
        if num_probes < 1 or sampler_steps < 2:
            raise MemwatchError(
                f"need `num_probes` >= 1 and `sampler_steps` >= 2, got {num_probes} and {sampler_steps}"
            )
        if not timesteps:
            raise MemwatchError("`timesteps` must hold at least one evaluation timestep")
        self.shape = tuple(int(s) for s in shape)
        self.num_probes = num_probes
        self.sampler_steps = sampler_steps
        self.timesteps = [float(t) for t in timesteps]
        self.seed = seed
        self.sampler = sampler
        self.path: JacobianPath | None = None  # the verified J·v path, chosen at the first measurement

    def noise(self, rows: slice = slice(None)) -> Tensor:
        """``[len(rows), *shape]`` start noise of the probes ``rows`` (the same at every call)."""
        generator = torch.Generator().manual_seed(self.seed)
        return probe_noise(self.num_probes, self.shape, generator=generator)[rows]

    def measure(
        self,
        score: DiffusionScore,
        *,
        options: SharpnessOptions | None = None,
        rows: slice = slice(None),
        device: torch.device | str | None = None,
        reference: Tensor | None = None,
        conditions: Mapping[str, Tensor] | None = None,
        condition_first_steps: int | None = None,
        data_range: tuple[float, float] | None = None,
        range_tolerance: float = 0.5,
        spectrum_options: SharpnessOptions | None = None,
        spectrum_probes: int | None = None,
        clock: PhaseClock | None = None,
    ) -> ProbeMeasurement:
        """Draw the probes ``rows`` from ``score`` and measure them at every evaluation timestep.

        Args:
            score: the model's score (in eval mode, as a check runs it).
            options: spectrum settings (default ``SharpnessOptions()``).
            rows: which probes (a DDP rank's shard, see :func:`shard`).
            device: where to run (default: the score's device).
            reference: ``[N, *shape]`` training samples for the nearest-neighbour ground truth.
            conditions: name → one condition, for conditional models: each condition's probes
                start from the same noise.
            condition_first_steps: noisiest sampler steps the conditional metrics average over.
            data_range: ``(low, high)`` of the data, when the sampler's own config promises none
                (a clipping diffusers scheduler does); probes beyond it by more than
                ``range_tolerance`` × its width are flagged in ``out_of_range``.
            range_tolerance: see ``data_range``.
            spectrum_options: also measure the spectrum at the primary timestep with these
                options (e.g. Lanczos on top of the trace tier), into ``spectrum``.
            spectrum_probes: measure the spectrum on the first this many of ``rows`` only (``None``: all).
            clock: times each phase under its own name (``sampling``, ``sharpness`` — the
                adjoint test of the first measurement included —, ``spectrum``,
                ``hessian_score_norm``, ``nearest_neighbours``, ``conditional``) and tells its
                listener after each, e.g. to show progress on long checks.

        Returns:
            :class:`ProbeMeasurement` of the probes ``rows``.
        """
        options = options or SharpnessOptions()
        clock = clock or PhaseClock()
        device = torch.device(device) if device is not None else score.device
        noise = self.noise(rows)
        noisiest = first_sampler_timestep(score.schedule, self.sampler_steps)
        states_at = list(dict.fromkeys([*self.timesteps, noisiest]))
        with clock.phase("sampling", f" of {noise.shape[0]} probes ({self.sampler_steps} steps)"):
            traj = self._sample(score, noise, states_at, device, options.max_batch)
            traj = check_trajectory(traj, noise, states_at)
        data_range = traj.data_range or data_range
        bad = None if data_range is None else out_of_range(traj.samples.detach().cpu(), *data_range, range_tolerance)
        results = {}
        for t in self.timesteps:
            with clock.phase("sharpness", f" at t={t:g} ({options.resolved_method(traj.states[t][0].numel())})"):
                if t == self.timesteps[0]:
                    options = self._verified(score, traj.states[t], t, options)
                results[t] = self._sharpness(score, traj.states[t], t, options)
        spectrum = None
        if spectrum_options is not None:
            spectrum_options = spectrum_options.replace(jvp_mode=options.jvp_mode)  # the verified path
            t0 = self.timesteps[0]
            states = traj.states[t0][:spectrum_probes]
            with clock.phase(
                "spectrum", f" at t={t0:g} (Lanczos, {spectrum_options.num_iters} steps, {len(states)} probes)"
            ):
                spectrum = self._sharpness(score, states, t0, spectrum_options)
        with clock.phase("hessian_score_norm"):
            jeon = hessian_score_norm(score, traj.states[noisiest], noisiest, options)
        samples = traj.samples.detach().cpu()
        nn_ratio = nearest = None
        if reference is not None:
            with clock.phase("nearest_neighbours"):
                dist, idx = nearest_neighbours(samples, reference)
            nn_ratio = ratio_of(dist).float()
            nearest = idx[:, 0]
        conditional = None
        if conditions:
            with clock.phase("conditional"):
                conditional = self._conditional(score, noise, conditions, condition_first_steps, options, device)
        return ProbeMeasurement(samples, results, nn_ratio, nearest, conditional, bad, data_range, spectrum, jeon)

    # ------------------------------------------------------------------ private
    def _sample(
        self, score: DiffusionScore, noise: Tensor, states_at: list[float], device: torch.device, max_batch: int | None
    ) -> Trajectory:
        """The sampler's trajectory from ``noise`` ``[r, *shape]``; on out-of-memory retried with
        half the rows per model call (with a warning), down to one row."""
        sampler = self.sampler or sample_trajectory
        rows = min(max_batch or noise.shape[0], noise.shape[0])
        while True:
            try:
                return sampler(
                    score, noise=noise, steps=self.sampler_steps, cond=None, states_at=states_at, device=device,
                    max_batch=rows,
                )  # fmt: skip
            except RuntimeError as err:
                if rows == 1 or not is_out_of_memory(err):
                    raise
                rows = max(1, rows // 2)
                warnings.warn(
                    f"memwatch: out of memory while sampling the probes, retrying with max_batch={rows}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1)

    def _verified(self, score: DiffusionScore, x: Tensor, t: float, options: SharpnessOptions) -> SharpnessOptions:
        """``options`` on the J·v path that passed the adjoint test ⟨u, J v⟩ = ⟨Jᵀu, v⟩ on two
        probes (chosen at the first measurement, then kept); a model where no path passes gets one
        warning that names the problem, and its sharpness is NaN."""
        if self.path is None:
            tt = score.timesteps(t, min(2, x.shape[0]), x.device)
            self.path = select_jvp_mode(
                lambda z: score(z, tt), x[:2], preferred=options.jvp_mode, generator=self._generator()
            )
            if not self.path.consistent:
                warnings.warn(
                    f"memwatch: no Jacobian product of this model passes the adjoint test ({self.path.message}); "
                    "its sharpness is reported as NaN",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return options.replace(jvp_mode=self.path.mode) if self.path.consistent else options

    def _sharpness(self, score: DiffusionScore, x: Tensor, t: float, options: SharpnessOptions) -> SharpnessResult:
        if self.path is not None and not self.path.consistent:
            sigma = score.sigma(score.timesteps(t, x.shape[0], x.device))
            return SharpnessResult.unmeasured(sigma, x[0].numel(), options, options.resolved_method(x[0].numel()))
        return measure_sharpness(score, x, t, options, generator=self._generator())

    def _conditional(
        self,
        score: DiffusionScore,
        noise: Tensor,
        conditions: Mapping[str, Tensor],
        first_steps: int | None,
        options: SharpnessOptions,
        device: torch.device,
    ) -> dict[str, dict[str, Tensor]]:
        """Per condition, the conditional metrics of these probes: ``{name: {metric: [r]}}``."""
        from memwatch.conditional import conditional_metrics

        names, r = list(conditions), noise.shape[0]
        stacked = torch.stack([conditions[c] for c in names])  # [C, ...]
        try:
            res = conditional_metrics(
                score,
                stacked.repeat_interleave(r, dim=0),  # condition-major: rows c*r … c*r + r - 1
                noise=noise.repeat(len(names), *([1] * (noise.ndim - 1))),
                steps=self.sampler_steps,
                first_steps=first_steps,
                eval_t=self.timesteps[0],
                options=options,
                lanczos_generator=self._generator(),
                device=device,
            )
        except ValueError as err:
            raise MemwatchError(f"memwatch `conditions`: {err}") from err
        per_probe = dict(zip(CONDITION_METRICS, (res.hessian_score_diff_norm, res.score_diff_norm, res.sharp_fraction)))
        return {c: {m: v[i * r : (i + 1) * r] for m, v in per_probe.items()} for i, c in enumerate(names)}
