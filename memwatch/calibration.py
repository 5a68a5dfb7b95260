"""The training set's scale, from training samples seen in batches, turned into noise levels.

Sharpness is a statement at a scale: at noise level ``σ_t`` the learned density resolves
structure of size ≈ ``σ_t``. The same images rescaled from ``[-1, 1]`` to ``[0, 1]`` halve every
distance, so an absolute ``σ_t`` means something else for each. This module measures the scale
of the training data itself and expresses noise levels relative to it:

1. :class:`Reservoir` keeps a bounded uniform sample of the training samples seen so far
   (in memory only);
2. :func:`data_scale` reduces it to nearest-neighbour distance statistics (:class:`DataScale`);
3. :func:`relative_sigmas` turns factors into noise levels ``σ = factor × median NN distance``,
   clamped into the range where the schedule can measure them.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> reservoir = Reservoir(capacity=256, seed=0)
    >>> for _ in range(4):
    ...     reservoir.update(torch.rand(100, 16, generator=g) * 2 - 1)
    >>> reservoir.samples.shape, reservoir.seen
    (torch.Size([256, 16]), 400)
    >>> scale = data_scale(reservoir.samples)
    >>> sigmas = relative_sigmas(scale, NoiseSchedule.linear(1000), factors=(0.2, 0.5))
    >>> [round(s / scale.median, 3) for s in sigmas]
    [0.2, 0.5]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.groundtruth import nearest_neighbours
from memwatch.schedules import NoiseSchedule
from memwatch.validation import check_int

__all__ = ["DataScale", "Reservoir", "data_scale", "level_range", "relative_sigmas", "RESOLVED_FRACTION"]

RESOLVED_FRACTION = 0.02
"""Default floor and ceiling of :func:`relative_sigmas`: σ at this fraction of the schedule's
timesteps from the clean end (floor) and from the noisy end (ceiling)."""

_KARRAS_RHO = 7.0  # VE schedules: fractions of the timesteps are taken along Karras et al.'s ρ = 7 grid


class Reservoir:
    """A bounded uniform sample of the training samples seen in batches (Vitter's algorithm R).

    After ``N`` samples have been seen, the reservoir holds ``m = min(N, capacity)`` of them, and
    every ``m``-subset of the ``N`` is equally likely: each sample is kept with probability
    ``capacity / N``. Sample ``i`` (0-based, in stream order) fills slot ``i`` while
    ``i < capacity``; afterwards it draws ``j`` uniform in ``[0, i]`` and replaces slot ``j`` when
    ``j < capacity``. A batch draws all its ``j`` at once and, where several of its samples pick
    the same slot, the last one in stream order wins, exactly as the one-at-a-time algorithm.
    Cost per batch: ``b`` uniform draws, and the kept rows alone go through ``update``'s
    ``transform`` (an encoder) and are copied to the CPU.

    The stream counts every sample it is shown: over several epochs the same training sample
    is seen (and may be kept) more than once; :func:`data_scale` removes exact duplicates.
    With ``distinct=True`` a sample equal to one held now (or earlier in the same batch) is not
    offered again: a training set of up to ``capacity`` distinct samples is then held whole,
    whatever the number of epochs (the stream reservoir of 4096 over 4000 batches of 64 from
    1024 samples misses ≈ e⁻⁴ ≈ 2 % of them). Beyond ``capacity``, a sample evicted earlier
    may enter again when it comes back, so the held sample is uniform over the stream of
    first sightings. Cost: each batch is copied to the CPU and every row hashed (its bytes; the raw
    rows, before any ``transform``).

    Memory: ``capacity × prod(shape) × 4`` bytes (float32), allocated at the first batch.

    Privacy:
        The samples are training data. They live in memory only: :meth:`state_dict` holds the
        counters and the random generator's state, never a sample, so a checkpoint or a log
        never contains training data through this class. The price: after
        :meth:`load_state_dict` the reservoir is empty and refills from the samples seen since;
        its decisions are those the uninterrupted run would have taken, so it then holds
        exactly the uninterrupted run's reservoir restricted to the samples seen after the
        resume (still a uniform sample of those). Persist what was derived from it (the noise
        levels, floats) rather than relying on it after a resume.

    Args:
        capacity: most samples kept, ``>= 2``.
        seed: seed of the reservoir's own ``torch.Generator`` (CPU); the same stream of batches
            with the same seed keeps the same samples.
        distinct: skip samples equal to one held (see above).

    Raises:
        MemwatchError: ``capacity`` or ``seed`` is not a valid integer.

    Example:
        >>> r = Reservoir(capacity=3, seed=0)
        >>> r.update(torch.arange(10.0).reshape(5, 2))
        >>> r.samples.shape, r.seen
        (torch.Size([3, 2]), 5)
    """

    def __init__(self, capacity: int = 4096, *, seed: int = 0, distinct: bool = False) -> None:
        check_int("capacity", capacity, 2)
        check_int("seed", seed, 0)
        self.capacity = capacity
        self.seed = seed
        self.distinct = distinct
        self._slot_of: dict[int, int] = {}  # with distinct: hash of a held sample's bytes -> its slot
        self._key_at: dict[int, int] = {}  # slot -> that hash
        self._generator = torch.Generator().manual_seed(seed)
        self._seen = 0
        self._shape: tuple[int, ...] | None = None  # of a held sample (after any transform)
        self._raw_shape: tuple[int, ...] | None = None  # of a batch row as offered
        self._buffer: Tensor | None = None  # [capacity, *shape] float32, CPU
        self._filled: Tensor | None = None  # [capacity] bool

    @property
    def seen(self) -> int:
        """Samples offered to the reservoir so far (counting repeats across epochs; with
        ``distinct``, not counting a sample equal to one held when it came)."""
        return self._seen

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of one held sample (after ``update``'s ``transform``), fixed by the first batch;
        ``None`` before it."""
        return self._shape

    def __len__(self) -> int:
        """Samples held now, ``min(seen, capacity)`` (fewer after a resume)."""
        return 0 if self._filled is None else int(self._filled.sum())

    @property
    def samples(self) -> Tensor:
        """The samples held, ``[m, *shape]`` float32 on the CPU (a copy), in slot order.

        Raises:
            MemwatchError: no batch has been seen.
        """
        if self._buffer is None or self._filled is None:
            raise MemwatchError("the reservoir holds no samples yet: call `update(batch)` with training batches first")
        return self._buffer[self._filled]  # boolean-mask indexing copies (a .clone() would copy it twice)

    def rows(self, index: Tensor) -> Tensor:
        """The held samples at positions ``index`` ``[r]`` of :attr:`samples` (slot order):
        ``[r, *shape]``, a copy of those rows only (not of every sample held).

        Raises:
            MemwatchError: no batch has been seen.
        """
        if self._buffer is None or self._filled is None:
            raise MemwatchError("the reservoir holds no samples yet: call `update(batch)` with training batches first")
        return self._buffer[self._filled.nonzero().squeeze(1)[index]]

    @torch.no_grad()
    def update(self, batch: Tensor, *, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        """Offer a batch ``[b, *raw_shape]`` of training samples; the kept rows are copied
        (detached, float32, CPU).

        ``transform`` (e.g. an encoder into the probes' latent space) maps rows ``[r, *raw_shape]``
        to ``[r, *shape]``; it runs on the kept rows only (a full reservoir keeps few rows per
        batch), and equality for ``distinct`` is decided on the raw rows, so an encoder that
        samples still recognizes an image seen before. The held samples have the transform's
        shape, fixed by the first batch.

        Raises:
            MemwatchError: ``batch`` is not a real tensor with a batch dimension, its raw sample
                shape differs from the first batch's, or ``transform`` returns anything but one
                real tensor row per input row of the first batch's output shape.
        """
        if not isinstance(batch, Tensor) or batch.ndim < 1 or batch.is_complex():
            raise MemwatchError(
                f"`batch` must be a real tensor [b, *shape], got {type(batch).__name__} "
                f"with shape {tuple(getattr(batch, 'shape', ()))}"
            )
        raw_shape = tuple(batch.shape[1:])
        if self._raw_shape is None:
            self._raw_shape = raw_shape
        elif raw_shape != self._raw_shape:
            raise MemwatchError(
                f"`batch` samples must keep the shape of the first batch, {self._raw_shape}, got {raw_shape}"
            )
        batch = batch.detach()
        fresh, keys = self._new_rows(batch) if self.distinct else (None, None)
        offered = batch.shape[0] if fresh is None else len(fresh)
        drawn_from = None if transform is None else self._generator.get_state()  # only a transform can fail below
        slots, rows = self._draw(offered)
        if rows.numel():
            index = rows if fresh is None else torch.as_tensor(fresh, dtype=torch.int64)[rows]
            try:
                kept = self._transformed(batch[index.to(batch.device)], transform)
            except BaseException:
                if drawn_from is not None:
                    self._generator.set_state(drawn_from)  # a rejected batch changes nothing
                raise
            assert self._buffer is not None and self._filled is not None
            self._buffer[slots] = kept.to("cpu", torch.float32)
            self._filled[slots] = True
            if keys is not None:
                for slot, row in zip(slots.tolist(), rows.tolist()):
                    if slot in self._key_at:  # forget the evicted sample
                        del self._slot_of[self._key_at[slot]]
                    self._slot_of[keys[row]], self._key_at[slot] = slot, keys[row]
        self._seen += offered

    def _transformed(self, rows: Tensor, transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        """``transform(rows)`` checked (one real tensor row per row, the held samples' shape);
        the first call fixes that shape and allocates the buffer."""
        out = rows if transform is None else transform(rows)
        if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != rows.shape[0] or out.is_complex():
            raise MemwatchError(
                f"`transform` must map {rows.shape[0]} rows to a real tensor [{rows.shape[0]}, *shape], got "
                f"{type(out).__name__} with shape {tuple(getattr(out, 'shape', ()))}"
            )
        shape = tuple(out.shape[1:])
        if self._shape is None:
            self._allocate(shape)
        elif shape != self._shape:
            raise MemwatchError(f"`transform` must keep the shape of its first output, {self._shape}, got {shape}")
        return out.detach()

    def _new_rows(self, batch: Tensor) -> tuple[list[int], list[int]]:
        """Indices of the rows of ``batch`` not equal to a held sample or an earlier row (their
        float32 bytes on the CPU), and their keys."""
        rows = batch.to("cpu", torch.float32).contiguous()
        keys = [hash(row.numpy().tobytes()) for row in rows.reshape(rows.shape[0], -1)]
        fresh, in_batch = [], set()
        for i, key in enumerate(keys):
            if key not in self._slot_of and key not in in_batch:
                in_batch.add(key)
                fresh.append(i)
        return fresh, [keys[i] for i in fresh]

    def _allocate(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._buffer = torch.empty((self.capacity, *shape), dtype=torch.float32)
        self._filled = torch.zeros(self.capacity, dtype=torch.bool)

    def _draw(self, b: int) -> tuple[Tensor, Tensor]:
        """Slots ``[r]`` and the batch rows ``[r]`` that fill them (one row per slot, the last wins)."""
        index = torch.arange(self._seen, self._seen + b, dtype=torch.int64)  # stream positions
        filling = index < self.capacity
        slot = index.clone()
        tail = index[~filling]
        if tail.numel():
            # j uniform in [0, i]; float64 keeps the draw exact to 2⁻⁵³ relative, far below any test.
            u = torch.rand(tail.numel(), dtype=torch.float64, generator=self._generator)
            slot[~filling] = torch.minimum((u * (tail + 1).to(torch.float64)).floor().to(torch.int64), tail)
        chosen = slot < self.capacity
        slots, rows = slot[chosen], torch.arange(b)[chosen]
        last = torch.full((self.capacity,), -1, dtype=torch.int64)
        last.scatter_reduce_(0, slots, rows, reduce="amax")  # later samples overwrite earlier ones
        winners = (last >= 0).nonzero().flatten()
        return winners, last[winners]

    def state_dict(self) -> dict[str, Any]:
        """Counters and the generator's state: ``{"capacity", "seed", "seen", "rng_state"}``; never samples."""
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "seen": self._seen,
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream: counters and generator restored, samples dropped (see *Privacy*).

        Raises:
            MemwatchError: ``state`` lacks a key or was saved with another ``capacity``.
        """
        missing = {"capacity", "seed", "seen", "rng_state"} - set(state)
        if missing:
            raise MemwatchError(f"`state` must hold the keys of `Reservoir.state_dict()`, missing {sorted(missing)}")
        if state["capacity"] != self.capacity:
            raise MemwatchError(
                f"`state` was saved with capacity {state['capacity']}, this reservoir has capacity {self.capacity}"
            )
        self.seed = int(state["seed"])
        self._seen = int(state["seen"])
        self._generator.set_state(state["rng_state"])
        self._shape = self._raw_shape = self._buffer = self._filled = None
        self._slot_of, self._key_at = {}, {}


@dataclass(frozen=True)
class DataScale:
    """Nearest-neighbour distance statistics of a training sample (data units, Euclidean).

    For each query point ``x`` of the (de-duplicated) sample, ``d(x)`` is its distance to the
    nearest *other* point of the sample; ``median``, ``q10`` and ``q90`` are the median (the
    lower one for an even count, as :func:`memwatch.median_nn_distance`) and the 10 % / 90 %
    quantiles (linear interpolation) of ``d`` over the queries.

    Subsampling bias: in a uniform subsample of ``n`` of ``N`` points drawn from data of
    intrinsic dimension ``k``, nearest-neighbour distances are larger than in the full set by a
    factor ≈ ``(N / n)^(1/k)`` (the NN distance of ``n`` points scales as ``n^(-1/k)``). A
    reservoir smaller than the training set therefore overestimates its scale:
    :meth:`extrapolated_median` applies the correction for a given ``k``; with ``k`` unknown the
    uncorrected median is an upper bound of the full set's (in expectation).

    Attributes:
        median: median NN distance.
        q10: 10 % quantile of the NN distances.
        q90: 90 % quantile of the NN distances.
        dim_std: per-dimension standard deviation, ``sqrt(mean_i Var(x_i))`` over the ``d``
            dimensions (unbiased variances); ``≈ 1`` for standardized latents.
        n: distinct points the distances are taken among.
        num_queries: points whose NN distance entered the statistics (``min(n, max_queries)``).
        num_duplicates: exact duplicates removed before (repeats of a sample across epochs).
    """

    median: float
    q10: float
    q90: float
    dim_std: float
    n: int
    num_queries: int
    num_duplicates: int

    def extrapolated_median(self, total: int, intrinsic_dim: float) -> float:
        """The median NN distance expected in the full set of ``total`` points, ``median · (n / total)^(1/k)``.

        Args:
            total: size ``N >= n`` of the full training set (distinct samples: a reservoir's
                ``seen`` counts repeats across epochs and overstates ``N`` after the first).
            intrinsic_dim: intrinsic dimension ``k > 0`` of the data.

        Raises:
            MemwatchError: ``total < n`` or ``intrinsic_dim <= 0``.
        """
        if isinstance(total, bool) or not isinstance(total, int) or total < self.n:
            raise MemwatchError(f"`total` must be an integer >= n = {self.n}, got {total!r}")
        if not (isinstance(intrinsic_dim, (int, float)) and math.isfinite(intrinsic_dim) and intrinsic_dim > 0):
            raise MemwatchError(f"`intrinsic_dim` must be a finite number > 0, got {intrinsic_dim!r}")
        return self.median * (self.n / total) ** (1.0 / intrinsic_dim)


def data_scale(samples: Tensor, *, max_queries: int = 2048, generator: torch.Generator | None = None) -> DataScale:
    """Nearest-neighbour distance statistics of training samples ``[m, *shape]`` (float64 inside).

    Exact duplicates are removed first (a reservoir over several epochs holds repeats, whose
    distance 0 says nothing about the data's scale). Above ``max_queries`` distinct points the
    statistics are taken over a random subset of query points, each still compared with all
    points (:func:`memwatch.nearest_neighbours`), the same way as :func:`memwatch.median_nn_distance`.

    Args:
        samples: ``[m, *shape]`` training samples, e.g. ``Reservoir.samples``.
        max_queries: at most this many query points, ``>= 1``.
        generator: source of the query subset (used only when ``n > max_queries``).

    Returns:
        :class:`DataScale` in the samples' units.

    Raises:
        MemwatchError: ``samples`` is not a real tensor ``[m, *shape]`` with at least 2 distinct
            finite points, or ``max_queries < 1``.

    Example:
        >>> s = data_scale(torch.tensor([[0.0], [1.0], [3.0], [3.0]]))
        >>> s.median, s.n, s.num_duplicates
        (1.0, 3, 1)
    """
    check_int("max_queries", max_queries, 1)
    if not isinstance(samples, Tensor) or samples.ndim < 2 or samples.is_complex():
        raise MemwatchError(
            f"`samples` must be a real tensor [m, *shape], got shape {tuple(getattr(samples, 'shape', ()))}"
        )
    flat = rearrange(samples.detach(), "m ... -> m (...)").to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise MemwatchError("`samples` must be finite, got NaN or infinite values")
    points = torch.unique(flat, dim=0)
    n = points.shape[0]
    if n < 2:
        raise MemwatchError(f"`samples` must hold at least 2 distinct points, got {n} (of {flat.shape[0]})")
    queries = points if n <= max_queries else points[torch.randperm(n, generator=generator)[:max_queries]]
    dist, _ = nearest_neighbours(queries, points)  # the nearest is the query itself, at distance 0
    nn = dist[:, 1]
    q10, q90 = torch.quantile(nn, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    return DataScale(
        median=float(nn.median()),
        q10=q10,
        q90=q90,
        dim_std=float(flat.var(dim=0).mean().sqrt()),
        n=n,
        num_queries=queries.shape[0],
        num_duplicates=flat.shape[0] - n,
    )


def relative_sigmas(
    scale: DataScale,
    schedule: NoiseSchedule,
    factors: Sequence[float] = (0.2,),
    *,
    floor: float | None = None,
    ceiling: float | None = None,
) -> tuple[float, ...]:
    """Noise levels relative to the data's scale, ``σ_i = clamp(factor_i × median NN distance, floor, ceiling)``.

    The monitor's default ``sigmas="auto"`` uses factor 0.1 (``memwatch.defaults.SIGMA_FACTORS``),
    chosen on the selection seed of the validation study (``docs/validation.md``, v2.2), with its
    ceiling lowered to the sampler's first timestep when that is below the default one.

    Args:
        scale: the training set's scale, from :func:`data_scale` (in the units the score
            lives in: latents for a latent model).
        schedule: the model's noise schedule.
        factors: multiples of the median NN distance, each finite and ``> 0``; the first is the
            primary level.
        floor: smallest level, where the network is resolved; default σ at
            ``RESOLVED_FRACTION`` (2 %) of the timesteps from the clean end: discrete
            ``σ(round(0.02 (T-1)))`` (``≈ 0.080`` for ``NoiseSchedule.linear(1000)``), VP
            ``σ(t_min + 0.02 (1 - t_min))``, flow the same in data units (``σ_t / α_t``,
            :meth:`~memwatch.schedules.NoiseSchedule.noise_level`), VE the 2 % point of Karras
            et al.'s ρ = 7 grid.
        ceiling: largest level, inside the schedule; default σ at 2 % of the timesteps from the
            noisy end (same construction).

    Returns:
        One level per factor, in order (clamped levels may repeat), in data units.

    Warns:
        RuntimeWarning: a level was clamped to the floor or the ceiling (it names the factors).

    Raises:
        MemwatchError: a factor is not finite and positive, the median is not, or ``floor`` /
            ``ceiling`` are outside the schedule's σ range or not ``floor < ceiling``.

    Example:
        >>> scale = DataScale(median=2.0, q10=1.5, q90=2.5, dim_std=1.0, n=100, num_queries=100, num_duplicates=0)
        >>> relative_sigmas(scale, NoiseSchedule.edm(), factors=(0.2, 0.5))
        (0.4, 1.0)
    """
    bad = [f for f in factors if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0)]
    if not factors or bad:
        raise MemwatchError(f"`factors` must be a non-empty sequence of finite numbers > 0, got {factors!r}")
    if not (math.isfinite(scale.median) and scale.median > 0):
        raise MemwatchError(f"`scale.median` must be finite and > 0, got {scale.median!r}")
    lo, hi = _clamp_range(schedule, floor, ceiling)
    levels = [f * scale.median for f in factors]
    clamped = [(f, s) for f, s in zip(factors, levels) if not lo <= s <= hi]
    if clamped:
        listed = ", ".join(f"{f:g} × {scale.median:.4g} = {s:.4g}" for f, s in clamped)
        warnings.warn(
            f"noise levels clamped into [{lo:.4g}, {hi:.4g}] (floor, ceiling) of this {schedule.kind} schedule: "
            f"{listed}; they are no longer relative to the data's scale",
            RuntimeWarning,
            stacklevel=2,
        )
    return tuple(min(max(s, lo), hi) for s in levels)


def level_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """The default ``(floor, ceiling)`` of :func:`relative_sigmas` for ``schedule`` (σ_t, data units).

    Example:
        >>> [round(v, 3) for v in level_range(NoiseSchedule.linear(1000))]
        [0.079, 1.0]
    """
    return _clamp_range(schedule, None, None)


def _clamp_range(schedule: NoiseSchedule, floor: float | None, ceiling: float | None) -> tuple[float, float]:
    """``(floor, ceiling)`` after defaults, checked against the schedule's σ range."""
    s_min, s_max = float(schedule.noise_level(schedule.t_min)), float(schedule.noise_level(schedule.t_max))
    lo = _sigma_at_fraction(schedule, RESOLVED_FRACTION) if floor is None else floor
    hi = _sigma_at_fraction(schedule, 1.0 - RESOLVED_FRACTION) if ceiling is None else ceiling
    for name, value in (("floor", lo), ("ceiling", hi)):
        if not (isinstance(value, (int, float)) and s_min <= value <= s_max and value > 0):
            raise MemwatchError(
                f"`{name}` must lie in this {schedule.kind} schedule's σ range [{s_min:.4g}, {s_max:.4g}] "
                f"and be > 0, got {value!r}"
            )
    if not lo < hi:
        raise MemwatchError(f"need `floor` < `ceiling`, got floor {lo:.4g} and ceiling {hi:.4g}")
    return float(lo), float(hi)


def _sigma_at_fraction(schedule: NoiseSchedule, fraction: float) -> float:
    """The noise level (:meth:`~memwatch.schedules.NoiseSchedule.noise_level`) at ``fraction`` of the
    schedule's timesteps from the clean end (VE: along the ρ = 7 grid)."""
    t0, t1 = schedule.t_min, schedule.t_max
    if schedule.kind == "ve":
        a, b = t0 ** (1 / _KARRAS_RHO), t1 ** (1 / _KARRAS_RHO)
        return (a + fraction * (b - a)) ** _KARRAS_RHO
    t = t0 + fraction * (t1 - t0)
    return float(schedule.noise_level(round(t) if schedule.is_discrete else t))
