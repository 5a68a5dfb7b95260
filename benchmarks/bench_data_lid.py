"""Time and peak memory of the LID signal's data LID (local PCA) at a monitor's first check.

What the first check does when the monitor holds ``--samples`` distinct training samples
(``reference_data="batches"`` with ``data.capacity`` that large): a random 4096 of them
(``defaults.CALIBRATION_CAPACITY``) are copied out of the reservoir, and
:meth:`memwatch.signals.lid.LidSignal.fit_reference` takes the local PCA of the neighbourhoods of
256 anchors at each noise level. The samples are ``--shape`` points near an 8-dimensional linear
subspace (seeded, unit-scale coordinates, noise 0.01). Two levels: the calibrated one
(``0.1 ×`` the samples' median nearest-neighbour distance) and a wide one (``1 ×``; its
neighbourhoods reach 6 τ, up to 256 points each, as at a level clamped at the schedule's ceiling).

Each setting runs in a fresh subprocess (Linux) and reports its resident set size from
``/proc/self/status``: ``baseline`` (``VmRSS``) after building the reservoir, whose peak is then
reset (``/proc/self/clear_refs``); ``peak`` (``VmHWM``) after the data LID; ``added`` = peak −
baseline is what the data LID needed. ``--budget-mb`` sets
:data:`memwatch.lid.LOCAL_PCA_BYTES` (the chunk of neighbourhoods decomposed at once);
``none`` decomposes every anchor's neighbourhood at once, as before the bound.

Run::

    python benchmarks/bench_data_lid.py                      # 50 000 samples of 3×16×16, budget none and 64 MB
    python benchmarks/bench_data_lid.py --samples 50000 --shape 64 --budget-mb none 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in MB (Linux)."""
    with open("/proc/self/status") as fh:
        return next(float(line.split()[1]) / 1024 for line in fh if line.startswith(f"{field}:"))


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux >= 4.0: ``VmHWM`` drops to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(samples: int, shape: tuple[int, ...], budget_mb: float | None, threads: int) -> dict[str, float]:
    """One measurement in this process: baseline / peak RSS (MB), seconds, the data LID at both levels."""
    import math
    import warnings

    import torch

    import memwatch.lid
    from memwatch.calibration import Reservoir
    from memwatch.groundtruth import median_nn_distance
    from memwatch.schedules import NoiseSchedule
    from memwatch.signals.lid import LidOptions, LidSignal

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    if budget_mb is not None:
        memwatch.lid.LOCAL_PCA_BYTES = int(budget_mb * 2**20)
    else:
        memwatch.lid.LOCAL_PCA_BYTES = 2**62  # every neighbourhood at once
    g = torch.Generator().manual_seed(0)
    dim = math.prod(shape)
    basis = torch.linalg.qr(torch.randn(dim, 8, generator=g)).Q  # [D, 8] orthonormal
    reservoir = Reservoir(samples, seed=0, distinct=True)
    for start in range(0, samples, 4096):
        n = min(4096, samples - start)
        x = torch.randn(n, 8, generator=g) @ basis.T + 0.01 * torch.randn(n, dim, generator=g)
        reservoir.update(x.reshape(n, *shape))
    spacing = median_nn_distance(reservoir.samples[:4096], generator=g)
    schedule = NoiseSchedule.linear(1000)
    levels = [float(schedule.timestep_for_sigma(min(f * spacing, 0.99))) for f in (0.1, 1.0)]
    _reset_peak()  # building the samples peaked higher than what follows
    baseline = _status_mb("VmRSS")
    signal = LidSignal(LidOptions(), 32, held=lambda: None, timesteps=lambda: levels, seed=0)
    started = time.perf_counter()
    # what the live path hands over: the held samples, of which only the rows used are copied out (before
    # this bound, memwatch copied every sample held out of the reservoir first)
    held = reservoir if hasattr(reservoir, "rows") else reservoir.samples
    signal.fit_reference(held, levels, schedule)
    seconds = time.perf_counter() - started
    assert signal.reference is not None
    lids = list(signal.reference.values())
    return {"baseline_mb": baseline, "peak_mb": _status_mb("VmHWM"), "seconds": seconds, "lid": lids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 16, 16])
    parser.add_argument("--budget-mb", nargs="+", default=["none", "64"], help="LOCAL_PCA_BYTES in MB, or none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        budget = None if args.budget_mb[0] == "none" else float(args.budget_mb[0])
        print(json.dumps(child(args.samples, tuple(args.shape), budget, args.threads)))
        return 0
    print(f"data LID of {args.samples} samples of shape {tuple(args.shape)}, {args.threads} thread(s)")
    print("| budget | baseline RSS | peak RSS | added | time | data LID (calibrated, wide level) |")
    print("|---|---:|---:|---:|---:|---|")
    for budget in args.budget_mb:
        cmd = [sys.executable, __file__, "--child", "--samples", str(args.samples), "--budget-mb", budget,
               "--threads", str(args.threads), "--shape", *map(str, args.shape)]  # fmt: skip
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        added = out["peak_mb"] - out["baseline_mb"]
        lid = ", ".join(f"{v:.2f}" for v in out["lid"])
        label = "none (all at once)" if budget == "none" else f"{budget} MB"
        print(f"| {label} | {out['baseline_mb']:.0f} MB | {out['peak_mb']:.0f} MB | {added:.0f} MB | "
              f"{out['seconds']:.1f} s | {lid} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
