import pytest
import torch

from memwatch.data import GaussianMixture
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import measure_sharpness

SCHED = NoiseSchedule.linear(1000)


def _score(gmm, prediction="score"):
    return DiffusionScore(gmm.as_model(SCHED, prediction), SCHED, prediction=prediction)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.isotropic(torch.randn(4, 12, generator=_gen(1), dtype=torch.float64), std=0.3)


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_eigenvalues_equal_the_analytic_hessian(mixture, method):
    t = torch.tensor([50, 200, 400, 800])
    x = mixture.means * SCHED.alpha(t)[:, None] + 0.2 * torch.randn(4, 12, generator=_gen(2), dtype=torch.float64)
    res = measure_sharpness(_score(mixture), x, t, k=5, method=method, num_iters=12, num_vectors=16, generator=_gen())
    exact = torch.linalg.eigvalsh(mixture.hessian(x, t, SCHED))
    torch.testing.assert_close(res.eigenvalues, exact[:, :5], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.normalized, exact[:, :5] * SCHED.sigma(t)[:, None] ** 2, rtol=1e-6, atol=1e-8)
    s2 = SCHED.sigma(t)[:, None] ** 2
    exact_fraction = (exact * s2 < -0.5).double().mean(1)
    # dense counts exactly; SLQ is a 16-vector quadrature estimate
    torch.testing.assert_close(res.sharp_fraction, exact_fraction, atol=0 if method == "dense" else 0.1, rtol=0)
    torch.testing.assert_close(res.lid, 12 * (1 - res.sharp_fraction))
    if method == "dense":
        torch.testing.assert_close(res.trace, exact.sum(1))
    assert res.method == method and bool(res.finite.all())
    torch.testing.assert_close(res.spectrum_weights.sum(1), torch.ones(4, dtype=torch.float64))


def test_a_memorized_point_has_every_direction_sharp():
    # point masses (std 0): near a training point p_t = N(α x0, σ² I), all eigenvalues = -1/σ²
    gmm = GaussianMixture.isotropic(4 * torch.randn(3, 16, generator=_gen(3), dtype=torch.float64), std=0.0)
    t = torch.tensor([20, 60, 100])
    x = gmm.means * SCHED.alpha(t)[:, None] + 0.01 * torch.randn(3, 16, generator=_gen(4), dtype=torch.float64)
    res = measure_sharpness(_score(gmm, "epsilon"), x, t, k=8, method="lanczos", num_iters=16, generator=_gen())
    torch.testing.assert_close(res.normalized, torch.full((3, 8), -1.0, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.sharp_fraction, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(res.lid, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(res.flipd, torch.zeros(3, dtype=torch.float64), atol=1e-3, rtol=0)


def test_a_densely_sampled_line_reads_as_one_intrinsic_dimension():
    # 400 training points 0.005 apart on a line in R^8: at σ ≈ 0.1 the density is a 1-D ridge
    d = 8
    direction = torch.nn.functional.normalize(torch.randn(d, generator=_gen(5), dtype=torch.float64), dim=0)
    points = torch.linspace(-1, 1, 400, dtype=torch.float64)[:, None] * direction
    gmm = GaussianMixture.isotropic(points, std=0.0)
    t = SCHED.timestep_for_sigma(0.1)
    x = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)[:, None] * direction * SCHED.alpha(t)
    # dense counts eigenvalues; SLQ's LID with m vectors has std ≈ sqrt(2 (d-1)/(d+2) / m) ≈ 0.2 at m = 32
    for method, atol in (("dense", 0.35), ("lanczos", 0.7)):
        res = measure_sharpness(_score(gmm), x, t, k=d, method=method, num_iters=d, num_vectors=32, generator=_gen())
        torch.testing.assert_close(res.lid, torch.ones(6, dtype=torch.float64), atol=atol, rtol=0)
        torch.testing.assert_close(res.normalized[:, -1], torch.zeros(6, dtype=torch.float64), atol=0.05, rtol=0)


def test_chunking_and_auto_method_do_not_change_results(mixture):
    x = torch.randn(6, 12, generator=_gen(6), dtype=torch.float64)
    full = measure_sharpness(_score(mixture), x, 100, method="lanczos", num_iters=10, generator=_gen(7))
    chunked = measure_sharpness(_score(mixture), x, 100, method="lanczos", num_iters=10, max_batch=5, generator=_gen(7))
    torch.testing.assert_close(full.eigenvalues, chunked.eigenvalues)
    torch.testing.assert_close(full.sharp_fraction, chunked.sharp_fraction)
    auto = measure_sharpness(_score(mixture), x, 100, method="auto", max_batch=4)
    assert auto.method == "dense"


@pytest.mark.parametrize("max_batch", [1, 5, 30, 100])
def test_dense_chunking_does_not_change_results(mixture, max_batch):
    # max_batch bounds samples × basis vectors: 1 → one product at a time, 30 → 2 samples × 15 vectors
    x = torch.randn(6, 12, generator=_gen(6), dtype=torch.float64)
    full = measure_sharpness(_score(mixture), x, 100, k=12, method="dense")
    chunked = measure_sharpness(_score(mixture), x, 100, k=12, method="dense", max_batch=max_batch)
    torch.testing.assert_close(full.eigenvalues, chunked.eigenvalues)
    torch.testing.assert_close(full.trace, chunked.trace)


def test_image_shaped_samples():
    gmm = GaussianMixture.isotropic(torch.randn(2, 2 * 3 * 3, generator=_gen(8), dtype=torch.float64), std=0.5)

    def net(x, t):
        return gmm.as_model(SCHED)(x.flatten(1), t).reshape(x.shape)

    x = torch.randn(3, 2, 3, 3, generator=_gen(9), dtype=torch.float64)
    res = measure_sharpness(DiffusionScore(net, SCHED), x, 300, k=4)
    exact = torch.linalg.eigvalsh(gmm.hessian(x.flatten(1), 300, SCHED))
    torch.testing.assert_close(res.eigenvalues, exact[:, :4], rtol=1e-6, atol=1e-8)


def test_non_finite_model_output_gives_nan_rows_and_a_warning():
    def net(x, t):  # per-sample: NaN wherever the first coordinate is huge
        return torch.where(x[:, :1] > 50, float("nan"), x)

    x = torch.randn(3, 5, dtype=torch.float64)
    x[1, 0] = 100.0
    for method in ("dense", "lanczos"):
        with pytest.warns(RuntimeWarning, match="not finite"):
            res = measure_sharpness(DiffusionScore(net, SCHED), x, 10, k=2, method=method, num_iters=5)
        assert res.finite.tolist() == [True, False, True]
        assert torch.isnan(res.sharp_fraction[1]) and torch.isfinite(res.sharp_fraction[[0, 2]]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "`k`"),
        (dict(k=99), "`k`"),
        (dict(method="arpack"), "`method`"),
        (dict(threshold=-1.0), "`threshold`"),
        (dict(num_vectors=0), "`num_vectors`"),
        (dict(max_batch=0), "`max_batch`"),
        (dict(t=5000), "must lie in"),
    ],
)
def test_bad_arguments_are_named(mixture, kwargs, match):
    x = torch.randn(2, 12, dtype=torch.float64)
    t = kwargs.pop("t", 10)
    with pytest.raises(ValueError, match=match):
        measure_sharpness(_score(mixture), x, t, **kwargs)


def test_wrong_sample_shape_is_reported(mixture):
    with pytest.raises(ValueError):
        measure_sharpness(_score(mixture), torch.randn(2, 7, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match="`x`"):
        measure_sharpness(_score(mixture), torch.randn(7, dtype=torch.float64), 10)
