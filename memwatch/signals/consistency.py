"""The consistency signal: are the prediction type and the schedule the monitor reads the network
with the pair it was trained with?

A wrong pair still gives finite numbers — sharp fractions, LIDs outside ``[0, d]``, an onset — that
mean nothing. At the first check, while the monitor still holds training samples, this signal
runs :func:`memwatch.consistency.check_consistency` on up to ``SAMPLES`` of them (a few forward
passes at the primary noise level and ten times it, in the isolation of the measurement):

* ``"fits"``: nothing is said;
* ``"wrong"``: one warning names the prediction, the schedule, the errors and, where one reads
  better, the prediction the network's output reads as; from then on every value of every check
  is NaN (but the counts, ``*_count``) and the per-probe results too, so nothing is logged as a
  number and no onset is declared;
* ``"undecided"``: one warning says it cannot tell (an untrained network, or one trained on a
  schedule memwatch cannot guess); the values are kept, and the sharpness signal
  still leaves a probe with a negative LID unmeasured (:func:`memwatch.lid.possible`). The check is not repeated: the
  training samples are dropped after the first check.

It logs no value of its own. It runs last, so that it can overwrite the others' values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch.consistency import check_consistency
from memwatch.intake import TrainingSamples
from memwatch.probes import ProbeMeasurement
from memwatch.score import DiffusionScore
from memwatch.signals.base import Draft, Run, Signal
from memwatch.signals.context import SignalContext

__all__ = ["SAMPLES", "ConsistencySignal"]

#: training samples the check reads (a seeded random subset when more are held)
SAMPLES = 256


class ConsistencySignal(Signal):
    """Whether the prediction type and the schedule fit the network (see the module docstring).

    Args:
        held: ``() ->`` the monitor's training samples (``None`` once freed).
        seed: seed of the subset and of the noises.
        max_batch: ``() ->`` rows per model call (the check's bound, or ``None``).
    """

    name = "consistency"
    after = ("*",)  # last: a wrong prediction / schedule pair makes every value before it NaN

    def __init__(
        self, *, held: Callable[[], TrainingSamples | None], seed: int, max_batch: Callable[[], int | None]
    ) -> None:
        self.held = held
        self.seed = seed
        self.max_batch = max_batch
        self.verdict: str | None = None  # "fits", "wrong" or "undecided" once checked
        self._samples: Tensor | None = None  # a subset of the held samples, for this check only

    def before_check(self, run: Run) -> None:
        """At the first check: keep a subset of the training samples for :meth:`measure`."""
        held = self.held()
        if self.verdict is not None or held is None or len(held) < 2:
            return
        samples = held.samples
        if samples.shape[0] > SAMPLES:
            generator = torch.Generator().manual_seed(self.seed + 6)
            samples = samples[torch.randperm(samples.shape[0], generator=generator)[:SAMPLES]]
        self._samples = samples

    def measure(self, run: Run, score: DiffusionScore, measurement: ProbeMeasurement) -> tuple[str, str] | None:
        """``(verdict, description)`` on rank zero at the first check, ``None`` otherwise."""
        samples, self._samples = self._samples, None
        if samples is None or not run.is_global_zero:
            return None
        t = next(iter(measurement.results))
        level = float(score.schedule.sigma(t) / score.schedule.alpha(t))
        generator = torch.Generator().manual_seed(self.seed + 7)
        found = check_consistency(score, samples, level, generator=generator, max_batch=self.max_batch())
        return found.verdict, found.describe()

    def contribute(self, run: Run, draft: Draft, measured: tuple[str, str] | None) -> None:
        found = run.broadcast(measured)
        if found is not None and self.verdict is None:
            self.verdict, description = found
            if self.verdict == "wrong":
                rank_zero_warn(
                    f"memwatch: the network does not fit {description}. Its sharpness and LID would be finite "
                    "nonsense: every value is NaN from now on and no onset is declared; pass the prediction type "
                    "and schedule it was trained with (`score_fn=`)"
                )
            elif self.verdict == "undecided":
                rank_zero_warn(
                    f"memwatch: cannot tell whether the network fits {description}: this reading does not explain "
                    "its target, or another reads it about as well, and none reads it clearly better, on this schedule "
                    "or on the other family's (an untrained network, one trained on a schedule memwatch cannot guess, "
                    "or a near pair such as ε read as v); the values are kept"
                )
        if self.verdict == "wrong":  # counts (of probes out of range, of batches skipped, ...) stay counts
            draft.values.update(dict.fromkeys((k for k in draft.values if not k.endswith("_count")), math.nan))
            draft.with_measurement(results={t: r.as_unmeasured() for t, r in draft.measurement.results.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.verdict = state.get("verdict")


def build(context: SignalContext) -> ConsistencySignal:
    """The consistency signal (always: it reads the training samples held until the first check)."""
    return ConsistencySignal(held=context.held, seed=context.seed, max_batch=context.max_batch)
