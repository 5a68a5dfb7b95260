"""Embedded data sets (no downloads) and an analytic Gaussian mixture for ground truth.

* :func:`digits` — sklearn's 8×8 handwritten digits (1797 images) as ``[N, 1, 8, 8]`` in [-1, 1]
  (or upsampled).
* :func:`manifold` — swiss roll / S-curve / moons embedded in ``R^dim`` by a random orthogonal map.
* :class:`GaussianMixture` — isotropic mixture whose diffused score and Hessian are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.validation import check_int

__all__ = ["digits", "manifold", "GaussianMixture", "MANIFOLDS"]

MANIFOLDS = ("swiss_roll", "s_curve", "moons")


def digits(
    n: int | None = None, *, seed: int = 0, labels: bool = False, image_size: int = 8
) -> Tensor | tuple[Tensor, Tensor]:
    """``n`` sklearn digits ``[n, 1, s, s]`` float32 in [-1, 1] (a seeded random subset; all if ``None``).

    ``image_size`` ``s``: 8 is the original; a larger side is a bilinear upsampling clamped to
    [-1, 1] (e.g. 16 for a UNet that halves the resolution twice). The subset depends on ``n``
    and ``seed`` only, not on the size. With ``labels=True`` returns ``(images, labels [n] long)``.
    """
    from sklearn.datasets import load_digits

    check_int("image_size", image_size, 8)

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 8.0 - 1.0
    targets = torch.as_tensor(bunch.target, dtype=torch.long)
    if n is not None:
        if not 1 <= n <= len(images):
            raise MemwatchError(f"`n` must be in [1, {len(images)}], got {n}")
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, targets = images[idx], targets[idx]
    images = images[:, None]
    if image_size != 8:
        size = (image_size, image_size)
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        images = images.clamp(-1.0, 1.0)
    return (images, targets) if labels else images


def manifold(name: str, n: int, dim: int = 16, *, seed: int = 0, noise: float = 0.0) -> Tensor:
    """``n`` points ``[n, dim]`` of a low-dimensional sklearn manifold, standardized and embedded
    in ``R^dim`` by a random orthogonal map (intrinsic dimension 2 for swiss roll / S-curve, 1 for moons)."""
    from sklearn import datasets

    if name not in MANIFOLDS:
        raise MemwatchError(f"`name` must be one of {MANIFOLDS}, got {name!r}")
    if name == "moons":
        pts, _ = datasets.make_moons(n, noise=noise, random_state=seed)
    else:
        maker = datasets.make_swiss_roll if name == "swiss_roll" else datasets.make_s_curve
        pts, _ = maker(n, noise=noise, random_state=seed)
    pts_t = torch.as_tensor(pts, dtype=torch.float32)
    pts_t = (pts_t - pts_t.mean(0)) / pts_t.std(0).clamp_min(1e-6)
    if dim < pts_t.shape[1]:
        raise MemwatchError(f"`dim` must be >= {pts_t.shape[1]} for {name}, got {dim}")
    g = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return pts_t @ q[: pts_t.shape[1]]


@dataclass(frozen=True)
class GaussianMixture:
    """``p_0 = Σ_i π_i N(μ_i, s_i² I)``; diffused, ``p_t = Σ_i π_i N(α_t μ_i, v_i I)``, ``v_i = α_t² s_i² + σ_t²``.

    Attributes:
        means: ``[K, D]``; stds: ``[K]`` (0 = a point mass, i.e. a memorized training point);
        weights: ``[K]`` summing to 1. All float64.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    @classmethod
    def isotropic(cls, means: Tensor, std: float = 0.0, weights: Tensor | None = None) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        return cls(means=means, stds=torch.full((k,), float(std), dtype=torch.float64), weights=w / w.sum())

    def _posterior(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities ``r [n, K]``, variances ``v [n, K]`` and ``g_i = -(x - α μ_i)/v_i`` ``[n, K, D]``."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        v = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]
        d = x.shape[1]
        logp = self.weights.log()[None] - 0.5 * (diff**2).sum(-1) / v - 0.5 * d * v.log()
        return logp.softmax(-1), v, -diff / v[..., None]

    def score(self, x: Tensor, t: Tensor | int | float, schedule: NoiseSchedule) -> Tensor:
        """Exact ``∇ log p_t(x)``, shaped like ``x`` (float64)."""
        alpha, sigma = _alpha_sigma(schedule, t, x.shape[0])
        r, _, g = self._posterior(x, alpha, sigma)
        return (r[..., None] * g).sum(1).reshape(x.shape)

    def hessian(self, x: Tensor, t: Tensor | int | float, schedule: NoiseSchedule) -> Tensor:
        """Exact ``∇² log p_t(x)`` ``[n, D, D]``: ``Σ r_i(-I/v_i + g_i g_iᵀ) - ḡ ḡᵀ``, ``ḡ = Σ r_i g_i``."""
        alpha, sigma = _alpha_sigma(schedule, t, x.shape[0])
        r, v, g = self._posterior(x, alpha, sigma)
        eye = torch.eye(g.shape[-1], dtype=torch.float64)
        gbar = (r[..., None] * g).sum(1)
        second = torch.einsum("nk,nki,nkj->nij", r, g, g) - torch.einsum("ni,nj->nij", gbar, gbar)
        return -(r / v).sum(1)[:, None, None] * eye + second

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, D]`` of ``p_0`` (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * eps

    def as_model(self, schedule: NoiseSchedule, prediction: str = "epsilon"):
        """A network-like callable ``(x, t) -> prediction`` that is exactly this mixture's denoiser."""
        return _AnalyticModel(self, schedule, prediction)


class _AnalyticModel(torch.nn.Module):
    """The mixture's exact ε / v / x₀ / score / flow-velocity prediction, in the dtype of ``x``."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule, prediction: str) -> None:
        super().__init__()
        self.gmm, self.schedule, self.prediction = gmm, schedule, prediction

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        score = self.gmm.score(x, t, self.schedule)
        alpha, sigma = _alpha_sigma(self.schedule, t, x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
        xd = x.to(torch.float64)
        eps = -sigma * score
        x0 = (xd - sigma * eps) / alpha
        out = {
            "score": score,
            "epsilon": eps,
            "sample": x0,
            "v_prediction": alpha * eps - sigma * x0,
            "flow_prediction": eps - x0,
        }[self.prediction]
        return out.to(x.dtype)


def _alpha_sigma(schedule: NoiseSchedule, t: Tensor | int | float, n: int) -> tuple[Tensor, Tensor]:
    tt = torch.as_tensor(t)
    tt = tt.expand(n) if tt.ndim == 0 else tt
    return schedule.alpha(tt).to(torch.float64), schedule.sigma(tt).to(torch.float64)
