"""memwatch on a diffusers model: a ``UNet2DModel`` and a ``DDPMScheduler`` as attributes of a
LightningModule — no ``memwatch_score()`` needed, the callback finds them itself.

    python examples/diffusers_unet.py                               # ε-prediction
    python examples/diffusers_unet.py --prediction v_prediction     # v-prediction
    python examples/diffusers_unet.py --fast                        # < 1 minute
    python examples/diffusers_unet.py --n-train 1024                # a set it cannot memorize

Data: sklearn's 8×8 digits upsampled to 16×16 (the UNet halves the resolution once per block).
The monitor reads the prediction type from ``scheduler.config.prediction_type`` and the probe
shape from ``unet.config`` (``in_channels``, ``sample_size``). With d = 256 pixels it uses
stochastic Lanczos quadrature here (``method="lanczos"``), cheaper than the dense Jacobian for
a UNet on a CPU. Needs ``pip install memwatch[diffusers]``; the default run takes ~13 minutes
on one CPU core.

Set the threshold on the local intrinsic dimension, not on a share: upsampled 8×8 images fill
only a 64-dimensional subspace of the 256 pixels, so even a model that generalizes perfectly is
sharp in at least 75 % of the directions (mean sharp fraction 0.90, LID ≈ 25, after 1500 steps on
1024 images, measured with an earlier release). A probe counts as memorized here when its LID is
below ~8, i.e. ``score_threshold = 1 - 8/256 ≈ 0.97``. Measured today (``python
examples/diffusers_unet.py``: ε-prediction, 3000 steps, seed 0; the probes stepped by the
scheduler's own DDIM, clipped to [-1, 1] as the default ``DDPMScheduler`` asks): on 16 images
onset at step 1500, when 44 % of the probes are copies (d₁/d₂ < 1/3; 38 % at the last clean
check, step 900), LID 1 and 94 % copies at the end. With the callback's default 0.9 the 16-image
model would be flagged from its first checks, before it has learned anything.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import memwatch
from memwatch.apps.toymodels import DigitsDataModule
from memwatch.loggers import finish_wandb, wandb_logger


class UNetDiffusion(pl.LightningModule):
    """A DDPM around diffusers' ``UNet2DModel``; ``prediction`` is ``"epsilon"`` or ``"v_prediction"``.

    memwatch needs nothing from this class beyond the two attributes ``self.unet`` (a
    ``UNet2DModel``) and ``self.scheduler`` (a diffusers scheduler with ``alphas_cumprod``).
    """

    def __init__(self, prediction: str = "epsilon", channels: tuple[int, ...] = (32, 64), lr: float = 1e-3) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        self.save_hyperparameters()
        self.unet = UNet2DModel(
            sample_size=16,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            norm_num_groups=8,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        noise = torch.randn_like(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        noisy = self.scheduler.add_noise(x, noise, t)
        target = noise if self.hparams.prediction == "epsilon" else self.scheduler.get_velocity(x, noise, t)
        loss = nn.functional.mse_loss(self.unet(noisy, t).sample, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--n-train", type=int, default=16, help="training images (default 16: memorized)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3000; --fast 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/diffusers"))
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    parser.add_argument("--log-media", action="store_true", help="log probe images and nearest training images")
    parser.add_argument("--fast", action="store_true", help="a tiny UNet for a few steps (< 1 minute)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU more threads can be many times slower)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.fast else 3000)
    every = max(1, steps // (2 if args.fast else 10))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(args.n_train, batch_size=32, steps_per_epoch=every, seed=args.seed, image_size=16)
    model = UNetDiffusion(args.prediction, channels=(16, 32) if args.fast else (32, 64))
    monitor = memwatch.MemorizationMonitor(  # no score_fn, no sample_shape: found on the module
        every_n_train_steps=every,
        num_probes=8 if args.fast else 16,
        sigmas=(0.2,),
        reference_data=data.train_data,
        probes=memwatch.ProbeOptions(sampler_steps=10 if args.fast else 25),
        sharpness=memwatch.SharpnessCheckOptions(
            k=4,
            method="lanczos",
            num_iters=8 if args.fast else 24,
            num_vectors=1 if args.fast else 2,
            score_threshold=0.97,  # LID < 8 of 256 (see the module docstring)
        ),
        onset=memwatch.OnsetOptions(threshold=0.5),  # over half of the probes memorized (measured with this)
        checkpoint=memwatch.CheckpointOptions(dirpath=args.out / "checkpoints"),
        report=memwatch.ReportOptions(media=args.log_media),
    )
    logger = wandb_logger(
        args.wandb_mode, args.out, project="memwatch-diffusers", name=f"unet-{args.prediction}-N{args.n_train}"
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=logger or False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.fast,
        default_root_dir=args.out,
    )
    trainer.fit(model, datamodule=data)

    score = memwatch.callback.find_score(model)  # what the callback found
    print(f"score: {type(score.model).__name__}, prediction={score.prediction!r}, probe shape {monitor.sample_shape}")
    for h in monitor.history:
        print(
            f"step {int(h['step']):5d}: sharp fraction {h['sharp_fraction_mean']:.2f}, "
            f"flat directions {h['lid_mean']:.0f} of 256, flagged {h['memorized_fraction']:.0%}, "
            f"copies {h.get('nn_memorized_fraction', float('nan')):.0%}"
        )
    print(f"onset: {monitor.onset_step}")
    if logger is not None:
        run_dir = finish_wandb(logger)
        print(f"W&B run: {run_dir}" + (f"  (upload: wandb sync {run_dir})" if args.wandb_mode == "offline" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
