"""``MemorizationMonitor``: a Lightning callback that watches a diffusion model memorize.

Every ``every_n_train_steps`` steps (a *check*) it draws the same probes from the model under
training (fixed seeds, deterministic DDIM), measures the sharpness of the learned density at the
probes' trajectory states (:func:`memwatch.measure_sharpness`), updates torchmetrics metrics, runs
the onset detector, logs to every logger of the Trainer, and can stop training at onset while
keeping the last clean checkpoint. The callback holds no math; it orchestrates.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.groundtruth import nearest_neighbours
from memwatch.loggers import MonitorLogger
from memwatch.metrics import MemorizationMetrics
from memwatch.onset import OnsetDecision, OnsetDetector
from memwatch.sampling import probe_noise, sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import METHODS, SharpnessResult, measure_sharpness

__all__ = ["MemorizationMonitor", "CheckResult", "find_score"]

ScoreFn = Callable[[pl.LightningModule], DiffusionScore]


@dataclass(frozen=True)
class CheckResult:
    """Everything one check measured on this rank (see :meth:`MemorizationMonitor.on_check_end`).

    Attributes:
        step: the trainer's global step of the check.
        values: the logged scalars without the ``memwatch/`` prefix (synced over ranks), including
            ``onset`` and ``check_seconds``.
        results: evaluation timestep → :class:`memwatch.SharpnessResult` of this rank's probes.
        samples: ``[n, *shape]`` this rank's probes (final DDIM samples), on the CPU.
        nn_ratio: ``[n]`` the probes' ``d₁/d₂`` to ``reference_data`` (``None`` without it).
        decision: the onset detector's decision at this check.
    """

    step: int
    values: dict[str, float]
    results: dict[float, SharpnessResult]
    samples: Tensor
    nn_ratio: Tensor | None
    decision: OnsetDecision


@dataclass(frozen=True)
class _LocalCheck:
    """One rank's measurements of a check, before any sync: samples, results and ``nn_ratio`` as
    in :class:`CheckResult`; ``conditional``: ``{condition: {metric: [n]}}`` or ``None``."""

    samples: Tensor
    results: dict[float, SharpnessResult]
    nn_ratio: Tensor | None
    conditional: dict[str, dict[str, Tensor]] | None


class MemorizationMonitor(Callback):
    r"""Detect memorization while a diffusion model trains, from the sharpness of its density.

    At each check, for every evaluation timestep ``t``: a probe is *memorized* when its score
    (sharp fraction, the share of Hessian eigenvalues with ``σ_t² λ < -threshold``) exceeds
    ``score_threshold``; ``memwatch/memorized_fraction`` is the share of such probes at the first
    (primary) timestep, and onset is declared when it exceeds ``onset_threshold`` (and/or the
    baseline of the first checks by ``onset_min_delta``) for ``patience`` checks in a row.

    Logged under ``memwatch/`` (scalars always; histograms, spectrum and curve plots, per-probe
    table always — they hold no training data): ``sharp_fraction_mean``, ``lid_mean``,
    ``lambda_min``, ``normalized_eig_mean``, ``memorized_fraction``, ``onset``, and with
    ``reference_data`` ``nn_memorized_fraction`` and ``auroc``; the same per timestep as
    ``memwatch/t{t}/…``. Images of probes and their nearest training samples are logged only
    with ``log_media=True`` (a memorized probe *is* a copy of training data).

    Args:
        score_fn: ``pl_module -> DiffusionScore``. Default: the module's ``memwatch_score()``
            method, else a diffusers ``UNet2DModel`` + scheduler found on the module.
        every_n_train_steps: check cadence in optimizer steps (``None``: only per epoch).
        every_n_epochs: also/instead check at the end of every n-th training epoch.
        num_probes: probes per check (sharded across DDP ranks).
        sampler_steps: DDIM steps per probe.
        sigmas: evaluation noise levels σ_t (converted to the schedule's nearest timesteps);
            ignored when ``timesteps`` is given. The first one is the primary timestep. The
            default 0.3 (data scaled to about [-1, 1]) and the thresholds below are the
            validation study's choice on held-out seeds (``docs/validation.md``); for data much
            more or less spread out, scale σ with its nearest-neighbour distances.
        timesteps: evaluation timesteps in schedule units.
        k: most negative eigenvalues reported per probe.
        threshold: ``τ``; a direction is sharp when ``σ_t² λ < -τ``.
        score_threshold: a probe counts as memorized when its score exceeds this.
        method, num_iters, num_vectors, max_batch: passed to :func:`memwatch.measure_sharpness`.
        onset_threshold, onset_min_delta, patience, min_steps, baseline_checks: the
            :class:`memwatch.onset.OnsetDetector` rule on ``memorized_fraction``: onset when
            more than ``onset_threshold`` of the probes are memorized ``patience`` checks in a row.
        stop_on_onset: set ``trainer.should_stop`` at onset (one decision for all ranks).
        save_clean_checkpoint: save ``memwatch-clean.ckpt`` at every clean check (overwritten),
            so the last one before onset survives; see ``clean_checkpoint_path``.
        dirpath: where that checkpoint goes (default ``<trainer.log_dir or default_root_dir>/memwatch``).
        reference_data: training samples ``[N, *shape]`` (or an iterable of batches) for the
            nearest-neighbour ground truth (``nn_memorized_fraction``, ``auroc``).
        sample_shape: probe shape; default: inferred from the first training batch.
        batch_key: key of the data in dict batches (else the batch's first tensor).
        ema_attr: name of an EMA copy of the network on the module to measure instead.
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

    Raises:
        ValueError: an argument is out of range (the message names it).

    Example:
        >>> monitor = MemorizationMonitor(every_n_train_steps=200, num_probes=16, stop_on_onset=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=2000)  # doctest: +SKIP
    """

    def __init__(
        self,
        score_fn: ScoreFn | None = None,
        every_n_train_steps: int | None = 500,
        every_n_epochs: int | None = None,
        num_probes: int = 32,
        sampler_steps: int = 50,
        sigmas: Sequence[float] = (0.3,),
        timesteps: Sequence[float] | None = None,
        k: int = 8,
        threshold: float = 0.5,
        score_threshold: float = 0.9,
        method: str = "auto",
        num_iters: int = 32,
        num_vectors: int = 4,
        max_batch: int | None = None,
        onset_threshold: float | None = 0.2,
        onset_min_delta: float | None = None,
        patience: int = 2,
        min_steps: int = 0,
        baseline_checks: int = 3,
        stop_on_onset: bool = False,
        save_clean_checkpoint: bool = True,
        dirpath: str | Path | None = None,
        reference_data: Tensor | Any | None = None,
        sample_shape: Sequence[int] | None = None,
        batch_key: str | None = None,
        ema_attr: str | None = None,
        seed: int = 0,
        log_figures: bool = True,
        log_media: bool = False,
        raise_errors: bool = False,
        verbose: bool = True,
        conditions: Tensor | Sequence[Any] | None = None,
        condition_first_steps: int | None = None,
    ) -> None:
        super().__init__()
        _check_cadence("every_n_train_steps", every_n_train_steps)
        _check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise MemwatchError("set `every_n_train_steps` or `every_n_epochs`; both are None")
        _check_positive_int("num_probes", num_probes)
        _check_positive_int("k", k)
        _check_positive_int("num_iters", num_iters)
        _check_positive_int("num_vectors", num_vectors)
        if not isinstance(sampler_steps, int) or sampler_steps < 2:
            raise MemwatchError(f"`sampler_steps` must be an integer >= 2, got {sampler_steps!r}")
        if method not in METHODS:
            raise MemwatchError(f"`method` must be one of {METHODS}, got {method!r}")
        if not threshold > 0:
            raise MemwatchError(f"`threshold` must be positive, got {threshold!r}")
        if not 0 <= score_threshold < 1:
            raise MemwatchError(f"`score_threshold` must be in [0, 1), got {score_threshold!r}")
        if max_batch is not None:
            _check_positive_int("max_batch", max_batch)
        if timesteps is None and (not sigmas or any(not s > 0 for s in sigmas)):
            raise MemwatchError(f"`sigmas` must be a non-empty sequence of positive noise levels, got {sigmas!r}")
        if timesteps is not None and len(timesteps) == 0:
            raise MemwatchError("`timesteps` must be non-empty (or None to use `sigmas`)")
        if sample_shape is not None and (len(sample_shape) == 0 or any(int(s) < 1 for s in sample_shape)):
            raise MemwatchError(f"`sample_shape` must be a non-empty shape of positive sizes, got {sample_shape!r}")
        # the detector validates its own arguments (patience, min_steps, …)
        self.detector = OnsetDetector(
            threshold=onset_threshold,
            min_delta=onset_min_delta,
            baseline_checks=baseline_checks,
            patience=patience,
            min_steps=min_steps,
            monitor="memorized_fraction",
        )
        self.score_fn = score_fn
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.num_probes = num_probes
        self.sampler_steps = sampler_steps
        self.sigmas = tuple(float(s) for s in sigmas)
        self.timesteps = None if timesteps is None else tuple(timesteps)
        self.k = k
        self.threshold = threshold
        self.score_threshold = score_threshold
        self.method = method
        self.num_iters = num_iters
        self.num_vectors = num_vectors
        self.max_batch = max_batch
        self.stop_on_onset = stop_on_onset
        self.save_clean_checkpoint = save_clean_checkpoint
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.reference_data = reference_data
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.batch_key = batch_key
        self.ema_attr = ema_attr
        self.seed = seed
        self.log_figures = log_figures
        self.log_media = log_media
        self.raise_errors = raise_errors
        self.verbose = verbose
        self.conditions = conditions
        self._conditions = _check_conditions(conditions, condition_first_steps, sampler_steps)
        self.condition_first_steps = condition_first_steps
        self._condition_values: dict[str, dict[str, float]] = {}
        self._most_memorized = ""

        self.clean_checkpoint_path: Path | None = None
        self.clean_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.last_check: CheckResult | None = None
        self._eval_timesteps: list[float] = []
        self._metrics: dict[float, MemorizationMetrics] = {}
        self._logger: MonitorLogger | None = None
        self._reference: Tensor | None = None
        self._first_density: Tensor | None = None
        self._nearest: Tensor | None = None
        self._last_checked_step = -1
        self._state_key: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names): built once, not per step
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                num_probes=self.num_probes,
                sigmas=self.sigmas,
                timesteps=self.timesteps,
                seed=self.seed,
                conditions=tuple(self._conditions),
            )
        return self._state_key

    @property
    def onset_step(self) -> int | None:
        """Global step of the check at which onset was declared (``None`` before)."""
        return self.detector.onset_step

    def on_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: CheckResult) -> None:
        """Called on every rank after each check has been logged; override to use its per-probe
        results (also kept as :attr:`last_check`). The default does nothing."""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        score = self._score(pl_module)
        self._eval_timesteps = self._timesteps_of(score)
        self._metrics = {t: MemorizationMetrics(score_threshold=self.score_threshold) for t in self._eval_timesteps}
        self._logger = MonitorLogger.from_trainer(trainer, log_media=self.log_media)
        if self.reference_data is not None:
            self._reference = _materialize(self.reference_data)
        if self.sample_shape is None:
            self.sample_shape = _diffusers_sample_shape(score.model)
        if self.sample_shape is not None:
            self._check_k(self.sample_shape)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.sample_shape is None:
            self.sample_shape = _batch_sample_shape(batch, self.batch_key)
            self._check_k(self.sample_shape)

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
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.clean_step = state_dict["clean_step"]
        path = state_dict["clean_checkpoint_path"]
        self.clean_checkpoint_path = None if path is None else Path(path)
        self.history = list(state_dict["history"])
        self._last_checked_step = state_dict["last_checked_step"]

    # ------------------------------------------------------------------ the check
    def _run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_checked_step = trainer.global_step
        if self.detector.memorizing and self.stop_on_onset:
            return
        if self.verbose:
            rank_zero_info(
                f"memwatch step {trainer.global_step}: checking {self.num_probes} probes "
                f"at {len(self._eval_timesteps)} timestep(s)…"
            )
        started = time.perf_counter()
        error: Exception | None = None
        try:
            with _isolated(pl_module):
                local = self._measure(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.raise_errors and trainer.world_size == 1:
                raise
            error = err
        # every rank learns whether every rank measured before any metric is synced: a rank that
        # failed alone would otherwise leave the others waiting in the sync forever
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            where = f"rank {trainer.global_rank}" if error is not None else "another rank"
            msg = f"memwatch: the check at step {trainer.global_step} failed on {where} and was skipped"
            if self.raise_errors:
                raise RuntimeError(msg) from error
            if error is not None:
                warnings.warn(f"{msg}: {error!r}", RuntimeWarning, stacklevel=2)
            return
        values = self._sync(local, pl_module.device)
        values["check_seconds"] = time.perf_counter() - started
        decision = self._decide(trainer, values)
        self.last_check = self._publish(trainer, values, local.results, local.samples, local.nn_ratio, decision)
        self.on_check_end(trainer, pl_module, self.last_check)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _LocalCheck:
        """This rank's share of the probes, measured; no collective here."""
        rows = _shard(self.num_probes, trainer.world_size, trainer.global_rank)
        score, noise = self._score(pl_module), self._probe_noise()[rows]
        samples, results = self._probe(score, noise, pl_module.device)
        ratios = None
        if self._reference is not None:
            dist, idx = nearest_neighbours(samples, self._reference)
            ratios = (dist[:, 0] / dist[:, 1].clamp_min(1e-12)).float()
            self._nearest = idx[:, 0]
        conditional = None
        if self._conditions:
            conditional = self._measure_conditions(score, noise, pl_module.device)
        return _LocalCheck(samples, results, ratios, conditional)

    def _sync(self, local: _LocalCheck, device: torch.device) -> dict[str, float]:
        """The check's scalars from every rank's probes (torchmetrics syncs them under DDP)."""
        values: dict[str, float] = {}
        for t, res in local.results.items():
            metric = self._metrics[t].to(device)
            metric.reset()
            metric.update(
                res.sharp_fraction.to(device),
                res.lid.to(device),
                res.eigenvalues[:, 0].to(device),
                res.normalized.mean(1).to(device),
                res.score.to(device),
                None if local.nn_ratio is None else local.nn_ratio.to(device),
            )
            computed = {name: float(v) for name, v in metric.compute().items()}
            values.update({f"t{_fmt(t)}/{name}": v for name, v in computed.items()})
            if t == self._eval_timesteps[0]:
                values.update(computed)
        if local.conditional is not None:
            values.update(self._sync_conditions(local.conditional, device))
        return values

    def measure_probes(
        self, pl_module: pl.LightningModule, rows: slice = slice(None)
    ) -> tuple[Tensor, dict[float, SharpnessResult]]:
        """Draw this monitor's probes (``rows`` of them) from the module's current weights and
        measure them at every evaluation timestep: what a check measures, without metrics,
        decisions or logging. Put the module in eval mode first (a check does).

        Returns:
            ``(samples, results)``: the final DDIM samples ``[n, *shape]`` on the CPU, and
            ``{timestep: SharpnessResult}`` with the primary timestep first.

        Raises:
            ValueError: the probe shape is unknown (before the first training batch, without
                ``sample_shape``).
        """
        return self._probe(self._score(pl_module), self._probe_noise()[rows], pl_module.device)

    def _probe(
        self, score: DiffusionScore, noise: Tensor, device: torch.device
    ) -> tuple[Tensor, dict[float, SharpnessResult]]:
        """DDIM probes from ``noise`` and their spectra at every evaluation timestep."""
        times = self._eval_timesteps or self._timesteps_of(score)
        traj = sample_trajectory(score, noise=noise, steps=self.sampler_steps, states_at=times, device=device)
        results = {
            t: measure_sharpness(
                score,
                traj.states[t],
                t,
                **self._spectrum_options(),
                generator=torch.Generator().manual_seed(self.seed + 1),
            )
            for t in times
        }
        return traj.samples.detach().cpu(), results

    def _decide(self, trainer: pl.Trainer, values: Mapping[str, float]) -> OnsetDecision:
        decision = self.detector.update(trainer.global_step, values["memorized_fraction"])
        if decision.clean and self.save_clean_checkpoint:
            self.clean_step = trainer.global_step
            self.clean_checkpoint_path = self._checkpoint_dir(trainer) / "memwatch-clean.ckpt"
            trainer.save_checkpoint(self.clean_checkpoint_path, weights_only=False)  # resumable: callbacks too
        if self.stop_on_onset:  # a collective on every rank at every check: one decision for all
            if trainer.strategy.reduce_boolean_decision(decision.onset, all=False):
                trainer.should_stop = True
        return decision

    def _publish(
        self,
        trainer: pl.Trainer,
        values: dict[str, float],
        results: dict[float, SharpnessResult],
        samples: Tensor,
        ratios: Tensor | None,
        decision: OnsetDecision,
    ) -> CheckResult:
        step = trainer.global_step
        values = dict(values, onset=float(decision.memorizing))
        if self.clean_step is not None:
            values["clean_step"] = float(self.clean_step)
        self.history.append(dict(values, step=float(step)))
        # trainer.callback_metrics is what EarlyStopping / ModelCheckpoint read
        for name, value in values.items():
            trainer.callback_metrics[f"memwatch/{name}"] = torch.tensor(value)
        assert self._logger is not None
        self._logger.define_metrics()
        self._logger.log_scalars(values, step)
        if trainer.is_global_zero and self._logger.loggers:
            self._log_media(step, results, samples, ratios)
        if decision.onset:
            msg = (
                f"memorization onset at step {step}: {decision.reason}. "
                f"Last clean checkpoint: {self.clean_checkpoint_path} (step {self.clean_step})"
            )
            rank_zero_warn(f"memwatch: {msg}")
            self._logger.alert("memwatch: memorization onset", msg)
        elif self.verbose:
            rank_zero_info(
                f"memwatch step {step}: sharp fraction {values['sharp_fraction_mean']:.3f}, "
                f"memorized {values['memorized_fraction']:.2f} ({values['check_seconds']:.1f}s)"
            )
        if self._conditions and self.verbose:
            scores = torch.tensor([c["hessian_score_diff"] for c in self._condition_values.values()])
            rank_zero_info(
                f"memwatch step {step}: most memorized condition {self._most_memorized} "
                f"(Hessian-weighted score difference {float(scores.nanmax()):.3g}, "
                f"median over conditions {float(scores.nanmedian()):.3g})"
            )
        return CheckResult(step, values, results, samples, ratios, decision)

    def _log_media(
        self, step: int, results: dict[float, SharpnessResult], samples: Tensor, ratios: Tensor | None
    ) -> None:
        """Histograms (safe); spectrum, curves, probe table and condition chart (safe) if
        ``log_figures``; the probe gallery if ``log_media``."""
        assert self._logger is not None
        primary = results[self._eval_timesteps[0]]
        self._logger.log_histogram("normalized_eigenvalues", primary.normalized.flatten(), step)
        self._logger.log_histogram("probe_score", primary.score, step)
        if self.log_figures:
            self._log_figures(step, results, ratios)
        if self.log_media and samples.ndim >= 3:
            from memwatch import plots

            order = torch.nan_to_num(primary.score, nan=-1.0).argsort(descending=True)[:8]
            neighbours = None if self._reference is None else self._reference[self._nearest[order].cpu()]
            captions = [
                f"score {float(primary.score[i]):.2f}" + ("" if ratios is None else f"\nd1/d2 {float(ratios[i]):.2f}")
                for i in order
            ]
            self._logger.log_figure(
                "most_memorized",
                plots.plot_gallery(samples[order], neighbours=neighbours, captions=captions),
                step,
                private=True,
            )

    def _log_figures(self, step: int, results: dict[float, SharpnessResult], ratios: Tensor | None) -> None:
        """Spectrum (first check vs now), metric curves, per-probe table, per-condition chart."""
        from memwatch import plots

        assert self._logger is not None
        primary = results[self._eval_timesteps[0]]
        grid = torch.linspace(-1.6, 0.4, 201)
        density = torch.nanmean(primary.density(grid), 0)
        if self._first_density is None:
            self._first_density = density
        self._logger.log_figure(
            "spectrum",
            plots.plot_spectrum(
                {"first check": (grid, self._first_density), f"step {step}": (grid, density)},
                threshold=-self.threshold,
            ),
            step,
        )
        steps = [h["step"] for h in self.history]
        curves = {
            name: (steps, [h[name] for h in self.history])
            for name in ("sharp_fraction_mean", "memorized_fraction", "nn_memorized_fraction")
            if name in self.history[-1]
        }
        self._logger.log_figure(
            "curves",
            plots.plot_metric_curves(curves, onsets={"memorized_fraction": self.onset_step}, ylabel="value"),
            step,
        )
        columns = ["probe", "t", "sharp_fraction", "lid", "lambda_min", "trace", "score", "nn_ratio"]
        rows = [
            [
                i,
                t,
                *(float(v) for v in (r.sharp_fraction[i], r.lid[i], r.eigenvalues[i, 0], r.trace[i], r.score[i])),
                None if ratios is None else float(ratios[i]),
            ]
            for t, r in results.items()
            for i in range(len(r.score))
        ]
        self._logger.log_table("probes", columns, rows, step)
        if self._conditions:
            self._log_conditions(step)

    # ------------------------------------------------------------------ conditions (issue #6)
    def _measure_conditions(
        self, score: DiffusionScore, noise: Tensor, device: torch.device
    ) -> dict[str, dict[str, Tensor]]:
        """Per condition, the conditional metrics of this rank's probes: ``{name: {metric: [r]}}``."""
        from memwatch.conditional import conditional_metrics

        names = list(self._conditions)
        r = noise.shape[0]
        stacked = torch.stack(list(self._conditions.values()))  # [C, ...]
        try:
            res = conditional_metrics(
                score,
                stacked.repeat_interleave(r, dim=0),  # condition-major: rows c*r … c*r + r - 1
                noise=noise.repeat(len(names), *([1] * (noise.ndim - 1))),
                steps=self.sampler_steps,
                first_steps=self.condition_first_steps,  # None: conditional.default_first_steps
                eval_t=self._eval_timesteps[0],
                **self._spectrum_options(),
                lanczos_generator=torch.Generator().manual_seed(self.seed + 1),
                device=device,
            )
        except ValueError as err:
            raise MemwatchError(f"memwatch `conditions`: {err}") from err
        per_probe = {
            "hessian_score_diff": res.hessian_score_diff_norm,
            "score_diff": res.score_diff_norm,
            "sharp_fraction_mean": res.sharp_fraction,
        }
        return {name: {m: v[i * r : (i + 1) * r] for m, v in per_probe.items()} for i, name in enumerate(names)}

    def _sync_conditions(self, per_probe: dict[str, dict[str, Tensor]], device: torch.device) -> dict[str, float]:
        """Per-condition means over every rank's probes, and the condition with the highest
        Hessian-weighted score difference (the one that memorizes first)."""
        from torchmetrics.aggregation import MeanMetric

        values: dict[str, float] = {}
        self._condition_values = {}
        for name, metrics in per_probe.items():
            self._condition_values[name] = {}
            for metric_name, v in metrics.items():
                mean = MeanMetric(nan_strategy="ignore").to(device)  # synced over ranks on compute
                mean.update(v.to(device))
                self._condition_values[name][metric_name] = float(mean.compute())
                values[f"cond/{name}/{metric_name}"] = self._condition_values[name][metric_name]
        names = list(per_probe)
        scores = torch.tensor([c["hessian_score_diff"] for c in self._condition_values.values()])
        self._most_memorized = names[int(torch.nan_to_num(scores, nan=-math.inf).argmax())]
        values["most_memorized_condition"] = float(self._most_memorized)  # the int label, else the index
        return values

    def _log_conditions(self, step: int) -> None:
        """Table and bar chart of the per-condition metrics, the most memorized one flagged."""
        from memwatch import plots

        assert self._logger is not None
        names = list(self._condition_values)
        metrics = ("hessian_score_diff", "score_diff", "sharp_fraction_mean")
        top = names.index(self._most_memorized)
        rows = [[c, *(self._condition_values[c][m] for m in metrics), i == top] for i, c in enumerate(names)]
        self._logger.log_table("conditions", ["condition", *metrics, "most_memorized"], rows, step)
        figure = plots.plot_condition_metrics(
            {m: [self._condition_values[c][m] for c in names] for m in metrics},
            names,
            flagged=top,
            title=f"memwatch: per-condition metrics at step {step}",
        )
        self._logger.log_figure("conditions", figure, step)

    # ------------------------------------------------------------------ helpers
    def _score(self, pl_module: pl.LightningModule) -> DiffusionScore:
        score = find_score(pl_module, self.score_fn)
        if self.ema_attr is not None:
            ema = getattr(pl_module, self.ema_attr, None)
            if not isinstance(ema, nn.Module):
                raise MemwatchError(
                    f"`ema_attr`={self.ema_attr!r} does not name an nn.Module on {type(pl_module).__name__}"
                )
            score = score.with_model(getattr(ema, "module", ema))
        return score

    def _timesteps_of(self, score: DiffusionScore) -> list[float]:
        """The evaluation timesteps in the schedule's units, primary first, without repeats."""
        if self.timesteps is not None:
            times = [float(score.schedule.check_t(t, "timesteps")) for t in self.timesteps]
        else:
            times = [float(score.schedule.timestep_for_sigma(s)) for s in self.sigmas]
        return list(dict.fromkeys(times))

    def _probe_noise(self) -> Tensor:
        """``[num_probes, *sample_shape]`` start noise of the probes: the same at every check."""
        if self.sample_shape is None:
            raise MemwatchError("memwatch could not infer the probe shape; pass `sample_shape=`")
        return probe_noise(self.num_probes, self.sample_shape, generator=torch.Generator().manual_seed(self.seed))

    def _spectrum_options(self) -> dict[str, Any]:
        """The :func:`memwatch.measure_sharpness` options this monitor was configured with."""
        return {
            "k": self.k,
            "threshold": self.threshold,
            "method": self.method,
            "num_iters": self.num_iters,
            "num_vectors": self.num_vectors,
            "max_batch": self.max_batch,
        }

    def _check_k(self, shape: Sequence[int]) -> None:
        dim = math.prod(shape)
        if self.k > dim:
            raise MemwatchError(f"`k`={self.k} is larger than the sample dimension d={dim} (shape {tuple(shape)})")

    def _checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir) / "memwatch"


# ---------------------------------------------------------------------- module-level helpers
def find_score(pl_module: pl.LightningModule, score_fn: ScoreFn | None = None) -> DiffusionScore:
    """The module's :class:`DiffusionScore`: ``score_fn(pl_module)``, else ``pl_module.memwatch_score()``,
    else a diffusers ``UNet2DModel`` and a scheduler found among the module's attributes.

    Raises:
        ValueError: none of these applies (the message says what to add).
    """
    if score_fn is not None:
        score = score_fn(pl_module)
    elif callable(getattr(pl_module, "memwatch_score", None)):
        score = pl_module.memwatch_score()
    else:
        score = _diffusers_score(pl_module)
    if not isinstance(score, DiffusionScore):
        raise MemwatchError(f"the score must be a memwatch.DiffusionScore, got {type(score).__name__}")
    return score


def _diffusers_score(pl_module: pl.LightningModule) -> DiffusionScore:
    unet = next((m for m in vars(pl_module)["_modules"].values() if type(m).__name__ == "UNet2DModel"), None)
    scheduler = next(
        (v for v in vars(pl_module).values() if hasattr(v, "alphas_cumprod") and hasattr(v, "config")), None
    )
    if unet is None or scheduler is None:
        raise MemwatchError(
            f"memwatch cannot find the score of {type(pl_module).__name__}: pass "
            "`MemorizationMonitor(score_fn=lambda module: memwatch.DiffusionScore(...))`, or add a "
            "`memwatch_score()` method returning a memwatch.DiffusionScore, or keep a diffusers "
            "UNet2DModel and its scheduler as attributes of the module"
        )
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    return DiffusionScore(unet, NoiseSchedule.from_diffusers(scheduler), prediction=prediction)


def _diffusers_sample_shape(model: Any) -> tuple[int, ...] | None:
    config = getattr(model, "config", None)
    size = getattr(config, "sample_size", None)
    channels = getattr(config, "in_channels", None)
    if size is None or channels is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return (int(channels), int(h), int(w))


def _batch_sample_shape(batch: Any, key: str | None) -> tuple[int, ...]:
    if key is not None:
        if not isinstance(batch, Mapping) or key not in batch:
            raise MemwatchError(f"`batch_key`={key!r} is not a key of the training batch")
        return tuple(batch[key].shape[1:])
    if isinstance(batch, Tensor):
        return tuple(batch.shape[1:])
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, Tensor):
            return tuple(item.shape[1:])
    raise MemwatchError("memwatch cannot infer the probe shape from the batch; pass `sample_shape=` or `batch_key=`")


def _materialize(data: Any) -> Tensor:
    if isinstance(data, Tensor):
        return data.detach().cpu()
    from memwatch.groundtruth import first_tensor

    return torch.cat([first_tensor(b).detach().cpu() for b in data])


def _shard(n: int, world_size: int, rank: int) -> slice:
    """This rank's contiguous share of ``n`` probes (the first ``n % world_size`` ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _fmt(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


@contextlib.contextmanager
def _isolated(pl_module: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters, no autocast, isolated RNG; everything restored afterwards."""
    modes = {m: m.training for m in pl_module.modules()}
    grads = {p: p.requires_grad for p in pl_module.parameters()}
    device_type = pl_module.device.type if isinstance(pl_module, pl.LightningModule) else "cpu"
    try:
        with isolate_rng(), torch.autocast(device_type=device_type, enabled=False):
            pl_module.eval()
            for p in grads:
                p.requires_grad_(False)
            yield
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _check_cadence(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise MemwatchError(f"`{name}` must be a positive integer or None, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MemwatchError(f"`{name}` must be a positive integer, got {value!r}")


def _check_conditions(
    conditions: Tensor | Sequence[Any] | None, first_steps: int | None, sampler_steps: int
) -> dict[str, Tensor]:
    """``conditions`` as ``name -> condition`` (one condition each, without a batch dimension)."""
    if first_steps is not None and (
        not isinstance(first_steps, int) or isinstance(first_steps, bool) or not 1 <= first_steps <= sampler_steps
    ):
        raise MemwatchError(
            "`condition_first_steps` must be None or an integer in "
            f"[1, sampler_steps={sampler_steps}], got {first_steps!r}"
        )
    if conditions is None:
        return {}
    if isinstance(conditions, Tensor):
        if conditions.ndim == 0 or conditions.shape[0] == 0 or conditions.dtype == torch.bool:
            raise MemwatchError(
                "`conditions` must be a tensor [C, ...] with one row per condition (C >= 1), or a sequence of "
                f"int labels / tensors; got a {conditions.dtype} tensor of shape {tuple(conditions.shape)}"
            )
        items = list(conditions.detach().cpu())
    elif isinstance(conditions, Sequence) and not isinstance(conditions, (str, bytes)) and len(conditions) > 0:
        items = []
        for i, c in enumerate(conditions):
            if isinstance(c, bool) or not isinstance(c, (int, Tensor)):
                raise MemwatchError(f"`conditions[{i}]` must be an int label or a torch.Tensor, got {type(c).__name__}")
            items.append(torch.tensor(c) if isinstance(c, int) else c.detach().cpu())
        if len({tuple(c.shape) for c in items}) > 1:
            raise MemwatchError(
                f"`conditions` must all have the same shape, got {sorted({tuple(c.shape) for c in items})}"
            )
    else:
        raise MemwatchError(
            "`conditions` must be None, a tensor [C, ...] or a non-empty sequence of int labels / tensors, "
            f"got {type(conditions).__name__}"
        )
    labels = all(c.ndim == 0 and not c.is_floating_point() for c in items)
    names = [str(int(c)) if labels else str(i) for i, c in enumerate(items)]
    if len(set(names)) != len(names):
        raise MemwatchError(f"`conditions` must not repeat a label, got {names}")
    return dict(zip(names, items))
