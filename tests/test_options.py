"""The monitor's option groups: validated where they are built, read by jsonargparse as nested
groups and YAML sections, and the flat names of memwatch 0.1 still working with a warning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml
from jsonargparse import ArgumentParser

from memwatch import (
    CheckpointOptions,
    CopyOptions,
    DataOptions,
    LossGapOptions,
    MemorizationMonitor,
    OnsetOptions,
    ProbeOptions,
    ReportOptions,
    SharpnessCheckOptions,
)
from memwatch.options import LEGACY_NAMES, MemwatchDeprecationWarning

GROUPS = {
    "data": DataOptions,
    "probes": ProbeOptions,
    "sharpness": SharpnessCheckOptions,
    "onset": OnsetOptions,
    "copies": CopyOptions,
    "loss_gap": LossGapOptions,
    "checkpoint": CheckpointOptions,
    "report": ReportOptions,
}


def test_the_constructor_takes_at_most_15_settings():
    import inspect

    params = [p for p in inspect.signature(MemorizationMonitor).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(params) <= 15, [p.name for p in params]
    assert {p.name for p in params} >= set(GROUPS)


def test_every_flat_name_has_a_field_in_its_group():
    for name, (group, field) in LEGACY_NAMES.items():
        assert field in {f.name for f in dataclasses.fields(GROUPS[group])}, name


@pytest.mark.parametrize(
    "flat, group, field, value",
    [
        ("onset_threshold", "onset", "threshold", 0.05),
        ("patience", "onset", "patience", 1),
        ("sampler_steps", "probes", "sampler_steps", 10),
        ("k", "sharpness", "k", 2),
        ("score_threshold", "sharpness", "score_threshold", 0.5),
        ("log_media", "report", "media", True),
        ("batch_key", "data", "select", "image"),
        ("calibration_capacity", "data", "capacity", 64),
        ("save_clean_checkpoint", "checkpoint", "save", False),
        ("loss_gap_sigmas", "loss_gap", "sigmas", (0.2,)),
    ],
)
def test_a_flat_name_lands_in_its_group_with_a_warning_naming_the_new_place(flat, group, field, value):
    with pytest.warns(MemwatchDeprecationWarning, match=rf"`{flat}=` is deprecated.*{group}=\w+\({field}=\.\.\.\)"):
        monitor = MemorizationMonitor(**{flat: value})
    got = getattr(getattr(monitor, group), field)
    assert got == (tuple(value) if isinstance(value, list) else value)


def test_flat_and_grouped_settings_build_the_same_monitor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemwatchDeprecationWarning)
        flat = MemorizationMonitor(onset_threshold=0.1, patience=1, sampler_steps=10, k=2, condition_first_steps=5)
    grouped = MemorizationMonitor(
        onset=OnsetOptions(threshold=0.1, patience=1),
        probes=ProbeOptions(sampler_steps=10, condition_first_steps=5),
        sharpness=SharpnessCheckOptions(k=2),
    )
    for group in GROUPS:
        a, b = getattr(flat, group), getattr(grouped, group)
        fields = [f.name for f in dataclasses.fields(a)]
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_an_unknown_name_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['onset_treshold'\\]"):
        MemorizationMonitor(onset_treshold=0.1)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: OnsetOptions(threshold=1.5), r"`onset.threshold` must be a number in \[0, 1\), got 1.5"),
        (
            lambda: OnsetOptions(on="loss"),
            r"`onset.on` must be one of \['auto', 'copies', 'either', 'lid', 'sharpness'\]",
        ),
        (lambda: OnsetOptions(min_valid_fraction=0), r"`onset.min_valid_fraction` must be a number in \(0, 1\]"),
        (lambda: ProbeOptions(sampler_steps=1), r"`probes.sampler_steps` must be an integer >= 2, got 1"),
        (lambda: ProbeOptions(sigma_factors=()), r"`probes.sigma_factors` must be a non-empty sequence"),
        (lambda: ProbeOptions(condition_first_steps=60), r"`probes.condition_first_steps` must be an integer in"),
        (lambda: DataOptions(select=-1), r"`data.select` as a tuple index must be an integer >= 0, got -1"),
        (lambda: DataOptions(sample_shape=(3, 0)), r"`data.sample_shape` must be a non-empty shape"),
        (lambda: DataOptions(integer_range=(1, -1)), r"`data.integer_range` must be None or \(low, high\)"),
        (lambda: DataOptions(capacity=1), r"`data.capacity` must be an integer >= 2, got 1"),
        (lambda: SharpnessCheckOptions(score_threshold=2), r"`sharpness.score_threshold` must be a number in"),
        (lambda: SharpnessCheckOptions(spectrum_every_n_checks=0), r"`sharpness.spectrum_every_n_checks` must be"),
        (lambda: SharpnessCheckOptions(k=0), r"`k` must be a positive integer, got 0"),
        (lambda: CheckpointOptions(mode="all"), r"`checkpoint.mode` must be one of"),
        (lambda: ReportOptions(media="yes"), r"`report.media` must be True or False, got 'yes'"),
        (lambda: LossGapOptions(sigmas=(0.1, -1)), r"`loss_gap.sigmas` must hold finite positive numbers"),
    ],
)
def test_each_group_checks_its_own_fields(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_groups_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OnsetOptions().threshold = 0.1  # type: ignore[misc]


def test_settings_that_need_each_other_fail_at_construction():
    with pytest.raises(ValueError, match="`onset.on`='copies' needs training samples"):
        MemorizationMonitor(reference_data=None, onset=OnsetOptions(on="copies"))
    with pytest.raises(ValueError, match="`copies.ids` name the items"):
        MemorizationMonitor(reference_data="batches", copies=CopyOptions(ids=[1, 2]))
    with pytest.raises(ValueError, match="`loss_gap.heldout_data` is one side of the loss gap"):
        import torch

        MemorizationMonitor(reference_data=None, loss_gap=LossGapOptions(heldout_data=torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="`data.ids` name the items of the training batches' views"):
        MemorizationMonitor(reference_data=None, data=DataOptions(ids="idx"))
    with pytest.raises(ValueError, match=r"`onset.confirm_ratio` must be a number in \(1/3, 1\], got 0.2"):
        OnsetOptions(confirm_ratio=0.2)


def test_jsonargparse_reads_the_groups_as_nested_options_and_yaml_sections():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MemorizationMonitor, "monitor")
    args = parser.parse_args(
        ["--monitor.onset.threshold", "0.05", "--monitor.onset.patience", "1", "--monitor.probes.sampler_steps", "10"]
    )
    monitor = parser.instantiate_classes(args).monitor
    assert (monitor.onset.threshold, monitor.onset.patience, monitor.probes.sampler_steps) == (0.05, 1, 10)
    assert monitor.sharpness == SharpnessCheckOptions()  # untouched groups keep their defaults
    section = {"monitor": {"every_n_train_steps": 50, "sharpness": {"k": 3}, "report": {"media": True}}}
    monitor = parser.instantiate_classes(parser.parse_string(yaml.safe_dump(section))).monitor
    assert (monitor.every_n_train_steps, monitor.sharpness.k, monitor.report.media) == (50, 3, True)
    with pytest.raises(Exception, match="onset"):  # a value out of range is refused, naming the group
        parser.instantiate_classes(parser.parse_args(["--monitor.onset.threshold", "3"]))
