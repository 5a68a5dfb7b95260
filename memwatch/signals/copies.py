"""The copies signal: which probes copy a training sample (``d₁/d₂ < 1/3``), and which items.

The training samples come from ``reference_data``: a tensor (or an iterable of batches),
checked and moved into the probes' space at fit start, or ``"batches"``, the distinct training
samples this rank has seen, held in memory only (:class:`memwatch.calibration.Reservoir`; never
logged or saved). With ``"batches"`` every rank offers the two nearest of its own samples for
every rank's probes and the union's ratio is exact (:mod:`memwatch.copies`).

It contributes ``nn_ratio`` to the measurement (the sharpness summary reads it:
``nn_memorized_fraction``, ``auroc``, ``flagged_fraction``) and, with a reference tensor, the
items the probes copy (``CheckResult.copied``, :attr:`MemorizationMonitor.most_copied`). Where no
ratio can be told (fewer than two distinct training samples seen), those three values are NaN
with one warning, and the sharpness values are kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch.attribution import CopiedItem, copied_items
from memwatch.copies import distinct, nearest_candidates, ratio_from_candidates
from memwatch.groundtruth import nearest_neighbours, ratio_of
from memwatch.intake import TrainingSamples, in_probe_space
from memwatch.options import DataOptions
from memwatch.probes import ProbeMeasurement, shard
from memwatch.signals.base import Draft, Run, Signal, gathered, nan_values

__all__ = ["CopyOptions", "CopySignal"]

#: the values that need a ratio per probe
COPY_VALUES = ("nn_memorized_fraction", "auroc", "flagged_fraction")


@dataclass(frozen=True, eq=False)
class CopyOptions:
    """What the probes' copies are named by.

    Attributes:
        ids: ids of the ``reference_data`` items (a list, or a Dataset returning ``(data, id)`` /
            ``{"id": …}``), shown in the attribution table (indices and counts only, never pixels).
    """

    ids: Sequence[Any] | None = None


class CopySignal(Signal):
    """Copies of the training samples among the probes (see the module docstring).

    Args:
        options: the copies group.
        reference_data: the monitor's ``reference_data`` (a tensor or an iterable; ``"batches"`` with ``held``).
        data: the data group (selector, encoder, units) the reference is read with.
        held: the distinct training samples seen (``reference_data="batches"``), shared with calibration.
        num_probes: probes per check, over every rank.
        score_threshold: a probe is flagged by sharpness above this (for the attribution table).
    """

    name = "copies"
    value_names = COPY_VALUES

    def __init__(
        self,
        options: CopyOptions,
        *,
        reference_data: Any,
        data: DataOptions,
        held: TrainingSamples | None,
        num_probes: int,
        score_threshold: float,
    ) -> None:
        self.options = options
        self.reference_data, self.data = reference_data, data
        self.reference: Tensor | None = None
        self.held = held
        self.num_probes = num_probes
        self.score_threshold = score_threshold
        self._warned_few = False

    def prepare(self, run: Run) -> None:
        """A reference tensor (or iterable) checked and moved into the probes' space (a bad one fails here)."""
        if self.held is None:
            self.reference = in_probe_space(
                self.reference_data, "reference_data", self.data, run.sample_shape, run.device
            )

    def training_samples(self) -> Tensor:
        """The training samples compared with: the reference tensor, or those held ``[m, *shape]``."""
        if self.reference is not None:
            return self.reference
        assert self.held is not None
        return self.held.samples

    def measure(self, run: Run, score: Any, measurement: ProbeMeasurement) -> tuple[Tensor, Tensor] | None:
        """With a reference tensor: this rank's ``(d₁/d₂ [r], nearest item [r])``."""
        if self.reference is None:
            return None
        dist, idx = nearest_neighbours(measurement.samples, self.reference)
        return ratio_of(dist).float(), idx[:, 0]

    def contribute(self, run: Run, draft: Draft, measured: tuple[Tensor, Tensor] | None) -> None:
        if measured is not None:
            ratio, nearest = measured
        else:
            ratio, nearest = self._ratio_from_batches(run, draft.measurement), None
        if bool(run.all_true(bool(torch.isnan(ratio).all()))):
            self._few_samples(run)
            draft.values.update(nan_values(COPY_VALUES))
            return
        draft.with_measurement(nn_ratio=ratio, nearest=nearest)
        draft.fields["copied"] = self._copied(run, draft.measurement)

    def _ratio_from_batches(self, run: Run, measurement: ProbeMeasurement) -> Tensor:
        """``d₁/d₂`` of this rank's probes to the training samples every rank has seen
        (collectives on every rank). A rank that cannot offer its candidates makes every ratio
        NaN, with a warning, never a partial answer."""
        probes = gathered(measurement.samples.to(run.device))  # every rank's, in rank order
        try:
            assert self.held is not None
            held = distinct(self.held.samples) if len(self.held) else probes[:0].double()
            candidates = nearest_candidates(probes, held)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if run.raise_errors and run.world_size == 1:
                raise
            warnings.warn(  # from the rank that failed, which need not be rank zero
                f"memwatch: the probes could not be compared with the training samples seen: {err!r}; their "
                "copy values are NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            candidates = torch.full((probes.shape[0], 2, *probes.shape[1:]), torch.nan, dtype=torch.float64)
        every = gathered(candidates.to(run.device).unsqueeze(0))  # [world, n, 2, *shape]
        ratio = ratio_from_candidates(probes, rearrange(every, "w n c ... -> n (w c) ..."))
        return ratio[shard(self.num_probes, run.world_size, run.rank)].float()

    def _few_samples(self, run: Run) -> None:
        if not self._warned_few:
            self._warned_few = True
            rank_zero_warn(
                f"memwatch: at step {run.step} no probe's d₁/d₂ could be told (fewer than two distinct training "
                "samples to compare with?): nn_memorized_fraction, auroc and flagged_fraction are NaN; the "
                "sharpness values are measured as usual. Warned once"
            )

    def _copied(self, run: Run, measurement: ProbeMeasurement) -> list[CopiedItem]:
        """The reference items every rank's probes copy, most copied first (with a reference tensor)."""
        if measurement.nearest is None or measurement.nn_ratio is None or self.reference is None:
            return []
        flagged = measurement.primary.memorization_score > self.score_threshold
        nearest, ratio, flagged = (
            gathered(v.to(run.device)) for v in (measurement.nearest, measurement.nn_ratio.double(), flagged)
        )
        return copied_items(nearest, ratio, flagged, num_items=len(self.reference), ids=self.options.ids)


def build(monitor: Any) -> CopySignal | None:
    """The copies signal of ``monitor`` (with ``reference_data``)."""
    if monitor.reference_data is None:
        return None
    return CopySignal(
        monitor.copies,
        reference_data=monitor.reference_data,
        data=monitor.data,
        held=monitor.held_samples if monitor.copies_from_batches else None,
        num_probes=monitor.num_probes,
        score_threshold=monitor.sharpness.score_threshold,
    )
