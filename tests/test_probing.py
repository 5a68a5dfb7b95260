"""The measuring half of the monitor: found once, fitted to given training samples, measured by its meter."""

from __future__ import annotations

import math

import pytest
import torch
from callback_setup import memorizing_data, module_2d

from memwatch import DataOptions, MemwatchError, Monitor
from memwatch.signals import CalibrationSignal, LidSignal
from memwatch.signals.registry import find

FAST = dict(num_probes=4, sampler_steps=5, k=1, verbose=False, raise_errors=True)


def test_given_samples_fix_the_levels_and_the_data_lid_at_them():
    module, samples = module_2d(), memorizing_data()
    monitor = Monitor(reference_data=None, **FAST)
    with pytest.raises(MemwatchError, match=r"call prepare\(pl_module\) first"):
        monitor.fit_data(samples)
    monitor.prepare(module)
    assert monitor.pending and monitor.meter.timesteps == []  # the levels wait for the data
    monitor.fit_data(samples)
    calibration, lid = find(monitor.signals, CalibrationSignal), find(monitor.signals, LidSignal)
    assert not monitor.pending and monitor.calibrated_sigmas == calibration.sigmas
    scale, levels = calibration.levels_for(samples, module.schedule)
    assert monitor.calibrated_sigmas == levels and monitor.data_scale == scale
    assert list(lid.reference) == monitor.meter.timesteps and len(monitor.meter.timesteps) == len(levels)
    assert all(0 < v <= 2 for v in lid.reference.values())


def test_fixed_levels_are_kept_and_only_the_data_lid_is_fitted():
    module, samples = module_2d(), memorizing_data()
    monitor = Monitor(reference_data=None, sigmas=(0.2,), **FAST)
    monitor.prepare(module)
    timesteps = list(monitor.meter.timesteps)
    assert monitor.pending and len(timesteps) == 1 and find(monitor.signals, CalibrationSignal) is None
    monitor.fit_data(samples)
    assert not monitor.pending and monitor.calibrated_sigmas is None and monitor.meter.timesteps == timesteps
    with pytest.raises(MemwatchError, match='calibrate\\(\\) needs sigmas="auto"'):
        monitor.calibrate(samples)


def test_a_check_measured_by_the_meter_is_the_monitors_measurement():
    module = module_2d()
    monitor = Monitor(reference_data=None, sigmas=(0.2,), data=DataOptions(sample_shape=(2,)), **FAST)
    samples, results = monitor.measure_probes(module.eval())
    assert samples.shape == (4, 2) and list(results) == monitor.meter.timesteps
    assert monitor.meter.max_batch is not None and not monitor.meter.tiered
    fraction = results[monitor.meter.timesteps[0]].sharp_fraction
    assert fraction.shape == (4,) and all(0 <= float(f) <= 1 for f in fraction if math.isfinite(float(f)))
    torch.testing.assert_close(monitor.measure_probes(module)[0], samples)  # the same probes every time
