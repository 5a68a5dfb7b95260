import warnings

import pytest
import torch

from memwatch.data import GaussianMixture
from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import SharpnessOptions, hessian_score_norm, measure_sharpness

SCHED = NoiseSchedule.linear(1000)


def _score(gmm, prediction="score"):
    return DiffusionScore(gmm.as_model(SCHED, prediction), SCHED, prediction=prediction)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small products: faster on one thread than on shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_a_flow_velocity_gives_the_exact_hessian(mixture):
    """Under x_t = (1 - σ) x_0 + σ ε the mixture's exact velocity ε - x_0, read as flow_prediction,
    is its exact score, and the Jacobian of that score its exact Hessian (dense, float64)."""
    sched = NoiseSchedule.flow(1000)
    t = torch.tensor([20.0, 150.0, 400.0, 850.0], dtype=torch.float64)
    noise = 0.2 * torch.randn(4, 12, generator=_gen(2), dtype=torch.float64)
    x = mixture.means * sched.alpha(t)[:, None] + sched.sigma(t)[:, None] * noise
    score = DiffusionScore(mixture.as_model(sched, "flow_prediction"), sched, prediction="flow_prediction")
    res = measure_sharpness(score, x, t, k=5, method="dense", generator=_gen())
    exact = torch.linalg.eigvalsh(mixture.hessian(x, t, sched))
    torch.testing.assert_close(res.eigenvalues, exact[:, :5], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.normalized, exact[:, :5] * sched.sigma(t)[:, None] ** 2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.trace, exact.sum(1))
    # one Gaussian of std 0.3: p_t = N((1-σ) m, ((1-σ)² 0.3² + σ²) I), Hessian -I / that variance
    single = GaussianMixture.isotropic(mixture.means[:1], std=0.3)
    one = DiffusionScore(single.as_model(sched, "flow_prediction"), sched, prediction="flow_prediction")
    sigma = sched.sigma(t)
    variance = (1 - sigma) ** 2 * 0.09 + sigma**2
    res = measure_sharpness(one, x, t, k=3, method="dense", generator=_gen())
    torch.testing.assert_close(res.eigenvalues, (-1 / variance)[:, None].expand(4, 3), rtol=1e-9, atol=1e-9)


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


def test_one_sample_without_its_batch_axis_is_loud_with_sample_shape():
    score = DiffusionScore(lambda x, t: -x, SCHED)
    image = torch.randn(2, 3, 3, dtype=torch.float64)  # one [C, H, W] sample: read as 2 samples of [3, 3] before
    with pytest.raises(MemwatchError, match=r"`x` must be \[n, \*sample_shape\] = \[n, 2, 3, 3\], got shape "):
        measure_sharpness(score, image, 10, k=2, sample_shape=(2, 3, 3))
    with pytest.raises(MemwatchError, match=r"\(2, 3, 3\): one sample without its batch axis\? pass x\[None\]"):
        hessian_score_norm(score, image, 10, sample_shape=[2, 3, 3])
    with pytest.raises(MemwatchError, match=r"= \[n, 2, 3, 3\], got shape \(4, 3, 3, 2\)$"):
        measure_sharpness(score, torch.randn(4, 3, 3, 2, dtype=torch.float64), 10, k=2, sample_shape=(2, 3, 3))
    assert measure_sharpness(score, image[None], 10, k=2, sample_shape=(2, 3, 3)).lid.shape == (1,)
    with pytest.raises(MemwatchError, match="`sample_shape` must be a non-empty sequence of positive ints"):
        measure_sharpness(score, image[None], 10, k=2, sample_shape=(2, 0, 3))
    with pytest.raises(MemwatchError, match=r"one sample\? add its batch axis: x\[None\]"):
        measure_sharpness(score, torch.randn(5, dtype=torch.float64), 10, k=2)


def test_a_networks_declared_sample_shape_catches_a_missing_batch_axis():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
    )
    score = DiffusionScore(unet, SCHED)
    with pytest.raises(MemwatchError, match=r"= \[n, 1, 4, 4\] \(the network's declared sample shape\), got shape"):
        measure_sharpness(score, torch.randn(1, 4, 4), 10, k=2)
    with pytest.raises(MemwatchError, match=r"one sample without its batch axis; pass x\[None\]"):
        hessian_score_norm(score, torch.randn(1, 4, 4), 10)
    # a batch, at the declared or at another resolution (UNets run at any), is measured
    assert hessian_score_norm(score, torch.randn(2, 1, 4, 4), 10).shape == (2,)
    assert hessian_score_norm(score, torch.randn(2, 1, 8, 8), 10).shape == (2,)


# ---------------------------------------------------------------------- finiteness
def _nan_derivative_score():
    # finite output everywhere; d/dx sqrt(x²) at x = 0 is inf · 0 = NaN in forward and reverse mode
    return DiffusionScore(lambda x, t: torch.sqrt(x**2), SCHED)


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, RuntimeWarning) and "memwatch" in str(w.message)]


@pytest.mark.parametrize("method", ["dense", "lanczos", "trace"])
def test_nan_derivatives_with_finite_output_give_nan_probes_and_one_warning(method):
    x = 0.5 + torch.rand(3, 6, generator=_gen(10), dtype=torch.float64)
    x[1, 2] = 0.0
    res, caught = _record(
        lambda: measure_sharpness(
            _nan_derivative_score(), x, 100, k=2, method=method, num_iters=6, num_vectors=4, generator=_gen()
        )
    )
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "1 of 3 probe(s) [1]" in message and "derivatives" in message  # probes, not probes × vectors
    assert res.finite.tolist() == [True, False, True]
    for name in ("sharp_fraction", "lid", "trace", "flipd", "memorization_score", "trace_stderr"):
        values = getattr(res, name)
        assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all(), name
    if method != "trace":
        assert torch.isnan(res.eigenvalues[1]).all() and torch.isfinite(res.eigenvalues[[0, 2]]).all()
        assert not res.converged[1].any() and res.converged[[0, 2]].all()
        # away from 0, sqrt(x²) = x: the ε-net's score is -x/σ, so H = -I/σ and σ² λ = -σ
        expected = -SCHED.sigma(torch.tensor(100)).expand(2, 2)
        torch.testing.assert_close(res.normalized[[0, 2]], expected.to(torch.float64))


def test_non_finite_output_and_derivatives_are_counted_separately():
    def net(x, t):
        return torch.where(x[:, :1] > 50, float("nan"), torch.sqrt(x**2))

    x = 0.5 + torch.rand(4, 5, generator=_gen(11), dtype=torch.float64)
    x[0, 0], x[2, 3] = 100.0, 0.0
    res, caught = _record(lambda: measure_sharpness(DiffusionScore(net, SCHED), x, 10, k=2, method="dense"))
    (message,) = (str(w.message) for w in caught)
    assert "2 of 4 probe(s) [0, 2]" in message
    assert "score is not finite (NaN/Inf) at 1" in message and "derivatives (Jacobian products) are not at 1" in message
    assert res.finite.tolist() == [False, True, False, True]


# ---------------------------------------------------------------------- convergence
def _linear_score(normalized_spectrum, t, seed=12):
    """``s(x) = A x`` with ``σ_t² A`` of the given spectrum ``[d]`` in a random basis: ``H = A`` exactly."""
    d = normalized_spectrum.numel()
    U = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))[0]
    A = U @ torch.diag(normalized_spectrum / SCHED.sigma(torch.tensor(t)) ** 2) @ U.T
    return DiffusionScore(lambda x, tt: x @ A, SCHED, prediction="score"), A


def test_convergence_mask_on_a_well_separated_spectrum_with_full_lanczos():
    d, t = 24, 300
    score, A = _linear_score(-torch.linspace(0.05, 1.5, 24, dtype=torch.float64), t)
    x = torch.randn(3, d, generator=_gen(13), dtype=torch.float64)
    res, caught = _record(lambda: measure_sharpness(score, x, t, k=4, method="lanczos", num_iters=d, generator=_gen()))
    assert caught == [] and res.converged.all()
    assert (res.residual_bounds * res.sigma[:, None] ** 2 < 1e-8).all()
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A)[:4].expand(3, 4))
    dense = measure_sharpness(score, x, t, k=4, method="dense")
    assert dense.converged.all() and (dense.residual_bounds == 0).all() and (dense.trace_stderr == 0).all()


def test_unconverged_ritz_values_are_flagged_and_their_bounds_hold():
    # hard: 20 normalized eigenvalues within 0.02 of -1 above a bulk in [-0.6, 0]; 4 steps only
    d, t = 60, 300
    spectrum = torch.cat([-1 + 0.001 * torch.arange(20.0), -0.6 * torch.rand(d - 20, generator=_gen(14))]).double()
    score, A = _linear_score(spectrum, t)
    x = torch.randn(3, d, generator=_gen(15), dtype=torch.float64)
    res, caught = _record(lambda: measure_sharpness(score, x, t, k=4, method="lanczos", num_iters=4, generator=_gen()))
    assert not res.converged.all(1).any()
    (message,) = (str(w.message) for w in caught)
    assert "not all converged for 3 of 3 probe(s)" in message and "tol=0.05" in message
    # each Ritz value lies within its bound of an eigenvalue of H
    distance = (res.eigenvalues[:, :, None] - torch.linalg.eigvalsh(A)[None, None, :]).abs().amin(-1)
    assert (distance <= res.residual_bounds * (1 + 1e-9)).all()
    loose, caught = _record(
        lambda: measure_sharpness(score, x, t, k=4, method="lanczos", num_iters=4, tol=1e3, generator=_gen())
    )
    assert loose.converged.all() and caught == []
    torch.testing.assert_close(loose.residual_bounds, res.residual_bounds)


# ---------------------------------------------------------------------- names, Jeon et al.'s norm
def test_score_is_a_deprecated_alias_of_memorization_score(mixture):
    res = measure_sharpness(_score(mixture), torch.randn(2, 12, dtype=torch.float64), 100, method="dense")
    with pytest.warns(DeprecationWarning, match="memorization_score"):
        alias = res.score
    assert alias is res.memorization_score
    torch.testing.assert_close(res.memorization_score, res.sharp_fraction)


def test_hessian_score_norm_equals_the_analytic_value(mixture):
    t = torch.tensor([50, 200, 400, 800])
    x = mixture.means * SCHED.alpha(t)[:, None] + 0.3 * torch.randn(4, 12, generator=_gen(16), dtype=torch.float64)
    exact = torch.einsum("nij,nj->ni", mixture.hessian(x, t, SCHED), mixture.score(x, t, SCHED)).norm(dim=1)
    for prediction, max_batch in (("score", None), ("epsilon", 3)):
        norm = hessian_score_norm(_score(mixture, prediction), x, t, SharpnessOptions(max_batch=max_batch))
        torch.testing.assert_close(norm, exact, rtol=1e-7, atol=0)


def test_hessian_score_norm_is_nan_where_derivatives_are():
    x = 0.5 + torch.rand(3, 4, generator=_gen(17), dtype=torch.float64)
    x[2, 0] = 0.0
    norm, caught = _record(lambda: hessian_score_norm(_nan_derivative_score(), x, 100))
    assert len(caught) == 1 and "1 of 3 probe(s) [2]" in str(caught[0].message)
    sigma = SCHED.sigma(torch.tensor(100))
    torch.testing.assert_close(norm[:2], x[:2].norm(dim=1) / sigma**2)  # s = -x/σ, H = -I/σ
    assert torch.isnan(norm[2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tol=0.0), "`tol`"),
        (dict(trace_estimator="hutch+"), "`trace_estimator`"),
        (dict(method="trace", num_vectors=1), "`num_vectors`"),
        (dict(method="trace", num_vectors=3, trace_estimator="hutch++"), "`num_vectors`"),
    ],
)
def test_bad_new_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessOptions(**kwargs)
