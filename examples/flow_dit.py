"""A tiny rectified-flow DiT on the digits, watched by memwatch at the library's defaults.

A diffusers ``DiTTransformer2DModel`` and a ``FlowMatchEulerDiscreteScheduler`` kept as attributes
of the LightningModule are all memwatch needs (no ``memwatch_score()``): it finds the pair, reads
the network's output as the flow velocity ``ε − x₀`` (``prediction="flow_prediction"``) on the
scheduler's interpolant ``x_t = (1 − σ) x₀ + σ ε``, draws its probes with diffusers' Euler steps
and calls the DiT with its dropped class label, the label ``DiTPipeline`` passes for "no class".
The model trains as diffusers' SD3 scripts train (logit-normal σ, target ``ε − x₀``).

The same recipe trains on 16 and on 1024 of sklearn's 8×8 digits; the monitor, at its defaults
(only its cadence and output folder set), should declare onset on the 16, which the model copies,
and not on the 1024. The script prints a table and exits with status 1 when it does not.

    python examples/flow_dit.py            # N = 16 and N = 1024
    python examples/flow_dit.py --fast     # a short smoke run (fewer steps, probes and sampler steps)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

import memwatch
from memwatch import defaults
from memwatch.apps.toymodels import DigitsDataModule
from memwatch.discovery import find_score
from memwatch.groundtruth import MEMORIZED_RATIO
from memwatch.transformer_score import dropped_label


class FlowDiT(pl.LightningModule):
    """A tiny unconditional DiT trained with the rectified-flow objective of diffusers' SD3 scripts.

    Per batch ``x₀`` ``[B, 1, 8, 8]``: ``u ~ sigmoid(N(0, 1))`` (``weighting_scheme="logit_normal"``),
    the scheduler's training timestep ``t = timesteps[⌊u · T⌋]`` and its ``σ = sigmas[⌊u · T⌋]``,
    ``x_t = (1 − σ) x₀ + σ ε``, and the loss ``‖DiT(x_t, t) − (ε − x₀)‖²`` (weight 1, as the
    scripts weigh ``logit_normal``). The DiT is told no class: every call passes its dropped label
    (:func:`memwatch.transformer_score.dropped_label`), the label memwatch's probes use.

    Args:
        width: the transformer's width (2 heads of ``width / 2`` dimensions).
        layers: transformer blocks; patch 2, so an 8×8 image is 16 tokens.
        lr: Adam's learning rate.
    """

    def __init__(self, width: int = 64, layers: int = 2, lr: float = 2e-3) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

        self.save_hyperparameters()
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=width // 2, in_channels=1, out_channels=1,
            num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1,
        )  # fmt: skip
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.null_label = dropped_label(self.transformer)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        x0 = batch[0]
        n = x0.shape[0]
        u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.0, logit_std=1.0)
        index = (u * self.scheduler.config.num_train_timesteps).long()
        t = self.scheduler.timesteps[index].to(x0.device)
        sigma = self.scheduler.sigmas[index].to(x0).reshape(n, 1, 1, 1)
        eps = torch.randn_like(x0)
        labels = torch.full((n,), self.null_label, device=x0.device)
        out = self.transformer((1 - sigma) * x0 + sigma * eps, t, class_labels=labels).sample
        loss = nn.functional.mse_loss(out, eps - x0)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


#: the claim the script checks: the model copies 16 digits (onset) and not 1024 (none)
EXPECTED_ONSET = {16: True, 1024: False}


@dataclass(frozen=True)
class Recipe:
    """The training recipe both runs share, and the monitor's cadence and size."""

    steps: int = 3000
    check_every: int = 500
    width: int = 64
    layers: int = 2
    lr: float = 2e-3
    batch_size: int = 64
    num_probes: int = defaults.NUM_PROBES
    sampler_steps: int = defaults.SAMPLER_STEPS


FULL = Recipe()
#: a smoke run: the monitor smaller too (fewer probes and sampler steps), as the other examples' --fast
FAST = Recipe(steps=200, check_every=100, num_probes=8, sampler_steps=10)


@dataclass(frozen=True)
class FlowRun:
    """What one run shows at its last check: the monitor's decision beside the ground truth."""

    n_train: int
    onset_step: int | None
    alarm_fraction: float
    copies: float  # share of the probes with d₁/d₂ < 1/3 to the training set (memwatch.nn_ratio)
    lid: float
    dim: int
    seconds: float
    found: str  # the score the monitor found on the module, in words


def run(n_train: int, recipe: Recipe = FULL, *, seed: int = 0, out: Path = Path("memwatch_out/flow_dit")) -> FlowRun:
    """Train the DiT on ``n_train`` digits with a default :class:`memwatch.MemorizationMonitor`.

    Returns:
        The onset step, the last check's ``alarm_fraction``, its probes' copies of the training
        set (d₁/d₂ < 1/3, :func:`memwatch.nn_ratio`), their mean LID, and the fit's wall time.
    """
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(n_train, batch_size=recipe.batch_size, steps_per_epoch=recipe.check_every, seed=seed)
    monitor = memwatch.MemorizationMonitor(
        every_n_train_steps=recipe.check_every,
        num_probes=recipe.num_probes,
        probes=memwatch.ProbeOptions(sampler_steps=recipe.sampler_steps),
        checkpoint=memwatch.CheckpointOptions(dirpath=out / f"N{n_train}" / "checkpoints"),
        report=memwatch.ReportOptions(verbose=False),
    )
    trainer = pl.Trainer(
        max_steps=recipe.steps,
        callbacks=[monitor],
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    started = time.perf_counter()
    module = FlowDiT(recipe.width, recipe.layers, recipe.lr)
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    score = find_score(module)  # what the monitor found: no memwatch_score(), no score_fn
    for h in monitor.history:
        alarm, lid = h["alarm_fraction"], h["lid_mean"]
        print(f"N = {n_train}, step {int(h['step']):5d}: alarm_fraction {alarm:.2f}, LID {lid:.1f}")
    check = monitor.last_check
    if check is None:
        raise SystemExit(f"no check ran in {recipe.steps} steps (one every {recipe.check_every})")
    ratio = memwatch.nn_ratio(check.samples.flatten(1), data.train_data.flatten(1))
    last = monitor.history[-1]
    return FlowRun(
        n_train=n_train,
        onset_step=monitor.onset_step,
        alarm_fraction=float(last["alarm_fraction"]),
        copies=float((ratio < MEMORIZED_RATIO).double().mean()),
        lid=float(last["lid_mean"]),
        dim=math.prod(check.samples.shape[1:]),
        seconds=seconds,
        found=f"{type(score.model).__name__}, prediction={score.prediction!r}, schedule {score.schedule.kind}, "
        f"null class label {score.null_cond}",
    )


def print_table(runs: Sequence[FlowRun]) -> None:
    """One row per run: N, onset step, alarm_fraction and copies at the last check, LID, time."""
    print(f"{'N train':>7} {'onset step':>10} {'alarm_fraction':>14} {'copies (NN truth)':>17} {'LID':>10} {'time':>7}")
    for r in runs:
        onset = "none" if r.onset_step is None else str(r.onset_step)
        lid = f"{r.lid:.1f} of {r.dim}"
        print(f"{r.n_train:>7} {onset:>10} {r.alarm_fraction:>14.0%} {r.copies:>17.0%} {lid:>10} {r.seconds:>6.0f}s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a short smoke run")
    parser.add_argument("--n", type=int, nargs="+", default=[16, 1024], help="training-set sizes (default 16 1024)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {FULL.steps})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/flow_dit"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = FAST if args.fast else FULL
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    runs = [run(n, recipe, seed=args.seed, out=args.out) for n in args.n]
    print(f"score found: {runs[0].found}")
    print_table(runs)
    if args.fast:  # too short to memorize: the smoke run checks that the checks ran and measured
        return 0 if all(math.isfinite(r.lid) for r in runs) else 1
    missed = [r for r in runs if EXPECTED_ONSET.get(r.n_train, r.onset_step is not None) != (r.onset_step is not None)]
    for r in missed:
        print(f"N = {r.n_train}: expected {'an onset' if EXPECTED_ONSET[r.n_train] else 'no onset'}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
