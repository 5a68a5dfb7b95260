"""The alarm: the share of probes the default onset rule counts (``alarm_fraction``, ``onset.on="auto"``).

The rule uses what the monitor can see:

* **with training samples to compare with** (the copy index of :mod:`memwatch.signals.copies`:
  ``reference_data="batches"``, the default, or a reference tensor) a probe counts when it
  *copies* a training item — ``d₁/d₂ < 1/3``, the literature's rule (Carlini et al. 2023; Bonnaire
  et al. 2025) — or when it is *converging onto* one: an isolated peak (its LID at the primary
  level below ``sharpness.lid.count_threshold`` dimensions, and below ``d/4`` for data of few
  dimensions, where a count of 3 would call a generalizing 2-D model a peak) whose nearest training item is close
  (``d₁/d₂ < onset.confirm_ratio``). Sharpness thus leads and is confirmed by proximity; alone it
  never decides (a generalizing model on thin data is sharp too: ``docs/validation.md``);
* **without** (``reference_data=None``, or training batches the monitor cannot compare with the
  probes) a probe counts when its LID is below the count threshold — study v3's best rule without
  training data (no false alarm on its held-out seeds).

A check where the copy ratios could not be told (fewer than two distinct training items held, a
failed search: the copies signal warns), or where fewer probes than ``onset.min_valid_fraction``
could be told (a copy is told by its ratio alone; any other probe needs its LID too — the
sharpness signal warns of probes it lost), reads NaN: it is neither clean nor counted, and the
rule never switches to the other side on its own. The rule in force is said in words (:meth:`AlarmSignal.rule`)
in the result line, the onset alert and ``memwatch fit``'s summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from memwatch.groundtruth import MEMORIZED_RATIO
from memwatch.intake import TrainingSamples
from memwatch.signals.base import Draft, Run, Signal
from memwatch.signals.context import SignalContext

__all__ = ["AlarmReading", "AlarmSignal"]


@dataclass(frozen=True)
class AlarmReading:
    """The alarm's reading of one check.

    Attributes:
        rule: the default onset rule in words, as it decided (:meth:`AlarmSignal.rule`).
        counted: ``[n]`` bool, this rank's probes the rule counts (``None`` where it could not tell them).
    """

    rule: str
    counted: Tensor | None


class AlarmSignal(Signal):
    """The default onset rule's share of the probes (see the module docstring).

    Args:
        count_threshold: a probe is an isolated peak when its LID is below this (dimensions).
        confirm_ratio: with training samples: an isolated peak counts when its ``d₁/d₂`` is below this.
        without: why no training samples are compared (e.g. ``"reference_data=None"``), or
            ``None`` when the copy index is there.
        held: the training samples the copy index is fed from (``reference_data="batches"``): when
            it refuses the batches (not in the probes' space), the rule decides without them.
        min_valid_fraction: fewer probes told than this share of ``num_probes`` is a failed check (NaN).
        num_probes: probes per check, over every rank.
    """

    name = "alarm"
    after = ("copies",)  # it counts the copies' ratios
    value_names = ("alarm_fraction",)

    def __init__(
        self,
        count_threshold: float,
        confirm_ratio: float,
        without: str | None,
        held: TrainingSamples | None = None,
        *,
        min_valid_fraction: float = 0.0,
        num_probes: int = 1,
    ) -> None:
        self.count_threshold = count_threshold
        self.confirm_ratio = confirm_ratio
        self.without = without
        self.held = held
        self.min_valid_fraction = min_valid_fraction
        self.num_probes = num_probes

    def rule(self, dim: int) -> str:
        """The rule in words for samples of ``dim`` dimensions, as the result line and the onset alert say it."""
        peak = f"isolated peaks (LID < {self.peak_threshold(dim):g})"
        if self.without is None:
            return f"copies (d₁/d₂ < 1/3) or {peak} near a training item (d₁/d₂ < {self.confirm_ratio:g})"
        return f"{peak}; no training samples compared: {self.without}"

    def peak_threshold(self, dim: int) -> float:
        """The LID below which a probe of ``dim`` dimensions is an isolated peak: ``min(count_threshold, dim / 4)``."""
        return min(self.count_threshold, dim / 4)

    def flags(self, lid: Tensor, nn_ratio: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
        """Per probe ``[n]``: ``(counted, told)`` — whether the rule counts it, and whether it could
        be told (with training samples: a copy by its ratio alone, any other probe by its ratio and
        its LID; without: by its LID).

        Example:
            >>> signal = AlarmSignal(count_threshold=3.0, confirm_ratio=0.5, without=None)
            >>> nan = float("nan")
            >>> lid, ratio = torch.tensor([1.0, 1.0, 9.0, 1.0, nan, nan]), torch.tensor([0.2, 0.4, 0.2, 0.9, 0.1, 0.4])
            >>> signal.flags(lid, ratio, dim=64)
            (tensor([ True,  True,  True, False,  True, False]), tensor([ True,  True,  True,  True,  True, False]))
        """
        peak = lid < self.peak_threshold(dim)
        if self.without is not None:
            return peak, torch.isfinite(lid)
        assert nn_ratio is not None
        ratio = nn_ratio.to(lid.device, torch.float64)
        copy = ratio < MEMORIZED_RATIO
        counted = copy | (peak & (ratio < self.confirm_ratio))
        return counted, copy | (torch.isfinite(ratio) & torch.isfinite(lid))

    def contribute(self, run: Run, draft: Draft, measured: object) -> AlarmReading:
        m = draft.measurement
        if self.without is None and self.held is not None and self.held.refused:
            self.without = "the training batches are not in the probes' space (pass `data.encode_fn`)"
        dim = math.prod(m.samples.shape[1:])
        if self.without is None and m.nn_ratio is None:  # the copies were not told at this check
            draft.values["alarm_fraction"] = math.nan
            return AlarmReading(self.rule(dim), None)
        counted, told = self.flags(m.primary.lid.double(), m.nn_ratio, dim)
        hits, n = _synced_sums(counted & told, told, run.device)
        valid = n > 0 and n >= self.min_valid_fraction * self.num_probes
        draft.values["alarm_fraction"] = hits / n if valid else math.nan
        return AlarmReading(self.rule(dim), (counted & told).cpu())


def _synced_sums(hits: Tensor, told: Tensor, device: torch.device) -> tuple[float, float]:
    """``(hits.sum(), told.sum())`` over every rank's probes."""
    from torchmetrics.aggregation import SumMetric

    total, count = SumMetric().to(device), SumMetric().to(device)  # synced over ranks on compute
    total.update(hits.double().sum().to(device))
    count.update(told.double().sum().to(device))
    return float(total.compute()), float(count.compute())


def build(context: SignalContext) -> AlarmSignal:
    """The alarm (always: ``alarm_fraction`` is logged whatever ``onset.on`` watches)."""
    without = None if context.reference_data is not None else "reference_data=None"
    held = context.held() if context.copies_from_batches else None
    return AlarmSignal(
        context.sharpness.lid.count_threshold,
        context.onset.confirm_ratio,
        without,
        held,
        min_valid_fraction=context.onset.min_valid_fraction,
        num_probes=context.num_probes,
    )
