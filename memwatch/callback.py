"""``MemorizationMonitor``: a Lightning callback that watches a diffusion model memorize.

Every ``every_n_train_steps`` steps (a *check*) it draws the same probes from the model under
training (:class:`memwatch.probes.ProbeSet`: fixed seeds, the model's own sampler), hands them to
its signals (:mod:`memwatch.signals`: calibration, copies, sharpness, conditional, loss gap) in a
fixed order, runs the onset detector on the synced values, keeps the last clean checkpoint, can
stop training at onset, and hands the finished check to :class:`memwatch.reporting.CheckReporter`.
It orchestrates: the hooks, the cadence, the agreement of DDP ranks, the decision and its state.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch import defaults
from memwatch.attribution import CopiedItem
from memwatch.checkpoint import CLEAN_CHECKPOINT_NAME, check_adapters, prepare_dirpath, save_clean_checkpoint
from memwatch.discovery import (
    ScoreFn,
    batch_range,
    batch_sample_shape,
    find_score,
)
from memwatch.errors import MemwatchError
from memwatch.intake import BatchIntake, TrainingSamples
from memwatch.loggers import MonitorLogger
from memwatch.options import CheckpointOptions, DataOptions, OnsetOptions, ProbeOptions, ReportOptions, regroup
from memwatch.probes import ProbeSet, isolated, parameters_finite, shard
from memwatch.probing import ProbeChecks
from memwatch.reporting import CheckReporter, CheckResult
from memwatch.signals import CopyOptions, Draft, LossGapOptions, Run, SharpnessCheckOptions, Signal
from memwatch.signals.base import measure_all, timed
from memwatch.signals.registry import compose
from memwatch.timing import PhaseClock
from memwatch.validation import check_cadence, check_int, check_levels

__all__ = ["MemorizationMonitor", "CheckResult", "find_score"]

_RANGE_BATCHES = 8  # training batches whose value range bounds the probes (without `data.data_range`)


class MemorizationMonitor(ProbeChecks, Callback):
    r"""Detect memorization while a diffusion model trains, from the sharpness of its density.

    At each check the same probes are drawn and compared with the training samples the monitor
    has seen (a copy: ``d₁/d₂ < 1/3``), and their sharpness and LID measured; onset is declared
    when the share ``onset.on`` names — by default ``alarm_fraction``, the probes that copy a
    training item or sit on an isolated peak close to one (:mod:`memwatch.signals.alarm`) —
    exceeds ``onset.threshold`` for ``onset.patience`` checks in a row. Logged under
    ``memwatch/``: see :mod:`memwatch.signals`.
    Images of probes and training samples are logged only with ``report=ReportOptions(media=True)``.

    Args:
        score_fn: ``pl_module -> DiffusionScore``. Default: the module's ``memwatch_score()``,
            else a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` + scheduler found on the
            module (:func:`memwatch.discovery.find_score`).
        every_n_train_steps: check cadence in optimizer steps (``None``: only per epoch).
        every_n_epochs: also/instead check at the end of every n-th training epoch.
        num_probes: probes per check (sharded across DDP ranks).
        sigmas: evaluation noise levels: ``"auto"`` (default: ``probes.sigma_factors`` × the
            median nearest-neighbour distance of the training samples seen before the first
            check; :mod:`memwatch.signals.calibration`) or σ_t values in data units, e.g. ``(0.3,)``.
        reference_data: what the probes' copies are looked for in (:mod:`memwatch.signals.copies`):
            ``"batches"`` (default: the distinct samples the monitor sees in the training
            batches, in memory only, never logged or saved), training samples ``[N, *shape]`` (or
            an iterable of batches), or ``None``: no training samples held or compared, and the
            default onset rule decides on sharpness alone (:mod:`memwatch.signals.alarm`).
        stop_on_onset: set ``trainer.should_stop`` at onset (one decision for all ranks).
        data, probes, sharpness, onset, copies, loss_gap, checkpoint, report: the option groups
            (:mod:`memwatch.options`), each validated when built.
        **deprecated: the flat names of memwatch 0.1 (``onset_threshold=`` …), moved into their
            group with a :class:`memwatch.options.MemwatchDeprecationWarning`.

    Raises:
        ValueError: an argument is out of range (the message names it).

    Example:
        >>> monitor = MemorizationMonitor(every_n_train_steps=200, onset=OnsetOptions(threshold=0.05, patience=1))
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=2000)  # doctest: +SKIP
    """

    def __init__(
        self,
        score_fn: ScoreFn | None = None,
        every_n_train_steps: int | None = defaults.EVERY_N_TRAIN_STEPS,
        every_n_epochs: int | None = None,
        num_probes: int = defaults.NUM_PROBES,
        sigmas: Sequence[float] | str = defaults.SIGMAS,
        reference_data: Tensor | Any | str | None = defaults.REFERENCE_DATA,
        stop_on_onset: bool = False,
        data: DataOptions = DataOptions(),
        probes: ProbeOptions = ProbeOptions(),
        sharpness: SharpnessCheckOptions = SharpnessCheckOptions(),
        onset: OnsetOptions = OnsetOptions(),
        copies: CopyOptions = CopyOptions(),
        loss_gap: LossGapOptions = LossGapOptions(),
        checkpoint: CheckpointOptions = CheckpointOptions(),
        report: ReportOptions = ReportOptions(),
        **deprecated: Any,
    ) -> None:
        super().__init__()
        groups = dict(data=data, probes=probes, sharpness=sharpness, onset=onset, copies=copies)
        groups = regroup(dict(groups, loss_gap=loss_gap, checkpoint=checkpoint, report=report), deprecated)
        self.data, self.probes, self.sharpness = groups["data"], groups["probes"], groups["sharpness"]
        self.onset, self.copies, self.loss_gap = groups["onset"], groups["copies"], groups["loss_gap"]
        self.checkpoint, self.report = groups["checkpoint"], groups["report"]
        self.every_n_train_steps = check_cadence("every_n_train_steps", every_n_train_steps)
        self.every_n_epochs = check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise MemwatchError("set `every_n_train_steps` or `every_n_epochs`; both are None")
        self.num_probes = check_int("num_probes", num_probes, 1)
        self.sigmas: tuple[float, ...] | str = sigmas if sigmas == "auto" else check_levels("sigmas", sigmas)
        self.score_fn, self.stop_on_onset = score_fn, stop_on_onset
        self.sample_shape = self.data.sample_shape
        self.reference_data = reference_data  # composes the signals

    @property
    def reference_data(self) -> Tensor | Any | str | None:
        """The training samples the probes are compared with (see the constructor)."""
        return self._reference_data

    @reference_data.setter
    def reference_data(self, value: Tensor | Any | str | None) -> None:
        # settable before fit (``memwatch fit`` hands the data module's training set over): the signals follow
        _check_together(value, self.data, self.onset, self.copies, self.loss_gap)
        self._reference_data = value
        self._init_state()

    def _init_state(self) -> None:
        """The signals, and what the monitor learns while it runs."""
        self.detector = self.onset.detector(compared=self.reference_data is not None)
        self.clean_checkpoint_path: Path | None = None
        self.clean_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_check: CheckResult | None = None
        self._eval_timesteps: list[float] = []
        self._reporter: CheckReporter | None = None
        self._found: Any = None
        self._probe_set: ProbeSet | None = None
        self._clean_dir: Path | None = None
        self._seen_range: tuple[float, float] | None = None  # of the first training batches
        self._range_batches = 0
        self._last_checked_step = -1
        self._finite_step: int | None = None  # the last check at which the model's parameters were finite
        self._warned_diverged = False
        self._state_key: str | None = None
        self._intake = BatchIntake(self.data, raise_errors=self.report.raise_errors)
        # until the first check (or for good with reference_data="batches"): the LID signal reads them
        self.held_samples: TrainingSamples | None = TrainingSamples(
            self._intake, seed=self.probes.seed, uses=self._uses(), optional=not self.calibrating
        )
        self.signals: dict[str, Signal] = compose(self)

    # ------------------------------------------------------------------ identity and results
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
            conditions = self.signals["conditional"].conditions if "conditional" in self.signals else {}
            self._state_key = self._generate_state_key(
                num_probes=self.num_probes,
                sigmas=self.sigmas,
                timesteps=self.probes.timesteps,
                seed=self.probes.seed,
                conditions=tuple(conditions),
                **method,
            )
        return self._state_key

    @property
    def onset_step(self) -> int | None:
        """Global step of the check at which onset was declared (``None`` before)."""
        return self.detector.onset_step

    @property
    def most_copied(self) -> list[CopiedItem]:
        """The training items the last check's probes copied, most copied first (with a
        ``reference_data`` tensor): index, id, copies (probes with d₁/d₂ < 1/3 to it), flagged copies."""
        return [] if self.last_check is None else [c for c in self.last_check.copied if c.copies]

    def on_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: CheckResult) -> None:
        """Called on every rank after each check has been logged; override to use its per-probe
        results (also kept as :attr:`last_check`). The default does nothing."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        r = self.report
        logger = MonitorLogger.from_trainer(trainer, log_media=r.media)
        self._reporter = CheckReporter(logger, threshold=self.sharpness.threshold, log_figures=r.figures,
                                       log_media=r.media, decode_fn=self.data.decode_fn, verbose=r.verbose,
                                       raise_errors=r.raise_errors, onset_key=self.detector.monitor,
                                       lid_statistic=self._console_lid())  # fmt: skip
        if self.checkpoint.save:  # a bad dirpath fails here, on every rank alike
            self._clean_dir = prepare_dirpath(trainer, self.checkpoint.dirpath)

    def _console_lid(self) -> str:
        """The LID statistic the result line shows: the one the onset rule reads (the default rule's
        isolated peaks are counted in flat directions; ``onset.on="lid"`` reads ``sharpness.lid.statistic``)."""
        return "count" if self.onset.on == "auto" else self.sharpness.lid.statistic

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model` and the move to the device: the network exists and is in place
        self.prepare(pl_module)
        if self.checkpoint.save and self.checkpoint.mode == "adapter":
            check_adapters(pl_module)  # a clean checkpoint of no adapter fails now, not at the first clean check
        assert self._reporter is not None
        self._reporter.use_sampler(self.sampler_settings)
        steps, every = trainer.max_steps, self.every_n_train_steps
        if every is not None and self.every_n_epochs is None and 0 < steps < every:
            rank_zero_warn(
                f"memwatch: no check will run: every_n_train_steps={every} is beyond the trainer's max_steps={steps}"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the weights training starts from are the first clean checkpoint: a fine-tune that memorizes
        # before its first check can still go back to them (not on a resume, which has its own)
        if self.checkpoint.save and self.clean_step is None and trainer.global_step == 0:
            self._save_clean_checkpoint(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.sample_shape is None:
            try:
                self.sample_shape = batch_sample_shape(batch, self.data.select)
            except MemwatchError as err:
                return self._intake.fault("select", step, f"{err}; the probe shape is taken from a later batch")
            self._validate(pl_module)  # a configuration error: raised whatever raise_errors says
        if self.data.data_range is None and self._range_batches < _RANGE_BATCHES:
            self._seen_range = batch_range(batch, self.data.select, self._seen_range)
            self._range_batches += 1
        if self.held_samples is not None and self._holding:
            self.held_samples.offer(batch, step, self.sample_shape)
            if self.held_samples.refused and not self.detector.history:  # the first batch: the rule without them
                self.detector = self.onset.detector(compared=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or self.every_n_train_steps is None or step == 0:
            return
        if step % self.every_n_train_steps == 0 and step != self._last_checked_step:
            self._run_check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.global_step != self._last_checked_step:
            self._run_check(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "clean_step": self.clean_step,
            "clean_checkpoint_path": None if self.clean_checkpoint_path is None else str(self.clean_checkpoint_path),
            "history": list(self.history),
            "last_checked_step": self._last_checked_step,
            "calibrated_sigmas": self.calibrated_sigmas,  # also read by memwatch 0.1
            "signals": {name: s.state_dict() for name, s in self.signals.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.clean_step = state_dict["clean_step"]
        path = state_dict["clean_checkpoint_path"]
        self.clean_checkpoint_path = None if path is None else Path(path)
        self.history = list(state_dict["history"])
        self._last_checked_step = state_dict["last_checked_step"]
        states = state_dict.get("signals") or {
            "calibration": {"calibrated_sigmas": state_dict.get("calibrated_sigmas")}
        }
        for name, state in states.items():
            if name in self.signals:
                self.signals[name].load_state_dict(state)
        self._release_samples()  # a resumed run keeps its levels (training samples were never saved)

    # ------------------------------------------------------------------ the check
    def _run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_checked_step = step = trainer.global_step
        if self.detector.memorizing and self.stop_on_onset:  # e.g. resumed after onset: stop again
            trainer.should_stop = True
            return
        assert self._reporter is not None
        if not self._weights_finite(trainer, pl_module, step):
            return
        self._reporter.start_line(step, self.num_probes, len(self._eval_timesteps) or len(self.probes.sigma_factors))
        started = time.perf_counter()
        clock = PhaseClock(self._reporter.progress(step, started))
        run = Run(pl_module, self._found, tuple(self.sample_shape or ()), trainer.world_size, trainer.global_rank)
        run.strategy, run.step, run.raise_errors = trainer.strategy, step, self.report.raise_errors
        measurement, measured, error = None, {}, None
        try:
            if self.held_samples is not None:
                with clock.phase("intake"):
                    self.held_samples.drain(self.sample_shape)
            for signal in self.signals.values():
                with timed(clock, signal, "before_check"):
                    signal.before_check(run)  # the same outcome on every rank (calibration: rank zero's)
            self._release_samples()
            # found again at every check (a `score_fn` may build it from the current module), and
            # before the isolation, which freezes the parameters discovery tells networks apart by
            run.score = self._found = find_score(pl_module, self.score_fn, ema_attr=self.probes.ema_attr)
            with isolated(pl_module):
                rows = shard(self.num_probes, trainer.world_size, trainer.global_rank)
                measurement = self.measure_check(pl_module, rows=rows, clock=clock)
                measured = measure_all(self.signals, run, measurement, self._scoring(pl_module), clock)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.report.raise_errors and trainer.world_size == 1:
                raise
            error = err
        if not self._all_ranks_measured(trainer, error):
            return
        draft = self._contributions(run, measurement, measured, clock)
        with clock.phase("decision"):  # the onset rule and the clean checkpoint
            self._decide(trainer, step, draft)
        draft.values.update(clock.values())
        draft.values["check_seconds"] = time.perf_counter() - started
        with clock.phase("publishing"):
            self._publish(trainer, pl_module, step, draft)
        self._reporter.publish_time(step, clock.seconds["publishing"])
        self.history[-1]["time/publishing"] = clock.seconds["publishing"]

    def _weights_finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Whether the model's parameters are finite on every rank. When they are not, training
        has diverged and every measurement would be NaN with a warning of its own that points
        elsewhere (the adjoint test, the sampler, the LID): the check is not measured, its values
        are logged as NaN (neither clean nor counted toward onset), and one warning per run names
        the cause."""
        if trainer.strategy.reduce_boolean_decision(parameters_finite(pl_module), all=True):
            self._finite_step = step
            return True
        since = "the run's start" if self._finite_step is None else f"a step after {self._finite_step}"
        reason = f"the model's parameters are not finite since {since}"
        if not self._warned_diverged:
            self._warned_diverged = True
            earlier = "" if self._finite_step is None else f"; the check of step {self._finite_step} had finite ones"
            rank_zero_warn(
                f"memwatch: {reason} (first seen at the check of step {step}{earlier}): training has diverged, e.g. "
                "a NaN or Inf loss or gradient went through an optimizer step. Checks are not measured while they "
                "stay so: their values are NaN, neither clean nor counted toward onset (warned once)"
            )
        names = [n for n in self.history[-1] if n != "step"] if self.history else list(self._value_names())
        values = dict.fromkeys(names, math.nan)
        values["onset"] = float(self.detector.update(step, math.nan).memorizing)
        if self.clean_step is not None:
            values["clean_step"] = float(self.clean_step)
        self._record(trainer, step, values)
        assert self._reporter is not None
        self._reporter.publish_unmeasured(step, values, reason)
        return False

    def _value_names(self) -> Iterator[str]:
        """The values a check logs that are known before the first one (the onset rule's share, the signals')."""
        yield self.detector.monitor
        for signal in self.signals.values():
            yield from signal.value_names

    def _decide(self, trainer: pl.Trainer, step: int, draft: Draft) -> None:
        """The onset decision, the clean checkpoint and the stop (one decision for all ranks)."""
        decision = self.detector.update(step, draft.values[self.detector.monitor])
        if decision.clean and self.checkpoint.save:
            self._save_clean_checkpoint(trainer)
        if self.stop_on_onset:  # a collective on every rank at every check
            if trainer.strategy.reduce_boolean_decision(decision.onset, all=False):
                trainer.should_stop = True
        draft.values["onset"] = float(decision.memorizing)
        if self.clean_step is not None:
            draft.values["clean_step"] = float(self.clean_step)
        draft.fields["decision"] = decision

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, draft: Draft) -> None:
        values, m = draft.values, draft.measurement
        self._record(trainer, step, values)
        check = CheckResult(
            step, values, m.results, m.samples, m.nn_ratio, nearest=m.nearest, spectrum=m.spectrum,
            hessian_score_norm=m.hessian_score_norm, **draft.fields,
        )  # fmt: skip
        clean = None if self.clean_checkpoint_path is None else str(self.clean_checkpoint_path)
        assert self._reporter is not None
        copies = self.signals.get("copies")
        originals = None if copies is None else copies.original_images
        self._reporter.publish(check, self.history, onset_step=self.onset_step, clean_checkpoint=clean,
                               reference=self.reference, reference_images=originals)  # fmt: skip
        self.last_check = check
        self.on_check_end(trainer, pl_module, check)

    def _record(self, trainer: pl.Trainer, step: int, values: dict[str, float]) -> None:
        """A finished check's values into the history and where EarlyStopping / ModelCheckpoint read them."""
        self.history.append(dict(values, step=float(step)))
        for name, value in values.items():
            trainer.callback_metrics[f"memwatch/{name}"] = torch.tensor(value)

    def _all_ranks_measured(self, trainer: pl.Trainer, error: Exception | None) -> bool:
        """Every rank learns whether every rank measured before any metric is synced: a rank that
        failed alone would otherwise leave the others waiting in the sync forever."""
        if trainer.strategy.reduce_boolean_decision(error is None, all=True):
            return True
        where = f"rank {trainer.global_rank}" if error is not None else "another rank"
        msg = f"memwatch: the check at step {trainer.global_step} failed on {where} and was skipped"
        if self.report.raise_errors:
            raise RuntimeError(msg) from error
        if error is not None:
            warnings.warn(f"{msg}: {error!r}", RuntimeWarning, stacklevel=3)
        return False

    def _release_samples(self) -> None:
        """Free the training samples held once no signal wants them (calibrated, no copies of the
        batches; the reservoir alone once only the copy index and no loss gap reads them): they
        are held in memory no longer than needed."""
        if not self._holding:
            self.held_samples = None
        elif self.held_samples is not None and not self._pending and "loss_gap" not in self.signals:
            self.held_samples.drop_reservoir()

    def _save_clean_checkpoint(self, trainer: pl.Trainer) -> None:
        """Write the clean checkpoint atomically (every rank takes part); a failed save keeps the
        previous one and is a warning, never a crash. The record names a step only once its file is in place."""
        assert self._clean_dir is not None
        previous = (self.clean_step, self.clean_checkpoint_path)
        # set first, so that a "full" checkpoint's own callback state names itself
        self.clean_step, self.clean_checkpoint_path = trainer.global_step, self._clean_dir / CLEAN_CHECKPOINT_NAME
        ok = False
        try:
            outcome = save_clean_checkpoint(
                trainer, self._clean_dir, mode=self.checkpoint.mode, raise_errors=self.report.raise_errors
            )
            ok = outcome.ok
        finally:  # also on an exception raised through raise_errors, or a KeyboardInterrupt
            if not ok:
                self.clean_step, self.clean_checkpoint_path = previous
        if not outcome.ok:
            rank_zero_warn(outcome.failure_message(previous_step=self.clean_step))


# ---------------------------------------------------------------------- module-level helpers
def _describe(value: Any) -> str:
    """A setting's value in a message: tensors by their shape, not their contents."""
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)


def _check_together(
    reference_data: Any, data: DataOptions, onset: OnsetOptions, copies: CopyOptions, loss_gap: LossGapOptions
) -> None:
    """Settings that only make sense together."""
    if isinstance(reference_data, str) and reference_data != "batches":
        raise MemwatchError(
            '`reference_data` must be training samples, an iterable of batches, "batches" or None, '
            f"got {reference_data!r}"
        )
    if onset.on in ("copies", "either") and reference_data is None:
        raise MemwatchError(
            f"`onset.on`={onset.on!r} needs training samples to compare the probes with: pass `reference_data` "
            '(a tensor, or "batches" for those the monitor sees)'
        )
    if data.ids is not None and not isinstance(reference_data, str):
        raise MemwatchError(
            "`data.ids` name the items of the training batches' views, which the copy index reads with "
            f'reference_data="batches" (the default); got reference_data={_describe(reference_data)}: a reference '
            "tensor's rows are its items"
        )
    if isinstance(reference_data, str) and copies.ids is not None:
        raise MemwatchError(
            '`copies.ids` name the items of a `reference_data` tensor; with reference_data="batches" the monitor holds '
            "a changing sample of the batches and has no ids: pass `reference_data` as a tensor"
        )
    if loss_gap.heldout_data is not None and reference_data is None:
        raise MemwatchError(
            "`loss_gap.heldout_data` is one side of the loss gap; the other is training samples: pass `reference_data` "
            '(a tensor, or "batches" for those the monitor sees)'
        )
