"""Does the budgeted cadence flag any run of the validation study later than the fixed one did?

The study checks every 250 steps and records every check (``--cache`` of
``python -m benchmarks.validation_study``). This replays two cadences on those records, with the
library's default onset rule (:func:`benchmarks.validation_study.analysis.library_rule`):

* **fixed 500**: a check every 500 steps, the default before ``every_n_train_steps="auto"``;
* **budgeted**: :class:`memwatch.cadence.BudgetCadence` at its defaults, fed with the run's own
  costs (its mean training step and its checks' wall times, as recorded) and the training set
  the monitor would count (:class:`memwatch.cadence.SizeCounter` over the run's training rows:
  repeats included; items, on an augmented run). A check it asks for at a step between the
  study's is taken at the next recorded one (never earlier: the replay can only be late).

For each run it prints the interval the budget chose and why, both onsets, and the lead lost
(budgeted onset − fixed onset, in steps; > 0: later). The target of issue 33: no run later
than one fixed interval (500 steps).

    python benchmarks/bench_cadence.py /work/study-cache/runs.pt /work/study-cache/fresh.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks.validation_study.analysis import library_rule
from benchmarks.validation_study.config import AUGMENTED, DEFAULT, library_defaults
from benchmarks.validation_study.runs import RunRecord, load_cache, make_data, training_set
from memwatch.cadence import BudgetCadence, CadenceOptions, DataSize, SizeCounter
from memwatch.index import content_keys

FIXED = 500  #: the former default cadence


def data_size(run: RunRecord) -> DataSize:
    """The training set as the monitor counts it after an epoch: distinct rows and their repeats
    (items on an augmented run, whose views share an id)."""
    if run.dataset in AUGMENTED:
        return DataSize(run.n)
    x, _ = make_data(run.dataset, run.n, run.seed)
    counter = SizeCounter()
    counter.add(content_keys(training_set(run.dataset, x)))
    size = counter.size()
    assert size is not None
    return size


def budget_checks(run: RunRecord, total_steps: int, options: CadenceOptions) -> tuple[list[int], BudgetCadence]:
    """The steps the budgeted cadence checks at on ``run`` (snapped up to recorded checks)."""
    seconds = np.asarray(run.values["check_seconds"], dtype=float)
    steady = float(np.median(seconds[1:])) if seconds.size > 1 else float(seconds[0])
    step_seconds = max(run.seconds - float(seconds.sum()), 1e-9) / total_steps
    recorded = [int(s) for s in run.steps]
    cadence, size, chosen, last = BudgetCadence(options), data_size(run), [], 0
    for step in recorded:
        cadence.train_seconds(step_seconds * (step - last), steps=step - last)
        last = step
        if cadence.due(step):
            chosen.append(step)
            cost = float(seconds[0]) if len(chosen) == 1 else steady
            cadence.checked(step, seconds=cost, steady_seconds=steady, size=size)
    return chosen, cadence


def onset_at(run: RunRecord, checks: list[int], series: np.ndarray) -> int | None:
    """The default rule's onset when only ``checks`` ran."""
    rule = library_rule(library_defaults())
    index = [i for i, s in enumerate(run.steps) if int(s) in set(checks)]
    return rule.detect(np.asarray(run.steps)[index], series[index], library_defaults())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("caches", type=Path, nargs="+", help="study caches (--cache of the validation study)")
    args = parser.parse_args(argv)
    runs, _ = load_cache(*args.caches)
    steps_of = {d.name: d.max_steps for d in DEFAULT.data}
    rule, options = library_rule(library_defaults()), CadenceOptions()
    print(f"{len(runs)} runs; rule: {rule.describe()}; cadence: {options}\n")
    print(f"{'data':>14} {'N':>5} {'seed':>4} {'interval':>8} {'why':>8} {'fixed':>6} {'budget':>6} {'lost':>6}")
    lost, missed, extra = [], 0, 0
    for run in sorted(runs, key=lambda r: (r.dataset, r.n, r.seed)):
        series = rule.series(run)
        fixed = onset_at(run, [int(s) for s in run.steps if int(s) % FIXED == 0], series)
        chosen, cadence = budget_checks(run, steps_of[run.dataset], options)
        budget = onset_at(run, chosen, series)
        delta = None if fixed is None or budget is None else budget - fixed
        if delta is not None:
            lost.append(delta)
        missed += fixed is not None and budget is None
        extra += budget is not None and fixed is None
        gaps = [b - a for a, b in zip(chosen, chosen[1:])]
        interval = f"{statistics.median(gaps):.0f}" if gaps else "-"
        print(
            f"{run.dataset:>14} {run.n:>5} {run.seed:>4} {interval:>8} {cadence.bound:>8} "
            f"{fixed if fixed is not None else '-':>6} {budget if budget is not None else '-':>6} "
            f"{delta if delta is not None else ('missed' if fixed is not None else '-'):>6}"
        )
    print(
        f"\nruns flagged by both: {len(lost)}; budgeted later: {sum(d > 0 for d in lost)} "
        f"(most {max(lost, default=0)} steps), earlier: {sum(d < 0 for d in lost)}; flagged by the fixed cadence "
        f"only: {missed}, by the budgeted only: {extra}; target: no run later than {FIXED} steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
