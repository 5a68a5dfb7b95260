import torch

from memwatch.data import GaussianMixture
from memwatch.sampling import sample, sample_trajectory
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
