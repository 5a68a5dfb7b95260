"""``MemorizationMonitor``: a Lightning callback that watches a diffusion model memorize.

Every ``every_n_train_steps`` steps (a *check*) it draws the same probes from the model under
training (:class:`memwatch.probes.ProbeSet`: fixed seeds, the model's own sampler), measures the
sharpness of the learned density at them, syncs torchmetrics metrics over ranks, runs the onset
detector, keeps the last clean checkpoint, can stop training at onset, and hands the finished
check to :class:`memwatch.reporting.CheckReporter`. It holds no math and draws nothing: it
orchestrates the hooks, the cadence, the agreement of DDP ranks, the decision and its state.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from einops import rearrange
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from memwatch import defaults
from memwatch.attribution import CopiedItem, copied_items
from memwatch.calibration import DataScale, Reservoir, data_scale, level_range, relative_sigmas
from memwatch.checkpoint import CLEAN_CHECKPOINT_NAME, check_save_mode, prepare_dirpath, save_clean_checkpoint
from memwatch.conditional import check_first_steps, condition_keys, default_max_batch, parse_conditions
from memwatch.copies import distinct, nearest_candidates, ratio_from_candidates
from memwatch.discovery import (
    ScoreFn,
    batch_range,
    batch_sample_shape,
    check_reference_data,
    check_score,
    find_score,
    measured_score,
    sample_shape_of,
)
from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.loggers import MonitorLogger
from memwatch.lossgap import LossGap, relative_gap
from memwatch.metrics import ConditionalMetrics, MemorizationMetrics
from memwatch.onset import OnsetDecision, OnsetDetector
from memwatch.probes import CONDITION_METRICS, ProbeMeasurement, ProbeSet, evaluation_timesteps, isolated, shard
from memwatch.reporting import CheckReporter, CheckResult, format_timestep
from memwatch.sampling import ProbeSampler
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import DENSE_MAX_DIM, SharpnessOptions, SharpnessResult

__all__ = ["MemorizationMonitor", "CheckResult", "find_score"]

_ONSET_VALUES = {"sharpness": "memorized_fraction", "copies": "nn_memorized_fraction", "either": "flagged_fraction"}
_PROGRESS_AFTER_S = 5.0  # a check longer than this prints a line per stage (with verbose)
_RANGE_BATCHES = 8  # training batches whose value range bounds the probes (without `data_range`)


class MemorizationMonitor(Callback):
    r"""Detect memorization while a diffusion model trains, from the sharpness of its density.

    At each check, for every evaluation timestep ``t``: a probe is *memorized* when its score
    (sharp fraction, the share of Hessian eigenvalues with ``σ_t² λ < -threshold``) exceeds
    ``score_threshold``; ``memwatch/memorized_fraction`` is the share of such probes at the first
    (primary) timestep, and onset is declared when it exceeds ``onset_threshold`` (and/or the
    baseline of the first checks by ``onset_min_delta``) for ``patience`` checks in a row.
    With training samples to compare against (``reference_data``, or ``"batches"``: those the
    monitor sees), onset may also be decided on copies (``onset_on``).

    Logged under ``memwatch/`` (scalars always; histograms, spectrum and curve plots, per-probe
    table always — they hold no training data): ``sharp_fraction_mean``, ``lid_mean``,
    ``lambda_min``, ``normalized_eig_mean``, ``memorized_fraction``, ``onset``, and with
    ``reference_data`` ``nn_memorized_fraction``, ``auroc`` and ``flagged_fraction``; the same
    per timestep as ``memwatch/t{t}/…``; with ``heldout_data`` ``loss_train``, ``loss_heldout``
    and ``loss_gap``. Images of probes and their nearest training samples are logged only
    with ``log_media=True`` (a memorized probe *is* a copy of training data).

    Args:
        score_fn: ``pl_module -> DiffusionScore``. Default: the module's ``memwatch_score()``
            method, else a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` + scheduler found
            on the module (a ``torch.compile``d network is measured through ``_orig_mod``, the
            same weights); see :func:`memwatch.discovery.find_score`. Found at fit start.
        every_n_train_steps: check cadence in optimizer steps (``None``: only per epoch).
        every_n_epochs: also/instead check at the end of every n-th training epoch.
        num_probes: probes per check (sharded across DDP ranks).
        sampler_steps: DDIM steps per probe.
        sigmas: evaluation noise levels. Default ``"auto"``: the levels are ``sigma_factors`` ×
            the median nearest-neighbour distance of the training samples seen in the batches
            before the first check (up to ``calibration_capacity``, through ``encode_fn`` when
            given; held in memory only, never logged or saved; see :mod:`memwatch.calibration`),
            clamped inside the schedule, fixed at the first check and kept on resume. So the
            same data in [-1, 1], [0, 1], × 3 or as standardized latents are measured at the
            same scale relative to their spacing; with the thresholds below this is the
            validation study's choice on its selection seed (``docs/validation.md``). The
            batches must then hold samples in the probes' space (else the first batch fails,
            naming both shapes). Or σ_t values (data units, each converted to the schedule's
            nearest timestep; outside the schedule's range fails at fit start), e.g.
            ``(0.3,)``, the former default for data in about [-1, 1]. The first level is the
            primary one. Ignored when ``timesteps`` is given.
        timesteps: evaluation timesteps in schedule units.
        k: most negative eigenvalues reported per probe.
        threshold: ``τ``; a direction is sharp when ``σ_t² λ < -τ``.
        score_threshold: a probe counts as memorized when its score exceeds this.
        method, num_iters, num_vectors, max_batch: passed to :func:`memwatch.measure_sharpness`.
            ``"auto"`` takes the exact dense spectrum up to d = 384 and, above (image scale), the
            cheap trace tier (LID / FLIPD from ``num_vectors`` reverse-mode products per probe) at
            every check plus the Lanczos spectrum every ``spectrum_every_n_checks``-th check
            (the spectrum panel and ``lambda_min`` update then; NaN in between).
        onset_threshold, onset_min_delta, patience, min_steps, baseline_checks: the
            :class:`memwatch.onset.OnsetDetector` rule on the ``onset_on`` share: onset when
            more than ``onset_threshold`` of the probes are memorized ``patience`` checks in a row.
        onset_on: which share of the probes the onset rule watches: ``"sharpness"`` (default,
            ``memorized_fraction``), ``"copies"`` (``nn_memorized_fraction``: probes whose
            ``d₁/d₂ < 1/3`` to the training samples) or ``"either"`` (``flagged_fraction``: sharp
            or a copy). ``"copies"`` and ``"either"`` need ``reference_data``.
        stop_on_onset: set ``trainer.should_stop`` at onset (one decision for all ranks).
        save_clean_checkpoint: save ``memwatch-clean.ckpt`` at every clean check (overwritten
            atomically: a crash or kill mid-save keeps the previous one), so the last one before
            onset survives; see ``clean_checkpoint_path``. A failed save is a warning.
        dirpath: where that checkpoint goes; default: the run's own versioned log folder
            (``<save_dir>/<name>/version_N/memwatch``, ``<save_dir>/<project>/<run id>/memwatch``
            for W&B), never shared between runs. Checked (created, writable) at ``setup``.
        clean_checkpoint_mode: ``"weights"`` (default: the module's weights, EMA copies held by
            the module included — a third of a full checkpoint with Adam; load it with
            ``YourModule.load_from_checkpoint``) or ``"full"`` (resumable: optimizer, loops,
            callbacks).
        reference_data: training samples ``[N, *shape]`` (or an iterable of batches) for the
            nearest-neighbour ground truth (``nn_memorized_fraction``, ``auroc``,
            ``flagged_fraction``), or ``"batches"``: the training samples the monitor sees in the
            batches, up to ``calibration_capacity`` distinct ones per rank (a sample of them
            beyond), held in memory only and never logged or saved; exact over DDP ranks and
            across repeats, also for images the data set itself holds twice (see
            :mod:`memwatch.copies`); refilled from the batches after a resume. Costs a copy of
            each batch to the CPU per step.
        heldout_data: samples of the training distribution the model never trains on
            ``[M, *shape]`` (or an iterable of batches; through ``encode_fn`` like
            ``reference_data``): each check then also logs the baseline a careful user watches,
            the denoising loss at ``loss_gap_sigmas`` with fixed noises on ``LOSS_GAP_SIZE`` (256)
            of them (``loss_heldout``) and of the training samples (``loss_train``: from
            ``reference_data``, which it needs — a tensor, or ``"batches"``: those held at the
            first check) and their relative gap ``loss_gap`` (see :mod:`memwatch.lossgap`). Side
            by side only: the onset never reads it.
        loss_gap_sigmas: noise levels σ_t of the loss gap (the validation study's timesteps).
        reference_ids: ids of the ``reference_data`` items (a list, or a Dataset returning
            ``(data, id)`` / ``{"id": …}``), shown in the attribution table (``copied_items``:
            which training items the probes copy; indices and counts only, never pixels).
        sample_shape: probe shape; default: inferred from the first training batch.
        batch_key: key of the data in dict batches (else the batch's first tensor).
        ema_attr: name of an EMA of the network on the module to measure instead: an
            ``nn.Module`` copy (``AveragedModel`` and wrappers with ``.module`` too) or a diffusers
            ``EMAModel`` (its shadow weights are measured on a fresh copy; training untouched).
        seed: seed of the probes' start noise and of the Lanczos start vectors.
        log_figures: draw and log the per-check spectrum / curve / condition plots and the probe
            table (a few tens of ms per check); scalars and histograms are logged regardless.
        log_media: also log probe images / nearest-neighbour galleries (privacy: off by default).
        raise_errors: re-raise errors of a check instead of warning (default: training never
            crashes because of memwatch).
        verbose: print a line when a check starts and one with its result (rank zero).
        conditions: for a conditional (classifier-free-guidance) model, the conditions to watch,
            e.g. ``torch.arange(10)`` for all class labels: a tensor ``[C, ...]`` (one row per
            condition) or a sequence of int labels / tensors. Each check then also draws
            ``num_probes`` probes per condition (the same seeds for every condition) and logs
            ``memwatch/cond/{c}/hessian_score_diff`` (Jeon et al.'s ``‖H_c s_Δ − H_uc s_Δ‖``),
            ``…/score_diff`` (Wen et al.'s ``‖s_Δ‖``), ``…/sharp_fraction_mean`` (of ``p(x | c)`` at
            the primary timestep), ``memwatch/most_memorized_condition`` (the condition with the
            highest Hessian-weighted score difference, i.e. the one that memorizes first) and a
            ``conditions`` table and bar chart; see :mod:`memwatch.conditional`. ``{c}`` is the
            label for int conditions, else the condition's index.
        condition_first_steps: the metrics above are averaged over this many leading (noisiest)
            sampler steps; default :func:`memwatch.conditional.default_first_steps`.
        min_valid_fraction: a check whose share of probes with finite values is below this
            (in ``(0, 1]``) is a failed check: its metrics are NaN, it is not clean and it does not
            move the onset streak.
        decode_fn: latents ``[n, *shape]`` → images ``[n, C, H, W]`` for galleries (e.g. a VAE's
            decode); without it galleries show probes that are images and skip others with a
            warning.
        encode_fn: images → latents (e.g. a VAE's encode), applied to pixel ``reference_data``
            and to training batches whose samples do not already have the probes' shape (those
            that calibrate ``sigmas="auto"`` or feed ``reference_data="batches"``; only the rows
            kept are encoded), so all live where the probes do.
        sampler: a :class:`memwatch.sampling.ProbeSampler` drawing the probes; default
            :func:`memwatch.sample_trajectory`, which steps the model's own diffusers scheduler
            (clipping, thresholding, spacing) when the schedule came from one.
        data_range: ``(low, high)`` of the data; probes beyond it by more than half its width
            are counted (``out_of_range_count``) and warned about. Default: the scheduler's
            clipping range, else the range of the first training batches.
        spectrum_every_n_checks: see ``method``.
        sigma_factors: see ``sigmas="auto"``.
        calibration_capacity: most training samples held in memory per rank, for
            ``sigmas="auto"`` (until the first check) and ``reference_data="batches"`` (the whole
            run): ``capacity × d × 4`` bytes on the CPU.

    Raises:
        ValueError: an argument is out of range (the message names it).

    Example:
        >>> monitor = MemorizationMonitor(every_n_train_steps=200, num_probes=16, stop_on_onset=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=2000)  # doctest: +SKIP
    """

    def __init__(  # flat keyword arguments, as LightningCLI / YAML users write them (one line each)
        self,
        score_fn: ScoreFn | None = None,
        every_n_train_steps: int | None = defaults.EVERY_N_TRAIN_STEPS,
        every_n_epochs: int | None = None,
        num_probes: int = defaults.NUM_PROBES,
        sampler_steps: int = defaults.SAMPLER_STEPS,
        sigmas: Sequence[float] | str = defaults.SIGMAS,
        timesteps: Sequence[float] | None = None,
        k: int = defaults.SHARPNESS.k,
        threshold: float = defaults.SHARPNESS.threshold,
        score_threshold: float = defaults.SCORE_THRESHOLD,
        method: str = defaults.SHARPNESS.method,
        num_iters: int = defaults.SHARPNESS.num_iters,
        num_vectors: int = defaults.SHARPNESS.num_vectors,
        max_batch: int | None = defaults.SHARPNESS.max_batch,
        onset_threshold: float | None = defaults.ONSET_THRESHOLD,
        onset_on: str = defaults.ONSET_ON,
        onset_min_delta: float | None = None,
        patience: int = defaults.PATIENCE,
        min_steps: int = 0,
        baseline_checks: int = 3,
        stop_on_onset: bool = False,
        save_clean_checkpoint: bool = True,
        dirpath: str | Path | None = None,
        clean_checkpoint_mode: str = "weights",
        reference_data: Tensor | Any | str | None = None,
        reference_ids: Sequence[Any] | None = None,
        heldout_data: Tensor | Any | None = None,
        loss_gap_sigmas: Sequence[float] = defaults.LOSS_GAP_SIGMAS,
        sample_shape: Sequence[int] | None = None,
        batch_key: str | None = None,
        ema_attr: str | None = None,
        seed: int = 0,
        log_figures: bool = True,
        log_media: bool = False,
        raise_errors: bool = False,
        verbose: bool = True,
        conditions: Tensor | Sequence[Any] | Mapping[str, Any] | None = None,
        condition_first_steps: int | None = None,
        min_valid_fraction: float = defaults.MIN_VALID_FRACTION,
        decode_fn: Callable[[Tensor], Tensor] | None = None,
        encode_fn: Callable[[Tensor], Tensor] | None = None,
        sampler: ProbeSampler | None = None,
        data_range: tuple[float, float] | None = None,
        spectrum_every_n_checks: int = defaults.SPECTRUM_EVERY_N_CHECKS,
        sigma_factors: Sequence[float] = defaults.SIGMA_FACTORS,
        calibration_capacity: int = defaults.CALIBRATION_CAPACITY,
    ) -> None:
        super().__init__()
        _check_cadence("every_n_train_steps", every_n_train_steps)
        _check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise MemwatchError("set `every_n_train_steps` or `every_n_epochs`; both are None")
        _check_int("num_probes", num_probes, 1)
        _check_int("sampler_steps", sampler_steps, 2)
        _check_fraction("score_threshold", score_threshold)
        _check_fraction("min_valid_fraction", min_valid_fraction, low_open=True, high_closed=True)
        if onset_threshold is not None:
            _check_fraction("onset_threshold", onset_threshold)
        batches = isinstance(reference_data, str)
        if batches and reference_data != "batches":
            raise MemwatchError(
                f'`reference_data` must be training samples, an iterable of batches, "batches" or None, '
                f"got {reference_data!r}"
            )
        if onset_on not in _ONSET_VALUES:
            raise MemwatchError(f"`onset_on` must be one of {sorted(_ONSET_VALUES)}, got {onset_on!r}")
        if onset_on != "sharpness" and reference_data is None:
            raise MemwatchError(
                f"`onset_on`={onset_on!r} needs training samples to compare the probes with: pass "
                '`reference_data` (a tensor, or "batches" for those the monitor sees)'
            )
        if batches and reference_ids is not None:
            raise MemwatchError(
                '`reference_ids` name the items of a `reference_data` tensor; with reference_data="batches" the '
                "monitor holds a changing sample of the batches and has no ids: pass `reference_data` as a tensor"
            )
        if heldout_data is not None and reference_data is None:
            raise MemwatchError(
                "`heldout_data` is one side of the loss gap; the other is training samples: pass `reference_data` "
                '(a tensor, or "batches" for those the monitor sees)'
            )
        self.loss_gap_sigmas = _check_levels("loss_gap_sigmas", loss_gap_sigmas)
        if sigmas == "auto" or batches:
            _check_int("calibration_capacity", calibration_capacity, 2)
        if sigmas == "auto":
            self.sigmas: tuple[float, ...] | str = "auto"
        elif timesteps is None:
            self.sigmas = _check_levels("sigmas", sigmas)
        else:  # ignored: the timesteps win
            self.sigmas = tuple(float(s) for s in sigmas)
        self.sigma_factors = _check_levels("sigma_factors", sigma_factors)
        _check_int("spectrum_every_n_checks", spectrum_every_n_checks, 1)
        self.spectrum_every_n_checks = spectrum_every_n_checks
        self.calibration_capacity = calibration_capacity
        self.timesteps = None if timesteps is None else _check_levels("timesteps", timesteps, positive=False)
        # the settings objects validate their own arguments (k, method, patience, …)
        self.options = SharpnessOptions(
            k=k, threshold=threshold, method=method, num_iters=num_iters, num_vectors=num_vectors, max_batch=max_batch
        )
        self._check_options = self.options  # resolved for the sample dimension once it is known
        self._tiered = False  # image scale: the trace tier at every check, the spectrum every n-th
        self.detector = OnsetDetector(
            threshold=onset_threshold,
            min_delta=onset_min_delta,
            baseline_checks=baseline_checks,
            patience=patience,
            min_steps=min_steps,
            monitor=_ONSET_VALUES[onset_on],
        )
        self.onset_on = onset_on
        if sample_shape is not None and (len(sample_shape) == 0 or any(int(s) < 1 for s in sample_shape)):
            raise MemwatchError(f"`sample_shape` must be a non-empty shape of positive sizes, got {sample_shape!r}")
        self.score_fn = score_fn
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.num_probes = num_probes
        self.sampler_steps = sampler_steps
        self.score_threshold = score_threshold
        self.min_valid_fraction = min_valid_fraction
        self.stop_on_onset = stop_on_onset
        self.save_clean_checkpoint = save_clean_checkpoint
        self.dirpath = dirpath
        self.clean_checkpoint_mode = check_save_mode(clean_checkpoint_mode, name="clean_checkpoint_mode")
        self.reference_data = reference_data
        self.reference_ids = reference_ids
        self.heldout_data = heldout_data
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.batch_key = batch_key
        self.ema_attr = ema_attr
        self.seed = seed
        self.log_figures = log_figures
        self.log_media = log_media
        self.raise_errors = raise_errors
        self.verbose = verbose
        self.decode_fn = decode_fn
        self.encode_fn = encode_fn
        self.sampler = sampler
        self.data_range = _check_range(data_range)
        self.condition_first_steps = condition_first_steps
        check_first_steps(
            condition_first_steps, sampler_steps, name="condition_first_steps", steps_name="sampler_steps"
        )
        self.conditions = conditions
        self._conditions = parse_conditions(conditions)

        self._init_state()

    def _init_state(self) -> None:
        """What the monitor learns while it runs: results, decisions and the caches of a fit."""
        self.clean_checkpoint_path: Path | None = None
        self.clean_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_check: CheckResult | None = None
        self._eval_timesteps: list[float] = []
        self._metrics: dict[float, MemorizationMetrics] = {}
        self._condition_metrics = ConditionalMetrics(ranking_metric=CONDITION_METRICS.index("hessian_score_diff"))
        self._reporter: CheckReporter | None = None
        self._reference: Tensor | None = None
        self._heldout: Tensor | None = None  # heldout_data in the probes' space, once the probe shape is known
        self._loss_gap: LossGap | None = None  # built at the first check (training samples known then)
        self._loss_gap_times: list[float] = []
        self._found: DiffusionScore | None = None
        self._reservoir = (
            Reservoir(self.calibration_capacity, seed=self.seed, distinct=True) if self._holds_samples else None
        )
        self.calibrated_sigmas: tuple[float, ...] | None = None  # with sigmas="auto", fixed at the first check
        self.data_scale: DataScale | None = None
        self._probes: ProbeSet | None = None
        self._clean_dir: Path | None = None
        self._seen_range: tuple[float, float] | None = None  # of the first training batches
        self._range_batches = 0
        self._last_checked_step = -1
        self._state_key: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names): built once, not per step
        if self._state_key is None:
            # two monitors that differ in what they measure can watch one run; the default method
            # adds nothing, so the checkpoints of earlier versions keep their key
            method = {} if self.options.method == "auto" else {"method": self.options.method}
            self._state_key = self._generate_state_key(
                num_probes=self.num_probes,
                sigmas=self.sigmas,
                timesteps=self.timesteps,
                seed=self.seed,
                conditions=tuple(self._conditions),
                **method,
            )
        return self._state_key

    @property
    def onset_step(self) -> int | None:
        """Global step of the check at which onset was declared (``None`` before)."""
        return self.detector.onset_step

    @property
    def reference(self) -> Tensor | None:
        """``reference_data`` as checked at fit start (or :meth:`prepare`): ``[N, *shape]`` in the
        probes' space (through ``encode_fn``), on the module's device; ``None`` without a tensor
        ``reference_data`` (``"batches"`` included)."""
        return self._reference

    @property
    def probes(self) -> ProbeSet:
        """The monitor's probes: the same start noise, sampler and measurement at every check
        (known once the probe shape is: after fit start or the first training batch).

        Raises:
            MemwatchError: the probe shape is still unknown (pass ``sample_shape=``).
        """
        if self.sample_shape is None:
            raise MemwatchError("memwatch could not infer the probe shape; pass `sample_shape=`")
        if self._probes is None or self._probes.timesteps != self._eval_timesteps:
            self._probes = ProbeSet(
                self.sample_shape, self.num_probes, self.sampler_steps, self._eval_timesteps, self.seed, self.sampler
            )
        return self._probes

    def on_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: CheckResult) -> None:
        """Called on every rank after each check has been logged; override to use its per-probe
        results (also kept as :attr:`last_check`). The default does nothing."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        logger = MonitorLogger.from_trainer(trainer, log_media=self.log_media)
        self._reporter = CheckReporter(
            logger,
            threshold=self.options.threshold,
            log_figures=self.log_figures,
            log_media=self.log_media,
            decode_fn=self.decode_fn,
            verbose=self.verbose,
            raise_errors=self.raise_errors,
        )
        if self.save_clean_checkpoint:  # a bad dirpath fails here, on every rank alike
            self._clean_dir = prepare_dirpath(trainer, self.dirpath)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model` and the move to the device: the network exists and is in place
        self.prepare(pl_module)

    def prepare(self, pl_module: pl.LightningModule) -> None:
        """Find the module's score, the evaluation timesteps and (when known) the probe shape, and
        validate them: what fit start does, callable without a Trainer (``memwatch scan``).

        Raises:
            MemwatchError: no score is found, or a setting does not fit the model.
        """
        self._found = find_score(pl_module, self.score_fn, ema_attr=self.ema_attr)
        if self.conditions is not None:  # now that the null condition's shape is known
            self._conditions = parse_conditions(self.conditions, null_cond_shape=self._found.cond_shape)
        if not self.calibrating or self.calibrated_sigmas is not None:
            self._set_levels(self._found)
        if self.heldout_data is not None:  # a σ outside the schedule fails here, not at every check
            self._loss_gap_times = evaluation_timesteps(
                self._found.schedule, self.loss_gap_sigmas, name="loss_gap_sigmas"
            )
        if self.sample_shape is None:
            self.sample_shape = sample_shape_of(self._found)
        if self.sample_shape is not None:
            self._validate(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.sample_shape is None:
            self.sample_shape = batch_sample_shape(batch, self.batch_key)
            self._validate(pl_module)
        if self.data_range is None and self._range_batches < _RANGE_BATCHES:
            self._seen_range = batch_range(batch, self.batch_key, self._seen_range)
            self._range_batches += 1
        if self._reservoir is not None:
            first = self._reservoir.shape is None
            data = self._batch_data(batch)
            # batches of latents are taken as they are; others (pixels) go through encode_fn, kept rows only
            in_space = self.sample_shape is not None and tuple(data.shape[1:]) == tuple(self.sample_shape)
            if first and in_space and self.encode_fn is not None:
                rank_zero_warn(
                    f"memwatch: the training batches already hold samples of the probes' shape "
                    f"{tuple(self.sample_shape)}, so they are taken as latents and `encode_fn` is not applied to them "
                    "(it still encodes `reference_data` and `heldout_data`)",
                    category=UserWarning,
                )
            self._reservoir.update(data, transform=None if in_space else self._encode)
            if first and self._reservoir.shape is not None:  # the samples must live where the probes do
                self._check_batch_shape(self._reservoir.shape)

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
            "calibrated_sigmas": self.calibrated_sigmas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.clean_step = state_dict["clean_step"]
        path = state_dict["clean_checkpoint_path"]
        self.clean_checkpoint_path = None if path is None else Path(path)
        self.history = list(state_dict["history"])
        self._last_checked_step = state_dict["last_checked_step"]
        sigmas = state_dict.get("calibrated_sigmas")
        if sigmas is not None:  # a resumed run keeps its noise levels (training samples were never saved)
            self.calibrated_sigmas = tuple(sigmas)
            if not self.copies_from_batches:
                self._reservoir = None

    # ------------------------------------------------------------------ the check
    def _run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_checked_step = step = trainer.global_step
        if self.detector.memorizing and self.stop_on_onset:
            return
        assert self._reporter is not None
        self._reporter.start_line(step, self.num_probes, len(self._eval_timesteps) or len(self.sigma_factors))
        started = time.perf_counter()
        measurement, error, losses = None, None, None
        try:
            if self.calibrating and self.calibrated_sigmas is None:
                self._calibrate(trainer)  # the same outcome on every rank (rank zero's)
            # found again at every check (a `score_fn` may build it from the current module), and
            # before the isolation, which freezes the parameters discovery tells networks apart by
            self._found = find_score(pl_module, self.score_fn, ema_attr=self.ema_attr)
            with isolated(pl_module):
                measurement = self._measure(trainer, pl_module, self._progress(step, started))
                losses = self._losses(pl_module) if self.heldout_data is not None else None
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.raise_errors and trainer.world_size == 1:
                raise
            error = err
        if not self._all_ranks_measured(trainer, error):
            return
        assert measurement is not None
        if self.copies_from_batches:
            measurement = self._with_batch_copies(trainer, measurement, pl_module.device)
        values, conditions, top = self._sync(measurement, pl_module.device)
        if losses is not None:
            values.update(_loss_values(*losses, pl_module.device))
        copied = self._copied(measurement, pl_module.device)
        values["check_seconds"] = time.perf_counter() - started
        decision = self.detector.update(step, values[self.detector.monitor])
        if decision.clean and self.save_clean_checkpoint:
            self._save_clean_checkpoint(trainer)
        should_stop, _ = self._should_stop(decision)
        if self.stop_on_onset:  # a collective on every rank at every check: one decision for all
            if trainer.strategy.reduce_boolean_decision(should_stop, all=False):
                trainer.should_stop = True
        values["onset"] = float(decision.memorizing)
        if self.clean_step is not None:
            values["clean_step"] = float(self.clean_step)
        self.history.append(dict(values, step=float(step)))
        for name, value in values.items():  # what EarlyStopping / ModelCheckpoint read
            trainer.callback_metrics[f"memwatch/{name}"] = torch.tensor(value)
        check = CheckResult(
            step,
            values,
            measurement.results,
            measurement.samples,
            measurement.nn_ratio,
            decision,
            nearest=measurement.nearest,
            conditions=conditions,
            most_memorized_condition=top,
            copied=copied,
            spectrum=measurement.spectrum,
            hessian_score_norm=measurement.hessian_score_norm,
        )
        clean = None if self.clean_checkpoint_path is None else str(self.clean_checkpoint_path)
        self._reporter.publish(
            check, self.history, onset_step=self.onset_step, clean_checkpoint=clean, reference=self._reference
        )
        self.last_check = check
        self.on_check_end(trainer, pl_module, check)

    def _should_stop(self, decision: OnsetDecision) -> tuple[bool, str]:
        """Pure stop rule: stop at onset when ``stop_on_onset``; the reason for the log."""
        if decision.onset and self.stop_on_onset:
            return True, f"memwatch stops training: {decision.reason}"
        return False, decision.reason

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, progress: Callable[[str], None] | None = None
    ) -> ProbeMeasurement:
        """This rank's share of the probes, measured; no collective here."""
        rows = shard(self.num_probes, trainer.world_size, trainer.global_rank)
        return self.measure_check(pl_module, rows=rows, progress=progress)

    def _progress(self, step: int, started: float) -> Callable[[str], None]:
        """Progress lines for checks that run longer than a few seconds (with ``verbose``)."""

        def report(text: str) -> None:
            elapsed = time.perf_counter() - started
            if self._reporter is not None and elapsed > _PROGRESS_AFTER_S:
                self._reporter.progress_line(step, f"{text}, {elapsed:.0f}s")

        return report

    def measure_check(
        self,
        pl_module: pl.LightningModule,
        rows: slice = slice(None),
        progress: Callable[[str], None] | None = None,
    ) -> ProbeMeasurement:
        """Draw the probes ``rows`` from the module's current weights (the EMA's, if watched) and
        measure them as a check does — without metrics, decisions or logging. Call
        :meth:`prepare` first (fit start does) and run it under :func:`memwatch.probes.isolated`.

        Raises:
            MemwatchError: the monitor is not prepared, or the probe shape is unknown.
        """
        if self._found is None:
            raise MemwatchError("call `prepare(pl_module)` (or fit) before measuring")
        spectrum = self._tiered and len(self.history) % self.spectrum_every_n_checks == 0
        with measured_score(self._found, pl_module, self.ema_attr) as score:
            return self.probes.measure(
                score,
                options=self._check_options,
                spectrum_options=self._check_options.replace(method="lanczos") if spectrum else None,
                rows=rows,
                device=pl_module.device,
                reference=self._reference,
                conditions=self._conditions,
                condition_first_steps=self.condition_first_steps,
                data_range=self.data_range or self._seen_range,
                progress=progress,
            )

    def check_values(self, measurement: ProbeMeasurement, device: torch.device | str) -> dict[str, float]:
        """The scalars a check logs for ``measurement`` (synced over DDP ranks when they run), without
        ``onset``, ``clean_step`` and ``check_seconds``."""
        return self._sync(measurement, torch.device(device))[0]

    def _all_ranks_measured(self, trainer: pl.Trainer, error: Exception | None) -> bool:
        """Every rank learns whether every rank measured before any metric is synced: a rank that
        failed alone would otherwise leave the others waiting in the sync forever."""
        if trainer.strategy.reduce_boolean_decision(error is None, all=True):
            return True
        where = f"rank {trainer.global_rank}" if error is not None else "another rank"
        msg = f"memwatch: the check at step {trainer.global_step} failed on {where} and was skipped"
        if self.raise_errors:
            raise RuntimeError(msg) from error
        if error is not None:
            warnings.warn(f"{msg}: {error!r}", RuntimeWarning, stacklevel=3)
        return False

    def _sync(
        self, measurement: ProbeMeasurement, device: torch.device
    ) -> tuple[dict[str, float], dict[str, dict[str, float]], str | None]:
        """The check's scalars from every rank's probes (torchmetrics syncs them under DDP), the
        per-condition means and the most memorized condition."""
        values: dict[str, float] = {}
        for t, res in measurement.results.items():
            spectrum = measurement.spectrum if t == self._eval_timesteps[0] else None
            computed = self._metric_values(self._metrics[t], res, measurement.nn_ratio, spectrum, device)
            computed = self._valid_or_nan(t, computed)
            values.update({f"t{format_timestep(t)}/{name}": v for name, v in computed.items()})
            if t == self._eval_timesteps[0]:
                values.update(computed)
        if measurement.out_of_range is not None:
            values["out_of_range_count"] = self._out_of_range_count(measurement, device)
        if measurement.hessian_score_norm is not None:
            values["hessian_score_norm_mean"] = _synced_mean(measurement.hessian_score_norm, device)
        conditions: dict[str, dict[str, float]] = {}
        top = None
        if measurement.conditional is not None:
            conditions, top = self._condition_values(measurement.conditional, device)
            keys = condition_keys(conditions)
            for name, metrics in conditions.items():
                values.update({f"cond/{keys[name]}/{m}": v for m, v in metrics.items()})
            values["most_memorized_condition"] = _condition_number(list(conditions), top)
        return values, conditions, top

    def _metric_values(
        self,
        metric: MemorizationMetrics,
        res: SharpnessResult,
        nn_ratio: Tensor | None,
        spectrum: SharpnessResult | None,
        device: torch.device,
    ) -> dict[str, float]:
        """The synced summary of one timestep's results; the eigenvalue summaries come from the
        spectrum when the trace tier measured none (NaN at checks without a spectrum)."""
        eig = res if res.method != "trace" else spectrum
        metric = metric.to(device)
        metric.reset()
        metric.update(
            res.sharp_fraction.to(device),
            res.lid.to(device),
            None if eig is None else eig.eigenvalues[:, 0].to(device),
            None if eig is None else eig.normalized.mean(1).to(device),
            res.memorization_score.to(device),
            None if nn_ratio is None else nn_ratio.to(device),
        )
        return {name: float(v) for name, v in metric.compute().items()}

    def _valid_or_nan(self, t: float, values: dict[str, float]) -> dict[str, float]:
        """A check that lost too many probes is a failed measurement: every value but the count
        of non-finite probes becomes NaN (the detector then neither counts it clean nor moves its
        streak), with a warning."""
        bad = int(values["nonfinite_count"])
        if self.num_probes - bad >= self.min_valid_fraction * self.num_probes:
            return values
        rank_zero_warn(
            f"memwatch: only {self.num_probes - bad} of {self.num_probes} probes gave finite values at "
            f"t={format_timestep(t)} (below min_valid_fraction={self.min_valid_fraction:g}); the check's metrics "
            "are NaN and it counts neither as clean nor toward onset"
        )
        return {name: (v if name == "nonfinite_count" else math.nan) for name, v in values.items()}

    def _copied(self, measurement: ProbeMeasurement, device: torch.device) -> list[CopiedItem]:
        """The training items that every rank's probes copy, most copied first (with reference data)."""
        if measurement.nearest is None or measurement.nn_ratio is None or self._reference is None:
            return []
        flagged = measurement.primary.memorization_score > self.score_threshold
        nearest, ratio, flagged = (
            _gathered(v.to(device)) for v in (measurement.nearest, measurement.nn_ratio.double(), flagged)
        )
        return copied_items(nearest, ratio, flagged, num_items=len(self._reference), ids=self.reference_ids)

    @property
    def most_copied(self) -> list[CopiedItem]:
        """The training items the last check's probes copied, most copied first (needs
        ``reference_data``): index, id, copies (probes with d₁/d₂ < 1/3 to it), flagged copies."""
        return [] if self.last_check is None else [c for c in self.last_check.copied if c.copies]

    def _out_of_range_count(self, measurement: ProbeMeasurement, device: torch.device) -> float:
        """Probes (over every rank) that left the data range by far, with a warning when any did."""
        from torchmetrics.aggregation import SumMetric

        total = SumMetric().to(device)  # synced over ranks on compute
        total.update(measurement.out_of_range.double().sum().to(device))
        count = float(total.compute())
        if count:
            lo, hi = measurement.data_range or (math.nan, math.nan)
            rank_zero_warn(
                f"memwatch: {int(count)} of {self.num_probes} probes left the data range [{lo:g}, {hi:g}] by more than "
                "half its width: the probe sampler may be diverging (a sampler that does not step like the model's "
                "own pipeline, e.g. without its clipping?); pass `sampler=` or check the schedule"
            )
        return count

    def _condition_values(
        self, per_condition: dict[str, dict[str, Tensor]], device: torch.device
    ) -> tuple[dict[str, dict[str, float]], str | None]:
        """Per-condition means over every rank's probes and the most memorized condition."""
        names = list(per_condition)
        per_probe = torch.stack(
            [torch.stack([per_condition[c][m].to(torch.float64) for m in CONDITION_METRICS], 1) for c in names], 1
        )  # [r, C, M]
        metric = self._condition_metrics.to(device)
        metric.reset()
        metric.update(per_probe.to(device))
        means, top = metric.compute()
        table = {c: {m: float(means[i, j]) for j, m in enumerate(CONDITION_METRICS)} for i, c in enumerate(names)}
        return table, (names[int(top)] if int(top) >= 0 else None)

    def measure_probes(
        self, pl_module: pl.LightningModule, rows: slice = slice(None)
    ) -> tuple[Tensor, dict[float, SharpnessResult]]:
        """Draw this monitor's probes (``rows`` of them) from the module's current weights and
        measure them at every evaluation timestep: what a check measures, without metrics,
        decisions or logging. Put the module in eval mode first (a check does).

        Returns:
            ``(samples, results)``: the final samples ``[n, *shape]`` on the CPU, and
            ``{timestep: SharpnessResult}`` with the primary timestep first.

        Raises:
            MemwatchError: the probe shape is unknown (before the first training batch, without
                ``sample_shape``).
        """
        if self._found is None:
            self.prepare(pl_module)
        m = self.measure_check(pl_module, rows)
        return m.samples, m.results

    # ------------------------------------------------------------------ helpers
    def _validate(self, pl_module: pl.LightningModule) -> None:
        """Once the probe shape is known: the spectrum settings fit it, one dry call of the score
        (the EMA's, if watched) on it, and the reference data in its space. Configuration errors
        are raised whatever ``raise_errors`` says."""
        assert self.sample_shape is not None and self._found is not None
        self._check_shape(self.sample_shape, pl_module.device)
        with measured_score(self._found, pl_module, self.ema_attr) as score:
            check_score(score, self.sample_shape, device=pl_module.device)
            for cond in list(self._conditions.values())[:1]:
                check_score(score, self.sample_shape, device=pl_module.device, cond=cond)
        if self.heldout_data is not None:
            self._heldout = self._in_probe_space(self.heldout_data, "heldout_data", pl_module.device)
        if self.reference_data is not None and not self.copies_from_batches:
            self._reference = self._in_probe_space(self.reference_data, "reference_data", pl_module.device)

    def _in_probe_space(self, data: Any, name: str, device: torch.device) -> Tensor:
        """User data (``reference_data``, ``heldout_data``) checked and encoded into the probes' space."""
        assert self.sample_shape is not None
        return check_reference_data(
            data, self.sample_shape, self.encode_fn, batch_key=self.batch_key, device=device, name=name
        )

    @property
    def calibrating(self) -> bool:
        """Whether the noise levels come from the training data (``sigmas="auto"``, no ``timesteps``)."""
        return self.sigmas == "auto" and self.timesteps is None

    @property
    def copies_from_batches(self) -> bool:
        """Whether the probes are compared with the training samples seen (``reference_data="batches"``)."""
        return isinstance(self.reference_data, str) and self.reference_data == "batches"

    @property
    def _holds_samples(self) -> bool:
        return self.calibrating or self.copies_from_batches

    def _set_levels(self, score: DiffusionScore) -> None:
        """The evaluation timesteps (and their metrics) from ``sigmas`` / ``timesteps``, or from
        the calibrated levels."""
        sigmas = self.calibrated_sigmas if self.calibrating else self.sigmas
        self._eval_timesteps = evaluation_timesteps(score.schedule, sigmas, self.timesteps)
        self._check_timesteps_in_grid(score)
        self._metrics = {t: MemorizationMetrics(score_threshold=self.score_threshold) for t in self._eval_timesteps}

    def calibrate(self, samples: Tensor) -> tuple[float, ...]:
        """Fix the noise levels of ``sigmas="auto"`` from training samples ``[m, *shape]`` in the
        probes' space: ``sigma_factors`` × their median nearest-neighbour distance, clamped inside
        the schedule (:func:`memwatch.calibration.level_range`) and below the sampler's first
        step. A live run does this itself at its first check with the samples it saw; ``memwatch
        scan`` does it with the training data it is given. Call after :meth:`prepare` (or fit
        start).

        Returns:
            The calibrated σ_t, one per factor (also in :attr:`calibrated_sigmas`, and
            :attr:`data_scale` holds the distances).

        Raises:
            MemwatchError: the monitor does not calibrate (explicit ``sigmas`` or ``timesteps``),
                has not found its model yet, or the samples have fewer than two distinct rows.
        """
        if not self.calibrating:
            raise MemwatchError(
                f'calibrate() needs sigmas="auto" and no `timesteps`; this monitor has sigmas={self.sigmas!r}'
            )
        if self._found is None:
            raise MemwatchError("calibrate() needs the model: call prepare(pl_module) first (fit start does)")
        self._use_levels(*self._levels_for(samples))
        assert self.calibrated_sigmas is not None
        return self.calibrated_sigmas

    def _levels_for(self, samples: Tensor) -> tuple[DataScale, tuple[float, ...]]:
        """The training samples' scale and the noise levels :meth:`calibrate` fixes from them (no state changes)."""
        assert self._found is not None
        schedule = self._found.schedule
        floor, ceiling = level_range(schedule)
        first = float(schedule.sigma(self._first_sampler_timestep(schedule)))  # the probes start there
        scale = data_scale(samples, generator=torch.Generator().manual_seed(self.seed + 2))
        return scale, relative_sigmas(scale, schedule, self.sigma_factors, floor=floor, ceiling=min(ceiling, first))

    def _use_levels(self, scale: DataScale, sigmas: tuple[float, ...]) -> None:
        """Keep the calibrated scale and levels, and measure at them from now on."""
        assert self._found is not None
        self.data_scale, self.calibrated_sigmas = scale, sigmas
        self._set_levels(self._found)

    def _calibrate(self, trainer: pl.Trainer) -> None:
        """:meth:`calibrate` on the training samples seen so far (rank zero's reservoir, its result
        broadcast to all ranks), then free the reservoir: training samples are held in memory
        only, never written.

        Raises:
            MemwatchError: on every rank alike, when rank zero could not calibrate (e.g. fewer
                than two distinct training samples seen); the check is then skipped.
        """
        assert self._reservoir is not None and self._found is not None
        found, error = None, None
        if trainer.is_global_zero:
            try:
                found = self._levels_for(self._reservoir.samples)
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = f"{type(err).__name__}: {err}"
        found, error = trainer.strategy.broadcast((found, error), src=0)
        if error is not None:
            raise MemwatchError(f"sigmas='auto' could not calibrate the noise levels: {error}")
        self._use_levels(*found)
        if not self.copies_from_batches:
            self._reservoir = None  # no training sample is held longer than needed

    def _with_batch_copies(
        self, trainer: pl.Trainer, measurement: ProbeMeasurement, device: torch.device
    ) -> ProbeMeasurement:
        """``measurement`` with the ``d₁/d₂`` of its probes to the training samples every rank has
        seen (collectives on every rank: call it after every rank measured). A rank that cannot
        offer its candidates makes every ratio NaN, with a warning, never a partial answer."""
        probes = _gathered(measurement.samples.to(device))  # every rank's, in rank order
        try:
            assert self._reservoir is not None
            held = distinct(self._reservoir.samples) if len(self._reservoir) else probes[:0].double()
            candidates = nearest_candidates(probes, held)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.raise_errors and trainer.world_size == 1:
                raise
            warnings.warn(  # from the rank that failed, which need not be rank zero
                f"memwatch: the probes could not be compared with the training samples seen: {err!r}; their "
                "ratios are NaN, so the check counts as failed",
                RuntimeWarning,
                stacklevel=2,
            )
            candidates = torch.full((probes.shape[0], 2, *probes.shape[1:]), torch.nan, dtype=torch.float64)
        every = _gathered(candidates.to(device).unsqueeze(0))  # [world, n, 2, *shape]
        ratio = ratio_from_candidates(probes, rearrange(every, "w n c ... -> n (w c) ..."))
        mine = shard(self.num_probes, trainer.world_size, trainer.global_rank)
        return dataclasses.replace(measurement, nn_ratio=ratio[mine].float())

    def _losses(self, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """``(L_train [K], L_held [K])`` of this rank's loss-gap samples (no collective here)."""
        assert self._found is not None and self._heldout is not None
        if self._loss_gap is None:  # the training side is known by the first check
            train = self._reference
            if train is None:
                assert self._reservoir is not None
                train = self._reservoir.samples
            self._loss_gap = LossGap(
                train, self._heldout, timesteps=self._loss_gap_times, size=defaults.LOSS_GAP_SIZE, seed=self.seed
            )
        with measured_score(self._found, pl_module, self.ema_attr) as score:
            return self._loss_gap.losses(score, device=pl_module.device, max_batch=self._check_options.max_batch)

    def _check_batch_shape(self, shape: tuple[int, ...]) -> None:
        """Training samples compared with the probes (``sigmas="auto"``, ``reference_data="batches"``)
        must have the probes' shape; else the scale or the copies would be measured in another space.

        Raises:
            MemwatchError: at the first training batch, naming both shapes and the arguments.
        """
        if self.sample_shape is not None and shape != tuple(self.sample_shape):
            uses = [
                n
                for n, on in (
                    ('sigmas="auto"', self.calibrating),
                    ('reference_data="batches"', self.copies_from_batches),
                )
                if on
            ]
            raise MemwatchError(
                f"{' and '.join(uses)} compare training samples with the probes, but the training batches hold samples "
                f"of shape {shape} and the probes have shape {tuple(self.sample_shape)} (`sample_shape`, or the "
                "model's config): pass `sample_shape` to match the data, or an `encode_fn` that maps the batches there"
            )

    def _batch_data(self, batch: Any) -> Tensor:
        """The data tensor of a training batch, as the batch holds it (before ``encode_fn``)."""
        x = batch[self.batch_key] if self.batch_key is not None else first_tensor(batch)
        return x.detach()

    def _encode(self, x: Tensor) -> Tensor:
        """Training samples ``[b, *data shape]`` in the space of the probes (``encode_fn``, if any)."""
        if self.encode_fn is None:
            return x
        with torch.no_grad(), isolate_rng():  # an encoder that samples must not move the training RNG
            return self.encode_fn(x).detach()

    def _check_timesteps_in_grid(self, score: DiffusionScore) -> None:
        """The sampler must pass through every evaluation timestep (a diffusers grid may start
        below the schedule's last step, e.g. at 980 of 999)."""
        first = self._first_sampler_timestep(score.schedule)
        noisiest = max(self._eval_timesteps)
        if noisiest > first:
            name = "timesteps" if self.timesteps is not None else "sigmas"
            raise MemwatchError(
                f"`{name}` must map to timesteps at or below the sampler's first step ({first:g} for "
                f"sampler_steps={self.sampler_steps}), got timestep {noisiest:g}"
            )

    def _first_sampler_timestep(self, schedule: NoiseSchedule) -> float:
        """The timestep the probes' ``sampler_steps``-step grid starts at (schedule units)."""
        return float(schedule.sampling_timesteps(self.sampler_steps)[0])

    def _check_shape(self, shape: Sequence[int], device: torch.device) -> None:
        dim = math.prod(shape)
        # image scale: the cheap trace tier at every check, the Lanczos spectrum every n-th check
        self._tiered = self.options.method == "auto" and dim > DENSE_MAX_DIM
        self._check_options = self.options.replace(method="trace") if self._tiered else self.options
        if self.options.max_batch is None:  # every model call of a check bounded by the memory there is
            self._check_options = self._check_options.replace(max_batch=default_max_batch(dim, device=device))
        if self.options.k > dim:
            raise MemwatchError(
                f"`k`={self.options.k} is larger than the sample dimension d={dim} (shape {tuple(shape)})"
            )
        self.options.check_dim(dim)

    def _save_clean_checkpoint(self, trainer: pl.Trainer) -> None:
        """Write the clean checkpoint atomically (every rank takes part); a failed save keeps the
        previous one and is a warning, never a crash."""
        assert self._clean_dir is not None
        previous = (self.clean_step, self.clean_checkpoint_path)
        # set first, so that a "full" checkpoint's own callback state names itself
        self.clean_step, self.clean_checkpoint_path = trainer.global_step, self._clean_dir / CLEAN_CHECKPOINT_NAME
        outcome = save_clean_checkpoint(
            trainer, self._clean_dir, mode=self.clean_checkpoint_mode, raise_errors=self.raise_errors
        )
        if not outcome.ok:
            self.clean_step, self.clean_checkpoint_path = previous
            rank_zero_warn(outcome.failure_message(previous_step=self.clean_step))


# ---------------------------------------------------------------------- module-level helpers
def _synced_mean(x: Tensor, device: torch.device) -> float:
    """Mean of the finite values of every rank's ``x`` (NaN when none is finite)."""
    from torchmetrics.aggregation import MeanMetric

    mean = MeanMetric(nan_strategy="ignore").to(device)  # synced over ranks on compute
    mean.update(x.to(device, torch.float64))
    return float(mean.compute())


def _loss_values(loss_train: Tensor, loss_held: Tensor, device: torch.device) -> dict[str, float]:
    """``loss_train``, ``loss_heldout`` (means over the timesteps and every rank; NaN when any is)
    and their relative ``loss_gap``."""
    train, held = (float(_gathered(v.double().mean().reshape(1).to(device)).mean()) for v in (loss_train, loss_held))
    return {
        "loss_train": train,
        "loss_heldout": held,
        "loss_gap": relative_gap(torch.tensor(train), torch.tensor(held)),
    }


def _gathered(x: Tensor) -> Tensor:
    """``x`` of every rank, concatenated in rank order (shards may differ in length); ``x`` alone
    outside distributed runs."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x.cpu()
    return torch.cat([t.cpu() for t in gather_all_tensors(x)])


def _check_cadence(name: str, value: int | None) -> None:
    if value is not None:
        _check_int(name, value, 1, allow="or None")


def _check_int(name: str, value: object, low: int, allow: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise MemwatchError(f"`{name}` must be {what}{' ' + allow if allow else ''}, got {value!r}")


def _check_fraction(name: str, value: object, *, low_open: bool = False, high_closed: bool = False) -> None:
    """``value`` must be a number in ``[0, 1)`` (or ``(0, 1]`` etc. as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value <= 1 if high_closed else value < 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise MemwatchError(f"`{name}` must be a number in {interval}, got {value!r}")


def _check_range(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]):
        raise MemwatchError(f"`data_range` must be None or (low, high) with finite low < high, got {value!r}")
    return float(value[0]), float(value[1])


def _check_levels(name: str, values: object, positive: bool = True) -> tuple[float, ...]:
    """A non-empty sequence of finite (positive) numbers, as floats."""
    if isinstance(values, (str, bytes, Tensor)) or not isinstance(values, Sequence) or len(values) == 0:
        raise MemwatchError(
            f"`{name}` must be a non-empty sequence of {'positive ' if positive else ''}numbers "
            f"(e.g. {name}=(0.3,)), got {values!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise MemwatchError(f"`{name}` must hold finite {'positive ' if positive else ''}numbers, got {values!r}")
        out.append(float(v))
    return tuple(out)


def _condition_number(names: list[str], top: str | None) -> float:
    """The most memorized condition as a scalar: its label for int labels, else its index."""
    if top is None:
        return math.nan
    return float(top) if all(n.lstrip("-").isdigit() for n in names) else float(names.index(top))
