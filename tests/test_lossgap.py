"""memwatch.lossgap and ``heldout_data``: the held-out/train gap of the denoising loss, side by side."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from callback_setup import CORNERS, datamodule, module_2d, trainer
from lightning.pytorch.loggers import CSVLogger

from memwatch import DiffusionScore, MemorizationMonitor
from memwatch.apps.toymodels import DDPMModule
from memwatch.errors import MemwatchError
from memwatch.lossgap import LossGap, relative_gap
from memwatch.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(1000)


def _gaussian_score(scale: float) -> DiffusionScore:
    """The exact score of data N(0, scale² I) under the linear VP schedule: -x / (α² scale² + σ²)."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = SCHEDULE.alpha(t).to(x), SCHEDULE.sigma(t).to(x)
        return -x / (a**2 * scale**2 + s**2)[:, None]

    return DiffusionScore(score, SCHEDULE, prediction="score")


def test_the_loss_of_the_exact_gaussian_score_has_its_closed_form():
    """x ~ N(0, c² I): E ‖ε̂ − ε‖² / d = α² c² / (α² c² + σ²) at every t, on both sides alike."""
    c, times = 0.5, (20, 200, 600)
    g = torch.Generator().manual_seed(0)
    probe = LossGap(
        c * torch.randn(4096, 8, generator=g), c * torch.randn(4096, 8, generator=g), timesteps=times, size=4096
    )
    train, held = probe.losses(_gaussian_score(c))
    a2, s2 = SCHEDULE.alpha_bar(torch.tensor(times)), SCHEDULE.sigma(torch.tensor(times)) ** 2
    expected = (a2 * c**2 / (a2 * c**2 + s2)).double()
    # Monte Carlo over 4096 × 8 terms: relative error of a few 1e-2 at most
    torch.testing.assert_close(train, expected, rtol=0.05, atol=1e-4)
    torch.testing.assert_close(held, expected, rtol=0.05, atol=1e-4)
    assert abs(relative_gap(train, held)) < 0.05


def test_it_is_the_ddpm_objective_at_fixed_noise_whatever_the_parameterization():
    torch.manual_seed(0)
    module = DDPMModule(shape=(4,), hidden=16, depth=2).eval()
    x, held = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), torch.randn(5, 4)
    probe = LossGap(x, held, timesteps=(10, 500), size=4, seed=0)
    train_loss, held_loss = probe.losses(module.memwatch_score())
    assert train_loss.shape == held_loss.shape == (2,) and probe.train.shape == (4, 4) and probe.held.shape == (4, 4)
    torch.testing.assert_close(probe.losses(module.memwatch_score())[0], train_loss)  # fixed noises: the same again
    ab = module.alphas_cumprod[500]
    eps = probe._noise["held"][1]
    with torch.no_grad():
        pred = module.net(ab.sqrt() * probe.held + (1 - ab).sqrt() * eps, torch.full((4,), 500))
    assert float(held_loss[1]) == pytest.approx(float(((pred - eps) ** 2).mean()), rel=1e-5)
    # the same network read as a score model (s = -ε̂/σ): the same losses
    as_score = DiffusionScore(
        lambda xt, t: -module.net(xt, t) / SCHEDULE.sigma(t).to(xt)[:, None], SCHEDULE, prediction="score"
    )
    torch.testing.assert_close(probe.losses(as_score, max_batch=3)[1], held_loss, rtol=1e-5, atol=1e-7)


def test_bad_inputs_fail_naming_the_argument():
    ok = torch.randn(4, 2)
    for kwargs, match in [
        (dict(train=ok, held=torch.randn(4, 3)), "`held` samples must have the shape of `train`"),
        (dict(train=ok[:0], held=ok), "`train` must be a finite tensor"),
        (dict(train=ok, held=ok * math.nan), "`held` must be a finite tensor"),
        (dict(train=ok, held=ok, size=0), "`size` must be a positive integer"),
        (dict(train=ok, held=ok, timesteps=()), "`timesteps` must hold at least one timestep"),
    ]:
        with pytest.raises(MemwatchError, match=match):
            LossGap(**{"timesteps": (10,), **kwargs})


def test_a_memorizing_fit_logs_a_growing_loss_gap_beside_sharpness(tmp_path):
    held = CORNERS @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]]) * 0.7  # the corners turned and shrunk: never seen
    monitor = MemorizationMonitor(
        every_n_train_steps=100, num_probes=8, sampler_steps=20, sigmas=(0.2,), k=2,
        reference_data="batches", heldout_data=held,
    )  # fmt: skip
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, [monitor], max_steps=600, logger=logger).fit(module_2d(), datamodule(CORNERS, batch_size=64))
    gaps = [h["loss_gap"] for h in monitor.history]
    assert len(gaps) == 6 and all(math.isfinite(g) for g in gaps)
    assert all(h["loss_heldout"] > h["loss_train"] > 0 for h in monitor.history[2:])
    assert gaps[-1] > gaps[0] and gaps[-1] > 0.5  # four points memorized: fresh ones are denoised far worse
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "memwatch/loss_gap" in metrics and "memwatch/loss_heldout" in metrics


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(reference_data=None, heldout_data=torch.randn(4, 2)),
            r"`loss_gap.heldout_data` is one side .* pass `reference_data`",
        ),
        (dict(reference_data=CORNERS, heldout_data=torch.randn(4, 2), loss_gap_sigmas=()), r"`loss_gap.sigmas` must"),
    ],
)
def test_bad_loss_gap_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorizationMonitor(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(heldout_data=torch.randn(4, 3)), r"`loss_gap.heldout_data` samples have shape \(3,\), but the probes"),
        (dict(heldout_data=torch.randn(4, 2), loss_gap_sigmas=(500.0,)), r"`loss_gap.sigmas` must lie in this"),
    ],
)
def test_bad_loss_gap_data_fail_at_fit_start_naming_the_argument(tmp_path, kwargs, match):
    monitor = MemorizationMonitor(
        every_n_train_steps=10, num_probes=2, sampler_steps=5, k=2, reference_data=CORNERS, **kwargs
    )
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [monitor], max_steps=10).fit(module_2d(), datamodule(CORNERS, batch_size=4))
