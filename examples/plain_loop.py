"""memwatch in a plain PyTorch training loop, the way diffusers' own training scripts are written.

No Lightning: a diffusers ``UNet2DModel`` and ``DDPMScheduler``, AdamW, and the loop of
``train_unconditional.py`` (add noise at a random timestep, regress the noise) on sklearn's 8×8
digits. The memwatch part is the lines marked ``# memwatch`` — a :class:`memwatch.Monitor` that
takes each batch, checks the model every ``--check-every`` steps, logs to a W&B run (offline by
default), keeps the last clean weights on disk and stops the loop at the onset of memorization.

    python examples/plain_loop.py                 # 16 digits: the UNet copies them, the loop stops at onset
    python examples/plain_loop.py --n-train 1024  # a set it cannot memorize: no onset
    python examples/plain_loop.py --fast          # a short smoke run (a smaller UNet, few steps)

Measured (seed 0, one CPU thread): on 16 digits the checks at steps 100 and 200 are clean
(alarm_fraction 0.00, 0.03), the one at step 300 declares onset (0.53, LID 2.4 of 64) and the
loop stops there with the weights of step 200 kept, in about 40 s; on 1024 digits no check of the
2000 steps raises the alarm (0.00, LID ≈ 22).

The clean weights load back into a fresh ``UNet2DModel``:
``unet.load_state_dict(torch.load("memwatch_out/plain_loop/clean/memwatch-clean.ckpt")["state_dict"])``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import memwatch
from memwatch.data import digits


def unet(widths: tuple[int, int]) -> nn.Module:
    """A small ``UNet2DModel`` for 1×8×8 images (one downsampling)."""
    from diffusers import UNet2DModel

    blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=widths,
        norm_num_groups=8,
        **blocks,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=16, help="training images (default 16: memorized)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000; --fast 40)")
    parser.add_argument("--check-every", type=int, default=None, help="steps between checks (default 100; --fast 20)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/plain_loop"))
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    parser.add_argument("--fast", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.fast else 2000)
    every = args.check_every or (20 if args.fast else 100)
    import wandb
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    data = digits(args.n_train, seed=args.seed)  # [N, 1, 8, 8] in [-1, 1]
    model = unet((16, 32) if args.fast else (32, 64))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(mode=args.wandb_mode, dir=args.out, project="memwatch-plain-loop", config=vars(args))

    monitor = memwatch.Monitor(  # memwatch
        score_fn=lambda net: memwatch.diffusers_score(net, noise_scheduler),  # memwatch
        every_n_train_steps=every,  # memwatch
        stop_on_onset=True,  # memwatch
        checkpoint=memwatch.CheckpointOptions(dirpath=args.out / "clean"),  # memwatch
    )  # memwatch
    monitor.start(model, logger=run)  # memwatch
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(steps):
        clean_images = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        monitor.observe(clean_images, step)  # memwatch
        noise = torch.randn_like(clean_images)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean_images),))
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        loss = nn.functional.mse_loss(model(noisy_images, timesteps).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.log({"train/loss": loss.item()})
        if monitor.due(step + 1):  # memwatch
            monitor.check(model, step + 1)  # memwatch
        if monitor.should_stop:  # memwatch
            break

    for h in monitor.history:
        print(f"step {int(h['step']):5d}: alarm_fraction {h['alarm_fraction']:.2f}, LID {h['lid_mean']:.1f} of 64")
    print(f"onset: {monitor.onset_step}; clean weights of step {monitor.clean_step}: {monitor.clean_checkpoint_path}")
    run.finish()
    if monitor.clean_checkpoint_path is None or not monitor.history:
        return 1
    fresh = unet((16, 32) if args.fast else (32, 64))  # the clean weights load back into a fresh UNet
    fresh.load_state_dict(torch.load(monitor.clean_checkpoint_path, weights_only=True)["state_dict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
