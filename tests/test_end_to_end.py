"""End to end on embedded data: a small training set gives sharper probes than a large one."""

import lightning.pytorch as pl
import pytest
import torch

import memwatch
from memwatch.apps.toymodels import DDPMModule, TensorDataModule
from memwatch.data import digits

STEPS = 1500


def _train(n: int) -> DDPMModule:
    pl.seed_everything(0, verbose=False)
    module = DDPMModule(shape=(1, 8, 8), hidden=256, depth=3, lr=1e-3)
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(module, TensorDataModule(digits(n, seed=0), batch_size=64, steps_per_epoch=500))
    return module.eval()


@pytest.fixture(scope="module")
def trained():
    return {n: _train(n) for n in (32, 1024)}


@pytest.mark.parametrize("sigma", [0.2, 0.4])
def test_small_training_set_is_sharper_than_large(trained, sigma):
    results = {}
    for n, module in trained.items():
        score = module.memwatch_score()
        t = int(score.schedule.timestep_for_sigma(sigma))
        traj = memwatch.sample_trajectory(
            score, 32, (1, 8, 8), 30, generator=torch.Generator().manual_seed(0), states_at=[t]
        )
        results[n] = memwatch.measure_sharpness(score, traj.states[float(t)], t, k=8)
    small, large = results[32], results[1024]
    assert small.method == "dense" and bool(small.finite.all()) and bool(large.finite.all())
    assert float(small.sharp_fraction.mean()) > float(large.sharp_fraction.mean()) + 0.1
    assert float(small.lid.mean()) < float(large.lid.mean()) - 5
