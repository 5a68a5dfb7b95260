"""How a monitor's signals are composed: their typed context, their declared order, a new signal's one registration."""

from __future__ import annotations

import pytest
import torch
from callback_setup import fit, memorizing_data, module_2d

from memwatch import CheckpointOptions, MemorizationMonitor, MemwatchError, Monitor
from memwatch.signals import registry
from memwatch.signals.base import Draft, Run, Signal
from memwatch.signals.context import SignalContext

FAST = dict(num_probes=8, sampler_steps=10, k=2, verbose=False, raise_errors=True)


class ProbeNorm(Signal):
    """A signal written as a user would add one: the probes' mean norm, logged and kept as its reading."""

    name = "probe_norm"
    value_names = ("probe_norm_mean",)

    def __init__(self, num_probes: int) -> None:
        self.num_probes, self.checks = num_probes, 0

    def contribute(self, run: Run, draft: Draft, measured: object) -> torch.Tensor:
        norms = draft.measurement.samples.flatten(1).norm(dim=1)
        draft.values["probe_norm_mean"] = float(norms.mean())
        self.checks += 1
        return norms

    def state_dict(self) -> dict[str, int]:
        return {"checks": self.checks}


def build(context: SignalContext) -> ProbeNorm:
    return ProbeNorm(context.num_probes)


def test_a_new_signal_is_its_module_and_one_registration(tmp_path, monkeypatch):
    *others, consistency = registry.FACTORIES
    monkeypatch.setattr(registry, "FACTORIES", (*others, build, consistency))  # the one line, before the last
    monitor = MemorizationMonitor(every_n_train_steps=10, sigmas=(0.2,), **FAST)
    fit(tmp_path, memorizing_data(), monitor, max_steps=20)
    check = monitor.last_check
    assert [h["step"] for h in monitor.history] == [10.0, 20.0]
    assert monitor.history[-1]["probe_norm_mean"] == pytest.approx(float(check.samples.norm(dim=1).mean()))
    torch.testing.assert_close(check.readings["probe_norm"], check.samples.norm(dim=1))  # its reading, by its name
    assert check.lid is check.readings["lid"] and check.rule == check.readings["alarm"].rule
    assert monitor.state_dict()["signals"]["probe_norm"] == {"checks": 2}
    assert list(monitor.signals)[-2:] == ["probe_norm", "consistency"]


def test_the_declared_order_holds_whatever_the_registration_order(monkeypatch):
    monkeypatch.setattr(registry, "FACTORIES", tuple(reversed(registry.FACTORIES)))  # the consistency check first
    order = list(Monitor(**FAST).signals)
    assert order[-1] == "consistency"  # last by its own declaration (after every other)
    assert order.index("calibration") < order.index("lid")
    assert order.index("copies") < min(order.index("sharpness"), order.index("alarm"))


def test_a_circular_order_is_refused(monkeypatch):
    class First(ProbeNorm):
        name, after = "first", ("second",)

    class Second(ProbeNorm):
        name, after = "second", ("first",)

    monkeypatch.setattr(registry, "FACTORIES", (lambda c: First(1), lambda c: Second(1)))
    with pytest.raises(MemwatchError, match=r"circular: \[\('first', \('second',\)\), \('second', \('first',\)\)\]"):
        Monitor(**FAST)


def test_the_context_offers_the_monitors_services_not_the_monitor(monkeypatch):
    seen: list[SignalContext] = []
    monkeypatch.setattr(registry, "FACTORIES", (*registry.FACTORIES, lambda c: seen.append(c)))
    data = memorizing_data()
    monitor = Monitor(every_n_train_steps=10, reference_data=data, checkpoint=CheckpointOptions(save=False), **FAST)
    (context,) = seen
    assert (context.num_probes, context.seed, context.calibrating) == (8, monitor.probes.seed, True)
    assert context.held() is monitor.held_samples and not context.copies_from_batches
    assert context.timesteps() == [] and context.max_batch() is None
    monitor.start(module_2d(hidden=16, depth=1))
    context.use_levels((0.3,))  # what the calibration does with its levels
    assert context.timesteps() == monitor.meter.timesteps and len(context.timesteps()) == 1
    monitor.observe(data, 0)  # the probe shape: the reference is checked in the probes' space
    torch.testing.assert_close(context.training_samples(), data)
    assert context.max_batch() == monitor.meter.max_batch is not None  # the meter's bound, resolved at the start


def test_a_signal_that_fails_is_unmeasured_alone_and_named(tmp_path, monkeypatch):
    class Failing(ProbeNorm):
        name, value_names = "failing", ("failing_value",)

        def measure(self, run: Run, score, measurement) -> None:
            raise RuntimeError("broken on purpose")

    monkeypatch.setattr(registry, "FACTORIES", (*registry.FACTORIES, lambda c: Failing(c.num_probes)))
    monitor = MemorizationMonitor(every_n_train_steps=10, sigmas=(0.2,), **dict(FAST, raise_errors=False))
    with pytest.warns(RuntimeWarning, match=r"the failing signal failed at step 10: RuntimeError\('broken"):
        fit(tmp_path, memorizing_data(), monitor, max_steps=10)
    (values,) = monitor.history
    assert values["failing_value"] != values["failing_value"]  # NaN
    assert 0 <= values["sharp_fraction_mean"] <= 1 and "failing" not in monitor.last_check.readings


def test_find_gives_the_composed_signal_of_a_type():
    from memwatch.signals import CalibrationSignal, LossGapSignal

    monitor = Monitor(**FAST)
    assert registry.find(monitor.signals, CalibrationSignal) is monitor.signals["calibration"]
    assert registry.find(monitor.signals, LossGapSignal) is None  # left out by the default settings
