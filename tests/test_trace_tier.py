"""The trace tier of memwatch.sharpness (``method="trace"``): LID / FLIPD from Hutchinson or Hutch++
estimates of ``tr(∂D/∂x)``, in float64 against dense Hessians and closed forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from memwatch.data import GaussianMixture
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import measure_sharpness

SCHED = NoiseSchedule.linear(1000)
DT = torch.float64
ESTIMATORS = [("hutchinson", 8), ("hutch++", 9)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class DegenerateGaussian(nn.Module):
    """Exact score of ``x_t`` for ``x_0 ~ N(μ, U Uᵀ)``, ``U`` ``[D, k]`` orthonormal (a flat k-dim subspace):
    ``s = -Σ_t⁻¹ (x - α μ)``, ``Σ_t = α² U Uᵀ + σ² I``. LID ``= d + σ² tr H = k α² / (α² + σ²)``."""

    def __init__(self, d: int, k: int, seed: int = 0) -> None:
        super().__init__()
        self.mu = torch.randn(d, generator=_gen(seed), dtype=DT)
        self.U = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed + 1), dtype=DT))[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = SCHED.alpha(t).to(x)[:, None], SCHED.sigma(t).to(x)[:, None]
        diff = x - alpha * self.mu
        along = (diff @ self.U) @ self.U.T
        return -(diff - along) / sigma**2 - along / (alpha**2 + sigma**2)

    def lid(self, t: torch.Tensor) -> torch.Tensor:
        alpha2 = SCHED.alpha(t).to(DT) ** 2
        return self.U.shape[1] * alpha2 / (alpha2 + SCHED.sigma(t).to(DT) ** 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small products: faster on one thread than on shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.isotropic(torch.randn(4, 12, generator=_gen(1), dtype=DT), std=0.3)


def _gmm_score(gmm: GaussianMixture, prediction: str = "epsilon") -> DiffusionScore:
    return DiffusionScore(gmm.as_model(SCHED, prediction), SCHED, prediction=prediction)


@pytest.mark.parametrize("estimator, num_vectors", ESTIMATORS)
def test_trace_tier_is_unbiased_against_the_dense_trace(mixture, estimator, num_vectors):
    t = torch.tensor([100, 300, 600])
    x = mixture.means[:3] * SCHED.alpha(t)[:, None] + 0.4 * torch.randn(3, 12, generator=_gen(2), dtype=DT)
    score = _gmm_score(mixture)
    exact = torch.diagonal(mixture.hessian(x, t, SCHED), dim1=1, dim2=2).sum(-1)
    runs = [
        measure_sharpness(
            score, x, t, k=1, method="trace", num_vectors=num_vectors, trace_estimator=estimator, generator=_gen(s)
        )
        for s in range(200)
    ]
    traces = torch.stack([r.trace for r in runs])
    assert ((traces.mean(0) - exact).abs() < 3 * traces.std(0) / 200**0.5).all()
    reported = torch.stack([r.trace_stderr for r in runs]).pow(2).mean(0).sqrt()
    assert ((reported / traces.std(0) > 0.75) & (reported / traces.std(0) < 1.33)).all()
    dense = measure_sharpness(score, x, t, k=1, method="dense")
    torch.testing.assert_close(dense.trace, exact)
    assert (traces.std(0) > 0).all()


@pytest.mark.parametrize("estimator, num_vectors", ESTIMATORS)
def test_lid_is_zero_near_a_memorized_point(estimator, num_vectors):
    # point masses far apart: near one, ∂D/∂x ≈ 0, so LID ≈ 0 and every direction reads sharp
    gmm = GaussianMixture.isotropic(4 * torch.randn(3, 16, generator=_gen(3), dtype=DT), std=0.0)
    t = torch.tensor([20, 60, 100])
    x = gmm.means * SCHED.alpha(t)[:, None] + 0.01 * torch.randn(3, 16, generator=_gen(4), dtype=DT)
    res = measure_sharpness(
        _gmm_score(gmm), x, t, method="trace", num_vectors=num_vectors, trace_estimator=estimator, generator=_gen()
    )
    torch.testing.assert_close(res.lid, torch.zeros(3, dtype=DT), atol=1e-3, rtol=0)
    torch.testing.assert_close(res.sharp_fraction, torch.ones(3, dtype=DT), atol=1e-4, rtol=0)
    dense = measure_sharpness(_gmm_score(gmm), x, t, method="dense")
    assert ((res.flipd - dense.flipd).abs() <= 4 * res.sigma**2 * res.trace_stderr + 1e-9).all()


def test_lid_is_k_on_a_linear_subspace():
    d, k = 20, 3
    model = DegenerateGaussian(d, k)
    score = DiffusionScore(model, SCHED, prediction="score")
    t = torch.full((4,), SCHED.timestep_for_sigma(0.05))
    x = SCHED.alpha(t)[:, None] * (model.mu + torch.randn(4, k, generator=_gen(5), dtype=DT) @ model.U.T)
    x = x + 0.05 * torch.randn(4, d, generator=_gen(6), dtype=DT)
    exact = model.lid(t)
    assert (exact - k).abs().max() < 0.01  # small σ: the subspace's dimension

    # Hutch++ with >= 3k vectors is exact for the rank-k denoiser Jacobian
    hpp = measure_sharpness(score, x, t, method="trace", num_vectors=3 * k, trace_estimator="hutch++", generator=_gen())
    torch.testing.assert_close(hpp.lid, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(hpp.flipd, hpp.lid)
    torch.testing.assert_close(hpp.sharp_fraction, 1 - exact / d, rtol=0, atol=1e-9)
    # Hutchinson: an estimate within a few of its own standard errors (variance 2k(1 - ...) per vector)
    hutch = measure_sharpness(score, x, t, method="trace", num_vectors=32, generator=_gen())
    err = hutch.sigma**2 * hutch.trace_stderr
    assert (err > 0.05).all() and ((hutch.lid - exact).abs() < 4 * err).all()
    # the spectral methods count k flat directions: dense exactly, SLQ (32 vectors, s.d. ≈ 0.4) roughly
    for method, atol in (("dense", 1e-9), ("lanczos", 1.5)):
        res = measure_sharpness(score, x, t, k=d, method=method, num_iters=d, num_vectors=32, generator=_gen())
        torch.testing.assert_close(res.lid, torch.full((4,), float(k), dtype=DT), atol=atol, rtol=0)


def test_trace_tier_fields_it_does_not_measure_are_nan(mixture):
    x = torch.randn(3, 12, generator=_gen(7), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence or finiteness warning for what was not measured
        res = measure_sharpness(_gmm_score(mixture), x, 200, k=3, method="trace", generator=_gen())
    assert res.method == "trace" and res.finite.all()
    for name in ("eigenvalues", "normalized", "spectrum_nodes", "spectrum_weights", "residual_bounds"):
        assert torch.isnan(getattr(res, name)).all(), name
    assert res.eigenvalues.shape == (3, 3) and not res.converged.any()
    assert torch.isnan(res.density(torch.linspace(-1, 0, 5))).all()
    torch.testing.assert_close(res.lid, res.flipd)
    torch.testing.assert_close(res.sharp_fraction, 1 - res.lid / 12)
    torch.testing.assert_close(res.memorization_score, res.sharp_fraction)
    torch.testing.assert_close(res.flipd, 12 + res.sigma**2 * res.trace)


@pytest.mark.parametrize("estimator, num_vectors", ESTIMATORS)
def test_chunking_conditions_and_image_shapes(estimator, num_vectors):
    # s(x, c) = c · x: J = c I, so tr(∂D/∂x) = d (1 + σ² c), exact for Hutchinson (zᵀz = d)
    def net(x, t, c):
        return c.to(x).reshape(-1, 1, 1, 1) * x

    score = DiffusionScore(net, SCHED, prediction="score")
    x = torch.randn(5, 2, 3, 3, generator=_gen(8), dtype=DT)
    cond = -torch.arange(1.0, 6.0, dtype=DT) * 10
    sigma2 = SCHED.sigma(torch.tensor(400)).to(DT) ** 2
    settings = dict(method="trace", num_vectors=num_vectors, trace_estimator=estimator)
    full = measure_sharpness(score, x, 400, cond=cond, generator=_gen(9), **settings)
    chunked = measure_sharpness(score, x, 400, cond=cond, generator=_gen(9), max_batch=7, **settings)
    exact = 18 * (1 + sigma2 * cond)
    if estimator == "hutchinson":
        torch.testing.assert_close(full.flipd, exact, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(full.trace, 18 * cond, rtol=1e-8, atol=1e-8)
    else:  # full rank: Hutch++ estimates
        assert ((full.flipd - exact).abs() < 4 * sigma2 * full.trace_stderr).all()
    torch.testing.assert_close(full.lid, full.flipd.clamp(0, 18))  # a contracting score: FLIPD < 0, the LID 0
    torch.testing.assert_close(full.sharp_fraction, 1 - full.lid / 18)
    torch.testing.assert_close(chunked.flipd, full.flipd)
    torch.testing.assert_close(chunked.trace_stderr, full.trace_stderr)
