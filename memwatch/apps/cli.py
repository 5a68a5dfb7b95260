"""The ``memwatch`` command line.

* ``memwatch demo [--fast] [--n-small N] [--n-large N] [--steps S] [--out DIR] [--wandb-mode M]``:
  two small diffusion models on sklearn digits, one memorizing, one not, watched by
  :class:`memwatch.MemorizationMonitor` (see :mod:`memwatch.apps.demo`).
* ``memwatch fit --config configs/digits.yaml [--trainer.max_steps 100 --monitor.every_n_train_steps 200 ...]``:
  Lightning's ``LightningCLI`` ``fit`` for any LightningModule / LightningDataModule named by
  ``class_path`` in the config; the monitor's arguments are the ``monitor:`` section and
  ``--monitor.*`` flags, other callbacks and loggers come from the config too. When a ``MemorizationMonitor``
  reads its copies from the batches (``reference_data="batches"``, the default) and the data module
  has a ``train_data`` tensor (as :class:`memwatch.apps.toymodels.DigitsDataModule` does), that
  tensor becomes its reference data: the same samples, with their rows for the copied-items table.
  ``reference_data: null`` (no training samples compared) is kept.

``python -m memwatch ...`` is the same as ``memwatch ...``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from memwatch.reporting import copies_verdict, onset_rule

__all__ = ["MemwatchCLI", "main"]

_USAGE = """usage: memwatch <command> [options]

commands:
  demo    train two small diffusion models on sklearn digits (one memorizes, one does not)
          with MemorizationMonitor attached; CPU, a few minutes. `memwatch demo --help`
  fit     train from a LightningCLI config: `memwatch fit --config configs/digits.yaml`
          (any `--trainer.*`, `--model.*`, `--data.*`, `--monitor.*` override; `memwatch fit --help`)
  scan    measure saved checkpoints as the monitor would have, after the fact:
          `memwatch scan CKPTS... --module pkg.Class --data N [--out DIR]` (`memwatch scan --help`)
"""


class MemwatchCLI(LightningCLI):
    """``LightningCLI`` with the monitor as its own argument group: ``--monitor.*`` on the command
    line, a top-level ``monitor:`` section in a config (Lightning adds it to the Trainer's
    callbacks). ``fit`` hands the data module's ``train_data`` to a monitor without
    ``reference_data`` and prints the monitor's verdict at the end."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from memwatch.callback import MemorizationMonitor

        parser.add_lightning_class_args(MemorizationMonitor, "monitor")

    def before_instantiate_classes(self) -> None:
        # a relative W&B save_dir is resolved now: wandb's service process, started by the first
        # run in this Python process, may have another working directory than this command
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        loggers = config.get("trainer.logger") if config is not None else None
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            save_dir = getattr(init_args, "save_dir", None)
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger") and isinstance(save_dir, str):
                init_args.save_dir = os.path.abspath(save_dir)

    def before_fit(self) -> None:
        from memwatch.callback import MemorizationMonitor

        train_data = getattr(self.datamodule, "train_data", None)
        for cb in self.trainer.callbacks:
            # the data module's training set instead of the batches (the default): the same samples, with their rows
            if isinstance(cb, MemorizationMonitor) and isinstance(cb.reference_data, str) and train_data is not None:
                cb.reference_data = train_data

    def after_fit(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from memwatch.callback import MemorizationMonitor

        if not self.trainer.is_global_zero:
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, MemorizationMonitor):
                print(_verdict(cb), flush=True)
        run_dirs = [d for d in map(_wandb_offline_dir, self.trainer.loggers) if d is not None]
        if any(
            isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None for lg in self.trainer.loggers
        ):
            import wandb

            wandb.finish()  # the command ends here: write the run out completely
        for run_dir in run_dirs:
            print(f"memwatch: W&B offline run in {run_dir}; upload with: wandb sync {run_dir}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memwatch`` console script; returns the exit code."""
    from_shell = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "demo":
            from memwatch.apps import demo

            return demo.main(rest)
        if command == "scan":
            from memwatch.apps import scan

            return scan.main(rest)
        if command == "fit":
            with warnings.catch_warnings():
                # main([...]) from Python: LightningCLI warns that sys.argv (pytest's, a notebook's)
                # differs from `args`; `args` is what is meant
                warnings.filterwarnings("ignore", ".*LightningCLI's args parameter.*")
                _run_fit(None if from_shell else ["fit", *rest])
            return 0
    except SystemExit as stop:  # argparse / jsonargparse: --help, --print_config, bad arguments
        code = stop.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    print(f"memwatch: unknown command {command!r}\n\n{_USAGE}", end="", file=sys.stderr)
    return 2


def _run_fit(args: list[str] | None) -> None:
    # from the shell (args None) LightningCLI reads sys.argv itself
    MemwatchCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _verdict(monitor: object) -> str:
    history = getattr(monitor, "history", [])
    if not history:
        return "memwatch: no check ran (fewer steps than `every_n_train_steps`?)"
    last = history[-1]
    detector = getattr(monitor, "detector", None)
    key = "memorized_fraction" if detector is None else detector.monitor  # what the onset rule watches
    last_check = getattr(monitor, "last_check", None)
    rule = "" if last_check is None else f" by {onset_rule(last_check, key)}"
    parts = [f"sharp fraction {last['sharp_fraction_mean']:.2f}", f"flagged {last[key]:.0%}{rule}"]
    if "nn_memorized_fraction" in last:
        parts.append(f"copies of training data {last['nn_memorized_fraction']:.0%}")
        disagreement = copies_verdict(last, key).partition(": ")[2]  # e.g. flagged but no copies among those compared
        parts += [disagreement] if disagreement else []
    onset = getattr(monitor, "onset_step", None)
    head = f"memwatch: memorization onset at step {onset}" if onset is not None else "memwatch: no memorization onset"
    clean = getattr(monitor, "clean_checkpoint_path", None)
    tail = f"; last clean checkpoint: {clean}" if onset is not None and clean is not None else ""
    return f"{head} (last check, step {int(last['step'])}: {', '.join(parts)}){tail}"


def _wandb_offline_dir(logger: object) -> str | None:
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or getattr(logger, "_experiment", None) is None:
        return None
    run = logger.experiment
    settings = getattr(run, "settings", None)
    if getattr(settings, "_offline", False) or getattr(settings, "mode", "") == "offline":
        from pathlib import Path

        return str(Path(run.dir).parent)
    return None
