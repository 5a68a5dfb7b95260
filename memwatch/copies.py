"""Copies of the training samples seen in the batches: the nearest-neighbour ratio without reference data.

With ``reference_data="batches"`` the monitor keeps a :class:`memwatch.calibration.Reservoir`
of the training samples it sees (in memory only) and asks, for every probe, how far its two
nearest *distinct* training samples are (``d₁ ≤ d₂``; a copy when ``d₁/d₂ < 1/3``, the ground
truth of :mod:`memwatch.groundtruth`). Two details make that exact rather than approximate:

* **Repeats.** Two equal training points at distance ``d₁`` give ``d₂ = d₁`` and hide every copy
  of them — an image the data set holds twice, or one sample seen in several epochs. Only
  distinct samples count: the monitor's reservoir skips samples it holds
  (``Reservoir(distinct=True)``) and :func:`distinct` removes any repeat left. (The plain
  ``reference_data`` tensor path, :func:`memwatch.nn_ratio`, takes the data as given.)
* **DDP.** Every rank sees other batches, so every rank holds another reservoir. Each rank
  offers, for all probes of all ranks, the two nearest distinct points of its own reservoir
  (:func:`nearest_candidates`); the candidates of all ranks are gathered and merged
  (:func:`ratio_from_candidates`): the two nearest distinct points of the union are always
  among them, so the ratio is that of the union, whichever rank saw which sample (a sample
  seen by two ranks is one point). Traffic: ``2 × n × d`` floats per rank, not the reservoirs.

Coverage: the ratio is exact for the samples the reservoirs hold. When the training set has
more distinct samples than ``capacity × world size``, a copy of a sample that is not held is
not seen as one (it is found with probability ≈ held / N); the sharpness signal does not
depend on it.

Example:
    >>> seen = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # a repeat
    >>> probes = torch.tensor([[0.1, 0.0], [5.0, 5.0]])
    >>> ratio_from_candidates(probes, nearest_candidates(probes, distinct(seen)))
    tensor([0.0101, 1.0000], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.groundtruth import nearest_neighbours

__all__ = ["distinct", "nearest_candidates", "ratio_from_candidates"]


def distinct(samples: Tensor) -> Tensor:
    """The distinct rows of ``samples`` ``[m, *shape]`` (exact duplicates removed), ``[u, *shape]``
    float64 in sorted order."""
    flat = rearrange(samples.detach(), "m ... -> m (...)").to(torch.float64)
    return torch.unique(flat, dim=0).reshape(-1, *samples.shape[1:])


def nearest_candidates(samples: Tensor, reference: Tensor) -> Tensor:
    """The two nearest points of ``reference`` to each sample, ``[n, 2, *shape]`` float64.

    Args:
        samples: ``[n, *shape]`` probes.
        reference: ``[u, *shape]`` *distinct* training samples (:func:`distinct`), ``u >= 0``.

    Returns:
        The nearest and the second-nearest point of each sample; where ``reference`` holds fewer
        than two points, the missing ones are ``+inf`` (infinitely far: never a nearest point).

    Raises:
        MemwatchError: the sample shapes differ.
    """
    if reference.shape[1:] != samples.shape[1:]:
        raise MemwatchError(
            f"the training samples have shape {tuple(reference.shape[1:])}, the probes {tuple(samples.shape[1:])}"
        )
    out = torch.full((samples.shape[0], 2, *samples.shape[1:]), torch.inf, dtype=torch.float64)
    if reference.shape[0] >= 2:
        _, index = nearest_neighbours(samples.cpu(), reference.cpu())
        out = reference.cpu().to(torch.float64)[index]
    elif reference.shape[0] == 1:
        out[:, 0] = reference.cpu().to(torch.float64)[0]
    return out


def ratio_from_candidates(samples: Tensor, candidates: Tensor) -> Tensor:
    """``d₁ / d₂`` of each sample to its two nearest *distinct* candidates, ``[n]`` float64.

    Args:
        samples: ``[n, *shape]`` probes.
        candidates: ``[n, c, *shape]`` candidate training points of each sample (e.g. every
            rank's :func:`nearest_candidates`, concatenated along ``c``); ``+inf`` rows are
            absent points, a ``NaN`` row marks a rank that could not offer its candidates.

    Returns:
        The ratio per sample; NaN where a candidate is NaN or fewer than two distinct finite
        candidates exist (too few training samples seen to tell a copy).
    """
    x = rearrange(samples.detach().cpu(), "n ... -> n (...)").to(torch.float64)
    cand = rearrange(candidates.detach().cpu(), "n c ... -> n c (...)").to(torch.float64)
    out = torch.full((x.shape[0],), torch.nan, dtype=torch.float64)
    for i in range(x.shape[0]):
        if torch.isnan(cand[i]).any():
            continue
        points = torch.unique(cand[i][torch.isfinite(cand[i]).all(1)], dim=0)
        if points.shape[0] < 2:
            continue
        d = torch.linalg.vector_norm(points - x[i], dim=1).topk(2, largest=False).values
        out[i] = d[0] / d[1].clamp_min(torch.finfo(torch.float64).tiny)
    return out
