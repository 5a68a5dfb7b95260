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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from memwatch.groundtruth import MEMORIZED_RATIO, nearest_neighbours
from memwatch.loggers import MonitorLogger
from memwatch.metrics import MemorizationMetrics
from memwatch.onset import OnsetDecision, OnsetDetector
from memwatch.sampling import probe_noise, sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import METHODS, SharpnessResult, measure_sharpness

__all__ = ["MemorizationMonitor", "find_score"]

ScoreFn = Callable[[pl.LightningModule], DiffusionScore]


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
            ignored when ``timesteps`` is given. The first one is the primary timestep.
        timesteps: evaluation timesteps in schedule units.
        k: most negative eigenvalues reported per probe.
        threshold: ``τ``; a direction is sharp when ``σ_t² λ < -τ``.
        score_threshold: a probe counts as memorized when its score exceeds this.
        method, num_iters, num_vectors, max_batch: passed to :func:`memwatch.measure_sharpness`.
        onset_threshold, onset_min_delta, patience, min_steps, baseline_checks: the
            :class:`memwatch.onset.OnsetDetector` rule on ``memorized_fraction``.
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
        log_media: also log probe images / nearest-neighbour galleries (privacy: off by default).
        raise_errors: re-raise errors of a check instead of warning (default: training never
            crashes because of memwatch).
        verbose: print a line per check (rank zero).

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
        sigmas: Sequence[float] = (0.1, 0.3),
        timesteps: Sequence[float] | None = None,
        k: int = 8,
        threshold: float = 0.5,
        score_threshold: float = 0.9,
        method: str = "auto",
        num_iters: int = 32,
        num_vectors: int = 4,
        max_batch: int | None = None,
        onset_threshold: float | None = 0.5,
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
        log_media: bool = False,
        raise_errors: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check_cadence("every_n_train_steps", every_n_train_steps)
        _check_cadence("every_n_epochs", every_n_epochs)
        if every_n_train_steps is None and every_n_epochs is None:
            raise ValueError("set `every_n_train_steps` or `every_n_epochs`; both are None")
        _check_positive_int("num_probes", num_probes)
        _check_positive_int("k", k)
        _check_positive_int("num_iters", num_iters)
        _check_positive_int("num_vectors", num_vectors)
        if not isinstance(sampler_steps, int) or sampler_steps < 2:
            raise ValueError(f"`sampler_steps` must be an integer >= 2, got {sampler_steps!r}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        if not threshold > 0:
            raise ValueError(f"`threshold` must be positive, got {threshold!r}")
        if not 0 <= score_threshold < 1:
            raise ValueError(f"`score_threshold` must be in [0, 1), got {score_threshold!r}")
        if max_batch is not None:
            _check_positive_int("max_batch", max_batch)
        if timesteps is None and (not sigmas or any(not s > 0 for s in sigmas)):
            raise ValueError(f"`sigmas` must be a non-empty sequence of positive noise levels, got {sigmas!r}")
        if timesteps is not None and len(timesteps) == 0:
            raise ValueError("`timesteps` must be non-empty (or None to use `sigmas`)")
        if sample_shape is not None and (len(sample_shape) == 0 or any(int(s) < 1 for s in sample_shape)):
            raise ValueError(f"`sample_shape` must be a non-empty shape of positive sizes, got {sample_shape!r}")
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
        self.log_media = log_media
        self.raise_errors = raise_errors
        self.verbose = verbose

        self.clean_checkpoint_path: Path | None = None
        self.clean_step: int | None = None
        self.history: list[dict[str, float]] = []
        self._eval_timesteps: list[float] = []
        self._metrics: dict[float, MemorizationMetrics] = {}
        self._logger: MonitorLogger | None = None
        self._reference: Tensor | None = None
        self._first_density: Tensor | None = None
        self._nearest: Tensor | None = None
        self._last_checked_step = -1

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_probes=self.num_probes, sigmas=self.sigmas, timesteps=self.timesteps, seed=self.seed
        )

    @property
    def onset_step(self) -> int | None:
        """Global step of the check at which onset was declared (``None`` before)."""
        return self.detector.onset_step

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        score = self._score(pl_module)
        if self.timesteps is not None:
            self._eval_timesteps = [float(score.schedule.check_t(t, "timesteps")) for t in self.timesteps]
        else:
            self._eval_timesteps = [float(score.schedule.timestep_for_sigma(s)) for s in self.sigmas]
        self._eval_timesteps = list(dict.fromkeys(self._eval_timesteps))
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
        try:
            with _isolated(pl_module):
                values, results, samples, ratios = self._measure(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if self.raise_errors:
                raise
            rank_zero_warn(f"memwatch: the check at step {trainer.global_step} failed and was skipped: {err!r}")
            return
        decision = self._decide(trainer, values)
        self._publish(trainer, values, results, samples, ratios, decision)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, float], dict[float, SharpnessResult], Tensor, Tensor | None]:
        """Probe, measure, update and compute the metrics; returns synced values and local results."""
        started = time.perf_counter()
        score = self._score(pl_module)
        if self.sample_shape is None:
            raise ValueError("memwatch could not infer the probe shape; pass `sample_shape=`")
        device = pl_module.device
        rows = _shard(self.num_probes, trainer.world_size, trainer.global_rank)
        noise = probe_noise(self.num_probes, self.sample_shape, generator=torch.Generator().manual_seed(self.seed))
        traj = sample_trajectory(
            score, noise=noise[rows], steps=self.sampler_steps, states_at=self._eval_timesteps, device=device
        )
        ratios = None
        if self._reference is not None:
            dist, idx = nearest_neighbours(traj.samples, self._reference)
            ratios = (dist[:, 0] / dist[:, 1].clamp_min(1e-12)).float()
            self._nearest = idx[:, 0]
        results: dict[float, SharpnessResult] = {}
        values: dict[str, float] = {}
        for t in self._eval_timesteps:
            res = measure_sharpness(
                score,
                traj.states[t],
                t,
                k=self.k,
                threshold=self.threshold,
                method=self.method,
                num_iters=self.num_iters,
                num_vectors=self.num_vectors,
                max_batch=self.max_batch,
                generator=torch.Generator().manual_seed(self.seed + 1),
            )
            results[t] = res
            metric = self._metrics[t].to(device)
            metric.reset()
            metric.update(
                res.sharp_fraction.to(device),
                res.lid.to(device),
                res.eigenvalues[:, 0].to(device),
                res.normalized.mean(1).to(device),
                res.score.to(device),
                None if ratios is None else ratios.to(device),
            )
            computed = {name: float(v) for name, v in metric.compute().items()}
            values.update({f"t{_fmt(t)}/{name}": v for name, v in computed.items()})
            if t == self._eval_timesteps[0]:
                values.update(computed)
        values["check_seconds"] = time.perf_counter() - started
        return values, results, traj.samples.detach().cpu(), ratios

    def _decide(self, trainer: pl.Trainer, values: Mapping[str, float]) -> OnsetDecision:
        decision = self.detector.update(trainer.global_step, values["memorized_fraction"])
        if decision.clean and self.save_clean_checkpoint:
            self.clean_step = trainer.global_step
            self.clean_checkpoint_path = self._checkpoint_dir(trainer) / "memwatch-clean.ckpt"
            trainer.save_checkpoint(self.clean_checkpoint_path)
        if decision.onset and self.stop_on_onset:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)
        return decision

    def _publish(
        self,
        trainer: pl.Trainer,
        values: dict[str, float],
        results: dict[float, SharpnessResult],
        samples: Tensor,
        ratios: Tensor | None,
        decision: OnsetDecision,
    ) -> None:
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
        if trainer.is_global_zero:
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

    def _log_media(
        self, step: int, results: dict[float, SharpnessResult], samples: Tensor, ratios: Tensor | None
    ) -> None:
        """Histograms, spectrum and curves (safe); per-probe table; probe gallery if ``log_media``."""
        from memwatch import plots

        assert self._logger is not None
        primary = results[self._eval_timesteps[0]]
        self._logger.log_histogram("normalized_eigenvalues", primary.normalized.flatten(), step)
        self._logger.log_histogram("probe_score", primary.score, step)
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
            "curves", plots.plot_metric_curves(curves, onsets={"memorized_fraction": self.onset_step}, ylabel="value"), step
        )
        columns = ["probe", "t", "sharp_fraction", "lid", "lambda_min", "trace", "score", "nn_ratio"]
        rows = [
            [i, t, *(float(v) for v in (r.sharp_fraction[i], r.lid[i], r.eigenvalues[i, 0], r.trace[i], r.score[i])),
             None if ratios is None else float(ratios[i])]
            for t, r in results.items()
            for i in range(len(r.score))
        ]
        self._logger.log_table("probes", columns, rows, step)
        if self.log_media and samples.ndim >= 3:
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

    # ------------------------------------------------------------------ helpers
    def _score(self, pl_module: pl.LightningModule) -> DiffusionScore:
        score = find_score(pl_module, self.score_fn)
        if self.ema_attr is not None:
            ema = getattr(pl_module, self.ema_attr, None)
            if not isinstance(ema, nn.Module):
                raise ValueError(f"`ema_attr`={self.ema_attr!r} does not name an nn.Module on {type(pl_module).__name__}")
            score = score.with_model(getattr(ema, "module", ema))
        return score

    def _check_k(self, shape: Sequence[int]) -> None:
        dim = math.prod(shape)
        if self.k > dim:
            raise ValueError(f"`k`={self.k} is larger than the sample dimension d={dim} (shape {tuple(shape)})")

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
        raise ValueError(f"the score must be a memwatch.DiffusionScore, got {type(score).__name__}")
    return score


def _diffusers_score(pl_module: pl.LightningModule) -> DiffusionScore:
    unet = next((m for m in vars(pl_module)["_modules"].values() if type(m).__name__ == "UNet2DModel"), None)
    scheduler = next(
        (v for v in vars(pl_module).values() if hasattr(v, "alphas_cumprod") and hasattr(v, "config")), None
    )
    if unet is None or scheduler is None:
        raise ValueError(
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
            raise ValueError(f"`batch_key`={key!r} is not a key of the training batch")
        return tuple(batch[key].shape[1:])
    if isinstance(batch, Tensor):
        return tuple(batch.shape[1:])
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, Tensor):
            return tuple(item.shape[1:])
    raise ValueError("memwatch cannot infer the probe shape from the batch; pass `sample_shape=` or `batch_key=`")


def _materialize(data: Any) -> Tensor:
    if isinstance(data, Tensor):
        return data.detach().cpu()
    from memwatch.groundtruth import _first_tensor

    return torch.cat([_first_tensor(b).detach().cpu() for b in data])


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
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
