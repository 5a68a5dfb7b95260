"""Which training images does a diffusion model copy? Duplicated images are copied first.

    python examples/attribution.py          # ~ half a minute on a CPU
    python examples/attribution.py --fast   # shorter

A few digits (``--duplicated``, default 2) appear ``--copies`` times (default 40) each in the
training set, among ``--others`` (default 30) digits that appear once — the situation of web
data sets, where duplicated images are the ones diffusion models reproduce (Carlini et al. 2023;
Somepalli et al. 2023). A DDPM trains on it with a :class:`memwatch.MemorizationMonitor` whose
reference data are the *distinct* images (an image held twice would be at the same distance
twice, and ``d₁/d₂ = 1`` would never count a copy of it). At the last check,
:func:`memwatch.attribution.copied_items` ranks the training images by how many probes copy them
(nearest image with ``d₁/d₂ < 1/3``): the duplicated ones come first, each copied by more probes
than any image held once. The script exits with status 1 when they do not.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from memwatch import CheckpointOptions, MemorizationMonitor, ProbeOptions, ReportOptions, SharpnessCheckOptions
from memwatch.apps.toymodels import DDPMModule, TensorDataModule
from memwatch.attribution import CopiedItem, copied_items
from memwatch.data import digits


@dataclass(frozen=True)
class AttributionRun:
    """The ranked table of the last check and which ids were duplicated."""

    items: list[CopiedItem]
    duplicated: list[str]
    num_probes: int

    @property
    def duplicated_first(self) -> bool:
        """Whether the duplicated images are the first ones, each copied by more probes than any other."""
        top = self.items[: len(self.duplicated)]
        if sorted(item.id for item in top) != sorted(self.duplicated):
            return False
        others = [item.copies for item in self.items if item.id not in self.duplicated]
        return min(item.copies for item in top) > max(others, default=0)


def duplicated_digits(
    duplicated: int, copies: int, others: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(training set, distinct images, ids of the distinct images)``: the first ``duplicated``
    distinct images appear ``copies`` times each in the (shuffled) training set."""
    images = digits(duplicated + others, seed=seed)
    ids = [f"dup{i}" for i in range(duplicated)] + [f"img{i}" for i in range(others)]
    train = torch.cat([images[:duplicated].repeat_interleave(copies, 0), images[duplicated:]])
    # the duplicated images at random places among the distinct ones: no index gives them away
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1))
    images, ids = images[order], [ids[i] for i in order]
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
    return train, images, ids


def run(
    duplicated: int = 2,
    copies: int = 40,
    others: int = 30,
    steps: int = 4000,
    num_probes: int = 64,
    hidden: int = 256,
    lr: float = 1e-3,
    sampler_steps: int = 50,
    seed: int = 0,
) -> AttributionRun:
    """Train on the duplicated digits and rank the training images by copies at the last check.

    Args:
        duplicated: images held ``copies`` times each; others: images held once.
        steps: optimizer steps (batch 64); the monitor checks once, at the last one.
        num_probes: probes of that check; sampler_steps: DDIM steps per probe.
        hidden, lr: the MLP ε-net's width (depth 3) and Adam learning rate.
        seed: the data subset, the shuffles, the initialization, the batches and the probes.

    Returns:
        The ranked table (:func:`memwatch.attribution.copied_items` over the distinct images).
    """
    train, distinct, ids = duplicated_digits(duplicated, copies, others, seed)
    pl.seed_everything(seed, verbose=False)
    module = DDPMModule(shape=(1, 8, 8), hidden=hidden, depth=3, lr=lr)
    monitor = MemorizationMonitor(
        every_n_train_steps=steps,  # one check, at the end
        num_probes=num_probes,
        reference_data=distinct,
        probes=ProbeOptions(sampler_steps=sampler_steps),
        sharpness=SharpnessCheckOptions(k=2),
        checkpoint=CheckpointOptions(save=False),
        report=ReportOptions(verbose=False),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=TensorDataModule(train, batch_size=64, steps_per_epoch=steps, seed=seed))
    check = monitor.last_check
    assert check is not None and check.nearest is not None and check.nn_ratio is not None
    flagged = check.primary.score > monitor.sharpness.score_threshold
    items = copied_items(check.nearest, check.nn_ratio, flagged, ids=ids)
    return AttributionRun(items, [f"dup{i}" for i in range(duplicated)], num_probes)


def write_table(items: Sequence[CopiedItem], path: Path) -> None:
    """The ranked table as CSV: ``rank, id, copies, flagged_copies, nearest`` (probes nearest to the item)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "id", "copies", "flagged_copies", "nearest"])
        for rank, item in enumerate(items, start=1):
            writer.writerow([rank, item.id, item.copies, item.flagged_copies, len(item.probes)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duplicated", type=int, default=2, help="images duplicated (default 2)")
    parser.add_argument("--copies", type=int, default=40, help="copies of each (default 40)")
    parser.add_argument("--others", type=int, default=30, help="images held once (default 30)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 4000, --fast 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the ranked table to OUT/attribution.csv")
    parser.add_argument("--fast", action="store_true", help="a shorter run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3000 if args.fast else 4000)
    result = run(args.duplicated, args.copies, args.others, steps=steps, seed=args.seed)
    print(
        f"training images copied by the {result.num_probes} probes at step {steps} (duplicated: {result.duplicated}):"
    )
    print(f"{'rank':>4}  {'id':<8} {'copies':>6} {'flagged':>7} {'nearest':>7}")
    for rank, item in enumerate(result.items[:8], start=1):
        print(f"{rank:>4}  {item.id!s:<8} {item.copies:>6} {item.flagged_copies:>7} {len(item.probes):>7}")
    if args.out is not None:
        write_table(result.items, args.out / "attribution.csv")
    if not result.duplicated_first:
        print("the duplicated images do NOT all come first", file=sys.stderr)
        return 1
    print("the duplicated images come first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
