import doctest

import pytest
import torch

from memwatch.data import GaussianMixture
from memwatch.errors import MemwatchError
from memwatch.sampling import (
    ProbeSampler,
    Trajectory,
    check_trajectory,
    out_of_range,
    probe_noise,
    sample,
    sample_trajectory,
)
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore


def _point_mass_score(sched):
    means = torch.tensor([[2.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    return DiffusionScore(GaussianMixture.isotropic(means, std=0.0).as_model(sched), sched), means


def test_same_seed_gives_bit_identical_probes():
    sched = NoiseSchedule.linear(1000)
    score, _ = _point_mass_score(sched)
    a = sample(score, n=8, shape=(2,), steps=20, generator=torch.Generator().manual_seed(3))
    b = sample(score, n=8, shape=(2,), steps=20, generator=torch.Generator().manual_seed(3))
    c = sample(score, n=8, shape=(2,), steps=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_on_point_masses_lands_on_the_training_points():
    for sched in (NoiseSchedule.linear(1000), NoiseSchedule.vp(), NoiseSchedule.edm()):
        score, means = _point_mass_score(sched)
        x0 = sample(score, n=16, shape=(2,), steps=60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        dist = torch.cdist(x0, means).min(1).values
        assert float(dist.max()) < 1e-3, (sched.kind, dist)


def test_trajectory_records_exact_states():
    sched = NoiseSchedule.linear(1000)
    score, _ = _point_mass_score(sched)
    traj = sample_trajectory(score, 4, (2,), 10, generator=torch.Generator().manual_seed(0), states_at=[123, 500])
    assert set(traj.states) == {123.0, 500.0}
    assert 123 in traj.timesteps.tolist() and traj.timesteps[0] == 999
    assert traj.states[123.0].shape == (4, 2)
    torch.testing.assert_close(
        traj.samples, sample(score, 4, (2,), 10, generator=torch.Generator().manual_seed(0)), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------ continuous schedules: exact keys
def _single_point_score(sched, mean):
    gmm = GaussianMixture.isotropic(torch.tensor([mean], dtype=torch.float64), std=0.0)
    return DiffusionScore(gmm.as_model(sched), sched)


@pytest.mark.parametrize("make", [NoiseSchedule.vp, NoiseSchedule.edm])
def test_continuous_states_are_keyed_by_the_requested_floats_and_exact(make):
    sched = make()
    mean = torch.tensor([0.7, -1.2], dtype=torch.float64)
    score = _single_point_score(sched, mean.tolist())
    requested = [float(sched.timestep_for_sigma(0.3)), float(sched.timestep_for_sigma(0.05)), 0.123456789]
    noise = probe_noise(5, (2,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traj = sample_trajectory(score, noise=noise, steps=12, states_at=requested, dtype=torch.float64)
    assert list(traj.states) == requested
    # a point mass has x̂_0 = μ at every step, so DDIM keeps ε̂ = ε_0 and x_t = α_t μ + σ_t ε_0 exactly
    t0 = traj.timesteps[:1]
    x_start = noise * (sched.alpha_bar(t0) + sched.sigma(t0) ** 2).sqrt()
    eps0 = (x_start - sched.alpha(t0) * mean) / sched.sigma(t0)
    for t in requested:
        expected = (
            sched.alpha(torch.tensor(t, dtype=torch.float64)) * mean
            + sched.sigma(torch.tensor(t, dtype=torch.float64)) * eps0
        )
        torch.testing.assert_close(traj.states[t], expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.vp, NoiseSchedule.edm])
def test_ddim_on_an_exact_gaussian_mixture_lands_on_its_modes(make):
    sched = make() if make is not NoiseSchedule.linear else make(1000)
    means = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    gmm = GaussianMixture.isotropic(means, std=0.05)
    score = DiffusionScore(gmm.as_model(sched), sched)
    x0 = sample(score, n=32, shape=(2,), steps=80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dist, nearest = torch.cdist(x0, means).min(1)
    assert float(dist.max()) < 0.3, (sched.kind, dist.max())  # 6 mixture stds
    assert set(nearest.tolist()) == {0, 1, 2}


# ------------------------------------------------------------------ max_batch
class _PointMasses(torch.nn.Module):
    """Exact ε of point masses at ``means[cond]`` (``means[0]`` without a condition); refuses
    batches of more than ``limit`` rows."""

    def __init__(self, sched, means, limit=None):
        super().__init__()
        self.sched, self.means, self.limit = sched, means, limit

    def forward(self, x, t, cond=None):
        if self.limit is not None and x.shape[0] > self.limit:
            raise RuntimeError(f"batch of {x.shape[0]} rows")
        mu = self.means[torch.zeros(x.shape[0], dtype=torch.long) if cond is None else cond]
        alpha, sigma = self.sched.alpha(t)[:, None], self.sched.sigma(t)[:, None]
        return ((x.double() - alpha * mu) / sigma).to(x.dtype)


@pytest.mark.parametrize("diffusers_config", [False, True])
def test_max_batch_chunks_probes_and_their_conditions(diffusers_config):
    if diffusers_config:
        diffusers = pytest.importorskip("diffusers")
        sched = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(clip_sample=False))
    else:
        sched = NoiseSchedule.linear(1000)
    means = torch.tensor([[0.5, 0.0], [-0.5, 0.25]], dtype=torch.float64)
    noise = probe_noise(16, (2,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(noise=noise, steps=10, cond=torch.arange(16) % 2, states_at=[300], dtype=torch.float64)
    limited = DiffusionScore(_PointMasses(sched, means, limit=8), sched)
    with pytest.raises(RuntimeError, match="16 rows"):
        sample_trajectory(limited, **kwargs)
    chunked = sample_trajectory(limited, max_batch=8, **kwargs)
    whole = sample_trajectory(DiffusionScore(_PointMasses(sched, means), sched), **kwargs)
    assert torch.equal(chunked.samples, whole.samples) and torch.equal(chunked.states[300.0], whole.states[300.0])
    torch.testing.assert_close(chunked.samples, means[torch.arange(16) % 2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_batch_must_be_a_positive_integer(bad):
    score, _ = _point_mass_score(NoiseSchedule.linear(100))
    with pytest.raises(MemwatchError, match="max_batch"):
        sample_trajectory(score, 4, (2,), 5, max_batch=bad)


# ------------------------------------------------------------------ user samplers
def _traj(samples, states):
    return Trajectory(samples=samples, states=states)


def test_check_trajectory_accepts_what_sample_trajectory_returns():
    score, _ = _point_mass_score(NoiseSchedule.linear(100))
    noise = probe_noise(3, (2,), generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(score, noise=noise, steps=5, states_at=[40, 7])
    assert check_trajectory(traj, noise, [40, 7]) is traj


@pytest.mark.parametrize(
    "returned, match",
    [
        (torch.zeros(3, 2), "must return a memwatch.Trajectory, got Tensor"),
        (_traj(torch.zeros(2, 2), {40.0: torch.zeros(3, 2)}), r"samples of shape \(2, 2\), expected \(3, 2\)"),
        (_traj(torch.zeros(3, 2), {41.0: torch.zeros(3, 2)}), r"no state at timestep\(s\) \[40.0\]"),
        (_traj(torch.zeros(3, 2), {40.0: torch.zeros(3, 1)}), r"state of shape \(3, 1\) at t=40"),
    ],
)
def test_check_trajectory_names_the_sampler(returned, match):
    noise = torch.zeros(3, 2)
    with pytest.raises(MemwatchError, match=r"`sampler`.*" + match):
        check_trajectory(returned, noise, [40])


def test_a_user_sampler_fits_the_protocol():
    def fixed_steps(score, *, noise, steps, cond, states_at, device, max_batch):
        return sample_trajectory(
            score, noise=noise, steps=20, cond=cond, states_at=states_at, device=device, max_batch=max_batch
        )

    sampler: ProbeSampler = fixed_steps
    score, means = _point_mass_score(NoiseSchedule.linear(1000))
    noise = probe_noise(4, (2,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = sampler(score, noise=noise, steps=5, cond=None, states_at=[100.0], device=None, max_batch=2)
    check_trajectory(traj, noise, [100.0])
    assert len(traj.timesteps) == 21  # its own 20 steps, plus the requested state


# ------------------------------------------------------------------ data range
def test_out_of_range_flags_probes_far_outside_the_range_and_non_finite_ones():
    x = torch.tensor([[0.0, 1.0], [2.0, -1.9], [2.01, 0.0], [0.0, -2.5], [float("nan"), 0.0], [float("inf"), 0]])
    assert out_of_range(x, -1.0, 1.0).tolist() == [False, False, True, True, True, True]
    assert out_of_range(x, -1.0, 1.0, tolerance=0.0).tolist() == [False, True, True, True, True, True]
    assert out_of_range(x.reshape(6, 1, 2, 1), 0.0, 4.0, tolerance=0.25).tolist() == [False, True, False] + [True] * 3


@pytest.mark.parametrize("low, high, tol, match", [(1.0, 1.0, 0.5, "low"), (0.0, 1.0, -0.1, "tolerance")])
def test_out_of_range_validates_its_arguments(low, high, tol, match):
    with pytest.raises(MemwatchError, match=match):
        out_of_range(torch.zeros(2, 2), low, high, tol)


def test_docstring_examples_run():
    import memwatch.sampling
    import memwatch.schedules

    for module in (memwatch.sampling, memwatch.schedules):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
