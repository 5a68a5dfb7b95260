"""Which training images does a diffusion model copy? Duplicated images are copied first.

    python examples/attribution.py          # ~ a minute on a CPU
    python examples/attribution.py --fast   # shorter

A few digits (``--duplicated``, default 3) appear ``--copies`` times (default 20) each in the
training set, among ``--others`` (default 100) digits that appear once — the situation of web
data sets, where duplicated images are the ones diffusion models reproduce (Carlini et al. 2023;
Somepalli et al. 2023). A DDPM trains on it with a :class:`memwatch.MemorizationMonitor` whose
reference data are the *distinct* images (an image held twice would be at the same distance
twice, and ``d₁/d₂ = 1`` would never count a copy of it). At the last check,
:func:`memwatch.attribution.copied_items` ranks the training images by how many probes copy them
(nearest image with ``d₁/d₂ < 1/3``): the duplicated ones come first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from memwatch import MemorizationMonitor
from memwatch.attribution import CopiedItem, copied_items
from memwatch.data import digits
from memwatch.toymodels import DDPMModule, TensorDataModule


@dataclass(frozen=True)
class AttributionRun:
    """The ranked table of the last check and which ids were duplicated."""

    items: list[CopiedItem]
    duplicated: list[str]
    num_probes: int


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
    duplicated: int = 3,
    copies: int = 20,
    others: int = 100,
    steps: int = 3000,
    num_probes: int = 32,
    hidden: int = 256,
    lr: float = 3e-3,
    sampler_steps: int = 50,
    seed: int = 0,
) -> AttributionRun:
    """Train on the duplicated digits and rank the training images by copies at the last check."""
    train, distinct, ids = duplicated_digits(duplicated, copies, others, seed)
    pl.seed_everything(seed, verbose=False)
    module = DDPMModule(shape=(1, 8, 8), hidden=hidden, depth=3, lr=lr)
    monitor = MemorizationMonitor(
        every_n_train_steps=steps,  # one check, at the end
        num_probes=num_probes,
        sampler_steps=sampler_steps,
        k=2,
        reference_data=distinct,
        save_clean_checkpoint=False,
        verbose=False,
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
    flagged = check.primary.score > monitor.score_threshold
    items = copied_items(check.nearest, check.nn_ratio, flagged, ids=ids)
    return AttributionRun(items, [f"dup{i}" for i in range(duplicated)], num_probes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duplicated", type=int, default=3, help="images duplicated (default 3)")
    parser.add_argument("--copies", type=int, default=20, help="copies of each (default 20)")
    parser.add_argument("--others", type=int, default=100, help="images held once (default 100)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 3000, --fast 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a shorter run")
    args = parser.parse_args(argv)
    steps = args.steps or (1500 if args.fast else 3000)
    result = run(args.duplicated, args.copies, args.others, steps=steps, seed=args.seed)
    print(
        f"training images copied by the {result.num_probes} probes at step {steps} (duplicated: {result.duplicated}):"
    )
    print(f"{'rank':>4}  {'id':<8} {'copies':>6} {'flagged':>7} {'nearest':>7}")
    for rank, item in enumerate(result.items[:8], start=1):
        print(f"{rank:>4}  {item.id!s:<8} {item.copies:>6} {item.flagged_copies:>7} {len(item.probes):>7}")
    top = [item.id for item in result.items[: len(result.duplicated)]]
    found = sorted(top) == sorted(result.duplicated)
    print("the duplicated images come first" if found else "the duplicated images do NOT all come first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
