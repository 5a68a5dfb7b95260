"""Wall-time overhead of MemorizationMonitor at its defaults on a short fit.

The same fit runs without and with ``MemorizationMonitor()`` (default cadence: a check every
500 steps with 32 probes, 50 sampler steps, one noise level), alternating plain / monitored so
that drifts in
machine load hit both alike; after one discarded warm-up pair, the median of ``--repeats`` pairs
is reported as ``monitored / plain`` for wall time and for process CPU time (steadier on a
shared machine), and the wall time of the checks themselves (probing, measuring, saving the
clean checkpoint, logging) as a share of the plain fit — on a busy machine the fit-to-fit noise
(several %) can exceed the monitor's cost, and that share is the steadier figure.

Two models: ``--model mlp`` (DDPMModule, 1024 sklearn digits 8×8, batch 64: dense 64×64
Hessians) and ``--model unet`` (a diffusers UNet2DModel, widths 32/64, on the digits upsampled to
3×16×16 = 768 dimensions, batch 32, a default DDPMScheduler: the trace tier at every check and
the Lanczos spectrum every 10th).

    python benchmarks/bench_overhead.py                 # MLP, 2000 steps (4 checks), 5 pairs
    python benchmarks/bench_overhead.py --model unet --steps 1000 --repeats 3
    python benchmarks/bench_overhead.py --steps 500 --repeats 1   # a quick look
    python benchmarks/bench_overhead.py --model unet --reference batches   # the batch intake of "batches"

The batch intake (what the monitor does with every training batch: select, check, stage a
detached copy; the rows are hashed and indexed at the next check) is timed inside the monitored
fits themselves, hook by hook, and printed as a share of a plain fit's step.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch

from memwatch import MemorizationMonitor, ReportOptions
from memwatch.apps.toymodels import DDPMModule, DigitsDataModule, TensorDataModule, UNetDDPMModule, tiny_unet
from memwatch.data import digits


class TimedMonitor(MemorizationMonitor):
    """``MemorizationMonitor()`` that also times each whole check: probing, measuring, the
    clean-checkpoint save and logging (``check_seconds`` covers only the measurement)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check_times: list[float] = []
        self.intake_times: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        started = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.intake_times.append(time.perf_counter() - started)

    def _run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        super()._run_check(trainer, pl_module)
        self.check_times.append(time.perf_counter() - started)


def setup(model: str, steps: int, seed: int) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The module and data of one fit (``"mlp"``: digits 8×8; ``"unet"``: digits at 3×16×16)."""
    if model == "mlp":
        return DDPMModule(shape=(1, 8, 8)), DigitsDataModule(1024, batch_size=64, steps_per_epoch=steps, seed=seed)
    from diffusers import DDPMScheduler

    images = digits(1024, seed=seed, image_size=16).repeat(1, 3, 1, 1)
    data = TensorDataModule(images, batch_size=32, steps_per_epoch=steps, seed=seed)
    return UNetDDPMModule(tiny_unet(3, 16, widths=(32, 64)), DDPMScheduler()), data


def fit_once(
    model: str, steps: int, monitored: bool, root: str, reference: str | None, seed: int = 0
) -> tuple[float, float, list[float], list[float]]:
    """One fit; returns (wall seconds, CPU seconds, the wall seconds of each whole check, of each batch intake)."""
    pl.seed_everything(seed, verbose=False)
    module, data = setup(model, steps, seed)
    monitor = TimedMonitor(reference_data=reference, report=ReportOptions(verbose=False)) if monitored else None
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[monitor] if monitor else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    checks = monitor.check_times if monitor else []
    return wall, cpu, checks, monitor.intake_times if monitor else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "unet"), default="mlp", help="the fit (default mlp)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per fit (default 2000: 4 checks)")
    parser.add_argument("--repeats", type=int, default=5, help="measured plain/monitored pairs (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--reference", choices=("none", "batches"), default="none", help="the monitor's reference_data (default none)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    checks: list[float] = []
    intakes: list[float] = []
    reference = None if args.reference == "none" else args.reference
    with tempfile.TemporaryDirectory() as root:
        for rep in range(args.repeats + 1):  # rep 0: warm-up, discarded
            order = (False, True) if rep % 2 == 0 else (True, False)
            for monitored in order:
                wall, cpu, chk, intake = fit_once(args.model, args.steps, monitored, root, reference)
                if rep:
                    walls[monitored].append(wall)
                    cpus[monitored].append(cpu)
                    checks += chk
                    intakes += intake
                print(
                    f"{'warm-up' if rep == 0 else f'pair {rep}':>8} {'monitored' if monitored else 'plain':>9}: "
                    f"{wall:6.2f} s wall, {cpu:6.2f} s CPU",
                    flush=True,
                )
    wall_ratios = [m / p for p, m in zip(walls[False], walls[True])]
    per_fit_checks = sum(checks) / args.repeats  # the checks' own wall time per monitored fit
    cpu_ratios = [m / p for p, m in zip(cpus[False], cpus[True])]
    pairs = "  ".join(f"{w:.3f}/{c:.3f}" for w, c in zip(wall_ratios, cpu_ratios))
    n_checks = args.steps // 500
    check_line = (
        f"  one check      median {statistics.median(checks):.3f} s wall, max {max(checks):.3f} s "
        f"({per_fit_checks:.2f} s per fit, {per_fit_checks / statistics.median(walls[False]):.1%} of the plain fit)\n"
        if checks
        else "  no check ran (fewer steps than the cadence): the difference is the batch intake alone\n"
    )
    print(
        f"\n{args.model}: {args.steps} steps, {n_checks} checks, {args.repeats} pairs, {args.threads} thread(s):\n"
        f"  plain fit      median {statistics.median(walls[False]):.2f} s wall "
        f"({statistics.median(cpus[False]):.2f} s CPU)\n"
        f"  monitored fit  median {statistics.median(walls[True]):.2f} s wall "
        f"({statistics.median(cpus[True]):.2f} s CPU)\n"
        f"  per pair (wall/CPU ratio): {pairs}\n"
        + check_line
        + f"  overhead ratio (monitored / plain): wall {statistics.median(wall_ratios):.3f}, "
        f"CPU {statistics.median(cpu_ratios):.3f}\n"
        f"  batch intake (reference_data={reference!r}, sigmas='auto'): "
        f"median {statistics.median(intakes) * 1e6:.0f} µs a step, "
        f"mean {statistics.mean(intakes) * 1e6:.0f} µs (drains included) = "
        f"{statistics.mean(intakes) / (statistics.median(walls[False]) / args.steps):.2%} of a plain step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
