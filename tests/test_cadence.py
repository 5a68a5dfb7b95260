"""The budgeted cadence (memwatch.cadence): the account against a hand computation, the ceiling
from the training set's effective size, the floor, the one-time costs paid off, and the sizes
counted from keys (repeats included)."""

from __future__ import annotations

import math

import pytest
import torch

from memwatch.cadence import BudgetCadence, CadenceOptions, DataSize, SizeCounter


def _run(cadence: BudgetCadence, steps: int, step_seconds: float, check_seconds, steady, size=None) -> list[int]:
    """Simulate ``steps`` steps of ``step_seconds``; a check at step s costs ``check_seconds(s)`` (its
    steady part ``steady``). Returns the steps checks ran at."""
    checks = []
    for step in range(1, steps + 1):
        cadence.train_seconds(step_seconds)
        if cadence.due(step):
            checks.append(step)
            cadence.checked(step, seconds=check_seconds(step), steady_seconds=steady, size=size)
    return checks


def test_the_account_keeps_the_checks_within_the_budget_with_the_first_checks_extras_paid_off():
    options = CadenceOptions(budget=0.03, first_check=100, steps_per_sample=1e6, min_steps=1)
    cadence = BudgetCadence(options)
    # steady checks cost 3 s, the first 9 s more (its one-time phases), a step 0.1 s: 1000 steps a check
    checks = _run(cadence, 20_000, 0.1, lambda s: 12.0 if s == 100 else 3.0, 3.0, DataSize(10**6))
    assert checks[0] == 100 and cadence.bound == "budget"
    gaps = [b - a for a, b in zip(checks, checks[1:])]
    assert abs(gaps[0] - (12 + 3 - 0.03 * 10) / (0.03 * 0.1)) <= 1  # the first's extras paid off first
    assert all(abs(g - 1000) <= 1 for g in gaps[1:]), gaps  # then one steady check's worth (float sums: ±1)
    assert cadence.ratio == pytest.approx(0.03, rel=0.05)  # the account: ≤ the budget, less than one check off


def test_the_ceiling_follows_the_effective_size_and_the_floor_holds():
    options = CadenceOptions(budget=0.03, steps_per_sample=15, first_check=500, min_steps=50)
    cadence = BudgetCadence(options)
    assert cadence.ceiling == 500 and cadence.next_step == 500
    cadence.train_seconds(0.5, steps=500)  # 1 ms a step: the budget alone would wait 100 000 steps a check
    cadence.checked(500, seconds=3.0, steady_seconds=3.0, size=DataSize(16))
    assert (cadence.bound, cadence.interval) == ("ceiling", 240)  # 15 steps a sample for 16 samples
    cadence.checked(740, seconds=3.0, steady_seconds=3.0, size=DataSize(5000, largest_repeat=357.0))
    assert (cadence.bound, cadence.interval) == ("ceiling", math.ceil(15 * 5000 / 357))  # a repeated item: 14 samples
    cadence.checked(950, seconds=3.0, steady_seconds=3.0, size=DataSize(2))
    assert (cadence.bound, cadence.interval) == ("ceiling", 50)  # 30 steps, raised to the floor
    assert "ceiling: 15 steps a sample for 2 effective training samples" in cadence.describe()


def test_a_cheap_check_on_a_slow_step_runs_at_the_floor():
    cadence = BudgetCadence(CadenceOptions(budget=0.5, first_check=10, min_steps=50, steps_per_sample=1e6))
    cadence.train_seconds(100.0, steps=10)  # 10 s a step
    cadence.checked(10, seconds=0.1, steady_seconds=0.1, size=DataSize(10**6))
    assert (cadence.bound, cadence.next_step) == ("floor", 60)


def test_ticks_count_optimizer_steps_not_micro_batches(monkeypatch):
    """Gradient accumulation asks ``due`` at every micro-batch of one optimizer step: one tick."""
    import memwatch.cadence as cadence_module

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(cadence_module.time, "perf_counter", lambda: next(clock))
    cadence = BudgetCadence(CadenceOptions())
    for step in (1, 1, 1, 1, 2, 2, 2, 2, 3):  # four micro-batches a step
        cadence.tick(step)
    cadence.spend(0.5)  # the monitor's own time before the next tick is not training
    cadence.tick(4)
    assert cadence.step_seconds == pytest.approx((2.0 + 0.5) / 3)  # ticks at 0, 1, 2, then 3 less 0.5 spent


def test_its_state_round_trips_and_another_ranks_next_step_is_taken():
    cadence = BudgetCadence(CadenceOptions())
    cadence.train_seconds(50.0, steps=500)
    cadence.checked(500, seconds=4.0, steady_seconds=3.0, size=DataSize(1024, 1.5))
    again = BudgetCadence(CadenceOptions())
    again.load_state_dict(cadence.state_dict())
    assert again.state_dict() == cadence.state_dict() and again.describe() == cadence.describe()
    again.use_next_step(777)
    assert not again.due(776) and again.due(777)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(budget=0.0), "cadence.budget"),
        (dict(budget=1.0), "cadence.budget"),
        (dict(steps_per_sample=0), "cadence.steps_per_sample"),
        (dict(first_check=0), "cadence.first_check"),
        (dict(min_steps=0), "cadence.min_steps"),
    ],
)
def test_bad_options_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CadenceOptions(**kwargs)


def test_sizes_are_counted_exactly_with_repeats_across_batches():
    counter = SizeCounter()
    assert counter.size() is None
    counter.add(torch.arange(5000))
    counter.add(torch.tensor([7, 8, 9, 10] * 500))  # four items repeated 500 more times
    size = counter.size()
    assert size.samples == 5000 and size.largest_repeat == pytest.approx(501 / (7000 / 5000))
    assert size.effective == pytest.approx(5000 / size.largest_repeat)
    counter.add(torch.tensor([10**12]))
    assert counter.size().samples == 5001


# ------------------------------------------------------------------ through a real fit, at the defaults
def test_the_default_cadence_through_a_fit_says_the_cadence_in_force_and_keeps_it_on_resume(tmp_path, caplog):
    """``every_n_train_steps="auto"`` (the default): the first check at ``cadence.first_check``, the
    next ones within the ceiling of a 4-point training set, logged as ``cadence_steps`` and said in
    the result line; a resumed fit keeps the account."""
    import logging

    from callback_setup import fit, memorizing_data

    from memwatch import MemorizationMonitor, SharpnessCheckOptions

    options = CadenceOptions(first_check=20, steps_per_sample=5, min_steps=10)
    monitor = MemorizationMonitor(every_n_train_steps=options, num_probes=8, sharpness=SharpnessCheckOptions(k=2))
    assert monitor.every_n_train_steps == "auto" and monitor.budget is not None
    logging.getLogger("lightning.pytorch").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    try:
        fit(tmp_path, memorizing_data(), monitor, max_steps=80)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(caplog.handler)
    steps = [int(h["step"]) for h in monitor.history]
    assert steps[0] == 20 and len(steps) >= 3, steps
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert all(10 <= g <= 20 for g in gaps), gaps  # 5 steps a sample for 4 samples: the ceiling, 20
    assert all(h["cadence_steps"] == 20 and math.isfinite(h["sharp_fraction_mean"]) for h in monitor.history)
    lines = [r.getMessage() for r in caplog.records if "sharp fraction" in r.getMessage()]
    assert lines and "next check in 20 steps (ceiling: 5 steps a sample for 4 effective training samples" in lines[-1]
    again = MemorizationMonitor(every_n_train_steps=options, num_probes=8, sharpness=SharpnessCheckOptions(k=2))
    again.load_state_dict(monitor.state_dict())
    assert again.budget.next_step == monitor.budget.next_step and again.budget.describe() == monitor.budget.describe()
