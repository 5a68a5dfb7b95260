"""Tests for memwatch.lanczos, in float64 against dense ``torch.linalg.eigvalsh`` references."""

from __future__ import annotations

import pytest
import torch
from einops import einsum, reduce, repeat
from torch import Tensor

from memwatch.lanczos import (
    extreme_eigenvalues,
    fraction_below,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    mean_and_stderr,
    quadrature_density,
    rademacher,
)

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These loops of small products run ~5x faster on one thread than on shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matvec(A: Tensor):
    return lambda v: einsum(A, v, "b i j, b j -> b i")


def _matmat(A: Tensor):
    return lambda v: einsum(A, v, "b i j, b k j -> b k i")


def _random_symmetric(batch: int, d: int, seed: int) -> Tensor:
    X = torch.randn(batch, d, d, generator=_gen(seed), dtype=DT)
    return (X + X.transpose(1, 2)) / (2 * d**0.5)


def _with_spectrum(eigvals: Tensor, seed: int) -> Tensor:
    """``U diag(λ) Uᵀ`` ``[B, D, D]`` with Haar-ish random orthogonal ``U`` for ``eigvals`` ``[B, D]``."""
    U = torch.linalg.qr(torch.randn(*eigvals.shape, eigvals.shape[-1], generator=_gen(seed), dtype=DT))[0]
    return einsum(U, eigvals, U, "b i k, b k, b j k -> b i j")


# ---------------------------------------------------------------------------------------- rademacher
def test_rademacher_is_pm_one_and_repeatable():
    z = rademacher((4, 1000), generator=_gen(0), dtype=DT)
    assert z.dtype == DT and set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.05
    assert torch.equal(z, rademacher((4, 1000), generator=_gen(0), dtype=DT))


# ---------------------------------------------------------------------------------------- lanczos
@pytest.mark.parametrize("d", [64, 256, 512])
def test_full_lanczos_recovers_spectrum(d):
    A = _random_symmetric(8, d, seed=d)
    exact = torch.linalg.eigvalsh(A)
    res = lanczos(_matvec(A), torch.randn(8, d, generator=_gen(1), dtype=DT), d, generator=_gen(2))
    assert res.alpha.shape == (8, d) and res.beta.shape == (8, d - 1)
    scale = exact.abs().amax(-1, keepdim=True)
    small, large = extreme_eigenvalues(res, 8, "smallest"), extreme_eigenvalues(res, 8, "largest")
    torch.testing.assert_close(small, exact[:, :8], rtol=1e-6, atol=0)
    torch.testing.assert_close(large, exact[:, -8:].flip(-1), rtol=1e-6, atol=0)
    assert ((res.ritz()[0] - exact).abs() <= 1e-8 * scale).all()
    assert (res.error_bounds() <= 1e-8 * scale).all()


def test_ritz_weights_and_tridiagonal():
    A = _random_symmetric(3, 32, seed=0)
    v0 = torch.randn(3, 32, generator=_gen(1), dtype=DT)
    res = lanczos(_matvec(A), v0, 10)
    T = res.tridiagonal()
    assert torch.equal(T, T.transpose(1, 2)) and torch.equal(torch.diagonal(T, dim1=1, dim2=2), res.alpha)
    theta, weights = res.ritz()
    assert (theta.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, dtype=DT))
    # Gauss quadrature is exact for polynomials of degree < 2m: the moments v̂ᵀ Aᵏ v̂.
    v = v0 / v0.norm(dim=-1, keepdim=True)
    for k in range(1, 5):
        Akv = torch.linalg.matrix_power(A, k) @ v[..., None]
        torch.testing.assert_close((weights * theta**k).sum(-1), (v[..., None, :] @ Akv).flatten())


def test_matvec_sees_v0_dtype_and_first_alpha_is_a_hutchinson_sample():
    A = _random_symmetric(4, 16, seed=3)
    seen = []

    def matvec(v):
        seen.append(v.dtype)
        return _matvec(A.float())(v)

    z = rademacher((4, 16), generator=_gen(0))
    res = lanczos(matvec, z, 5)
    assert set(seen) == {torch.float32} and res.alpha.dtype == DT
    zAz = einsum(z.double(), A, z.double(), "b i, b i j, b j -> b")
    torch.testing.assert_close(16 * res.alpha[:, 0], zAz, rtol=1e-5, atol=1e-5)


def test_breakdown_restarts_give_exact_spectrum_and_leave_other_rows_alone():
    d = 64
    three_values = torch.tensor([-2.0, 0.5, 3.0], dtype=DT).repeat_interleave(torch.tensor([10, 30, 24]))
    generic = torch.linspace(-1, 1, d, dtype=DT) ** 3
    A = _with_spectrum(torch.stack([three_values, generic, three_values]), seed=0)
    u, w = torch.randn(2, d, generator=_gen(1), dtype=DT)
    rank2 = (torch.outer(u, u) - 0.5 * torch.outer(w, w))[None]
    A = torch.cat([A, rank2])  # rows 0, 2: 3 distinct values; row 1: generic; row 3: rank 2
    v0 = torch.randn(4, d, generator=_gen(2), dtype=DT)

    res = lanczos(_matvec(A), v0, 100, generator=_gen(3))
    exact = torch.linalg.eigvalsh(A)
    theta, weights = res.ritz()
    assert not theta.isnan().any() and not weights.isnan().any()
    assert ((theta - exact).abs() <= 1e-8 * exact.abs().amax(-1, keepdim=True)).all()
    assert res.krylov_dim.tolist() == [3, d, 3, 3]
    # restarted blocks carry no weight: SLQ reproduces v̂ᵀ 1(A < thr) v̂ exactly
    v = v0 / v0.norm(dim=-1, keepdim=True)
    evals, evecs = torch.linalg.eigh(A)
    for thr in (-1.0, 1.0):
        coef = einsum(evecs, v, "b i k, b i -> b k") ** 2
        torch.testing.assert_close(fraction_below(res, thr)[[0, 2, 3]], (coef * (evals < thr)).sum(-1)[[0, 2, 3]])
    # the generic row runs exactly as it would alone
    alone = lanczos(_matvec(A[1:2]), v0[1:2], 100, generator=_gen(3))
    torch.testing.assert_close(res.alpha[1:2], alone.alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.beta[1:2], alone.beta, rtol=1e-12, atol=1e-12)


def test_identity_breaks_down_at_once():
    res = lanczos(_matvec(3 * torch.eye(8, dtype=DT)[None]), torch.ones(1, 8, dtype=DT), 8, generator=_gen(0))
    assert res.krylov_dim.item() == 1 and (res.beta == 0).all()
    torch.testing.assert_close(res.ritz()[0], torch.full((1, 8), 3.0, dtype=DT))
    assert res.ritz()[1].sum().item() == pytest.approx(1.0)


def test_spectral_gap_converges_in_few_steps():
    d, batch = 512, 8
    outliers = -torch.arange(10.0, 2.0, -1.0, dtype=DT)  # -10, …, -3
    bulk = torch.rand(batch, d - 8, generator=_gen(0), dtype=DT)
    eigvals = torch.cat([outliers.expand(batch, 8), bulk], dim=-1)
    A = _with_spectrum(eigvals, seed=1)
    res = lanczos(_matvec(A), torch.randn(batch, d, generator=_gen(2), dtype=DT), 40)
    torch.testing.assert_close(extreme_eigenvalues(res, 8), outliers.expand(batch, 8), rtol=1e-3, atol=0)


@pytest.mark.parametrize("num_iters", [6, 15, 30])
def test_error_bounds_bound_the_distance_to_the_spectrum(num_iters):
    # a partial run: every Ritz value lies within its residual bound of some eigenvalue of A
    A = _random_symmetric(3, 96, seed=4)
    res = lanczos(_matvec(A), torch.randn(3, 96, generator=_gen(5), dtype=DT), num_iters)
    theta, bounds = res.ritz()[0], res.error_bounds()
    distance = (theta[:, :, None] - torch.linalg.eigvalsh(A)[:, None, :]).abs().amin(-1)
    assert (distance <= bounds * (1 + 1e-8) + 1e-12).all()
    assert (bounds > 1e-3).any()  # partial: some values have not converged


# ---------------------------------------------------------------------------------------- SLQ
def test_slq_fraction_below_and_density():
    d, n_ops, n_vec = 256, 2, 16
    A = _random_symmetric(n_ops, d, seed=7)
    exact = torch.linalg.eigvalsh(A)
    As = repeat(A, "b i j -> (n b) i j", n=n_vec)
    z = rademacher((n_vec * n_ops, d), generator=_gen(0), dtype=DT)
    res = lanczos(_matvec(As), z, 60, generator=_gen(1))
    for thr in (-0.5, 0.0, 0.3, 0.8):
        est = reduce(fraction_below(res, thr), "(n b) -> b", "mean", n=n_vec)
        assert ((est - (exact < thr).double().mean(-1)).abs() < 0.05).all(), thr
    per_row = torch.tensor([0.0, 0.3], dtype=DT).repeat(n_vec)  # a [B] threshold
    est = reduce(fraction_below(res, per_row), "(n b) -> b", "mean", n=n_vec)
    assert ((est - (exact < torch.tensor([[0.0], [0.3]], dtype=DT)).double().mean(-1)).abs() < 0.05).all()

    grid = torch.linspace(-2, 2, 801, dtype=DT)
    density = quadrature_density(*res.ritz(), grid, 0.05)  # the SLQ density: Ritz values, weights
    assert density.shape == (n_vec * n_ops, 801) and (density >= 0).all()
    torch.testing.assert_close(torch.trapezoid(density, grid), torch.ones(n_vec * n_ops, dtype=DT), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- traces
@pytest.mark.parametrize("estimator, num_samples", [(hutchinson_trace, 8), (hutchpp_trace, 9)])
def test_trace_estimators_are_unbiased_with_calibrated_error(estimator, num_samples):
    # a full-rank, non-symmetric A (the trace tier feeds Jᵀ products), a fresh seed per run
    A = _random_symmetric(4, 32, seed=11) + 0.3 * torch.eye(32, dtype=DT)
    A = A + 0.2 * torch.randn(4, 32, 32, generator=_gen(12), dtype=DT) / 32**0.5
    trace = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    runs = [estimator(_matmat(A), 4, 32, num_samples, generator=_gen(s), dtype=DT) for s in range(200)]
    estimates, errors = (torch.stack(v) for v in zip(*runs))
    sem = estimates.std(0) / 200**0.5
    assert ((estimates.mean(0) - trace).abs() < 3 * sem).all()
    ratio = errors.pow(2).mean(0).sqrt() / estimates.std(0)  # reported s.e. vs spread over seeds
    assert ((ratio > 0.8) & (ratio < 1.25)).all()


@pytest.mark.parametrize("rank, num_samples", [(1, 3), (2, 6), (3, 11), (5, 16)])
def test_hutchpp_is_exact_for_low_rank(rank, num_samples):
    # rows: symmetric rank r, non-symmetric rank r, rank r shifted to rank < r by a zero factor
    d = 40
    U, V = torch.randn(2, 3, d, rank, generator=_gen(rank), dtype=DT)
    V[0] = U[0]
    U[2, :, 0] = 0.0
    A = einsum(U, V, "b i r, b j r -> b i j")
    est, err = hutchpp_trace(_matmat(A), 3, d, num_samples, generator=_gen(0), dtype=DT)
    torch.testing.assert_close(est, torch.diagonal(A, dim1=1, dim2=2).sum(-1), rtol=0, atol=1e-8)
    if num_samples - 2 * (num_samples // 3) >= 2:
        assert (err.abs() < 1e-8).all()
    else:
        assert err.isnan().all()  # one residual vector: no standard error


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    # eigenvalues 0.5^i: a sketch of s = 10 vectors captures almost everything
    d, batch = 64, 4
    A = _with_spectrum(0.5 ** torch.arange(d, dtype=DT).expand(batch, d), seed=3)
    trace = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    errs = {}
    for est in (hutchinson_trace, hutchpp_trace):
        runs = torch.stack([est(_matmat(A), batch, d, 30, generator=_gen(s), dtype=DT)[0] for s in range(20)])
        errs[est] = (runs - trace).pow(2).mean().sqrt()
    assert errs[hutchpp_trace] < 1e-2 * errs[hutchinson_trace]


def test_trace_estimators_repeat_with_the_generator_and_pass_the_dtype():
    A = _random_symmetric(2, 16, seed=5)
    seen = []

    def mm(v):
        seen.append((v.dtype, tuple(v.shape)))
        return _matmat(A.float())(v)

    for est, k in ((hutchinson_trace, 4), (hutchpp_trace, 7)):
        first, second = (est(mm, 2, 16, k, generator=_gen(1))[0] for _ in range(2))
        assert torch.equal(first, second) and first.dtype == DT
    assert seen == [(torch.float32, (2, 4, 16))] * 2 + [(torch.float32, (2, 2, 16)), (torch.float32, (2, 5, 16))] * 2


def test_mean_and_stderr():
    mean, err = mean_and_stderr(torch.tensor([[1.0, 2.0, 6.0], [4.0, 4.0, 4.0]], dtype=DT))
    torch.testing.assert_close(mean, torch.tensor([3.0, 4.0], dtype=DT))
    torch.testing.assert_close(err, torch.tensor([(7.0 / 3) ** 0.5, 0.0], dtype=DT))
    assert mean_and_stderr(torch.ones(2, 1))[1].isnan().all()


# ---------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    A = _random_symmetric(2, 8, seed=0)
    res = lanczos(_matvec(A), torch.randn(2, 8, generator=_gen(0), dtype=DT), 5)
    with pytest.raises(ValueError, match="which"):
        extreme_eigenvalues(res, 2, "middle")
    with pytest.raises(ValueError, match="`k`"):
        extreme_eigenvalues(res, 6)
    with pytest.raises(ValueError, match="`k`"):
        extreme_eigenvalues(res, 0)
    for bad in (torch.randn(8, dtype=DT), torch.randn(2, 8, 1, dtype=DT)):
        with pytest.raises(ValueError, match="v0"):
            lanczos(_matvec(A), bad, 5)
    with pytest.raises(ValueError, match="v0"):
        lanczos(_matvec(A), torch.zeros(2, 8, dtype=DT), 5)
    with pytest.raises(ValueError, match="num_iters"):
        lanczos(_matvec(A), torch.ones(2, 8, dtype=DT), 0)
    with pytest.raises(ValueError, match="matvec"):
        lanczos(lambda v: v[:, :4], torch.ones(2, 8, dtype=DT), 5)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(_matmat(A), 2, 8, 1)
    with pytest.raises(ValueError, match="num_samples"):
        hutchpp_trace(_matmat(A), 2, 8, 2)
    with pytest.raises(ValueError, match="matmat"):
        hutchinson_trace(lambda v: v[:, :1], 2, 8, 4)
