"""The learned score ∇ₓ log p_t(x) of a diffusion model, whatever it was trained to predict.

With ``x_t = α_t x_0 + σ_t ε`` (see :mod:`memwatch.schedules`) a network's output converts to
the noise estimate ε̂ and then to the score ``s = -ε̂ / σ_t``:

==================  =============================================  ==========================
``prediction``      network output                                 ε̂
==================  =============================================  ==========================
``"epsilon"``       ε̂                                              ε̂
``"v_prediction"``  v̂ = α_t ε - σ_t x_0                            (α_t v̂ + σ_t x) / (α_t² + σ_t²)
``"sample"``        x̂_0                                            (x - α_t x̂_0) / σ_t
``"score"``         ŝ ≈ ∇ log p_t                                  -σ_t ŝ
==================  =============================================  ==========================

Conditional models take a condition as third argument (or as a keyword, ``cond_kwarg``); with a
``null_cond`` (the "empty prompt" / dropped label of classifier-free guidance) and a guidance
scale ``w`` the guided score is ``s_uc + w (s_c - s_uc)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule

__all__ = ["DiffusionScore", "PREDICTION_TYPES", "broadcast_condition"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score")


class DiffusionScore:
    """Callable ``(x, t[, cond]) -> ∇ₓ log p_t(x)`` around a diffusion network.

    Args:
        model: network called as ``model(x, t)`` or ``model(x, t, cond)``; it may return a tensor
            shaped like ``x``, a tuple whose first item is one, or an object with ``.sample``
            (diffusers).
        schedule: the noise schedule the model was trained with.
        prediction: what the network predicts, one of ``PREDICTION_TYPES``.
        null_cond: condition that means "unconditional" for a classifier-free-guidance model
            (e.g. the null class label). When set, ``cond=None`` calls pass it to the model.
        guidance_scale: ``w`` of classifier-free guidance for conditional calls; ``None`` or 1
            gives the plain conditional score.
        cond_kwarg: pass the condition as this keyword (e.g. ``"class_labels"`` for a diffusers
            ``UNet2DModel``) instead of as the third positional argument.
        time_fn: maps the schedule's timesteps ``[n]`` to what the network takes as time input
            (default: integer steps for discrete schedules, the float ``t`` otherwise).

    Raises:
        ValueError: unknown ``prediction``; non-positive ``guidance_scale``.

    Example:
        >>> sched = NoiseSchedule.linear(1000)
        >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), sched, prediction="epsilon")
        >>> score(torch.randn(4, 2), 10).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        *,
        null_cond: Tensor | None = None,
        guidance_scale: float | None = None,
        cond_kwarg: str | None = None,
        time_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if prediction not in PREDICTION_TYPES:
            raise MemwatchError(f"`prediction` must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise MemwatchError(f"`schedule` must be a memwatch.NoiseSchedule, got {type(schedule).__name__}")
        if guidance_scale is not None and not guidance_scale > 0:
            raise MemwatchError(f"`guidance_scale` must be positive, got {guidance_scale}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.null_cond = null_cond
        self.guidance_scale = guidance_scale
        self.cond_kwarg = cond_kwarg
        self.time_fn = time_fn

    # ------------------------------------------------------------------ public
    def __call__(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None = None) -> Tensor:
        """∇ₓ log p_t(x) at ``x`` ``[n, *shape]``, ``t`` scalar or ``[n]``; guided if ``cond`` given."""
        if cond is None:
            return self.unconditional(x, t)
        s_c = self.conditional(x, t, cond)
        w = self.guidance_scale
        if w is None or w == 1.0:
            return s_c
        s_uc = self.unconditional(x, t)
        return s_uc + w * (s_c - s_uc)

    def conditional(self, x: Tensor, t: Tensor | int | float, cond: Tensor) -> Tensor:
        """Conditional score ``s_c = ∇ log p_t(x | c)`` ``[n, *shape]``."""
        return self._score(x, t, broadcast_condition(cond, x.shape[0], "cond"))

    def unconditional(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """Unconditional score ``s_uc`` (the model with ``null_cond`` if one is set) ``[n, *shape]``."""
        cond = None if self.null_cond is None else broadcast_condition(self.null_cond, x.shape[0], "null_cond")
        return self._score(x, t, cond)

    def score_difference(self, x: Tensor, t: Tensor | int | float, cond: Tensor) -> Tensor:
        """``s_Δ = s_c - s_uc`` ``[n, *shape]``, Wen et al.'s memorization signal is its norm."""
        return self.conditional(x, t, cond) - self.unconditional(x, t)

    def with_model(self, model: nn.Module | Callable[..., Any]) -> DiffusionScore:
        """The same score around another network (e.g. an EMA copy of the weights)."""
        return DiffusionScore(
            model,
            self.schedule,
            self.prediction,
            null_cond=self.null_cond,
            guidance_scale=self.guidance_scale,
            cond_kwarg=self.cond_kwarg,
            time_fn=self.time_fn,
        )

    def timesteps(self, t: Tensor | int | float, n: int, device: torch.device | None = None) -> Tensor:
        """Checked timesteps broadcast to ``[n]`` (long for discrete schedules, float64 otherwise)."""
        tt = self.schedule.check_t(t).to(device)
        if tt.ndim == 0:
            tt = tt.expand(n)
        if tt.shape != (n,):
            raise MemwatchError(f"`t` must be a scalar or have shape ({n},) to match x, got {tuple(tt.shape)}")
        return tt.long() if self.schedule.is_discrete else tt.to(torch.float64)

    @property
    def device(self) -> torch.device:
        """Device of the network's first parameter (the CPU for a parameter-free callable)."""
        params = getattr(self.model, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return torch.device("cpu")

    def sigma(self, t: Tensor) -> Tensor:
        """``σ_t`` ``[n]`` (float64) of the schedule."""
        return self.schedule.sigma(t)

    # ----------------------------------------------------------------- private
    def _score(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None) -> Tensor:
        n = x.shape[0]
        tt = self.timesteps(t, n, x.device)
        out = self._call_model(x, tt, cond)
        if out.shape != x.shape:
            raise MemwatchError(
                f"the model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                "a diffusion network must return a tensor shaped like its input"
            )
        shape = (n,) + (1,) * (x.ndim - 1)
        alpha = self.schedule.alpha(tt).to(x.device, x.dtype).reshape(shape)
        sigma = self.schedule.sigma(tt).to(x.device, x.dtype).reshape(shape)
        if self.prediction == "score":
            return out
        if self.prediction == "epsilon":
            eps = out
        elif self.prediction == "v_prediction":
            eps = (alpha * out + sigma * x) / (alpha**2 + sigma**2)
        else:  # "sample"
            eps = (x - alpha * out) / sigma
        return -eps / sigma

    def _call_model(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if self.time_fn is not None:
            t_in = self.time_fn(t)
        elif self.schedule.is_discrete:
            t_in = t
        else:
            t_in = t.to(x.dtype)
        if cond is None:
            out = self.model(x, t_in)
        elif self.cond_kwarg is not None:
            out = self.model(x, t_in, **{self.cond_kwarg: cond})
        else:
            out = self.model(x, t_in, cond)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor):
            raise MemwatchError(f"the model must return a tensor (or .sample / a tuple), got {type(out).__name__}")
        return out


def broadcast_condition(cond: object, n: int, name: str = "cond") -> Tensor:
    """``cond`` as a tensor with batch size ``n`` (``[n, ...]``, a view where possible).

    Accepts an ``int`` (one class label for every sample), a 0-d tensor (the same), a ``[1, ...]``
    tensor (one condition with a leading batch axis of 1, e.g. a prompt embedding ``[1, L, E]``)
    or an ``[n, ...]`` tensor (one condition per sample).

    Raises:
        MemwatchError: ``cond`` is neither an int nor a tensor (bools and floats are rejected), or
            its first dimension is neither 1 nor ``n``; the message names ``name``.

    Example:
        >>> broadcast_condition(3, 4).shape
        torch.Size([4])
        >>> broadcast_condition(torch.zeros(1, 7, 16), 4).shape
        torch.Size([4, 7, 16])
    """
    if isinstance(cond, bool) or not isinstance(cond, (int, Tensor)):
        raise MemwatchError(
            f"`{name}` must be a torch.Tensor (one condition, or one per sample) or an int class label, "
            f"got {type(cond).__name__}"
        )
    if isinstance(cond, int):
        cond = torch.tensor(cond)
    if cond.ndim == 0:
        return cond.expand(n)
    if cond.shape[0] == n:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    raise MemwatchError(
        f"`{name}` must be an int, a 0-d tensor, or a tensor with batch size 1 or {n} (the number of "
        f"samples), got shape {tuple(cond.shape)}"
    )
