"""The conditional signal: which condition of a classifier-free-guidance model memorizes first.

With ``probes.conditions`` each check also draws ``num_probes`` probes per condition (the same
seeds for every condition; :meth:`memwatch.probes.ProbeSet.measure`) and this signal logs, per
condition, ``cond/{c}/hessian_score_diff`` (Jeon et al.'s ``‖H_c s_Δ − H_uc s_Δ‖``),
``cond/{c}/score_diff`` (Wen et al.'s ``‖s_Δ‖``), ``cond/{c}/sharp_fraction_mean`` and
``most_memorized_condition`` (the condition with the highest Hessian-weighted score difference:
its label for int labels, else its index); see :mod:`memwatch.conditional`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from memwatch.conditional import condition_keys
from memwatch.metrics import ConditionalMetrics
from memwatch.probes import CONDITION_METRICS
from memwatch.signals.base import Draft, Run, Signal
from memwatch.signals.context import SignalContext

__all__ = ["ConditionalReading", "ConditionalSignal"]


@dataclass(frozen=True)
class ConditionalReading:
    """The conditional signal's reading of one check.

    Attributes:
        conditions: condition name → its metric means over every rank's probes.
        most_memorized: the condition with the largest Hessian-weighted score difference.
    """

    conditions: dict[str, dict[str, float]]
    most_memorized: str | None


class ConditionalSignal(Signal):
    """Per-condition metrics over every rank's probes (see the module docstring); the conditions
    are measured by the monitor's meter (:class:`memwatch.meter.ProbeMeter`)."""

    name = "conditional"
    value_names = ("most_memorized_condition",)

    def __init__(self) -> None:
        self._metrics = ConditionalMetrics(ranking_metric=CONDITION_METRICS.index("hessian_score_diff"))

    def contribute(self, run: Run, draft: Draft, measured: object) -> ConditionalReading | None:
        per_condition = draft.measurement.conditional
        if per_condition is None:
            return None
        table, top = self._means(per_condition, run.device)
        keys = condition_keys(table)
        for name, metrics in table.items():
            draft.values.update({f"cond/{keys[name]}/{m}": v for m, v in metrics.items()})
        draft.values["most_memorized_condition"] = condition_number(list(table), top)
        return ConditionalReading(table, top)

    def _means(
        self, per_condition: Mapping[str, Mapping[str, Tensor]], device: torch.device
    ) -> tuple[dict[str, dict[str, float]], str | None]:
        """Per-condition means over every rank's probes and the most memorized condition."""
        names = list(per_condition)
        per_probe = torch.stack(
            [torch.stack([per_condition[c][m].to(torch.float64) for m in CONDITION_METRICS], 1) for c in names], 1
        )  # [r, C, M]
        metric = self._metrics.to(device)
        metric.reset()
        metric.update(per_probe.to(device))
        means, top = metric.compute()
        table = {c: {m: float(means[i, j]) for j, m in enumerate(CONDITION_METRICS)} for i, c in enumerate(names)}
        return table, (names[int(top)] if int(top) >= 0 else None)


def condition_number(names: list[str], top: str | None) -> float:
    """The most memorized condition as a scalar: its label for int labels, else its index."""
    if top is None:
        return math.nan
    return float(top) if all(n.lstrip("-").isdigit() for n in names) else float(names.index(top))


def build(context: SignalContext) -> ConditionalSignal | None:
    """The conditional signal (with ``probes.conditions``)."""
    return None if context.probes.conditions is None else ConditionalSignal()
