"""Which training items a check's probes reproduce (pure: tensors in, a ranked table out).

A probe *copies* training item ``i`` when ``i`` is its nearest reference item and the
nearest-neighbour ratio ``d₁/d₂ < MEMORIZED_RATIO`` (1/3, :mod:`memwatch.groundtruth`).
:func:`copied_items` turns one check's per-probe ``nearest`` / ``nn_ratio`` (as
:class:`memwatch.probes.ProbeMeasurement` holds them) and the probes flagged by sharpness into one
row per training item that some probe lands nearest to, the most copied first;
:func:`probe_neighbours` gives each probe's ``k`` nearest items (for galleries and tables).

The reference data should hold each distinct item once: an item present twice is at the same
distance twice, so ``d₁/d₂ = 1`` and its copies are never counted. Deduplicate first and map the
ids of the duplicates to one id.

Example:
    >>> nearest = torch.tensor([2, 2, 0, 2])
    >>> ratio = torch.tensor([0.1, 0.2, 0.1, 0.9])
    >>> flagged = torch.tensor([True, False, True, True])
    >>> [(c.index, c.copies, c.flagged_copies, c.probes) for c in copied_items(nearest, ratio, flagged)]
    [(2, 2, 1, (0, 1, 3)), (0, 1, 1, (2,))]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset

from memwatch.errors import MemwatchError
from memwatch.groundtruth import MEMORIZED_RATIO, first_tensor, nearest_neighbours
from memwatch.validation import check_int

__all__ = ["CopiedItem", "copied_items", "item_ids", "probe_neighbours"]


@dataclass(frozen=True)
class CopiedItem:
    """One training item and the probes of a check that land nearest to it.

    Attributes:
        index: the item's index in the reference data.
        id: its id (from ``ids``; the index when none are given).
        copies: probes whose nearest item it is with ``d₁/d₂ < MEMORIZED_RATIO`` (copies of it).
        flagged_copies: those copies that sharpness also flags as memorized.
        probes: indices of every probe whose nearest item it is (copies or not), ascending.
    """

    index: int
    id: Any
    copies: int
    flagged_copies: int
    probes: tuple[int, ...]


def copied_items(
    nearest: Tensor,
    nn_ratio: Tensor,
    flagged: Tensor | None = None,
    *,
    num_items: int | None = None,
    ids: Sequence[Any] | Dataset | None = None,
) -> list[CopiedItem]:
    """Per training item, the probes nearest to it and how many of them copy it.

    For each item ``i`` with ``P_i = {p : nearest[p] = i}`` non-empty:
    ``copies = |{p ∈ P_i : nn_ratio[p] < 1/3}|`` and ``flagged_copies = |{p ∈ P_i : nn_ratio[p] < 1/3,
    flagged[p]}|``. A NaN ratio counts as no copy.

    Args:
        nearest: ``[n]`` index of each probe's nearest reference item (integer tensor).
        nn_ratio: ``[n]`` each probe's ``d₁/d₂``.
        flagged: ``[n]`` bool, probes flagged as memorized by sharpness (``score >
            score_threshold``); ``None``: no probe is (``flagged_copies`` all 0).
        num_items: size of the reference data; indices must lie in ``[0, num_items)``. Default:
            ``len(ids)`` when ``ids`` is given, else unchecked beyond ``>= 0``.
        ids: the items' ids: a sequence (``ids[i]`` is item ``i``'s id), or a ``Dataset`` whose
            ``dataset[i]`` is ``(data, id)`` or a mapping with an ``"id"`` key (read only for
            the items returned). Default: the index is the id.

    Returns:
        One :class:`CopiedItem` per item some probe is nearest to, sorted by ``copies``
        (descending), then ``flagged_copies`` (descending), then ``index`` (ascending).

    Raises:
        MemwatchError: shapes differ, ``nearest`` is not an integer tensor, an index is out of
            range, or ``ids`` has the wrong length or an item without an id.
    """
    nearest, nn_ratio, flagged = _check_probe_tensors(nearest, nn_ratio, flagged)
    if num_items is None and ids is not None:
        num_items = len(ids)
    elif num_items is not None and ids is not None and len(ids) != num_items:
        raise MemwatchError(f"`ids` must hold `num_items`={num_items} ids, got {len(ids)}")
    if nearest.numel() and (int(nearest.min()) < 0 or (num_items is not None and int(nearest.max()) >= num_items)):
        bound = "" if num_items is None else f", {num_items}"
        raise MemwatchError(
            f"`nearest` indices must lie in [0{bound}), got values in [{int(nearest.min())}, {int(nearest.max())}]"
        )
    copy = nn_ratio < MEMORIZED_RATIO  # NaN compares False
    rows = []
    for index in torch.unique(nearest).tolist():
        mine = nearest == index
        probes = tuple(torch.nonzero(mine).flatten().tolist())
        rows.append((index, int((mine & copy).sum()), int((mine & copy & flagged).sum()), probes))
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return [CopiedItem(i, _item_id(ids, i), c, f, p) for i, c, f, p in rows]


def item_ids(ids: Sequence[Any] | Dataset | None, indices: Iterable[int]) -> list[Any]:
    """The ids of the items ``indices`` (see :func:`copied_items` for what ``ids`` may be).

    Example:
        >>> item_ids(["a", "b", "c"], [2, 0])
        ['c', 'a']
    """
    return [_item_id(ids, int(i)) for i in indices]


def probe_neighbours(
    samples: Tensor, reference: Tensor | Iterable[Any], k: int = 3, *, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Each probe's ``k`` nearest reference items, nearest first (Euclidean, float64).

    Args:
        samples: ``[n, *shape]`` probes.
        reference: ``[N, *shape]`` training items, or an iterable of batches (as
            :func:`memwatch.groundtruth.nearest_neighbours` takes), ``N >= k``.
        k: neighbours per probe, ``>= 1``.
        chunk_size: reference items compared at once (memory ``O(n · chunk_size)``).

    Returns:
        ``(dist [n, k], index [n, k])``: distances ascending along the last axis (float64) and
        the items' indices in iteration order.

    Raises:
        MemwatchError: ``k < 1``, fewer than ``k`` (and 2) reference items, or shapes differ.

    Example:
        >>> ref = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
        >>> dist, index = probe_neighbours(torch.tensor([[2.9]]), ref, k=3)
        >>> index.tolist(), [round(d, 2) for d in dist[0].tolist()]
        ([[2, 1, 0]], [0.1, 1.9, 2.9])
    """
    check_int("k", k, 1)
    if k <= 2:
        dist, index = nearest_neighbours(samples, reference, chunk_size=chunk_size)
        return dist[:, :k], index[:, :k]
    return _k_nearest(samples, reference, k, chunk_size)


# ---------------------------------------------------------------------- private
def _check_probe_tensors(nearest: Tensor, nn_ratio: Tensor, flagged: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``nearest`` (long), ``nn_ratio`` (float64), ``flagged`` (bool) as flat CPU tensors ``[n]``."""
    if not isinstance(nearest, Tensor) or nearest.is_floating_point() or nearest.dtype == torch.bool:
        what = nearest.dtype if isinstance(nearest, Tensor) else type(nearest).__name__
        raise MemwatchError(f"`nearest` must be an integer tensor [n], got {what}")
    nearest = nearest.detach().cpu().flatten().long()
    nn_ratio = torch.as_tensor(nn_ratio).detach().cpu().flatten().to(torch.float64)
    flagged = (
        torch.zeros_like(nearest, dtype=torch.bool)
        if flagged is None
        else torch.as_tensor(flagged).detach().cpu().flatten().bool()
    )
    if not nearest.shape == nn_ratio.shape == flagged.shape:
        raise MemwatchError(
            "`nearest`, `nn_ratio` and `flagged` must all be [n], got "
            f"{tuple(nearest.shape)}, {tuple(nn_ratio.shape)} and {tuple(flagged.shape)}"
        )
    return nearest, nn_ratio, flagged


def _item_id(ids: Sequence[Any] | Dataset | None, index: int) -> Any:
    """Item ``index``'s id: ``ids[index]``, from a ``(data, id)`` / ``{"id": …}`` dataset item,
    or the index itself."""
    if ids is None:
        return index
    if not isinstance(ids, Dataset):
        return _plain(ids[index])
    item = ids[index]
    if isinstance(item, Mapping) and "id" in item:
        return _plain(item["id"])
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return _plain(item[1])
    raise MemwatchError(
        f"`ids` is a Dataset whose item {index} is a {type(item).__name__}; it must be (data, id) or a mapping "
        "with an 'id' key"
    )


def _plain(value: Any) -> Any:
    """A one-element tensor as a Python number (ids go into CSV files and W&B tables)."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def _k_nearest(samples: Tensor, reference: Tensor | Iterable[Any], k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The streaming top-``k`` of :func:`memwatch.groundtruth.nearest_neighbours` for ``k > 2``.

    Kept here only until ``nearest_neighbours`` takes ``k`` (it keeps the best two): then
    :func:`probe_neighbours` calls it for every ``k`` and this goes.
    """
    x = rearrange(samples.detach(), "n ... -> n (...)").to(torch.float64)
    best_d = torch.full((x.shape[0], k), float("inf"), dtype=torch.float64)
    best_i = torch.full((x.shape[0], k), -1, dtype=torch.long)
    offset = 0
    batches = reference.split(chunk_size) if isinstance(reference, Tensor) else map(first_tensor, reference)
    for batch in batches:
        if batch.shape[1:] != samples.shape[1:]:
            raise MemwatchError(
                f"`reference` items have shape {tuple(batch.shape[1:])}, but `samples` have shape "
                f"{tuple(samples.shape[1:])}"
            )
        y = rearrange(batch.detach(), "m ... -> m (...)").cpu().to(torch.float64)
        dist = torch.cdist(x.cpu(), y)
        idx = torch.arange(offset, offset + y.shape[0]).expand_as(dist)
        best_d, pos = torch.cat([best_d, dist], 1).topk(k, dim=1, largest=False)
        best_i = torch.cat([best_i, idx], 1).gather(1, pos)
        offset += y.shape[0]
    if offset < k:
        raise MemwatchError(f"`reference` must hold at least k={k} items, got {offset}")
    return best_d, best_i
