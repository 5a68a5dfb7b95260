"""EDM-preconditioned diffusion (Karras et al. 2022) watched by memwatch: the glue is one line.

An EDM model is a denoiser ``D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ))`` on the
variance-exploding process ``x = x₀ + σ ε``. Its output is an estimate of ``x₀``, so memwatch
reads it as ``prediction="sample"`` on ``NoiseSchedule.edm()`` (where the timestep *is* σ):

    memwatch.DiffusionScore(denoiser, memwatch.NoiseSchedule.edm(), prediction="sample")

This script trains such a model (an MLP ``F``) on a handful of sklearn digits, which it
memorizes, with ``MemorizationMonitor`` attached, and prints what each check measured.

    python examples/edm.py            # 16 digits, 4000 steps
    python examples/edm.py --fast     # a short smoke run
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

import memwatch
from memwatch.apps.toymodels import MLPDenoiser, TensorDataModule
from memwatch.data import digits

SIGMA_DATA = 0.5  # the data's standard deviation the preconditioning assumes (digits in [-1, 1])
P_MEAN, P_STD = -1.2, 1.2  # training noise levels: ln σ ~ N(P_MEAN, P_STD²)


class EDMDenoiser(nn.Module):
    """``D(x; σ)`` with Karras et al.'s preconditioning around a network ``F(x, c_noise)``."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.net = MLPDenoiser(shape, hidden=hidden, depth=depth)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
        c_noise = 250 * sigma.log().to(x) / 4  # ln(σ)/4, spread for the sinusoidal embedding
        return c_skip * x + c_out * self.net(c_in * x, c_noise)


class EDMModule(pl.LightningModule):
    """Trains ``D`` with the EDM loss ``λ(σ) ‖D(x₀ + σε; σ) − x₀‖²``, ``λ = (σ² + σ_d²)/(σ σ_d)²``."""

    def __init__(self, shape: tuple[int, ...] = (1, 8, 8), hidden: int = 256, depth: int = 3, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.denoiser = EDMDenoiser(shape, hidden, depth)

    def memwatch_score(self) -> memwatch.DiffusionScore:
        # the one line of glue: D predicts x₀ ("sample") on the EDM/VE schedule, whose t is σ
        return memwatch.DiffusionScore(self.denoiser, memwatch.NoiseSchedule.edm(), prediction="sample")

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x0 = batch[0]
        sigma = torch.exp(P_MEAN + P_STD * torch.randn(x0.shape[0], device=x0.device))
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        weight = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2
        loss = (weight * (self.denoiser(x0 + s * torch.randn_like(x0), sigma) - x0) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a short smoke run")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/edm"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, every = (300, 150) if args.fast else (4000, 500)
    pl.seed_everything(0, verbose=False)
    monitor = memwatch.MemorizationMonitor(
        every_n_train_steps=every,
        num_probes=8 if args.fast else 32,
        probes=memwatch.ProbeOptions(sampler_steps=10 if args.fast else 50),
        sharpness=memwatch.SharpnessCheckOptions(k=4),
        checkpoint=memwatch.CheckpointOptions(dirpath=args.out / "checkpoints"),
        report=memwatch.ReportOptions(verbose=False),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor],
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    data = TensorDataModule(digits(args.n_train), batch_size=64, steps_per_epoch=every, seed=0)
    trainer.fit(EDMModule(hidden=128 if args.fast else 256), datamodule=data)
    print("memwatch checks:")
    for h in monitor.history:
        print(
            f"  step {int(h['step']):5d}: sharp fraction {h['sharp_fraction_mean']:.3f}, "
            f"flat directions {h['lid_mean']:.1f} of 64, memorized {h['memorized_fraction']:.0%}"
        )
    print(f"onset: {monitor.onset_step}; last clean checkpoint: {monitor.clean_checkpoint_path}")
    return 0 if monitor.history and all(math.isfinite(h["sharp_fraction_mean"]) for h in monitor.history) else 1


if __name__ == "__main__":
    raise SystemExit(main())
