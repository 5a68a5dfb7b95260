"""Which class of a class-conditional diffusion model memorizes? (Jeon et al. 2025; Wen et al. 2024)

The paper's MNIST setting in miniature, on sklearn's 8×8 digits (no download): class
``--dup-class`` is one image copied ``--copies`` times, the nine other classes keep all their
~180 distinct images. A class-conditional MLP with label dropout 0.2 (classifier-free guidance)
trains with a :class:`memwatch.MemorizationMonitor` that watches all ten classes. Then every
class gets the same probes and, per probe,

* Jeon et al.'s Hessian-weighted score difference ``‖H_c s_Δ − H_uc s_Δ‖``,
* Wen et al.'s score difference ``‖s_Δ‖ = ‖s_c − s_uc‖``,
* the sharp fraction of ``p_t(x | c)`` at σ_t = ``--sigma``,

(:func:`memwatch.conditional.conditional_metrics`). The duplicated class should stand out in all
three; the script prints per-class means, the flagged class and the per-probe AUROC of each
metric (duplicated class = positives), and writes

* ``<out>/conditional_metrics.png`` — bar chart of the per-class means ± standard deviation,
* ``<out>/csv/version_0/`` — the monitor's CSV log: ``memwatch/cond/{c}/…`` scalars,
  ``memwatch/most_memorized_condition``, and per check a ``conditions`` table and bar chart.

Run::

    python examples/conditional.py --fast --out memwatch_out/conditional   # ~1 min on 2 cores
    python examples/conditional.py --out memwatch_out/conditional          # longer, more probes
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from memwatch import CheckpointOptions, MemorizationMonitor, ProbeOptions, ReportOptions, SharpnessCheckOptions
from memwatch.apps.toymodels import DDPMModule, TensorDataModule
from memwatch.conditional import ConditionalResult, conditional_metrics
from memwatch.data import digits
from memwatch.plots import plot_condition_metrics, save_figure

NUM_CLASSES = 10
METRICS = ("hessian_score_diff", "score_diff", "sharp_fraction_mean")


def duplicated_class_digits(dup_class: int = 3, copies: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """sklearn digits where class ``dup_class`` is its first image repeated ``copies`` times.

    Returns:
        ``(images [N, 1, 8, 8] in [-1, 1], labels [N] long, the duplicated image [1, 1, 8, 8])``;
        ``N = 1797 − #dup_class + copies``.
    """
    if not 0 <= dup_class < NUM_CLASSES:
        raise ValueError(f"`dup_class` must be a digit in [0, {NUM_CLASSES}), got {dup_class}")
    if copies < 1:
        raise ValueError(f"`copies` must be positive, got {copies}")
    images, labels = digits(labels=True)
    keep = labels != dup_class
    image = images[labels == dup_class][:1]
    x = torch.cat([images[keep], image.repeat(copies, 1, 1, 1)])
    y = torch.cat([labels[keep], torch.full((copies,), dup_class)])
    return x, y, image


class CosineDDPM(DDPMModule):
    """:class:`memwatch.apps.toymodels.DDPMModule` with the learning rate decayed to 0 by a cosine over
    ``trainer.max_steps``: short runs end on settled weights, so the metrics do not depend on the
    last few noisy Adam steps."""

    def configure_optimizers(self) -> dict:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        total = max(1, self.trainer.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(
    images: Tensor,
    labels: Tensor,
    steps: int,
    *,
    monitor: MemorizationMonitor | None = None,
    logger: CSVLogger | bool = False,
    root: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 128,
    hidden: int = 256,
    depth: int = 3,
    lr: float = 2e-3,
) -> CosineDDPM:
    """Train the class-conditional MLP (``p_uncond = 0.2``, null label 10) for ``steps`` steps."""
    pl.seed_everything(seed, verbose=False)
    module = CosineDDPM(
        shape=tuple(images.shape[1:]), hidden=hidden, depth=depth, lr=lr, num_classes=NUM_CLASSES, p_uncond=0.2
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[] if monitor is None else [monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, TensorDataModule(images, labels, batch_size=batch_size, steps_per_epoch=100, seed=seed))
    return module.eval()


def measure(
    module: DDPMModule, n: int = 16, steps: int = 20, sigma: float = 0.2, seed: int = 0
) -> tuple[ConditionalResult, Tensor]:
    """All classes on the same ``n`` probes (one batch of ``10 n`` rows, class-major).

    Returns:
        ``(result, labels [10 n])``; the metrics are averaged over the default first 80 % of the
        ``steps`` sampler steps, the sharpness is taken at the timestep whose σ_t is ``sigma``.
    """
    score = module.memwatch_score()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n)
    noise = torch.randn(n, *module.hparams.shape, generator=torch.Generator().manual_seed(seed))
    t_eval = int(score.schedule.timestep_for_sigma(sigma))
    result = conditional_metrics(
        score,
        labels,
        noise=noise.repeat(NUM_CLASSES, *([1] * noise.ndim)[1:]),
        steps=steps,
        eval_t=t_eval,
        k=4,
        lanczos_generator=torch.Generator().manual_seed(seed + 1),
    )
    return result, labels


def per_class(result: ConditionalResult, labels: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """``metric -> (mean [10], std [10])`` over each class's probes."""
    values = {
        "hessian_score_diff": result.hessian_score_diff_norm,
        "score_diff": result.score_diff_norm,
        "sharp_fraction_mean": result.sharp_fraction,
    }
    out = {}
    for name, v in values.items():
        rows = torch.stack([v[labels == c] for c in range(NUM_CLASSES)])  # [10, n]
        out[name] = (rows.nanmean(1), rows.std(1))
    return out


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` labels."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive.numpy(), torch.nan_to_num(scores, nan=-math.inf).numpy()))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="short run: 3000 steps, 32 probes per class")
    parser.add_argument("--out", type=Path, default=Path("memwatch_out/conditional"), help="output folder")
    parser.add_argument("--dup-class", type=int, default=3, help="the class made of one duplicated image")
    parser.add_argument("--copies", type=int, default=100, help="copies of that image")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 3000 fast, 6000 full)")
    parser.add_argument("--probes", type=int, default=None, help="probes per class (default 32 fast, 64 full)")
    parser.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps of the probes")
    parser.add_argument("--sigma", type=float, default=0.2, help="noise level of the sharpness measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3000 if args.fast else 6000)
    n = args.probes or (32 if args.fast else 64)
    args.out.mkdir(parents=True, exist_ok=True)

    images, labels, _ = duplicated_class_digits(args.dup_class, args.copies)
    counts = torch.bincount(labels, minlength=NUM_CLASSES).tolist()
    print(f"training images per class: {counts} (class {args.dup_class}: one image × {args.copies})")

    monitor = MemorizationMonitor(
        every_n_train_steps=steps // 2,
        num_probes=8,
        sigmas=(args.sigma,),
        probes=ProbeOptions(sampler_steps=args.sampler_steps, seed=args.seed, conditions=torch.arange(NUM_CLASSES)),
        sharpness=SharpnessCheckOptions(k=4),
        checkpoint=CheckpointOptions(save=False),
        report=ReportOptions(verbose=False),
    )
    logger = CSVLogger(args.out, name="csv", version=0)
    started = time.perf_counter()
    module = train(images, labels, steps, monitor=monitor, logger=logger, root=args.out, seed=args.seed)
    print(f"trained {steps} steps with the monitor in {time.perf_counter() - started:.0f} s")
    for check in monitor.history:
        flagged = int(check["most_memorized_condition"])
        print(
            f"  check at step {int(check['step'])}: most memorized class {flagged} "
            f"(Hessian-weighted score difference {check[f'cond/{flagged}/hessian_score_diff']:.3g})"
        )

    started = time.perf_counter()
    result, probe_labels = measure(module, n=n, steps=args.sampler_steps, sigma=args.sigma, seed=args.seed)
    summary = per_class(result, probe_labels)
    positive = probe_labels == args.dup_class
    aurocs = {
        name: auroc(v, positive)
        for name, v in (
            ("hessian_score_diff", result.hessian_score_diff_norm),
            ("score_diff", result.score_diff_norm),
            ("sharp_fraction_mean", result.sharp_fraction),
        )
    }
    flagged = int(summary["hessian_score_diff"][0].nan_to_num(-math.inf).argmax())
    print(f"\nfinal measurement: {n} probes per class, {time.perf_counter() - started:.0f} s")
    print(f"{'class':>5}  {'‖H_c s_Δ − H_uc s_Δ‖':>22}  {'‖s_c − s_uc‖':>14}  {'sharp fraction':>15}")
    for c in range(NUM_CLASSES):
        cells = [f"{summary[m][0][c]:.3g} ± {summary[m][1][c]:.2g}" for m in METRICS]
        mark = "  <- flagged (most memorized)" if c == flagged else ""
        mark += "  [duplicated]" if c == args.dup_class else ""
        print(f"{c:>5}  {cells[0]:>22}  {cells[1]:>14}  {cells[2]:>15}{mark}")
    print("AUROC over probes (duplicated class = positives): " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))

    figure = plot_condition_metrics(
        {m: summary[m][0] for m in METRICS},
        [str(c) for c in range(NUM_CLASSES)],
        errors={m: summary[m][1] for m in METRICS},
        flagged=flagged,
        title=f"Digits, class {args.dup_class} = 1 image × {args.copies} ({n} probes per class, mean ± sd)",
    )
    path = save_figure(figure, args.out / "conditional_metrics.png")
    print(f"wrote {path} and the monitor's log under {logger.log_dir}")
    return {"flagged": float(flagged), **{f"auroc_{k}": v for k, v in aurocs.items()}}


if __name__ == "__main__":
    main()
