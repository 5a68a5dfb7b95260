"""Copies over DDP ranks (every rank's copy index, merged) and ``reference_data="batches"``: probes
compared with the training samples seen."""

from __future__ import annotations

import math

import pytest
import torch
from callback_setup import CORNERS, datamodule, memorizing_data, module_2d, trainer
from wandb_offline import find_offline_run, history_values, read_history

from memwatch import MemorizationMonitor
from memwatch.errors import MemwatchError
from memwatch.groundtruth import nn_ratio
from memwatch.index import CopyIndex, Hits, IndexOptions, merge_hits, ratio


def _hits(probes: torch.Tensor, shard: torch.Tensor) -> Hits:
    index = CopyIndex(IndexOptions(), tuple(probes.shape[1:]))
    index.add(shard)
    return index.search(probes)


def _union_ratio(probes: torch.Tensor, shards: list[torch.Tensor]) -> torch.Tensor:
    """What the monitor does over ranks: each rank's index of its samples, the hits merged."""
    return ratio(merge_hits([_hits(probes, s) for s in shards]))


def test_the_merged_ratio_is_that_of_the_distinct_union_whichever_rank_saw_which_sample():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 3, 2, generator=g)
    probes = torch.cat([train[:5] + 0.01 * torch.randn(5, 3, 2, generator=g), torch.randn(7, 3, 2, generator=g)])
    # two "ranks": overlapping shards, each with repeats (a sample seen in several epochs)
    shards = [torch.cat([train[:25], train[:10]]), torch.cat([train[15:], train[15:20], train[:3]])]
    expected = nn_ratio(probes, train)
    torch.testing.assert_close(_union_ratio(probes, shards), expected)
    assert (expected[:5] < 1 / 3).all() and (expected[5:] > 1 / 3).all()  # the test can tell copies apart
    # one rank alone with the whole set, repeats included, gives the same
    torch.testing.assert_close(_union_ratio(probes, [torch.cat([train, train])]), expected)


def test_repeats_do_not_hide_a_copy_that_nearest_neighbours_on_the_raw_sample_would():
    train = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]])
    probe = torch.tensor([[0.1, 0.0]])
    assert nn_ratio(probe, train).item() == pytest.approx(1.0)  # the raw repeat hides it
    assert _union_ratio(probe, [train]).item() == pytest.approx(0.1 / 9.9)


def test_too_few_samples_or_a_failed_rank_give_nan_not_a_copy():
    probes = torch.zeros(2, 2)
    assert torch.isnan(_union_ratio(probes, [torch.ones(1, 2)])).all()  # one distinct sample: no d2
    assert torch.isnan(_union_ratio(probes, [torch.ones(3, 2)])).all()  # three repeats of one
    good = _hits(probes, torch.randn(5, 2))
    failed = Hits(torch.full_like(good.distance, torch.nan), torch.full_like(good.key, -1), good.row)
    assert torch.isnan(ratio(merge_hits([good, failed]))).all()  # a rank that could not search: no answer
    with pytest.raises(MemwatchError, match="shape"):
        CopyIndex(IndexOptions(), (2,)).add(torch.randn(4, 3))


def test_reference_data_batches_through_fit_equals_the_training_set_and_decides_onset_on_copies(tmp_path):
    """Four corners, seen in every batch: the monitor's own sample of them is the training set,
    so its ratios and copy share equal those of a monitor given the corners as ``reference_data``."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    runs = {}
    for name, reference in (("batches", "batches"), ("tensor", CORNERS)):
        torch.manual_seed(0)
        monitor = MemorizationMonitor(
            every_n_train_steps=100, num_probes=8, sampler_steps=20, sigmas=(0.2,), k=2,
            reference_data=reference, onset_on="copies",
        )  # fmt: skip
        logger = WandbLogger(save_dir=tmp_path / name, offline=True, project="memwatch-copies")
        trainer(tmp_path / name, [monitor], max_steps=600, logger=logger).fit(
            module_2d(), datamodule(memorizing_data(), batch_size=64)
        )
        logger.experiment.finish()
        runs[name] = monitor
    batches, tensor = runs["batches"], runs["tensor"]
    assert len(batches.history) == 6
    assert [h["nn_memorized_fraction"] for h in batches.history] == [h["nn_memorized_fraction"] for h in tensor.history]
    torch.testing.assert_close(batches.last_check.nn_ratio, tensor.last_check.nn_ratio, rtol=1e-6, atol=1e-7)
    assert all(math.isfinite(h["flagged_fraction"]) for h in batches.history)
    assert batches.onset_step is not None and batches.onset_step == tensor.onset_step
    assert batches.most_copied == []  # a changing sample of the batches has no item ids to report
    logged = history_values(read_history(find_offline_run(tmp_path / "batches")), "memwatch/nn_memorized_fraction")
    assert logged == pytest.approx([h["nn_memorized_fraction"] for h in batches.history])


def test_onset_on_either_fires_no_later_than_sharpness_alone(tmp_path):
    onsets = {}
    for onset_on in ("sharpness", "either"):
        monitor = MemorizationMonitor(
            every_n_train_steps=100, num_probes=8, sampler_steps=20, sigmas=(0.2,), k=2, verbose=False,
            save_clean_checkpoint=False, reference_data="batches", onset_on=onset_on,
        )  # fmt: skip
        trainer(tmp_path / onset_on, [monitor], max_steps=600).fit(
            module_2d(), datamodule(memorizing_data(), batch_size=64)
        )
        onsets[onset_on] = monitor.onset_step
        for h in monitor.history:
            assert h["flagged_fraction"] >= max(h["memorized_fraction"], h["nn_memorized_fraction"])
    assert onsets["either"] is not None and (onsets["sharpness"] is None or onsets["either"] <= onsets["sharpness"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference_data=None, onset_on="copies"), r"`onset.on`='copies' needs training samples .* `reference_data`"),
        (dict(reference_data=None, onset_on="either"), r"`onset.on`='either' needs"),
        (dict(onset_on="nn"), r"`onset.on` must be one of \['auto', 'copies', 'either', 'lid', 'sharpness'\], got 'nn'"),
        (dict(reference_data="batch"), r"`reference_data` must be .* \"batches\" or None, got 'batch'"),
        (dict(reference_data="batches", reference_ids=[0, 1]), r"`copies.ids` name the items"),
        (dict(reference_data="batches", calibration_capacity=1), r"`data.capacity` must be an integer >= 2"),
    ],
)
def test_bad_copy_settings_fail_at_construction_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorizationMonitor(**kwargs)


def test_no_training_sample_is_in_the_state_and_a_resumed_monitor_refills_from_the_batches(tmp_path):
    monitor = MemorizationMonitor(
        every_n_train_steps=50, num_probes=4, sampler_steps=10, sigmas="auto", k=2, verbose=False,
        save_clean_checkpoint=False, reference_data="batches",
    )  # fmt: skip
    trainer(tmp_path, [monitor], max_steps=100).fit(module_2d(), datamodule(memorizing_data(), batch_size=64))
    assert monitor.held_samples is not None and len(monitor.held_samples) > 0  # kept after calibration: still needed
    state = monitor.state_dict()
    assert not any(isinstance(v, torch.Tensor) for v in state.values())
    resumed = MemorizationMonitor(
        every_n_train_steps=50, num_probes=4, sampler_steps=10, sigmas="auto", k=2, verbose=False,
        save_clean_checkpoint=False, reference_data="batches",
    )  # fmt: skip
    resumed.load_state_dict(state)
    assert resumed.calibrated_sigmas == monitor.calibrated_sigmas
    assert resumed.held_samples is not None and len(resumed.held_samples) == 0  # refills from the batches seen next


def test_a_failed_comparison_is_a_warning_and_a_failed_check_never_a_clean_one(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr("memwatch.index.CopyIndex.search", broken)
    monitor = MemorizationMonitor(
        every_n_train_steps=50, num_probes=4, sampler_steps=10, sigmas=(0.2,), k=2, verbose=False,
        save_clean_checkpoint=False, reference_data="batches", onset_on="copies",
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="could not be compared with the training samples: .*injected"):
        trainer(tmp_path, [monitor], max_steps=100).fit(module_2d(), datamodule(memorizing_data(), batch_size=64))
    assert len(monitor.history) == 2
    # only the copies are lost: the sharpness values stand, the onset (on copies) sees NaN, no check is clean
    assert all(math.isnan(h["nn_memorized_fraction"]) for h in monitor.history)
    assert all(math.isfinite(h["memorized_fraction"]) for h in monitor.history)
    assert monitor.clean_step is None and monitor.onset_step is None


def test_two_monitors_that_differ_only_in_method_can_watch_one_run(tmp_path):
    """Their states are saved apart (Lightning needs one state key per stateful callback)."""
    dense = MemorizationMonitor(every_n_train_steps=50, num_probes=4, sampler_steps=10, k=2, verbose=False)
    cheap = MemorizationMonitor(
        every_n_train_steps=50, num_probes=4, sampler_steps=10, k=2, verbose=False, method="trace"
    )
    assert dense.state_key != cheap.state_key
    assert dense.state_key == MemorizationMonitor(every_n_train_steps=50, num_probes=4).state_key  # "auto": as before
    trainer(tmp_path, [dense, cheap], max_steps=50, enable_checkpointing=True).fit(
        module_2d(), datamodule(memorizing_data(), batch_size=64)
    )
    torch.testing.assert_close(dense.last_check.samples, cheap.last_check.samples)  # the same probes, measured twice
    assert len(dense.history) == len(cheap.history) == 1
