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
