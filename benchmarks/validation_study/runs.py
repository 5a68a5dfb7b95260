"""Training the study's runs and keeping what the callback measured: :class:`CheckRecord` (one
check, as the callback reported it), :class:`RunRecord` (one run, as plain arrays), and the cache.

Cache format (``torch.save``; plain dicts, lists and numpy arrays only, so a cache loads without
this package): ``{"format": 1, "runs": [RunRecord.to_dict(), ...], "timing": Timing.to_dict(),
"config": dataclasses.asdict(StudyConfig)}``. Caches written before the format was numbered have
no ``"format"`` key and the same layout; both load.
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

from memwatch import CheckResult, MemorizationMonitor, SharpnessResult, median_nn_distance
from memwatch.data import GaussianMixture, digits, manifold
from memwatch.errors import MemwatchError

from .config import (
    GMM_COMPONENTS,
    GMM_SEED,
    GMM_STD,
    MANIFOLD_DIM,
    SIGNALS,
    DataSpec,
    Defaults,
    StudyConfig,
    library_defaults,
)

CACHE_FORMAT = 1


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CheckRecord:
    """One check of a run, as the callback reported it through ``on_check_end``.

    Attributes:
        step: global step of the check.
        results: evaluation timestep -> :class:`memwatch.SharpnessResult` of the probes.
        nn_ratio: ``[P]`` float, the probes' ``d₁/d₂`` to the training set.
    """

    step: int
    results: dict[float, SharpnessResult]
    nn_ratio: torch.Tensor


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything the analysis needs from one training run (``C`` checks of ``P`` probes).

    Attributes:
        dataset, n, seed: which run (data set, training-set size N, seed).
        dim: data dimension d.
        median_nn: median nearest-neighbour distance of the training set.
        sigma: noise-level name (``"abs 0.3"``, ``"rel 0.1"``) -> σ_t measured (nearest timestep).
        steps: ``[C]`` int, the check steps.
        nn_ratio: ``[C, P]`` float64, the probes' ``d₁/d₂``.
        signals: noise-level name -> signal name -> ``[C, P]`` float64 raw values.
        shipped: the callback defaults the run was made with.
        shipped_primary_score: ``[C, P]`` the callback's score at its primary noise level.
        shipped_onset: the callback's own onset step (``None``: none declared).
        seconds: wall time of the run.
        cpu_seconds: CPU time of the run (one thread; ``None`` in caches that predate it).
    """

    dataset: str
    n: int
    seed: int
    dim: int
    median_nn: float
    sigma: dict[str, float]
    steps: np.ndarray
    nn_ratio: np.ndarray
    signals: dict[str, dict[str, np.ndarray]]
    shipped: Defaults
    shipped_primary_score: np.ndarray
    shipped_onset: int | None
    seconds: float
    cpu_seconds: float | None = None

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
    """Read a cache written by :func:`save_cache` (or by the study before the format was numbered)."""
    blob = torch.load(path, weights_only=False)
    version = blob.get("format", 1)
    if version != CACHE_FORMAT:
        raise MemwatchError(f"{path}: cache format {version!r} is not supported (this study reads {CACHE_FORMAT})")
    return [RunRecord.from_dict(r) for r in blob["runs"]], Timing.from_dict(blob["timing"])


# ----------------------------------------------------------------------------- data
def make_data(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` training samples of data set ``name`` (float32), seeded."""
    if name == "digits":
        return digits(n, seed=seed)
    if name == "gmm":
        means = torch.randn(GMM_COMPONENTS, MANIFOLD_DIM, generator=torch.Generator().manual_seed(GMM_SEED))
        gmm = GaussianMixture.isotropic(means, std=GMM_STD)
        return gmm.sample(n, generator=torch.Generator().manual_seed(seed)).float()
    return manifold(name, n, MANIFOLD_DIM, seed=seed)


def noise_levels(cfg: StudyConfig, median_nn: float) -> dict[str, float]:
    """Noise-level name -> σ_t asked for: absolute levels, then ``c · median_nn``."""
    sigma_of = {f"abs {s:g}": float(s) for s in cfg.abs_sigmas}
    sigma_of.update({f"rel {c:g}": float(c) * median_nn for c in cfg.rel_sigmas})
    return sigma_of


# ----------------------------------------------------------------------------- training
class RecordingMonitor(MemorizationMonitor):
    """``MemorizationMonitor`` that keeps every check's per-probe results in :attr:`checks`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[CheckRecord] = []

    def on_check_end(self, trainer: Any, pl_module: Any, check: CheckResult) -> None:
        self.checks.append(CheckRecord(check.step, dict(check.results), check.nn_ratio.detach().cpu().clone()))


def _training_parts() -> tuple[type, type]:
    """A ``DDPMModule`` that does not ``self.log`` the loss, and a data module yielding whole
    batches; both only to save time (measured on the shared 2-core CPU: 7.3 → 3.8 ms per step;
    Lightning's per-step ``self.log`` with ``logger=False`` and per-item collation). The training
    itself is ``DDPMModule``'s, and the monitor reads neither."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    from memwatch.toymodels import DDPMModule

    class QuietDDPM(DDPMModule):
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

    return QuietDDPM, BatchDataModule


@dataclass(frozen=True)
class RunJob:
    """One run to train: the study, the data set, N and the seed."""

    cfg: StudyConfig
    spec: DataSpec
    n: int
    seed: int


def _fit(job: RunJob, x: torch.Tensor, sigmas: Sequence[float]) -> tuple[Any, RecordingMonitor]:
    """Train one ``DDPMModule`` on ``x`` with a :class:`RecordingMonitor` at ``sigmas``; return both."""
    import lightning.pytorch as pl

    module_cls, data_cls = _training_parts()
    cfg, spec = job.cfg, job.spec
    pl.seed_everything(job.seed, verbose=False)
    module = module_cls(shape=tuple(x.shape[1:]), hidden=spec.hidden, depth=cfg.depth, lr=spec.lr)
    monitor = RecordingMonitor(
        every_n_train_steps=spec.every,
        num_probes=cfg.num_probes,
        sampler_steps=cfg.sampler_steps,
        sigmas=list(sigmas),
        reference_data=x,
        seed=job.seed,
        save_clean_checkpoint=False,
        verbose=False,
        raise_errors=True,
    )
    trainer = pl.Trainer(
        max_steps=spec.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    trainer.fit(module, data_cls(x, cfg.batch_size, spec.max_steps, job.seed))
    return module, monitor


def _stack(checks: Sequence[CheckRecord], t: float, value: Any) -> np.ndarray:
    """``[C, P]`` float64: ``value(SharpnessResult)`` at timestep ``t`` for every check."""
    return np.stack([value(c.results[t]).double().numpy() for c in checks])


def train_run(job: RunJob) -> RunRecord:
    """Train one model with the monitor (one thread) and return its recorded checks as a :class:`RunRecord`."""
    quiet()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    x = make_data(job.spec.name, job.n, job.seed)
    mnn = median_nn_distance(x)
    shipped = library_defaults()
    sigma_of = noise_levels(job.cfg, mnn)
    # the callback measures the shipped levels (primary first) and every level of the study at once
    sigmas = list(dict.fromkeys([float(shipped.sigmas[0]), *shipped.sigmas[1:], *sigma_of.values()]))
    module, monitor = _fit(job, x, sigmas)
    schedule, checks = module.schedule, monitor.checks
    t_of = {key: float(schedule.timestep_for_sigma(s)) for key, s in sigma_of.items()}
    primary_t = float(schedule.timestep_for_sigma(float(shipped.sigmas[0])))
    return RunRecord(
        dataset=job.spec.name,
        n=job.n,
        seed=job.seed,
        dim=int(x[0].numel()),
        median_nn=mnn,
        sigma={key: float(schedule.sigma(t)) for key, t in t_of.items()},
        steps=np.array([c.step for c in checks]),
        nn_ratio=np.stack([c.nn_ratio.double().numpy() for c in checks]),
        signals={key: {name: _stack(checks, t, sig.value) for name, sig in SIGNALS.items()} for key, t in t_of.items()},
        shipped=shipped,
        shipped_primary_score=_stack(checks, primary_t, lambda r: r.memorization_score),
        shipped_onset=monitor.onset_step,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,  # ≈ wall time on an idle core (1 thread)
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
    jobs.sort(key=lambda j: -j.spec.max_steps * (4 if j.spec.name == "digits" else 1))
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
