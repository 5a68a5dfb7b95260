"""The probes' meter: the settings a check measures with, resolved for the sample dimension, and
its measurement equal to the probe set's own with those settings."""

from __future__ import annotations

import pytest
import torch

from memwatch import MemwatchError, SharpnessOptions
from memwatch.apps.toymodels import MLPDenoiser
from memwatch.data import GaussianMixture
from memwatch.memory import default_max_batch
from memwatch.meter import ProbeMeter
from memwatch.probes import ProbeSet
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

SCHEDULE = NoiseSchedule.linear(1000)
CPU = torch.device("cpu")


def _mixture_score(dim: int) -> DiffusionScore:
    """Two point masses in ``dim`` dimensions (exact ε-prediction)."""
    means = torch.stack([torch.full((dim,), 0.5), torch.full((dim,), -0.5)])
    return DiffusionScore(GaussianMixture.isotropic(means).as_model(SCHEDULE), SCHEDULE)


def test_small_samples_are_measured_as_given_within_the_memory_bound():
    meter = ProbeMeter(SharpnessOptions(k=2), spectrum_every_n_checks=2)
    meter.prepare(_mixture_score(6), (6,), CPU)
    assert not meter.tiered and meter.options.method == "auto"
    assert meter.max_batch == default_max_batch(6, device=CPU)
    assert [meter.spectrum_options(n) for n in range(3)] == [None, None, None]  # the dense spectrum at every check
    given = ProbeMeter(SharpnessOptions(k=2, max_batch=5))
    given.prepare(_mixture_score(6), (6,), CPU)
    assert given.max_batch == 5


def test_image_scale_runs_the_trace_tier_and_the_spectrum_every_nth_check():
    meter = ProbeMeter(SharpnessOptions(k=2), spectrum_every_n_checks=3)
    meter.prepare(_mixture_score(3 * 16 * 16), (3, 16, 16), CPU)
    assert meter.tiered and meter.options.method == "trace"
    due = [n for n in range(7) if meter.spectrum_options(n) is not None]
    assert due == [0, 3, 6]
    assert meter.spectrum_options(0).method == "lanczos" and meter.spectrum_options(0).k == 2


def test_a_spectrum_setting_that_does_not_fit_the_samples_names_itself():
    with pytest.raises(MemwatchError, match=r"`sharpness.k`=8 is larger than the sample dimension d=6"):
        ProbeMeter(SharpnessOptions(k=8)).prepare(_mixture_score(6), (6,), CPU)
    with pytest.raises(ValueError, match="sharpness.spectrum_every_n_checks"):
        ProbeMeter(SharpnessOptions(), spectrum_every_n_checks=0)


def test_its_measurement_is_the_probe_sets_own_with_its_settings():
    score, timesteps = _mixture_score(6), [200.0, 500.0]
    probes = ProbeSet((6,), 4, 10, timesteps, seed=3)
    meter = ProbeMeter(SharpnessOptions(k=2, method="dense"))
    meter.prepare(score, (6,), CPU)
    with pytest.raises(MemwatchError, match="fix the evaluation timesteps first"):
        meter.measure(probes, score)
    meter.use_timesteps(timesteps)
    measured = meter.measure(probes, score, rows=slice(1, 3))
    direct = probes.measure(score, options=meter.options, rows=slice(1, 3))
    assert list(measured.results) == timesteps
    for t in timesteps:
        torch.testing.assert_close(measured.results[t].eigenvalues, direct.results[t].eigenvalues)
    torch.testing.assert_close(measured.samples, direct.samples)
    # near a copy every eigenvalue of the Hessian is about -1/σ_t²: all directions sharp
    assert bool((measured.primary.sharp_fraction > 0.9).all())


def test_the_spectrum_is_measured_on_its_probes_at_its_checks_only():
    torch.manual_seed(0)
    score = DiffusionScore(MLPDenoiser((3, 16, 16), hidden=16, depth=1, time_dim=4), SCHEDULE)
    timesteps = [300.0]
    probes = ProbeSet((3, 16, 16), 3, 5, timesteps, seed=0)
    meter = ProbeMeter(SharpnessOptions(k=2, num_iters=6, num_vectors=2), 2, spectrum_probes=1)
    meter.prepare(score, (3, 16, 16), CPU)
    meter.use_timesteps(timesteps)
    first, second = (meter.measure(probes, score, checks_done=n) for n in (0, 1))
    assert first.primary.method == "trace" and first.spectrum is not None
    assert first.spectrum.eigenvalues.shape[0] == 1 and second.spectrum is None


def test_conditions_are_parsed_for_the_model_and_a_bad_one_fails_at_prepare():
    net = MLPDenoiser((3,), hidden=8, depth=1, time_dim=4, num_classes=3)
    score = DiffusionScore(net, SCHEDULE, null_cond=torch.tensor(3))
    meter = ProbeMeter(SharpnessOptions(k=1), conditions=[0, 2])
    meter.prepare(score, (3,), CPU)
    assert list(meter.conditions) == ["0", "2"] and meter.conditions["2"].shape == ()
    with pytest.raises(MemwatchError):  # an embedding given to a label model
        ProbeMeter(SharpnessOptions(k=1), conditions=[torch.zeros(4)]).prepare(score, (3,), CPU)
    assert ProbeMeter(SharpnessOptions()).conditions == {}
