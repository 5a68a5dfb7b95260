"""Local intrinsic dimension (LID) of the data and of the model at a noise level, and the
statistics that compare them — the quantities of :mod:`memwatch.signals.lid`.

Scale-dependent LID. Data locally Gaussian with variances ``s_1..s_d`` around a point, seen
through noise of std ``τ`` per coordinate (``τ = σ_t / α_t``: the noise of ``x_t`` in data
units), has a learned score Jacobian ``H`` with ``σ_t² λ_i = -τ² / (s_i + τ²)``, so

    LID_τ = d + σ_t² tr H = Σ_i s_i / (s_i + τ²)

(FLIPD, Kamkari et al. 2024): a soft count of the directions in which the data spreads by more
than the noise. A model that generalizes on ``k``-dimensional data reads ``LID_τ ≈ k``; at a
memorized training point its density is a peak ``N(x₀, ≈0)``, all ``s_i ≈ 0`` and ``LID_τ ≈ 0``
(the manifold memorization hypothesis: memorization is ``LID_θ < LID_data``).

This module measures both sides with the same formula, so their ratio needs no threshold in
dimensions and no share of ``d``:

* :func:`data_lid`: the data's ``LID_τ`` by local PCA over nearest training neighbours (the
  covariance eigenvalues of each neighbourhood as ``s_i``, :func:`local_variances`), the median
  over anchor points — once, from the training samples the monitor already holds to calibrate;
* :func:`denoising_lid`: the model's ``LID_τ`` at a clean point ``x₀`` from forward passes only
  (Yeats et al. 2025): ``E_ε ‖ε + σ_t s(α_t x₀ + σ_t ε, t)‖²``, the ε-prediction loss at the
  point, which is ``Σ s_i/(s_i+τ²)`` in expectation over locally Gaussian data and ``→ 0`` at a
  copy; the Jacobian route is the FLIPD of :func:`memwatch.measure_sharpness`;
* :func:`relative`, :func:`drawdown`, :func:`profile`: the model's LID against the data's, against
  the probe's own early checks, and averaged over noise levels; :func:`statistics` composes them.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2000, 3, generator=g) * torch.tensor([1.0, 1.0, 0.001])  # a 2-d sheet in R^3
    >>> lid = data_lid(x, torch.tensor([0.01]), neighbours=64, generator=g)
    >>> round(float(lid[0]), 1)
    2.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.score import DiffusionScore

#: a data-LID neighbourhood reaches at least this many noise stds (a uniform spread of radius 6τ
#: has variance ≥ 9τ²: each of its directions counts ≥ 0.9)
REACH = 6.0
#: and holds at most this many times ``neighbours`` points
MAX_NEIGHBOURS_FACTOR = 8
#: the local PCA of the data LID works on neighbourhoods of at most this many bytes at once (their
#: float64 copy, its centred twin and the SVD's workspace): its memory no longer grows with the anchors
LOCAL_PCA_BYTES = 64 * 2**20

__all__ = [
    "LidReading",
    "baseline_of",
    "clamp_dimension",
    "data_lid",
    "denoising_lid",
    "drawdown",
    "local_variances",
    "possible",
    "profile",
    "relative",
    "soft_count",
    "statistics",
]


@dataclass(frozen=True)
class LidReading:
    """The LID signal at one check, for every probe of every rank (in rank order, on the CPU).

    Attributes:
        data_lid: evaluation timestep -> the data's ``LID_τ`` there (dimensions; NaN when it
            could not be estimated).
        flipd: timestep -> ``[P]`` the probes' FLIPD, clamped into ``[0, d]`` (:func:`clamp_dimension`).
        denoising_lid: timestep -> ``[P]`` the probes' denoising LID, clamped alike (empty with
            ``lid.draws=0``).
        statistics: name of :data:`memwatch.signals.options.STATISTICS` -> ``[P]`` ratio (NaN where not measured).
        memorized: ``[P]`` bool, ``lid.statistic < lid.ratio_threshold``.
        clamped: ``[P]`` bool, probes whose FLIPD or denoising LID at the primary level lay
            outside ``[0, d]`` before clamping.
    """

    data_lid: dict[float, float]
    flipd: dict[float, Tensor]
    denoising_lid: dict[float, Tensor] = field(default_factory=dict)
    statistics: dict[str, Tensor] = field(default_factory=dict)
    memorized: Tensor | None = None
    clamped: Tensor | None = None


def local_variances(samples: Tensor, anchors: Tensor, k: int) -> Tensor:
    """Local PCA: the covariance eigenvalues of each anchor's ``k`` nearest samples (itself included).

    Args:
        samples: ``[m, D]`` float64 distinct samples (flattened).
        anchors: ``[a, k_max]`` each anchor's sample indices by distance, nearest first (``k ≤ k_max``).
        k: points per neighbourhood, ``>= 2``.

    Returns:
        ``[a, min(k, D)]`` float64 variances (data units squared), descending.
    """
    hood = samples[anchors[:, :k]]  # [a, k, D]
    centred = hood - hood.mean(1, keepdim=True)
    return torch.linalg.svdvals(centred).square() / (k - 1)


def soft_count(variances: Tensor, scale: Tensor) -> Tensor:
    """``Σ_i s_i / (s_i + τ²)`` for variances ``[..., r]`` and scales ``τ`` ``[L]``: ``[..., L]`` float64."""
    s = variances.to(torch.float64).unsqueeze(-1)
    tau2 = scale.to(torch.float64).square()
    return (s / (s + tau2)).sum(-2)


def data_lid(
    samples: Tensor,
    scale: Tensor,
    *,
    neighbours: int = 32,
    anchors: int = 256,
    reach: float = REACH,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The data's ``LID_τ`` at each scale: the median over anchor points of the :func:`soft_count`
    of their neighbourhood's local PCA (:func:`local_variances`).

    A neighbourhood holds the ``neighbours`` nearest samples, or every sample within
    ``reach · τ`` when there are more (at most ``MAX_NEIGHBOURS_FACTOR × neighbours``): a
    direction counts fully only if the neighbourhood spreads well beyond the noise in it, so a
    level far above the samples' spacing (a clamped one) still sees the data's extent. The
    neighbourhoods are decomposed a chunk of anchors at a time (``LOCAL_PCA_BYTES``): memory
    ``O(m · D)`` for the samples plus a fixed bound, whatever ``anchors`` and the reach.

    Args:
        samples: ``[m, *shape]`` distinct training samples (e.g. the calibration reservoir), in
            the probes' space.
        scale: ``[L]`` noise std in data units, ``τ = σ_t / α_t``.
        neighbours: the fewest points per neighbourhood (fewer when ``m`` is smaller), ``>= 2``.
        anchors: at most this many anchor points, a random subset when ``m`` is larger.
        reach: neighbourhood radius at least ``reach · τ``.
        generator: source of the anchor subset.

    Returns:
        ``[L]`` float64, in dimensions (``0 ≤ LID_τ ≤ min(k, d)``).

    Raises:
        MemwatchError: fewer than two samples, or ``neighbours < 2``.
    """
    if neighbours < 2:
        raise MemwatchError(f"`neighbours` must be >= 2, got {neighbours}")
    x = samples.detach().reshape(samples.shape[0], -1).to("cpu", torch.float64)
    m = x.shape[0]
    if m < 2:
        raise MemwatchError(f"local PCA needs at least two distinct samples, got {m}")
    pick = torch.randperm(m, generator=generator)[:anchors] if m > anchors else torch.arange(m)
    k_min, k_max = min(neighbours, m), min(MAX_NEIGHBOURS_FACTOR * neighbours, m)
    dist, order = torch.cdist(x[pick], x).topk(k_max, dim=1, largest=False)  # [a, k_max], the anchor first
    scale = scale.to(torch.float64).reshape(-1)
    out = torch.empty(scale.shape[0], dtype=torch.float64)
    for level, tau in enumerate(scale):
        k = (dist <= reach * tau).sum(1).clamp(k_min, k_max)  # [a] points per neighbourhood at this level
        counts = torch.empty(len(pick), dtype=torch.float64)
        for size in k.unique().tolist():
            rows = (k == size).nonzero().squeeze(1)
            # a neighbourhood [size, D] is copied and centred in float64: bounded, not anchors × size × D at once
            per_chunk = max(1, LOCAL_PCA_BYTES // (3 * int(size) * x.shape[1] * 8))
            for chunk in rows.split(per_chunk):
                counts[chunk] = soft_count(local_variances(x, order[chunk], int(size)), tau.reshape(1))[:, 0]
        out[level] = counts.median()
    return out


@torch.no_grad()
def denoising_lid(
    score: DiffusionScore, x0: Tensor, t: float, noise: Tensor, *, max_batch: int | None = None
) -> Tensor:
    """The model's ``LID_τ`` at clean points from forward passes: ``E_ε ‖ε + σ_t s(α_t x₀ + σ_t ε, t)‖²``.

    For the exact score of locally Gaussian data this is ``Σ s_i/(s_i+τ²)`` in expectation over
    the data (the data's own ``LID_τ``, :func:`soft_count`), and 0 at a point the model has
    memorized exactly (it denoises every ``ε`` back to ``x₀``).

    Args:
        score: the model's score (eval mode).
        x0: ``[n, *shape]`` clean points (the probes' final samples).
        t: the timestep.
        noise: ``[draws, n, *shape]`` standard normal draws (the same at every check for a
            probe's history; the standard error falls as ``1/√draws``).
        max_batch: rows per model call (default: ``draws · n`` at once).

    Returns:
        ``[n]`` float64 on the CPU, in dimensions.

    Raises:
        MemwatchError: ``noise`` is not ``[draws, *x0.shape]``.
    """
    if noise.dim() != x0.dim() + 1 or noise.shape[1:] != x0.shape or noise.shape[0] < 1:
        raise MemwatchError(f"`noise` must be [draws, {', '.join(map(str, x0.shape))}], got {tuple(noise.shape)}")
    sched = score.schedule
    alpha, sigma = float(sched.alpha(t)), float(sched.sigma(t))
    eps = noise.to(x0.device, x0.dtype)
    xt = (alpha * x0.unsqueeze(0) + sigma * eps).flatten(0, 1)  # [draws·n, *shape]
    rows = max_batch or xt.shape[0]
    s = torch.cat([score(xt[i : i + rows], t) for i in range(0, xt.shape[0], rows)])
    resid = eps.flatten(0, 1) + sigma * s.reshape(xt.shape)
    return resid.double().flatten(1).square().sum(1).reshape(noise.shape[0], -1).mean(0).cpu()


def clamp_dimension(lid: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """A dimension estimate held to what a dimension can be: ``lid`` ``[...]`` clamped into
    ``[0, dim]``, and ``[...]`` bool, True where it lay outside (NaN stays NaN, unflagged).

    Estimates leave the range by their noise (a Hutchinson trace of a few vectors: FLIPD
    ``d + σ_t² tr H`` below 0 when the model contracts faster than the noise level, above ``d``
    when it expands) or by a model that is far from a density's score; a count outside
    ``[0, d]`` is never logged, the flags are counted instead (``lid/clamped_count``).

    Example:
        >>> clamp_dimension(torch.tensor([-1.03, 2.0, 70.0, float("nan")]), 64)
        (tensor([ 0.,  2., 64., nan]), tensor([ True, False,  True, False]))
    """
    return lid.clamp(0, dim), (lid < 0) | (lid > dim)


#: a FLIPD below ``-(IMPOSSIBLE_SHARE · d + 1)`` (beyond three standard errors) is impossible: a
#: learned score may be sharper than the exact one at a copy (σ_t² λ a little below -1 in every
#: direction gives a FLIPD a little below 0), never by a quarter of the dimensions
IMPOSSIBLE_SHARE = 0.25


def possible(lid: Tensor, dim: int, stderr: Tensor | None = None) -> Tensor:
    """FLIPD values ``lid`` ``[...]`` with those no score can give made NaN: below 0 by more than
    ``IMPOSSIBLE_SHARE · dim + 1`` dimensions plus three standard errors (``stderr`` ``[...]``, the
    estimator's; ``None``: 0, an exact value; NaN: unknown, the value is kept).

    For the exact score ``d + σ_t² tr H = (α_t²/σ_t²) tr Cov[x₀ | x_t] >= 0``, so a value far below
    0 is not a dimension: a score of the wrong prediction type or schedule gives such values. Above
    ``d`` it is possible (a point between modes, whose posterior spreads over both), so it is kept.

    Example:
        >>> possible(torch.tensor([-82.6, -10.0, 30.0, 90.0]), 64)
        tensor([ nan, -10.,  30.,  90.])
    """
    err = torch.zeros_like(lid) if stderr is None else stderr.to(lid)
    floor = -(IMPOSSIBLE_SHARE * dim + 1 + 3 * err)
    return torch.where(~(lid < floor), lid, math.nan)  # NaN floor (unknown noise): kept


def relative(lid: Tensor, reference: Tensor | float) -> Tensor:
    """``lid / reference``, NaN where the reference is not positive and finite (no silent zero division)."""
    ref = torch.as_tensor(reference, dtype=torch.float64)
    ok = torch.isfinite(ref) & (ref > 0)
    return torch.where(ok, lid.to(torch.float64) / torch.where(ok, ref, torch.ones_like(ref)), math.nan)


def drawdown(lid: Tensor, baseline: Tensor) -> Tensor:
    """A probe's LID against its own early checks: ``lid / baseline`` per probe (``[P]`` each;
    NaN where the baseline is not positive). The probes are the same at every check, so each has
    a history; ``baseline`` is, e.g., the median of its first checks (:func:`baseline_of`)."""
    return relative(lid, baseline)


def baseline_of(history: Sequence[Tensor]) -> Tensor:
    """``[P]`` the per-probe median over the checks ``history`` (each ``[P]``), ignoring NaN."""
    return torch.stack([h.to(torch.float64) for h in history]).nanmedian(0).values


def statistics(
    flipd: Mapping[float, Tensor],
    reference: Mapping[float, float],
    baseline: Tensor,
    *,
    denoising: Mapping[float, Tensor] | None = None,
    count: Tensor | None = None,
) -> dict[str, Tensor]:
    """The LID signal's per-probe statistics (:data:`memwatch.signals.options.STATISTICS`), elementwise
    over probes (any shape ``[...]``, e.g. ``[P]`` at a check or ``[C, P]`` over a run).

    Args:
        flipd: level -> the probes' FLIPD ``[...]``, the primary level first.
        reference: level -> the data's LID there (dimensions).
        baseline: ``[...]`` the probes' own early FLIPD at the primary level (:func:`baseline_of`).
        denoising: level -> the probes' denoising LID ``[...]`` (``None``: not measured, NaN).
        count: ``[...]`` the probes' LID at the primary level (``None``: NaN).

    Returns:
        ``{"relative", "profile", "drawdown", "denoising", "count"}`` -> ``[...]`` float64.
    """
    primary = next(iter(flipd))
    nan = torch.full_like(flipd[primary], math.nan, dtype=torch.float64)
    return {
        "relative": relative(flipd[primary], reference[primary]),
        "profile": profile([relative(v, reference[t]) for t, v in flipd.items()]),
        "drawdown": drawdown(flipd[primary], baseline),
        "denoising": relative(denoising[primary], reference[primary]) if denoising else nan,
        "count": nan if count is None else count.to(torch.float64),
    }


def profile(ratios: Sequence[Tensor]) -> Tensor:
    """The multi-scale profile of relative LIDs ``[P]`` at several noise levels, as one value per
    probe: their mean (NaN levels ignored; NaN when none is finite)."""
    stacked = torch.stack([r.to(torch.float64) for r in ratios])
    return stacked.nanmean(0)
