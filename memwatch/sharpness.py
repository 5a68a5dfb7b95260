"""Sharpness of the learned density at a point: the spectrum of the Hessian of log p_t.

``H(x, t) = ½ (J + Jᵀ)`` with ``J = ∂s/∂x`` the Jacobian of the learned score (see
:mod:`memwatch.operators`). Near a memorized training point ``x₀`` the model's ``p_t`` is locally
``N(α_t x₀, σ_t² I)``, so every eigenvalue is ``≈ -1/σ_t²``; on a ``k``-dimensional data manifold
only ``d - k`` are, and ``k`` sit near 0 (Jeon et al. 2025). With ``σ_t²``-normalized eigenvalues
``μ = σ_t² λ`` the per-sample summaries are

* ``sharp_fraction`` = share of the ``d`` eigenvalues with ``μ < -τ`` (``τ`` = ``threshold``),
* ``lid`` = ``d · (1 - sharp_fraction)``, the local intrinsic dimension the spectrum implies,
* ``trace`` = ``tr H`` and ``flipd`` = ``d + σ_t² tr H`` (FLIPD, Kamkari et al. 2024): the trace
  of the denoiser Jacobian ``∂D/∂x = I + σ_t² J``, ``D(x) = x + σ_t² s(x)`` (≈ 0 at a copy, ≈ a
  rank-``k`` projection on a manifold),
* ``memorization_score`` = ``sharp_fraction``, in [0, 1], higher = more memorized (1: an isolated
  peak, every direction sharp).

Three methods:

* ``"dense"``: the full ``[n, d, d]`` Jacobian (``d`` vjp products, vectorized) and
  ``eigvalsh`` — exact; fast while ``d`` is small.
* ``"lanczos"``: ``num_vectors`` Lanczos runs of ``num_iters`` steps per sample from Rademacher
  start vectors, all samples and vectors batched. Stochastic Lanczos quadrature over those runs
  gives ``sharp_fraction``; the first step of each run is a Hutchinson sample of ``tr H``; the
  first run's Ritz values give the ``k`` most negative eigenvalues, with residual bounds and a
  convergence mask as scipy's ``eigsh`` would report them.
* ``"trace"``: the cheap tier — no spectrum, only ``tr(∂D/∂x)`` from ``num_vectors`` reverse-mode
  products per sample (Hutchinson or Hutch++, ``trace_estimator``), hence LID / FLIPD with a
  standard error and the *estimated* sharp fraction ``1 - LID/d``, clamped into ``[0, 1]`` (so
  ``lid`` lies in ``[0, d]``; ``flipd`` keeps the unclamped estimate beside its standard error).

``method="auto"`` takes ``"dense"`` for ``d <= DENSE_MAX_DIM`` (crossover measured in
``benchmarks/bench_lanczos.py``) and ``"lanczos"`` above; ``"trace"`` is only used when asked for.

:func:`hessian_score_norm` gives ``‖H s‖``, the unconditional analogue of Jeon et al.'s
conditional metric, from one reverse-mode product per sample.

What was not measured is NaN: a sample whose score, derivatives or computed values are not finite
gets NaN in every per-sample field (``finite`` False) and one ``RuntimeWarning`` counts those
samples and says why.

Over 600 lines, as one module: the three tiers (dense, Lanczos, the trace) share one options type,
one result type and one policy for what was not measured (NaN, convergence flags, warnings); split
by tier, each would restate that policy.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, reduce, repeat
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.lanczos import (
    LanczosResult,
    extreme_eigenvalues,
    fraction_below,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    mean_and_stderr,
    quadrature_density,
    rademacher,
)
from memwatch.operators import JVP_MODES, ScoreJacobian, map_chunks
from memwatch.score import DiffusionScore
from memwatch.validation import check_int, check_positive

__all__ = [
    "SharpnessOptions",
    "SharpnessResult",
    "measure_sharpness",
    "hessian_score_norm",
    "DENSE_MAX_DIM",
    "METHODS",
    "TRACE_ESTIMATORS",
]

METHODS = ("auto", "dense", "lanczos", "trace")
TRACE_ESTIMATORS = ("hutchinson", "hutch++")
DENSE_MAX_DIM = 384  # measured crossover d ≈ 355–378 (two runs); at a tie the exact method wins
_MIN_TRACE_VECTORS = {"hutchinson": 2, "hutch++": 4}  # the fewest with a defined standard error


@dataclass(frozen=True)
class SharpnessOptions:
    """How :func:`measure_sharpness` measures: one frozen settings object shared by
    :func:`measure_sharpness`, :func:`memwatch.conditional_metrics` and the monitor.

    Attributes:
        k: number of most negative eigenvalues reported (``1 <= k <= d``; checked against ``d``
            by :meth:`check_dim`).
        threshold: ``τ > 0``; a direction is sharp when ``σ_t² λ < -τ``.
        method: one of ``METHODS``.
        num_iters: Lanczos steps per run, ``>= k`` (capped at ``d``); used by ``"lanczos"`` only.
        num_vectors: random vectors per sample, ``>= 1``: SLQ start vectors for ``"lanczos"``
            (each costs ``num_iters`` symmetric products); for ``"trace"`` the number of
            reverse-mode products per sample, ``>= 2`` for Hutchinson, ``>= 4`` for Hutch++ (so
            that a standard error exists); unused by ``"dense"``.
        max_batch: at most this many rows go through the model at once; ``None`` = all.
        jvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see :class:`memwatch.operators.ScoreJacobian`);
            ``"trace"`` and :func:`hessian_score_norm` use vjps only and ignore it.
        tol: ``> 0``; a Lanczos Ritz value ``θ`` counts as converged when its residual bound ``r``
            satisfies ``σ_t² r <= tol``, i.e. the normalized ``σ_t² θ`` lies within ``tol`` of an
            eigenvalue of ``σ_t² H`` (the ``σ_t⁻²`` scale: ``σ_t² λ ≈ -1`` at a copy). The default
            0.05 is a tenth of the way from the default threshold to either end of ``[-1, 0]``.
        trace_estimator: ``"hutchinson"`` (default) or ``"hutch++"`` for ``method="trace"`` (see
            :func:`memwatch.lanczos.hutchpp_trace`). Hutchinson spends all ``num_vectors`` products
            on samples and is the better choice with few vectors and intrinsic dimensions above
            ``num_vectors / 3`` (the usual case on images); Hutch++ is exact when the denoiser
            Jacobian has rank ``<= num_vectors // 3`` (near-copies, very low-dimensional data).

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
    tol: float = 0.05
    trace_estimator: str = "hutchinson"

    def __post_init__(self) -> None:
        for name, low in (("k", 1), ("num_iters", 1), ("num_vectors", 1)):
            check_int(name, getattr(self, name), low)
        if self.max_batch is not None:
            check_int("max_batch", self.max_batch, 1)
        for name, allowed in (("method", METHODS), ("jvp_mode", JVP_MODES), ("trace_estimator", TRACE_ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise MemwatchError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise MemwatchError(f"`threshold` must be a number in (0, 1], got {self.threshold!r}")
        if not 0 < self.threshold <= 1:
            raise MemwatchError(
                "`threshold` must be in (0, 1] (a direction is sharp when σ_t²λ < -threshold, and σ_t²λ ≈ -1 "
                f"at a copy), got {self.threshold!r}"
            )
        check_positive("tol", self.tol)
        if self.method == "lanczos" and self.num_iters < self.k:
            raise MemwatchError(f"`num_iters` must be >= k={self.k} for method='lanczos', got {self.num_iters}")
        low = _MIN_TRACE_VECTORS[self.trace_estimator]
        if self.method == "trace" and self.num_vectors < low:
            raise MemwatchError(
                f"`num_vectors` must be >= {low} for method='trace' with trace_estimator={self.trace_estimator!r}, "
                f"got {self.num_vectors}"
            )

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


@dataclass(frozen=True)
class SharpnessResult:
    """Per-sample sharpness of the learned density (all float64, on the CPU).

    Samples with ``finite`` False hold NaN in every per-sample float field. Fields a method does
    not measure are NaN for every sample: ``"trace"`` measures no eigenvalues, so ``eigenvalues``,
    ``normalized``, ``spectrum_nodes``, ``spectrum_weights`` and ``residual_bounds`` are NaN (and
    ``converged`` False) there.

    Attributes:
        eigenvalues: ``[n, k]`` most negative eigenvalues of ``H``, ascending (Ritz values for
            ``"lanczos"``; check ``converged``).
        normalized: ``[n, k]`` ``σ_t² · eigenvalues`` (≈ -1 in sharp directions).
        sharp_fraction: ``[n]`` share of eigenvalues with ``σ_t² λ < -threshold`` (dense: counted;
            Lanczos: SLQ estimate). For ``"trace"`` the estimate ``1 - lid / dim = -σ_t² tr H / d``,
            which equals the share of sharp directions when ``σ_t² λ`` is -1 or 0 in each (the
            copy / manifold picture) and is otherwise a trace-weighted share; it may leave [0, 1].
        lid: ``[n]`` ``dim · (1 - sharp_fraction)``, in ``[0, dim]`` (for ``"trace"``: ``flipd`` clamped into it).
        trace: ``[n]`` ``tr H`` (exact for dense; a Hutchinson estimate from the Lanczos runs' first
            steps; Hutchinson / Hutch++ for ``"trace"``).
        trace_stderr: ``[n]`` standard error of ``trace`` (0 for dense; NaN for Lanczos with
            ``num_vectors = 1``).
        flipd: ``[n]`` ``dim + σ_t² tr H`` = ``tr(∂D/∂x)``, its standard error ``σ_t² trace_stderr``.
        memorization_score: ``[n]`` = ``sharp_fraction``, higher = more memorized.
        sigma: ``[n]`` ``σ_t`` of each sample's timestep.
        spectrum_nodes: ``[n, M]`` normalized eigenvalues (dense) or Ritz values (SLQ nodes).
        spectrum_weights: ``[n, M]`` their quadrature weights (each row sums to 1).
        residual_bounds: ``[n, k]`` for each of ``eigenvalues`` the Lanczos residual bound ``r``
            (an eigenvalue of ``H`` lies within ``r`` of it; :meth:`memwatch.lanczos.LanczosResult.error_bounds`);
            0 for dense.
        converged: ``[n, k]`` bool, ``σ_t² · residual_bounds <= tol`` (all True for dense, False
            for ``"trace"`` and for non-finite samples).
        finite: ``[n]`` bool, False where the model's score, its derivatives (the Jacobian
            products) or the computed values were not finite (those rows hold NaN).
        dim: ``d``; threshold: ``τ``; tol: the convergence tolerance; method: ``"dense"``,
            ``"lanczos"`` or ``"trace"``.
    """

    eigenvalues: Tensor
    normalized: Tensor
    sharp_fraction: Tensor
    lid: Tensor
    trace: Tensor
    trace_stderr: Tensor
    flipd: Tensor
    memorization_score: Tensor
    sigma: Tensor
    spectrum_nodes: Tensor
    spectrum_weights: Tensor
    residual_bounds: Tensor
    converged: Tensor
    finite: Tensor
    dim: int
    threshold: float
    tol: float
    method: str

    @property
    def score(self) -> Tensor:
        """Deprecated name of ``memorization_score`` (it collided with the model's score)."""
        warnings.warn(
            "SharpnessResult.score is deprecated; use SharpnessResult.memorization_score",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.memorization_score

    @classmethod
    def unmeasured(cls, sigma: Tensor, dim: int, options: SharpnessOptions, method: str) -> SharpnessResult:
        """A result for ``n = len(sigma)`` samples that could not be measured: every value NaN,
        ``finite`` and ``converged`` False (e.g. a model whose Jacobian products are inconsistent).

        Example:
            >>> res = SharpnessResult.unmeasured(torch.full((2,), 0.3), 16, SharpnessOptions(k=4), "dense")
            >>> res.eigenvalues.shape, bool(res.finite.any())
            (torch.Size([2, 4]), False)
        """
        n, k = sigma.shape[0], options.k
        nan_n = torch.full((n,), float("nan"), dtype=torch.float64)
        nan_k = torch.full((n, k), float("nan"), dtype=torch.float64)
        return cls(
            eigenvalues=nan_k,
            normalized=nan_k,
            sharp_fraction=nan_n,
            lid=nan_n,
            trace=nan_n,
            trace_stderr=nan_n,
            flipd=nan_n,
            memorization_score=nan_n,
            sigma=sigma.detach().cpu().to(torch.float64),
            spectrum_nodes=nan_k,
            spectrum_weights=torch.zeros(n, k, dtype=torch.float64),
            residual_bounds=nan_k,
            converged=torch.zeros(n, k, dtype=torch.bool),
            finite=torch.zeros(n, dtype=torch.bool),
            dim=dim,
            threshold=float(options.threshold),
            tol=float(options.tol),
            method=method,
        )

    def as_unmeasured(self) -> SharpnessResult:
        """This result with every sample :meth:`masked` (what a measurement that must not be read,
        e.g. of a misread network, reports).

        Example:
            >>> res = SharpnessResult.unmeasured(torch.full((2,), 0.3), 16, SharpnessOptions(k=4), "dense")
            >>> bool(res.as_unmeasured().lid.isnan().all())
            True
        """
        return self.masked(torch.ones_like(self.finite))

    def masked(self, rows: Tensor) -> SharpnessResult:
        """This result with the samples ``rows`` (``[n]`` bool) unmeasured: their per-sample values
        NaN (``sigma`` kept, quadrature weights 0) and ``finite`` / ``converged`` False."""
        rows = rows.to(torch.bool)

        def blank(value: Tensor, fill: float) -> Tensor:
            return torch.where(rows.reshape(-1, *[1] * (value.ndim - 1)), torch.full_like(value, fill), value)

        changes = {
            f.name: blank(value, float("nan"))
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor) and value.is_floating_point() and f.name != "sigma"
        }
        changes["spectrum_weights"] = blank(self.spectrum_weights, 0.0)  # as `unmeasured`
        changes["converged"] = self.converged & ~rows[:, None]
        changes["finite"] = self.finite & ~rows
        return dataclasses.replace(self, **changes)

    def density(self, grid: Tensor, bandwidth: float = 0.05) -> Tensor:
        """Gaussian-smoothed density of normalized eigenvalues ``[n, G]`` on ``grid`` ``[G]``;
        NaN rows where nothing was measured (non-finite samples; every row for ``"trace"``)."""
        return quadrature_density(self.spectrum_nodes, self.spectrum_weights, grid, bandwidth)


@dataclass(frozen=True)
class _Measured:
    """What one method measured, before the common NaN masking (eigenvalue scale, not normalized)."""

    sharp: Tensor  # [n]
    trace: Tensor  # [n]
    trace_stderr: Tensor  # [n]
    eig_k: Tensor  # [n, k]
    bounds: Tensor  # [n, k]
    converged: Tensor  # [n, k] bool
    nodes: Tensor  # [n, M]
    weights: Tensor  # [n, M]
    output_ok: Tensor  # [n] bool: the score is finite
    products_ok: Tensor  # [n] bool: the Jacobian products are finite
    values_ok: Tensor  # [n] bool: what was computed from them is finite
    values: str  # what "values" are, for the warning


def measure_sharpness(
    score: DiffusionScore,
    x: Tensor,
    t: Tensor | int | float,
    options: SharpnessOptions | None = None,
    *,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    sample_shape: Sequence[int] | None = None,
    **settings: object,
) -> SharpnessResult:
    """Measure the Hessian spectrum of ``log p_t`` (or, for ``method="trace"``, its trace) at ``x``,
    for all samples at once.

    Args:
        score: the model's score; ``cond`` (if given) selects the conditional/guided score.
        x: ``[n, *sample_shape]`` noisy states ``x_t`` at ``t`` — the probes' states along the
            sampling trajectory, ``sample_trajectory(..., states_at=[t]).states[float(t)]``, not
            the finished samples. One sample still needs its batch axis: ``x[None]``.
        t: timestep (schedule units), scalar or ``[n]``; for a noise level σ,
            ``score.schedule.timestep_for_sigma(σ)``.
        options: how to measure (:class:`SharpnessOptions`; default ``SharpnessOptions()``).
        cond: condition ``[n, ...]`` or one condition for all samples.
        generator: source of the Rademacher vectors (explicit for repeatable runs).
        sample_shape: the shape of one sample; ``x.shape[1:]`` must equal it. Default: the shape
            the wrapped network declares, if any (a diffusers model's ``config``:
            ``(in_channels, sample_size, sample_size)``), used only to recognise one sample passed
            without its batch axis, since such networks also run at other resolutions.
        settings: fields of :class:`SharpnessOptions` that override ``options``, e.g. ``k=4``.
            ``max_batch`` bounds the rows through the model at once (samples × vectors for
            Lanczos and trace, samples × basis vectors for dense), halved on out-of-memory.

    Returns:
        :class:`SharpnessResult`. Samples whose score, derivatives or computed values are not
        finite get NaN and one ``RuntimeWarning`` counts them; Lanczos Ritz values that have not
        converged (``converged``) are reported, and one ``RuntimeWarning`` counts their samples —
        never a silent number.

    Raises:
        MemwatchError: invalid arguments (named in the message); ``x`` that is not
            ``[n, *sample_shape]``, e.g. one sample without its batch axis (the message gives the
            expected and the given shape).

    Example:
        >>> from memwatch.schedules import NoiseSchedule
        >>> score = DiffusionScore(lambda x, t: -x, NoiseSchedule.linear(100))
        >>> measure_sharpness(score, torch.randn(3, 4), 50, k=2).eigenvalues.shape
        torch.Size([3, 2])
        >>> measure_sharpness(score, torch.randn(3, 4), 50, k=2, method="trace").trace_stderr.shape
        torch.Size([3])
    """
    options = options or SharpnessOptions()
    if settings:
        options = options.replace(**settings)
    n, dim = _check_inputs(x, score, sample_shape)
    options.check_dim(dim)
    method = options.resolved_method(dim)
    tt = score.timesteps(t, n, x.device)
    sigma = score.sigma(tt).cpu().to(torch.float64)
    cond_b = None if cond is None else score.batch_condition(cond, n, "cond")
    measure = {"dense": _dense, "lanczos": _lanczos, "trace": _trace}[method]
    got = measure(score, x, tt, cond_b, sigma, options, generator)
    finite = _finite_probes(got.output_ok, got.products_ok, got.values_ok, got.values)
    converged = got.converged & finite[:, None]
    if method == "lanczos":
        _warn_unconverged(converged, finite, options, dim)

    return _result(got, finite, converged, sigma, dim, options, method)


def _result(
    got: _Measured,
    finite: Tensor,
    converged: Tensor,
    sigma: Tensor,
    dim: int,
    options: SharpnessOptions,
    method: str,
) -> SharpnessResult:
    """The :class:`SharpnessResult` of one measurement ``got``: the values of probes that are not
    ``finite`` NaN, the eigenvalues also σ_t²-normalized, LID and FLIPD from the sharp fraction
    and the trace."""
    s2 = sigma**2
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    keep = finite[:, None]
    sharp = torch.where(finite, got.sharp, nan)
    trace = torch.where(finite, got.trace, nan)
    eig_k = torch.where(keep, got.eig_k, nan)
    return SharpnessResult(
        eigenvalues=eig_k,
        normalized=eig_k * s2[:, None],
        sharp_fraction=sharp,
        lid=dim * (1 - sharp),
        trace=trace,
        trace_stderr=torch.where(finite, got.trace_stderr, nan),
        flipd=dim + s2 * trace,
        memorization_score=sharp,
        sigma=sigma,
        spectrum_nodes=torch.where(keep, got.nodes * s2[:, None], nan),
        spectrum_weights=got.weights,
        residual_bounds=torch.where(keep, got.bounds, nan),
        converged=converged,
        finite=finite,
        dim=dim,
        threshold=float(options.threshold),
        tol=float(options.tol),
        method=method,
    )


def hessian_score_norm(
    score: DiffusionScore,
    x: Tensor,
    t: Tensor | int | float,
    options: SharpnessOptions | None = None,
    *,
    cond: Tensor | None = None,
    sample_shape: Sequence[int] | None = None,
) -> Tensor:
    """``‖H s‖`` ``[n]`` (float64, CPU): the unconditional analogue of Jeon et al.'s conditional
    metric ``‖H_c s_Δ − H_uc s_Δ‖``, from one reverse-mode product per sample.

        ‖H(x, t) s(x, t)‖₂,   computed as ‖Jᵀ s‖₂,   J = ∂s/∂x

    For a gradient field ``s = ∇ log p_t`` the Jacobian is the Hessian, symmetric, so
    ``Jᵀ s = J s = H s``, and one vjp (a backward pass) gives it. A learned score is only nearly a
    gradient field; the symmetrized ``½ (J + Jᵀ) s`` would add a jvp (forward mode, or a
    double vjp where forward mode is unsupported), about doubling to tripling the cost, for a
    correction of the size of the score's asymmetry. Units: ``[x]⁻³`` — at a copy ``H ≈ -I/σ_t²``
    and ``‖s‖ ≈ ‖ε‖/σ_t``, so ``σ_t³ ‖H s‖ ≈ ‖ε‖`` is the scale-free reading.

    Args:
        score, x, t, cond, sample_shape: as in :func:`measure_sharpness` (``x`` ``[n, *sample_shape]``).
        options: only ``max_batch`` (rows through the model at once) is used.

    Returns:
        ``[n]`` norms; NaN, with one ``RuntimeWarning`` counting the samples, where the score or
        its derivatives are not finite.

    Raises:
        MemwatchError: invalid ``x`` (not ``[n, *sample_shape]``), ``t`` or ``cond``.

    Example:
        >>> from memwatch.schedules import NoiseSchedule
        >>> score = DiffusionScore(lambda x, t: 2 * x, NoiseSchedule.linear(100), prediction="score")
        >>> hessian_score_norm(score, torch.ones(2, 4), 10)  # H s = 2 · 2x, ‖·‖ = 4 · 2
        tensor([8., 8.], dtype=torch.float64)
    """
    options = options or SharpnessOptions()
    n, _ = _check_inputs(x, score, sample_shape)
    tt = score.timesteps(t, n, x.device)
    cond_b = None if cond is None else score.batch_condition(cond, n, "cond")

    def chunk(sl: slice) -> tuple[Tensor, ...]:
        op = _operator(score, x[sl], tt[sl], None if cond_b is None else cond_b[sl], _vjp_mode(options))
        hs = op.vjp(op.output)
        return hs.to(torch.float64).norm(dim=1).cpu(), _rows_finite(op.output).cpu(), _rows_finite(hs).cpu()

    norms, output_ok, products_ok = map_chunks(chunk, n, options.max_batch)
    finite = _finite_probes(output_ok, products_ok, torch.isfinite(norms), "norms", quantity="‖H s‖")
    return torch.where(finite, norms, float("nan"))


# ---------------------------------------------------------------------- methods
def _dense(score, x, tt, cond, sigma, options, generator) -> _Measured:
    """All eigenvalues ``[n, d]`` with weights ``1/d``; exact trace, zero bounds, all converged."""
    mode = "reverse" if options.jvp_mode == "auto" else options.jvp_mode  # dense products are vjps only
    n, dim, k, max_batch = x.shape[0], x[0].numel(), options.k, options.max_batch
    # rows through the model at once = samples per chunk × basis vectors per vmap chunk <= max_batch
    samples = n if max_batch is None else max(1, min(n, max_batch // dim))
    basis_chunk = None if max_batch is None else max(1, min(dim, max_batch // samples))

    def chunk(sl: slice) -> tuple[Tensor, ...]:
        op = _operator(score, x[sl], tt[sl], None if cond is None else cond[sl], mode)
        output_ok = _rows_finite(op.output).cpu()
        hess = op.dense(symmetric=True, chunk_size=basis_chunk).to(torch.float64).cpu()
        products_ok = _rows_finite(hess)
        hess[~(output_ok & products_ok)] = 0.0  # eigvalsh cannot take NaN; those rows become NaN later
        eig = torch.linalg.eigvalsh(hess)
        return eig, output_ok, products_ok, _rows_finite(eig)

    eigs, output_ok, products_ok, values_ok = map_chunks(chunk, n, samples)
    sharp = ((eigs * sigma[:, None] ** 2) < -options.threshold).double().mean(1)
    zeros = eigs.new_zeros(n, k)
    return _Measured(
        sharp=sharp,
        trace=eigs.sum(1),
        trace_stderr=zeros[:, 0],
        eig_k=eigs[:, :k],
        bounds=zeros,
        converged=torch.ones(n, k, dtype=torch.bool),
        nodes=eigs,
        weights=torch.full_like(eigs, 1.0 / dim),
        output_ok=output_ok,
        products_ok=products_ok,
        values_ok=values_ok,
        values="eigenvalues",
    )


def _lanczos(score, x, tt, cond, sigma, options, generator) -> _Measured:
    """One batched Lanczos run per (sample, start vector), rows ``(n m)``: SLQ sharp fraction,
    Ritz values and residual bounds of run 0, Hutchinson trace from the runs' first steps."""
    n, dim, m, k = x.shape[0], x[0].numel(), options.num_vectors, options.k
    xr = repeat(x, "n ... -> (n m) ...", m=m)
    tr = repeat(tt, "n -> (n m)", m=m)
    cr = None if cond is None else repeat(cond, "n ... -> (n m) ...", m=m)
    z = rademacher((n * m, dim), generator=generator, dtype=x.dtype)

    def chunk(sl: slice) -> tuple[Tensor, ...]:
        op = _operator(score, xr[sl], tr[sl], None if cr is None else cr[sl], options.jvp_mode)
        output_ok = _rows_finite(op.output)
        products_ok = torch.ones_like(output_ok)

        def matvec(v: Tensor) -> Tensor:
            w = op.matvec(v)
            ok = _rows_finite(w)
            products_ok.logical_and_(ok)
            return torch.where((output_ok & ok)[:, None], w, 0.0)  # keeps the other rows' arithmetic clean

        res = lanczos(matvec, z[sl].to(x.device), min(options.num_iters, dim), generator=generator)
        fields = [getattr(res, f.name).cpu() for f in dataclasses.fields(res)]
        return (*fields, output_ok.cpu(), products_ok.cpu())

    alpha, beta, krylov_dim, residual, output_ok, products_ok = map_chunks(chunk, n * m, options.max_batch)
    values_ok = _rows_finite(alpha) & _rows_finite(beta) & torch.isfinite(residual)
    alpha, beta = (torch.where(values_ok[:, None], v, 0.0) for v in (alpha, beta))  # eigh cannot take NaN
    result = LanczosResult(alpha, beta, krylov_dim, torch.where(values_ok, residual, 0.0))
    first = LanczosResult(*(getattr(result, f.name)[::m] for f in dataclasses.fields(result)))
    eig_k, bounds = extreme_eigenvalues(first, k, "smallest"), first.error_bounds()[:, :k]

    per_run_thr = repeat(-options.threshold / sigma**2, "n -> (n m)", m=m)
    sharp = reduce(fraction_below(result, per_run_thr), "(n m) -> n", "mean", m=m)
    nodes, weights = result.ritz()
    trace, trace_stderr = mean_and_stderr(rearrange(dim * alpha[:, 0], "(n m) -> n m", m=m))
    per_probe = [rearrange(ok, "(n m) -> n m", m=m).all(1) for ok in (output_ok, products_ok, values_ok)]
    return _Measured(
        sharp=sharp,
        trace=trace,
        trace_stderr=trace_stderr,
        eig_k=eig_k,
        bounds=bounds,
        converged=bounds * sigma[:, None] ** 2 <= options.tol,
        nodes=rearrange(nodes, "(n m) j -> n (m j)", m=m),
        weights=rearrange(weights, "(n m) j -> n (m j)", m=m) / m,
        output_ok=per_probe[0],
        products_ok=per_probe[1],
        values_ok=per_probe[2] & _rows_finite(eig_k) & _rows_finite(bounds),
        values="Lanczos coefficients or Ritz values",
    )


def _trace(score, x, tt, cond, sigma, options, generator) -> _Measured:
    """``tr(∂D/∂x)`` per sample from ``num_vectors`` vjps (``∂D/∂xᵀ v = v + σ_t² Jᵀ v``), as ``tr H``
    ``= (tr(∂D/∂x) − d) / σ_t²``; no spectrum. The estimator sees the denoiser Jacobian, not ``J``:
    it is ≈ 0 at a copy and ≈ a rank-``k`` projection on a manifold, which Hutch++ can exploit."""
    n, dim, k = x.shape[0], x[0].numel(), options.k
    s2 = (sigma**2).to(x.device)
    output_ok, products_ok = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)

    def denoiser_vjp(v: Tensor) -> Tensor:  # [n, K, D] -> (I + σ_t² Jᵀ) v, float64
        kk = v.shape[1]
        rows = rearrange(v, "n k d -> (n k) d")
        xr, tr = repeat(x, "n ... -> (n k) ...", k=kk), repeat(tt, "n -> (n k)", k=kk)
        cr = None if cond is None else repeat(cond, "n ... -> (n k) ...", k=kk)

        def chunk(sl: slice) -> tuple[Tensor, ...]:
            op = _operator(score, xr[sl], tr[sl], None if cr is None else cr[sl], _vjp_mode(options))
            w = op.vjp(rows[sl])
            return w, _rows_finite(op.output), _rows_finite(w)

        w, out_ok, prod_ok = map_chunks(chunk, n * kk, options.max_batch)
        output_ok.logical_and_(rearrange(out_ok, "(n k) -> n k", k=kk).all(1).cpu())
        products_ok.logical_and_(rearrange(prod_ok, "(n k) -> n k", k=kk).all(1).cpu())
        w = torch.where((out_ok & prod_ok)[:, None], w, 0.0).to(torch.float64)
        out = rows.to(torch.float64) + repeat(s2, "n -> (n k) 1", k=kk) * w
        return rearrange(out, "(n k) d -> n k d", k=kk)

    estimator = hutchinson_trace if options.trace_estimator == "hutchinson" else hutchpp_trace
    lid, lid_err = (
        v.cpu()
        for v in estimator(
            denoiser_vjp, n, dim, options.num_vectors, generator=generator, dtype=x.dtype, device=x.device
        )
    )
    trace = (lid - dim) / sigma**2
    nan = torch.full((n, k), float("nan"), dtype=torch.float64)
    return _Measured(
        sharp=(-trace * sigma**2 / dim).clamp(0, 1),  # a share: FLIPD outside [0, d] is estimator noise
        trace=trace,
        trace_stderr=lid_err / sigma**2,
        eig_k=nan,
        bounds=nan,
        converged=torch.zeros(n, k, dtype=torch.bool),
        nodes=nan[:, :1],
        weights=nan[:, :1],
        output_ok=output_ok,
        products_ok=products_ok,
        values_ok=torch.isfinite(lid) & torch.isfinite(lid_err),
        values="trace estimates",
    )


# ---------------------------------------------------------------------- helpers
def _vjp_mode(options: SharpnessOptions) -> str:
    """The product path for vjp-only measurements (trace tier, ‖H s‖): the verified path when it
    needs no ``torch.func`` (``"autograd"``, ``"fd"``: old-style autograd Functions), else reverse."""
    return options.jvp_mode if options.jvp_mode in ("autograd", "fd") else "reverse"


def _operator(score, x, t, cond, jvp_mode) -> ScoreJacobian:
    return ScoreJacobian(lambda z: score(z, t, cond), x, mode=jvp_mode)


def _rows_finite(values: Tensor) -> Tensor:
    """``[n]`` bool: every entry of row ``i`` of ``values`` ``[n, ...]`` is finite."""
    return torch.isfinite(values.reshape(values.shape[0], -1)).all(1)


def _finite_probes(
    output_ok: Tensor, products_ok: Tensor, values_ok: Tensor, values: str, quantity: str = "sharpness"
) -> Tensor:
    """``[n]`` bool: all three hold; otherwise one ``RuntimeWarning`` counts the samples per reason."""
    finite = output_ok & products_ok & values_ok
    if bool(finite.all()):
        return finite
    causes = (
        (~output_ok, "the model's score is not finite (NaN/Inf)"),
        (output_ok & ~products_ok, "the score is finite but its derivatives (Jacobian products) are not"),
        (output_ok & products_ok & ~values_ok, f"the computed {values} are not finite"),
    )
    reasons = [f"{text} at {int(mask.sum())}" for mask, text in causes if bool(mask.any())]
    bad = (~finite).nonzero().flatten().tolist()
    warnings.warn(
        f"memwatch: {quantity} not measured (NaN) for {len(bad)} of {len(finite)} probe(s) {bad[:8]}: "
        + "; ".join(reasons),
        RuntimeWarning,
        stacklevel=3,
    )
    return finite


def _warn_unconverged(converged: Tensor, finite: Tensor, options: SharpnessOptions, dim: int) -> None:
    bad = (finite & ~converged.all(1)).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"memwatch: the k={options.k} most negative Ritz values have not all converged for {len(bad)} of "
            f"{len(finite)} probe(s) {bad[:8]} (residual bound > tol/σ_t², tol={options.tol}, after "
            f"num_iters={min(options.num_iters, dim)} steps, d={dim}); they are reported and flagged in "
            "SharpnessResult.converged: raise num_iters, lower k, or use method='dense' for small d",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_inputs(x: object, score: DiffusionScore, sample_shape: Sequence[int] | None) -> tuple[int, int]:
    """``(n, d)`` of a batch ``x`` ``[n, *sample_shape]``; a loud error for anything else.

    ``sample_shape`` given: ``x.shape[1:]`` must equal it. Not given: the network's declared shape
    (:func:`_declared_shape`) catches ``x`` equal to one sample, i.e. a missing batch axis.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise MemwatchError(
            f"`x` must be a floating tensor [n, *sample_shape], got {type(x).__name__} "
            f"{tuple(getattr(x, 'shape', ()))}" + (" (one sample? add its batch axis: x[None])" if _is_1d(x) else "")
        )
    shape = tuple(x.shape)
    if sample_shape is not None:
        expected = _check_sample_shape(sample_shape)
        if shape[1:] != expected:
            hint = ": one sample without its batch axis? pass x[None]" if shape == expected else ""
            raise MemwatchError(f"`x` must be [n, *sample_shape] = [n, {_dims(expected)}], got shape {shape}{hint}")
    elif shape == _declared_shape(score):
        raise MemwatchError(
            f"`x` must be [n, *sample_shape] = [n, {_dims(shape)}] (the network's declared sample shape), got "
            f"shape {shape}: one sample without its batch axis; pass x[None]"
        )
    return shape[0], x[0].numel()


def _check_sample_shape(sample_shape: object) -> tuple[int, ...]:
    dims = tuple(sample_shape) if isinstance(sample_shape, Sequence) and not isinstance(sample_shape, str) else None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise MemwatchError(f"`sample_shape` must be a non-empty sequence of positive ints, got {sample_shape!r}")
    return dims


def _declared_shape(score: DiffusionScore) -> tuple[int, ...] | None:
    """One sample's shape as the network declares it: a diffusers model's ``(in_channels, H, W)``."""
    config = getattr(score.model, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    if not isinstance(channels, int):
        return None
    if isinstance(size, int):
        return (channels, size, size)
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (channels, *size)
    return None


def _is_1d(x: object) -> bool:
    return isinstance(x, Tensor) and x.ndim == 1


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)
