"""Training the study's runs and keeping what the callback measured: :class:`CheckRecord` (one
check, as the callback reported it), :class:`RunRecord` (one run, as plain arrays), and the cache.

Cache format (``torch.save``; plain dicts, lists and numpy arrays only, so a cache loads without
this package): ``{"format": 3, "runs": [RunRecord.to_dict(), ...], "timing": Timing.to_dict(),
"config": dataclasses.asdict(StudyConfig)}``. Format 4 (study v2.1: the absolute monitor draws
its own probes and compares them with the batches it saw; a third monitor measures the same
probes with the trace tier, ``"trace 0.3"``) does not read older caches. Format 5 (study v2.2)
adds ``hessian_score_norm``, Jeon et al.'s ‖H s‖ of the truth's probes; format 4 still loads.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memwatch import (
    CheckpointOptions,
    CheckResult,
    MemorizationMonitor,
    OnsetOptions,
    ProbeOptions,
    ReportOptions,
    SharpnessCheckOptions,
    SharpnessResult,
    defaults,
    median_nn_distance,
)
from memwatch.callback import find_score
from memwatch.data import GaussianMixture, digits, manifold
from memwatch.errors import MemwatchError
from memwatch.lossgap import LossGap
from memwatch.probes import isolated

from .config import (
    ABSOLUTE_RULE,
    GMM_COMPONENTS,
    GMM_SEED,
    GMM_STD,
    IMAGE_SIZES,
    MANIFOLD_DIM,
    SCALED,
    SIGNALS,
    UNET_METHOD,
    DataSpec,
    Defaults,
    StudyConfig,
    library_defaults,
)

CACHE_FORMAT = 5
READS_FORMATS = (4, 5)  # format 4 has no ``hessian_score_norm`` (None after loading)
ABS_PROBE_SEED = 1000  # the absolute monitor draws its probes with seed + this (the truth's: seed)
LOSS_GAP_SEED = 7  # the loss gap's subset and noises: seed + this


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CheckRecord:
    """One check of a run, as the callback reported it through ``on_check_end``.

    Attributes:
        step: global step of the check.
        results: evaluation timestep -> :class:`memwatch.SharpnessResult` of the probes.
        nn_ratio: ``[P]`` float, the probes' ``d₁/d₂`` to the training set.
        loss_train, loss_held: ``[K]`` ε-losses at the study's fixed timesteps and noises on the
            training set and the held-out split (``None`` when the monitor does not record them).
        hessian_score_norm: ``[P]`` Jeon et al.'s ‖H s‖ of the probes at the noisiest sampler state.
    """

    step: int
    results: dict[float, SharpnessResult]
    nn_ratio: torch.Tensor | None
    loss_train: np.ndarray | None = None
    loss_held: np.ndarray | None = None
    hessian_score_norm: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything the analysis needs from one training run (``C`` checks of ``P`` probes).

    Three monitors watch every run: one with the fixed absolute rule ``config.ABSOLUTE_RULE``
    (the library's former defaults), its own probes — seed +
    ``ABS_PROBE_SEED`` — and ``reference_data="batches"``: the detector; one with the same settings
    and probes measured by the cheap trace tier (``method="trace"``; on a UNet the absolute monitor
    itself); and one with ``sigmas="auto"`` and every factor of the study (the library's default
    factor among them), whose probes (seed) against the training set are the ground truth.

    Attributes:
        dataset, n, seed: which run (data set, training-set size N, seed).
        dim: data dimension d.
        median_nn: median nearest-neighbour distance of the training set (all N points).
        sigma: noise-level name (``"abs 0.3"``, ``"auto 0.2"``) -> σ_t measured (nearest timestep);
            the ``auto`` levels are the monitor's own calibration (clamped inside the schedule).
        steps: ``[C]`` int, the check steps.
        nn_ratio: ``[C, P]`` float64, the probes' ``d₁/d₂`` (the ``auto`` monitor's probes).
        nn_ratio_abs: ``[C, P]`` the absolute monitor's probes' ``d₁/d₂`` to the training
            samples that monitor saw in the batches (its reservoir; the whole training set here,
            N ≤ its capacity).
        signals: noise-level name -> signal name -> ``[C, P]`` float64 raw values.
        loss_t: ``[K]`` the fixed timesteps of the loss-gap baseline.
        loss_train, loss_held: ``[C, K]`` ε-losses on the training set and the held-out split.
        shipped: the callback defaults the run was made with.
        shipped_onset: the absolute monitor's own onset step (``None``: none declared).
        seconds: wall time of the run; cpu_seconds: its CPU time (one thread).
        hessian_score_norm: ``[C, P]`` Jeon et al.'s ‖H s‖ of the ``auto`` monitor's probes (the
            truth's) at the noisiest sampler state; ``None`` in caches of format 4.
    """

    dataset: str
    n: int
    seed: int
    dim: int
    median_nn: float
    sigma: dict[str, float]
    steps: np.ndarray
    nn_ratio: np.ndarray
    nn_ratio_abs: np.ndarray
    signals: dict[str, dict[str, np.ndarray]]
    loss_t: np.ndarray
    loss_train: np.ndarray
    loss_held: np.ndarray
    shipped: Defaults
    shipped_onset: int | None
    seconds: float
    cpu_seconds: float | None = None
    hessian_score_norm: np.ndarray | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        """``(dataset, n, seed)``: identifies the run."""
        return (self.dataset, self.n, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain form stored in the cache."""
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["shipped"] = self.shipped.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "shipped": Defaults.from_dict(d["shipped"])})


@dataclass(frozen=True)
class Timing:
    """How the runs were made: ``size`` (``"--fast"`` / ``"default"``), ``seconds`` of wall time for
    all of them, ``workers``, ``machine``; ``note``: an optional remark printed in the report."""

    size: str
    seconds: float
    workers: int
    machine: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain form stored in the cache (no ``note`` key when there is none)."""
        d = asdict(self)
        if d["note"] is None:
            del d["note"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timing:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def save_cache(path: Path, runs: Sequence[RunRecord], timing: Timing, cfg: StudyConfig) -> None:
    """Write ``runs`` to ``path`` in the cache format of this module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CACHE_FORMAT, "runs": [r.to_dict() for r in runs], "timing": timing.to_dict()}
    torch.save({**blob, "config": asdict(cfg)}, path)


def load_cache(path: Path) -> tuple[list[RunRecord], Timing]:
    """Read a cache written by :func:`save_cache`."""
    blob = torch.load(path, weights_only=False)
    version = blob.get("format", 1)
    if version not in READS_FORMATS:
        raise MemwatchError(f"{path}: cache format {version!r} is not supported (this study reads {READS_FORMATS})")
    return [RunRecord.from_dict(r) for r in blob["runs"]], Timing.from_dict(blob["timing"])


# ----------------------------------------------------------------------------- data
def _raw_data(base: str, n: int, seed: int) -> torch.Tensor:
    """``n`` samples of base data set ``base`` (float32), seeded; the first ``k`` of ``n`` and of
    ``n' > n`` samples need not agree."""
    if base == "digits" or base in IMAGE_SIZES:
        return digits(n, seed=seed, image_size=IMAGE_SIZES.get(base, 8))
    if base == "gmm":
        means = torch.randn(GMM_COMPONENTS, MANIFOLD_DIM, generator=torch.Generator().manual_seed(GMM_SEED))
        gmm = GaussianMixture.isotropic(means, std=GMM_STD)
        return gmm.sample(n, generator=torch.Generator().manual_seed(seed)).float()
    return manifold(base, n, MANIFOLD_DIM, seed=seed)


def make_data(name: str, n: int, seed: int, held_out: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training samples of data set ``name`` and ``held_out`` further samples of the same
    distribution (disjoint draws; float32, seeded). ``name`` is a base set (``"digits"``,
    ``"gmm"``, ``"swiss_roll"``, ``"s_curve"``), an upsampled one of :data:`config.IMAGE_SIZES`,
    or a rescaled one of :data:`config.SCALED`
    (the same samples, mapped by ``a · x + b``)."""
    base, (a, b) = SCALED.get(name, (name, (1.0, 0.0)))
    x = _raw_data(base, n + held_out, seed) * a + b
    return x[:n], x[n:]


# ----------------------------------------------------------------------------- training
class RecordingMonitor(MemorizationMonitor):
    """``MemorizationMonitor`` that keeps every check's per-probe results in :attr:`checks` and,
    given ``loss_gap``, the ε-losses of the loss-gap baseline at each check (per timestep, as
    the analysis needs them; the monitor's own ``heldout_data`` logs their means)."""

    def __init__(self, *args: Any, study_loss_gap: LossGap | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[CheckRecord] = []
        self.study_loss_gap = study_loss_gap

    def on_check_end(self, trainer: Any, pl_module: Any, check: CheckResult) -> None:
        losses: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        if self.study_loss_gap is not None:
            with isolated(pl_module):
                losses = tuple(v.numpy() for v in self.study_loss_gap.losses(find_score(pl_module)))
        ratio = None if check.nn_ratio is None else check.nn_ratio.detach().cpu().clone()
        hs = None if check.hessian_score_norm is None else check.hessian_score_norm.detach().cpu().clone()
        self.checks.append(CheckRecord(check.step, dict(check.results), ratio, *losses, hessian_score_norm=hs))
        self.samples = check.samples  # the last check's probes (the trace monitor must share them)


def _training_parts(model: str) -> tuple[type, type]:
    """The training module of ``model`` (``"mlp"``: ``DDPMModule``; ``"unet"``: ``UNetDDPMModule``)
    made not to ``self.log`` the loss, and a data module yielding whole batches; both only to
    save time (measured on the shared 2-core CPU, MLP: 7.3 → 3.8 ms per step; Lightning's
    per-step ``self.log`` with ``logger=False`` and per-item collation). The training itself is
    the module's, and the monitor reads neither."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    from memwatch.apps.toymodels import DDPMModule, UNetDDPMModule

    class Quiet(UNetDDPMModule if model == "unet" else DDPMModule):  # type: ignore[misc]
        def log(self, *args: Any, **kwargs: Any) -> None:
            return None

    class _Batches(IterableDataset):
        def __init__(self, x: torch.Tensor, batch_size: int, steps: int, seed: int) -> None:
            self.x, self.batch_size, self.steps, self.seed = x, batch_size, steps, seed

        def __iter__(self) -> Iterator[torch.Tensor]:
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(self.steps):
                yield self.x[torch.randint(0, len(self.x), (self.batch_size,), generator=g)]

    class BatchDataModule(pl.LightningDataModule):
        """Batches of ``batch_size`` drawn with replacement from ``x`` (seeded), ``steps`` per epoch."""

        def __init__(self, x: torch.Tensor, batch_size: int, steps: int, seed: int) -> None:
            super().__init__()
            self.x, self.batch_size, self.steps, self.seed = x, batch_size, steps, seed

        def train_dataloader(self) -> DataLoader:
            return DataLoader(_Batches(self.x, self.batch_size, self.steps, self.seed), batch_size=None)

    return Quiet, BatchDataModule


@dataclass(frozen=True)
class RunJob:
    """One run to train: the study, the data set, N and the seed."""

    cfg: StudyConfig
    spec: DataSpec
    n: int
    seed: int


def _monitor(
    job: RunJob,
    reference: torch.Tensor | str | None,
    seed: int,
    *,
    sigmas: Any = defaults.SIGMAS,
    sigma_factors: tuple[float, ...] = defaults.SIGMA_FACTORS,
    score_threshold: float = defaults.SCORE_THRESHOLD,
    onset_threshold: float = defaults.ONSET_THRESHOLD,
    method: str = "auto",
    loss_gap: LossGap | None = None,
) -> RecordingMonitor:
    """A :class:`RecordingMonitor` with the study's cadence and probes (drawn with ``seed``), the
    ``reference`` data, and the rule's noise levels and thresholds on top of the library defaults."""
    return RecordingMonitor(
        every_n_train_steps=job.spec.every,
        num_probes=job.cfg.num_probes,
        sigmas=sigmas,
        reference_data=reference,
        probes=ProbeOptions(sampler_steps=job.cfg.sampler_steps, seed=seed, sigma_factors=sigma_factors),
        sharpness=SharpnessCheckOptions(method=method, score_threshold=score_threshold),
        onset=OnsetOptions(threshold=onset_threshold),
        checkpoint=CheckpointOptions(save=False),
        report=ReportOptions(figures=False, verbose=False, raise_errors=True),
        study_loss_gap=loss_gap,
    )


def _fit(
    job: RunJob, x: torch.Tensor, held: torch.Tensor
) -> tuple[Any, RecordingMonitor, RecordingMonitor, RecordingMonitor]:
    """Train one model on ``x`` with three :class:`RecordingMonitor` s: the fixed absolute rule
    (:data:`config.ABSOLUTE_RULE`), the same with the cheap trace tier (``method="trace"``, the same probes), and
    ``sigmas="auto"`` at every factor of the study (with the loss gap on ``held``); return the
    module and the monitors. A UNet's monitors all measure on :data:`config.UNET_METHOD`, so its
    absolute monitor is returned as the trace monitor too (one measurement, not two)."""
    import lightning.pytorch as pl

    module_cls, data_cls = _training_parts(job.spec.model)
    cfg, spec = job.cfg, job.spec
    pl.seed_everything(job.seed, verbose=False)
    if spec.model == "unet":
        from diffusers import DDPMScheduler

        from memwatch.apps.toymodels import tiny_unet

        unet = tiny_unet(x.shape[1], x.shape[-1], widths=(spec.hidden, 2 * spec.hidden))
        module = module_cls(unet, DDPMScheduler(), lr=spec.lr)  # the default scheduler: clip_sample, linear betas
        tier = {"method": UNET_METHOD}
    else:
        module = module_cls(shape=tuple(x.shape[1:]), hidden=spec.hidden, depth=cfg.depth, lr=spec.lr)
        tier = {}
    # the detector's probes are not the truth's: its own seed, and copies of the batches it saw
    absolute = _monitor(job, "batches", job.seed + ABS_PROBE_SEED, **ABSOLUTE_RULE, **tier)
    # the absolute monitor's probes on the cheap tier (a UNet's absolute monitor is already on it)
    trace = None if tier else _monitor(job, None, job.seed + ABS_PROBE_SEED, **ABSOLUTE_RULE, method="trace")
    gap = LossGap(x, held, timesteps=cfg.loss_timesteps, size=cfg.held_out, seed=job.seed + LOSS_GAP_SEED)
    auto = _monitor(job, x, job.seed, sigmas="auto", sigma_factors=cfg.sigma_factors, loss_gap=gap, **tier)
    trainer = pl.Trainer(
        max_steps=spec.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[m for m in (auto, absolute, trace) if m is not None],
    )
    trainer.fit(module, data_cls(x, spec.batch_size or cfg.batch_size, spec.max_steps, job.seed))
    return module, absolute, trace or absolute, auto


def _stack(checks: Sequence[CheckRecord], t: float, value: Any) -> np.ndarray:
    """``[C, P]`` float64: ``value(SharpnessResult)`` at timestep ``t`` for every check."""
    return np.stack([value(c.results[t]).double().numpy() for c in checks])


def _signals(checks: Sequence[CheckRecord], t: float) -> dict[str, np.ndarray]:
    """Signal name -> ``[C, P]`` at timestep ``t``."""
    return {name: _stack(checks, t, sig.value) for name, sig in SIGNALS.items()}


def _ratios(checks: Sequence[CheckRecord]) -> np.ndarray:
    return np.stack([c.nn_ratio.double().numpy() for c in checks])


def train_run(job: RunJob) -> RunRecord:
    """Train one model with both monitors (one thread) and return its recorded checks as a :class:`RunRecord`."""
    quiet()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    x, held = make_data(job.spec.name, job.n, job.seed, job.cfg.held_out)
    module, absolute, trace, auto = _fit(job, x, held)
    if trace is not absolute and not torch.equal(
        absolute.samples, trace.samples
    ):  # the trace tier's labels are the absolute monitor's
        raise MemwatchError(f"{job.spec.name} N={job.n}: the trace monitor drew other probes than the absolute one")
    schedule = find_score(module).schedule  # what the monitors found: the module's, or its diffusers scheduler's
    t_of = {f"abs {s:g}": float(schedule.timestep_for_sigma(float(s))) for s in absolute.sigmas}
    t_of.update({f"trace {s:g}": float(schedule.timestep_for_sigma(float(s))) for s in trace.sigmas})
    assert auto.calibrated_sigmas is not None
    for c, s in zip(job.cfg.sigma_factors, auto.calibrated_sigmas):
        t_of[f"auto {c:g}"] = float(schedule.timestep_for_sigma(float(s)))
    monitors = {"abs": absolute, "trace": trace, "auto": auto}
    checks_of = {key: monitors[key.split()[0]].checks for key in t_of}
    return RunRecord(
        dataset=job.spec.name,
        n=job.n,
        seed=job.seed,
        dim=int(x[0].numel()),
        median_nn=median_nn_distance(x),
        sigma={key: float(schedule.sigma(t)) for key, t in t_of.items()},
        steps=np.array([c.step for c in auto.checks]),
        nn_ratio=_ratios(auto.checks),
        nn_ratio_abs=_ratios(absolute.checks),
        signals={key: _signals(checks_of[key], t) for key, t in t_of.items()},
        loss_t=np.array(job.cfg.loss_timesteps),
        loss_train=np.stack([c.loss_train for c in auto.checks]),
        loss_held=np.stack([c.loss_held for c in auto.checks]),
        shipped=library_defaults(),
        shipped_onset=absolute.onset_step,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,  # ≈ wall time on an idle core (1 thread)
        hessian_score_norm=np.stack([c.hessian_score_norm.double().numpy() for c in auto.checks]),
    )


def quiet() -> None:
    """Silence Lightning's and the monitor's routine warnings and log lines in this process."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*memorization onset.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def jobs_of(cfg: StudyConfig) -> list[RunJob]:
    """Every run of the study, longest first (so two workers finish together)."""
    jobs = [RunJob(cfg, spec, n, seed) for seed in cfg.seeds for spec in cfg.data for n in spec.ns]
    jobs.sort(key=lambda j: -j.spec.cost)
    return jobs


def run_all(cfg: StudyConfig, workers: int) -> list[RunRecord]:
    """Train every run of ``cfg`` (``workers`` processes, one thread each), printing progress;
    sorted by data set, N, seed."""
    jobs = jobs_of(cfg)
    runs: list[RunRecord] = []
    started = time.perf_counter()

    def done(run: RunRecord) -> None:
        runs.append(run)
        print(
            f"  [{len(runs):3d}/{len(jobs)}] {run.dataset:<10} N={run.n:<5} seed={run.seed} "
            f"{run.seconds:6.1f}s  (elapsed {time.perf_counter() - started:6.0f}s)",
            flush=True,
        )

    if workers <= 1:
        for job in jobs:
            done(train_run(job))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for run in pool.map(train_run, jobs):
                done(run)
    runs.sort(key=lambda r: r.key)
    return runs


def machine() -> str:
    """``"x86_64, 2 CPU(s)"``: the machine, as the report names it."""
    return f"{platform.machine()}, {os.cpu_count()} CPU(s)"
