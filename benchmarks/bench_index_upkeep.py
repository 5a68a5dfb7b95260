"""What the default copy index costs a training run: its whole upkeep against the training steps it rides on.

With ``reference_data="batches"`` (the default) the monitor stages a detached copy of every
training batch (``BatchIntake.stage``, every step) and, at the next check (or once the staged rows
pass 64 MiB), checks, hashes and offers them to the reservoir and the copy index
(``TrainingSamples.drain``). This script measures both on the same batches a training run sees,
beside the training steps of the benchmark UNet (a diffusers ``UNet2DModel``, widths 32/64, at
3×16×16, a default ``DDPMScheduler``; the model of ``bench_overhead.py``), in one run:

* a plain training step (forward, loss, backward, Adam), median of ``--steps`` after a warm-up;
* the upkeep of one check interval (``--every`` steps, the default cadence): staging every batch,
  then draining them all into the index, as the monitor does at its check.

The data: ``--distinct`` distinct samples (random images: the cost does not depend on the pixels),
streamed in batches of ``--batch`` as epochs of a shuffled data set, so the first interval offers
new samples and later ones mostly repeats (hashed and skipped) — both are timed (``--intervals``).

    python benchmarks/bench_index_upkeep.py                       # batch 256, 500 steps an interval
    python benchmarks/bench_index_upkeep.py --distinct 1000000 --intervals 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from memwatch.apps.toymodels import UNetDDPMModule, tiny_unet
from memwatch.index import CopyIndex, IndexOptions
from memwatch.intake import BatchIntake, TrainingSamples
from memwatch.options import DataOptions


def step_seconds(batch: int, steps: int) -> float:
    """Median wall seconds of a plain training step of the benchmark UNet at ``batch``."""
    from diffusers import DDPMScheduler

    module = UNetDDPMModule(tiny_unet(3, 16, widths=(32, 64)), DDPMScheduler())
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 16, 16)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        loss = module.training_step((x,), i)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def upkeep_seconds(distinct: int, batch: int, every: int, intervals: int, memory_mb: float) -> list[float]:
    """Wall seconds of staging ``every`` batches and draining them into the index, per interval."""
    data = torch.rand(distinct, 3, 16, 16) * 2 - 1
    samples = TrainingSamples(BatchIntake(DataOptions()), seed=0, uses="reference_data='batches'")
    samples.index = CopyIndex(IndexOptions(memory_mb=memory_mb), (3, 16, 16))
    samples.drop_reservoir()  # the monitor drops it after the first check; the index stays
    order = torch.cat([torch.randperm(distinct) for _ in range(every * batch * intervals // distinct + 1)])
    out = []
    for k in range(intervals):
        started = time.perf_counter()
        for s in range(every):
            rows = order[(k * every + s) * batch : (k * every + s + 1) * batch]
            samples.offer((data[rows],), s, (3, 16, 16))
        samples.drain((3, 16, 16))
        out.append(time.perf_counter() - started)
    print(f"  index: {len(samples.index)} samples held, {samples.index.nbytes / 2**20:.0f} MiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--every", type=int, default=500, help="steps between checks (default: the monitor's 500)")
    parser.add_argument("--distinct", type=int, default=100_000, help="distinct training samples (default 1e5)")
    parser.add_argument("--intervals", type=int, default=2, help="check intervals timed (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed (default 5)")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="copies.index.memory_mb (default 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log")  # the step runs outside a Trainer
    step = step_seconds(args.batch, args.steps)
    print(
        f"training step (batch {args.batch}): {step:.3f} s; "
        f"an interval of {args.every} steps: {step * args.every:.0f} s"
    )
    upkeep = upkeep_seconds(args.distinct, args.batch, args.every, args.intervals, args.memory_mb)
    for k, seconds in enumerate(upkeep):
        print(
            f"  interval {k + 1}: upkeep {seconds:.2f} s = {seconds / (step * args.every):.2%} of the interval's "
            f"training ({seconds / args.every * 1e3:.2f} ms a step)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
