"""Ground truth for validation: is a generated sample a copy of a training sample?

The criterion used in the memorization literature (Yoon et al. 2023; Gu et al. 2023): with
``d₁ ≤ d₂`` a sample's Euclidean distances to its nearest and second-nearest training points,
the sample is memorized when ``d₁ / d₂ < 1/3``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor

from memwatch.errors import MemwatchError

__all__ = ["nn_ratio", "ratio_of", "nearest_neighbours", "median_nn_distance", "first_tensor", "MEMORIZED_RATIO"]

MEMORIZED_RATIO = 1.0 / 3.0


def nearest_neighbours(
    samples: Tensor, train_data: Tensor | Iterable[Tensor], *, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Distances to and indices of the two nearest training points, streaming over the train set.

    Args:
        samples: ``[n, *shape]`` generated samples.
        train_data: ``[N, *shape]`` training samples, or an iterable of such batches (e.g. a
            DataLoader yielding tensors, or tuples/lists/dicts whose first tensor is the data).
        chunk_size: training points compared at once; memory is ``O(n · chunk_size)``, not ``O(n · N)``.

    Returns:
        ``(dist [n, 2], index [n, 2])``: ``d₁ ≤ d₂`` (float64) and their indices into the
        training set in iteration order.

    Raises:
        ValueError: shapes differ or fewer than two training points.
    """
    x = rearrange(samples.detach(), "n ... -> n (...)").to(torch.float64)
    best_d = torch.full((x.shape[0], 2), float("inf"), dtype=torch.float64, device=x.device)
    best_i = torch.full((x.shape[0], 2), -1, dtype=torch.long, device=x.device)
    offset = 0
    for batch in _batches(train_data, chunk_size):
        if batch.shape[1:] != samples.shape[1:]:
            raise MemwatchError(
                f"`train_data` samples have shape {tuple(batch.shape[1:])}, "
                f"but `samples` have shape {tuple(samples.shape[1:])}"
            )
        y = rearrange(batch.detach(), "m ... -> m (...)").to(x.device, torch.float64)
        dist = torch.cdist(x, y)
        idx = torch.arange(offset, offset + y.shape[0], device=x.device).expand_as(dist)
        all_d = torch.cat([best_d, dist], dim=1)
        all_i = torch.cat([best_i, idx], dim=1)
        best_d, pos = all_d.topk(2, dim=1, largest=False)
        best_i = all_i.gather(1, pos)
        offset += y.shape[0]
    if offset < 2:
        raise MemwatchError(f"`train_data` must hold at least 2 samples, got {offset}")
    return best_d, best_i


def nn_ratio(samples: Tensor, train_data: Tensor | Iterable[Tensor], *, chunk_size: int = 4096) -> Tensor:
    """``d₁ / d₂`` per sample ``[n]`` (float64); memorized when ``< MEMORIZED_RATIO``.

    Example:
        >>> train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        >>> nn_ratio(torch.tensor([[0.1, 0.0], [5.0, 5.0]]), train)
        tensor([0.0101, 1.0000], dtype=torch.float64)
    """
    dist, _ = nearest_neighbours(samples, train_data, chunk_size=chunk_size)
    return ratio_of(dist)


def ratio_of(dist: Tensor) -> Tensor:
    """``d₁ / d₂`` ``[n]`` from the two nearest distances ``[n, 2]`` of :func:`nearest_neighbours`
    (a zero ``d₂`` — two identical training points — is clamped to the smallest positive float)."""
    return dist[:, 0] / dist[:, 1].clamp_min(torch.finfo(dist.dtype).tiny)


def median_nn_distance(
    train_data: Tensor, *, max_queries: int = 2048, generator: torch.Generator | None = None
) -> float:
    """Median distance from a training point to its nearest *other* training point (data units).

    The natural length scale of a training set: a density that is sharp at noise levels well
    below it separates the training points. Above ``max_queries`` points the median is taken
    over a random subset of them (each still compared with the whole set).

    Args:
        train_data: ``[N, *shape]`` training samples, ``N >= 2``.
        max_queries: at most this many query points.
        generator: source of the query subset.

    Example:
        >>> median_nn_distance(torch.tensor([[0.0], [1.0], [3.0]]))
        1.0
    """
    if not isinstance(train_data, Tensor) or train_data.ndim < 2 or train_data.shape[0] < 2:
        raise MemwatchError(f"`train_data` must be a tensor [N >= 2, *shape], got {getattr(train_data, 'shape', None)}")
    n = train_data.shape[0]
    queries = train_data if n <= max_queries else train_data[torch.randperm(n, generator=generator)[:max_queries]]
    dist, _ = nearest_neighbours(queries, train_data)  # the nearest is the query itself, at distance 0
    return float(dist[:, 1].median())


def _batches(data: Tensor | Iterable[Tensor], chunk_size: int) -> Iterable[Tensor]:
    if isinstance(data, Tensor):
        yield from data.split(chunk_size)
        return
    for item in data:
        yield first_tensor(item)


def first_tensor(item: object) -> Tensor:
    """The data tensor of a batch: the batch itself, or the first tensor of a tuple / list / dict."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, dict):
        item = list(item.values())
    if isinstance(item, (list, tuple)):
        for value in item:
            if isinstance(value, Tensor):
                return value
    raise MemwatchError(f"cannot find a tensor in a training batch of type {type(item).__name__}")
