"""Wall-time overhead of MemorizationMonitor at its defaults over a run of many checks.

The same fit runs without and with ``MemorizationMonitor()`` at its defaults — the budgeted
cadence (``every_n_train_steps="auto"``: the checks within 3 % of training time, at most 15
steps per effective training sample apart; :mod:`memwatch.cadence`), 32 probes, 50 sampler
steps, the trace tier and, on the UNet, the Lanczos spectrum every 10th check on 2 probes —
side by side in one process, plain first. A short warm-up pair (100 steps each) loads what both
need. Reported: ``monitored / plain`` for wall and process CPU time, the number of checks and
the cadence the budget chose (and why), each check's wall time, and the first check's one-time
phases (calibration, data LID, consistency check, spectrum) against a steady check's.

Two models: ``--model mlp`` (DDPMModule, 1024 sklearn digits 8×8, batch 64: dense 64×64
Hessians) and ``--model unet`` (a diffusers UNet2DModel, widths 32/64, on 1024 digits
upsampled to 3×16×16 = 768 dimensions, batch 32, a default DDPMScheduler).

    python benchmarks/bench_overhead.py --model unet --steps 7000   # ≥ 10 checks at ~650 steps each
    python benchmarks/bench_overhead.py --model mlp --steps 140000
    python benchmarks/bench_overhead.py --model unet --steps 300 --every 100   # a quick look, fixed cadence

The batch intake (what the monitor does with every training batch: select, check, stage a
detached copy; the rows are hashed and indexed at the next check) is timed inside the monitored
fit, hook by hook, and printed as a share of a plain fit's step.
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
from memwatch.cadence import ONE_TIME_PHASES
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
    model: str, steps: int, monitored: bool, root: str, every: int | None, seed: int = 0
) -> tuple[float, float, TimedMonitor | None]:
    """One fit; returns (wall seconds, CPU seconds, the monitor or ``None``)."""
    pl.seed_everything(seed, verbose=False)
    module, data = setup(model, steps, seed)
    cadence = {} if every is None else {"every_n_train_steps": every}
    monitor = TimedMonitor(report=ReportOptions(verbose=False), **cadence) if monitored else None
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
    return time.perf_counter() - wall, time.process_time() - cpu, monitor


def phases(check: dict[str, float]) -> dict[str, float]:
    """``{phase: seconds}`` of one check's ``time/<phase>`` values (the ones over 10 ms)."""
    return {k[5:]: v for k, v in check.items() if k.startswith("time/") and k != "time/monitor_ratio" and v >= 0.01}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "unet"), default="unet", help="the fit (default unet)")
    parser.add_argument("--steps", type=int, default=7000, help="optimizer steps per fit (default 7000)")
    parser.add_argument("--every", type=int, default=None, help="a fixed cadence instead of the default budget")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as root:
        for monitored in (False, True):  # warm-up: imports, kernels, the first allocations
            fit_once(args.model, 100, monitored, root, 50)
        plain_wall, plain_cpu, _ = fit_once(args.model, args.steps, False, root, args.every)
        wall, cpu, monitor = fit_once(args.model, args.steps, True, root, args.every)
    assert monitor is not None
    checks, history = monitor.check_times, monitor.history
    steady = statistics.median(checks[1:]) if len(checks) > 1 else float("nan")
    first = phases(history[0]) if history else {}
    extras = {p: first[p] for p in ONE_TIME_PHASES if p in first}
    step = plain_wall / args.steps
    intake = statistics.mean(monitor.intake_times)
    cadence = monitor.budget.describe() if monitor.budget is not None else f"every {args.every} steps (fixed)"
    print(
        f"\n{args.model}: {args.steps} steps, {len(checks)} checks, {args.threads} thread(s), one pair:\n"
        f"  plain fit      {plain_wall:.1f} s wall ({plain_cpu:.1f} s CPU), {step * 1e3:.1f} ms a step\n"
        f"  monitored fit  {wall:.1f} s wall ({cpu:.1f} s CPU)\n"
        f"  overhead ratio (monitored / plain): wall {wall / plain_wall:.3f}, CPU {cpu / plain_cpu:.3f}\n"
        f"  checks at steps {[int(h['step']) for h in history]}\n"
        f"  cadence: {cadence}\n"
        f"  checks' wall time: {sum(checks):.1f} s = {sum(checks) / plain_wall:.1%} of the plain fit; "
        f"first {checks[0] if checks else float('nan'):.2f} s, steady (median of the others) {steady:.2f} s, "
        f"first / steady {checks[0] / steady if checks else float('nan'):.2f}\n"
        f"  the first check's one-time phases: {', '.join(f'{p} {v:.2f} s' for p, v in extras.items()) or 'none'} "
        f"(sum {sum(extras.values()):.2f} s)\n"
        f"  a steady check's phases: {', '.join(f'{p} {v:.2f} s' for p, v in phases(history[-1]).items())}\n"
        f"  batch intake: mean {intake * 1e6:.0f} µs a step (drains included) = {intake / step:.2%} of a plain step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
