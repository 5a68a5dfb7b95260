"""Memorization metrics for conditional (classifier-free-guidance) diffusion models.

With the conditional score ``s_c = ∇ₓ log p_t(x | c)``, the unconditional score
``s_uc = ∇ₓ log p_t(x)`` (the model with its null condition) and their Jacobians
``H_c = ∂s_c/∂x``, ``H_uc = ∂s_uc/∂x`` ``[D, D]``, two per-probe signals are measured along the
probe's own DDIM trajectory:

* Wen et al. (ICLR 2024): ``‖s_Δ‖₂`` with ``s_Δ = s_c - s_uc``. A memorized condition pins
  ``p(x | c)`` to one training point, far from where the unconditional density pulls, so the
  conditional and unconditional scores disagree strongly.
* Jeon et al. (ICML 2025): the Hessian-weighted score difference ``‖H_c s_Δ - H_uc s_Δ‖₂``.
  ``p(x | c)`` concentrated on a point has ``H_c ≈ -I/σ_t²`` (every direction sharp), while
  ``H_uc`` still sees the spread of the data; ``H_c - H_uc`` then acts strongly on ``s_Δ``. In the
  exact Gaussian-posterior picture ``H_c - H_uc = α_t² (Cov[x₀|x_t,c] - Cov[x₀|x_t]) / σ_t⁴``.

Both are averaged over the first ``m`` sampler steps (step 1 = the noisiest state, the start of
sampling), as in Jeon et al.: memorization shows before the sample has formed. The default ``m``
is the noisiest 80 % of the steps (:func:`default_first_steps` says why not the first step alone).

``H_c s_Δ - H_uc s_Δ = H_Δ s_Δ`` where ``H_Δ`` is the Jacobian of the single function
``x ↦ s_Δ(x)``; it is computed as one batched product of that Jacobian with ``s_Δ``
(:class:`memwatch.operators.ScoreJacobian`: forward-mode jvp, reverse-mode fallback), so the
conditional and unconditional passes share one call.

Symmetric or plain Jacobian: the Hessian of ``log p`` is symmetric, a learned score's Jacobian is
not exactly. ``symmetric=True`` (the default) uses ``½ (H_Δ + H_Δᵀ)``, the Hessian part of the
learned score, as the rest of memwatch does (:mod:`memwatch.sharpness`); it costs one jvp and one
vjp. ``symmetric=False`` uses the plain directional derivative ``H_Δ s_Δ`` (one jvp), which is
what a finite difference ``(s_Δ(x + h s_Δ) - s_Δ(x)) / h`` of the network computes. For an exact
score both coincide; on a digits model of ``examples/conditional.py`` (2000 steps) their
per-probe AUROCs for the duplicated class differed by at most 0.03 at every averaging window
(e.g. 0.967 vs 0.975 over the first 33 of 50 steps), so the choice is about consistency with the
sharpness spectrum, not about detection.

Units: with ``x`` in data units ``[x]``, ``s`` and ``s_Δ`` are in ``1/[x]`` and ``H s_Δ`` in
``1/[x]³``; the values are raw (not σ_t-normalized), so compare conditions at the same timesteps,
which :func:`conditional_metrics` guarantees by giving every condition the same probe noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.operators import JVP_MODES, ScoreJacobian, map_chunks
from memwatch.sampling import probe_noise, sample_trajectory
from memwatch.score import DiffusionScore, broadcast_condition
from memwatch.sharpness import SharpnessResult, measure_sharpness

__all__ = [
    "FIRST_STEPS_FRACTION",
    "ConditionalResult",
    "conditional_metrics",
    "default_first_steps",
    "hessian_score_difference",
]

#: share of the sampler's steps (the noisiest ones) that the metrics are averaged over by default
FIRST_STEPS_FRACTION = 0.8


def default_first_steps(steps: int) -> int:
    """``m = max(1, round(FIRST_STEPS_FRACTION · steps))`` leading sampler steps to average over.

    Why not Jeon et al.'s first step alone: ``s_Δ`` carries the data through ``α_t``
    (``s_Δ ≈ α_t (E[x₀|x_t,c] − E[x₀|x_t]) / σ_t²``, and ``H_Δ s_Δ ∝ α_t³``), and DDPM's linear
    schedule starts at ``α_T ≈ 0.0064`` where the network's error dominates; Stable Diffusion's
    scaled-linear schedule starts at ``α_T ≈ 0.068`` over 16k latent dimensions, where the first
    step suffices. On the digits example (``examples/conditional.py``, linear schedule) the
    duplicated class separates below ``t ≈ 500``; averaging over the first 80 % of a 20- or
    50-step grid (down to ``t ≈ 200``, ``σ_t ≈ 0.6``) gave a per-probe AUROC of 0.91–0.99 over
    six training seeds, the first step alone ≈ 0.75. The last 20 % are left out: there
    ``s_Δ → 0`` on every probe while the raw values grow like ``1/σ_t³`` and would swamp the mean.

    Example:
        >>> default_first_steps(50), default_first_steps(20), default_first_steps(1)
        (40, 16, 1)
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise MemwatchError(f"`steps` must be a positive integer, got {steps!r}")
    return max(1, round(FIRST_STEPS_FRACTION * steps))


@dataclass(frozen=True)
class ConditionalResult:
    """Per-probe conditional memorization metrics (float64, on the CPU).

    Attributes:
        score_diff_norm: ``[n]`` Wen et al.'s ``‖s_c - s_uc‖₂``, mean over the first ``m`` steps
            (``1/[x]``).
        hessian_score_diff_norm: ``[n]`` Jeon et al.'s ``‖H_c s_Δ - H_uc s_Δ‖₂``, mean over the first
            ``m`` steps (``1/[x]³``). Higher = more memorized, for both.
        step_score_diff_norm: ``[n, m]`` the same per step, noisiest first.
        step_hessian_score_diff_norm: ``[n, m]``.
        timesteps: ``[m]`` the timesteps of those steps (schedule units), noisiest first.
        sharpness: :class:`memwatch.SharpnessResult` of the conditional score ``s_c`` at the
            probes' state at ``eval_t``, or ``None`` when no ``eval_t`` was given.
        samples: ``[n, *shape]`` the probes' final samples (in the sampling ``dtype``, on the CPU).
        finite: ``[n]`` bool, False where ``s_Δ`` or ``H_Δ s_Δ`` was not finite at some step (those
            rows are NaN); the sharpness flags its own rows in ``sharpness.finite``.
        symmetric: whether ``½ (H_Δ + H_Δᵀ)`` (True) or the plain Jacobian ``H_Δ`` was used.
    """

    score_diff_norm: Tensor
    hessian_score_diff_norm: Tensor
    step_score_diff_norm: Tensor
    step_hessian_score_diff_norm: Tensor
    timesteps: Tensor
    sharpness: SharpnessResult | None
    samples: Tensor
    finite: Tensor
    symmetric: bool

    @property
    def sharp_fraction(self) -> Tensor | None:
        """``[n]`` sharp fraction of ``p_t(x | c)`` at ``eval_t`` (``None`` without ``eval_t``)."""
        return None if self.sharpness is None else self.sharpness.sharp_fraction


def hessian_score_difference(
    score: DiffusionScore,
    x: Tensor,
    t: Tensor | int | float,
    cond: Tensor | int,
    *,
    symmetric: bool = True,
    jvp_mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``s_Δ`` and ``H_c s_Δ - H_uc s_Δ`` at ``x``, for all probes at once.

    ``s_Δ(x) = s_c(x) - s_uc(x)`` and ``H_Δ = ∂s_Δ/∂x = H_c - H_uc`` (per probe ``[D, D]``);
    returns ``(s_Δ, A s_Δ)`` with ``A = ½ (H_Δ + H_Δᵀ)`` if ``symmetric`` else ``A = H_Δ``.

    Args:
        score: the model's score with its null condition (``s_uc`` = :meth:`DiffusionScore.unconditional`);
            ``s_c`` is the plain conditional score (no guidance).
        x: ``[n, *shape]`` points.
        t: timestep (schedule units), scalar or ``[n]``.
        cond: one condition or ``[n, ...]`` (see :func:`memwatch.score.broadcast_condition`).
        symmetric: symmetrize the Jacobian (the Hessian of ``log p``) or use it as is.
        jvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see :class:`ScoreJacobian`).

    Returns:
        ``(s_delta, h_s_delta)``, both ``[n, *shape]`` in ``x``'s dtype, detached.

    Raises:
        ValueError: bad ``x``, ``t`` or ``cond`` (named in the message).

    Example:
        >>> from memwatch.schedules import NoiseSchedule
        >>> net = lambda x, t, c=None: x * (1.0 if c is None else 2.0)
        >>> score = DiffusionScore(net, NoiseSchedule.linear(100))
        >>> s_d, hs_d = hessian_score_difference(score, torch.ones(3, 2), 50, 1)
        >>> s_d.shape, hs_d.shape
        (torch.Size([3, 2]), torch.Size([3, 2]))
    """
    _check_x(x)
    if jvp_mode not in JVP_MODES:
        raise MemwatchError(f"`jvp_mode` must be one of {JVP_MODES}, got {jvp_mode!r}")
    n = x.shape[0]
    tt = score.timesteps(t, n, x.device)
    cond_b = _on_device(broadcast_condition(cond, n), x.device)
    return _hvp(score, x, tt, cond_b, symmetric, jvp_mode)


def conditional_metrics(
    score: DiffusionScore,
    cond: Tensor | int,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 50,
    *,
    first_steps: int | None = None,
    eval_t: Tensor | int | float | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    symmetric: bool = True,
    k: int = 8,
    threshold: float = 0.5,
    method: str = "auto",
    num_iters: int = 32,
    num_vectors: int = 4,
    max_batch: int | None = None,
    lanczos_generator: torch.Generator | None = None,
    jvp_mode: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ConditionalResult:
    """Draw DDIM probes for condition(s) ``cond`` and measure Wen's and Jeon's metrics on them.

    Each probe follows the deterministic DDIM trajectory of ``score(x, t, cond)`` (guided when
    ``score.guidance_scale`` is set) from its start noise. At the states ``x_{t_1}, …, x_{t_m}``
    of the first ``m = first_steps`` steps (``t_1`` = the noisiest timestep of the ``steps``-step
    grid) it computes

        score_diff_norm         = 1/m Σ_i ‖s_Δ(x_{t_i}, t_i)‖₂
        hessian_score_diff_norm = 1/m Σ_i ‖(H_c - H_uc)(x_{t_i}, t_i) s_Δ(x_{t_i}, t_i)‖₂

    (see :func:`hessian_score_difference`) and, with ``eval_t``, the sharpness of the conditional
    density ``p_t(x | c)`` at the probe's state at ``eval_t`` (:func:`memwatch.measure_sharpness`
    with ``cond``, on the unguided conditional score).

    Args:
        score: the model's score; its ``null_cond`` defines ``s_uc``.
        cond: one condition for all probes (an int label, a 0-d tensor, a ``[1, ...]`` tensor) or
            one per probe ``[n, ...]``. To compare conditions on the same probes, pass the same
            ``generator`` seed (or ``noise``) for each, or one batch with per-probe conditions.
        n, shape: number and shape of probes (ignored when ``noise`` is given).
        steps: DDIM steps of the sampler (``>= 1``).
        first_steps: ``m``, the number of leading (noisiest) sampler steps averaged over
            (``1 <= m <= steps``; 1 = the start state only, Jeon et al.'s setting on Stable
            Diffusion); default :func:`default_first_steps` (80 % of ``steps``).
        eval_t: timestep (schedule units) for the sharpness of ``p_t(x | c)``; ``None`` skips it.
        generator: source of the start noise; noise: explicit start noise ``[n, *shape]``.
        symmetric: use ``½ (H_Δ + H_Δᵀ)`` (default) or the plain Jacobian ``H_Δ``.
        k, threshold, method, num_iters, num_vectors: passed to :func:`memwatch.measure_sharpness`.
        max_batch: at most this many probes go through the model at once (sampler, products and
            sharpness); ``None`` = all.
        lanczos_generator: start vectors of the Lanczos runs (``method="lanczos"``).
        jvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see :class:`ScoreJacobian`).
        device, dtype: where and in which precision to run (default: the model's device).

    Returns:
        :class:`ConditionalResult` with ``[n]`` metrics; probes whose scores or products are not
        finite are NaN, flagged in ``finite`` and reported with a ``RuntimeWarning``.

    Raises:
        ValueError: invalid arguments (named in the message); a ``cond`` the model rejects (the
            model's error is chained).

    Example:
        >>> from memwatch.toymodels import DDPMModule
        >>> score = DDPMModule(shape=(2,), hidden=16, depth=1, num_classes=3).memwatch_score()
        >>> res = conditional_metrics(score, 1, n=4, shape=(2,), steps=10, first_steps=3,
        ...                           eval_t=100, k=2, generator=torch.Generator().manual_seed(0))
        >>> res.hessian_score_diff_norm.shape, res.step_score_diff_norm.shape, res.sharp_fraction.shape
        (torch.Size([4]), torch.Size([4, 3]), torch.Size([4]))
    """
    if not isinstance(score, DiffusionScore):
        raise MemwatchError(f"`score` must be a memwatch.DiffusionScore, got {type(score).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise MemwatchError(f"`steps` must be a positive integer, got {steps!r}")
    if first_steps is None:
        first_steps = default_first_steps(steps)
    if not isinstance(first_steps, int) or isinstance(first_steps, bool) or not 1 <= first_steps <= steps:
        raise MemwatchError(f"`first_steps` must be an integer in [1, steps={steps}], got {first_steps!r}")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise MemwatchError(f"`max_batch` must be a positive integer or None, got {max_batch!r}")
    if jvp_mode not in JVP_MODES:
        raise MemwatchError(f"`jvp_mode` must be one of {JVP_MODES}, got {jvp_mode!r}")
    if noise is None:
        if n is None or shape is None:
            raise MemwatchError("pass `noise`, or both `n` and `shape`")
        if not isinstance(n, int) or n < 1:
            raise MemwatchError(f"`n` must be a positive integer, got {n!r}")
        noise = probe_noise(n, tuple(shape), generator=generator, dtype=dtype)
    _check_x(noise, "noise")
    n = noise.shape[0]
    cond_b = broadcast_condition(cond, n)
    schedule = score.schedule
    grid = schedule.sampling_timesteps(steps)
    first = [float(t) for t in grid[:first_steps]]
    t_eval = None if eval_t is None else float(schedule.check_t(eval_t, "eval_t"))
    states_at = first + ([] if t_eval is None or t_eval in first else [t_eval])
    run_device = torch.device(device) if device is not None else score.device
    check_rows = slice(0, max_batch or n)
    _check_model_accepts(score, cond_b[check_rows], noise[check_rows].to(run_device, dtype), grid[:1])

    def chunk(rows: slice) -> tuple[Tensor, ...]:
        c = _on_device(cond_b[rows], run_device)
        traj = sample_trajectory(
            score, noise=noise[rows], steps=steps, cond=c, states_at=states_at, device=run_device, dtype=dtype
        )
        m, r = len(first), traj.samples.shape[0]
        x = torch.cat([traj.states[t] for t in first])  # [(m r), *shape], step-major
        tt = score.timesteps(torch.tensor(first).repeat_interleave(r), m * r, run_device)
        s_d, hs_d = _hvp(score, x, tt, c.repeat(m, *([1] * (c.ndim - 1))), symmetric, jvp_mode)
        norms = [v.reshape(m, r, -1).to(torch.float64).norm(dim=-1).T.cpu() for v in (s_d, hs_d)]  # [r, m]
        eval_state = traj.states[t_eval] if t_eval is not None else traj.samples[:, :0]
        return (*norms, eval_state.detach().cpu(), traj.samples.detach().cpu())

    step_sd, step_hsd, eval_states, samples = map_chunks(chunk, n, max_batch)
    finite = torch.isfinite(step_sd).all(1) & torch.isfinite(step_hsd).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        warnings.warn(
            f"memwatch: the conditional/unconditional score difference is not finite for {len(bad)} "
            f"probe(s) {bad[:8]}; their metrics are reported as NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    step_sd = torch.where(finite[:, None], step_sd, nan)
    step_hsd = torch.where(finite[:, None], step_hsd, nan)

    sharp = None
    if t_eval is not None:
        sharp = measure_sharpness(
            _unguided(score),
            eval_states.to(run_device),
            t_eval,
            k=k,
            threshold=threshold,
            method=method,
            num_iters=num_iters,
            num_vectors=num_vectors,
            max_batch=max_batch,
            cond=_on_device(cond_b, run_device),
            generator=lanczos_generator,
            jvp_mode=jvp_mode,
        )
    return ConditionalResult(
        score_diff_norm=step_sd.mean(1),
        hessian_score_diff_norm=step_hsd.mean(1),
        step_score_diff_norm=step_sd,
        step_hessian_score_diff_norm=step_hsd,
        timesteps=grid[:first_steps].clone(),
        sharpness=sharp,
        samples=samples,
        finite=finite,
        symmetric=bool(symmetric),
    )


# ---------------------------------------------------------------------- private
def _hvp(score: DiffusionScore, x: Tensor, tt: Tensor, cond: Tensor, symmetric: bool, jvp_mode: str):
    """``(s_Δ, A s_Δ)`` ``[n, *shape]``; trusts its inputs (``tt`` ``[n]``, ``cond`` ``[n, ...]``)."""
    op = ScoreJacobian(lambda z: score.score_difference(z, tt, cond), x, mode=jvp_mode)
    s_delta = op.output  # [n, D]
    safe = torch.nan_to_num(s_delta, nan=0.0, posinf=0.0, neginf=0.0)
    prod = op.matvec(safe) if symmetric else op.jvp(safe)
    bad = ~torch.isfinite(s_delta).all(1, keepdim=True)
    prod = torch.where(bad, torch.full_like(prod, float("nan")), prod)
    return s_delta.reshape(x.shape), prod.reshape(x.shape)


def _unguided(score: DiffusionScore) -> DiffusionScore:
    """The same score with ``score(x, t, c)`` = the plain conditional score ``s_c``."""
    if score.guidance_scale is None or score.guidance_scale == 1.0:
        return score
    return DiffusionScore(
        score.model,
        score.schedule,
        score.prediction,
        null_cond=score.null_cond,
        cond_kwarg=score.cond_kwarg,
        time_fn=score.time_fn,
    )


def _check_model_accepts(score: DiffusionScore, cond: Tensor, x: Tensor, t: Tensor) -> None:
    """One conditional call on the first probes; a model error about ``cond`` becomes a ValueError."""
    try:
        with torch.no_grad():
            score.conditional(x, t.to(x.device).expand(x.shape[0]), _on_device(cond, x.device))
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise MemwatchError(
            f"the model failed on `cond` (per-probe shape {tuple(cond.shape[1:])}, dtype {cond.dtype}): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ) from err


def _check_x(x: object, name: str = "x") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise MemwatchError(
            f"`{name}` must be a floating tensor [n, *shape], got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )


def _on_device(cond: Tensor, device: torch.device) -> Tensor:
    return cond.to(device) if cond.device != device else cond
