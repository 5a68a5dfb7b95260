"""A 2-D toy you can look at: a DDPM on a few points of the two moons memorizes them; on
thousands it learns the curves. Writes the learned density with the probes memwatch flags.

    python examples/toy2d.py                 # 8 vs 2000 training points, ~2 minutes on a CPU
    python examples/toy2d.py --fast          # < 1 minute
    python examples/toy2d.py --n-small 4 --n-large 500 --out toy_out

In 2-D a probe sitting on a memorized training point is sharp in both directions (sharp
fraction 1); a probe on a moon is sharp only across the curve (0.5). The moons are standardized
(unit spread per axis); at σ = 0.2 eight training points ~0.7 apart are isolated peaks, while
a curve of width ~0.1 stays flat along its length.

The heat map is the density of the trained model itself: a Gaussian kernel density estimate of
4000 samples drawn from it (bandwidth 0.05 data units), in log scale.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

import memwatch
from memwatch import plots
from memwatch.apps.demo import probe_report
from memwatch.apps.toymodels import DDPMModule, ManifoldDataModule
from memwatch.loggers import finish_wandb, wandb_logger


def fit_toy(n_train: int, steps: int, check_every: int, seed: int, out: Path, wandb_mode: str):
    """Train one 2-D DDPM with the monitor attached; return (module, monitor, data)."""
    pl.seed_everything(seed, verbose=False)
    data = ManifoldDataModule("moons", n_train, noise=0.05, batch_size=128, steps_per_epoch=check_every, seed=seed)
    module = DDPMModule(shape=(2,), hidden=128, depth=2, lr=2e-3)
    monitor = memwatch.MemorizationMonitor(
        every_n_train_steps=check_every,
        num_probes=64,
        sigmas=(0.2,),
        reference_data=data.train_data,  # ground truth for the log: nearest-neighbour ratio
        sharpness=memwatch.SharpnessCheckOptions(k=2, score_threshold=0.9),
        checkpoint=memwatch.CheckpointOptions(dirpath=out / "checkpoints" / f"toy2d-N{n_train}"),
        report=memwatch.ReportOptions(verbose=False),
    )
    logger = wandb_logger(wandb_mode, out, project="memwatch-toy2d", name=f"toy2d-N{n_train}")
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=data)
    if logger is not None:
        run_dir = finish_wandb(logger)
        print(
            f"W&B {wandb_mode} run: {run_dir}"
            + (f"  (upload: wandb sync {run_dir})" if wandb_mode == "offline" else "")
        )
    return module, monitor, data


def model_log_density(module: DDPMModule, n: int = 4000, bandwidth: float = 0.05, seed: int = 1, nats: float = 12.0):
    """``[G, 2] -> [G]``: log of a Gaussian KDE of ``n`` samples of the model, floored ``nats``
    below its maximum (the map shows where the mass is, not how empty the far corners are)."""
    module.eval()
    samples = memwatch.sample(
        module.memwatch_score(), n=n, shape=(2,), steps=50, generator=torch.Generator().manual_seed(seed)
    ).double()

    def log_density(grid: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(grid.double(), samples) ** 2
        logp = torch.logsumexp(-d2 / (2 * bandwidth**2), dim=1) - math.log(n * 2 * math.pi * bandwidth**2)
        return logp.clamp_min(float(logp.max()) - nats)

    return log_density


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-small", type=int, default=8, help="training points of the memorizing run")
    parser.add_argument("--n-large", type=int, default=2000, help="training points of the generalizing run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 4000; --fast 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/toy2d"))
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    parser.add_argument("--fast", action="store_true", help="a shorter run (< 1 minute)")
    args = parser.parse_args(argv)
    steps = args.steps or (1500 if args.fast else 4000)
    check_every = max(1, steps // 10)
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and robust on a busy machine
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*memwatch: memorization onset.*")

    extent = (-2.6, 2.6, -2.2, 2.2)
    for n in (args.n_small, args.n_large):
        module, monitor, data = fit_toy(n, steps, check_every, args.seed, args.out, args.wandb_mode)
        report = probe_report(monitor.last_check, monitor)  # what the last check measured
        flagged = report.flagged  # the probes the monitor's onset rule counts as memorized
        copies = report.nn_ratio < memwatch.MEMORIZED_RATIO
        fig = plots.plot_density_2d(
            model_log_density(module),
            report.samples,
            flagged=flagged,
            train=data.train_data,
            extent=extent,
            title=f"N={n} training points: learned density, flagged probes",
            value_label="log density of the model's samples (KDE)",
            floor_quantile=None,
        )
        path = plots.save_figure(fig, args.out / f"toy2d_N{n}.png")
        onset = "none" if monitor.onset_step is None else f"step {monitor.onset_step}"
        print(
            f"N={n:5d}: onset {onset:>10}; flagged {flagged.float().mean():.0%} of {len(flagged)} probes, "
            f"copies of training points (d1/d2 < 1/3) {copies.float().mean():.0%}; "
            f"mean sharp fraction {report.score.mean():.2f}  ->  {path}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
