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
    "flow": (NoiseSchedule.flow(1000), torch.tensor([2.0, 400.0, 950.0], dtype=torch.float64)),
    "flow-continuous": (NoiseSchedule.flow(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)),
}
#: the prediction × schedule pairs refused by definition
WRONG_BY_DEFINITION = {("flow_prediction", k) for k in ("linear", "cosine", "vp", "edm")} | {
    ("v_prediction", "flow"),
    ("v_prediction", "flow-continuous"),
}
PAIRS = [(p, k) for p in PREDICTION_TYPES for k in SCHEDULES if (p, k) not in WRONG_BY_DEFINITION]


@pytest.fixture
def gmm():
    g = torch.Generator().manual_seed(0)
    return GaussianMixture.isotropic(torch.randn(3, 4, generator=g, dtype=torch.float64), std=0.2)


@pytest.mark.parametrize(("prediction", "name"), PAIRS)
def test_every_prediction_type_gives_the_exact_score(gmm, name, prediction):
    sched, t = SCHEDULES[name]
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    score = DiffusionScore(gmm.as_model(sched, prediction), sched, prediction=prediction)
    torch.testing.assert_close(score(x, t), gmm.score(x, t, sched), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("prediction", "name"), sorted(WRONG_BY_DEFINITION))
def test_a_prediction_wrong_for_its_schedule_by_definition_is_refused(prediction, name):
    sched, _ = SCHEDULES[name]
    with pytest.raises(ValueError, match=f"`prediction`='{prediction}'.*flow") as err:
        DiffusionScore(lambda x, t: x, sched, prediction=prediction)
    assert sched.kind in str(err.value) or "flow_prediction" in str(err.value)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "score", "flow_prediction"])
@pytest.mark.parametrize("name", ["flow", "flow-continuous"])
def test_flow_velocity_is_the_exact_epsilon_minus_x0(gmm, name, prediction):
    """û = ε̂ - x̂_0 = dx_t/dσ_t, the posterior mean of ε - x_0, from every prediction type."""
    sched, t = SCHEDULES[name]
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    score = DiffusionScore(gmm.as_model(sched, prediction), sched, prediction=prediction)
    alpha, sigma = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    s = gmm.score(x, t, sched)
    eps, x0 = -sigma * s, (x + sigma**2 * s) / alpha  # Tweedie
    torch.testing.assert_close(score.velocity(x, t), eps - x0, rtol=1e-9, atol=1e-9)


def test_flow_velocity_is_defined_at_pure_noise_and_only_on_a_flow_schedule():
    sched = NoiseSchedule.flow(1000)
    x = torch.randn(2, 3, dtype=torch.float64)
    net = DiffusionScore(lambda x, t: 2 * x, sched, prediction="flow_prediction")
    torch.testing.assert_close(net.velocity(x, 1000.0), 2 * x)  # σ_t = 1, α_t = 0: the network's own output
    torch.testing.assert_close(net(x, 1000.0), -x)  # p_1 = N(0, I) whatever the network
    with pytest.raises(ValueError, match="needs a flow schedule"):
        DiffusionScore(lambda x, t: x, NoiseSchedule.linear(10)).velocity(x, 3)


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


# ------------------------------------------------------------------ condition shapes
class _TextNet(torch.nn.Module):
    """ε-model taking an embedding batch ``[n, L, E]`` like ``encoder_hidden_states``; fails on anything else."""

    def __init__(self, tokens: int = 4, width: int = 32) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, 2, dtype=torch.float64)
        self.tokens, self.width = tokens, width

    def forward(self, x, t, encoder_hidden_states):
        n = x.shape[0]
        if encoder_hidden_states.shape != (n, self.tokens, self.width):
            raise RuntimeError(f"not enough values to unpack: got {tuple(encoder_hidden_states.shape)}")
        return x * 0.1 + self.proj(encoder_hidden_states.mean(1))


def _text_score(null_cond):
    return DiffusionScore(
        _TextNet(), NoiseSchedule.linear(100), null_cond=null_cond, cond_kwarg="encoder_hidden_states"
    )


def test_null_embedding_without_batch_axis_is_one_condition_even_when_L_equals_n():
    g = torch.Generator().manual_seed(0)
    null, emb = torch.zeros(4, 32, dtype=torch.float64), torch.randn(4, 32, generator=g, dtype=torch.float64)
    score = _text_score(null)
    assert score.cond_shape == (4, 32)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)  # n = 4 = L: the ambiguous case
    one = score.conditional(x, 30, emb)  # one embedding for all four samples
    torch.testing.assert_close(one, score.conditional(x, 30, emb.expand(4, 4, 32)))
    torch.testing.assert_close(one, score.conditional(x, 30, emb[None]))
    torch.testing.assert_close(score.unconditional(x, 30), score.conditional(x, 30, null))
    per_sample = torch.randn(4, 4, 32, generator=g, dtype=torch.float64)
    rows = torch.cat([score.conditional(x[i : i + 1], 30, per_sample[i]) for i in range(4)])
    torch.testing.assert_close(score.conditional(x, 30, per_sample), rows)
    assert score.batch_condition(emb, 7).shape == (7, 4, 32)


@pytest.mark.parametrize(
    "cond, match",
    [
        (
            torch.zeros(4, 16),
            r"`cond` must be one condition of shape \(4, 32\) .* \(1, 4, 32\) or \(3, 4, 32\); "
            r"got shape \(4, 16\)",
        ),
        (torch.zeros(2, 4, 32), r"batch size 1 or 3 .* got shape \(2, 4, 32\)"),
        (torch.zeros(32), r"got shape \(32,\)"),
        (torch.zeros(3, 1, 4, 32), r"got shape \(3, 1, 4, 32\)"),
        (torch.zeros(4, 32, dtype=torch.long), r"`cond` must be floating \(an embedding\) like `null_cond`"),
        (torch.zeros(4, 32, dtype=torch.bool), r"`cond` must be a torch.Tensor .* got a torch.bool tensor"),
        (3, r"`cond` must be floating"),
    ],
)
def test_a_cond_of_another_shape_or_kind_than_null_cond_is_named(cond, match):
    score = _text_score(torch.zeros(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        score.conditional(torch.zeros(3, 2, dtype=torch.float64), 10, cond)


def test_label_null_cond_accepts_int_and_broadcasts():
    score = DiffusionScore(_CondNet(), NoiseSchedule.linear(100), null_cond=5)
    assert score.cond_shape == () and score.null_cond.dtype == torch.long
    x = torch.randn(3, 2)
    torch.testing.assert_close(score.conditional(x, 10, 2), score.conditional(x, 10, torch.tensor([2, 2, 2])))
    torch.testing.assert_close(score.unconditional(x, 10), score.conditional(x, 10, 5))
    assert DiffusionScore(_CondNet(), NoiseSchedule.linear(100)).cond_shape is None


def test_legacy_batched_null_embedding_is_deprecated_but_works():
    with pytest.warns(DeprecationWarning, match=r"null_cond\[0\] of shape \(4, 32\)"):
        score = _text_score(torch.zeros(1, 4, 32, dtype=torch.float64))
    assert score.cond_shape == (4, 32)
    x = torch.randn(3, 2, dtype=torch.float64)
    emb = torch.ones(1, 4, 32, dtype=torch.float64)  # the old way of passing one prompt
    torch.testing.assert_close(score.conditional(x, 10, emb), score.conditional(x, 10, emb[0]))
    assert score.unconditional(x, 10).shape == x.shape
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert score.with_model(score.model).cond_shape == (4, 32)  # no second warning


@pytest.mark.parametrize(
    "null_cond, match",
    [
        (0.5, r"`null_cond` must be one condition without a batch axis.* got float"),
        (True, r"`null_cond` must be .* got bool"),
        ("", r"`null_cond` must be .* got str"),
        (torch.tensor(True), r"`null_cond` must be an integer label or a real embedding, got dtype torch.bool"),
        (torch.zeros(0, 32), r"`null_cond` must not be empty, got shape \(0, 32\)"),
        (torch.full((4, 8), float("nan")), r"`null_cond` must be finite"),
    ],
)
def test_a_bad_null_cond_fails_at_construction(null_cond, match):
    with pytest.raises(ValueError, match=match):
        DiffusionScore(_CondNet(), NoiseSchedule.linear(10), null_cond=null_cond)
