"""memwatch.signals.alarm: the default onset rule — its per-probe flags, and the rule through real fits."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from callback_setup import datamodule, generalizing_data, memorizing_data, module_2d, trainer

from memwatch import DataOptions, MemorizationMonitor, ProbeOptions, ReportOptions, SharpnessCheckOptions
from memwatch.apps.toymodels import DDPMModule
from memwatch.signals.alarm import AlarmSignal

NAN = math.nan


def test_a_copy_counts_alone_a_peak_only_near_an_item_and_unknown_probes_are_not_told():
    alarm = AlarmSignal(count_threshold=3.0, confirm_ratio=0.5, without=None)
    lid = torch.tensor([9.0, 1.0, 1.0, 9.0, NAN, NAN, 1.0])
    ratio = torch.tensor([0.2, 0.45, 0.6, 0.45, 0.1, 0.45, NAN])
    counted, told = alarm.flags(lid, ratio, dim=64)
    assert counted.tolist() == [True, True, False, False, True, False, False]
    assert told.tolist() == [True, True, True, True, True, False, False]  # a copy is told by its ratio alone


def test_without_training_samples_a_peak_counts_and_the_rule_says_why():
    alarm = AlarmSignal(count_threshold=3.0, confirm_ratio=0.5, without="reference_data=None")
    counted, told = alarm.flags(torch.tensor([1.0, 5.0, NAN]), None, dim=64)
    assert counted.tolist() == [True, False, False] and told.tolist() == [True, True, False]
    assert alarm.rule(64) == "isolated peaks (LID < 3); no training samples compared: reference_data=None"


def test_a_peak_is_below_a_quarter_of_the_dimensions_for_data_of_few():
    alarm = AlarmSignal(count_threshold=3.0, confirm_ratio=0.5, without=None)
    assert alarm.peak_threshold(2) == 0.5 and alarm.peak_threshold(16) == 3.0
    counted, _ = alarm.flags(torch.tensor([1.0, 0.2]), torch.tensor([0.45, 0.45]), dim=2)
    assert counted.tolist() == [False, True]  # a 2-D model's LID of 1 is a curve, not a peak
    assert "LID < 0.5" in alarm.rule(2)


def _monitor(**kwargs) -> MemorizationMonitor:
    """The defaults, but checks every 100 steps on few probes and k = 2 of d = 2 (the rule itself is the default)."""
    kwargs.setdefault("report", ReportOptions(figures=False, verbose=True, raise_errors=True))
    return MemorizationMonitor(
        every_n_train_steps=100,
        num_probes=16,
        probes=ProbeOptions(sampler_steps=20),
        sharpness=SharpnessCheckOptions(k=2),
        **kwargs,
    )


@pytest.fixture
def console(caplog):
    """The monitor's console lines (Lightning's rank-zero logger, which does not propagate)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level  # the suite keeps Lightning quiet (conftest): let the monitor's lines through here
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    yield lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("memwatch step")]
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_the_default_rule_fires_on_copies_and_says_which_rule_decided(tmp_path, console):
    monitor = _monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], max_steps=400).fit(module_2d(), datamodule(memorizing_data()))
    assert monitor.detector.monitor == "alarm_fraction" and monitor.onset_step is not None
    last = monitor.history[-1]
    assert 0 <= last["alarm_fraction"] <= 1 and last["alarm_fraction"] >= last["nn_memorized_fraction"] > 0.3
    alert = [str(w.message) for w in caught if "memorization onset" in str(w.message)]
    assert len(alert) == 1 and "by copies (d₁/d₂ < 1/3) or isolated peaks (LID < 0.5)" in alert[0]
    lines = console()
    assert lines and "by copies (d₁/d₂ < 1/3)" in lines[-1]


def test_the_default_rule_stays_quiet_on_a_model_that_does_not_copy(tmp_path):
    monitor = _monitor()
    trainer(tmp_path, [monitor], max_steps=600).fit(module_2d(), datamodule(generalizing_data()))
    values = [h["alarm_fraction"] for h in monitor.history]
    assert len(values) == 6 and all(0 <= v <= 0.1 for v in values), values
    assert monitor.onset_step is None and monitor.clean_step == 600


def test_without_training_samples_the_rule_decides_on_peaks_and_holds_nothing(tmp_path, console):
    monitor = _monitor(reference_data=None, sigmas=(0.2,))
    trainer(tmp_path, [monitor], max_steps=200).fit(module_2d(), datamodule(generalizing_data()))
    assert "copies" not in monitor.signals and monitor.held_samples is None
    assert all(math.isfinite(h["alarm_fraction"]) and "nn_memorized_fraction" not in h for h in monitor.history)
    lines = console()
    assert lines and "no training samples compared: reference_data=None" in lines[-1]


class FirstTwo(DDPMModule):
    """Trains on the first two numbers of each row of its batches."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[0][:, :2], batch_idx)


def test_batches_outside_the_probes_space_are_refused_once_and_the_rule_says_so(tmp_path):
    """Explicit levels (nothing to calibrate): batches the monitor cannot compare with the probes
    (here 4 numbers a row, probes of 2, no `data.encode_fn`) are refused with one warning, and the
    rule decides on isolated peaks alone — no crash, no second warning for the same cause."""
    points = torch.cat([generalizing_data(), torch.zeros(2000, 2)], 1)  # [2000, 4]: the model reads the first 2
    monitor = _monitor(sigmas=(0.2,), data=DataOptions(sample_shape=(2,)))
    module = FirstTwo(shape=(2,), hidden=128, depth=2, lr=2e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], max_steps=200).fit(module, datamodule(points))
    said = [str(w.message) for w in caught if "memwatch" in str(w.message)]
    refused = [m for m in said if "holds and compares no training samples" in m]
    assert len(refused) == 1 and "shape (4,)" in refused[0], said
    others = ("d₁/d₂ could be told", "LID signal has no data LID (", "no probe has a finite")
    assert not [m for m in said if any(o in m for o in others)], said
    assert monitor.last_check.rule.endswith("the training batches are not in the probes' space (pass `data.encode_fn`)")
    assert all(math.isfinite(h["alarm_fraction"]) for h in monitor.history)
