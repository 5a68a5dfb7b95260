"""``memwatch demo``: watch a diffusion model memorize handwritten digits, on a CPU, in minutes.

Two DDPMs (:class:`memwatch.apps.toymodels.DDPMModule`, an MLP ε-network) train on sklearn's 8×8
digits with a :class:`MemorizationMonitor` attached — one on a handful of images, which it
memorizes (its samples become copies of training digits), one on a thousand, which it does not.
Each run logs to an offline W&B run (no account needed; ``wandb sync`` uploads it later); the
demo then writes a few PNGs and prints a summary table.

The monitor runs the library's defaults (:mod:`memwatch.defaults`): nothing is tuned for the
digits. It calibrates its noise level from the training images it sees before its first check
(``sigmas="auto"``: 0.1 × their median nearest-neighbour distance), estimates the digits' own
local intrinsic dimension there once (local PCA of those images, :mod:`memwatch.signals.lid`)
and declares onset when the probes' LID falls below a fraction of it on enough of them, two
checks in a row (``docs/validation.md`` says how that rule was chosen and how often it is right).
The run on a handful of images copies them; the run on a thousand does not.

The functions here are what ``memwatch demo`` and ``examples/digits.py`` run:
:func:`fit_digits` (one training run, readable as a template), :func:`run_demo` (both runs,
plots, table) and :func:`main` (the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from torch import Tensor

from memwatch.apps.demo_figures import gallery_figure, save_figures, sigma_label, spectrum_figure
from memwatch.apps.demo_settings import DEFAULT, FAST, DemoSettings, ProbeReport, RunResult
from memwatch.apps.toymodels import DDPMModule, DigitsDataModule
from memwatch.callback import MemorizationMonitor
from memwatch.errors import MemwatchError
from memwatch.loggers import WANDB_MODES, MonitorLogger, finish_wandb, wandb_logger
from memwatch.options import CheckpointOptions, ProbeOptions, ReportOptions
from memwatch.reporting import CheckResult
from memwatch.signals import SharpnessCheckOptions
from memwatch.signals.options import DESCRIPTIONS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "DEFAULT",
    "FAST",
    "DemoSettings",
    "ProbeReport",
    "RunResult",
    "add_arguments",
    "digits_monitor",
    "fit_digits",
    "main",
    "print_summary",
    "probe_report",
    "run_demo",
    "save_figures",
    "settings_from_args",
    "summary_table",
]

_GRID = torch.linspace(-2.2, 0.5, 271)  # normalized eigenvalues σ_t²λ shown in spectra
_DATA_NOTE = (
    "the probes_*.png galleries show generated digits beside images of sklearn's public 8x8 digits data set;"
    " they stay on this disk - W&B receives probe images only with --log-media"
)


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def digits_monitor(
    settings: DemoSettings,
    reference_data: Tensor | None = None,
    *,
    log_media: bool = False,
    dirpath: str | Path | None = None,
) -> MemorizationMonitor:
    """The :class:`MemorizationMonitor` the demo attaches: the library's defaults, sized by ``settings``.

    ``reference_data`` (the training set) turns on the nearest-neighbour ground truth
    (``memwatch/nn_memorized_fraction``, ``memwatch/auroc``); a real run does not need it.
    """
    return MemorizationMonitor(
        every_n_train_steps=settings.check_every,
        num_probes=settings.num_probes,
        reference_data=reference_data,
        probes=ProbeOptions(sampler_steps=settings.sampler_steps),
        sharpness=SharpnessCheckOptions(k=settings.k),
        checkpoint=CheckpointOptions(dirpath=dirpath),
        report=ReportOptions(media=log_media, verbose=False),  # the progress bar shows the numbers
    )


def _trainer(
    settings: DemoSettings, accelerator: str, logger: Any, callbacks: list[Callback], progress: bool, out: Path
) -> pl.Trainer:
    """The demo's Trainer: one epoch per check, no Lightning checkpoints."""
    return pl.Trainer(
        max_steps=settings.steps,
        max_epochs=math.ceil(settings.steps / settings.check_every),
        accelerator=accelerator,
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        default_root_dir=out,
    )


def fit_digits(
    n_train: int,
    settings: DemoSettings = DEFAULT,
    *,
    seed: int = 0,
    out: str | Path = "memwatch_out",
    wandb_mode: str = "offline",
    log_media: bool = False,
    progress: bool = True,
    accelerator: str = "cpu",
    label: str | None = None,
    module_factory: Callable[..., pl.LightningModule] = DDPMModule,
) -> RunResult:
    """Train one DDPM on ``n_train`` digits with the monitor attached; measure before/after.

    This is the whole recipe for your own model: a LightningModule with a ``memwatch_score()``
    method (here :class:`DDPMModule`; ``module_factory`` swaps in another one taking the same
    arguments), the callback in ``Trainer(callbacks=[...])``, any Lightning logger.

    Args:
        n_train: training images (a seeded subset of the 1797).
        settings: model / monitor sizes (:data:`DEFAULT`, :data:`FAST`).
        seed: seeds the subset, the weights and the batches.
        out: output folder (W&B run under ``out/wandb``, checkpoints under ``out/checkpoints``).
        wandb_mode: ``"offline"`` (default, no account), ``"online"`` or ``"disabled"``.
        log_media: let the monitor log probe images and their nearest training images to W&B.
        progress: show a progress bar.
        accelerator: Lightning accelerator (``"cpu"``: the demo's timings).
        label: legend label (default ``"N=<n_train>"``).

    Raises:
        ValueError: ``wandb_mode`` is not one of ``WANDB_MODES``.
    """
    if wandb_mode not in WANDB_MODES:
        raise MemwatchError(f"`wandb_mode` must be one of {WANDB_MODES}, got {wandb_mode!r}")
    out = Path(out)
    name = f"digits-N{n_train}"
    pl.seed_everything(seed, verbose=False)

    data = DigitsDataModule(n_train, batch_size=settings.batch_size, steps_per_epoch=settings.check_every, seed=seed)
    module = module_factory(shape=(1, 8, 8), hidden=settings.hidden, depth=settings.depth, lr=settings.lr)
    monitor = digits_monitor(settings, data.train_data, log_media=log_media, dirpath=out / "checkpoints" / name)
    first_check = _FirstCheck(monitor)
    logger = wandb_logger(wandb_mode, out, project="memwatch-demo", name=name, group=f"demo-seed{seed}")
    callbacks: list[Callback] = [monitor, first_check]
    if progress:
        callbacks.append(_ProgressBar())
    trainer = _trainer(settings, accelerator, logger, callbacks, progress, out)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started

    if monitor.last_check is None:
        raise MemwatchError(f"`steps`={settings.steps} is shorter than one check (every {settings.check_every} steps)")
    early = None if first_check.check is None else probe_report(first_check.check, monitor)
    late = probe_report(monitor.last_check, monitor)
    result = RunResult(
        name=name,
        label=label or f"N={n_train}",
        n_train=n_train,
        steps=trainer.global_step,
        seconds=seconds,
        onset_step=monitor.onset_step,
        clean_step=monitor.clean_step,
        sigma=float((monitor.calibrated_sigmas or monitor.sigmas)[0]),
        onset_key=monitor.detector.monitor,
        onset_threshold=float(monitor.detector.threshold or 0.0),
        onset_patience=monitor.detector.patience,
        rule=rule_text(monitor),
        history=list(monitor.history),
        early=early,
        late=late,
        train_data=data.train_data,
        clean_checkpoint=monitor.clean_checkpoint_path,
    )
    if logger is not None:
        result.wandb_dir = _finish_wandb(logger, result, settings, log_media)
    return result


def probe_report(check: CheckResult, monitor: MemorizationMonitor) -> ProbeReport:
    """The per-probe results of one of the monitor's checks, at its primary noise level: what
    the check measured (no re-measurement), in the form the demo's table and figures read."""
    res = check.primary
    if check.nn_ratio is None or check.nearest is None:
        raise MemwatchError("the demo's monitor needs `reference_data` (its report shows the nearest training image)")
    if monitor.onset.on == "auto" and check.alarm is not None:
        flagged = check.alarm
    elif monitor.onset.on == "lid" and check.lid is not None and check.lid.memorized is not None:
        flagged = check.lid.memorized
    else:
        flagged = res.memorization_score > monitor.sharpness.score_threshold
    return ProbeReport(
        samples=check.samples,
        score=res.memorization_score,
        lid=res.lid,
        flagged=flagged,
        nn_ratio=check.nn_ratio.double(),
        nearest=check.nearest,
        grid=_GRID,
        density=torch.nanmean(res.density(_GRID), 0),
    )


def rule_text(monitor: MemorizationMonitor) -> str:
    """The monitor's per-probe rule in words, e.g. ``"FLIPD / data LID < 0.5"``."""
    lid = monitor.sharpness.lid
    if monitor.onset.on == "auto" and monitor.last_check is not None:
        return monitor.last_check.rule
    if monitor.onset.on == "lid":
        limit = lid.count_threshold if lid.statistic == "count" else lid.ratio_threshold
        return f"{DESCRIPTIONS[lid.statistic]} < {limit:g}"
    return f"sharp fraction > {monitor.sharpness.score_threshold:g}"


class _FirstCheck(Callback):
    """Keeps the monitor's first check (put it after the monitor in ``callbacks``)."""

    def __init__(self, monitor: MemorizationMonitor) -> None:
        self.monitor = monitor
        self.check: CheckResult | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.check is None:
            self.check = self.monitor.last_check


class _ProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the monitor's latest numbers, kept short enough for an
    80-column terminal: ``loss``, ``sharp`` (mean sharp fraction), ``copies`` (NN ground truth)
    and ``onset`` (its step, once declared)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "train/loss" in metrics:
            metrics["loss"] = metrics.pop("train/loss")
        values = trainer.callback_metrics
        if "memwatch/sharp_fraction_mean" in values:
            metrics["sharp"] = f"{float(values['memwatch/sharp_fraction_mean']):.2f}"
        if "memwatch/nn_memorized_fraction" in values:
            metrics["copies"] = f"{float(values['memwatch/nn_memorized_fraction']):.0%}"
        onset = next((cb.onset_step for cb in trainer.callbacks if isinstance(cb, MemorizationMonitor)), None)
        if onset is not None:
            metrics["onset"] = onset
        return metrics


def _finish_wandb(logger: Any, result: RunResult, settings: DemoSettings, log_media: bool) -> Path:
    """Log the run's own demo figures and summary, close the run; return its folder."""
    run = logger.experiment
    media = MonitorLogger([logger], log_media=log_media, prefix="demo")
    media.log_figure("spectrum", spectrum_figure([result], settings), result.steps)
    media.log_figure("probes", gallery_figure(result), result.steps, private=True)
    run.summary.update(
        {
            "demo/n_train": result.n_train,
            "demo/onset_step": -1 if result.onset_step is None else result.onset_step,
            "demo/seconds": result.seconds,
        }
    )
    return finish_wandb(logger)


# --------------------------------------------------------------------------------------------
# both runs, the table, the command line
# --------------------------------------------------------------------------------------------
def run_demo(
    n_small: int = DEFAULT.n_small,
    n_large: int = DEFAULT.n_large,
    settings: DemoSettings = DEFAULT,
    *,
    console: Console | None = None,
    **run: Any,
) -> list[RunResult]:
    """Train on ``n_small`` digits (memorizes) and on ``n_large`` (generalizes); save the PNGs
    under ``out/plots`` and print the summary. Returns both runs' results.

    Args:
        n_small, n_large, settings: the two training-set sizes and the runs' sizes.
        console: where the table goes (default: a new rich ``Console``).
        run: keywords of :func:`fit_digits` for both runs (``seed``, ``out``, ``wandb_mode``,
            ``log_media``, ``progress``, ``accelerator``, ``module_factory``).
    """
    from rich.console import Console

    console = console or Console()
    run["out"] = Path(run.get("out", "memwatch_out"))
    results = []
    with _quiet(), _threads(1 if run.get("accelerator", "cpu") == "cpu" else None):
        for n, role in ((n_small, "memorizes"), (n_large, "generalizes")):
            console.print(f"[bold]Training a DDPM on {n} digits[/] (expected: {role}) ...")
            results.append(fit_digits(n, settings, label=f"N={n}", **run))
        paths = save_figures(results, settings, run["out"] / "plots")
    print_summary(results, paths, console=console, wandb_mode=run.get("wandb_mode", "offline"))
    return results


def summary_table(results: Sequence[RunResult]) -> Table:
    """One row per run: N, onset, final sharp fraction / flat directions, flagged and NN-memorized shares."""
    from rich.table import Table

    steps = ", ".join(sorted({str(r.steps) for r in results}))
    table = Table(
        title=f"memwatch demo: digits, {steps} steps, measured at {sigma_label(results[0])}", title_style="bold"
    )
    table.add_column("N train", justify="right", style="bold")
    table.add_column("onset\nstep", justify="right")
    table.add_column("sharp\nfraction", justify="right")
    table.add_column("flat dirs\n(of 64)", justify="right")
    table.add_column("flagged\nby memwatch", justify="right")
    table.add_column("copies\n(NN truth)", justify="right")
    table.add_column("AUROC", justify="right")
    table.add_column("time", justify="right")
    for r in results:
        f = r.final
        onset = f"[red]{r.onset_step}[/]" if r.onset_step is not None else "[green]none[/]"
        table.add_row(
            str(r.n_train),
            onset,
            _fmt(f.get("sharp_fraction_mean")),
            _fmt(f.get("lid_mean"), digits=1),
            _fmt(f.get(r.onset_key), pct=True),
            _fmt(f.get("nn_memorized_fraction"), pct=True),
            _fmt(f.get("auroc")),
            f"{r.seconds:.0f} s",
        )
    return table


def print_summary(
    results: Sequence[RunResult],
    paths: dict[str, Path],
    *,
    console: Console,
    wandb_mode: str,
) -> None:
    """The table, then where everything went and how to upload it."""
    console.print()
    console.print(summary_table(results))
    console.print(
        f"[dim]sharp fraction: share of the 64 Hessian directions with σ²λ < -0.5 at the probes (1: an isolated"
        " peak); flat dirs = 64 x (1 - sharp fraction), the probes' LID by the spectrum;"
        f" flagged: probes with {results[0].rule};"
        " copies: probes whose nearest training image is < 1/3 as far as the 2nd-nearest (ground truth, needs the"
        " training set); AUROC: memwatch's score against that ground truth (– when all probes are alike).[/]"
    )
    if any(r.steps < 4000 for r in results):
        console.print(
            "[dim]A short run: the small model has not finished memorizing; run without --fast for the full story.[/]"
        )
    folder = next(iter(paths.values())).parent if paths else None
    if folder is not None:
        console.print(f"\nPlots: [cyan]{folder}[/] ({', '.join(p.name for p in paths.values())})")
        console.print(f"[dim]  ({_DATA_NOTE})[/]")
    runs = [r for r in results if r.wandb_dir is not None]
    for r in runs:
        console.print(f"W&B {wandb_mode} run ({r.name}): [cyan]{_shell_path(r.wandb_dir)}[/]")
    if runs and wandb_mode == "offline":
        dirs = " ".join(_shell_path(r.wandb_dir) for r in runs)
        console.print(f"Upload to W&B (needs `wandb login`):\n  [bold]wandb sync {dirs}[/]")
    for r in results:
        if r.clean_checkpoint is not None and r.onset_step is not None:
            console.print(f"Last clean checkpoint of {r.name} (step {r.clean_step}): [cyan]{r.clean_checkpoint}[/]")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``memwatch demo`` flags (also used by ``examples/digits.py``)."""
    parser.add_argument(
        "--n-small",
        type=int,
        default=None,
        help=f"training images of the memorizing run (default {DEFAULT.n_small}; --fast: {FAST.n_small})",
    )
    parser.add_argument(
        "--n-large",
        type=int,
        default=None,
        help=f"training images of the generalizing run (default {DEFAULT.n_large}; --fast: {FAST.n_large})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run (default {DEFAULT.steps}; --fast: {FAST.steps})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data subset, weights and batches (default 0)")
    parser.add_argument("--out", type=Path, default=Path("memwatch_out"), help="output folder (default ./memwatch_out)")
    parser.add_argument(
        "--wandb-mode",
        choices=WANDB_MODES,
        default="offline",
        help="W&B logging: offline (default, no account), online, disabled",
    )
    parser.add_argument(
        "--log-media",
        "--show-probes",
        dest="log_media",
        action="store_true",
        help="also log probe images and their nearest training images to W&B",
    )
    parser.add_argument("--fast", action="store_true", help="a smaller, shorter demo (< 1 minute)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """``DEFAULT`` or ``FAST`` with the flags that were given."""
    base = FAST if args.fast else DEFAULT
    changes = {k: getattr(args, k) for k in ("n_small", "n_large", "steps") if getattr(args, k, None) is not None}
    for name, value in changes.items():
        if value < 1 if name == "steps" else value < 2:
            raise SystemExit(
                f"memwatch demo: --{name.replace('_', '-')} must be >= {1 if name == 'steps' else 2}, got {value}"
            )
    settings = dataclasses.replace(base, **changes)
    if settings.check_every > settings.steps:
        settings = dataclasses.replace(settings, check_every=max(1, settings.steps // 4))
    return settings


def main(
    argv: Sequence[str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
    module_factory: Callable[..., pl.LightningModule] = DDPMModule,
) -> int:
    """``memwatch demo [flags]``; returns the exit code. ``parser`` (default: ``memwatch demo``'s)
    gets the demo's flags; ``module_factory`` is passed to :func:`run_demo`."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="memwatch demo", description=__doc__.split("\n\n")[1])
    args = add_arguments(parser).parse_args(argv)
    settings = settings_from_args(args)
    run_demo(
        settings.n_small,
        settings.n_large,
        settings,
        seed=args.seed,
        out=args.out,
        wandb_mode=args.wandb_mode,
        log_media=args.log_media,
        progress=args.progress,
        accelerator=args.accelerator,
        module_factory=module_factory,
    )
    return 0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide Lightning's start-up chatter and warnings that are noise for a demo (the table says
    what matters); everything else, e.g. a failed memwatch check, still shows."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    env = {k: os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_CONSOLE")}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*memwatch: memorization onset.*")  # in the table
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            warnings.filterwarnings("ignore", ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch on ``n`` CPU threads (``None``: unchanged), restored afterwards.

    The demo's networks are tiny: one thread does a training step in a few ms, while several
    threads spend more time synchronizing than computing, and on a busy machine (other jobs on
    the same cores) a 2-thread step was measured 20x slower than a 1-thread step.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fmt(value: float | None, *, pct: bool = False, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.0%}" if pct else f"{value:.{digits}f}"


def _shell_path(path: Path | None) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
