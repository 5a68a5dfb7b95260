"""The sharpness signal: how sharp the learned density is at the probes, summarized per check.

At every evaluation timestep ``t`` a probe is *memorized* when its score (the sharp fraction,
the share of directions with ``σ_t² λ < -threshold``) exceeds ``score_threshold``; the synced
summary (:class:`memwatch.metrics.MemorizationMetrics`) is logged per timestep as
``t{t}/…`` and, for the primary timestep, without prefix. A check that kept fewer finite probes
than ``onset.min_valid_fraction`` is a failed measurement: its values are NaN.

Also here: Jeon et al.'s ``‖H s‖`` (``hessian_score_norm_mean``) and the count of probes that left
the data's range by far (``out_of_range_count``). The range is the scheduler's clipping range,
``data.data_range``, or the range of the training samples seen; the count is logged at every
check. Probes out of range mean one of two things: a model still learning (its probes come back
toward the data as it trains: the fast demo's N=8 probes, for data in [-1, 1], have a median
largest |x| of 11.7 at the first check and 3.4 at the fourth),
or a sampler that does not step like the model's own pipeline (they stay out, or go further). So
the warning is given once per run when most probes are out at a check *and* they reach no nearer
than at the first check, ``DIVERGING_CHECKS`` checks or more into the run
(:func:`memwatch.sampling.excursion`, the median over probes).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch.lid import possible
from memwatch.metrics import MemorizationMetrics
from memwatch.probes import ProbeMeasurement
from memwatch.reporting import format_timestep
from memwatch.sampling import excursion
from memwatch.sharpness import SharpnessResult
from memwatch.signals.base import Draft, Run, Signal, gathered
from memwatch.signals.context import SignalContext
from memwatch.signals.options import SharpnessCheckOptions

__all__ = ["SharpnessCheckOptions", "SharpnessSignal"]

#: more than this share of the probes out of range, and no nearer than at the first check after at
#: least ``DIVERGING_CHECKS`` checks, is a diverging sampler (warned once)
DIVERGING_SHARE = 0.5
DIVERGING_CHECKS = 3


class SharpnessSignal(Signal):
    """The sharpness summary of a check (see the module docstring).

    Args:
        options: the sharpness group of the monitor.
        num_probes: probes per check (over every rank).
        min_valid_fraction: see :class:`memwatch.options.OnsetOptions`.
    """

    name = "sharpness"
    after = ("copies",)  # its summary reads the copies' ratios

    def __init__(self, options: SharpnessCheckOptions, num_probes: int, min_valid_fraction: float) -> None:
        self.options = options
        self.num_probes = num_probes
        self.min_valid_fraction = min_valid_fraction
        self._metrics: dict[float, MemorizationMetrics] = {}  # per evaluation timestep
        self._warned_range = self._warned_impossible = False
        self._reach: list[tuple[int, float]] = []  # (step, the probes' median excursion) of every check

    def contribute(self, run: Run, draft: Draft, measured: object) -> None:
        draft.with_measurement(results={t: self._possible(run, t, r) for t, r in draft.measurement.results.items()})
        m = draft.measurement
        primary = next(iter(m.results))
        for t, res in m.results.items():
            spectrum = m.spectrum if t == primary else None
            computed = self._valid_or_nan(t, self._summary(self._metric(t), res, m.nn_ratio, spectrum, run.device))
            draft.values.update({f"t{format_timestep(t)}/{name}": v for name, v in computed.items()})
            if t == primary:
                draft.values.update(computed)
        if m.out_of_range is not None:
            draft.values["out_of_range_count"] = self._out_of_range(run, m, run.device)
        if m.hessian_score_norm is not None:
            draft.values["hessian_score_norm_mean"] = synced_mean(m.hessian_score_norm, run.device)

    def _metric(self, t: float) -> MemorizationMetrics:
        """The summary metric of timestep ``t`` (made at its first check)."""
        if t not in self._metrics:
            self._metrics[t] = MemorizationMetrics(score_threshold=self.options.score_threshold)
        return self._metrics[t]

    def _possible(self, run: Run, t: float, res: SharpnessResult) -> SharpnessResult:
        """``res`` with the probes whose FLIPD no score gives (:func:`memwatch.lid.possible`: far
        below 0) unmeasured — on the trace tier their sharp fraction would exceed 1 and
        read as memorized; warned once, naming the prediction type and the schedule."""
        flipd = res.flipd
        impossible = torch.isfinite(flipd) & torch.isnan(possible(flipd, res.dim, res.sigma**2 * res.trace_stderr))
        if not bool(impossible.any()):
            return res
        if not self._warned_impossible:
            self._warned_impossible = True
            score = run.score
            rank_zero_warn(
                f"memwatch: {int(impossible.sum())} of {flipd.numel()} probes have a LID below 0 of {res.dim} "
                f"dimensions at t={t:g} (e.g. {float(flipd[impossible][0]):.3g}), which no score gives; they are "
                f"not measured. Is prediction={score.prediction!r} on this {score.schedule.kind} schedule the pair "
                "the network was trained with? (warned once)"
            )
        return res.masked(impossible)

    @staticmethod
    def _summary(
        metric: MemorizationMetrics,
        res: SharpnessResult,
        nn_ratio: Tensor | None,
        spectrum: SharpnessResult | None,
        device: torch.device,
    ) -> dict[str, float]:
        """The synced summary of one timestep; on the trace tier the eigenvalue summaries come from
        the spectrum's probes (NaN at checks without a spectrum)."""
        eig = res if res.method != "trace" else None
        metric = metric.to(device)
        metric.reset()
        metric.update(
            res.sharp_fraction.to(device),
            res.lid.to(device),
            None if eig is None else eig.eigenvalues[:, 0].to(device),
            None if eig is None else eig.normalized.mean(1).to(device),
            res.memorization_score.to(device),
            None if nn_ratio is None else nn_ratio.to(device),
        )
        values = {name: float(v) for name, v in metric.compute().items()}
        if spectrum is not None:
            values["lambda_min"] = synced_min(spectrum.eigenvalues[:, 0], device)
            values["normalized_eig_mean"] = synced_mean(spectrum.normalized.mean(1), device)
        return values

    def _valid_or_nan(self, t: float, values: dict[str, float]) -> dict[str, float]:
        """A check that lost too many probes is a failed measurement: every value but the count
        of non-finite probes becomes NaN (neither clean nor counted toward onset), with a warning."""
        bad = int(values["nonfinite_count"])
        if self.num_probes - bad >= self.min_valid_fraction * self.num_probes:
            return values
        rank_zero_warn(
            f"memwatch: only {self.num_probes - bad} of {self.num_probes} probes gave finite values at "
            f"t={format_timestep(t)} (below onset.min_valid_fraction={self.min_valid_fraction:g}); the check's "
            "metrics are NaN and it counts neither as clean nor toward onset"
        )
        return {name: (v if name == "nonfinite_count" else math.nan) for name, v in values.items()}

    def _out_of_range(self, run: Run, measurement: ProbeMeasurement, device: torch.device) -> float:
        """Probes (over every rank) that left the data range by far; one warning per run when most
        did and they do not come back as the model trains (see the module docstring)."""
        from torchmetrics.aggregation import SumMetric

        total = SumMetric().to(device)  # synced over ranks on compute
        total.update(measurement.out_of_range.double().sum().to(device))
        count = float(total.compute())
        if measurement.data_range is None:
            return count
        lo, hi = measurement.data_range
        reach = float(gathered(excursion(measurement.samples, lo, hi).to(device)).median())
        self._reach.append((run.step, reach))
        first_step, first = self._reach[0]
        stays_out = len(self._reach) >= DIVERGING_CHECKS and reach >= first
        if count > DIVERGING_SHARE * self.num_probes and stays_out and not self._warned_range:
            self._warned_range = True
            rank_zero_warn(
                f"memwatch: {int(count)} of {self.num_probes} probes left the data range [{lo:g}, {hi:g}] by more "
                f"than half its width at step {run.step}, and reach no nearer to it than at the first check (step "
                f"{first_step}: {first:.3g} range widths out, now {reach:.3g}): the probe sampler may be diverging (a "
                "sampler that does not step like the model's own pipeline, e.g. without its clipping?); pass "
                "`probes.sampler` or check the schedule. A model still learning brings its probes back as it trains. "
                "Warned once; `memwatch/out_of_range_count` is logged at every check"
            )
        return count


def build(context: SignalContext) -> SharpnessSignal:
    """The sharpness signal (always)."""
    return SharpnessSignal(context.sharpness, context.num_probes, context.onset.min_valid_fraction)


def synced_mean(x: Tensor, device: torch.device) -> float:
    """Mean of the finite values of every rank's ``x`` (NaN when none is finite)."""
    from torchmetrics.aggregation import MeanMetric

    mean = MeanMetric(nan_strategy="ignore").to(device)  # synced over ranks on compute
    mean.update(x.to(device, torch.float64))
    return float(mean.compute())


def synced_min(x: Tensor, device: torch.device) -> float:
    """Least finite value of every rank's ``x`` (NaN when none is finite)."""
    from torchmetrics.aggregation import MinMetric

    least = MinMetric(nan_strategy="ignore").to(device)  # synced over ranks on compute
    least.update(torch.where(torch.isfinite(x), x, torch.nan).to(device, torch.float64))
    value = float(least.compute())
    return value if math.isfinite(value) else math.nan
