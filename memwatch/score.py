"""The learned score ∇ₓ log p_t(x) of a diffusion model, whatever it was trained to predict.

With ``x_t = α_t x_0 + σ_t ε`` (see :mod:`memwatch.schedules`) a network's output converts to
the noise estimate ε̂ and then to the score ``s = -ε̂ / σ_t``:

=====================  ==========================  ==================================  ================================
``prediction``         network output              ε̂                                   x̂_0
=====================  ==========================  ==================================  ================================
``"epsilon"``          ε̂                           ε̂                                   (x - σ_t ε̂) / α_t
``"v_prediction"``     v̂ = α_t ε - σ_t x_0         (α_t v̂ + σ_t x) / (α_t² + σ_t²)     (α_t x - σ_t v̂) / (α_t² + σ_t²)
``"sample"``           x̂_0                         (x - α_t x̂_0) / σ_t                 x̂_0
``"score"``            ŝ ≈ ∇ log p_t               -σ_t ŝ                              (x + σ_t² ŝ) / α_t
``"flow_prediction"``  û = ε - x_0                 (x + α_t û) / (α_t + σ_t)           (x - σ_t û) / (α_t + σ_t)
=====================  ==========================  ==================================  ================================

``"flow_prediction"`` is diffusers' name for the velocity of flow matching (rectified flow,
``x_t = (1 - σ_t) x_0 + σ_t ε``; the SD3 / Flux training scripts' target ``noise - model_input``);
with ``α_t + σ_t = 1`` its x̂_0 is ``x - σ_t û``. It is accepted on a flow schedule only, and
``"v_prediction"`` (the VP velocity, a different quantity) is refused there: the two are the
plausible mix-up, and each is wrong on the other's schedule.

Conditional models take a condition as third argument (or as a keyword, ``cond_kwarg``); with a
``null_cond`` (the "empty prompt" / dropped label of classifier-free guidance) and a guidance
scale ``w`` the guided score is ``s_uc + w (s_c - s_uc)``.

Condition shapes. ``null_cond`` is *one* condition without a batch axis: a 0-d class label, or a
prompt embedding ``[L, E]`` (``L`` tokens of width ``E``, e.g. ``encoder_hidden_states`` of a
diffusers ``UNet2DConditionModel``). Its shape is the per-condition shape ``cond_shape``, and a
``cond`` passed to :meth:`DiffusionScore.conditional` / ``__call__`` is then either one condition
of that shape (used for every sample), or a batch ``[1, *cond_shape]`` / ``[n, *cond_shape]``;
anything else is an error that names the shapes. Without ``null_cond`` nothing fixes the
per-condition shape and :func:`broadcast_condition`'s rules apply (an int or 0-d label, a
``[1, ...]`` or an ``[n, ...]`` tensor).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule

__all__ = ["DiffusionScore", "PREDICTION_TYPES", "broadcast_condition", "device_of", "predictions_for"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score", "flow_prediction")


class DiffusionScore:
    """Callable ``(x, t[, cond]) -> ∇ₓ log p_t(x)`` around a diffusion network.

    Args:
        model: network called as ``model(x, t)`` or ``model(x, t, cond)``; it may return a tensor
            shaped like ``x``, a tuple whose first item is one, or an object with ``.sample``
            (diffusers).
        schedule: the noise schedule the model was trained with.
        prediction: what the network predicts, one of ``PREDICTION_TYPES``.
        null_cond: the one condition that means "unconditional" for a classifier-free-guidance
            model, without a batch axis: a 0-d label (or an int), e.g. the null class, or an
            embedding ``[L, E]``, e.g. the empty prompt's. ``cond=None`` calls pass it, broadcast
            to the batch, to the model; its shape is :attr:`cond_shape`, and its kind (integer or
            floating) is the kind every ``cond`` must have. Deprecated: the former batched form of
            an embedding, ``[1, L, E]`` (three or more axes with a leading 1), is still read as
            one condition with a batch axis, which is dropped, with a ``DeprecationWarning``; pass
            ``null_cond[0]`` instead. (While this reading lasts, a condition whose own shape is
            ``[1, A, B]`` cannot be a ``null_cond``.)
        guidance_scale: ``w`` of classifier-free guidance for conditional calls; ``None`` or 1
            gives the plain conditional score.
        cond_kwarg: pass the condition as this keyword (e.g. ``"class_labels"`` for a diffusers
            ``UNet2DModel``) instead of as the third positional argument.
        time_fn: maps the schedule's timesteps ``[n]`` to what the network takes as time input
            (default: integer steps for discrete schedules, the float ``t`` otherwise).

    Raises:
        MemwatchError: unknown ``prediction``; ``"flow_prediction"`` on a schedule that is not a
            flow, or ``"v_prediction"`` on a flow schedule; non-positive ``guidance_scale``; a ``null_cond``
            that is not an int / tensor, is boolean or complex, empty, or not finite.

    Example:
        >>> sched = NoiseSchedule.linear(1000)
        >>> score = DiffusionScore(lambda x, t: torch.zeros_like(x), sched, prediction="epsilon")
        >>> score(torch.randn(4, 2), 10).shape
        torch.Size([4, 2])
        >>> text = DiffusionScore(lambda x, t, c: x, sched, null_cond=torch.zeros(4, 16))
        >>> text.cond_shape, text.batch_condition(torch.randn(4, 16), 3).shape
        ((4, 16), torch.Size([3, 4, 16]))
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        *,
        null_cond: Tensor | int | None = None,
        guidance_scale: float | None = None,
        cond_kwarg: str | None = None,
        time_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if prediction not in PREDICTION_TYPES:
            raise MemwatchError(f"`prediction` must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if not isinstance(schedule, NoiseSchedule):
            raise MemwatchError(f"`schedule` must be a memwatch.NoiseSchedule, got {type(schedule).__name__}")
        _check_pair(prediction, schedule)
        if guidance_scale is not None and not guidance_scale > 0:
            raise MemwatchError(f"`guidance_scale` must be positive, got {guidance_scale}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.null_cond = None if null_cond is None else _check_null_cond(null_cond)
        self.guidance_scale = guidance_scale
        self.cond_kwarg = cond_kwarg
        self.time_fn = time_fn

    # ------------------------------------------------------------------ public
    def __call__(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None = None) -> Tensor:
        """∇ₓ log p_t(x) at ``x`` ``[n, *shape]``, ``t`` scalar or ``[n]``; guided if ``cond`` given."""
        return self._guided(self._score, x, t, cond)

    def velocity(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None = None) -> Tensor:
        """The flow-matching velocity ``û = ε̂ - x̂_0 = dx_t/dσ_t`` ``[n, *shape]`` of a flow schedule,
        from the network's own output (defined at σ_t = 1, where the score holds no x̂_0); guided as
        :meth:`__call__`. For ``"epsilon"`` and ``"score"`` networks x̂_0 divides by α_t, so
        ``t`` must have α_t > 0.

        Raises:
            MemwatchError: the schedule is not a flow.
        """
        if self.schedule.kind != "flow":
            raise MemwatchError(f"`velocity` needs a flow schedule, got a {self.schedule.kind} schedule")
        return self._guided(self._velocity, x, t, cond)

    def noise_estimates(self, x: Tensor, t: Tensor | int | float) -> dict[str, Tensor]:
        """ε̂ ``[n, *shape]`` of the unconditional network's output read as each prediction type
        the schedule admits (the configured one among them), from one forward pass: what
        :mod:`memwatch.consistency` compares."""
        out, alpha, sigma = self._output(x, t, self._null_batch(x))
        return {p: _eps(p, out, x, alpha, sigma) for p in predictions_for(self.schedule)}

    def conditional(self, x: Tensor, t: Tensor | int | float, cond: Tensor | int) -> Tensor:
        """Conditional score ``s_c = ∇ log p_t(x | c)`` ``[n, *shape]``; ``cond`` as in :meth:`batch_condition`."""
        return self._score(x, t, self.batch_condition(cond, x.shape[0], "cond"))

    def unconditional(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """Unconditional score ``s_uc`` (the model with ``null_cond`` if one is set) ``[n, *shape]``."""
        return self._score(x, t, self._null_batch(x))

    @property
    def cond_shape(self) -> tuple[int, ...] | None:
        """Shape of one condition, that of ``null_cond`` (``()`` for labels, ``(L, E)`` for
        embeddings); ``None`` without a ``null_cond``."""
        return None if self.null_cond is None else tuple(self.null_cond.shape)

    def batch_condition(self, cond: Tensor | int, n: int, name: str = "cond") -> Tensor:
        """``cond`` as a batch ``[n, *cond_shape]`` (a view where possible), checked against ``null_cond``.

        With a ``null_cond``: one condition of shape :attr:`cond_shape` (or an int for labels),
        or ``[1, *cond_shape]``, both used for all ``n`` samples, or ``[n, *cond_shape]``, one per
        sample; of ``null_cond``'s kind (integer / floating). Without: :func:`broadcast_condition`.

        Raises:
            MemwatchError: any other type, kind or shape; the message names ``name``, the shapes
                allowed and the shape received.
        """
        return broadcast_condition(cond, n, name, null_cond=self.null_cond)

    def score_difference(self, x: Tensor, t: Tensor | int | float, cond: Tensor) -> Tensor:
        """``s_Δ = s_c - s_uc`` ``[n, *shape]``, Wen et al.'s memorization signal is its norm."""
        return self.conditional(x, t, cond) - self.unconditional(x, t)

    def with_model(self, model: nn.Module | Callable[..., Any]) -> DiffusionScore:
        """The same score (subclass and settings) around another network (e.g. an EMA copy of the weights)."""
        other = copy.copy(self)
        other.model = model
        return other

    def with_schedule(self, schedule: NoiseSchedule, prediction: str) -> DiffusionScore:
        """The same network and settings read with another schedule and prediction type (the
        network's time input still ``time_fn`` of the new schedule's timesteps, or those timesteps).

        Raises:
            MemwatchError: a pair refused by definition (``"flow_prediction"`` off a flow schedule, ...).
        """
        _check_pair(prediction, schedule)
        other = copy.copy(self)
        other.schedule, other.prediction = schedule, prediction
        return other

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
        """Where the network runs (:func:`device_of`; the CPU for a parameter-free callable)."""
        return device_of(self.model)

    def sigma(self, t: Tensor) -> Tensor:
        """``σ_t`` ``[n]`` (float64) of the schedule."""
        return self.schedule.sigma(t)

    # ----------------------------------------------------------------- private
    def _guided(
        self,
        fn: Callable[[Tensor, Tensor | int | float, Tensor | None], Tensor],
        x: Tensor,
        t: Tensor | int | float,
        cond: Tensor | None,
    ) -> Tensor:
        """``fn`` (linear in the network's output) unconditional, conditional, or guided ``f_uc + w (f_c - f_uc)``."""
        if cond is None:
            return fn(x, t, self._null_batch(x))
        f_c = fn(x, t, self.batch_condition(cond, x.shape[0], "cond"))
        w = self.guidance_scale
        if w is None or w == 1.0:
            return f_c
        f_uc = fn(x, t, self._null_batch(x))
        return f_uc + w * (f_c - f_uc)

    def _null_batch(self, x: Tensor) -> Tensor | None:
        """``null_cond`` broadcast to ``x``'s batch on its device, or ``None`` without one."""
        if self.null_cond is None:
            return None
        null = self.null_cond if self.null_cond.device == x.device else self.null_cond.to(x.device)
        return null.expand(x.shape[0], *null.shape)

    def _output(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The network's output ``[n, *shape]`` and ``α_t``, ``σ_t`` shaped to broadcast against it."""
        n = x.shape[0]
        tt = self.timesteps(t, n, x.device)
        if cond is not None and cond.device != x.device:
            cond = cond.to(x.device)
        out = self._call_model(x, tt, cond)
        if out.shape != x.shape:
            raise MemwatchError(
                f"the model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}; "
                "a diffusion network must return a tensor shaped like its input"
            )
        shape = (n,) + (1,) * (x.ndim - 1)
        alpha = self.schedule.alpha(tt).to(x.device, x.dtype).reshape(shape)
        sigma = self.schedule.sigma(tt).to(x.device, x.dtype).reshape(shape)
        return out, alpha, sigma

    def _score(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None) -> Tensor:
        out, alpha, sigma = self._output(x, t, cond)
        if self.prediction == "score":
            return out
        return -_eps(self.prediction, out, x, alpha, sigma) / sigma

    def _velocity(self, x: Tensor, t: Tensor | int | float, cond: Tensor | None) -> Tensor:
        out, alpha, sigma = self._output(x, t, cond)
        if self.prediction == "flow_prediction":
            return out
        return _eps(self.prediction, out, x, alpha, sigma) - _x0(self.prediction, out, x, alpha, sigma)

    def _time_input(self, t: Tensor, x: Tensor) -> Tensor:
        """The network's time input for timesteps ``t`` ``[n]``: ``time_fn(t)``, else the integer
        steps of a discrete schedule, else ``t`` in ``x``'s dtype."""
        if self.time_fn is not None:
            return self.time_fn(t)
        return t if self.schedule.is_discrete else t.to(x.dtype)

    def _call_model(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        t_in = self._time_input(t, x)
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


def _eps(prediction: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ from the network's output (the module docstring's table)."""
    if prediction == "epsilon":
        return out
    if prediction == "v_prediction":
        return (alpha * out + sigma * x) / (alpha**2 + sigma**2)
    if prediction == "sample":
        return (x - alpha * out) / sigma
    if prediction == "score":
        return -sigma * out
    return (x + alpha * out) / (alpha + sigma)  # "flow_prediction"


def eps_offset(prediction: str, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The part of ε̂ that does not depend on the network: ε̂ = a·output + ``eps_offset`` (the
    module docstring's table at output 0), ``[n, *shape]`` like ``x``. ``ε - eps_offset`` is what
    the output, read as ``prediction``, has to explain.

    Example:
        >>> x = torch.ones(1, 2)
        >>> eps_offset("epsilon", x, 0.6, 0.8).tolist(), eps_offset("sample", x, 0.6, 0.8).tolist()
        ([[0.0, 0.0]], [[1.25, 1.25]])
    """
    return _eps(prediction, torch.zeros_like(x), x, alpha, sigma)


def _x0(prediction: str, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂_0 from the network's output (the module docstring's table)."""
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    if prediction == "v_prediction":
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
    if prediction == "sample":
        return out
    if prediction == "score":
        return (x + sigma**2 * out) / alpha
    return (x - sigma * out) / (alpha + sigma)  # "flow_prediction"


def device_of(model: object) -> torch.device:
    """Where a network or module runs: its own ``device`` (a LightningModule's, a diffusers
    model's), else the device of its first parameter (a plain ``nn.Module``), else the CPU (a
    parameter-free callable).

    Example:
        >>> device_of(nn.Linear(2, 2)), device_of(lambda x: x)
        (device(type='cpu'), device(type='cpu'))
    """
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def predictions_for(schedule: NoiseSchedule) -> tuple[str, ...]:
    """The prediction types ``schedule`` admits, in the order of ``PREDICTION_TYPES``.

    Example:
        >>> predictions_for(NoiseSchedule.flow())
        ('epsilon', 'sample', 'score', 'flow_prediction')
    """
    return tuple(p for p in PREDICTION_TYPES if _refusal(p, schedule) is None)


def _check_pair(prediction: str, schedule: NoiseSchedule) -> None:
    """Refuse the prediction × schedule pairs that are wrong by definition (see the module docstring)."""
    refusal = _refusal(prediction, schedule)
    if refusal is not None:
        raise MemwatchError(refusal)


def _refusal(prediction: str, schedule: NoiseSchedule) -> str | None:
    """Why ``prediction`` cannot be read on ``schedule`` (``None``: it can)."""
    if prediction == "flow_prediction" and schedule.kind != "flow":
        return (
            f"`prediction`='flow_prediction' (the flow-matching velocity ε - x_0) needs a flow schedule "
            f"(NoiseSchedule.flow() or NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler())), "
            f"got a {schedule.kind} schedule"
        )
    if prediction == "v_prediction" and schedule.kind == "flow":
        return (
            "`prediction`='v_prediction' (v = α_t ε - σ_t x_0 of a VP model) does not apply to a flow schedule; "
            "a flow-matching network's velocity ε - x_0 is `prediction`='flow_prediction'"
        )
    return None


def broadcast_condition(cond: object, n: int, name: str = "cond", *, null_cond: Tensor | None = None) -> Tensor:
    """``cond`` as a tensor with batch size ``n`` (``[n, ...]``, a view where possible).

    Without ``null_cond``: an ``int`` (one class label for every sample), a 0-d tensor (the same),
    a ``[1, ...]`` tensor (one condition with a leading batch axis of 1, e.g. a prompt embedding
    ``[1, L, E]``) or an ``[n, ...]`` tensor (one condition per sample). These rules guess: an
    ``[L, E]`` embedding with ``L == n`` reads as ``n`` conditions.

    With ``null_cond`` (one condition, no batch axis; see :class:`DiffusionScore`) there is no
    guess: ``cond`` is one condition of ``null_cond``'s shape (an ``int`` for 0-d labels), or a
    batch ``[1, *shape]`` or ``[n, *shape]`` of them, of ``null_cond``'s kind (integer or floating).

    Raises:
        MemwatchError: ``cond`` is neither an int nor a tensor (bools and floats are rejected), a
            boolean tensor, of the wrong kind, or of another shape; the message names ``name``,
            the shapes allowed and the shape received.

    Example:
        >>> broadcast_condition(3, 4).shape
        torch.Size([4])
        >>> broadcast_condition(torch.zeros(1, 7, 16), 4).shape
        torch.Size([4, 7, 16])
        >>> broadcast_condition(torch.zeros(4, 16), 4, null_cond=torch.zeros(4, 16)).shape
        torch.Size([4, 4, 16])
    """
    if (
        isinstance(cond, bool)
        or not isinstance(cond, (int, Tensor))
        or (isinstance(cond, Tensor) and cond.dtype == torch.bool)
    ):
        what = f"a {cond.dtype} tensor" if isinstance(cond, Tensor) else type(cond).__name__
        raise MemwatchError(
            f"`{name}` must be a torch.Tensor (one condition, or one per sample) or an int class label, got {what}"
        )
    if isinstance(cond, int):
        cond = torch.tensor(cond)
    if null_cond is not None:
        return _broadcast_like(cond, n, name, null_cond)
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


def _broadcast_like(cond: Tensor, n: int, name: str, null_cond: Tensor) -> Tensor:
    """``cond`` ``[n, *null_cond.shape]`` from one condition, ``[1, *shape]`` or ``[n, *shape]``."""
    shape = tuple(null_cond.shape)
    if cond.is_floating_point() != null_cond.is_floating_point():
        kind = "floating (an embedding)" if null_cond.is_floating_point() else "integer (a label)"
        raise MemwatchError(f"`{name}` must be {kind} like `null_cond` ({null_cond.dtype}), got {cond.dtype}")
    if tuple(cond.shape) == shape:
        return cond.expand(n, *shape)
    if tuple(cond.shape[1:]) == shape and cond.shape[0] in (1, n):
        return cond.expand(n, *shape)
    label = " (a 0-d label or an int)" if not shape else ""
    raise MemwatchError(
        f"`{name}` must be one condition of shape {shape}{label} like `null_cond`, or a batch of them with "
        f"batch size 1 or {n} (the number of samples), {tuple([1, *shape])} or {tuple([n, *shape])}; "
        f"got shape {tuple(cond.shape)}"
    )


def _check_null_cond(null_cond: object) -> Tensor:
    """``null_cond`` as one condition without a batch axis (detached); the legacy ``[1, L, E]`` squeezed."""
    if isinstance(null_cond, bool) or not isinstance(null_cond, (int, Tensor)):
        raise MemwatchError(
            "`null_cond` must be one condition without a batch axis: a 0-d label tensor or an int, or an "
            f"embedding tensor [L, E]; got {type(null_cond).__name__}"
        )
    cond = torch.tensor(null_cond) if isinstance(null_cond, int) else null_cond.detach()
    if cond.dtype == torch.bool or cond.is_complex():
        raise MemwatchError(f"`null_cond` must be an integer label or a real embedding, got dtype {cond.dtype}")
    if cond.numel() == 0:
        raise MemwatchError(f"`null_cond` must not be empty, got shape {tuple(cond.shape)}")
    if cond.is_floating_point() and not bool(torch.isfinite(cond).all()):
        raise MemwatchError(f"`null_cond` must be finite, got NaN/Inf in a tensor of shape {tuple(cond.shape)}")
    if cond.ndim >= 3 and cond.shape[0] == 1:
        warnings.warn(
            f"memwatch: `null_cond` of shape {tuple(cond.shape)} is read as one condition with a batch axis "
            f"(the former convention) and that axis is dropped; pass one condition without a batch axis, "
            f"null_cond[0] of shape {tuple(cond.shape[1:])}. This reading will be removed.",
            DeprecationWarning,
            stacklevel=3,
        )
        cond = cond[0]
    return cond
