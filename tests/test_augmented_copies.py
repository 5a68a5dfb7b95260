"""Augmented batches, end to end: a data set that returns random views of its items (a horizontal
flip and a shift of up to a pixel) with each item's id, through a real ``Trainer.fit``.

The model measured is the optimal denoiser of the *augmented* training distribution (the posterior
mean of x₀ over every view of every item) at a finite resolution: the model a network converges to
when it memorizes its items under their augmentations. Its samples fall between neighbouring views
of one item — a copy of the item, which the ground truth computed per item (a probe's distance to an
item is its distance to the item's nearest view) counts. With ``data.ids`` the copy index counts
the views of one item as that item, and agrees with that truth probe by probe; without ids a
neighbouring view of the same item stands as the second neighbour and hides the copy.
"""

from __future__ import annotations

import math

import pytest
import torch
from callback_setup import trainer
from torch.utils.data import DataLoader, Dataset

from memwatch import DataOptions, MemorizationMonitor, ProbeOptions, ReportOptions, SharpnessCheckOptions
from memwatch.apps.toymodels import DDPMModule
from memwatch.groundtruth import MEMORIZED_RATIO
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

ITEMS, SIDE = 6, 16
FLOOR = 0.9  # the copier's resolution: views of one item closer than about this are blended


def _items() -> torch.Tensor:
    """``[6, 1, 16, 16]`` smooth fields (three low-frequency waves each, random amplitudes and
    phases): a one-pixel shift moves one by about 1.8, while any view of one item is at least 4.8
    from any view of another (asserted in the test)."""
    g = torch.Generator().manual_seed(2)
    y, x = torch.arange(SIDE, dtype=torch.float32)[:, None], torch.arange(SIDE, dtype=torch.float32)[None, :]
    fields = []
    for _ in range(ITEMS):
        field = torch.zeros(SIDE, SIDE)
        for ky, kx in ((1, 0), (0, 1), (1, 1)):
            amplitude, phase = 0.5 + 0.5 * torch.rand((), generator=g), 2 * math.pi * torch.rand((), generator=g)
            field = field + amplitude * torch.cos(2 * math.pi * (ky * y + kx * x) / SIDE + phase)
        fields.append(0.5 * field[None])
    return torch.stack(fields)


def _views(item: torch.Tensor) -> torch.Tensor:
    """Every view of ``item [1, S, S]``: flipped or not × shifted by -1, 0, 1 pixel each way ``[18, 1, S, S]``."""
    return torch.stack(
        [f.roll((dy, dx), dims=(-2, -1)) for f in (item, item.flip(-1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )


class RandomViews(Dataset):
    """``(a random view [1, S, S], the item's id)``, a fresh view at every access (global RNG, as
    torchvision transforms draw)."""

    def __init__(self, items: torch.Tensor, length: int) -> None:
        self.views, self.length = torch.stack([_views(it) for it in items]), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = i % len(self.views)
        return self.views[item, int(torch.randint(self.views.shape[1], ()))], item


def _memorizing_score(views: torch.Tensor):
    """``module -> DiffusionScore`` of the optimal denoiser over ``views [m, 1, S, S]`` (equal weights),
    resolved to :data:`FLOOR`: its noise variance is ``σ_t² + FLOOR²``, as a network that memorized
    an item's views but not every pixel of each."""
    schedule = NoiseSchedule.linear(1000)
    flat = views.flatten(1)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        x, v = x.flatten(1), flat.to(x.dtype)  # ‖x − α v‖² for every view v: [n, m]
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        distance2 = (x**2).sum(1, keepdim=True) - 2 * alpha * x @ v.T + alpha**2 * (v**2).sum(1)
        weights = (-distance2 / (2 * (sigma**2 + FLOOR**2))).softmax(1)
        return (weights @ v).reshape(-1, *views.shape[1:])

    return lambda module: DiffusionScore(denoise, schedule, prediction="sample")


def _per_item_truth(probes: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[n]`` d₁/d₂ over *items*, an item's distance being its nearest view's."""
    per_item = torch.stack([torch.cdist(probes.flatten(1), _views(it).flatten(1)).min(1).values for it in items], 1)
    two = per_item.topk(2, dim=1, largest=False).values
    return two[:, 0] / two[:, 1]


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_views_of_an_item_count_as_the_item_with_ids_and_agree_with_the_per_item_truth(tmp_path):
    items = _items()
    views = torch.cat([_views(it) for it in items])
    settings = dict(
        score_fn=_memorizing_score(views),
        every_n_train_steps=60,
        num_probes=16,
        sigmas=(0.3,),
        probes=ProbeOptions(sampler_steps=10),
        sharpness=SharpnessCheckOptions(method="trace"),  # the copies are the point here
        report=ReportOptions(verbose=False, figures=False),
    )
    with_ids = MemorizationMonitor(data=DataOptions(ids=1), **settings)
    without = MemorizationMonitor(**settings)
    loader = DataLoader(RandomViews(items, length=64 * 60), batch_size=64, shuffle=True)
    fit = trainer(tmp_path, [with_ids, without], max_steps=120)
    fit.fit(DDPMModule(shape=(1, SIDE, SIDE), hidden=32, depth=2), loader)

    ids = torch.arange(ITEMS).repeat_interleave(len(views) // ITEMS)
    apart = torch.cdist(views.flatten(1), views.flatten(1)).masked_fill(ids[:, None] == ids[None, :], math.inf)
    assert apart.min() > 4.5  # the premise: the items' orbits are far apart (one-pixel shifts are ~1.8)
    index = with_ids.signals["copies"].index
    assert len(index) == len(torch.unique(views, dim=0))  # every view of every item was shown and held
    check = with_ids.last_check
    truth = _per_item_truth(check.samples, items)
    assert (truth < MEMORIZED_RATIO).float().mean() > 0.5  # the copier copies its items
    torch.testing.assert_close(check.nn_ratio.double(), truth.double(), rtol=1e-4, atol=1e-6)  # probe by probe
    assert with_ids.history[-1]["nn_memorized_fraction"] == pytest.approx(
        float((truth < MEMORIZED_RATIO).float().mean())
    )
    assert with_ids.onset_step is not None and math.isfinite(with_ids.history[-1]["alarm_fraction"])
    # without ids a neighbouring view of the same item is the second neighbour: copies are missed
    missed = without.history[-1]["nn_memorized_fraction"]
    assert missed < with_ids.history[-1]["nn_memorized_fraction"]
