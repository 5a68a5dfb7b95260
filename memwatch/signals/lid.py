"""The LID signal: the model's local intrinsic dimension at the probes, against the data's.

A share of ``d`` cannot tell a copy from a manifold: a model that generalizes on ``k``-dimensional
data already reads a sharp fraction of ``1 − k/d``. This signal decides on a *count* against a
reference (:mod:`memwatch.lid`):

* at the first check the training samples the monitor holds (the calibration's reservoir, freed
  afterwards) give the data's ``LID_τ`` at every evaluation level, by local PCA
  (``lid/data_lid``; kept in the monitor's state, so a resumed run compares with the same one);
* at every check each probe's ``LID_τ`` is read twice: from the Jacobian (FLIPD,
  ``d + σ_t² tr H`` of the sharpness measurement, on any tier; ``lid/flipd``) and, with
  ``sharpness.lid.draws > 0``, from forward passes (the probe's own denoising loss;
  ``lid/denoising_lid``); both are clamped into ``[0, d]``, where a dimension lies, and the probes
  whose estimate lay outside are counted (``lid/clamped_count``), so every ratio below is ``>= 0``;
* the statistics per probe: ``relative`` (FLIPD / data LID at the primary level), ``profile``
  (that ratio averaged over every level), ``drawdown`` (FLIPD against the median of the probe's
  own first ``sharpness.lid.baseline_checks`` checks) and ``denoising`` (the denoising LID / data LID at the
  primary level);
* and ``count``, the probe's count of flat directions ``d · (1 − sharp fraction)`` in dimensions
  (the sharpness measurement's LID, whose mean is ``lid_mean``; no reference; the rule of study v3
  that is right more often than the sharp fraction, see ``docs/validation.md``);
* a probe is memorized when ``sharpness.lid.statistic`` falls below ``sharpness.lid.ratio_threshold`` (``count``:
  ``sharpness.lid.count_threshold``):
  ``lid_memorized_fraction`` is the share (what ``onset.on="lid"`` watches), the statistics'
  medians are logged as ``lid/<statistic>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch import defaults
from memwatch.calibration import Reservoir
from memwatch.errors import MemwatchError
from memwatch.intake import TrainingSamples
from memwatch.lid import LidReading, baseline_of, clamp_dimension, data_lid, denoising_lid, statistics
from memwatch.probes import ProbeMeasurement, shard
from memwatch.score import DiffusionScore
from memwatch.signals.base import Draft, Run, Signal, gathered, nan_values
from memwatch.signals.context import SignalContext
from memwatch.signals.options import DESCRIPTIONS, STATISTICS, LidOptions

__all__ = ["DESCRIPTIONS", "STATISTICS", "LidOptions", "LidSignal"]


class LidSignal(Signal):
    """The model's LID at the probes against the data's (see the module docstring).

    Args:
        options: the monitor's ``sharpness.lid`` options.
        num_probes: probes per check (over every rank).
        held: ``() ->`` the monitor's training samples (``None`` once freed).
        timesteps: ``() ->`` the evaluation timesteps, primary first (fixed by the first check).
        seed: seed of the denoising noise and of the anchors (``probes.seed``-derived).
        max_batch: ``() ->`` rows per model call of the denoising LID (the check's bound, or ``None``).
    """

    name = "lid"
    after = ("calibration",)  # its data LID is fitted at the calibrated levels
    phase_names = {"before_check": "data_lid", "measure": "lid_passes"}
    value_names = (
        "lid_memorized_fraction",
        "lid/data_lid",
        "lid/flipd",
        "lid/denoising_lid",
        "lid/clamped_count",
        *(f"lid/{s}" for s in STATISTICS),
    )

    def __init__(
        self,
        options: LidOptions,
        num_probes: int,
        *,
        held: Callable[[], TrainingSamples | None],
        timesteps: Callable[[], list[float]],
        seed: int,
        max_batch: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.options = options
        self.num_probes = num_probes
        self.held = held
        self.timesteps = timesteps
        self.seed = seed
        self.max_batch = max_batch
        self.reference: dict[float, float] | None = None  # timestep -> data LID, fixed at the first check
        self.history: list[Tensor] = []  # the primary FLIPD [P] of the first baseline_checks checks
        self._warned = self._warned_nan = False

    @property
    def pending(self) -> bool:
        """Whether the data LID is still to be estimated (the monitor then holds training samples)."""
        return self.reference is None

    def fit_reference(
        self, samples: Tensor | TrainingSamples | Reservoir, timesteps: list[float], schedule: Any
    ) -> None:
        """Estimate the data's LID at ``timesteps`` from training samples ``[m, *shape]`` (probes'
        space; a random ``defaults.CALIBRATION_CAPACITY`` of them when there are more, the size of
        the reservoir a live run holds). From the monitor's held samples (:class:`TrainingSamples`,
        a :class:`Reservoir`) only those rows are copied out, not every sample held."""
        generator = torch.Generator().manual_seed(self.seed + 4)
        m = len(samples)
        pick = torch.arange(m)
        if m > defaults.CALIBRATION_CAPACITY:
            pick = torch.randperm(m, generator=generator)[: defaults.CALIBRATION_CAPACITY]
        samples = samples[pick] if isinstance(samples, Tensor) else samples.rows(pick)
        scale = torch.stack([schedule.sigma(t) / schedule.alpha(t) for t in timesteps]).reshape(-1)
        lid = data_lid(
            samples,
            scale,
            neighbours=self.options.neighbours,
            anchors=self.options.anchors,
            generator=generator,
        )
        self.reference = dict(zip(timesteps, lid.tolist()))
        flat = [f"t={t:g}: {v:.2g}" for t, v in self.reference.items() if v < 1.0]
        if flat:
            rank_zero_warn(
                f"memwatch: the data's LID is below one dimension at {', '.join(flat)}: the noise there is wider "
                "than the training samples' own spread (a level clamped at the schedule's ceiling?), so a ratio to "
                "it says little; pass `sigmas` or smaller `probes.sigma_factors`"
            )

    def fit_data(self, run: Run, samples: Tensor) -> None:
        """The data LID at the evaluation levels from ``samples`` (rank-local: every rank is given the same)."""
        self.fit_reference(samples, self.timesteps(), run.score.schedule)

    def before_check(self, run: Run) -> None:
        """At the first check: rank zero's data LID on every rank (NaN, warned, when it cannot be had)."""
        if self.reference is not None:
            return
        timesteps, found, error = self.timesteps(), None, None
        if run.is_global_zero:
            try:
                held = self.held()
                if held is None or len(held) < 2:
                    raise MemwatchError("fewer than two distinct training samples were taken from the batches")
                self.fit_reference(held, timesteps, run.score.schedule)
                found = self.reference
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = f"{type(err).__name__}: {err}"
        found, error = run.broadcast((found, error))
        if error is not None:
            rank_zero_warn(
                f"memwatch: the data's LID could not be estimated ({error}); the relative LID values are NaN"
            )
            found = dict.fromkeys(timesteps, math.nan)
        self.reference = found

    def measure(self, run: Run, score: DiffusionScore, measurement: ProbeMeasurement) -> dict[float, Tensor]:
        """The denoising LID of this rank's probes at every level (forward passes only)."""
        if self.options.draws == 0:
            return {}
        rows = shard(self.num_probes, run.world_size, run.rank)
        x0 = measurement.samples.to(run.device)
        generator = torch.Generator().manual_seed(self.seed + 5)
        noise = torch.randn((self.options.draws, self.num_probes, *x0.shape[1:]), generator=generator)[:, rows]
        return {t: denoising_lid(score, x0, t, noise, max_batch=self.max_batch()) for t in measurement.results}

    def contribute(self, run: Run, draft: Draft, measured: dict[float, Tensor] | None) -> LidReading:
        m = draft.measurement
        timesteps = list(m.results)
        held = self.held()
        if self.reference is None and not self._warned and not (held is not None and held.refused):
            self._warned = True  # e.g. `memwatch scan` without training data (refused batches were said)
            rank_zero_warn("memwatch: the LID signal has no data LID (no training samples were seen); its ratios to it "
                           "are NaN (warned once)")  # fmt: skip
        reference = self.reference or dict.fromkeys(timesteps, math.nan)
        primary, dim = timesteps[0], m.primary.dim
        flipd, outside = _dimensions({t: m.results[t].flipd for t in timesteps}, dim, run.device)
        denoise, outside_denoising = _dimensions(measured or {}, dim, run.device)
        clamped = outside[primary] | outside_denoising.get(primary, torch.zeros_like(outside[primary]))
        if len(self.history) < self.options.baseline_checks:
            self.history.append(flipd[primary])
        count = gathered(m.results[primary].lid.double().to(run.device))
        stats = statistics(flipd, reference, baseline_of(self.history), denoising=denoise, count=count)
        chosen = stats[self.options.statistic]
        finite = torch.isfinite(chosen)
        limit = self.options.count_threshold if self.options.statistic == "count" else self.options.ratio_threshold
        memorized = finite & (chosen < limit)
        fraction = float(memorized.sum() / finite.sum()) if finite.any() else math.nan
        if not finite.any() and not self._warned_nan and not (held is not None and held.refused):
            self._warned_nan = True
            rank_zero_warn(f"memwatch: no probe has a finite `{self.options.statistic}` LID statistic at step "
                           f"{run.step}; lid_memorized_fraction is NaN (warned once)")  # fmt: skip
        draft.values.update(
            {
                "lid_memorized_fraction": fraction,
                "lid/data_lid": float(reference[primary]),
                "lid/flipd": _median(flipd[primary]),
                "lid/denoising_lid": _median(denoise[primary]) if denoise else math.nan,
                "lid/clamped_count": float(clamped.sum()),
                **{f"lid/{name}": _median(v) for name, v in stats.items()},
            }
        )
        return LidReading(reference, flipd, denoise, stats, memorized, clamped)

    def unmeasured(self, draft: Draft) -> None:
        draft.values.update(nan_values(self.value_names))

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": [h.tolist() for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reference") is not None:
            self.reference = {float(t): float(v) for t, v in state["reference"].items()}
        self.history = [torch.tensor(h, dtype=torch.float64) for h in state.get("history", [])]


def _dimensions(
    lids: dict[float, Tensor], dim: int, device: torch.device
) -> tuple[dict[float, Tensor], dict[float, Tensor]]:
    """Every rank's per-probe LIDs ``{t: [P]}`` (float64, CPU) clamped into ``[0, dim]``, and where
    they lay outside (:func:`memwatch.lid.clamp_dimension`)."""
    held = {t: clamp_dimension(gathered(v.double().to(device)), dim) for t, v in lids.items()}
    return {t: v for t, (v, _) in held.items()}, {t: o for t, (_, o) in held.items()}


def _median(x: Tensor) -> float:
    """The median of the finite values of ``x`` (NaN when none is)."""
    finite = x[torch.isfinite(x)]
    return float(finite.median()) if finite.numel() else math.nan


def build(context: SignalContext) -> LidSignal:
    """The LID signal (always: it reads the training samples the monitor holds until its first check)."""
    return LidSignal(
        context.sharpness.lid,
        context.num_probes,
        held=context.held,
        timesteps=context.timesteps,
        seed=context.seed,
        max_batch=context.max_batch,
    )
