"""Sharpness of the learned density at a point: the spectrum of the Hessian of log p_t.

``H(x, t) = ½ (J + Jᵀ)`` with ``J = ∂s/∂x`` the Jacobian of the learned score (see
:mod:`memwatch.operators`). Near a memorized training point ``x₀`` the model's ``p_t`` is locally
``N(α_t x₀, σ_t² I)``, so every eigenvalue is ``≈ -1/σ_t²``; on a ``k``-dimensional data manifold
only ``d - k`` are, and ``k`` sit near 0 (Jeon et al. 2025). With ``σ_t²``-normalized eigenvalues
``μ = σ_t² λ`` the per-sample summaries are

* ``sharp_fraction`` = share of the ``d`` eigenvalues with ``μ < -τ`` (``τ`` = ``threshold``),
* ``lid`` = ``d · (1 - sharp_fraction)``, the local intrinsic dimension the spectrum implies,
* ``trace`` = ``tr H`` and ``flipd`` = ``d + σ_t² tr H`` (FLIPD, Kamkari et al. 2024),
* ``score`` = ``sharp_fraction``: the memorization score, in [0, 1], higher = more memorized
  (1: an isolated peak, every direction sharp).

Two methods give the spectrum:

* ``"dense"``: the full ``[n, d, d]`` Jacobian (``d`` vjp products, vectorized) and
  ``eigvalsh`` — exact; fast while ``d`` is small.
* ``"lanczos"``: ``num_vectors`` Lanczos runs of ``num_iters`` steps per sample from Rademacher
  start vectors, all samples and vectors batched. Stochastic Lanczos quadrature over those runs
  gives ``sharp_fraction``; the first step of each run is a Hutchinson sample of ``tr H``; the
  first run's Ritz values give the ``k`` most negative eigenvalues.

``method="auto"`` takes ``"dense"`` for ``d <= DENSE_MAX_DIM`` (crossover measured in
``benchmarks/bench_lanczos.py``) and ``"lanczos"`` above.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from einops import rearrange, reduce, repeat
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.lanczos import (
    LanczosResult,
    extreme_eigenvalues,
    fraction_below,
    lanczos,
    quadrature_density,
    rademacher,
)
from memwatch.operators import JVP_MODES, ScoreJacobian, map_chunks
from memwatch.score import DiffusionScore, broadcast_condition

__all__ = ["SharpnessOptions", "SharpnessResult", "measure_sharpness", "DENSE_MAX_DIM", "METHODS"]

METHODS = ("auto", "dense", "lanczos")
DENSE_MAX_DIM = 384  # measured crossover d ≈ 355–378 (two runs); at a tie the exact method wins


@dataclass(frozen=True)
class SharpnessOptions:
    """How :func:`measure_sharpness` measures: one frozen settings object shared by
    :func:`measure_sharpness`, :func:`memwatch.conditional_metrics` and the monitor.

    Attributes:
        k: number of most negative eigenvalues reported (``1 <= k <= d``; checked against ``d``
            by :meth:`check_dim`).
        threshold: ``τ > 0``; a direction is sharp when ``σ_t² λ < -τ``.
        method: one of ``METHODS``.
        num_iters: Lanczos steps per run, ``>= k`` (capped at ``d``); unused by ``"dense"``.
        num_vectors: SLQ start vectors per sample, ``>= 1``; unused by ``"dense"``.
        max_batch: at most this many rows go through the model at once; ``None`` = all.
        jvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see :class:`memwatch.operators.ScoreJacobian`).

    Raises:
        MemwatchError: a value out of range (the message names it, the range and the value).

    Example:
        >>> SharpnessOptions(k=4, method="dense").num_vectors
        4
        >>> SharpnessOptions().replace(max_batch=64).max_batch
        64
    """

    k: int = 8
    threshold: float = 0.5
    method: str = "auto"
    num_iters: int = 32
    num_vectors: int = 4
    max_batch: int | None = None
    jvp_mode: str = "auto"

    def __post_init__(self) -> None:
        for name, low in (("k", 1), ("num_iters", 1), ("num_vectors", 1)):
            _check_int(name, getattr(self, name), low)
        if self.max_batch is not None:
            _check_int("max_batch", self.max_batch, 1)
        if self.method not in METHODS:
            raise MemwatchError(f"`method` must be one of {METHODS}, got {self.method!r}")
        if self.jvp_mode not in JVP_MODES:
            raise MemwatchError(f"`jvp_mode` must be one of {JVP_MODES}, got {self.jvp_mode!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise MemwatchError(f"`threshold` must be a number in (0, 1], got {self.threshold!r}")
        if not 0 < self.threshold <= 1:
            raise MemwatchError(
                "`threshold` must be in (0, 1] (a direction is sharp when σ_t²λ < -threshold, and σ_t²λ ≈ -1 "
                f"at a copy), got {self.threshold!r}"
            )
        if self.method == "lanczos" and self.num_iters < self.k:
            raise MemwatchError(f"`num_iters` must be >= k={self.k} for method='lanczos', got {self.num_iters}")

    def replace(self, **changes: object) -> SharpnessOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolved_method(self, dim: int) -> str:
        """``method`` with ``"auto"`` resolved for dimension ``dim``."""
        if self.method != "auto":
            return self.method
        return "dense" if dim <= DENSE_MAX_DIM else "lanczos"

    def check_dim(self, dim: int) -> None:
        """Check the options against the sample dimension ``d`` (``k <= d``; Lanczos needs
        ``num_iters >= k`` once ``num_iters`` is capped at ``d``).

        Raises:
            MemwatchError: ``k > d``, or ``min(num_iters, d) < k`` on the Lanczos path.
        """
        if self.k > dim:
            raise MemwatchError(f"`k` must be an integer in [1, d={dim}], got {self.k!r}")
        if self.resolved_method(dim) == "lanczos" and min(self.num_iters, dim) < self.k:
            raise MemwatchError(f"`num_iters` must be >= k={self.k}, got {self.num_iters}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MemwatchError(f"`{name}` must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SharpnessResult:
    """Per-sample sharpness of the learned density (all float64, on the CPU).

    Attributes:
        eigenvalues: ``[n, k]`` most negative eigenvalues of ``H``, ascending.
        normalized: ``[n, k]`` ``σ_t² · eigenvalues`` (≈ -1 in sharp directions).
        sharp_fraction: ``[n]`` share of eigenvalues with ``σ_t² λ < -threshold``.
        lid: ``[n]`` ``dim · (1 - sharp_fraction)``.
        trace: ``[n]`` ``tr H`` (exact for dense, Hutchinson for Lanczos).
        flipd: ``[n]`` ``dim + σ_t² tr H``.
        score: ``[n]`` memorization score = ``sharp_fraction``.
        sigma: ``[n]`` ``σ_t`` of each sample's timestep.
        spectrum_nodes: ``[n, M]`` normalized eigenvalues (dense) or Ritz values (SLQ nodes).
        spectrum_weights: ``[n, M]`` their quadrature weights (each row sums to 1).
        finite: ``[n]`` bool, False where the model's output or the products were not finite
            (those rows hold NaN).
        dim: ``d``; threshold: ``τ``; method: ``"dense"`` or ``"lanczos"``.
    """

    eigenvalues: Tensor
    normalized: Tensor
    sharp_fraction: Tensor
    lid: Tensor
    trace: Tensor
    flipd: Tensor
    score: Tensor
    sigma: Tensor
    spectrum_nodes: Tensor
    spectrum_weights: Tensor
    finite: Tensor
    dim: int
    threshold: float
    method: str

    def density(self, grid: Tensor, bandwidth: float = 0.05) -> Tensor:
        """Gaussian-smoothed density of normalized eigenvalues ``[n, G]`` on ``grid`` ``[G]``."""
        return torch.nan_to_num(quadrature_density(self.spectrum_nodes, self.spectrum_weights, grid, bandwidth))


def measure_sharpness(
    score: DiffusionScore,
    x: Tensor,
    t: Tensor | int | float,
    options: SharpnessOptions | None = None,
    *,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    **settings: object,
) -> SharpnessResult:
    """Measure the Hessian spectrum of ``log p_t`` at ``x``, for all samples at once.

    Args:
        score: the model's score; ``cond`` (if given) selects the conditional/guided score.
        x: ``[n, *shape]`` points (e.g. probe states along the sampling trajectory).
        t: timestep (schedule units), scalar or ``[n]``.
        options: how to measure (:class:`SharpnessOptions`; default ``SharpnessOptions()``).
        cond: condition ``[n, ...]`` or one condition for all samples.
        generator: source of the Rademacher start vectors (explicit for repeatable runs).
        settings: fields of :class:`SharpnessOptions` that override ``options``, e.g. ``k=4``.
            ``max_batch`` bounds the rows through the model at once (samples × start vectors
            for Lanczos, samples × basis vectors for dense), halved on out-of-memory.

    Returns:
        :class:`SharpnessResult`; samples whose model output is not finite get NaN and a
        ``RuntimeWarning`` — never a silent number.

    Raises:
        MemwatchError: invalid arguments (named in the message).

    Example:
        >>> from memwatch.schedules import NoiseSchedule
        >>> score = DiffusionScore(lambda x, t: x, NoiseSchedule.linear(100))
        >>> measure_sharpness(score, torch.randn(3, 4), 50, k=2).eigenvalues.shape
        torch.Size([3, 2])
    """
    options = options or SharpnessOptions()
    if settings:
        options = options.replace(**settings)
    k, threshold, num_iters, num_vectors = options.k, options.threshold, options.num_iters, options.num_vectors
    max_batch, jvp_mode = options.max_batch, options.jvp_mode
    n, dim = _check_inputs(x)
    options.check_dim(dim)
    method = options.resolved_method(dim)
    tt = score.timesteps(t, n, x.device)
    sigma = score.sigma(tt).cpu()
    cond_b = None if cond is None else broadcast_condition(cond, n, "cond")

    if method == "dense":
        nodes, weights, eig_k, trace, finite = _dense(score, x, tt, cond_b, k, max_batch, jvp_mode)
        sharp = ((nodes * sigma[:, None] ** 2) < -threshold).double().mean(1)
    else:
        result, eig_k, trace, finite = _lanczos(
            score, x, tt, cond_b, k, min(num_iters, dim), num_vectors, max_batch, jvp_mode, generator
        )
        per_run_thr = repeat(-threshold / sigma**2, "n -> (n m)", m=num_vectors)
        sharp = reduce(fraction_below(result, per_run_thr), "(n m) -> n", "mean", m=num_vectors)
        nodes, weights = result.ritz()
        nodes = rearrange(nodes, "(n m) j -> n (m j)", m=num_vectors)
        weights = rearrange(weights, "(n m) j -> n (m j)", m=num_vectors) / num_vectors

    s2 = sigma**2
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    keep = finite[:, None]
    sharp = torch.where(finite, sharp, nan)
    trace = torch.where(finite, trace, nan)
    eig_k = torch.where(keep, eig_k, nan)
    return SharpnessResult(
        eigenvalues=eig_k,
        normalized=eig_k * s2[:, None],
        sharp_fraction=sharp,
        lid=dim * (1 - sharp),
        trace=trace,
        flipd=dim + s2 * trace,
        score=sharp,
        sigma=sigma,
        spectrum_nodes=torch.where(keep, nodes * s2[:, None], nan),
        spectrum_weights=weights,
        finite=finite,
        dim=dim,
        threshold=float(threshold),
        method=method,
    )


# ---------------------------------------------------------------------- methods
def _dense(score, x, tt, cond, k, max_batch, jvp_mode):
    """All eigenvalues ``[n, d]`` with weights ``1/d``, the ``k`` smallest, the trace, finiteness."""
    mode = "reverse" if jvp_mode == "auto" else jvp_mode  # dense products are vjps only
    n, dim = x.shape[0], x[0].numel()
    # rows through the model at once = samples per chunk × basis vectors per vmap chunk <= max_batch
    samples = n if max_batch is None else max(1, min(n, max_batch // dim))
    basis_chunk = None if max_batch is None else max(1, min(dim, max_batch // samples))

    def chunk(sl: slice) -> tuple[Tensor, Tensor]:
        op = _operator(score, x[sl], tt[sl], None if cond is None else cond[sl], mode)
        ok = _finite_rows(op.output).cpu()
        hess = op.dense(symmetric=True, chunk_size=basis_chunk).to(torch.float64).cpu()
        hess[~ok] = 0.0
        eig = torch.linalg.eigvalsh(hess)
        return eig, ok & torch.isfinite(eig).all(1)

    eigs, finite = map_chunks(chunk, n, samples)
    weights = torch.full_like(eigs, 1.0 / eigs.shape[1])
    return eigs, weights, eigs[:, :k], eigs.sum(1), finite


def _lanczos(score, x, tt, cond, k, num_iters, num_vectors, max_batch, jvp_mode, generator):
    """One batched Lanczos run per (sample, start vector), rows ``(n m)``; Ritz values of run 0,
    Hutchinson trace from the runs' first steps, finiteness per sample."""
    n, dim = x.shape[0], x[0].numel()
    xr = repeat(x, "n ... -> (n m) ...", m=num_vectors)
    tr = repeat(tt, "n -> (n m)", m=num_vectors)
    cr = None if cond is None else repeat(cond, "n ... -> (n m) ...", m=num_vectors)
    z = rademacher((n * num_vectors, dim), generator=generator, dtype=x.dtype)

    def chunk(sl: slice) -> tuple[Tensor, ...]:
        op = _operator(score, xr[sl], tr[sl], None if cr is None else cr[sl], jvp_mode)
        ok = _finite_rows(op.output)

        def matvec(v: Tensor) -> Tensor:
            return torch.where(ok[:, None], torch.nan_to_num(op.matvec(v), 0.0, 0.0, 0.0), 0.0)

        res = lanczos(matvec, z[sl].to(x.device), num_iters, generator=generator)
        fields = [getattr(res, f.name).cpu() for f in dataclasses.fields(res)]
        good = ok.cpu() & torch.isfinite(res.alpha).all(1).cpu() & torch.isfinite(res.beta).all(1).cpu()
        return (*fields, good)

    *fields, finite = map_chunks(chunk, n * num_vectors, max_batch)
    result = LanczosResult(*fields)
    first = LanczosResult(*(f[::num_vectors] for f in fields))
    eig_k = extreme_eigenvalues(first, k, "smallest")
    alpha = result.alpha
    trace = dim * reduce(alpha[:, 0], "(n m) -> n", "mean", m=num_vectors)
    finite_n = reduce(finite.double(), "(n m) -> n", "min", m=num_vectors).bool()
    return result, eig_k, trace, finite_n


def _operator(score, x, t, cond, jvp_mode) -> ScoreJacobian:
    return ScoreJacobian(lambda z: score(z, t, cond), x, mode=jvp_mode)


def _finite_rows(out: Tensor) -> Tensor:
    ok = torch.isfinite(out).all(1)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten().tolist()
        warnings.warn(
            f"memwatch: the model's score is not finite (NaN/Inf) for {len(bad)} sample(s) {bad[:8]}; "
            "their sharpness is reported as NaN",
            RuntimeWarning,
            stacklevel=4,
        )
    return ok


def _check_inputs(x: object) -> tuple[int, int]:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise MemwatchError(
            f"`x` must be a floating tensor [n, *shape], got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )
    return x.shape[0], x[0].numel()
