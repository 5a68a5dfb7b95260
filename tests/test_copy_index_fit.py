"""Copies at any data size, end to end: a few items repeated many times among more distinct items
than the former 4096-sample cap, through a real ``Trainer.fit``. The copy index holds every
distinct sample the batches showed, the copy rule flags the run, and the attribution names the
repeated items first.

The model measured is the training set's own optimal denoiser (the posterior mean of x₀ under
the empirical distribution, repeats weighted by their count): the one a network converges to when
it memorizes, so its samples are training items drawn in proportion to their count — a data-driven
copier, as web-scale models copy duplicated items — without a long training run in the test."""

from __future__ import annotations

import math

import torch
from callback_setup import module_2d, trainer

from memwatch import CopyOptions, MemorizationMonitor, OnsetOptions, ProbeOptions, ReportOptions, SharpnessCheckOptions
from memwatch.apps.toymodels import TensorDataModule
from memwatch.index import IndexOptions
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

DISTINCT, REPEATED, COPIES = 5000, 3, 1500


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """``(training set [9500, 2], the distinct items [5003, 2])``: 5000 points spread over a square,
    none within 0.3 of 3 items (the last 3 distinct ones) repeated 1500 times each — so a sample
    within 0.1 of a repeated item is a copy of it (d₁/d₂ < 1/3)."""
    g = torch.Generator().manual_seed(0)
    repeated = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.4, -1.2]])
    spread = torch.rand(3 * DISTINCT, 2, generator=g) * 4 - 2
    spread = spread[torch.cdist(spread, repeated).min(1).values > 0.3][:DISTINCT]
    train = torch.cat([spread, repeated.repeat(COPIES, 1)])
    return train[torch.randperm(len(train), generator=g)], torch.cat([spread, repeated])


def _memorizing_score(items: torch.Tensor, counts: torch.Tensor):
    """``module -> DiffusionScore`` of the empirical optimal denoiser over ``items`` weighted by ``counts``."""
    schedule = NoiseSchedule.linear(1000)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha(t)[:, None, None], schedule.sigma(t)[:, None, None]
        distance2 = ((x[:, None] - alpha * items) ** 2).sum(-1, keepdim=True)  # [n, items, 1]
        logits = counts.log()[None, :, None] - distance2 / (2 * sigma**2)
        return (logits.softmax(1) * items).sum(1)

    return lambda module: DiffusionScore(denoise, schedule, prediction="sample")


def test_duplicated_items_among_many_are_flagged_and_named_first(tmp_path):
    train, items = _data()
    counts = torch.cat([torch.ones(DISTINCT), torch.full((REPEATED,), float(COPIES))])
    settings = dict(
        score_fn=_memorizing_score(items, counts),
        every_n_train_steps=100,
        num_probes=32,
        sigmas=(0.2,),
        probes=ProbeOptions(sampler_steps=20),
        sharpness=SharpnessCheckOptions(k=2),
        report=ReportOptions(verbose=False, figures=False),
        onset=OnsetOptions(on="copies", threshold=0.2, patience=1),
    )
    named = MemorizationMonitor(reference_data=items, copies=CopyOptions(ids=[f"item{i}" for i in range(len(items))]),
                                **settings)  # fmt: skip
    seen = MemorizationMonitor(
        reference_data="batches", copies=CopyOptions(index=IndexOptions(memory_mb=64)), **settings
    )
    data = TensorDataModule(train, batch_size=256, steps_per_epoch=100, seed=0)
    fit = trainer(tmp_path, [named, seen], max_steps=200)
    fit.fit(module_2d(), data)

    batches = torch.cat([b[0] for b in data.train_dataloader()])  # what the monitor was shown
    assert len(seen.signals["copies"].index) == len(torch.unique(batches, dim=0)) > 4096  # all of it, past the old cap
    for monitor in (named, seen):
        last = monitor.history[-1]
        assert last["nn_memorized_fraction"] > 0.2 and math.isfinite(last["sharp_fraction_mean"])
        assert monitor.onset_step is not None  # the copy rule fires
    top = [c.index for c in named.most_copied[:REPEATED]]
    assert sorted(top) == list(range(DISTINCT, DISTINCT + REPEATED)), named.most_copied[:5]
    assert named.most_copied[0].id == f"item{top[0]}"
    # the same probes: every copy of the batches is a copy of the reference; a copy of an item the
    # batches never showed is only seen by the reference (the index is exact over what it holds)
    copy_seen, copy_named = (m.last_check.nn_ratio < 1 / 3 for m in (seen, named))
    assert bool((copy_seen <= copy_named).all()) and int(copy_seen.sum()) >= 0.9 * int(copy_named.sum())
