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
``product_steps = k`` computes them at ``k`` of those steps only, the middle of each of ``k`` equal
parts of the window (:func:`product_step_indices`; default ``k = m``, every step).

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

Memory: every model call of :func:`conditional_metrics` (the sampler, the check that the model
takes ``cond``, the products at the ``k`` steps of ``n`` probes and the sharpness) sees at most
``max_batch`` rows (a field of :class:`memwatch.sharpness.SharpnessOptions`); the ``k · n``
step-major rows of the products are split into chunks of that size, so peak memory grows with
``max_batch``, not with ``n`` or ``k`` (``benchmarks/bench_conditional_memory.py``).
:func:`memwatch.memory.default_max_batch` picks a size from the available memory.

Cost (CPU seconds, ``benchmarks/bench_conditional_cost.py``): the sampler makes ``steps · n``
network passes; the products ``k · n`` rows of ``s_Δ`` (two passes) with a Jacobian product on
it. On small ``UNet2DConditionModel`` s (attention: no forward mode, so a double vjp, on the
differentiable-twice math backend) one symmetric product row costs ≈ 10 sampler passes at
1×8×8 and ≈ 34 at 3×16×16, about half that by central difference (``jvp_mode="fd"``, forward
passes only); so the products cost ≈ ``c · k / steps`` × the sampling: 8× and 26× at the defaults
with 20 steps (``k = 16``), 1× and 3× with ``k = 4`` by ``fd``. The sharpness of ``p_t(x | c)``
costs ``d`` vjps per row with ``method="dense"`` (5× the sampling at ``d = 64``), ``num_vectors``
with ``"trace"`` (0.3–1×). The README's *Conditional models* section gives the detection each
setting keeps.

Conditions to watch (a tensor ``[C, ...]``, a sequence, or a mapping name → condition such as
prompt → embedding ``[L, E]``) are read once by :func:`parse_conditions`.

Units: with ``x`` in data units ``[x]``, ``s`` and ``s_Δ`` are in ``1/[x]`` and ``H s_Δ`` in
``1/[x]³``; the values are raw (not σ_t-normalized), so compare conditions at the same timesteps,
which :func:`conditional_metrics` guarantees by giving every condition the same probe noise.

Over 600 lines, as one module: the two metrics, the conditions they are read for and the sampler
steps their Jacobian products are taken at are one computation along one trajectory per probe.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.operators import JVP_MODES, ScoreJacobian, map_chunks
from memwatch.sampling import probe_noise, sample_trajectory
from memwatch.score import DiffusionScore
from memwatch.sharpness import SharpnessOptions, SharpnessResult, measure_sharpness
from memwatch.validation import check_int

__all__ = [
    "FIRST_STEPS_FRACTION",
    "ConditionalResult",
    "check_first_steps",
    "condition_keys",
    "conditional_metrics",
    "default_first_steps",
    "hessian_score_difference",
    "parse_conditions",
    "product_step_indices",
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
    check_int("steps", steps, 1)
    return max(1, round(FIRST_STEPS_FRACTION * steps))


@dataclass(frozen=True)
class ConditionalResult:
    """Per-probe conditional memorization metrics (float64, on the CPU).

    Attributes:
        score_diff_norm: ``[n]`` Wen et al.'s ``‖s_c - s_uc‖₂``, mean over the ``k`` product steps of the
            first ``m`` steps (all ``m`` by default; ``1/[x]``).
        hessian_score_diff_norm: ``[n]`` Jeon et al.'s ``‖H_c s_Δ - H_uc s_Δ‖₂``, mean over the same
            steps (``1/[x]³``). Higher = more memorized, for both.
        step_score_diff_norm: ``[n, k]`` the same per step, noisiest first.
        step_hessian_score_diff_norm: ``[n, k]``.
        timesteps: ``[k]`` the timesteps of those steps (schedule units), noisiest first.
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


def check_first_steps(
    first_steps: int | None, steps: int, *, name: str = "first_steps", steps_name: str = "steps"
) -> int:
    """``first_steps`` checked against a ``steps``-step sampler; ``None`` → :func:`default_first_steps`.

    Args:
        first_steps: ``m``, leading (noisiest) sampler steps to average over, ``1 <= m <= steps``, or ``None``.
        steps: the sampler's number of steps (``>= 1``).
        name, steps_name: how the two arguments are called in error messages (e.g.
            ``"condition_first_steps"``, ``"sampler_steps"`` for the monitor).

    Returns:
        ``m`` (an int in ``[1, steps]``).

    Raises:
        MemwatchError: ``first_steps`` is not ``None`` or an integer in ``[1, steps]``.

    Example:
        >>> check_first_steps(None, 50), check_first_steps(3, 10)
        (40, 3)
    """
    if first_steps is None:
        return default_first_steps(steps)
    if not isinstance(first_steps, int) or isinstance(first_steps, bool) or not 1 <= first_steps <= steps:
        raise MemwatchError(
            f"`{name}` must be an integer in [1, {steps_name}={steps}] or None (the default, "
            f"{FIRST_STEPS_FRACTION:.0%} of the steps), got {first_steps!r}"
        )
    return first_steps


def parse_conditions(
    conditions: Tensor | Sequence[int | Tensor] | Mapping[str, int | Tensor] | None,
    *,
    null_cond_shape: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """The conditions to watch as ``name → one condition`` (no batch axis, detached, on the CPU).

    Accepted forms:

    * a tensor ``[C, ...]``, one row per condition: labels ``[C]`` or embeddings ``[C, L, E]``;
    * a non-empty sequence of int labels or tensors (one condition each);
    * a non-empty mapping ``name → condition``, e.g. ``{"a photo of digit 0": emb}`` with
      ``emb`` ``[L, E]``; keys are strings (or ints, named by ``str``).

    Names: the mapping's keys; else the labels when every condition is a 0-d integer label;
    else the indices ``"0"``, ``"1"``, … (in order).

    With ``null_cond_shape`` (:attr:`memwatch.DiffusionScore.cond_shape`, the shape of one
    condition) every condition must have that shape; a sequence item or mapping value of shape
    ``[1, *null_cond_shape]`` is read as one condition with a batch axis, which is dropped.
    Without it the conditions must share one shape, taken as is.

    Args:
        conditions: see above; ``None`` → ``{}``.
        null_cond_shape: the per-condition shape when known (``()`` for labels).

    Returns:
        ``dict[str, Tensor]`` in the given order; stack the values for a batch ``[C, ...]``.

    Raises:
        MemwatchError: another type, an empty collection, a boolean or non-finite condition,
            conditions of different shapes or kinds, a shape other than ``null_cond_shape``, or a
            repeated name; the message names ``conditions`` (and the item), the shapes expected
            and the value's shape.

    Example:
        >>> list(parse_conditions(torch.arange(3)))
        ['0', '1', '2']
        >>> conds = parse_conditions({"a cat": torch.zeros(4, 16), "a dog": torch.ones(1, 4, 16)},
        ...                          null_cond_shape=(4, 16))
        >>> {name: tuple(c.shape) for name, c in conds.items()}
        {'a cat': (4, 16), 'a dog': (4, 16)}
    """
    if conditions is None:
        return {}
    shape = None if null_cond_shape is None else tuple(int(s) for s in null_cond_shape)
    if isinstance(conditions, Tensor):
        named = _rows_of(conditions, shape)
    elif isinstance(conditions, Mapping) and len(conditions) > 0:
        named = []
        for key, value in conditions.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise MemwatchError(f"`conditions` keys must be names (str), got {type(key).__name__} {key!r}")
            named.append((str(key), _one_condition(value, f"conditions[{key!r}]", shape)))
    elif isinstance(conditions, Sequence) and not isinstance(conditions, (str, bytes)) and len(conditions) > 0:
        named = [(None, _one_condition(c, f"conditions[{i}]", shape)) for i, c in enumerate(conditions)]
    else:
        raise MemwatchError(
            "`conditions` must be None, a tensor [C, ...], a non-empty sequence of int labels / tensors, or a "
            f"non-empty mapping name -> condition, got {type(conditions).__name__}"
        )
    items = [c for _, c in named]
    kinds = {(tuple(c.shape), c.is_floating_point()) for c in items}
    if len(kinds) > 1:
        seen = sorted(f"{s} {'floating' if f else 'integer'}" for s, f in kinds)
        raise MemwatchError(f"`conditions` must all have the same shape and kind, got {seen}")
    if named[0][0] is not None:
        names = [name for name, _ in named]
    elif all(c.ndim == 0 and not c.is_floating_point() for c in items):
        names = [str(int(c)) for c in items]
    else:
        names = [str(i) for i in range(len(items))]
    if len(set(names)) != len(names):
        what = "label" if named[0][0] is None else "name"
        raise MemwatchError(f"`conditions` must not repeat a {what}, got {names}")
    return dict(zip(names, items))


def condition_keys(names: Iterable[str], max_length: int = 64) -> dict[str, str]:
    """Metric-name-safe, unique keys for condition names (prompts may hold spaces or slashes).

    Each run of characters other than letters, digits, ``_``, ``-`` and ``.`` becomes ``_``; keys are
    cut to ``max_length`` characters; a key already taken gets ``_<index>`` appended (the
    condition's position). Use them in logged names such as ``cond/{key}/score_diff`` and keep the
    full names in tables.

    Example:
        >>> condition_keys(["a photo of digit 0", "a/b", "a b", "3"])
        {'a photo of digit 0': 'a_photo_of_digit_0', 'a/b': 'a_b', 'a b': 'a_b_2', '3': '3'}
    """
    keys: dict[str, str] = {}
    for i, name in enumerate(names):
        key = re.sub(r"[^\w.\-]+", "_", str(name)).strip("_")[:max_length] or "condition"
        if key in keys.values():
            key = f"{key[: max_length - len(str(i)) - 1]}_{i}"
        keys[name] = key
    return keys


def hessian_score_difference(
    score: DiffusionScore,
    x: Tensor,
    t: Tensor | int | float,
    cond: Tensor | int,
    *,
    symmetric: bool = True,
    jvp_mode: str = "auto",
    max_batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``s_Δ`` and ``H_c s_Δ - H_uc s_Δ`` at ``x``, for all probes at once.

    ``s_Δ(x) = s_c(x) - s_uc(x)`` and ``H_Δ = ∂s_Δ/∂x = H_c - H_uc`` (per probe ``[D, D]``);
    returns ``(s_Δ, A s_Δ)`` with ``A = ½ (H_Δ + H_Δᵀ)`` if ``symmetric`` else ``A = H_Δ``.

    Args:
        score: the model's score with its null condition (``s_uc`` = :meth:`DiffusionScore.unconditional`);
            ``s_c`` is the plain conditional score (no guidance).
        x: ``[n, *shape]`` points.
        t: timestep (schedule units), scalar or ``[n]``.
        cond: one condition or ``[n, ...]`` (see :meth:`memwatch.DiffusionScore.batch_condition`).
        symmetric: symmetrize the Jacobian (the Hessian of ``log p``) or use it as is.
        jvp_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see :class:`ScoreJacobian`).
        max_batch: at most this many rows go through the model at once; ``None`` = all.

    Returns:
        ``(s_delta, h_s_delta)``, both ``[n, *shape]`` in ``x``'s dtype, detached.

    Raises:
        MemwatchError: bad ``x``, ``t``, ``cond``, ``jvp_mode`` or ``max_batch`` (named in the message).

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
    SharpnessOptions(max_batch=max_batch)  # validates max_batch
    n = x.shape[0]
    tt = score.timesteps(t, n, x.device)
    cond_b = score.batch_condition(cond, n, "cond")
    return _chunked_hvp(score, x, tt, cond_b, torch.arange(n), symmetric, jvp_mode, max_batch, x.device)


def conditional_metrics(
    score: DiffusionScore,
    cond: Tensor | int,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 50,
    *,
    first_steps: int | None = None,
    product_steps: int | None = None,
    eval_t: Tensor | int | float | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    symmetric: bool = True,
    options: SharpnessOptions | None = None,
    lanczos_generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **settings: object,
) -> ConditionalResult:
    """Draw DDIM probes for condition(s) ``cond`` and measure Wen's and Jeon's metrics on them.

    Each probe follows the deterministic DDIM trajectory of ``score(x, t, cond)`` (guided when
    ``score.guidance_scale`` is set) from its start noise. At its states ``x_{t_1}, …, x_{t_k}`` at ``k``
    of the first ``m`` steps (:func:`product_step_indices`; ``t_1`` = the noisiest) it computes

        score_diff_norm         = 1/k Σ_i ‖s_Δ(x_{t_i}, t_i)‖₂
        hessian_score_diff_norm = 1/k Σ_i ‖(H_c - H_uc)(x_{t_i}, t_i) s_Δ(x_{t_i}, t_i)‖₂

    (:func:`hessian_score_difference`) and, with ``eval_t``, the sharpness of ``p_t(x | c)`` at the
    state at ``eval_t`` (:func:`memwatch.measure_sharpness`, unguided). Memory and cost: see the module docstring.

    Args:
        score: the model's score; its ``null_cond`` defines ``s_uc``.
        cond: one condition for all probes (a label, one embedding of the score's ``cond_shape``) or
            one per probe ``[n, ...]`` (:meth:`memwatch.DiffusionScore.batch_condition`). To compare
            conditions on the same probes, pass the same ``generator`` seed (or ``noise``).
        n, shape, steps: number and shape of probes (ignored when ``noise`` is given); DDIM steps (``>= 1``).
        first_steps: ``m``, the leading (noisiest) sampler steps of the window, ``1 <= m <= steps``;
            default :func:`default_first_steps` (80 % of ``steps``).
        product_steps: ``k``, the steps of that window the metrics are computed at,
            ``1 <= k <= m``; default ``m`` (every step). The products' cost is linear in ``k``.
        eval_t: timestep (schedule units) of the sharpness of ``p_t(x | c)``; ``None`` skips it.
        generator, noise: source of the start noise, or the start noise ``[n, *shape]`` itself.
        symmetric: use ``½ (H_Δ + H_Δᵀ)`` (default) or the plain Jacobian ``H_Δ``.
        options: :class:`~memwatch.sharpness.SharpnessOptions` of the sharpness (``k``, ``method``, …), and
            ``max_batch`` / ``jvp_mode`` of every call; ``settings``: its fields, overriding ``options``.
        lanczos_generator: start vectors of the Lanczos runs / trace vectors of the sharpness.
        device, dtype: where and in which precision to run (default: the model's device).

    Returns:
        :class:`ConditionalResult`, ``[n]`` metrics; not finite ones are NaN, flagged in ``finite``, warned.

    Raises:
        MemwatchError: invalid arguments (named); a ``cond`` the model rejects (its error chained).

    Example:
        >>> from memwatch.apps.toymodels import DDPMModule
        >>> score = DDPMModule(shape=(2,), hidden=16, depth=1, num_classes=3).memwatch_score()
        >>> res = conditional_metrics(score, 1, n=4, shape=(2,), steps=10, first_steps=3, eval_t=100,
        ...                           k=2, max_batch=8, generator=torch.Generator().manual_seed(0))
        >>> res.hessian_score_diff_norm.shape, res.step_score_diff_norm.shape, res.sharp_fraction.shape
        (torch.Size([4]), torch.Size([4, 3]), torch.Size([4]))
    """
    if not isinstance(score, DiffusionScore):
        raise MemwatchError(f"`score` must be a memwatch.DiffusionScore, got {type(score).__name__}")
    options = _options(options, settings)
    at = _product_timesteps(score, steps, first_steps, product_steps)
    noise = _start_noise(noise, n, shape, generator, dtype)
    cond_b = score.batch_condition(cond, noise.shape[0], "cond")
    t_eval = _eval_timestep(score, eval_t, options, noise[0].numel())
    run_device = torch.device(device) if device is not None else score.device
    _check_model_accepts(score, cond_b, noise, at[:1], options.max_batch, run_device, dtype)
    states, eval_states, samples = _sample_states(
        score, noise, cond_b, steps, at.tolist(), t_eval, options.max_batch, run_device, dtype
    )
    step_sd, step_hsd, finite = _step_norms(score, states, at, cond_b, symmetric, options, run_device)
    sharp = _conditional_sharpness(score, eval_states, t_eval, cond_b, options, lanczos_generator, run_device)
    return ConditionalResult(
        step_sd.mean(1), step_hsd.mean(1), step_sd, step_hsd, at.clone(), sharp, samples, finite, bool(symmetric)
    )


def product_step_indices(first_steps: int, product_steps: int) -> list[int]:
    """The ``k`` of the first ``m`` sampler steps (0-based, noisiest first) the metrics are computed at.

    ``index_i = floor((i + ½) · m / k)`` for ``i = 0 … k−1``: the middle step of each of ``k``
    equal parts of the window, so the mean over them is a stratified estimate of the mean over all
    ``m`` steps; ``k = m`` gives every step.

    Raises:
        MemwatchError: ``product_steps`` not an integer in ``[1, first_steps]``.

    Example:
        >>> product_step_indices(16, 16) == list(range(16)), product_step_indices(16, 4), product_step_indices(16, 1)
        (True, [2, 6, 10, 14], [8])
    """
    k = product_steps
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= first_steps:
        raise MemwatchError(
            f"`product_steps` must be an integer in [1, first_steps={first_steps}] or None (every step), got {k!r}"
        )
    return [math.floor((i + 0.5) * first_steps / k) for i in range(k)]


# ---------------------------------------------------------------------- private
def _product_timesteps(score: DiffusionScore, steps: int, first_steps: int | None, product_steps: int | None) -> Tensor:
    """``[k]`` the timesteps (schedule units, noisiest first) the products are computed at, checked."""
    check_int("steps", steps, 1)
    m = check_first_steps(first_steps, steps)
    grid = score.schedule.sampling_timesteps(steps)
    return grid[product_step_indices(m, m if product_steps is None else product_steps)]


def _eval_timestep(
    score: DiffusionScore, eval_t: Tensor | int | float | None, options: SharpnessOptions, dim: int
) -> float | None:
    """``eval_t`` checked against the schedule (and ``options.k`` against ``d = dim``), or ``None``."""
    if eval_t is None:
        return None
    t = float(score.schedule.check_t(eval_t, "eval_t"))
    options.check_dim(dim)
    return t


def _start_noise(
    noise: Tensor | None,
    n: int | None,
    shape: Sequence[int] | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    """``noise`` checked, or ``[n, *shape]`` drawn from ``generator``."""
    if noise is None:
        if n is None or shape is None:
            raise MemwatchError("pass `noise`, or both `n` and `shape`")
        check_int("n", n, 1)
        noise = probe_noise(n, tuple(shape), generator=generator, dtype=dtype)
    _check_x(noise, "noise")
    return noise


def _step_norms(
    score: DiffusionScore,
    states: Tensor,
    at: Tensor,
    cond: Tensor,
    symmetric: bool,
    options: SharpnessOptions,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """``‖s_Δ‖`` and ``‖A s_Δ‖`` ``[n, k]`` (float64, NaN where not finite) and ``finite`` ``[n]``
    at the states ``[k, n, *shape]`` (step ``i`` at timestep ``at[i]``)."""
    k, n = states.shape[:2]
    # the k·n (step, probe) rows, step-major: row i·n + j is probe j at step i
    x = states.reshape(k * n, *states.shape[2:])
    tt = score.timesteps(at.repeat_interleave(n), k * n)
    probe = torch.arange(n).repeat(k)
    s_d, hs_d = _chunked_hvp(score, x, tt, cond, probe, symmetric, options.jvp_mode, options.max_batch, device)
    step_sd, step_hsd = (v.reshape(k, n, -1).to(torch.float64).norm(dim=-1).T for v in (s_d, hs_d))  # [n, k]
    finite = _flag_not_finite(step_sd, step_hsd)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(finite[:, None], step_sd, nan), torch.where(finite[:, None], step_hsd, nan), finite


def _options(options: SharpnessOptions | None, settings: Mapping[str, object]) -> SharpnessOptions:
    """``options`` (default ``SharpnessOptions()``) with the keyword ``settings`` applied, checked."""
    if options is not None and not isinstance(options, SharpnessOptions):
        raise MemwatchError(f"`options` must be a SharpnessOptions or None, got {type(options).__name__}")
    allowed = [f.name for f in fields(SharpnessOptions)]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise MemwatchError(f"unknown setting(s) {unknown}; the settings are the fields of SharpnessOptions: {allowed}")
    options = options or SharpnessOptions()
    return options.replace(**settings) if settings else options


def _sample_states(
    score: DiffusionScore,
    noise: Tensor,
    cond: Tensor,
    steps: int,
    at: list[float],
    t_eval: float | None,
    max_batch: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """DDIM in chunks of ``max_batch`` probes: states ``[k, n, *shape]`` at the ``k`` timesteps ``at``,
    states at ``t_eval`` ``[n, *shape]`` (``[n, 0, …]`` without), samples ``[n, *shape]``; all on the CPU."""
    states_at = at + ([] if t_eval is None or t_eval in at else [t_eval])

    def chunk(rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        traj = sample_trajectory(
            score,
            noise=noise[rows],
            steps=steps,
            cond=cond[rows].to(device),
            states_at=states_at,
            device=device,
            dtype=dtype,
        )
        states = torch.stack([traj.states[t] for t in at], dim=1)  # [r, k, *shape]
        at_eval = traj.states[t_eval] if t_eval is not None else traj.samples[:, :0]
        return states.detach().cpu(), at_eval.detach().cpu(), traj.samples.detach().cpu()

    states, eval_states, samples = map_chunks(chunk, noise.shape[0], max_batch)
    return states.transpose(0, 1), eval_states, samples


def _chunked_hvp(
    score: DiffusionScore,
    x: Tensor,
    tt: Tensor,
    cond: Tensor,
    probe: Tensor,
    symmetric: bool,
    jvp_mode: str,
    max_batch: int | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """:func:`_hvp` over chunks of at most ``max_batch`` rows of ``x`` ``[R, *shape]`` (row ``i`` at
    ``tt[i]`` with condition ``cond[probe[i]]``), on ``device``; ``"auto"`` is resolved once, on the
    first chunk. Returns ``(s_Δ, A s_Δ)`` ``[R, *shape]`` on ``x``'s device."""
    mode = [jvp_mode]

    def chunk(rows: slice) -> tuple[Tensor, Tensor]:
        s_d, hs_d, mode[0] = _hvp(
            score, x[rows].to(device), tt[rows].to(device), cond[probe[rows]].to(device), symmetric, mode[0]
        )
        return s_d.to(x.device), hs_d.to(x.device)

    return map_chunks(chunk, x.shape[0], max_batch)


def _hvp(score: DiffusionScore, x: Tensor, tt: Tensor, cond: Tensor, symmetric: bool, jvp_mode: str):
    """``(s_Δ, A s_Δ, mode used)`` ``[n, *shape]``; trusts its inputs (``tt`` ``[n]``, ``cond`` ``[n, ...]``)."""
    op = ScoreJacobian(lambda z: score.score_difference(z, tt, cond), x, mode=jvp_mode)
    s_delta = op.output  # [n, D]
    safe = torch.nan_to_num(s_delta, nan=0.0, posinf=0.0, neginf=0.0)
    prod = op.matvec(safe) if symmetric else op.jvp(safe)
    bad = ~torch.isfinite(s_delta).all(1, keepdim=True)
    prod = torch.where(bad, torch.full_like(prod, float("nan")), prod)
    return s_delta.reshape(x.shape), prod.reshape(x.shape), op.mode


def _conditional_sharpness(
    score: DiffusionScore,
    x: Tensor,
    t: float | None,
    cond: Tensor,
    options: SharpnessOptions,
    generator: torch.Generator | None,
    device: torch.device,
) -> SharpnessResult | None:
    """Sharpness of ``p_t(x | c)`` (the unguided conditional score) at ``x`` ``[n, *shape]``; ``None`` without ``t``."""
    if t is None:
        return None
    return measure_sharpness(_unguided(score), x.to(device), t, options, cond=cond.to(device), generator=generator)


def _flag_not_finite(step_sd: Tensor, step_hsd: Tensor) -> Tensor:
    """``[n]`` bool, rows finite at every step; warns with the count and the first rows otherwise."""
    finite = torch.isfinite(step_sd).all(1) & torch.isfinite(step_hsd).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        warnings.warn(
            f"memwatch: the conditional/unconditional score difference is not finite for {len(bad)} "
            f"probe(s) {bad[:8]}; their metrics are reported as NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return finite


def _rows_of(conditions: Tensor, shape: tuple[int, ...] | None) -> list[tuple[None, Tensor]]:
    """The rows of a ``[C, ...]`` tensor of conditions, checked."""
    expected = "[C, ...]" if shape is None else "[" + ", ".join(["C", *map(str, shape)]) + "]"
    bad_shape = conditions.ndim == 0 or conditions.shape[0] == 0
    if bad_shape or conditions.dtype == torch.bool or (shape is not None and tuple(conditions.shape[1:]) != shape):
        hint = ""
        if shape is not None and tuple(conditions.shape) == shape:
            hint = "; this is one condition: pass conditions[None], or a mapping {name: condition}"
        raise MemwatchError(
            f"`conditions` must be a tensor {expected} with one row per condition (C >= 1), a sequence of int "
            f"labels / tensors or a mapping name -> condition; got a {conditions.dtype} tensor of shape "
            f"{tuple(conditions.shape)}{hint}"
        )
    _check_finite(conditions, "conditions")
    return [(None, c) for c in conditions.detach().cpu()]


def _one_condition(value: object, name: str, shape: tuple[int, ...] | None) -> Tensor:
    """One condition (an int label or a tensor, without batch axis; ``[1, *shape]`` squeezed)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, Tensor))
        or (isinstance(value, Tensor) and value.dtype == torch.bool)
    ):
        what = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise MemwatchError(f"`{name}` must be an int label or a torch.Tensor, got {what}")
    cond = torch.tensor(value) if isinstance(value, int) else value.detach().cpu()
    _check_finite(cond, name)
    if shape is None or tuple(cond.shape) == shape:
        return cond
    if tuple(cond.shape) == (1, *shape):
        return cond[0]
    raise MemwatchError(
        f"`{name}` must have the shape of one condition, {shape} (that of `null_cond`), or {(1, *shape)}, "
        f"got shape {tuple(cond.shape)}"
    )


def _check_finite(cond: Tensor, name: str) -> None:
    if cond.is_floating_point() and not bool(torch.isfinite(cond).all()):
        raise MemwatchError(f"`{name}` must be finite, got NaN/Inf in a tensor of shape {tuple(cond.shape)}")


def _unguided(score: DiffusionScore) -> DiffusionScore:
    """The same score with ``score(x, t, c)`` = the plain conditional score ``s_c``."""
    if score.guidance_scale is None or score.guidance_scale == 1.0:
        return score
    unguided = copy.copy(score)  # subclass and settings kept (e.g. a transformer's call convention)
    unguided.guidance_scale = None
    return unguided


def _check_model_accepts(
    score: DiffusionScore,
    cond: Tensor,
    noise: Tensor,
    t: Tensor,
    max_batch: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """One conditional call on the first ``max_batch`` probes (``noise`` ``[n, *shape]``, ``cond``
    ``[n, ...]``, at ``t`` ``[1]``); a model error about ``cond`` becomes a :class:`MemwatchError`."""
    rows = slice(0, max_batch or noise.shape[0])
    cond, x = cond[rows], noise[rows].to(device, dtype)
    try:
        with torch.no_grad():
            score.conditional(x, t.to(x.device).expand(x.shape[0]), cond)
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
