import pytest
import torch

from memwatch.data import GaussianMixture
from memwatch.schedules import NoiseSchedule
from memwatch.score import PREDICTION_TYPES, DiffusionScore

SCHEDULES = {
    "linear": (NoiseSchedule.linear(1000), torch.tensor([10, 300, 900])),
    "cosine": (NoiseSchedule.cosine(1000), torch.tensor([5, 500, 990])),
    "vp": (NoiseSchedule.vp(), torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)),
    "edm": (NoiseSchedule.edm(), torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)),
}


@pytest.fixture
def gmm():
    g = torch.Generator().manual_seed(0)
    return GaussianMixture.isotropic(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.2)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_every_prediction_type_gives_the_exact_score(gmm, name, prediction):
    sched, t = SCHEDULES[name]
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    score = DiffusionScore(gmm.as_model(sched, prediction), sched, prediction=prediction)
    torch.testing.assert_close(score(x, t), gmm.score(x, t, sched), rtol=1e-9, atol=1e-9)


def test_timestep_broadcast_and_shape_checks(gmm):
    sched = NoiseSchedule.linear(1000)
    score = DiffusionScore(gmm.as_model(sched), sched)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert score(x, 100).shape == (5, 4)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        score(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must lie in"):
        score(x, 5000)
    bad = DiffusionScore(lambda x, t: x[:, :2], sched)
    with pytest.raises(ValueError, match="shaped like its input"):
        bad(x, 10)


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match="`prediction` must be one of"):
        DiffusionScore(lambda x, t: x, NoiseSchedule.linear(10), prediction="eps")


class _CondNet(torch.nn.Module):
    """ε-model whose output depends on a class label; label 0 is the null condition."""

    def forward(self, x, t, label):
        return x * 0.1 + label.to(x.dtype)[:, None]


def test_conditional_guided_and_difference():
    sched = NoiseSchedule.linear(1000)
    score = DiffusionScore(_CondNet(), sched, null_cond=torch.tensor(0), guidance_scale=3.0)
    x = torch.randn(4, 2)
    cond = torch.tensor([1, 2, 3, 4])
    s_c, s_uc = score.conditional(x, 50, cond), score.unconditional(x, 50)
    torch.testing.assert_close(score(x, 50, cond), s_uc + 3.0 * (s_c - s_uc))
    torch.testing.assert_close(score.score_difference(x, 50, cond), s_c - s_uc)
    torch.testing.assert_close(
        score.conditional(x, 50, torch.tensor([2])), score.conditional(x, 50, torch.full((4,), 2))
    )
    with pytest.raises(ValueError, match="batch size 1 or 4"):
        score.conditional(x, 50, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        score.conditional(x, 50, [1, 2, 3, 4])


def test_diffusers_style_outputs_are_unwrapped():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    sched = NoiseSchedule.linear(100)
    x = torch.randn(2, 3)
    ref = DiffusionScore(lambda x, t: x, sched)(x, 5)
    torch.testing.assert_close(DiffusionScore(lambda x, t: Out(x), sched)(x, 5), ref)
    torch.testing.assert_close(DiffusionScore(lambda x, t: (x,), sched)(x, 5), ref)
