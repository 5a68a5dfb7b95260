"""The copy index at N = 10⁴, 10⁵, 10⁶: build time, memory, query time of 32 probes, agreement with brute force.

Synthetic training sets (:class:`Synthetic`), generated row by row from seeded generators, so a
set is streamed in chunks, never held whole, and any row can be read back (the re-ranking on
reference data): ``--data manifold`` (default; intrinsic dimension 32, as images have a low one)
or ``--data iid`` (uniform coordinates: every training point at about the same distance from a
probe, the hardest case for an index, whose second-nearest is then found by distance alone).

* ``pixels``: ``d = 3·32·32 = 3072``, indexed as a fixed random projection to 256 coordinates;
* ``embedding``: ``d = 512`` features (as an SSCD / DINO extractor would give), indexed raw.

Probes: ``--checks`` sets of 32; in each, 16 planted copies ``x_r + s·σ·z`` (``r`` a random row,
``σ`` the data's per-coordinate standard deviation, ``s ~ U(0, 1)``, ``z`` Gaussian: the ratio
``d₁/d₂`` runs across the copy threshold 1/3) and 16 fresh samples of the same distribution.

One pass over the data feeds the index (``CopyIndex.add``, timed alone: the build) and the exact
float64 brute force (:func:`memwatch.groundtruth.nearest_neighbours` per chunk, merged). Per
configuration: build seconds, the index's memory (``CopyIndex.nbytes``), the median query time
of one check's 32 probes on the stored vectors and with re-ranking on the reference rows, and
the share of probes whose copy label (``d₁/d₂ < 1/3``) agrees with brute force for each. The
time to draw 32 probes (DDIM, 50 steps) with a tiny diffusers UNet at 3×32×32 is the yardstick
of the query time (target ≤ 0.1×). The cost of adding training samples (``CopyIndex.add``
of batches of 64 at 3×32×32, per sample; the monitor's per-step intake is timed by
``benchmarks/bench_overhead.py``) is timed too. Every time is process CPU seconds on ``--threads``
threads (default 1): on a shared machine wall time measures the neighbours.

    python benchmarks/bench_copy_index.py                                  # 10⁴, 10⁵, 10⁶, both spaces
    python benchmarks/bench_copy_index.py --sizes 10000 100000 --spaces pixels --checks 2 --draw-seconds 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import Tensor
from torch.utils.data import Dataset

from memwatch.groundtruth import MEMORIZED_RATIO, nearest_neighbours, ratio_of
from memwatch.index import CopyIndex, IndexOptions, ratio

SPACES = {
    "pixels": ((3, 32, 32), IndexOptions(memory_mb=2048, vectors="projection", dim=256)),
    "embedding": ((512,), IndexOptions(memory_mb=2048)),
}


class Synthetic(Dataset):
    """``n`` rows of shape ``shape``, row ``i`` from its own seeded generator (any row can be read back).

    ``"manifold"``: ``x = A z / √32 + 0.1 ε`` with ``z ~ N(0, I₃₂)``, ``ε ~ N(0, I_d)`` and a fixed
    ``A [d, 32]`` (Gaussian): data of intrinsic dimension 32 near a linear manifold, as images
    have a low intrinsic dimension. ``"iid"``: every coordinate uniform in ``[-1, 1)``, the
    hardest case for an index (every training point at about the same distance from a probe).
    Rows ``i >= n`` are fresh samples of the same distribution (probes that copy nothing).
    """

    def __init__(self, n: int, shape: tuple[int, ...], data: str, seed: int = 0) -> None:
        self.n, self.shape, self.data, self.seed = n, shape, data, seed
        d = math.prod(shape)
        self.basis = torch.randn(d, 32, generator=torch.Generator().manual_seed(seed)) / math.sqrt(32)
        self.std = math.sqrt(1.01) if data == "manifold" else 1 / math.sqrt(3)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        return self.rows(int(i), int(i) + 1)[0]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start … stop−1`` ``[stop − start, *shape]`` float32."""
        d = self.basis.shape[0]
        gens = [torch.Generator().manual_seed(self.seed * 2**32 + i) for i in range(start, stop)]
        if self.data == "iid":
            return torch.stack([2 * torch.rand(d, generator=g) - 1 for g in gens]).reshape(-1, *self.shape)
        z = torch.stack([torch.randn(32, generator=g) for g in gens])
        noise = torch.stack([torch.randn(d, generator=g) for g in gens])
        return (z @ self.basis.T + 0.1 * noise).reshape(-1, *self.shape)


def probe_sets(data: Synthetic, checks: int, seed: int) -> list[Tensor]:
    """``checks`` sets of 32 probes: 16 planted copies at relative noise ``s ~ U(0, 1)``, 16 fresh."""
    g = torch.Generator().manual_seed(seed + 1)
    sets = []
    for check in range(checks):
        rows = torch.randint(data.n, (16,), generator=g)
        s = torch.rand(16, generator=g).reshape(16, *[1] * len(data.shape))
        planted = torch.stack([data[int(r)] for r in rows]) + s * data.std * torch.randn(16, *data.shape, generator=g)
        sets.append(torch.cat([planted, data.rows(data.n + 16 * check, data.n + 16 * (check + 1))]))
    return sets


def build(data: Synthetic, options: IndexOptions, probes: Tensor, chunk: int) -> tuple[CopyIndex, float, Tensor]:
    """One pass: the index (and its build seconds) and the brute-force distances ``[n, 2]`` of ``probes``."""
    index = CopyIndex(options, data.shape)
    best = torch.full((probes.shape[0], 2), torch.inf, dtype=torch.float64)
    seconds = 0.0
    for start in range(0, data.n, chunk):
        rows = data.rows(start, min(start + chunk, data.n))
        started = time.process_time()
        index.add(rows, torch.arange(start, start + rows.shape[0]))
        seconds += time.process_time() - started
        dist, _ = nearest_neighbours(probes, rows, chunk_size=chunk)
        best = torch.cat([best, dist], 1).topk(2, dim=1, largest=False).values
    return index, seconds, best


def timed_queries(index: CopyIndex, sets: list[Tensor], reference: Dataset | None) -> tuple[float, Tensor]:
    """Median seconds of one check's query, and the ratios ``[n]`` of all probes."""
    times, ratios = [], []
    for probes in sets:
        started = time.process_time()
        hits = index.search(probes, reference=reference)
        times.append(time.process_time() - started)
        ratios.append(ratio(hits))
    return statistics.median(times), torch.cat(ratios)


def draw_seconds() -> float:
    """Seconds to draw 32 probes at 3×32×32 with DDIM (50 steps) from a tiny diffusers UNet (widths 32/64)."""
    from memwatch.apps.toymodels import tiny_unet
    from memwatch.sampling import sample
    from memwatch.schedules import NoiseSchedule
    from memwatch.score import DiffusionScore

    unet = tiny_unet(3, 32, widths=(32, 64)).eval()
    score = DiffusionScore(lambda x, t: unet(x, t).sample, NoiseSchedule.linear(1000))
    started = time.process_time()
    with torch.no_grad():
        sample(score, n=32, shape=(3, 32, 32), steps=50, generator=torch.Generator().manual_seed(0))
    return time.process_time() - started


def intake_cost(steps: int = 50) -> float:
    """CPU microseconds per sample to add 64×3×32×32 batches (hash, project, write): what a
    monitor's check spends on the training samples staged since the last one."""
    index = CopyIndex(IndexOptions(vectors="projection"), (3, 32, 32))
    index.add(torch.rand(64, 3, 32, 32))  # the projection drawn, the store allocated
    batches = [torch.rand(64, 3, 32, 32) for _ in range(steps)]
    started = time.process_time()
    for batch in batches:
        index.add(batch)
    return (time.process_time() - started) / (steps * 64) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--spaces", nargs="+", choices=sorted(SPACES), default=["pixels", "embedding"])
    parser.add_argument("--checks", type=int, default=4, help="probe sets of 32 (agreement is over all)")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--data", choices=["manifold", "iid"], default="manifold", help="see Synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draw-seconds", type=float, help="use this probe-draw time instead of measuring it")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1: steadiest when shared)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    draw = args.draw_seconds if args.draw_seconds is not None else draw_seconds()
    add_us = intake_cost()
    print(
        f"data {args.data}; threads {args.threads}; draw of 32 probes (tiny UNet 3x32x32, 50 DDIM steps): {draw:.2f} s"
    )
    print(f"intake: add {add_us:.0f} us per sample (batches of 64, 3x32x32)")
    header = "space      N        tier        build s  index MiB  query s  /draw   agree  query+rerank s  /draw  agree"
    print(header, flush=True)
    for space in args.spaces:
        shape, options = SPACES[space]
        for n in args.sizes:
            row(space, n, shape, options, args, draw)


def row(
    space: str, n: int, shape: tuple[int, ...], options: IndexOptions, args: argparse.Namespace, draw: float
) -> None:
    """Build, query and compare one configuration; print its table row."""
    data = Synthetic(n, shape, args.data, args.seed)
    sets = probe_sets(data, args.checks, args.seed)
    index, seconds, truth = build(data, options, torch.cat(sets), args.chunk)
    label = ratio_of(truth) < MEMORIZED_RATIO
    cells = []
    for reference in (None, data):
        query, r = timed_queries(index, sets, reference)
        agree = float(((r < MEMORIZED_RATIO) == label).double().mean())
        cells.append(f"{query:7.3f}  {query / draw:5.3f}  {agree:6.3f}")
    tier = "compressed" if index.compressed else "exact"
    print(
        f"{space:9s}  {n:<8d} {tier:10s}  {seconds:7.1f}  {index.nbytes / 2**20:9.1f}  {cells[0]}  {cells[1]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
