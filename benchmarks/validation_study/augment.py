"""Augmented training data: random views of images with their item ids, the whole group of views,
and the study's ground truth per item.

A *view* of an image ``[C, H, W]`` is a horizontal flip (or none) followed by an integer shift of
``dx`` columns (and ``dy`` rows with ``VERTICAL``), each in ``[-SHIFT, SHIFT]`` pixels: the image is
padded by ``SHIFT`` pixels of the background value on every side and cropped back to ``H × W``
(pixels shifted out are lost, the ones shifted in are background). The group has
``2 · (2 · SHIFT + 1)`` views (6 for ``SHIFT = 1``; ``2 · (2 · SHIFT + 1)²`` = 18 with ``VERTICAL``),
the identity among them. The study's default is the horizontal one: with 18 views per item its MLP
did not memorize 4 digits within 8000 steps (pilot: peak 10 % copies), with 6 it does.

The truth of an augmented run is per *item*: the distance from a probe to an item is the least
distance to any of that item's views, and ``d₁/d₂`` is taken over items — so two views of one item
are never each other's second-nearest neighbour (:func:`item_ratio`).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.utils.data import Dataset

from memwatch.groundtruth import ratio_of

SHIFT = 1  # largest shift, pixels
VERTICAL = False  # shift along the rows too (18 views for SHIFT = 1 instead of 6)
BACKGROUND = -1.0  # the digits' background in [-1, 1]: what a shift brings in


def view(x: Tensor, flip: bool, dy: int, dx: int, shift: int = SHIFT) -> Tensor:
    """The view ``(flip, dy, dx)`` of images ``x`` ``[n, C, H, W]`` (or one image ``[C, H, W]``):
    mirrored along the last axis if ``flip``, then shifted by ``dy`` rows and ``dx`` columns
    (``|dy|, |dx| ≤ shift``; background fills in). Same shape and dtype as ``x``.

    Example:
        >>> x = torch.arange(4.0).reshape(1, 2, 2)
        >>> view(x, False, 0, 1)[0]
        tensor([[-1.,  0.],
                [-1.,  2.]])
    """
    if flip:
        x = x.flip(-1)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=BACKGROUND)
    return padded[..., shift - dy : shift - dy + h, shift - dx : shift - dx + w]


def group(shift: int = SHIFT, vertical: bool = VERTICAL) -> list[tuple[bool, int, int]]:
    """Every view ``(flip, dy, dx)`` of the augmentation (``dy = 0`` unless ``vertical``), the
    identity ``(False, 0, 0)`` first."""
    moves = sorted(range(-shift, shift + 1), key=abs)  # 0 first
    return list(itertools.product((False, True), moves if vertical else [0], moves))


def all_views(x: Tensor, shift: int = SHIFT) -> Tensor:
    """``[n, V, C, H, W]`` every view of every image of ``x`` ``[n, C, H, W]`` (``V = len(group(shift))``)."""
    return torch.stack([view(x, *g, shift=shift) for g in group(shift)], dim=1)


class AugmentedItems(Dataset):
    """``(random view [C, H, W], item id)`` of images ``x`` ``[N, C, H, W]``: a uniformly drawn view
    of :func:`group` per access, from a seeded generator (single-process loading: the draws repeat).

    Args:
        x: the items.
        seed: seed of the view draws.
        shift: largest shift, pixels.
    """

    def __init__(self, x: Tensor, seed: int, shift: int = SHIFT) -> None:
        self.x, self.shift = x, shift
        self.views = group(shift)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g = self.views[int(torch.randint(len(self.views), (1,), generator=self.generator))]
        return view(self.x[i], *g, shift=self.shift), i


def item_ratio(samples: Tensor, views: Tensor) -> Tensor:
    """``d₁/d₂`` over items ``[P]`` (float64): ``d_i`` = the least L2 distance from a sample to any
    view of item ``i``, ``d₁ ≤ d₂`` the two smallest over items.

    Args:
        samples: ``[P, *shape]`` probes.
        views: ``[N, V, *shape]`` every view of each of ``N ≥ 2`` items (:func:`all_views`).

    Example:
        >>> items = torch.tensor([[[0.0, 0.0]], [[0.0, 10.0]]])  # 2 items, 1 view each, d = 2
        >>> item_ratio(torch.tensor([[0.0, 1.0]]), items)
        tensor([0.1111], dtype=torch.float64)
    """
    n, v = views.shape[:2]
    flat = views.reshape(n * v, -1).double()
    dist = torch.cdist(samples.reshape(len(samples), -1).double(), flat).reshape(len(samples), n, v).amin(-1)
    return ratio_of(dist.topk(2, dim=1, largest=False).values)
