"""Batched Lanczos, stochastic Lanczos quadrature and Hutchinson / Hutch++ traces.

Everything here acts on ``B`` independent operators ``A_1, …, A_B`` (each ``[D, D]``) through one
batched product: ``matvec: [B, D] -> [B, D]`` whose row ``b`` is ``A_b v_b`` (Lanczos; ``A_b``
symmetric), or ``matmat: [B, K, D] -> [B, K, D]`` whose entry ``[b, j]`` is ``A_b v_bj`` (the trace
estimators; ``A_b`` any square matrix). All rows run the same iterations at once; there is no
Python loop over ``B``.

``m`` Lanczos steps from a start vector ``v_b`` build an orthonormal basis ``Q_b`` ``[D, m]`` of the
Krylov space and the tridiagonal ``T_b = Q_bᵀ A_b Q_b`` ``[m, m]``. Its eigenvalues (Ritz values
``θ_bj``) approximate the extremes of ``A_b``'s spectrum first; the squared first components
``w_bj`` of its eigenvectors make ``Σ_j w_bj f(θ_bj)`` the Gauss quadrature of
``v_bᵀ f(A_b) v_b / ‖v_b‖²`` (stochastic Lanczos quadrature, SLQ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import einsum
from torch import Tensor

from memwatch.errors import MemwatchError

__all__ = [
    "Matvec",
    "LanczosResult",
    "rademacher",
    "lanczos",
    "extreme_eigenvalues",
    "fraction_below",
    "quadrature_density",
    "Matmat",
    "hutchinson_trace",
    "hutchpp_trace",
    "mean_and_stderr",
]

Matvec = Callable[[Tensor], Tensor]
"""Batched symmetric product ``[B, D] -> [B, D]``; row ``b`` of the output is ``A_b @ v_b``."""

Matmat = Callable[[Tensor], Tensor]
"""Batched product ``[B, K, D] -> [B, K, D]``; entry ``[b, j]`` of the output is ``A_b @ v_bj``."""

_WHICH = ("smallest", "largest")


def rademacher(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Independent ±1 entries with equal probability, of the given ``shape`` and ``dtype``.

    The bits are drawn on the generator's device (the CPU without one) and then moved to
    ``device``, so one seed gives the same vectors on every device.

    Example:
        >>> rademacher((2, 3), generator=torch.Generator().manual_seed(0)).abs().unique()
        tensor([1.])
    """
    source = generator.device if generator is not None else device
    bits = torch.randint(0, 2, shape, generator=generator, device=source)
    return (2 * bits - 1).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class LanczosResult:
    """The tridiagonal matrices ``T_b`` of a batched Lanczos run (all in the accumulation dtype).

    Attributes:
        alpha: ``[B, m]`` diagonal of ``T_b``.
        beta: ``[B, m-1]`` off-diagonal of ``T_b``; exactly 0 where a row broke down and restarted.
        krylov_dim: ``[B]`` int64, steps before the first breakdown (``m`` if none): the dimension
            of the Krylov space of the start vector that the run explored.
        residual: ``[B]`` norm ``β_m`` of the residual left after the last step; the Ritz pair
            ``(θ_bj, y_bj)`` satisfies ``‖A_b y_bj − θ_bj y_bj‖ = β_m |u_bj[m-1]|`` (see ``error_bounds``).
    """

    alpha: Tensor
    beta: Tensor
    krylov_dim: Tensor
    residual: Tensor

    def tridiagonal(self) -> Tensor:
        """Dense ``T`` ``[B, m, m]``."""
        return torch.diag_embed(self.alpha) + torch.diag_embed(self.beta, 1) + torch.diag_embed(self.beta, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``θ`` ``[B, m]`` in ascending order and SLQ weights ``w`` ``[B, m]``.

        ``w_bj = u_bj[0]²`` for the unit eigenvectors ``u_bj`` of ``T_b``; each row sums to 1. Blocks
        started after a breakdown carry no weight; where eigenvalues repeat, only the total
        weight of equal ``θ`` is defined (``eigh`` may spread it over the copies).
        """
        theta, vecs = torch.linalg.eigh(self.tridiagonal())
        return theta, vecs[:, 0, :] ** 2

    def error_bounds(self) -> Tensor:
        """``[B, m]`` residual norms ``β_m |u_bj[m-1]|`` of the Ritz pairs, in the order of ``ritz``.

        A Ritz value lies within this distance of an eigenvalue of ``A_b``; it is small when
        ``θ_bj`` has converged and ~0 for all ``j`` when ``m = D``.
        """
        vecs = torch.linalg.eigh(self.tridiagonal())[1]
        return self.residual[:, None] * vecs[:, -1, :].abs()


def lanczos(
    matvec: Matvec,
    v0: Tensor,
    num_iters: int,
    *,
    accum_dtype: torch.dtype = torch.float64,
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    breakdown_tol: float = 1e-10,
) -> LanczosResult:
    """Run ``m = min(num_iters, D)`` Lanczos steps on ``B`` symmetric operators at once.

    With ``q_1 = v0 / ‖v0‖`` (row-wise) and ``β_0 q_0 = 0``, step ``j`` computes

        w = A q_j − α_j q_j − β_{j-1} q_{j-1},   α_j = q_jᵀ A q_j,   β_j = ‖w‖,   q_{j+1} = w / β_j

    so that ``T = tridiag(β, α, β) = Qᵀ A Q``. With a Rademacher start vector ``z`` (``‖z‖² = D``),
    ``D · alpha[:, 0] = zᵀ A z`` is exactly one Hutchinson trace sample.

    Stopping rule: always ``m`` steps; convergence is not tested (see ``LanczosResult.error_bounds``).
    Breakdown: where ``β_j ≤ breakdown_tol · max_{i≤j} ‖A q_i‖`` the row's Krylov space is invariant;
    that row sets ``β_j = 0`` and continues from a fresh Gaussian vector (drawn from ``generator``)
    orthogonalized against its basis. ``T_b`` becomes block diagonal, so with ``m = D`` its
    eigenvalues are exactly ``A_b``'s spectrum, and the restarted blocks get SLQ weight 0. Other
    rows are unaffected. (With matvecs in float32 the noise floor, ~1e-7 ‖A‖, hides breakdowns
    from the default tolerance; with reorthogonalization the noise then acts as such a restart.)

    Args:
        matvec: batched product ``[B, D] -> [B, D]``, called ``m`` times with vectors in ``v0``'s
            dtype and device; its results are cast to ``accum_dtype``.
        v0: ``[B, D]`` start vectors with nonzero rows (need not be normalized).
        num_iters: requested number of steps ``≥ 1``.
        accum_dtype: dtype of the basis, ``α``, ``β`` and all inner products.
        reorthogonalize: orthogonalize each ``w`` against the whole basis (classical Gram-Schmidt,
            a second pass where the first cancelled much). The basis ``[B, m, D]`` is stored
            either way (restarts need it).
        generator: source of restart vectors.
        breakdown_tol: relative threshold on ``β_j`` for a breakdown.

    Returns:
        A ``LanczosResult`` with ``alpha`` ``[B, m]`` and ``beta`` ``[B, m-1]``.

    Raises:
        ValueError: if ``v0`` is not ``[B, D]`` or has a zero row, if ``num_iters < 1``, or if
            ``matvec`` returns a wrong shape.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 5.0)).expand(2, 4, 4)
        >>> res = lanczos(lambda v: einsum(A, v, "b i j, b j -> b i"), torch.ones(2, 4), 10)
        >>> res.alpha.shape, res.ritz()[0][0]
        (torch.Size([2, 4]), tensor([1.0000, 2.0000, 3.0000, 4.0000], dtype=torch.float64))
    """
    if v0.ndim != 2 or 0 in v0.shape:
        raise MemwatchError(f"`v0` must be a non-empty [B, D] tensor, got shape {tuple(v0.shape)}")
    if num_iters < 1:
        raise MemwatchError(f"`num_iters` must be >= 1, got {num_iters}")
    (batch, dim), m = v0.shape, min(num_iters, v0.shape[1])
    q = v0.to(accum_dtype)
    norm = q.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise MemwatchError("`v0` has a zero row; start vectors must be nonzero")
    q = q / norm
    basis = q.new_zeros(batch, m, dim)
    alpha, beta = q.new_zeros(batch, m), q.new_zeros(batch, m - 1)
    krylov_dim = torch.full((batch,), m, dtype=torch.int64, device=q.device)
    scale, q_prev, beta_prev = q.new_zeros(batch), torch.zeros_like(q), q.new_zeros(batch)
    for j in range(m):
        basis[:, j] = q
        w = _apply(matvec, q, v0)
        scale = torch.maximum(scale, w.norm(dim=-1))
        alpha[:, j] = (q * w).sum(-1)
        w = w - alpha[:, j, None] * q - beta_prev[:, None] * q_prev
        if reorthogonalize:
            w = _project_out(w, basis[:, : j + 1])
        beta_j = w.norm(dim=-1)
        if j == m - 1:
            break
        broke = beta_j <= breakdown_tol * scale
        if broke.any():
            krylov_dim = torch.where(broke & (krylov_dim == m), j + 1, krylov_dim)
            fresh = _project_out(_gaussian_like(q, generator), basis[:, : j + 1])
            w, beta_j = torch.where(broke[:, None], fresh, w), torch.where(broke, 0.0, beta_j)
        beta[:, j] = beta_j
        q_prev, q, beta_prev = q, w / w.norm(dim=-1, keepdim=True), beta_j
    return LanczosResult(alpha=alpha, beta=beta, krylov_dim=krylov_dim, residual=beta_j)


def extreme_eigenvalues(result: LanczosResult, k: int, which: str = "smallest") -> Tensor:
    """The ``k`` extreme Ritz values ``[B, k]``: ``"smallest"`` ascending, ``"largest"`` descending.

    Raises:
        ValueError: if ``which`` is not in ``("smallest", "largest")`` or not ``1 ≤ k ≤ m``.
    """
    if which not in _WHICH:
        raise MemwatchError(f"`which` must be one of {_WHICH}, got {which!r}")
    m = result.alpha.shape[-1]
    if not 1 <= k <= m:
        raise MemwatchError(f"`k` must be in [1, m={m}] (m = Lanczos steps), got {k}")
    theta = result.ritz()[0]
    return theta[:, :k] if which == "smallest" else theta[:, -k:].flip(-1)


def fraction_below(result: LanczosResult, threshold: float | Tensor) -> Tensor:
    """SLQ estimate ``[B]`` of the share of ``A_b``'s eigenvalues below ``threshold`` (scalar or ``[B]``).

        frac_b = Σ_j w_bj [θ_bj < thr_b]  ≈  v_bᵀ 1(A_b < thr_b) v_b / ‖v_b‖²

    Unbiased over Rademacher or Gaussian ``v_b`` (up to quadrature error). For ``n`` random vectors
    per operator, stack them in the batch and average:

        >>> A = torch.diag(torch.arange(4.0))[None]                       # one operator, D = 4
        >>> As = A.repeat(16, 1, 1)                                       # rows ordered (n b), n = 16
        >>> z = rademacher((16, 4), generator=torch.Generator().manual_seed(0))
        >>> res = lanczos(lambda v: einsum(As, v, "b i j, b j -> b i"), z, 4)
        >>> from einops import reduce
        >>> reduce(fraction_below(res, 1.5), "(n b) -> b", "mean", n=16)
        tensor([0.5000], dtype=torch.float64)
    """
    theta, weights = result.ritz()
    thr = torch.as_tensor(threshold, dtype=theta.dtype, device=theta.device).reshape(-1, 1)
    return (weights * (theta < thr)).sum(-1)


def quadrature_density(theta: Tensor, weights: Tensor, grid: Tensor, bandwidth: float | Tensor) -> Tensor:
    """``Σ_j w_bj N(x; θ_bj, h_b²)`` ``[B, G]`` for any nodes ``θ`` and weights ``w`` ``[B, M]`` (e.g.
    exact eigenvalues with weights ``1/D``, or pooled Ritz values of several SLQ runs)."""
    h = torch.as_tensor(bandwidth, dtype=theta.dtype, device=theta.device).reshape(-1, 1, 1)
    z = (grid.to(theta)[None, :, None] - theta[:, None, :]) / h
    kernel = torch.exp(-0.5 * z**2) / (h * math.sqrt(2 * math.pi))
    return einsum(kernel, weights, "b g m, b m -> b g")


def hutchinson_trace(
    matmat: Matmat,
    batch: int,
    dim: int,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    accum_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of ``tr A_b`` and its standard error, both ``[B]`` in ``accum_dtype``.

        tr A_b ≈ (1/K) Σ_j z_bjᵀ A_b z_bj,   z_bj ∈ {±1}^D Rademacher,   s.e. = std_j / √K

    Unbiased for any square ``A_b`` (only its symmetric part enters ``zᵀ A z``); the variance of one
    sample is ``2 (‖S‖_F² − Σ_i S_ii²)`` with ``S = (A + Aᵀ)/2``, so ``zᵀ (c I) z = c D`` is exact.

    Cost: one call of ``matmat`` on ``[B, K, D]``, ``K = num_samples`` (``B · K`` products).

    Args:
        matmat: batched product ``[B, K, D] -> [B, K, D]`` (see ``Matmat``), called with vectors
            in ``dtype`` on ``device``; its result is cast to ``accum_dtype``.
        batch, dim: ``B`` and ``D``.
        num_samples: ``K >= 2`` probe vectors per operator (the standard error needs two).
        generator: source of the probe vectors.
        dtype, device: of the vectors passed to ``matmat``.
        accum_dtype: dtype of the inner products and the results.

    Raises:
        MemwatchError: ``num_samples < 2``, or ``matmat`` returns a wrong shape.

    Example:
        >>> A = torch.diag(torch.arange(4.0))[None]                        # tr A = 6
        >>> mm = lambda v: einsum(A, v, "b i j, b k j -> b k i")
        >>> hutchinson_trace(mm, 1, 4, 8, generator=torch.Generator().manual_seed(0))[0]
        tensor([6.], dtype=torch.float64)
    """
    if num_samples < 2:
        raise MemwatchError(f"`num_samples` must be >= 2, got {num_samples}")
    z = rademacher((batch, num_samples, dim), generator=generator, dtype=dtype, device=device)
    z_acc = z.to(accum_dtype)
    return mean_and_stderr((z_acc * _apply(matmat, z_acc, z)).sum(-1))


def hutchpp_trace(
    matmat: Matmat,
    batch: int,
    dim: int,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    accum_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Hutch++ estimate (Meyer, Musco, Musco & Woodruff 2021) of ``tr A_b`` and a standard error ``[B]``.

    With ``K = num_samples``, ``s = K // 3`` sketch vectors and ``g = K − 2s`` residual vectors:

        S ∈ {±1}^{D×s},  Q = orth(A S)  [D, s],  G ∈ {±1}^{D×g},  G⊥ = (I − Q Qᵀ) G
        tr A ≈ tr(Qᵀ A Q) + (1/g) Σ_j g⊥_jᵀ A g⊥_j,     s.e. = std_j(g⊥_jᵀ A g⊥_j) / √g

    Unbiased for any square ``A_b`` and any orthonormal ``Q`` (``tr A = tr(Qᵀ A Q) + tr(P⊥ A P⊥)``
    with ``P⊥ = I − Q Qᵀ``; the cross terms have zero trace). Exact when ``rank A_b <= s`` (then
    ``range(A S) = range(A)``, ``P⊥ A = 0``): for rank ``r``, ``K >= 3r`` products suffice. Its
    error shrinks like ``1/K`` against Hutchinson's ``1/√K`` once ``s`` exceeds the numerical rank;
    with far fewer sketch vectors than large eigenvalues it spends two thirds of the products on
    a sketch that captures little, and Hutchinson on all ``K`` is more accurate. The standard
    error is that of the residual term given ``Q`` (the sketch part has no variance then); it is
    NaN for ``g = 1`` (``K = 3``).

    Cost: two sequential calls of ``matmat``, on ``[B, s, D]`` (``A S``) and ``[B, s + g, D]``
    (``A Q`` and ``A G⊥`` together): ``K`` products per operator.

    Args:
        matmat, batch, dim, generator, dtype, device, accum_dtype: as in :func:`hutchinson_trace`.
        num_samples: ``K >= 3`` products per operator.

    Raises:
        MemwatchError: ``num_samples < 3``, or ``matmat`` returns a wrong shape.

    Example:
        >>> u = torch.randn(1, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> A = einsum(u, u, "b i, b j -> b i j")                           # rank 1: exact with K = 3
        >>> mm = lambda v: einsum(A, v, "b i j, b k j -> b k i")
        >>> est, _ = hutchpp_trace(mm, 1, 6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        >>> torch.allclose(est, (u**2).sum(-1))
        True
    """
    if num_samples < 3:
        raise MemwatchError(
            f"`num_samples` must be >= 3 (a third each for sketch, projection and residual), got {num_samples}"
        )
    s = num_samples // 3
    g = num_samples - 2 * s
    sketch = rademacher((batch, s, dim), generator=generator, dtype=dtype, device=device)
    a_sketch = _apply(matmat, sketch.to(accum_dtype), sketch)
    q = torch.linalg.qr(a_sketch.mT)[0].mT  # [B, s, D], orthonormal rows (Householder: even if A S is rank-deficient)
    resid = rademacher((batch, g, dim), generator=generator, dtype=accum_dtype, device=device)
    resid = resid - (resid @ q.mT) @ q
    vectors = torch.cat([q, resid], dim=1)
    products = _apply(matmat, vectors, sketch)
    exact = (q * products[:, :s]).sum((1, 2))
    samples = (resid * products[:, s:]).sum(-1)
    mean, stderr = mean_and_stderr(samples)
    return exact + mean, stderr


def mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error ``std / √K`` (unbiased std) of ``samples`` ``[B, K]`` along ``K``; both ``[B]``.

    The standard error is NaN for ``K = 1``.

    Example:
        >>> mean_and_stderr(torch.tensor([[1.0, 3.0]]))
        (tensor([2.]), tensor([1.]))
    """
    num = samples.shape[-1]
    if num < 2:
        return samples.mean(-1), torch.full_like(samples[..., 0], float("nan"))
    return samples.mean(-1), samples.std(-1) / math.sqrt(num)


def _apply(matvec: Matvec | Matmat, v: Tensor, like: Tensor) -> Tensor:
    """``matvec(v)`` with ``v`` in ``like``'s dtype/device, the result in ``v``'s dtype; checks the shape."""
    out = matvec(v.to(like))
    if out.shape != v.shape:
        name = "matvec" if v.ndim == 2 else "matmat"
        raise MemwatchError(f"`{name}` must map {tuple(v.shape)} to the same shape, got {tuple(out.shape)}")
    return out.to(v)


def _project_out(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` ``[B, D]`` its components along the orthonormal rows of ``basis`` ``[B, k, D]``.

    Classical Gram-Schmidt, repeated once where a row lost more than ``1 - 1/√2`` of its norm
    (the DGKS criterion: "twice is enough").
    """
    row, norm = w[:, None, :], w.norm(dim=-1)
    for _ in range(2):
        row = row - (row @ basis.mT) @ basis  # w ← w − (w Qᵀ) Q, as rows: BLAS's fast layout on CPU
        if (row.norm(dim=(1, 2)) >= norm / math.sqrt(2)).all():
            break
    return row[:, 0]


def _gaussian_like(q: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal ``[B, D]`` like ``q``, drawn on the generator's device."""
    device = generator.device if generator is not None else q.device
    return torch.randn(q.shape, generator=generator, dtype=q.dtype, device=device).to(q.device)
