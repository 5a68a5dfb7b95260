"""The held-out/train gap of the denoising loss: the baseline a careful user already watches.

A model that starts to copy its training set fits it better than fresh samples of the same
distribution, so its denoising loss on held-out samples pulls away from its loss on training
samples (Favero et al. 2025 report that memorization onset coincides with that divergence). To
see the gap through the noise of a loss estimate, :class:`LossGap` fixes everything but the
weights: the samples, the timesteps and the noise of each sample at each timestep are drawn
once, and every evaluation reuses them.

The loss is the ε-objective in any parameterization: with ``x_t = α_t x + σ_t ε`` and the
score ``s = DiffusionScore(x_t, t)``, the predicted noise is ``ε̂ = −σ_t s``, so
``L(t) = mean ‖ε̂ − ε‖² / d`` (per dimension) is the same number for an ε-, v-, x₀- or score
network with the same learned score. The gap is ``(L_held − L_train) / L_train`` of the losses
averaged over the timesteps: 0 when the model treats both alike, growing as it memorizes.

Example:
    >>> from memwatch.schedules import NoiseSchedule
    >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), NoiseSchedule.linear(1000))  # ε̂ = 0
    >>> probe = LossGap(torch.randn(4096, 2), torch.randn(4096, 2), timesteps=(100, 500), size=4096, seed=0)
    >>> train, held = probe.losses(score)  # E ‖ε‖² / d = 1 for an ε̂ of 0, within 2 % over 8192 terms
    >>> [round(float(v), 1) for v in (*train, *held)]
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.operators import map_chunks
from memwatch.score import DiffusionScore
from memwatch.validation import check_int

__all__ = ["LossGap", "relative_gap"]


class LossGap:
    """The denoising loss at fixed timesteps and noises on training and held-out samples.

    Args:
        train: ``[N, *shape]`` training samples (at most ``size`` of them are used, a seeded
            random subset).
        held: ``[M, *shape]`` samples of the same distribution the model never trains on (the
            first ``size`` are used).
        timesteps: the ``K`` timesteps (schedule units) the loss is evaluated at.
        size: most samples per side, ``>= 1``.
        seed: seed of the subset and of the fixed noises.

    Memory: the samples and ``K`` noises per sample, ``(K + 1) × (n_train + n_held) × d``
    float32 on the CPU.

    Raises:
        MemwatchError: empty or non-finite samples, shapes that differ, no timestep, or a bad ``size``.
    """

    def __init__(
        self, train: Tensor, held: Tensor, *, timesteps: Sequence[float], size: int = 256, seed: int = 0
    ) -> None:
        check_int("size", size, 1)
        for name, x in (("train", train), ("held", held)):
            if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
                raise MemwatchError(
                    f"`{name}` must be a finite tensor [n >= 1, *shape], got {tuple(getattr(x, 'shape', ()))}"
                )
        if train.shape[1:] != held.shape[1:]:
            raise MemwatchError(
                f"`held` samples must have the shape of `train` samples, {tuple(train.shape[1:])}, "
                f"got {tuple(held.shape[1:])}"
            )
        if len(timesteps) == 0:
            raise MemwatchError("`timesteps` must hold at least one timestep")
        g = torch.Generator().manual_seed(seed)
        self.timesteps = tuple(float(t) for t in timesteps)
        self.train = train.detach().cpu().float()[torch.randperm(train.shape[0], generator=g)[:size]]
        self.held = held.detach().cpu().float()[:size]
        k = len(self.timesteps)
        self._noise = {
            "train": torch.randn((k, *self.train.shape), generator=g),
            "held": torch.randn((k, *self.held.shape), generator=g),
        }

    @torch.no_grad()
    def losses(
        self, score: DiffusionScore, *, device: torch.device | str | None = None, max_batch: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(L_train [K], L_held [K])`` float64: the per-dimension ε-loss at each timestep.

        Args:
            score: the model's score (unconditional: a conditional model is evaluated with its
                ``null_cond``).
            device: where the model is evaluated (default: the score's device).
            max_batch: most rows per model call.
        """
        device = score.device if device is None else torch.device(device)
        return self._side(score, self.train, self._noise["train"], device, max_batch), self._side(
            score, self.held, self._noise["held"], device, max_batch
        )

    def _side(
        self, score: DiffusionScore, x: Tensor, noise: Tensor, device: torch.device, max_batch: int | None
    ) -> Tensor:
        out = []
        for t, eps in zip(self.timesteps, noise):
            tt = score.timesteps(t, x.shape[0], device)
            shape = (-1,) + (1,) * (x.ndim - 1)
            alpha = score.schedule.alpha(tt).to(device, torch.float32).reshape(shape)
            sigma = score.schedule.sigma(tt).to(device, torch.float32).reshape(shape)
            x0, e = x.to(device), eps.to(device)
            xt = alpha * x0 + sigma * e

            def rows(r: slice, xt: Tensor = xt, sigma: Tensor = sigma, t: float = t) -> tuple[Tensor]:
                return (-sigma[r] * score(xt[r], t),)

            (eps_hat,) = map_chunks(rows, x.shape[0], max_batch)
            out.append(((eps_hat - e) ** 2).double().mean())
        return torch.stack(out).cpu()


def relative_gap(loss_train: Tensor, loss_held: Tensor) -> float:
    """``(mean L_held − mean L_train) / mean L_train`` over the timesteps (NaN if not finite).

    Example:
        >>> relative_gap(torch.tensor([1.0, 1.0]), torch.tensor([1.5, 1.5]))
        0.5
    """
    train, held = float(loss_train.double().mean()), float(loss_held.double().mean())
    return (held - train) / train if train > 0 else float("nan")
