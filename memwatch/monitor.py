"""``Monitor``: watch a diffusion model memorize from any training loop.

The monitor takes the training batches (:meth:`Monitor.observe`), and at a check
(:meth:`Monitor.check`, when :meth:`Monitor.due`) draws the same probes from the model
(:class:`memwatch.probes.ProbeSet`: fixed seeds, the model's own sampler), hands them to its
signals (:mod:`memwatch.signals`) in their fixed order, runs the onset detector on the synced
values, keeps the clean weights through a :class:`memwatch.keepers.Keeper`, and publishes the
finished check through a :class:`memwatch.loggers.MonitorLogger`. The ranks of a distributed run
agree through a :class:`memwatch.collective.Collective`. Nothing here needs a Trainer: a plain
PyTorch or ``accelerate`` loop drives it directly, and :class:`memwatch.MemorizationMonitor` maps
Lightning's hooks onto it.

Example:
    >>> from memwatch.discovery import diffusers_score
    >>> score_fn = lambda net: diffusers_score(net, noise_scheduler)  # a diffusers UNet and its scheduler
    >>> monitor = Monitor(score_fn, every_n_train_steps=100, stop_on_onset=True)
    >>> monitor.start(unet, logger=wandb_run)                    # doctest: +SKIP
    >>> for step, batch in enumerate(loader):                    # doctest: +SKIP
    ...     monitor.observe(batch, step)                  # before the optimizer step
    ...     train_step(batch)
    ...     if monitor.due(step + 1):                     # after it: step + 1 steps done
    ...         monitor.check(unet, step + 1)
    ...     if monitor.should_stop:
    ...         break
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from memwatch import defaults
from memwatch.attribution import CopiedItem
from memwatch.cadence import BudgetCadence, CadenceOptions, DataSize
from memwatch.collective import Collective, default_collective
from memwatch.discovery import ScoreFn, find_score, network_of
from memwatch.errors import MemwatchError
from memwatch.intake import BatchIntake, TrainingSamples, batch_sample_shape
from memwatch.keepers import FileKeeper, Keeper
from memwatch.loggers import MonitorLogger
from memwatch.monitor_settings import cadence_of, check_together
from memwatch.onset import OnsetDecision
from memwatch.options import CheckpointOptions, DataOptions, OnsetOptions, ProbeOptions, ReportOptions, regroup
from memwatch.probes import ProbeMeasurement, isolated, parameters_finite, shard
from memwatch.probing import Probing
from memwatch.reporting import CheckReporter, CheckResult
from memwatch.sharpness import SharpnessResult
from memwatch.signals import CopyOptions, CopySignal, Draft, LossGapOptions, Run, SharpnessCheckOptions
from memwatch.signals.base import contribute_all, measure_all, timed
from memwatch.signals.context import SignalContext
from memwatch.signals.registry import compose, find
from memwatch.timing import PhaseClock
from memwatch.validation import check_cadence, check_int, check_levels

__all__ = ["Monitor"]

_DEFAULT_CLEAN_DIR = "memwatch-clean"  # the clean weights' folder of a loop without `checkpoint.dirpath`


class Monitor(Probing):
    r"""Detect memorization while a diffusion model trains, in any training loop.

    At each check the same probes are drawn and compared with the training samples the monitor
    has seen (a copy: ``d₁/d₂ < 1/3``), and their sharpness and LID measured; onset is declared
    when the share ``onset.on`` names — by default ``alarm_fraction``, the probes that copy a
    training item or sit on an isolated peak close to one (:mod:`memwatch.signals.alarm`) —
    exceeds ``onset.threshold`` for ``onset.patience`` checks in a row. Logged under
    ``memwatch/``: see :mod:`memwatch.signals`.
    Images of probes and training samples are logged only with ``report=ReportOptions(media=True)``.

    Args:
        score_fn: ``module -> DiffusionScore``. Default: the module's ``memwatch_score()``,
            else a diffusers network + scheduler found on the module
            (:func:`memwatch.discovery.find_score`); for a bare diffusers network pass
            ``lambda net: memwatch.diffusers_score(net, scheduler)``.
        every_n_train_steps: ``"auto"`` (default; ``CadenceOptions()``) or a
            :class:`memwatch.cadence.CadenceOptions`: checks within its ``budget`` of training time,
            at most ``steps_per_sample`` steps per training sample apart (:mod:`memwatch.cadence`);
            an integer: a check every that many optimizer steps; ``None``: only per epoch.
        every_n_epochs: also/instead check at the end of every n-th training epoch.
        num_probes: probes per check (sharded across ranks).
        sigmas: evaluation noise levels: ``"auto"`` (default: ``probes.sigma_factors`` × the
            median nearest-neighbour distance of the training samples seen before the first
            check; :mod:`memwatch.signals.calibration`) or σ_t values in data units, e.g. ``(0.3,)``.
        reference_data: what the probes' copies are looked for in (:mod:`memwatch.signals.copies`):
            ``"batches"`` (default: the distinct samples the monitor sees in the training
            batches, in memory only, never logged or saved), training samples ``[N, *shape]`` (or
            an iterable of batches), or ``None``: no training samples held or compared, and the
            default onset rule decides on sharpness alone (:mod:`memwatch.signals.alarm`).
        stop_on_onset: set :attr:`should_stop` at onset (one decision for all ranks).
        data, probes, sharpness, onset, copies, loss_gap, checkpoint, report: the option groups
            (:mod:`memwatch.options`), each validated when built.
        **deprecated: the flat names of memwatch 0.1 (``onset_threshold=`` …), moved into their
            group with a :class:`memwatch.options.MemwatchDeprecationWarning`.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        score_fn: ScoreFn | None = None,
        every_n_train_steps: int | str | CadenceOptions | None = defaults.EVERY_N_TRAIN_STEPS,
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
        groups = dict(data=data, probes=probes, sharpness=sharpness, onset=onset, copies=copies)
        groups = regroup(dict(groups, loss_gap=loss_gap, checkpoint=checkpoint, report=report), deprecated)
        levels: tuple[float, ...] | str = sigmas if sigmas == "auto" else check_levels("sigmas", sigmas)
        num_probes = check_int("num_probes", num_probes, 1)
        super().__init__(score_fn, num_probes, levels, groups["data"], groups["probes"], groups["sharpness"])
        self.onset, self.copies = groups["onset"], groups["copies"]
        self.loss_gap, self.checkpoint, self.report = groups["loss_gap"], groups["checkpoint"], groups["report"]
        #: the budgeted cadence's options (``None`` with a fixed cadence)
        self.every_n_train_steps, self.cadence = cadence_of(every_n_train_steps)
        self.every_n_epochs = check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise MemwatchError("set `every_n_train_steps` or `every_n_epochs`; both are None")
        self.stop_on_onset = stop_on_onset
        self.reference_data = reference_data  # composes the signals

    @property
    def reference_data(self) -> Tensor | Any | str | None:
        """The training samples the probes are compared with (see the constructor)."""
        return self._reference_data

    @reference_data.setter
    def reference_data(self, value: Tensor | Any | str | None) -> None:
        # settable before the run (``memwatch fit`` hands the data module's training set over): the signals follow
        check_together(value, self.data, self.onset, self.copies, self.loss_gap)
        self._reference_data = value
        self._init_state()

    def _init_state(self) -> None:
        """The signals, and what the monitor learns while it runs."""
        self._forget()
        self.detector = self.onset.detector(compared=self.reference_data is not None)
        self.clean_checkpoint_path: Path | None = None
        self.clean_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_check: CheckResult | None = None
        self.should_stop = False
        self.keeper: Keeper | None = None
        self._reporter: CheckReporter | None = None
        self._last_checked_step = -1
        self._finite_step: int | None = None  # the last check at which the model's parameters were finite
        self._warned_diverged = False
        self._intake = BatchIntake(self.data, raise_errors=self.report.raise_errors)
        self.budget = None if self.cadence is None else BudgetCadence(self.cadence)
        # until the first check (or for good with reference_data="batches"): the LID signal reads them
        self.held_samples: TrainingSamples | None = TrainingSamples(
            self._intake, seed=self.probes.seed, uses=self._uses(), optional=not self.calibrating
        )
        self.signals = compose(SignalContext(
            self.num_probes, self.reference_data, self.data, self.probes, self.sharpness, self.onset, self.copies,
            self.loss_gap, self.calibrating, held=lambda: self.held_samples,
            timesteps=lambda: list(self.meter.timesteps), max_batch=lambda: self.meter.max_batch,
            training_samples=self._training_samples, use_levels=self.use_levels,
        ))  # fmt: skip

    # ------------------------------------------------------------------ results
    @property
    def copies_from_batches(self) -> bool:
        """Whether the probes are compared with the training samples seen (``reference_data="batches"``)."""
        return isinstance(self.reference_data, str)

    @property
    def onset_step(self) -> int | None:
        """Global step of the check at which onset was declared (``None`` before)."""
        return self.detector.onset_step

    @property
    def most_copied(self) -> list[CopiedItem]:
        """The training items the last check's probes copied, most copied first (with a
        ``reference_data`` tensor): index, id, copies (probes with d₁/d₂ < 1/3 to it), flagged copies."""
        return [] if self.last_check is None else [c for c in self.last_check.copied if c.copies]

    # ------------------------------------------------------------------ the run
    def start(
        self,
        module: nn.Module,
        step: int = 0,
        *,
        logger: Any = None,
        keeper: Keeper | None = None,
        collective: Collective | None = None,
    ) -> None:
        """Begin watching ``module`` (call once, before the first :meth:`observe`): find its score,
        fix what can be fixed, and keep its starting weights as the first clean ones (at ``step`` 0).

        Args:
            module: the network under training (any ``nn.Module``; see ``score_fn``), also as a
                loop holds it in a data-parallel wrapper (``accelerator.prepare``'s
                ``DistributedDataParallel``): the network inside is watched and kept
                (:func:`memwatch.discovery.network_of`), so the clean weights load into a fresh one.
            step: the global step training starts from (a resumed run keeps its clean weights).
            logger: where checks are logged: ``None``, a W&B run, a Lightning logger or a list of them
                (:meth:`memwatch.loggers.MonitorLogger.of`).
            keeper: who keeps the clean weights; default with ``checkpoint.save``: a
                :class:`memwatch.keepers.FileKeeper` in ``checkpoint.dirpath`` (default ``./memwatch-clean``).
            collective: how ranks agree; default :func:`memwatch.collective.default_collective`.

        Raises:
            MemwatchError: no score is found, or a setting does not fit the model.
        """
        module, collective = network_of(module), collective or default_collective()
        if keeper is None and self.checkpoint.save:
            dirpath = self.checkpoint.dirpath or _DEFAULT_CLEAN_DIR
            keeper = FileKeeper(dirpath, self.checkpoint.mode, raise_errors=self.report.raise_errors)
        self.attach(MonitorLogger.of(logger, log_media=self.report.media, is_global_zero=collective.rank == 0),
                    keeper, collective)  # fmt: skip
        self.begin(module)
        self.keep_start(module, step)

    def attach(self, logger: MonitorLogger, keeper: Keeper | None, collective: Collective) -> None:
        """Where checks are published, who keeps the clean weights, how the ranks agree (the part
        of :meth:`start` a framework supplies itself)."""
        r = self.report
        self._reporter = CheckReporter(logger, threshold=self.sharpness.threshold, log_figures=r.figures,
                                       log_media=r.media, decode_fn=self.data.decode_fn, verbose=r.verbose,
                                       raise_errors=r.raise_errors, onset_key=self.detector.monitor,
                                       lid_statistic=self._console_lid())  # fmt: skip
        self.keeper, self.collective = keeper, collective

    def begin(self, module: nn.Module) -> None:
        """Find ``module``'s score and validate the settings on it (after :meth:`attach`)."""
        self.prepare(module)
        if self.keeper is not None:
            self.keeper.check(module)  # e.g. a clean checkpoint of no adapter fails now, not at the first clean check
        assert self._reporter is not None
        self._reporter.use_sampler(self.sampler_settings)

    def keep_start(self, module: nn.Module, step: int) -> None:
        """The weights training starts from are the first clean ones: a fine-tune that memorizes
        before its first check can still go back to them (not on a resume, which has its own)."""
        if self.keeper is not None and self.clean_step is None and step == 0:
            self._save_clean(module, step)

    def _console_lid(self) -> str:
        """The LID statistic the result line shows: the one the onset rule reads (the default rule's
        isolated peaks are counted in flat directions; ``onset.on="lid"`` reads ``sharpness.lid.statistic``)."""
        return "count" if self.onset.on == "auto" else self.sharpness.lid.statistic

    def observe(self, batch: Any, step: int) -> None:
        """Take a training batch (before its optimizer step): the probe shape from the first one,
        the value range, and the samples the signals read (a detached copy, no device sync).

        Raises:
            MemwatchError: :meth:`start` was not called, or the batches do not fit the settings.
        """
        if self._module is None:
            raise MemwatchError("call `start(module)` before `observe(batch, step)`")
        if self.sample_shape is None:
            try:
                self.sample_shape = batch_sample_shape(batch, self.data.select)
            except MemwatchError as err:
                return self._intake.fault("select", step, f"{err}; the probe shape is taken from a later batch")
            self._validate(self._module)  # a configuration error: raised whatever raise_errors says
        started = time.perf_counter()
        self.see_range(batch)
        if self.held_samples is not None and self._holding:
            self.held_samples.offer(batch, step, self.sample_shape)
            if self.held_samples.refused and not self.detector.history:  # the first batch: the rule without them
                self.detector = self.onset.detector(compared=False)
        if self.budget is not None:
            self.budget.spend(time.perf_counter() - started)

    def due(self, step: int, *, epoch_end: int | None = None) -> bool:
        """Whether a check is due after optimizer step ``step`` (with ``every_n_train_steps="auto"``
        when the budget allows or the ceiling says, :mod:`memwatch.cadence`; else every
        ``every_n_train_steps``), or at the end of the 0-based epoch ``epoch_end`` (every
        ``every_n_epochs``); never twice at one step. Ask once after every optimizer step: the
        budget times training steps by these calls."""
        if epoch_end is None and self.budget is not None:
            self.budget.tick(step)
        if step == self._last_checked_step:
            return False
        if epoch_end is not None:
            return self.every_n_epochs is not None and (epoch_end + 1) % self.every_n_epochs == 0
        if self.budget is not None:
            return step > 0 and self.budget.due(step)
        return self.every_n_train_steps is not None and step > 0 and step % self.every_n_train_steps == 0

    # ------------------------------------------------------------------ the check
    def check(self, module: nn.Module, step: int) -> CheckResult | None:
        """One check of ``module`` at global step ``step``, on every rank: measured, decided, kept,
        published. Faults are warnings (``report.raise_errors`` re-raises on one process).

        Returns:
            The published check (also :attr:`last_check`), or ``None`` when it was not measured
            (diverged weights, a failed rank) or training is to stop (:attr:`should_stop`).

        Raises:
            MemwatchError: :meth:`start` was not called.
        """
        if self._reporter is None:
            raise MemwatchError("call `start(module)` before `check(module, step)`")
        module = network_of(module)
        self._last_checked_step = step
        if self.detector.memorizing and self.stop_on_onset:  # e.g. resumed after onset: stop again
            self.should_stop = True
            return None
        if not self._weights_finite(module, step):
            return None
        self._reporter.start_line(step, self.num_probes, len(self.meter.timesteps) or len(self.probes.sigma_factors))
        started = time.perf_counter()
        clock = PhaseClock(self._reporter.progress(step, started))
        world, rank = self.collective.world_size, self.collective.rank
        run = Run(module, self._found, tuple(self.sample_shape or ()), self.collective, step, self.report.raise_errors)
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
            run.score = self._found = find_score(module, self.score_fn, ema_attr=self.probes.ema_attr)
            with isolated(module):
                measurement = self.measure_check(module, shard(self.num_probes, world, rank), clock, len(self.history))
                measured = measure_all(self.signals, run, measurement, self._scoring(module), clock)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.report.raise_errors and world == 1:
                raise
            error = err
        if not self._all_ranks_measured(step, error):
            self._plan(step, {}, time.perf_counter() - started)
            return None
        draft = self._contributions(run, measurement, measured, clock)
        with clock.phase("decision"):  # the onset rule and the clean checkpoint
            decision = self._decide(module, step, draft)
        draft.values.update(clock.values())
        draft.values["check_seconds"] = time.perf_counter() - started
        self._plan(step, draft.values, draft.values["check_seconds"])
        with clock.phase("publishing"):
            check = self._publish(step, draft, decision)
        self._reporter.publish_time(step, clock.seconds["publishing"])
        self.history[-1]["time/publishing"] = clock.seconds["publishing"]
        if self.budget is not None:
            self.budget.spend(clock.seconds["publishing"])
        return check

    def _plan(self, step: int, values: dict[str, float], seconds: float) -> None:
        """With the budget: the next check's step from this one's cost (rank zero's, on every
        rank), logged as ``cadence_steps`` (with ``time/monitor_ratio``, the monitor's time over training
        time so far, this rank's) and said in the result line."""
        if self.budget is None:
            return
        sizes = None
        if self.reference is not None:
            sizes = DataSize(self.reference.shape[0])
        elif self.held_samples is not None and (seen := self.held_samples.sizes.size()) is not None:
            sizes = DataSize(seen.samples * self.collective.world_size, seen.largest_repeat)  # each rank its shard
        self.budget.account(step, values, seconds, sizes)
        self.budget.use_next_step(self.collective.broadcast(self.budget.next_step))
        if values:
            values["cadence_steps"] = float(self.budget.interval)
            values["time/monitor_ratio"] = self.budget.ratio
        assert self._reporter is not None
        self._reporter.use_cadence(self.budget.describe())

    def _weights_finite(self, module: nn.Module, step: int) -> bool:
        """Whether the model's parameters are finite on every rank. When they are not, training
        has diverged and every measurement would be NaN with a warning of its own that points
        elsewhere (the adjoint test, the sampler, the LID): the check is not measured, its values
        are logged as NaN (neither clean nor counted toward onset), and one warning per run names
        the cause."""
        if self.collective.all_true(parameters_finite(module)):
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
        self._record(step, values)
        assert self._reporter is not None
        self._reporter.publish_unmeasured(step, values, reason)
        self._plan(step, {}, 0.0)
        return False

    def _value_names(self) -> Iterator[str]:
        """The values a check logs that are known before the first one (the onset rule's share, the signals')."""
        yield self.detector.monitor
        for signal in self.signals.values():
            yield from signal.value_names

    def _contributions(
        self, run: Run, measurement: ProbeMeasurement, measured: dict[str, Any], clock: PhaseClock | None = None
    ) -> Draft:
        """Every signal's values and readings (each timed on ``clock``), and the intake's counts."""
        draft = contribute_all(self.signals, run, measurement, measured, clock)
        draft.values["intake_skipped_batches"] = float(self._intake.skipped)
        draft.values["intake_dropped_rows"] = float(self._intake.dropped_rows)
        return draft

    def _decide(self, module: nn.Module, step: int, draft: Draft) -> OnsetDecision:
        """The onset decision, the clean weights and the stop (one decision for all ranks)."""
        decision = self.detector.update(step, draft.values[self.detector.monitor])
        if decision.clean and self.keeper is not None:
            self._save_clean(module, step)
        if self.stop_on_onset and self.collective.any_true(decision.onset):  # a collective on every rank
            self.should_stop = True
        draft.values["onset"] = float(decision.memorizing)
        if self.clean_step is not None:
            draft.values["clean_step"] = float(self.clean_step)
        return decision

    def _publish(self, step: int, draft: Draft, decision: OnsetDecision) -> CheckResult:
        values, m = draft.values, draft.measurement
        self._record(step, values)
        check = CheckResult(
            step, values, m.results, m.samples, m.nn_ratio, decision, nearest=m.nearest, spectrum=m.spectrum,
            hessian_score_norm=m.hessian_score_norm, readings=draft.readings,
        )  # fmt: skip
        clean = None if self.clean_checkpoint_path is None else str(self.clean_checkpoint_path)
        assert self._reporter is not None
        copies = find(self.signals, CopySignal)
        originals = None if copies is None else copies.original_images
        self._reporter.publish(check, self.history, onset_step=self.onset_step, clean_checkpoint=clean,
                               reference=self.reference, reference_images=originals)  # fmt: skip
        self.last_check = check
        return check

    def _record(self, step: int, values: dict[str, float]) -> None:
        """A finished check's values into the history."""
        self.history.append(dict(values, step=float(step)))

    def _all_ranks_measured(self, step: int, error: Exception | None) -> bool:
        """Every rank learns whether every rank measured before any metric is synced: a rank that
        failed alone would otherwise leave the others waiting in the sync forever."""
        if self.collective.all_true(error is None):
            return True
        where = f"rank {self.collective.rank}" if error is not None else "another rank"
        msg = f"memwatch: the check at step {step} failed on {where} and was skipped"
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
        elif self.held_samples is not None and not self.pending and not self._reads_reservoir:
            self.held_samples.drop_reservoir()

    def _save_clean(self, module: nn.Module, step: int) -> None:
        """Keep the clean weights (every rank takes part); a failed save keeps the previous ones and
        is a warning, never a crash. The record names a step only once its file is in place."""
        assert self.keeper is not None
        previous = (self.clean_step, self.clean_checkpoint_path)
        # set first, so that a "full" checkpoint's own callback state names itself
        self.clean_step, self.clean_checkpoint_path = step, self.keeper.path
        ok = False
        try:
            outcome = self.keeper.save(module, step, self.collective)
            ok = outcome.ok
        finally:  # also on an exception raised through raise_errors, or a KeyboardInterrupt
            if not ok:
                self.clean_step, self.clean_checkpoint_path = previous
        if not outcome.ok:
            rank_zero_warn(outcome.failure_message(previous_step=self.clean_step))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, the detector, the clean record, the history and every signal's state."""
        return {
            "detector": self.detector.state_dict(),
            "clean_step": self.clean_step,
            "clean_checkpoint_path": None if self.clean_checkpoint_path is None else str(self.clean_checkpoint_path),
            "history": list(self.history),
            "last_checked_step": self._last_checked_step,
            "calibrated_sigmas": self.calibrated_sigmas,  # also read by memwatch 0.1
            "signals": {name: s.state_dict() for name, s in self.signals.items()},
            "cadence": None if self.budget is None else self.budget.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the states of memwatch 0.1, which saved only the levels)."""
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
        if self.budget is not None and state_dict.get("cadence") is not None:
            self.budget.load_state_dict(state_dict["cadence"])
        self._release_samples()  # a resumed run keeps its levels (training samples were never saved)

    # ------------------------------------------------------------------ measuring without a run
    def measure_probes(
        self, module: nn.Module, rows: slice = slice(None)
    ) -> tuple[Tensor, dict[float, SharpnessResult]]:
        """Draw this monitor's probes (``rows`` of them) from the module's current weights and
        measure them at every evaluation timestep, as a check does (prepared on first use; put
        the module in eval mode first).

        Returns:
            ``(samples [n, *shape] on the CPU, {timestep: SharpnessResult})``, primary timestep first.
        """
        module = network_of(module)
        if self._found is None:
            self.prepare(module)
        m = self.measure_check(module, rows, checks=len(self.history))
        return m.samples, m.results

    def offline_check(self, module: nn.Module) -> Draft:
        """One check of ``module`` outside a run (``memwatch scan``): all probes drawn and
        measured, every signal's values and readings, no decision, clean weights or logging. Call
        :meth:`prepare` first and run it under :func:`memwatch.probes.isolated`."""
        run = Run(module, self._found, tuple(self.sample_shape or ()), raise_errors=self.report.raise_errors)
        measurement = self.measure_check(module, checks=len(self.history))
        return self._contributions(run, measurement, measure_all(self.signals, run, measurement, self._scoring(module)))

    def _training_samples(self) -> Tensor:
        """The training side of a comparison ``[m, *shape]``: the reference tensor, or the samples held."""
        if self.reference is not None:
            return self.reference
        assert self.held_samples is not None
        return self.held_samples.samples

    @property
    def _reads_reservoir(self) -> bool:
        """Whether a signal reads the training samples' reservoir at every check."""
        return any(signal.reads_reservoir for signal in self.signals.values())

    @property
    def _holding(self) -> bool:
        """Whether training samples are still wanted (calibration or the data LID pending, or copies of the batches)."""
        return self.copies_from_batches or self.pending

    def _uses(self) -> str:
        """The settings that read the training batches, for messages."""
        uses = {
            'sigmas="auto"': self.calibrating,
            "the LID signal's data LID": True,
            'reference_data="batches"': self.copies_from_batches,
        }
        return " and ".join(name for name, on in uses.items() if on)


# ---------------------------------------------------------------------- module-level helpers
