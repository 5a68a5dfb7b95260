"""Training the study's runs and keeping what the callback measured: :class:`CheckRecord` (one
check, as the callback reported it), :class:`RunRecord` (one run, as plain arrays), and the cache.

Cache format (``torch.save``; plain dicts, lists and numpy arrays only, so a cache loads without
this package): ``{"format": 6, "runs": [RunRecord.to_dict(), ...], "timing": Timing.to_dict(),
"config": dataclasses.asdict(StudyConfig)}``, rewritten after every finished run. Format 7 (study v4: the
monitor's own copy index of the batches beside the study's truth, one noise level) does not read
older caches.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memwatch import (
    CheckpointOptions,
    CheckResult,
    DataOptions,
    MemorizationMonitor,
    ProbeOptions,
    ReportOptions,
    SharpnessCheckOptions,
    SharpnessResult,
    median_nn_distance,
    nn_ratio,
)
from memwatch.callback import find_score
from memwatch.data import GaussianMixture, digits, manifold
from memwatch.errors import MemwatchError
from memwatch.lid import LidReading
from memwatch.lossgap import LossGap
from memwatch.probes import isolated

from .augment import AugmentedItems, all_views, item_ratio
from .config import (
    AUGMENTED,
    DUPLICATED,
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

CACHE_FORMAT = 7
READS_FORMATS = (7,)
LOSS_GAP_SEED = 7  # the loss gap's subset and noises: seed + this
VIEW_SEED = 11  # the augmented runs' view draws: seed + this (the item draws use the seed itself)


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CheckRecord:
    """One check of a run, as the callback reported it through ``on_check_end``.

    Attributes:
        step: global step of the check.
        results: evaluation timestep -> :class:`memwatch.SharpnessResult` of the probes.
        samples: ``[P, *shape]`` the probes (final samples), on the CPU.
        monitor_ratio: ``[P]`` float, the probes' ``d₁/d₂`` in the monitor's own copy index of the
            batches (``check.nn_ratio``; NaN where it could not tell).
        lid: the LID signal's reading (:class:`memwatch.lid.LidReading`).
        loss_train, loss_held: ``[K]`` ε-losses at the study's fixed timesteps and noises on the
            training set and the held-out split (empty without the study's loss gap).
        hessian_score_norm: ``[P]`` Jeon et al.'s ‖H s‖ of the probes at the noisiest sampler state.
        values: the check's logged scalars (``memorized_fraction``, ``nn_memorized_fraction``, …).
    """

    step: int
    results: dict[float, SharpnessResult]
    samples: torch.Tensor
    monitor_ratio: torch.Tensor
    lid: LidReading
    loss_train: np.ndarray
    loss_held: np.ndarray
    hessian_score_norm: torch.Tensor
    values: dict[str, float]


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything the analysis needs from one training run (``C`` checks of ``P`` probes).

    One monitor watches every run as the library runs it by default — ``reference_data="batches"``
    (its own copy index of the distinct training samples it sees; on an augmented run with the
    batches' item ids), ``sigmas="auto"`` at the study's factor — but the study's cadence and probes.
    The study's ground truth is computed separately, on the same probes, against the distinct
    training set (per item on an augmented run, :func:`.augment.item_ratio`).

    Attributes:
        dataset, n, seed: which run (data set, training-set size N — distinct items —, seed).
        dim: data dimension d.
        median_nn: median nearest-neighbour distance of the (distinct) training set.
        sigma: noise-level name (``"auto 0.1"``) -> σ_t measured (the monitor's own calibration).
        steps: ``[C]`` int, the check steps.
        nn_ratio: ``[C, P]`` float64, the study's truth: the probes' ``d₁/d₂`` to the distinct
            training set (over items, each at its nearest view, on an augmented run).
        monitor_ratio: ``[C, P]`` float64, the monitor's own ``d₁/d₂`` in its index of the batches.
        plain_ratio: ``[C, P]`` float64 on augmented runs: the same from a second monitor given no
            item ids (every distinct view its own sample), on the same probes; else ``None``.
        plain_probe_gap: on augmented runs the largest ``|Δ|`` between the two monitors' probes
            (0: the same probes), else ``None``.
        samples: ``[C, P, d]`` float32, the probes (flattened).
        signals: noise-level name -> signal name -> ``[C, P]`` float64 raw values (with
            ``"denoising_lid"`` from the LID signal).
        data_lid: noise-level name -> the LID signal's data LID (dimensions, from the monitor's
            reservoir at its first check).
        values: logged scalar name -> ``[C]`` float64 (the monitor's own reading at each check).
        loss_t: ``[K]`` the fixed timesteps of the loss-gap baseline.
        loss_train, loss_held: ``[C, K]`` ε-losses on the training set and the held-out split.
        hessian_score_norm: ``[C, P]`` Jeon et al.'s ‖H s‖ at the noisiest sampler state.
        check_seconds: ``[C]`` wall time of each check (s).
        shipped: the callback defaults the run was made with.
        seconds: wall time of the run; cpu_seconds: its CPU time (one thread).
    """

    dataset: str
    n: int
    seed: int
    dim: int
    median_nn: float
    sigma: dict[str, float]
    steps: np.ndarray
    nn_ratio: np.ndarray
    monitor_ratio: np.ndarray
    plain_ratio: np.ndarray | None
    plain_probe_gap: float | None
    samples: np.ndarray
    signals: dict[str, dict[str, np.ndarray]]
    data_lid: dict[str, float]
    values: dict[str, np.ndarray]
    loss_t: np.ndarray
    loss_train: np.ndarray
    loss_held: np.ndarray
    hessian_score_norm: np.ndarray
    check_seconds: np.ndarray
    shipped: Defaults
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


def load_cache(*paths: Path) -> tuple[list[RunRecord], Timing]:
    """Read one or more caches written by :func:`save_cache` (e.g. runs trained by separate
    processes): their runs (each key once), and one :class:`Timing` whose ``seconds`` is the sum
    of theirs."""
    runs: dict[tuple[str, int, int], RunRecord] = {}
    timings = []
    for path in paths:
        blob = torch.load(path, weights_only=False)
        version = blob.get("format", 1)
        if version not in READS_FORMATS:
            raise MemwatchError(f"{path}: cache format {version!r} is not supported (this study reads {READS_FORMATS})")
        for d in blob["runs"]:
            run = RunRecord.from_dict(d)
            if run.key in runs:
                raise MemwatchError(f"{path}: run {run.key} is in more than one of the caches {paths}")
            runs[run.key] = run
        timings.append(Timing.from_dict(blob["timing"]))
    first = timings[0]
    if len(timings) == 1:
        return list(runs.values()), first
    note = (
        f"Wall time summed over {len(timings)} training processes ({', '.join(f'{t.seconds:.0f} s' for t in timings)})."
    )
    return list(runs.values()), replace(first, seconds=sum(t.seconds for t in timings), note=note)


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
    """``n`` distinct training samples of data set ``name`` and ``held_out`` further samples of
    the same distribution (disjoint draws; float32, seeded). ``name`` is a base set (``"digits"``,
    ``"gmm"``, ``"swiss_roll"``, ``"s_curve"``), an upsampled one of :data:`config.IMAGE_SIZES`,
    a rescaled one of :data:`config.SCALED` (the same samples, mapped by ``a · x + b``) or a
    duplicated one of :data:`config.DUPLICATED` (its base set; :func:`training_set` adds the repeats)
    or an augmented one of :data:`config.AUGMENTED` (its base set's items; the training batches are views)."""
    plain = AUGMENTED.get(name, DUPLICATED.get(name, (name,))[0])
    base, (a, b) = SCALED.get(name, (plain, (1.0, 0.0)))
    x = _raw_data(base, n + held_out, seed) * a + b
    return x[:n], x[n:]


def training_set(name: str, x: torch.Tensor) -> torch.Tensor:
    """What the model trains on: the distinct samples ``x``, plus, for a data set of
    :data:`config.DUPLICATED`, its first items repeated (``[N + items · repeats, *shape]``)."""
    if name not in DUPLICATED:
        return x
    _, items, repeats = DUPLICATED[name]
    return torch.cat([x, x[:items].repeat_interleave(repeats, 0)])


# ----------------------------------------------------------------------------- training
class RecordingMonitor(MemorizationMonitor):
    """``MemorizationMonitor`` that keeps every check's per-probe results in :attr:`checks`, with
    the ε-losses of ``study_loss_gap`` at each check when given (per timestep, as the analysis
    needs them; the monitor's own ``loss_gap`` logs their means). ``tag`` tells two monitors of
    one run apart in Lightning's callback state keys."""

    def __init__(self, *args: Any, study_loss_gap: LossGap | None = None, tag: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[CheckRecord] = []
        self.seconds: list[float] = []
        self.study_loss_gap, self.tag = study_loss_gap, tag

    @property
    def state_key(self) -> str:
        return super().state_key + self.tag

    def on_check_end(self, trainer: Any, pl_module: Any, check: CheckResult) -> None:
        losses: tuple[np.ndarray, ...] = (np.zeros(0), np.zeros(0))
        if self.study_loss_gap is not None:
            with isolated(pl_module):
                losses = tuple(v.numpy() for v in self.study_loss_gap.losses(find_score(pl_module)))
        assert check.lid is not None and check.hessian_score_norm is not None
        samples = check.samples.detach().cpu().clone()
        ratio = torch.full((len(samples),), torch.nan) if check.nn_ratio is None else check.nn_ratio.detach().cpu()
        hs = check.hessian_score_norm.detach().cpu().clone()
        record = CheckRecord(check.step, dict(check.results), samples, ratio.clone(), check.lid, *losses, hs,
                             dict(check.values))  # fmt: skip
        self.checks.append(record)
        self.seconds.append(check.values["check_seconds"])


def training_parts(model: str) -> tuple[type, type, type]:
    """The training module of ``model`` (``"mlp"``: ``DDPMModule``; ``"unet"``: ``UNetDDPMModule``)
    made not to ``self.log`` the loss; a data module yielding whole batches drawn with replacement
    (both only to save time — measured on the shared 2-core CPU, MLP: 7.3 → 3.8 ms per step;
    Lightning's per-step ``self.log`` with ``logger=False`` and per-item collation — the training
    itself is the module's, and the monitor reads neither); and a data module of an augmented
    set, whose :class:`.augment.AugmentedItems` returns ``(random view, item id)`` per item, as a
    user's augmenting Dataset would."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

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

    class AugmentedDataModule(BatchDataModule):
        """Batches ``(views [b, *shape], item ids [b])`` of items of ``x`` drawn with replacement (seeded)."""

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(self.seed)
            draws = RandomSampler(range(len(self.x)), replacement=True, num_samples=self.steps * self.batch_size,
                                  generator=g)  # fmt: skip
            views = AugmentedItems(self.x, self.seed + VIEW_SEED)  # its own stream: views independent of the draws
            return DataLoader(views, batch_size=self.batch_size, sampler=draws)

    return Quiet, BatchDataModule, AugmentedDataModule


@dataclass(frozen=True)
class RunJob:
    """One run to train: the study, the data set, N and the seed."""

    cfg: StudyConfig
    spec: DataSpec
    n: int
    seed: int


def monitor_for(
    job: RunJob, loss_gap: LossGap | None, data: DataOptions, method: str = "auto", tag: str = ""
) -> RecordingMonitor:
    """A :class:`RecordingMonitor` as the library runs by default — ``reference_data="batches"``,
    ``sigmas="auto"`` — but the study's cadence, probes (drawn with the run's seed) and noise
    factor, ``data`` (how it reads the batches), no checkpoint or figures, and faults raised."""
    cfg = job.cfg
    return RecordingMonitor(
        every_n_train_steps=job.spec.every,
        num_probes=cfg.num_probes,
        reference_data="batches",
        data=data,
        probes=ProbeOptions(sampler_steps=cfg.sampler_steps, seed=job.seed, sigma_factors=cfg.sigma_factors),
        sharpness=SharpnessCheckOptions(method=method),
        checkpoint=CheckpointOptions(save=False),
        report=ReportOptions(figures=False, verbose=False, raise_errors=True),
        study_loss_gap=loss_gap,
        tag=tag,
    )


def monitors_for(job: RunJob, loss_gap: LossGap) -> list[RecordingMonitor]:
    """The run's monitors: the library's (:func:`monitor_for`); on an augmented run it reads the
    batches' item ids, and a second one reads the views alone (no ids, no loss gap), on the same
    probes: what the copy ratio would be without ids."""
    method = UNET_METHOD if job.spec.model == "unet" else "auto"
    if job.spec.name not in AUGMENTED:
        return [monitor_for(job, loss_gap, DataOptions(), method)]
    with_ids = DataOptions(select=0, ids=1)
    return [
        monitor_for(job, loss_gap, with_ids, method),
        monitor_for(job, None, DataOptions(select=0), method, tag="[no ids]"),
    ]


def _fit(job: RunJob, x: torch.Tensor, held: torch.Tensor) -> tuple[Any, list[RecordingMonitor]]:
    """Train one model on ``x`` (its repeats, :func:`training_set`, or its views) with the study's
    monitors (the loss gap on ``held``); return the module and the monitors."""
    import lightning.pytorch as pl

    module_cls, data_cls, augmented_cls = training_parts(job.spec.model)
    cfg, spec = job.cfg, job.spec
    pl.seed_everything(job.seed, verbose=False)
    if spec.model == "unet":
        from diffusers import DDPMScheduler

        from memwatch.apps.toymodels import tiny_unet

        unet = tiny_unet(x.shape[1], x.shape[-1], widths=(spec.hidden, 2 * spec.hidden))
        module = module_cls(unet, DDPMScheduler(), lr=spec.lr)  # the default scheduler: clip_sample, linear betas
    else:
        module = module_cls(shape=tuple(x.shape[1:]), hidden=spec.hidden, depth=cfg.depth, lr=spec.lr)
    train = training_set(spec.name, x)
    gap = LossGap(train, held, timesteps=cfg.loss_timesteps, size=cfg.held_out, seed=job.seed + LOSS_GAP_SEED)
    monitors = monitors_for(job, gap)
    trainer = pl.Trainer(
        max_steps=spec.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=monitors,
    )
    datamodule = augmented_cls if spec.name in AUGMENTED else data_cls
    trainer.fit(module, datamodule(train, spec.batch_size or cfg.batch_size, spec.max_steps, job.seed))
    return module, monitors


def _stack(checks: Sequence[CheckRecord], t: float, value: Any) -> np.ndarray:
    """``[C, P]`` float64: ``value(SharpnessResult)`` at timestep ``t`` for every check."""
    return np.stack([value(c.results[t]).double().numpy() for c in checks])


def _signals(checks: Sequence[CheckRecord], t: float) -> dict[str, np.ndarray]:
    """Signal name -> ``[C, P]`` at timestep ``t`` (the denoising LID from the LID signal)."""
    out = {name: _stack(checks, t, sig.value) for name, sig in SIGNALS.items()}
    out["denoising_lid"] = np.stack([c.lid.denoising_lid[t].double().numpy() for c in checks])
    return out


def truth_ratio(name: str, samples: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[P]`` the study's truth ``d₁/d₂`` of probes ``samples`` against the distinct items ``x``:
    per item, at its nearest view, on an augmented data set (:func:`.augment.item_ratio`)."""
    if name in AUGMENTED:
        return item_ratio(samples, all_views(x))
    return nn_ratio(samples, x)


def train_run(job: RunJob) -> RunRecord:
    """Train one model with the study's monitors (one thread) and return its recorded checks as a :class:`RunRecord`."""
    quiet()
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    x, held = make_data(job.spec.name, job.n, job.seed, job.cfg.held_out)
    module, (monitor, *plain) = _fit(job, x, held)
    schedule = find_score(module).schedule  # what the monitor found: the module's, or its diffusers scheduler's
    assert monitor.calibrated_sigmas is not None
    t_of = {
        f"auto {c:g}": float(schedule.timestep_for_sigma(float(s)))
        for c, s in zip(job.cfg.sigma_factors, monitor.calibrated_sigmas)
    }
    checks = monitor.checks
    samples = torch.stack([c.samples for c in checks])  # [C, P, *shape]
    plain_ratio = plain_gap = None
    if plain:
        plain_ratio = np.stack([c.monitor_ratio.double().numpy() for c in plain[0].checks])
        plain_gap = float((torch.stack([c.samples for c in plain[0].checks]) - samples).abs().max())
    return RunRecord(
        dataset=job.spec.name,
        n=job.n,
        seed=job.seed,
        dim=int(x[0].numel()),
        median_nn=median_nn_distance(x),
        sigma={key: float(schedule.sigma(t)) for key, t in t_of.items()},
        steps=np.array([c.step for c in checks]),
        nn_ratio=np.stack([truth_ratio(job.spec.name, c.samples, x).numpy() for c in checks]),
        monitor_ratio=np.stack([c.monitor_ratio.double().numpy() for c in checks]),
        plain_ratio=plain_ratio,
        plain_probe_gap=plain_gap,
        samples=samples.flatten(2).float().numpy(),
        signals={key: _signals(checks, t) for key, t in t_of.items()},
        data_lid={key: float(checks[0].lid.data_lid[t]) for key, t in t_of.items()},
        values={k: np.array([c.values.get(k, np.nan) for c in checks], dtype=np.float64) for k in checks[0].values},
        loss_t=np.array(job.cfg.loss_timesteps),
        loss_train=np.stack([c.loss_train for c in checks]),
        loss_held=np.stack([c.loss_held for c in checks]),
        hessian_score_norm=np.stack([c.hessian_score_norm.double().numpy() for c in checks]),
        check_seconds=np.array(monitor.seconds),
        shipped=library_defaults(),
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
    """Every run of the study: the selection seeds' first (so every choice can be made while the
    others train), each part longest first (so two workers finish together)."""
    jobs = [RunJob(cfg, spec, n, seed) for seed in cfg.seeds for spec in cfg.data for n in spec.ns]
    jobs.sort(key=lambda j: (j.seed not in cfg.select_seeds, -j.spec.cost))
    return jobs


def run_all(
    cfg: StudyConfig,
    workers: int,
    done_runs: Sequence[RunRecord] = (),
    save: Callable[[list[RunRecord]], None] | None = None,
) -> list[RunRecord]:
    """Train every run of ``cfg`` not in ``done_runs`` (``workers`` processes, one thread each),
    printing progress and handing every run so far to ``save`` as each one finishes (a crash
    loses no finished run); sorted by data set, N, seed."""
    finished = {r.key for r in done_runs}
    jobs = [j for j in jobs_of(cfg) if (j.spec.name, j.n, j.seed) not in finished]
    runs: list[RunRecord] = list(done_runs)
    started = time.perf_counter()

    def done(run: RunRecord) -> None:
        runs.append(run)
        if save is not None:
            save(runs)
        print(
            f"  [{len(runs) - len(done_runs):3d}/{len(jobs)}] {run.dataset:<12} N={run.n:<5} seed={run.seed} "
            f"{run.seconds:6.1f}s  (elapsed {time.perf_counter() - started:6.0f}s)",
            flush=True,
        )

    if workers <= 1:
        for job in jobs:
            done(train_run(job))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(train_run, job) for job in jobs]):
                done(future.result())
    runs.sort(key=lambda r: r.key)
    return runs


def machine() -> str:
    """``"x86_64, 2 CPU(s)"``: the machine, as the report names it."""
    return f"{platform.machine()}, {os.cpu_count()} CPU(s)"
