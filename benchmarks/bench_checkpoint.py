"""Bytes and seconds of the clean checkpoint: ``mode="weights"`` against ``mode="full"``.

A small diffusers ``UNet2DModel`` (built from a config, no download) trains two ε-prediction
steps with Adam on random 3×32×32 images, so the optimizer holds its two moments; then, inside
the fit, the clean checkpoint is written ``--repeats`` times in each mode with
:func:`memwatch.checkpoint.save_clean_checkpoint`, alternating the modes so that drifts in machine
load hit both alike. Lightning's own ``Trainer.save_checkpoint(weights_only=False)`` (what a
non-atomic full save costs) is timed alongside as the reference. The median of each is printed;
the first round is a discarded warm-up.

    python benchmarks/bench_checkpoint.py                # 5 repeats
    python benchmarks/bench_checkpoint.py --repeats 1    # a quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from memwatch.checkpoint import save_clean_checkpoint


class UNetModule(pl.LightningModule):
    """ε-prediction on a config-built ``UNet2DModel`` with Adam (a minimal diffusion training step)."""

    def __init__(self, block_out_channels: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )

    def training_step(self, batch, batch_idx):
        (x,) = batch
        generator = torch.Generator().manual_seed(batch_idx)
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, 1000, (x.shape[0],), generator=generator)
        return ((self.unet(x + noise, t).sample - noise) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))), 4)


class TimeSaves(pl.Callback):
    """At the last step, times each way of saving ``repeats`` times (plus a discarded warm-up)."""

    def __init__(self, root: Path, repeats: int, last_step: int) -> None:
        self.root, self.repeats, self.last_step = root, repeats, last_step
        self.seconds: dict[str, list[float]] = {"weights": [], "full": [], "lightning full": []}
        self.nbytes: dict[str, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.last_step:
            return
        for round_ in range(self.repeats + 1):
            for mode in ("weights", "full"):
                outcome = save_clean_checkpoint(trainer, self.root / mode, mode=mode, raise_errors=True)
                if round_:
                    self.seconds[mode].append(outcome.seconds)
                self.nbytes[mode] = outcome.nbytes
            path = self.root / "lightning" / "full.ckpt"
            started = time.perf_counter()
            trainer.save_checkpoint(path, weights_only=False)
            if round_:
                self.seconds["lightning full"].append(time.perf_counter() - started)
            self.nbytes["lightning full"] = os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed saves per mode (median reported)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    module = UNetModule()
    params = sum(p.numel() for p in module.parameters())
    with tempfile.TemporaryDirectory() as root:
        timer = TimeSaves(Path(root), args.repeats, last_step=2)
        trainer = pl.Trainer(
            default_root_dir=root,
            max_steps=2,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(module)
    print(f"UNet2DModel, {params / 1e6:.2f}M parameters (float32), Adam; median of {args.repeats} saves, CPU")
    print(f"torch {torch.__version__}, lightning {pl.__version__}")
    print(f"| {'save':<32} | {'MB':>8} | {'seconds':>8} | {'bytes / weights':>15} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 10}|{'-' * 17}|")
    names = {
        "weights": 'memwatch mode="weights" (atomic)',
        "full": 'memwatch mode="full" (atomic)',
        "lightning full": "Trainer.save_checkpoint (full)",
    }
    for key, name in names.items():
        seconds = statistics.median(timer.seconds[key])
        ratio = timer.nbytes[key] / timer.nbytes["weights"]
        print(f"| {name:<32} | {timer.nbytes[key] / 1e6:>8.2f} | {seconds:>8.4f} | {ratio:>15.2f} |")


if __name__ == "__main__":
    main()
