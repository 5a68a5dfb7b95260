"""Probes drawn as diffusers' own DDIM loop draws them, for a tiny diffusers UNet2DModel."""

import pytest
import torch

from memwatch.apps.toymodels import tiny_unet
from memwatch.data import GaussianMixture
from memwatch.errors import MemwatchError
from memwatch.sampling import out_of_range, probe_noise, sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

diffusers = pytest.importorskip("diffusers")

STEPS = 10
SCHEDULERS = {
    "ddpm-default": lambda p: diffusers.DDPMScheduler(prediction_type=p),
    "no-clip": lambda p: diffusers.DDPMScheduler(prediction_type=p, clip_sample=False),
    "thresholding": lambda p: diffusers.DDPMScheduler(prediction_type=p, thresholding=True, sample_max_value=1.5),
    "leading+1": lambda p: diffusers.DDPMScheduler(prediction_type=p, timestep_spacing="leading", steps_offset=1),
    "trailing+1": lambda p: diffusers.DDPMScheduler(prediction_type=p, timestep_spacing="trailing", steps_offset=1),
    "linspace+1": lambda p: diffusers.DDPMScheduler(prediction_type=p, timestep_spacing="linspace", steps_offset=1),
    "ddim-alpha0": lambda p: diffusers.DDIMScheduler(prediction_type=p, set_alpha_to_one=False, clip_sample_range=0.8),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet is slower on contended threads than on one
    yield
    torch.set_num_threads(threads)


def _unet(scale: float = 1.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    unet = tiny_unet(3).eval()
    with torch.no_grad():  # output std ≈ 0.3 · scale
        unet.conv_out.weight.mul_(scale)
        unet.conv_out.bias.mul_(scale)
    return unet


@pytest.fixture(scope="module")
def unet():
    return _unet(scale=3.0)


def _noise(n: int = 4) -> torch.Tensor:
    return probe_noise(n, (3, 8, 8), generator=torch.Generator().manual_seed(1))


def _diffusers_loop(unet, scheduler, noise, steps, states_at=()):
    """diffusers' DDIM loop (eta = 0) with the model's own prediction type, and the state at each
    requested t: the loop's x when a step lands on t, else a DDIM step to t from the nearest
    noisier grid timestep, from diffusers' x̂_0 and the ε it uses there."""
    ddim = diffusers.DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    grid = [int(t) for t in ddim.timesteps]
    jump = ddim.config.num_train_timesteps // steps
    x, states = noise.clone(), {float(grid[0]): noise.clone()} if grid[0] in states_at else {}
    with torch.no_grad():
        for i, t in enumerate(ddim.timesteps):
            out_model = unet(x, t).sample
            out = ddim.step(out_model, t, x)
            ab = ddim.alphas_cumprod[t]
            eps = out_model if ddim.config.prediction_type == "epsilon" else ab**0.5 * out_model + (1 - ab) ** 0.5 * x
            lower = grid[i + 1] if i + 1 < len(grid) else -1
            for tau in states_at:
                if lower <= tau < grid[i]:
                    ab_tau = ddim.alphas_cumprod[tau]
                    side = ab_tau**0.5 * out.pred_original_sample + (1 - ab_tau) ** 0.5 * eps
                    states[float(tau)] = out.prev_sample if tau == grid[i] - jump else side
            x = out.prev_sample
    return x, states, grid


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_probes_match_diffusers_ddim_loop(unet, name, prediction):
    scheduler = SCHEDULERS[name](prediction)
    noise = _noise()
    ref_grid = diffusers.DDIMScheduler.from_config(scheduler.config)
    ref_grid.set_timesteps(STEPS)
    grid = [int(t) for t in ref_grid.timesteps]
    states_at = [grid[0], grid[3], grid[3] - 37, 0]
    expected, expected_states, _ = _diffusers_loop(unet, scheduler, noise, STEPS, states_at)

    score = DiffusionScore(unet, NoiseSchedule.from_diffusers(scheduler), prediction=prediction)
    traj = sample_trajectory(score, noise=noise, steps=STEPS, states_at=states_at)

    assert traj.timesteps.tolist() == grid
    torch.testing.assert_close(traj.samples, expected, atol=1e-4, rtol=0)
    assert list(traj.states) == [float(t) for t in states_at]
    for t in states_at:
        torch.testing.assert_close(traj.states[float(t)], expected_states[float(t)], atol=1e-4, rtol=0)
    clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    if scheduler.config.thresholding:
        clip = 1.0
    assert traj.data_range == (None if clip is None else (-clip, clip))


def test_clipping_keeps_a_diverging_model_in_range():
    unet = _unet(scale=10.0, seed=1)
    noise = _noise(8)
    clipped = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler())
    free = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(clip_sample=False))
    bare = NoiseSchedule.from_alphas_cumprod(clipped.alphas_cumprod)  # no config: memwatch's own DDIM
    runs = {
        name: sample_trajectory(DiffusionScore(unet, sched), noise=noise, steps=STEPS)
        for name, sched in (("clipped", clipped), ("free", free), ("bare", bare))
    }
    assert float(runs["free"].samples.abs().amax()) > 10 and float(runs["bare"].samples.abs().amax()) > 10
    assert bool(out_of_range(runs["free"].samples, -1.0, 1.0).any())
    assert runs["clipped"].data_range == (-1.0, 1.0) and runs["free"].data_range is None
    assert float(runs["clipped"].samples.abs().amax()) <= 1.0
    assert not bool(out_of_range(runs["clipped"].samples, *runs["clipped"].data_range, tolerance=0.0).any())


def test_states_are_at_exactly_the_requested_timesteps():
    """A point mass at μ has x̂_0 = μ at every step, so a state at exactly t is α_t μ + σ_t ε̂, ε̂ the noise
    estimate at the nearest noisier grid timestep; with "leading" spacing every step lands on the next
    grid timestep and ε̂ stays the start's ε_0."""
    mean = torch.tensor([0.5, -0.25, 0.0, 0.75], dtype=torch.float64)
    noise = probe_noise(3, (4,), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(scheduler, states_at):
        sched = NoiseSchedule.from_diffusers(scheduler)
        score = DiffusionScore(GaussianMixture.isotropic(mean[None], std=0.0).as_model(sched), sched)
        return sched, sample_trajectory(score, noise=noise, steps=STEPS, states_at=states_at, dtype=torch.float64)

    def at(sched, t, eps):
        t = torch.tensor(t)
        return sched.alpha(t) * mean + sched.sigma(t) * eps

    sched, traj = run(diffusers.DDPMScheduler(steps_offset=1), [901, 501, 437, 0])
    assert traj.timesteps.tolist() == list(range(901, 0, -100))
    eps0 = (noise - sched.alpha(torch.tensor(901)) * mean) / sched.sigma(torch.tensor(901))
    for t in (901, 501, 437, 0):
        torch.testing.assert_close(traj.states[float(t)], at(sched, t, eps0), atol=1e-6, rtol=0)
    torch.testing.assert_close(traj.samples, mean.expand(3, 4), atol=1e-6, rtol=0)

    # "linspace": a step from t lands on t - 100, not on the next grid timestep (diffusers' own rule)
    sched, traj = run(diffusers.DDPMScheduler(timestep_spacing="linspace"), [888, 555])
    grid = traj.timesteps.tolist()
    assert grid[:4] == [999, 888, 777, 666]
    eps, x = None, noise
    for t, t_next in zip(grid, grid[1:]):  # the pipeline's own path, analytically
        eps = (x - sched.alpha(torch.tensor(t)) * mean) / sched.sigma(torch.tensor(t))
        if t_next in (888, 555):
            torch.testing.assert_close(traj.states[float(t_next)], at(sched, t_next, eps), atol=1e-6, rtol=0)
        x = at(sched, t - 100, eps)


def test_a_state_noisier_than_the_grid_is_refused():
    sched = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler())  # "leading": the grid starts at 900
    score = DiffusionScore(GaussianMixture.isotropic(torch.zeros(1, 2), std=0.0).as_model(sched), sched)
    with pytest.raises(MemwatchError, match=r"`states_at` must be at most 900.*got \[950.0\]"):
        sample_trajectory(score, 2, (2,), STEPS, states_at=[950, 300])


@pytest.mark.parametrize("prediction, atol", [("epsilon", 1e-10), ("v_prediction", 2e-6)])
@pytest.mark.parametrize("name", ["ddpm-default", "thresholding", "linspace+1"])
def test_probes_match_diffusers_in_float64(name, prediction, atol):
    """In float64 the scheduler sees the same ε̂ as in diffusers' loop up to rounding; with v-prediction
    diffusers converts v with √ᾱ_t computed in float32 (its ``alphas_cumprod``), the score in float64."""
    unet = _unet(scale=3.0).double()
    scheduler = SCHEDULERS[name](prediction)
    noise = _noise().double()
    expected, _, _ = _diffusers_loop(unet, scheduler, noise, STEPS)
    score = DiffusionScore(unet, NoiseSchedule.from_diffusers(scheduler), prediction=prediction)
    traj = sample_trajectory(score, noise=noise, steps=STEPS, dtype=torch.float64)
    torch.testing.assert_close(traj.samples, expected, atol=atol, rtol=0)


# ------------------------------------------------------------------ flow matching
FLOW_SCHEDULERS = {
    "default": dict(),
    "shift3": dict(shift=3.0),
    "dynamic": dict(use_dynamic_shifting=True),
    "karras+terminal": dict(use_karras_sigmas=True, shift_terminal=0.1),
}


def _flow_loop(unet, scheduler, noise, steps, mu=None):
    """The SD3 pipeline's denoising loop (no guidance): the network's velocity at ``t.expand(n)``,
    stepped by a fresh FlowMatchEulerDiscreteScheduler from the config."""
    euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    euler.set_timesteps(steps, mu=mu)
    x = noise.clone()
    with torch.no_grad():
        for t in euler.timesteps:
            x = euler.step(unet(x, t.expand(x.shape[0])).sample, t, x).prev_sample
    return x, euler.timesteps


@pytest.mark.parametrize("name", list(FLOW_SCHEDULERS))
def test_probes_match_the_flow_matching_euler_loop(unet, name):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[name])
    noise = _noise()
    mu = 0.5 + 0.65 / 3840 * (16 - 256) if scheduler.config.use_dynamic_shifting else None  # 8×8: 16 tokens
    expected, grid = _flow_loop(unet, scheduler, noise, STEPS, mu)
    score = DiffusionScore(unet, NoiseSchedule.from_diffusers(scheduler), prediction="flow_prediction")
    traj = sample_trajectory(score, noise=noise, steps=STEPS, states_at=[float(grid[3])])
    torch.testing.assert_close(traj.timesteps, grid)
    torch.testing.assert_close(traj.samples, expected, atol=1e-5, rtol=0)
    assert traj.data_range is None  # Euler does not clip


@pytest.mark.parametrize("diffusers_grid", [True, False])
def test_flow_states_and_samples_of_a_point_mass_are_exact(diffusers_grid):
    """A point mass at μ has the straight path x_σ = (1 - σ) μ + σ ε₀ from the start noise ε₀ and a
    velocity ε₀ - μ that Euler integrates exactly: every state, on the grid or between, is on it."""
    mean = torch.tensor([0.5, -0.25, 0.0, 0.75], dtype=torch.float64)
    noise = probe_noise(3, (4,), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if diffusers_grid:
        sched = NoiseSchedule.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    else:
        sched = NoiseSchedule.flow(1000)
    score = DiffusionScore(lambda x, t: mean.expand_as(x), sched, "sample")  # x̂_0 = μ, exact at every σ
    grid = sched.sampling_timesteps(STEPS)
    states_at = [float(grid[0]), float(grid[4]), 437.0, 3.0]
    traj = sample_trajectory(score, noise=noise, steps=STEPS, states_at=states_at, dtype=torch.float64)
    for t in states_at:
        sigma = t / 1000
        torch.testing.assert_close(traj.states[t], (1 - sigma) * mean + sigma * noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(traj.samples, mean.expand(3, 4), atol=1e-6, rtol=0)
