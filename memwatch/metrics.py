"""Torchmetrics over per-probe sharpness results (layer 8).

One check of the callback measures ``n`` probes (possibly sharded over DDP ranks) and yields
per-probe tensors ``[n]``. :class:`MemorizationMetrics` gathers them with ``"cat"`` states, so
every rank computes the same summary over all probes; :func:`memorization_metrics` is the
functional twin for a single process. The math lives once, in :func:`_memorization_update`
(validate, flatten, drop non-finite probes) and :func:`_memorization_compute` (the summary).

Summary keys (logged under ``memwatch/``, names from DESIGN.md):

=========================  ====================================================================
``sharp_fraction_mean``    mean of ``sharp_fraction`` over probes
``lid_mean``               mean of ``lid``
``lambda_min``             minimum of ``lambda_min`` (most negative eigenvalue over all probes)
``normalized_eig_mean``    mean of ``normalized_mean`` (σ_t² · mean of the k most negative λ)
``memorized_fraction``     share of probes with ``score > score_threshold`` (strict)
``nonfinite_count``        number of probes dropped because one of their values was not finite
``nn_memorized_fraction``  share with ``nn_ratio < nn_threshold`` (strict); only with ``nn_ratio``
``auroc``                  binary AUROC of ``score`` against ``nn_ratio < nn_threshold``; only
                           with ``nn_ratio``; NaN when one class is missing
``flagged_fraction``       share that is memorized *or* a copy (either of the two above); only
                           with ``nn_ratio``
=========================  ====================================================================

Non-finite probes: a probe whose value is NaN or ±inf in *any* of its inputs is dropped from
*every* key (so the per-probe rows stay aligned for AUROC) and counted in ``nonfinite_count``.
Means are therefore never silently NaN: a NaN summary value only appears when no finite probe
is left, and then ``nonfinite_count`` says why. All values are 0-d floating tensors, including
``nonfinite_count``, so any Lightning logger accepts them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities.data import dim_zero_cat

from memwatch.errors import MemwatchError
from memwatch.validation import check_int

__all__ = ["ConditionalMetrics", "MemorizationMetrics", "conditional_summary", "memorization_metrics"]

_PROBE_FIELDS = ("sharp_fraction", "lid", "lambda_min", "normalized_mean", "score")


def _check_threshold(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MemwatchError(f"`{name}` must be a finite float, got {value!r}") from None
    if not math.isfinite(value):
        raise MemwatchError(f"`{name}` must be a finite float, got {value!r}")
    return value


def _memorization_update(
    sharp_fraction: Tensor,
    lid: Tensor,
    lambda_min: Tensor | None,
    normalized_mean: Tensor | None,
    score: Tensor,
    nn_ratio: Tensor | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Validate and flatten one batch of per-probe results, dropping non-finite probes.

    Args:
        sharp_fraction, lid, lambda_min, normalized_mean, score: per-probe values ``[n]`` (any
            shape with ``n`` elements is flattened); integer/bool inputs become floats.
            ``lambda_min`` and ``normalized_mean`` may be ``None`` when no eigenvalue was measured
            (the trace tier): their summaries are then NaN, and no probe is dropped for them.
        nn_ratio: optional ``[n]`` nearest-neighbour ratios d1/d2.

    Returns:
        ``(values, nonfinite)``: ``values`` maps each given field name to its ``[m]`` tensor of
        finite probes (``m <= n``, same rows in every field); ``nonfinite`` = ``n - m``.

    Raises:
        MemwatchError: an input is not a tensor / array-like of numbers.
        ValueError: the inputs do not all have the same number of elements.
    """
    given = {
        k: v for k, v in zip(_PROBE_FIELDS, (sharp_fraction, lid, lambda_min, normalized_mean, score)) if v is not None
    }
    if nn_ratio is not None:
        given["nn_ratio"] = nn_ratio
    values: dict[str, Tensor] = {}
    for name, x in given.items():
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise MemwatchError(f"`{name}` must be a tensor of per-probe values, got {type(x).__name__}") from err
        if x.is_complex():
            raise MemwatchError(f"`{name}` must hold real numbers, got dtype {x.dtype}")
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        values[name] = x.detach().reshape(-1)
    n = values["score"].numel()
    for name, x in values.items():
        if x.numel() != n:
            shapes = ", ".join(f"{k}={tuple(torch.as_tensor(v).shape)}" for k, v in given.items())
            raise MemwatchError(
                f"all per-probe inputs must have the same number of probes; `{name}` has {x.numel()}, "
                f"`score` has {n} (shapes: {shapes})"
            )
    finite = torch.ones(n, dtype=torch.bool, device=values["score"].device)
    for x in values.values():
        finite &= torch.isfinite(x).to(finite.device)
    nonfinite = int(n - finite.sum().item())
    if nonfinite:
        values = {k: v[finite.to(v.device)] for k, v in values.items()}
    return values, nonfinite


def _auroc(score: Tensor, labels: Tensor) -> Tensor:
    """Binary AUROC of ``score`` [m] against boolean ``labels`` [m]; NaN if a class is missing.

    torchmetrics applies a sigmoid to scores outside [0, 1], which saturates (and so ties) large
    scores; a min-max rescale keeps the order exactly and keeps the inputs in [0, 1].
    """
    n_pos = int(labels.sum().item())
    if n_pos == 0 or n_pos == labels.numel():
        return torch.tensor(float("nan"), dtype=score.dtype, device=score.device)
    s = score.double()
    lo, hi = s.min(), s.max()
    s = (s - lo) / (hi - lo) if hi > lo else torch.full_like(s, 0.5)
    return binary_auroc(s, labels.long(), thresholds=None).to(score.dtype)


def _memorization_compute(
    values: dict[str, Tensor],
    nonfinite: int | Tensor,
    score_threshold: float,
    nn_threshold: float,
) -> dict[str, Tensor]:
    """Summarize finite per-probe values ``[m]`` (output of :func:`_memorization_update`).

    ``nn_memorized_fraction`` and ``auroc`` appear iff ``values`` has ``"nn_ratio"``. Empty
    inputs (``m = 0``) give NaN for every value except ``nonfinite_count``.
    """
    score = values["score"]
    dtype = score.dtype if score.is_floating_point() else torch.get_default_dtype()
    device = score.device
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)

    def mean(x: Tensor) -> Tensor:
        return x.to(dtype).mean() if x.numel() else nan

    out = {
        "sharp_fraction_mean": mean(values["sharp_fraction"]),
        "lid_mean": mean(values["lid"]),
        "lambda_min": values["lambda_min"].to(dtype).min() if values.get("lambda_min", score[:0]).numel() else nan,
        "normalized_eig_mean": mean(values.get("normalized_mean", score[:0])),
        "memorized_fraction": mean(score > score_threshold),
        "nonfinite_count": torch.as_tensor(nonfinite, device=device).to(dtype).reshape(()),
    }
    if "nn_ratio" in values:
        labels = values["nn_ratio"] < nn_threshold
        out["nn_memorized_fraction"] = mean(labels)
        out["auroc"] = _auroc(score, labels.to(score.device)) if score.numel() else nan
        out["flagged_fraction"] = mean((score > score_threshold) | labels.to(score.device))
    return out


def memorization_metrics(
    sharp_fraction: Tensor,
    lid: Tensor,
    lambda_min: Tensor | None,
    normalized_mean: Tensor | None,
    score: Tensor,
    nn_ratio: Tensor | None = None,
    *,
    score_threshold: float = 0.5,
    nn_threshold: float = 1 / 3,
) -> dict[str, Tensor]:
    """Functional twin of :class:`MemorizationMetrics` for one process.

    Args:
        sharp_fraction: ``[n]`` share of the spectrum with σ_t² λ < −τ, in [0, 1].
        lid: ``[n]`` local intrinsic dimension.
        lambda_min: ``[n]`` most negative Hessian eigenvalue per probe.
        normalized_mean: ``[n]`` mean of σ_t² λᵢ over the k most negative Ritz values.
        score: ``[n]`` memorization score, higher = more memorized.
        nn_ratio: optional ``[n]`` ground truth d1/d2 (memorized when ``< nn_threshold``).
        score_threshold: a probe counts as memorized when ``score > score_threshold``.
        nn_threshold: ground-truth label is ``nn_ratio < nn_threshold``.

    Returns:
        dict of 0-d tensors; keys as in the module docstring.

    Raises:
        ValueError: unequal numbers of probes, or a non-finite threshold.

    Example:
        >>> from torch import tensor
        >>> out = memorization_metrics(
        ...     sharp_fraction=tensor([0.9, 0.2]), lid=tensor([1.0, 8.0]),
        ...     lambda_min=tensor([-50.0, -4.0]), normalized_mean=tensor([-1.0, -0.5]),
        ...     score=tensor([0.8, 0.1]), nn_ratio=tensor([0.1, 0.9]))
        >>> {k: round(v.item(), 3) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'sharp_fraction_mean': 0.55, 'lid_mean': 4.5, 'lambda_min': -50.0,
         'normalized_eig_mean': -0.75, 'memorized_fraction': 0.5, 'nonfinite_count': 0.0,
         'nn_memorized_fraction': 0.5, 'auroc': 1.0, 'flagged_fraction': 0.5}
    """
    score_threshold = _check_threshold("score_threshold", score_threshold)
    nn_threshold = _check_threshold("nn_threshold", nn_threshold)
    values, nonfinite = _memorization_update(sharp_fraction, lid, lambda_min, normalized_mean, score, nn_ratio)
    return _memorization_compute(values, nonfinite, score_threshold, nn_threshold)


def _cat(state: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    """Concatenate a "cat" state: a list before DDP sync, a tensor after; empty list → ``[0]``."""
    if isinstance(state, Tensor):
        return state.reshape(-1)
    if not state:
        return torch.empty(0, device=device)
    return dim_zero_cat(state).reshape(-1)


class MemorizationMetrics(Metric):
    """Summary of one check over all probes, synchronized across DDP ranks by concatenation.

    Call :meth:`update` once per shard of probes (each rank with its own), then :meth:`compute`
    for the summary over all probes, then :meth:`reset` before the next check. Every state is a
    list of per-probe tensors with ``dist_reduce_fx="cat"``, so ``lambda_min`` (a minimum) and
    ``auroc`` (a ranking statistic) are exact over all ranks, not averages of per-rank values.

    As input to ``update``: ``sharp_fraction``, ``lid``, ``lambda_min``, ``normalized_mean``,
    ``score`` (each ``[n]``) and optionally ``nn_ratio`` ``[n]``. ``nn_ratio`` must be given to
    every update of a check or to none. Probes with a non-finite value in any input are dropped
    and counted (see the module docstring).

    As output of ``compute``: a dict of 0-d float tensors with keys ``sharp_fraction_mean``,
    ``lid_mean``, ``lambda_min``, ``normalized_eig_mean``, ``memorized_fraction``,
    ``nonfinite_count``, and, when ``nn_ratio`` was given, ``nn_memorized_fraction`` and
    ``auroc`` (NaN when the labels ``nn_ratio < nn_threshold`` hold only one class).

    Args:
        score_threshold: a probe counts as memorized when ``score > score_threshold``.
        nn_threshold: ground-truth memorization label is ``nn_ratio < nn_threshold``
            (d1/d2 < 1/3 by default).
        kwargs: further :class:`~torchmetrics.Metric` keyword arguments.

    Raises:
        ValueError: a threshold is not a finite number; at update, unequal numbers of probes or
            ``nn_ratio`` given to some updates of a check and not to others.

    Example:
        >>> from torch import tensor
        >>> metric = MemorizationMetrics(score_threshold=0.5)
        >>> metric.update(sharp_fraction=tensor([0.9, 0.2]), lid=tensor([1.0, 8.0]),
        ...               lambda_min=tensor([-50.0, -4.0]), normalized_mean=tensor([-1.0, -0.5]),
        ...               score=tensor([0.8, 0.1]), nn_ratio=tensor([0.1, 0.9]))
        >>> metric.update(sharp_fraction=tensor([0.95]), lid=tensor([0.5]),
        ...               lambda_min=tensor([-60.0]), normalized_mean=tensor([-0.9]),
        ...               score=tensor([0.05]), nn_ratio=tensor([0.2]))
        >>> out = metric.compute()
        >>> out["memorized_fraction"], out["lambda_min"], out["auroc"]
        (tensor(0.3333), tensor(-60.), tensor(0.5000))
        >>> metric.reset()
    """

    is_differentiable = False
    # A dict of quantities with mixed directions (a high lid_mean is healthy, a high
    # memorized_fraction is not; auroc is a validation diagnostic), so no single direction.
    higher_is_better: bool | None = None
    full_state_update = False

    sharp_fraction: list[Tensor]
    lid: list[Tensor]
    lambda_min: list[Tensor]
    normalized_mean: list[Tensor]
    score: list[Tensor]
    nn_ratio: list[Tensor]
    nonfinite: list[Tensor]
    has_nn_ratio: list[Tensor]

    def __init__(self, score_threshold: float = 0.5, nn_threshold: float = 1 / 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.score_threshold = _check_threshold("score_threshold", score_threshold)
        self.nn_threshold = _check_threshold("nn_threshold", nn_threshold)
        for name in (*_PROBE_FIELDS, "nn_ratio"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Per-update bookkeeping, also "cat" so it survives the sync: dropped-probe counts [1],
        # and whether nn_ratio was given [1] (an empty nn_ratio state alone cannot tell "never
        # given" from "given, but every probe was dropped").
        self.add_state("nonfinite", default=[], dist_reduce_fx="cat")
        self.add_state("has_nn_ratio", default=[], dist_reduce_fx="cat")

    def update(
        self,
        sharp_fraction: Tensor,
        lid: Tensor,
        lambda_min: Tensor | None,
        normalized_mean: Tensor | None,
        score: Tensor,
        nn_ratio: Tensor | None = None,
    ) -> None:
        """Add one shard of per-probe results ``[n]`` (see the class docstring)."""
        given = nn_ratio is not None
        if self.has_nn_ratio and bool(self.has_nn_ratio[0].item()) != given:
            raise MemwatchError(
                "`nn_ratio` must be given to every update of a check or to none; got "
                f"nn_ratio={'a tensor' if given else 'None'} after updates "
                f"{'without' if given else 'with'} it (call reset() between checks)"
            )
        values, nonfinite = _memorization_update(sharp_fraction, lid, lambda_min, normalized_mean, score, nn_ratio)
        for name, v in values.items():
            getattr(self, name).append(v.to(self.device))
        self.nonfinite.append(torch.tensor([nonfinite], dtype=torch.long, device=self.device))
        self.has_nn_ratio.append(torch.tensor([given], dtype=torch.long, device=self.device))

    def compute(self) -> dict[str, Tensor]:
        """Summary over every probe given since the last reset, on all ranks."""
        has_nn = _cat(self.has_nn_ratio, self.device)
        if has_nn.numel() and bool(has_nn.min() != has_nn.max()):
            raise MemwatchError(
                "`nn_ratio` was given to some updates (possibly on other ranks) and not to others; "
                "give it to every update of a check or to none"
            )
        values = {name: _cat(getattr(self, name), self.device) for name in _PROBE_FIELDS}
        if has_nn.numel() and bool(has_nn[0]):
            values["nn_ratio"] = _cat(self.nn_ratio, self.device)
        nonfinite = _cat(self.nonfinite, self.device).sum()
        return _memorization_compute(values, nonfinite, self.score_threshold, self.nn_threshold)


# ---------------------------------------------------------------------- conditional models
def _conditional_update(per_probe: Tensor) -> Tensor:
    """Check one shard of per-probe conditional metrics ``[r, C, M]`` (probes × conditions ×
    metrics) and return it as float64."""
    if not isinstance(per_probe, Tensor) or per_probe.ndim != 3:
        raise MemwatchError(
            "`per_probe` must be a tensor [probes, conditions, metrics], got "
            f"{type(per_probe).__name__} {tuple(getattr(per_probe, 'shape', ()))}"
        )
    return per_probe.detach().to(torch.float64)


def _conditional_compute(per_probe: Tensor, ranking_metric: int) -> tuple[Tensor, Tensor]:
    """Per-condition means over the finite probes ``[C, M]`` (NaN where a condition has none)
    and the index of the condition with the largest mean of metric ``ranking_metric`` (-1 when
    every condition's value is NaN)."""
    means = per_probe.nanmean(0) if per_probe.shape[0] else per_probe.new_full(per_probe.shape[1:], float("nan"))
    ranking = torch.nan_to_num(means[:, ranking_metric], nan=-math.inf)
    top = ranking.argmax() if bool(torch.isfinite(ranking).any()) else torch.tensor(-1)
    return means, top


def conditional_summary(per_probe: Tensor, ranking_metric: int = 0) -> tuple[Tensor, Tensor]:
    """Functional twin of :class:`ConditionalMetrics`: ``(means [C, M], most memorized index)``.

    Example:
        >>> per_probe = torch.tensor([[[0.1, 1.0], [0.9, 2.0]], [[0.3, float("nan")], [0.7, 4.0]]])
        >>> means, top = conditional_summary(per_probe)
        >>> means, int(top)
        (tensor([[0.2000, 1.0000],
                [0.8000, 3.0000]], dtype=torch.float64), 1)
    """
    return _conditional_compute(_conditional_update(per_probe), ranking_metric)


class ConditionalMetrics(Metric):
    """Per-condition means of per-probe conditional metrics, synchronized across DDP ranks.

    Each rank updates with its shard of the probes, ``[r, C, M]`` (probes × conditions ×
    metrics, e.g. Jeon et al.'s Hessian-weighted score difference, Wen et al.'s score difference,
    the conditional sharp fraction); the state is concatenated over ranks along the probes, and
    :meth:`compute` returns the means over every finite probe, ``[C, M]``, and the condition
    with the largest mean ``ranking_metric`` — the one that memorizes first.

    Args:
        ranking_metric: index of the metric that ranks the conditions (default 0).

    Example:
        >>> metric = ConditionalMetrics()
        >>> metric.update(torch.tensor([[[0.25], [1.0]]]))
        >>> metric.update(torch.tensor([[[0.75], [0.5]]]))
        >>> means, top = metric.compute()
        >>> means.flatten().tolist(), int(top)
        ([0.5, 0.75], 1)
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    per_probe: list[Tensor]

    def __init__(self, ranking_metric: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ranking_metric = check_int("ranking_metric", ranking_metric, 0)
        self.add_state("per_probe", default=[], dist_reduce_fx="cat")

    def update(self, per_probe: Tensor) -> None:
        """Add one shard ``[r, C, M]`` of per-probe values."""
        self.per_probe.append(_conditional_update(per_probe).to(self.device))

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(means [C, M], index of the most memorized condition)`` over every probe since reset."""
        state = self.per_probe if isinstance(self.per_probe, Tensor) else dim_zero_cat(self.per_probe)
        return _conditional_compute(state, self.ranking_metric)
