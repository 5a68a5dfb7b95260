"""A copy index of the training set: the two nearest *distinct* training samples of every probe, at any size.

The copy rule of :mod:`memwatch.groundtruth` (a probe copies a training sample when
``d₁/d₂ < 1/3``) needs, per probe, the distances to its two nearest distinct training samples.
:class:`CopyIndex` holds the training samples (from the batches as they come, or streamed once
from reference data by :func:`fill_from`) as vectors, within a memory budget, and answers that
question for a check's probes.

**Vectors.** A sample ``[*shape]`` becomes a float32 vector ``[v]``: its flattened values
(``vectors="raw"``, ``v = prod(shape)``), or a fixed Gaussian random projection of them to
``v = dim`` coordinates (``vectors="projection"``, ``x ↦ xᵀR``, ``R [e, dim]`` with entries
``N(0, 1/dim)`` drawn from ``seed``: distances are kept up to a factor ``1 ± O(√(1/dim))``, the
same on every rank without communication). With an ``embed_fn`` (a feature extractor such as
DINOv2 or SSCD) the vector is built from ``embed_fn(samples) [m, e]`` instead of the pixels; the
distance is L2 on those features *as returned* (not normalized here: an extractor whose
features are meant for cosine similarity should return them L2-normalized, then
``‖a − b‖² = 2 − 2 cos``). The same map is applied to the probes.

**Two tiers, by the budget** (``B = memory_mb`` MiB; ``v`` the vector size):

* *exact* while the held samples number at most ``min(exact_limit, B / (4v + 80))``:
  float32 vectors, searched flat (faiss, else torch); the ``candidates`` best are re-ranked
  in float64 on the stored vectors, so distances are those of the float32 vectors exactly
  (on raw vectors: the numbers of :func:`memwatch.groundtruth.nn_ratio` over the distinct samples).
* *compressed* beyond: the vectors are kept in float16 (``2v`` bytes: relative rounding
  ``≤ 2⁻¹¹`` per coordinate) for re-ranking, plus, with faiss and once ``≥ 4096`` are held, an
  IVF-PQ index (``nlist = min(1024, held/64)`` lists, ``v/8`` 8-bit codes, ``nlist/16`` lists
  probed) that proposes the ``candidates`` re-ranked exactly in float64 on the float16 vectors.
  Without faiss the float16 vectors are searched by brute force (same answers, slower).
  Capacity ``C = B / (2v + v/8 + 88)`` samples (the 80 or 88 bytes: key, row, IVF id and the
  key table's entry).

**Eviction** once ``C`` distinct samples are held: reservoir sampling (Vitter's algorithm R)
over the stream of *offers*, an offer being a sample not held when it comes. The ``i``-th offer
(0-based) fills slot ``i`` while ``i < C``, then replaces a uniform slot with probability
``C/(i+1)``. So a sample seen once is held with probability ``C/N`` (``N`` offers), uniform
over the samples, and a sample that comes back after being evicted (or after being drawn out)
is offered again: an item repeated in the data (the items that models copy) has a chance at
each return and is held more often than a singleton (measured: an item 8 times among 200
singletons, ``C = 50``: held in 57 % of seeds, a singleton in 25 %).

**Keys and items.** Every held sample carries a key, the 63-bit BLAKE2b hash of its raw float32
bytes: exact repeats are held once, and the same sample has the same key on every rank. It also
belongs to an *item*: by default itself (its key), or the item id given with it (:meth:`CopyIndex.add`'s
``items``: the id of the training item an augmented view was made from). The two nearest of a probe
are of two distinct *items* — views of one item never act as each other's second neighbour, so a
probe that copies an item is a copy however many views of it are held — and :func:`merge_hits`
counts an item two ranks hold once. ``row`` is the sample's position in the reference data
(``-1`` for batches).

Privacy: the index holds training data in memory only; it is never saved (rebuilt after a
restart: refilled from the reference data, or from the batches seen since).

Example:
    >>> index = CopyIndex(IndexOptions(), sample_shape=(2,))
    >>> index.add(torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))  # one repeat
    3
    >>> hits = index.search(torch.tensor([[0.1, 0.0], [5.0, 5.0]]))
    >>> hits.distance.shape, ratio(hits)
    (torch.Size([2, 2]), tensor([0.0101, 1.0000], dtype=torch.float64))

Over 600 lines, as one module: the exact and the compressed tier share the slots, the keys and the
reservoir eviction that make a search answer over distinct items; split by tier, the eviction and
the keys would be restated.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.validation import check_int

__all__ = ["CopyIndex", "Hits", "IndexOptions", "content_keys", "fill_from", "merge_hits", "nearest", "ratio"]

_IVF_MIN = 4096  # compressed tier: IVF-PQ candidates from this many held samples on (below: brute force)
_CHUNK = 65536  # rows compared at once by the torch searches
_KEY_BYTES = 64  # the key table (a dict key -> slot), per held sample: counted in the budget
_NO_FAISS = (
    "faiss is not installed: past its exact tier the copy index searches its float16 vectors by torch brute force "
    "(the same answers, slower; `pip install memwatch[index]`)"
)


@dataclass(frozen=True)
class IndexOptions:
    """Settings of a :class:`CopyIndex` (a nested option group: ``--monitor.copies.index.memory_mb``).

    Attributes:
        memory_mb: budget of the held vectors, MiB, in ``(0, 1e7]``; sets both tiers' capacity.
        vectors: ``"raw"`` (the flattened sample, or ``embed_fn``'s features) or ``"projection"``
            (a fixed random projection of them to ``dim`` coordinates).
        dim: the projection's size, in ``[1, 65536]`` (used with ``"projection"`` only).
        exact_limit: most samples held in the exact (float32, flat) tier, ``>= 2``; beyond it
            (or beyond what the budget holds in float32) the index is compressed.
        candidates: nearest candidates re-ranked exactly per probe, in ``[2, 256]``.
        flip: also query each probe's horizontal mirror (last axis reversed); a copy if either is.
        seed: seed of the projection and of the eviction draws, ``>= 0``.
    """

    memory_mb: float = 1024.0
    vectors: str = "raw"
    dim: int = 256
    exact_limit: int = 65536
    candidates: int = 32
    flip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, (int, float)):
            raise MemwatchError(f"`memory_mb` must be a number in (0, 1e7], got {self.memory_mb!r}")
        if not 0 < self.memory_mb <= 1e7:
            raise MemwatchError(f"`memory_mb` must be a number in (0, 1e7], got {self.memory_mb!r}")
        if self.vectors not in ("raw", "projection"):
            raise MemwatchError(f"`vectors` must be one of 'raw', 'projection', got {self.vectors!r}")
        check_int("dim", self.dim, 1, 65536)
        check_int("exact_limit", self.exact_limit, 2)
        check_int("candidates", self.candidates, 2, 256)
        check_int("seed", self.seed, 0)
        if not isinstance(self.flip, bool):
            raise MemwatchError(f"`flip` must be True or False, got {self.flip!r}")


@dataclass(frozen=True)
class Hits:
    """Per probe, its nearest held samples of two distinct items (nearest first).

    Attributes:
        distance: ``[n, 2]`` float64, L2 in the index's vector space (in the samples' own
            space when re-ranked on the reference data); ``+inf`` where fewer than two items
            are held, NaN for a probe that is not finite.
        key: ``[n, 2]`` int64 item keys of those samples (content keys, or the item ids given to
            :meth:`CopyIndex.add`; the same on every rank); ``-1`` where absent.
        row: ``[n, 2]`` int64 positions in the reference data; ``-1`` where absent or unknown.
        mirror: the same for the probes' mirrors (``IndexOptions.flip``), else ``None``.
    """

    distance: Tensor
    key: Tensor
    row: Tensor
    mirror: Hits | None = None


class CopyIndex:
    """The training samples seen, as vectors, searched for each probe's two nearest distinct ones.

    See the module docstring for the vectors, the two tiers, the eviction policy and the keys.
    In a training loop (the monitor's ``"copies"`` signal):

    * between checks, :meth:`add` the training samples (the monitor stages its batches without a
      device sync and adds them at the next check: :class:`memwatch.intake.TrainingSamples`);
    * at a check, :meth:`search` all ranks' probes; under DDP gather every rank's :class:`Hits`
      and :func:`merge_hits` them; :func:`ratio` and :func:`nearest` give the copy ratio and the
      item copied.

    Args:
        options: :class:`IndexOptions`.
        sample_shape: shape of one sample, e.g. ``(3, 32, 32)``; probes have the same.
        embed_fn: optional feature map ``[m, *sample_shape] -> [m, e]`` applied to training
            samples and probes alike (e.g. a frozen SSCD network, in eval mode). It receives
            tensors where they are: added samples and probes on their device, reference rows on
            the CPU; it moves them itself if it must.

    Raises:
        MemwatchError: ``options`` is not an :class:`IndexOptions` or ``sample_shape`` is not a
            tuple of positive integers.
    """

    def __init__(
        self,
        options: IndexOptions,
        sample_shape: Sequence[int],
        embed_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(options, IndexOptions):
            raise MemwatchError(f"`options` must be an IndexOptions, got {type(options).__name__}")
        shape = tuple(sample_shape)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise MemwatchError(f"`sample_shape` must be a non-empty tuple of positive integers, got {sample_shape!r}")
        self.options, self.sample_shape, self.embed_fn = options, shape, embed_fn
        self._faiss = _load_faiss()
        self._generator = torch.Generator().manual_seed(options.seed)
        self._projection: Tensor | None = None  # [e, dim] float32
        self._dim: int | None = None  # v, fixed by the first vectors
        self._store: Tensor | None = None  # [allocated, v] float32 (exact) or float16 (compressed)
        self._keys = torch.empty(0, dtype=torch.int64)
        self._rows = torch.empty(0, dtype=torch.int64)
        self._items: Tensor | None = None  # [allocated] int64 item ids, when add() is given them
        self._slot_of: dict[int, int] = {}  # key -> slot
        self._held = 0
        self._offers = 0
        self._compressed = False
        self._ivf: Any = None  # faiss IndexIVFPQ over the slots, compressed tier only

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Distinct samples held now."""
        return self._held

    @property
    def offers(self) -> int:
        """Offers so far: samples not held when they came (the eviction stream's length)."""
        return self._offers

    @property
    def compressed(self) -> bool:
        """Whether the index has passed to the compressed tier (float16 vectors, IVF-PQ)."""
        return self._compressed

    @property
    def capacity(self) -> int | None:
        """Most samples held, ``C`` (``None`` until the first sample fixes the vector size)."""
        return None if self._dim is None else _capacities(self.options, self._dim, self._items is not None)[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: the vectors, keys and rows, the IVF-PQ codes and centroids, and the key table
        (a dict, estimated as its own size plus 64 bytes a key)."""
        total = 0 if self._store is None else self._store.numel() * self._store.element_size()
        total += sys.getsizeof(self._slot_of) + 64 * len(self._slot_of)
        total += 8 * (self._keys.numel() + self._rows.numel() + (0 if self._items is None else self._items.numel()))
        if self._ivf is not None and self._dim is not None:
            total += self._ivf.ntotal * (self._ivf.code_size + 8) + (self._ivf.nlist + 256) * self._dim * 4
        return total

    # ------------------------------------------------------------------ intake
    @torch.no_grad()
    def add(
        self, samples: Tensor, rows: Tensor | None = None, items: Tensor | None = None, keys: Tensor | None = None
    ) -> int:
        """Offer training samples ``[m, *sample_shape]``; returns how many were offers (not held before).

        Exact repeats of a held sample (or of an earlier row) are skipped by key. Once the index
        is full, offers replace held samples by the reservoir rule (module docstring).

        Args:
            samples: ``[m, *sample_shape]`` real, finite; any device (copied to the CPU).
            rows: ``[m]`` int64 positions in the reference data (kept for :func:`nearest`), or ``None``.
            items: ``[m]`` int64 ids of the training items the samples are views of (augmented
                batches: every view of one item carries its id), or ``None``: each sample is its
                own item. Either every call gives them or none does.
            keys: ``[m]`` int64 content keys to hold the samples under instead of their own
                (:func:`content_keys` of the rows they were encoded from: a latent model's index
                knows a pixel row it holds before encoding it, :meth:`fresh`).

        Raises:
            MemwatchError: wrong shape, a non-finite row, ``rows`` or ``items`` of the wrong size
                (or ``items`` given to some calls only), or an ``embed_fn`` output that is not
                ``[m, e]`` finite.
        """
        flat = self._checked(samples, "samples").to("cpu", torch.float32).contiguous()
        bad = (~torch.isfinite(flat)).any(1).nonzero().flatten()
        if bad.numel():
            raise MemwatchError(f"`samples` rows must be finite, got {bad.numel()} rows with NaN/inf (first: {bad[0]})")
        if rows is None:
            rows = torch.full((flat.shape[0],), -1, dtype=torch.int64)
        elif not isinstance(rows, Tensor) or rows.shape != (flat.shape[0],):
            raise MemwatchError(f"`rows` must be a tensor [{flat.shape[0]}], got {getattr(rows, 'shape', rows)!r}")
        items = self._checked_items(items, flat.shape[0])
        if keys is None:
            keys = content_keys(flat)
        elif not isinstance(keys, Tensor) or keys.shape != (flat.shape[0],):
            raise MemwatchError(f"`keys` must be a tensor [{flat.shape[0]}], got {getattr(keys, 'shape', keys)!r}")
        fresh = self.fresh(keys).nonzero().flatten().tolist()
        if fresh:
            chosen = None if items is None else items[fresh]
            self._admit(samples.detach()[fresh], keys[fresh], rows.to("cpu", torch.int64)[fresh], chosen)
        return len(fresh)

    def fresh(self, keys: Tensor) -> Tensor:
        """``[m]`` bool: which of the content ``keys [m]`` would be offers — not held, and not
        repeating an earlier one of ``keys``."""
        out, seen = torch.zeros(keys.shape[0], dtype=torch.bool), set()
        for i, key in enumerate(keys.tolist()):
            if key not in self._slot_of and key not in seen:
                seen.add(key)
                out[i] = True
        return out

    def _checked_items(self, items: Tensor | None, m: int) -> Tensor | None:
        """``items`` as ``[m]`` int64 on the CPU; the first call decides whether the index holds items."""
        if items is not None and not (
            isinstance(items, Tensor) and items.shape == (m,) and not items.is_floating_point()
        ):
            raise MemwatchError(f"`items` must be an integer tensor [{m}], got {getattr(items, 'shape', items)!r}")
        holds = self._items is not None
        if self._dim is not None and holds != (items is not None):
            raise MemwatchError(
                "`items` must be given with every call of add() or with none: this index "
                + ("holds item ids" if holds else "holds no item ids")
            )
        if items is not None and self._items is None:
            self._items = torch.empty(0, dtype=torch.int64)
        return None if items is None else items.to("cpu", torch.int64)

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, probes: Tensor, reference: Tensor | Dataset | None = None) -> Hits:
        """The nearest held samples of two distinct items for each probe ``[n, *sample_shape]``.

        Candidates (the ``candidates`` nearest by the tier's search; more, 4× at a time, for the
        probes whose candidates are all views of one item) are re-ranked by ``‖q − x‖₂`` in
        float64 and the nearest, and the nearest of another item, returned: on the stored vectors,
        or, with ``reference``, on the samples themselves (their flattened values, or
        ``embed_fn``'s features), read back by row: exact in that space whatever the tier and the
        projection, as long as the true two nearest are among the candidates.

        Args:
            probes: ``[n, *sample_shape]``; a probe that is not finite gets NaN distances.
            reference: the data the index was filled from (:func:`fill_from`): a tensor
                ``[N, *sample_shape]`` or a map-style Dataset (item: a tensor, or a tuple / dict
                whose first tensor is the sample); ``None``: re-rank on the stored vectors.

        Returns:
            :class:`Hits` with ``[n, 2]`` fields (and ``mirror`` with ``flip``).

        Raises:
            MemwatchError: ``probes`` has the wrong shape, or ``reference`` is given while a
                candidate has no row (it came from the batches).
        """
        self._checked(probes, "probes")
        hits = self._search_one(probes, reference)
        if self.options.flip:
            hits = Hits(hits.distance, hits.key, hits.row, self._search_one(probes.flip(-1), reference))
        return hits

    def _search_one(self, probes: Tensor, reference: Tensor | Dataset | None) -> Hits:
        n = probes.shape[0]
        distance = torch.full((n, 2), torch.inf, dtype=torch.float64)
        key, row = torch.full((n, 2), -1, dtype=torch.int64), torch.full((n, 2), -1, dtype=torch.int64)
        finite = torch.isfinite(probes.detach().reshape(n, -1)).all(1).cpu()
        distance[~finite] = torch.nan
        if self._held == 0 or not finite.any():
            return Hits(distance, key, row)
        features = self._features(probes.detach()[finite.to(probes.device)])
        q = self._project(features)
        c = min(self.options.candidates, self._held)
        while True:  # with item ids, every candidate may be a view of the nearest item: widen the search
            slots = self._candidates(q, c)  # [n', c], -1 where none
            d = self._reranked(q, slots) if reference is None else self._reranked_on(features, slots, reference)
            best, chosen = self._two_items(d.masked_fill(slots < 0, torch.inf), slots)
            lacking = torch.isfinite(best[:, 0]) & ~torch.isfinite(best[:, 1])
            if not lacking.any() or c >= self._held:
                break
            c = min(4 * c, self._held)
        present = torch.isfinite(best)
        distance[finite] = best
        key[finite] = torch.where(present, self._item_keys(chosen.clamp_min(0)), -1)
        row[finite] = torch.where(present, self._rows[chosen.clamp_min(0)], -1)
        return Hits(distance, key, row)

    def _item_keys(self, slots: Tensor) -> Tensor:
        """The item keys of held ``slots`` (the content keys when the index holds no item ids)."""
        return self._keys[slots] if self._items is None else self._items[slots]

    def _two_items(self, d: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Of candidates ``slots [n, c]`` at distances ``d [n, c]`` (``inf``: none), the nearest and
        the nearest of another item: ``(distances [n, 2], slots [n, 2])``, ``inf`` / ``-1`` where absent."""
        d, order = d.sort(dim=1)
        slots = slots.gather(1, order)
        items = self._item_keys(slots.clamp_min(0))
        other = (items != items[:, :1]) & torch.isfinite(d)
        other[:, 0] = False
        second_d, second = d.masked_fill(~other, torch.inf).min(dim=1)
        distances = torch.stack([d[:, 0], second_d], 1)
        chosen = torch.stack([slots[:, 0], slots.gather(1, second[:, None])[:, 0]], 1)
        return distances, chosen.masked_fill(~torch.isfinite(distances), -1)

    def _reranked(self, q: Tensor, slots: Tensor) -> Tensor:
        """``‖q − x‖₂`` ``[n, c]`` float64 to the stored vectors of the candidate slots."""
        assert self._store is not None
        vectors = self._store[slots.clamp_min(0)].to(torch.float64)  # [n, c, v]
        return torch.linalg.vector_norm(vectors - q.to(torch.float64)[:, None], dim=2)

    def _reranked_on(self, features: Tensor, slots: Tensor, reference: Tensor | Dataset) -> Tensor:
        """``‖f(probe) − f(sample)‖₂`` ``[n, c]`` float64, the samples read from ``reference`` by row."""
        rows = self._rows[slots.clamp_min(0)].masked_fill(slots < 0, -1)
        if (rows[slots >= 0] < 0).any():
            raise MemwatchError("`reference` re-ranking needs every held sample's row; some came from the batches")
        wanted = torch.unique(rows[rows >= 0])
        if isinstance(reference, Tensor):
            samples = reference[wanted]
        else:
            samples = torch.stack([first_tensor(reference[int(i)]) for i in wanted])
        exact = self._features(samples).to(torch.float64)  # [u, e]
        where = torch.searchsorted(wanted, rows.clamp_min(0))
        d = torch.linalg.vector_norm(exact[where] - features.to(torch.float64)[:, None], dim=2)
        return d.masked_fill(rows < 0, torch.inf)

    def _candidates(self, q: Tensor, c: int) -> Tensor:
        """Slots ``[n, c]`` of the ``c <= held`` nearest held vectors by the tier's search."""
        assert self._store is not None
        if self._ivf is not None:
            _, slots = self._ivf.search(q.numpy(), c)
            return torch.from_numpy(slots).to(torch.int64)
        if self._faiss is not None and not self.compressed:
            _, slots = self._faiss.knn(q.numpy(), self._store[: self._held].numpy(), c)
            return torch.from_numpy(slots).to(torch.int64)
        best_d = torch.full((q.shape[0], c), torch.inf)
        best_i = torch.full((q.shape[0], c), -1, dtype=torch.int64)
        for start in range(0, self._held, _CHUNK):
            block = self._store[start : min(start + _CHUNK, self._held)].to(torch.float32)
            d = torch.cdist(q, block)
            idx = torch.arange(start, start + block.shape[0]).expand_as(d)
            best_d, pos = torch.cat([best_d, d], 1).topk(c, dim=1, largest=False)
            best_i = torch.cat([best_i, idx], 1).gather(1, pos)
        return best_i

    # ------------------------------------------------------------------ private
    def _checked(self, samples: Tensor, name: str) -> Tensor:
        """``samples`` flattened ``[m, prod(shape)]`` after the shape check (no copy)."""
        if not isinstance(samples, Tensor) or samples.is_complex() or tuple(samples.shape[1:]) != self.sample_shape:
            raise MemwatchError(
                f"`{name}` must be a real tensor [m, {', '.join(map(str, self.sample_shape))}], "
                f"got {type(samples).__name__} with shape {tuple(getattr(samples, 'shape', ()))}"
            )
        return samples.detach().reshape(samples.shape[0], -1)

    def _vectors(self, samples: Tensor) -> Tensor:
        """The index vectors ``[m, v]`` float32 (CPU) of samples ``[m, *sample_shape]``."""
        return self._project(self._features(samples))

    def _features(self, samples: Tensor) -> Tensor:
        """The flattened samples, or ``embed_fn``'s features: ``[m, e]`` float32 on the CPU."""
        features = samples.reshape(samples.shape[0], -1) if self.embed_fn is None else self._embedded(samples)
        return features.to("cpu", torch.float32)

    def _project(self, features: Tensor) -> Tensor:
        """Features ``[m, e]`` as index vectors ``[m, v]`` (``v = e`` raw, ``dim`` projected), contiguous."""
        if self.options.vectors == "projection":
            if self._projection is None:
                g = torch.Generator().manual_seed(self.options.seed)
                e, dim = features.shape[1], self.options.dim
                self._projection = torch.randn(e, dim, generator=g) / math.sqrt(dim)
            if features.shape[1] != self._projection.shape[0]:
                raise MemwatchError(f"`embed_fn` features must keep size {self._projection.shape[0]}")
            features = features @ self._projection
        if self._dim is None:
            self._dim = features.shape[1]
        elif features.shape[1] != self._dim:
            raise MemwatchError(
                f"`embed_fn` must keep the size of its first output, {self._dim}, got {features.shape[1]}"
            )
        return features.contiguous()

    def _embedded(self, samples: Tensor) -> Tensor:
        assert self.embed_fn is not None
        out = self.embed_fn(samples)
        m = samples.shape[0]
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != m or out.is_complex():
            raise MemwatchError(
                f"`embed_fn` must map {m} samples to a real tensor [{m}, e], got "
                f"{type(out).__name__} with shape {tuple(getattr(out, 'shape', ()))}"
            )
        if not torch.isfinite(out).all():
            raise MemwatchError("`embed_fn` returned non-finite features")
        return out.detach()

    def _admit(self, samples: Tensor, keys: Tensor, rows: Tensor, items: Tensor | None) -> None:
        """Offer distinct new samples ``[f, *shape]``: draw their slots, vectorize the winners, write them."""
        if self._dim is None:
            self._vectors(samples[:1])  # fixes the vector size, hence the capacities
        assert self._dim is not None
        exact_cap, cap = _capacities(self.options, self._dim, self._items is not None)
        drawn_from = self._generator.get_state()
        slots, winners = _reservoir_slots(self._offers, samples.shape[0], cap, self._generator)
        self._offers += samples.shape[0]
        if not slots.numel():
            return
        try:
            vectors = self._vectors(samples[winners.to(samples.device)])
        except BaseException:
            self._generator.set_state(drawn_from)  # a refused batch changes nothing
            self._offers -= samples.shape[0]
            raise
        held = max(self._held, int(slots.max()) + 1)
        if held > exact_cap and not self.compressed:
            self._compress()
        self._grow(held)
        assert self._store is not None
        evicted = slots[slots < self._held]
        for slot in evicted.tolist():
            del self._slot_of[int(self._keys[slot])]
        self._store[slots] = vectors.to(self._store.dtype)
        if self.compressed and not torch.isfinite(self._store[slots]).all():
            raise MemwatchError("the index's vectors exceed the float16 range (|x| > 65504): rescale the data")
        self._keys[slots], self._rows[slots] = keys[winners], rows[winners]
        if self._items is not None and items is not None:
            self._items[slots] = items[winners]
        for slot, key in zip(slots.tolist(), keys[winners].tolist()):
            self._slot_of[key] = slot
        self._held = held
        self._update_ivf(slots, evicted, vectors)

    def _grow(self, held: int) -> None:
        """Room for ``held`` slots: the store, keys and rows grow geometrically up to the capacity."""
        assert self._dim is not None
        size = 0 if self._store is None else self._store.shape[0]
        if held <= size:
            return
        exact_cap, cap = _capacities(self.options, self._dim, self._items is not None)
        new = min(max(held, 2 * size, 1024), exact_cap if not self.compressed else cap)
        dtype = torch.float16 if self.compressed else torch.float32
        store = torch.empty((new, self._dim), dtype=dtype)
        keys, rows = torch.full((new,), -1, dtype=torch.int64), torch.full((new,), -1, dtype=torch.int64)
        if self._store is not None:
            store[:size], keys[:size], rows[:size] = self._store, self._keys, self._rows
        self._store, self._keys, self._rows = store, keys, rows
        if self._items is not None:
            self._items = torch.cat([self._items, torch.full((new - self._items.numel(),), -1, dtype=torch.int64)])

    def _compress(self) -> None:
        """Pass to the compressed tier: the held vectors in float16."""
        self._compressed = True
        if self._faiss is None:
            warnings.warn(_NO_FAISS, RuntimeWarning, stacklevel=4)
        if self._store is None:
            return
        self._store = self._store.to(torch.float16)
        if not torch.isfinite(self._store[: self._held]).all():
            raise MemwatchError("the index's vectors exceed the float16 range (|x| > 65504): rescale the data")

    def _update_ivf(self, slots: Tensor, evicted: Tensor, vectors: Tensor) -> None:
        """Keep the IVF-PQ index in step with the store (built once ``_IVF_MIN`` are held, with faiss)."""
        if not self.compressed or self._faiss is None:
            return
        if self._ivf is None:
            if self._held >= _IVF_MIN:
                self._ivf = _build_ivf(self._faiss, self._store[: self._held].to(torch.float32), self._generator)
            return
        if evicted.numel():
            self._ivf.remove_ids(self._faiss.IDSelectorBatch(evicted.numpy()))
        self._ivf.add_with_ids(vectors.numpy(), slots.numpy())


def merge_hits(hits: Sequence[Hits]) -> Hits:
    """The exact union of several indexes' hits for the same probes (DDP ranks): per probe, the
    nearest samples of two distinct items among all candidates, an item offered twice counted once.

    Exact because the nearest samples of the union's two nearest items are each among the two
    nearest items of the index that holds them.

    Raises:
        MemwatchError: no hits, or hits for different numbers of probes.
    """
    if not hits:
        raise MemwatchError("`hits` must hold at least one Hits")
    if len({h.distance.shape[0] for h in hits}) != 1:
        raise MemwatchError(f"`hits` must be for the same probes, got sizes {[h.distance.shape[0] for h in hits]}")
    distance = torch.cat([h.distance.cpu() for h in hits], 1)
    key = torch.cat([h.key.cpu() for h in hits], 1)
    row = torch.cat([h.row.cpu() for h in hits], 1)
    order = torch.where(torch.isnan(distance), -1.0, distance).argsort(dim=1, stable=True)  # NaN probes stay NaN
    distance, key, row = distance.gather(1, order), key.gather(1, order), row.gather(1, order)
    earlier = torch.triu(torch.ones(key.shape[1], key.shape[1], dtype=torch.bool), diagonal=1)  # [j, l]: j < l
    repeat = ((key[:, :, None] == key[:, None, :]) & earlier & (key[:, :, None] >= 0)).any(1)
    distance = distance.masked_fill(repeat | (key < 0), torch.inf)
    distance, pos = distance.topk(2, dim=1, largest=False)
    mirrors = [h.mirror for h in hits]
    mirror = merge_hits(mirrors) if all(m is not None for m in mirrors) else None  # type: ignore[arg-type]
    nan = torch.isnan(torch.cat([h.distance[:, :1].cpu() for h in hits], 1)).any(1)
    distance[nan] = torch.nan
    absent = ~torch.isfinite(distance)
    return Hits(
        distance, key.gather(1, pos).masked_fill(absent, -1), row.gather(1, pos).masked_fill(absent, -1), mirror
    )


def ratio(hits: Hits) -> Tensor:
    """``d₁/d₂`` per probe ``[n]`` float64, a copy when ``< MEMORIZED_RATIO``; with mirrors the
    smaller of the probe's and its mirror's. NaN where fewer than two distinct samples are held
    (or the probe is not finite). A zero ``d₂`` is clamped to the smallest positive float."""
    d = hits.distance
    out = d[:, 0] / d[:, 1].clamp_min(torch.finfo(torch.float64).tiny)
    out = torch.where(torch.isfinite(d[:, 1]), out, torch.nan)
    return out if hits.mirror is None else torch.fmin(out, ratio(hits.mirror))


def nearest(hits: Hits) -> tuple[Tensor, Tensor]:
    """``(row [n], key [n])`` int64 of each probe's nearest sample, in the orientation whose
    :func:`ratio` counts (the mirror's where it is smaller); ``-1`` where none."""
    if hits.mirror is None:
        return hits.row[:, 0], hits.key[:, 0]
    use = _ratio_one(hits.mirror) < _ratio_one(hits)
    return torch.where(use, hits.mirror.row[:, 0], hits.row[:, 0]), torch.where(
        use, hits.mirror.key[:, 0], hits.key[:, 0]
    )


def fill_from(
    index: CopyIndex,
    data: Tensor | Dataset | DataLoader,
    *,
    progress: bool = False,
    batch_size: int = 4096,
    shard: tuple[int, int] = (0, 1),
) -> int:
    """Stream reference data once into ``index``, recording each sample's row (its position in
    iteration order); returns the offers. Never holds more than one batch of ``data``.

    Args:
        index: the :class:`CopyIndex` to fill.
        data: ``[N, *shape]`` tensor, a map-style ``Dataset`` (items: a tensor, or a tuple / dict
            whose first tensor is the sample) or a ``DataLoader`` (unshuffled, else the rows
            name other items on each pass).
        progress: show a progress bar (``tqdm``, else ``rich``).
        batch_size: samples per batch for a tensor or a Dataset.
        shard: ``(rank, world_size)``: add only batches ``b`` with ``b % world_size == rank`` (rows
            stay global), so DDP ranks split the set and :func:`merge_hits` joins their answers.
            A Dataset's other batches are not even read; a DataLoader's are read and skipped.

    Raises:
        MemwatchError: ``data`` of another type, or ``shard`` not ``0 <= rank < world_size``.
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise MemwatchError(f"`shard` must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    if isinstance(data, Tensor):
        starts = range(rank * batch_size, data.shape[0], world * batch_size)
        batches: Iterable[tuple[int, Any]] = ((s, data[s : s + batch_size]) for s in starts)
    elif isinstance(data, DataLoader):
        batches = _loader_shard(data, rank, world)
    elif isinstance(data, Dataset):
        starts = range(rank * batch_size, len(data), world * batch_size)
        mine = [list(range(s, min(s + batch_size, len(data)))) for s in starts]
        batches = zip(starts, DataLoader(data, batch_sampler=mine))
    else:
        raise MemwatchError(f"`data` must be a Tensor, a Dataset or a DataLoader, got {type(data).__name__}")
    offers = 0
    total = len(data) if isinstance(data, (Tensor, Dataset)) else None
    with _progress(progress, None if total is None else -(-total // world)) as advance:
        for start, item in batches:
            batch = first_tensor(item)
            offers += index.add(batch, torch.arange(start, start + batch.shape[0]))
            advance(batch.shape[0])
    return offers


def _loader_shard(loader: DataLoader, rank: int, world: int) -> Iterable[tuple[int, Any]]:
    """``(first row, batch)`` of the loader's batches ``b`` with ``b % world == rank`` (all are read)."""
    offset = 0
    for b, item in enumerate(loader):
        if b % world == rank:
            yield offset, item
        offset += first_tensor(item).shape[0]


# ---------------------------------------------------------------------- helpers
def _capacities(options: IndexOptions, v: int, items: bool = False) -> tuple[int, int]:
    """``(exact_capacity, capacity)`` for vectors of size ``v`` under ``options.memory_mb``
    (8 bytes more a sample when the index holds item ids)."""
    budget = options.memory_mb * 2**20
    extra = _KEY_BYTES + (8 if items else 0)
    exact = min(options.exact_limit, int(budget // (4 * v + 16 + extra)))
    compressed = int(budget // (2 * v + max(1, v // 8) + 24 + extra))
    return exact, max(2, exact, compressed)


def content_keys(samples: Tensor) -> Tensor:
    """63-bit BLAKE2b keys ``[m]`` int64 of samples ``[m, ...]`` as float32 bytes: the same on every
    process (unlike Python's ``hash``), equal exactly for equal rows.

    Example:
        >>> a = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
        >>> keys = content_keys(a)
        >>> bool(keys[0] == keys[1]), bool(keys[0] == keys[2])
        (True, False)
    """
    rows = samples.detach().reshape(samples.shape[0], -1).to("cpu", torch.float32).contiguous().numpy()
    digest = b"".join(hashlib.blake2b(memoryview(r), digest_size=8).digest() for r in rows)
    keys = np.frombuffer(digest, dtype=np.int64) & np.int64(0x7FFFFFFFFFFFFFFF)
    return torch.from_numpy(keys.copy())


def _reservoir_slots(offers: int, f: int, capacity: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Algorithm R for offers ``offers … offers+f−1``: ``(slots [r], winners [r])`` — the slots
    written and the offer (0…f−1) that fills each (where several draw one slot, the last wins)."""
    index = torch.arange(offers, offers + f, dtype=torch.int64)
    slot = index.clone()
    tail = index >= capacity
    if tail.any():
        u = torch.rand(int(tail.sum()), dtype=torch.float64, generator=generator)
        slot[tail] = torch.minimum((u * (index[tail] + 1).to(torch.float64)).floor().to(torch.int64), index[tail])
    chosen = slot < capacity
    drawn, offer = slot[chosen], torch.arange(f)[chosen]
    slots, inverse = torch.unique(drawn, return_inverse=True)
    last = torch.full((slots.numel(),), -1, dtype=torch.int64).scatter_reduce_(0, inverse, offer, reduce="amax")
    return slots, last


def _build_ivf(faiss: ModuleType, vectors: Tensor, generator: torch.Generator) -> Any:
    """An IVF-PQ index over ``vectors [h, v]`` (ids = slots), trained on ≤ max(40·nlist, 10⁴) of them
    (8-bit codes from 9984 training points on, fewer bits below)."""
    h, v = vectors.shape
    nlist = max(1, min(1024, h // 64))
    m = max(d for d in range(1, v + 1) if v % d == 0 and d <= max(1, v // 8))
    sample = torch.randperm(h, generator=generator)[: max(40 * nlist, 10_000)]
    nbits = max(4, min(8, int(math.log2(sample.numel() / 39))))  # faiss wants 39 training points a centroid
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(v), v, nlist, m, nbits)
    ivf.cp.niter = ivf.pq.cp.niter = (
        10  # k-means iterations (faiss: 25): a one-off cost of ~10 s at nlist 1024 on a core
    )
    ivf.train(vectors[sample].numpy())
    ivf.add_with_ids(vectors.numpy(), np.arange(h, dtype=np.int64))
    ivf.nprobe = max(1, nlist // 16)
    return ivf


def _ratio_one(hits: Hits) -> Tensor:
    return ratio(Hits(hits.distance, hits.key, hits.row))


def _load_faiss() -> ModuleType | None:
    """faiss, or ``None`` (the exact tier needs none; :meth:`CopyIndex._compress` warns once it would)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class _progress:
    """A context yielding ``advance(k)``: a tqdm (else rich) bar when ``enabled``, else a no-op."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total = enabled, total
        self._close: Callable[[], None] = lambda: None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda k: None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            from rich.progress import Progress

            bar = Progress()
            bar.start()
            task = bar.add_task("copy index", total=self.total)
            self._close = bar.stop
            return lambda k: bar.advance(task, k)
        tq = tqdm(total=self.total, unit="samples", desc="copy index")
        self._close = tq.close
        return tq.update

    def __exit__(self, *exc: object) -> None:
        self._close()
