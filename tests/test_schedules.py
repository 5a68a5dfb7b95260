import math

import pytest
import torch

from memwatch.schedules import NoiseSchedule


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.scaled_linear, NoiseSchedule.cosine])
def test_discrete_schedules_are_variance_preserving(make):
    sched = make(1000)
    t = torch.arange(1000)
    ab = sched.alpha_bar(t)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert bool((ab[1:] < ab[:-1]).all()), "ᾱ_t must decrease"
    torch.testing.assert_close(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, torch.ones(1000, dtype=torch.float64))
    assert float(sched.sigma(999)) > 0.99


def test_linear_matches_closed_form_product():
    sched = NoiseSchedule.linear(10, beta_start=0.1, beta_end=0.1)
    torch.testing.assert_close(sched.alpha_bar(torch.tensor(3)), torch.tensor(0.9**4, dtype=torch.float64))


def test_from_diffusers_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    sched = NoiseSchedule.from_diffusers(ddpm)
    torch.testing.assert_close(sched.alpha_bar(torch.arange(1000)), ddpm.alphas_cumprod.double())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_diffusers(object())


def test_vp_closed_form_and_inverse():
    sched = NoiseSchedule.vp(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    expected = torch.exp(-0.5 * t**2 * 19.9 - 0.1 * t)
    torch.testing.assert_close(sched.alpha_bar(t), expected)
    for target in (0.05, 0.3, 0.9):
        assert math.isclose(float(sched.sigma(sched.timestep_for_sigma(target))), target, rel_tol=1e-9)


def test_edm_is_variance_exploding():
    sched = NoiseSchedule.edm()
    torch.testing.assert_close(sched.sigma(torch.tensor(3.0)), torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(sched.alpha(torch.tensor(3.0)), torch.tensor(1.0, dtype=torch.float64))
    grid = sched.sampling_timesteps(18)
    assert grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002)
    assert bool((grid[1:] < grid[:-1]).all())


def test_sampling_grid_and_sigma_lookup_discrete():
    sched = NoiseSchedule.linear(1000)
    grid = sched.sampling_timesteps(50)
    assert grid.dtype == torch.long and int(grid[0]) == 999 and int(grid[-1]) == 0 and len(grid) == 50
    t = sched.timestep_for_sigma(0.3)
    assert abs(float(sched.sigma(t)) - 0.3) < 0.01


@pytest.mark.parametrize(
    "t, match",
    [(1000, r"\[0, 999\]"), (-1, r"\[0, 999\]"), (2.5, "integer"), (float("nan"), "finite")],
)
def test_check_t_rejects_bad_timesteps(t, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(1000).check_t(t)


def test_bad_construction_names_argument():
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.linear(1)
    with pytest.raises(ValueError, match="sigma_min"):
        NoiseSchedule.edm(sigma_min=5.0, sigma_max=1.0)


def test_check_t_keeps_python_floats_in_float64():
    sched = NoiseSchedule.vp()
    t = float(sched.timestep_for_sigma(0.3))
    checked = sched.check_t(t)
    assert checked.dtype == torch.float64 and float(checked) == t
    assert sched.check_t(torch.tensor(0.5, dtype=torch.float32)).dtype == torch.float32


def test_from_diffusers_keeps_the_scheduler_config():
    diffusers = pytest.importorskip("diffusers")
    np = pytest.importorskip("numpy")
    ddpm = diffusers.DDPMScheduler(clip_sample=False, trained_betas=np.linspace(1e-4, 0.02, 1000))
    sched = NoiseSchedule.from_diffusers(ddpm)
    assert sched.scheduler_class == "DDPMScheduler"
    config = sched.diffusers_config()
    assert config["clip_sample"] is False and config["trained_betas"] == pytest.approx(ddpm.betas.double().tolist())
    assert hash(sched) == hash(sched) and sched == sched  # frozen, hashable config
    rebuilt = diffusers.DDIMScheduler.from_config(config)
    torch.testing.assert_close(rebuilt.alphas_cumprod, ddpm.alphas_cumprod)
    assert NoiseSchedule.linear(10).diffusers_config() is None


def test_from_diffusers_without_a_config_keeps_only_the_alphas():
    class Bare:
        alphas_cumprod = NoiseSchedule.linear(50).alphas_cumprod.float()

    sched = NoiseSchedule.from_diffusers(Bare())
    assert sched.scheduler_config is None and sched.num_timesteps == 50
    with pytest.raises(ValueError, match="from_diffusers"):
        sched.ddim_scheduler(10)


@pytest.mark.parametrize(
    "spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 1), ("linspace", 1), ("trailing", 0)]
)
def test_sampling_grid_of_a_diffusers_schedule_is_diffusers_ddim_grid(spacing, offset):
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched = NoiseSchedule.from_diffusers(ddpm)
    for steps in (7, 50):
        ddim = diffusers.DDIMScheduler.from_config(ddpm.config)
        ddim.set_timesteps(steps)
        assert torch.equal(sched.sampling_timesteps(steps), ddim.timesteps)


def test_ddim_scheduler_overrides_and_agrees_with_the_schedule():
    diffusers = pytest.importorskip("diffusers")
    sched = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(prediction_type="v_prediction"))
    ddim = sched.ddim_scheduler(20, prediction_type="epsilon")
    assert ddim.config.prediction_type == "epsilon" and ddim.config.clip_sample and ddim.num_inference_steps == 20
    # a beta schedule DDIM lacks: rebuilt from this schedule's ᾱ
    sigmoid = NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(beta_schedule="sigmoid"))
    torch.testing.assert_close(
        sigmoid.ddim_scheduler(10).alphas_cumprod.double(), sigmoid.alphas_cumprod, rtol=1e-5, atol=0
    )
    for steps in (1, 1001):
        with pytest.raises(ValueError, match=r"`steps` must be an integer in \[2, 1000\]"):
            sched.ddim_scheduler(steps)


# ------------------------------------------------------------------ flow matching
@pytest.mark.parametrize("scale", [None, 1000])
def test_flow_is_the_rectified_interpolant_and_its_levels_are_in_data_units(scale):
    sched = NoiseSchedule.flow(scale)
    T = 1.0 if scale is None else 1000.0
    t = torch.tensor([0.01, 0.25, 0.5, 0.9], dtype=torch.float64) * T
    sigma = t / T
    torch.testing.assert_close(sched.sigma(t), sigma)
    torch.testing.assert_close(sched.alpha(t), 1 - sigma)
    torch.testing.assert_close(sched.alpha_bar(t), (1 - sigma) ** 2)
    torch.testing.assert_close(sched.noise_level(t), sigma / (1 - sigma))  # x_t / α_t = x_0 + (σ/α) ε
    for level in (0.05, 0.3, 1.0, 4.0):
        assert math.isclose(float(sched.noise_level(sched.timestep_for_sigma(level))), level, rel_tol=1e-12)
    assert not sched.is_discrete and (sched.t_min, sched.t_max) == (1e-3 * T, T)
    grid = sched.sampling_timesteps(5)
    torch.testing.assert_close(grid, torch.linspace(T, 1e-3 * T, 5, dtype=torch.float64))
    assert math.isinf(float(sched.noise_level(T)))  # pure noise: no signal left


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(sigma_max=1.5), "sigma_max"),
    ],
)
def test_bad_flow_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.flow(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(shift=3.0), dict(num_train_timesteps=500, shift=0.7)])
def test_from_a_flow_matching_scheduler_is_its_forward_process(kwargs):
    """diffusers' own ``scale_noise`` at each of its training timesteps is x_t = α_t x_0 + σ_t ε of the schedule."""
    diffusers = pytest.importorskip("diffusers")
    flow = diffusers.FlowMatchEulerDiscreteScheduler(**kwargs)
    sched = NoiseSchedule.from_diffusers(flow)
    assert (sched.kind, sched.time_scale) == ("flow", float(flow.config.num_train_timesteps))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = flow.timesteps[torch.tensor([0, 10, len(flow.timesteps) // 2, len(flow.timesteps) - 1])]
    expected = sched.alpha(t)[:, None] * x0.double() + sched.sigma(t)[:, None] * eps.double()
    torch.testing.assert_close(flow.scale_noise(x0, t, eps).double(), expected, atol=1e-6, rtol=0)
    sched.check_t(t)  # every training timestep lies in the schedule's range


def test_a_flow_matching_grid_is_diffusers_own_with_dynamic_shifting_from_the_probe_shape():
    diffusers = pytest.importorskip("diffusers")
    from memwatch.schedules import image_seq_len

    flow = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.05)
    sched = NoiseSchedule.from_diffusers(flow)
    for shape, seq in (((16, 64, 64), 1024), ((1024, 64), 1024), ((3, 8, 8), 16), ((2,), 2)):
        assert image_seq_len(shape) == seq
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)  # the SD3 / Flux pipelines' calculate_shift
        ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config)
        ref.set_timesteps(12, mu=mu)
        torch.testing.assert_close(sched.sampling_timesteps(12, shape), ref.timesteps.double())
    default = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config)
    default.set_timesteps(12, mu=0.5)  # no shape: base_image_seq_len, μ = base_shift
    torch.testing.assert_close(sched.sampling_timesteps(12), default.timesteps.double())


def test_a_flow_matching_scheduler_that_memwatch_cannot_read_is_refused():
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        NoiseSchedule.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    sched = NoiseSchedule.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="flow_scheduler"):
        sched.ddim_scheduler(10)
    with pytest.raises(ValueError, match="flow-matching scheduler config"):
        NoiseSchedule.from_diffusers(diffusers.DDPMScheduler()).flow_scheduler(10)


@pytest.mark.parametrize("solver", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_solver_on_flow_sigmas_is_flow_matching_not_its_unused_betas(solver):
    """SANA / Wan ship a multistep solver with ``use_flow_sigmas=True``: its ``alphas_cumprod`` (from
    betas it never uses) must not be read; the schedule is flow matching with its ``flow_shift``."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, solver)(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sched = NoiseSchedule.from_diffusers(scheduler)
    assert (sched.kind, sched.time_scale, sched.scheduler_class) == ("flow", 1000.0, solver)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps.double()
    sigma = scheduler.sigmas[:-1].double()  # the solver's own σ at its timesteps (the last is its final 0)
    sched.check_t(t)
    torch.testing.assert_close(sched.sigma(t), sigma, atol=2e-3, rtol=0)  # its timesteps are σ·T rounded
    torch.testing.assert_close(sched.alpha(t), 1 - sigma, atol=2e-3, rtol=0)
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(12)
    torch.testing.assert_close(sched.sampling_timesteps(12), euler.timesteps.double())  # probes: Euler, same shift
    dynamic = getattr(diffusers, solver)(use_flow_sigmas=True, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True"):
        NoiseSchedule.from_diffusers(dynamic)
