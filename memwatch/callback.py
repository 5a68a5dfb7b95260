"""``MemorizationMonitor``: the Lightning callback on :class:`memwatch.Monitor`.

The monitor does the work (:mod:`memwatch.monitor`: the intake, the checks, the onset decision,
the clean weights, state); this adapter maps Lightning's hooks onto it — the batches of
``on_train_batch_start`` are observed, a check runs at ``on_train_batch_end`` /
``on_train_epoch_end`` when due — and supplies the run's services from the Trainer: its loggers
(:meth:`memwatch.loggers.MonitorLogger.from_trainer`), its strategy's collectives
(:class:`memwatch.collective.StrategyCollective`) and its checkpoints
(:class:`memwatch.keepers.TrainerKeeper`). The values of each check also go into
``trainer.callback_metrics`` (``memwatch/<name>``), where ``EarlyStopping`` and ``ModelCheckpoint`` read them.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from memwatch.checkpoint import prepare_dirpath
from memwatch.collective import StrategyCollective
from memwatch.discovery import find_score
from memwatch.keepers import TrainerKeeper
from memwatch.loggers import MonitorLogger
from memwatch.monitor import Monitor
from memwatch.reporting import CheckResult

__all__ = ["MemorizationMonitor", "CheckResult", "find_score"]


class MemorizationMonitor(Monitor, Callback):
    r"""Detect memorization while a diffusion model trains under a Lightning ``Trainer``.

    Every argument is :class:`memwatch.Monitor`'s (read there); ``stop_on_onset`` sets
    ``trainer.should_stop``, the clean checkpoint goes through ``Trainer.save_checkpoint``
    (:func:`memwatch.checkpoint.save_clean_checkpoint`: ``checkpoint.mode`` ``"weights"``,
    ``"full"`` or ``"adapter"``, by default in the run's own folder), and DDP ranks agree through
    the Trainer's strategy. The callback finds the module's score through ``score_fn``, its
    ``memwatch_score()`` or a diffusers backbone + scheduler on it.

    The monitor is a :class:`memwatch.Monitor` (a subclass rather than a wrapped one: every
    attribute and method of the monitor — ``history``, ``signals``, ``detector``, ``clean_step``,
    ``calibrate`` … — is the callback's own, as in memwatch 0.1).

    Example:
        >>> from memwatch import OnsetOptions
        >>> monitor = MemorizationMonitor(every_n_train_steps=200, onset=OnsetOptions(threshold=0.05, patience=1))
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=2000)  # doctest: +SKIP
    """

    def _init_state(self) -> None:
        super()._init_state()
        self._state_key: str | None = None  # of these signals (a new `reference_data` composes new ones)

    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names): built once, not per step
        if self._state_key is None:
            # the default method adds nothing, so the checkpoints of earlier versions keep their key
            method = {} if self.sharpness.method == "auto" else {"method": self.sharpness.method}
            if self.copies_from_batches:  # a monitor of the batches and one of a reference tensor can watch one run
                method["reference_data"] = "batches"
            if self.data.ids is not None:  # ... and one counting items (augmented views) beside one counting samples
                method["copies_of"] = "items"
            self._state_key = self._generate_state_key(
                num_probes=self.num_probes,
                sigmas=self.sigmas,
                timesteps=self.probes.timesteps,
                seed=self.probes.seed,
                conditions=tuple(self.meter.conditions),
                **method,
            )
        return self._state_key

    def on_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: CheckResult) -> None:
        """Called on every rank after each check has been logged; override to use its per-probe
        results (also kept as :attr:`last_check`). The default does nothing."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        keeper = None
        if self.checkpoint.save:  # a bad dirpath fails here, on every rank alike
            dirpath = prepare_dirpath(trainer, self.checkpoint.dirpath)
            keeper = TrainerKeeper(trainer, dirpath, self.checkpoint.mode, raise_errors=self.report.raise_errors)
        collective = StrategyCollective(trainer.strategy, trainer.world_size, trainer.global_rank)
        self.attach(MonitorLogger.from_trainer(trainer, log_media=self.report.media), keeper, collective)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model` and the move to the device: the network exists and is in place
        self.begin(pl_module)
        steps, every = trainer.max_steps, self.every_n_train_steps
        budgeted = self.cadence is not None
        first, setting = (
            (self.cadence.first_check, "cadence.first_check") if budgeted else (every, "every_n_train_steps")
        )
        if first is not None and self.every_n_epochs is None and 0 < steps < first:
            rank_zero_warn(f"memwatch: no check will run: {setting}={first} is beyond the trainer's max_steps={steps}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keep_start(pl_module, trainer.global_step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.observe(batch, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.sanity_checking and self.due(trainer.global_step):
            self._run_check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.due(trainer.global_step, epoch_end=trainer.current_epoch):
            self._run_check(trainer, pl_module)

    def _run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One check of the monitor; its values into ``trainer.callback_metrics``, its stop into the Trainer."""
        recorded = len(self.history)
        check = self.check(pl_module, trainer.global_step)
        if len(self.history) > recorded:  # measured, or logged as not measured
            for name, value in self.history[-1].items():
                if name not in ("step", "time/publishing"):
                    trainer.callback_metrics[f"memwatch/{name}"] = torch.tensor(value)
        if self.should_stop:
            trainer.should_stop = True
        if check is not None:
            self.on_check_end(trainer, pl_module, check)
