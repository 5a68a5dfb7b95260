"""``memwatch scan``: run the monitor's check on saved checkpoints, after training.

Each checkpoint is measured exactly as a live check of :class:`memwatch.MemorizationMonitor`
would have measured it at that step — the same probes, timesteps, spectrum settings and metrics,
through the monitor's own code path — and the onset detector is replayed over the checks in the
order of their global steps, so the onset (and the last clean checkpoint) are the ones the
monitor would have declared. Written to ``out``:

* ``scan.csv`` — one row per checkpoint: its path, global step, and every metric under the live
  monitor's names (``sharp_fraction_mean``, ``memorized_fraction``, ``nn_memorized_fraction``,
  ``auroc``, ``onset``, ``clean_step``, ``t{t}/…``);
* ``curves.png`` — those curves with the onset (:func:`memwatch.plots.plot_metric_curves`);
* ``attribution.csv`` — with training data, per checkpoint the training items the probes copy
  (:func:`memwatch.attribution.copied_items`), the most copied first;
* ``scan_cache.json`` — results per checkpoint, keyed by its path, modification time, size and
  the settings: a checkpoint already scanned with the same settings is not measured again;
* ``skipped.csv`` — the checkpoints that could not be read (empty, truncated, not a checkpoint, a
  diffusers folder that does not load) and why: each is reported with one warning and skipped,
  and the scan goes on;
* optionally an offline W&B run with the same keys (``memwatch/…`` against the global step).

Two kinds of checkpoint, mixed at will:

* **Lightning checkpoints** (``*.ckpt``). Which LightningModule class: ``module_class`` (a class,
  or its import path ``"package.module.Class"``), else the class path that ``LightningCLI`` (and
  ``memwatch fit``) stores in the checkpoint's ``hyper_parameters["_class_path"]``. The global
  step is the checkpoint's own. Loading a checkpoint imports that class and unpickles the file:
  scan only checkpoints you trust.
* **diffusers folders**, as ``save_pretrained`` writes them and diffusers' training scripts keep
  them: a model folder (``config.json`` and weights) or a folder with a ``unet/`` model folder
  (``checkpoint-500/unet/``). A scanned folder that is itself a diffusers output folder
  (``output_dir/unet/``, ``output_dir/scheduler/``, ``output_dir/checkpoint-500/unet/``) gives its
  ``checkpoint-N`` folders; its own ``unet/`` (the final pipeline, without a step) is a part, not a
  checkpoint. The network's class comes from its ``config.json`` (``_class_name``, a
  ``UNet2DModel``); the scheduler from ``scheduler`` (``--scheduler DIR``: e.g. the base model's),
  else from a ``scheduler/`` folder in the checkpoint folder, else in the folders above it up to
  the folder scanned (``output_dir/scheduler/``). The global step is the last number in the
  folder's name (``checkpoint-500`` → 500). The network and its scheduler are measured as a
  module holding both, which the monitor finds without glue.

Example:
    >>> result = scan(["ckpts/"], DDPMModule, data=train_images, out="scan_out")  # doctest: +SKIP
    >>> result.onset_step, result.clean_checkpoint  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from memwatch.attribution import CopiedItem, copied_items
from memwatch.callback import MemorizationMonitor
from memwatch.discovery import batch_range
from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.loggers import MonitorLogger, finish_wandb, wandb_logger
from memwatch.options import LEGACY_NAMES, regroup
from memwatch.probes import isolated

__all__ = [
    "CACHE_NAME",
    "SKIPPED_NAME",
    "CheckpointScan",
    "ScanResult",
    "SkippedCheckpoint",
    "build_parser",
    "load_data",
    "main",
    "scan",
]

CACHE_NAME = "scan_cache.json"
SKIPPED_NAME = "skipped.csv"
_CACHE_VERSION = 1
_CURVES = ("alarm_fraction", "sharp_fraction_mean", "memorized_fraction", "nn_memorized_fraction")
_FIRST_COLUMNS = (
    "alarm_fraction",
    "sharp_fraction_mean",
    "memorized_fraction",
    "nn_memorized_fraction",
    "auroc",
    "onset",
)
_WANDB_SCAN_MODES = ("offline", "disabled")


@dataclass(frozen=True)
class CheckpointScan:
    """One checkpoint's check.

    Attributes:
        path: the checkpoint file.
        step: its global step.
        values: the check's scalars under the live monitor's names (``onset`` and ``clean_step``
            from the detector replayed over the scan; ``check_seconds`` of the measurement).
        copied: training items the probes copy, most copied first (empty without data).
        cached: the values came from the cache (not measured in this call).
    """

    path: Path
    step: int
    values: dict[str, float]
    copied: list[CopiedItem] = field(default_factory=list)
    cached: bool = False


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint that could not be read (empty, truncated, not a checkpoint, a diffusers folder
    that does not load): reported, left out of the checks, listed in ``skipped.csv``.

    Attributes:
        path: the checkpoint file or folder.
        reason: why, in one line.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan` found.

    Attributes:
        checks: one :class:`CheckpointScan` per checkpoint, by ascending global step.
        onset_step: the global step at which the detector declares onset (``None``: none).
        clean_checkpoint: the last clean checkpoint before onset (``None``: no clean check).
        measured: checkpoints measured in this call (the others came from the cache).
        files: ``"table"``, ``"curves"``, ``"attribution"``, ``"cache"``, ``"skipped"`` → written paths.
        wandb_dir: the offline W&B run's folder, or ``None``.
        skipped: the checkpoints that could not be read, with the reason (not measured, not in
            ``checks``).
        onset_key: the share the onset rule watches (``alarm_fraction`` by default).
    """

    checks: list[CheckpointScan]
    onset_step: int | None
    clean_checkpoint: Path | None
    measured: int
    files: dict[str, Path] = field(default_factory=dict)
    wandb_dir: Path | None = None
    skipped: list[SkippedCheckpoint] = field(default_factory=list)
    onset_key: str = "alarm_fraction"

    @property
    def history(self) -> list[dict[str, float]]:
        """Every check's values with its ``step``, as :attr:`MemorizationMonitor.history` holds them."""
        return [dict(c.values, step=float(c.step)) for c in self.checks]

    @property
    def most_copied(self) -> list[CopiedItem]:
        """The last checkpoint's copied items, most copied first (empty without data)."""
        return self.checks[-1].copied if self.checks else []


def scan(
    checkpoints: Sequence[str | Path],
    module_class: type[pl.LightningModule] | str | None = None,
    *,
    data: Tensor | Dataset | None = None,
    ids: Sequence[Any] | None = None,
    monitor_kwargs: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    wandb_mode: str = "disabled",
    device: str | torch.device = "cpu",
    scheduler: str | Path | None = None,
) -> ScanResult:
    """Measure saved checkpoints as the monitor's checks would have, in global-step order.

    Every argument is checked before the first checkpoint is read. A checkpoint that cannot be
    read (an empty, truncated or non-checkpoint file; a diffusers folder that does not load, names
    no step or has no scheduler) is skipped with one warning naming it and why, and listed in
    :attr:`ScanResult.skipped`.

    Args:
        checkpoints: Lightning checkpoint files, diffusers folders, or folders holding either
            (their ``*.ckpt`` files and diffusers sub-folders), in any order.
        module_class: the LightningModule class or its import path; default: the checkpoint's
            ``hyper_parameters["_class_path"]`` (written by ``LightningCLI``).
        data: training data ``[N, *shape]`` (finite floating point, at least 2 items), or a
            ``Dataset`` of ``(data, id)`` items / mappings whose first tensor is the data and
            ``"id"`` the id: the nearest-neighbour ground truth (``nn_memorized_fraction``,
            ``auroc``), the attribution table, the probe shape and the data range of the monitor
            unless ``monitor_kwargs`` set them. Hold each item once (see :mod:`memwatch.attribution`).
        ids: ids of the items of a tensor ``data`` (default: the index; a Dataset's own ids win).
        monitor_kwargs: arguments of :class:`MemorizationMonitor` (the live run's, for the same
            numbers); ``save_clean_checkpoint`` is forced off (the checkpoints are on disk).
        out: folder of the outputs and the cache (created); ``None`` writes nothing (and resumes
            nothing).
        resume: reuse cached results of unchanged checkpoints measured with the same settings.
        progress: a rich progress bar over the checkpoints.
        wandb_mode: ``"offline"`` (a W&B run under ``out``, needs ``out``) or ``"disabled"``.
        device: where the checkpoints are loaded and measured.
        scheduler: a diffusers scheduler folder for diffusers checkpoints (default: a
            ``scheduler/`` folder in the checkpoint folder, else in the folders above it up to the
            folder scanned — the layout of diffusers' training scripts, ``output_dir/scheduler/``
            above ``output_dir/checkpoint-500/unet/``).

    Returns:
        :class:`ScanResult` (no checks when every checkpoint was skipped).

    Raises:
        MemwatchError: a bad argument (no checkpoint, a missing path, ``out`` naming a file,
            ``data`` that is not finite or not ``[N, *shape]``, an unknown module class or device,
            a ``scheduler`` without a ``scheduler_config.json``, a bad ``wandb_mode``, the monitor's
            own argument errors), a Lightning checkpoint that does not load as ``module_class``, or
            a checkpoint the monitor refuses with these settings (the message names it).
    """
    module_class = _resolve_class(module_class)
    out = _check_options(out, wandb_mode, device, scheduler)
    roots = _checkpoint_files(checkpoints)
    reference, ids = _reference(data, ids)
    monitor, kwargs = _build_monitor(monitor_kwargs, reference)
    settings = _fingerprint(
        {"monitor": kwargs, "module": _class_name(module_class), "device": str(device), "scheduler": str(scheduler)}
    )
    cache = _Cache(out / CACHE_NAME if out is not None else None, settings, enabled=resume)
    checker = _OfflineCheck(
        monitor,
        ids=ids,
        num_items=None if reference is None else len(reference),
        data_shape=None if reference is None or "sample_shape" in (monitor_kwargs or {}) else reference.shape[1:],
    )
    load = functools.partial(_load, roots=roots, module_class=module_class, scheduler=scheduler, device=device)
    checks, skipped, measured = _measure_all(list(roots), checker, cache, load, progress)
    checks, onset, clean = _replay(checker.monitor, checks)
    result = ScanResult(checks, onset, clean, measured, skipped=skipped, onset_key=checker.monitor.detector.monitor)
    if out is not None:
        result = _write(result, out, cache.path, wandb_mode)
    return result


def _measure_all(
    paths: list[Path],
    checker: _OfflineCheck,
    cache: _Cache,
    load: Callable[[Path], pl.LightningModule],
    progress: bool,
) -> tuple[list[CheckpointScan], list[SkippedCheckpoint], int]:
    """The checks of the readable checkpoints in step order (cached ones as stored), the skipped
    ones, and how many were measured now."""
    skipped: list[SkippedCheckpoint] = []
    entries: dict[Path, dict[str, Any] | None] = {}
    steps: dict[Path, int] = {}
    for path in paths:
        entries[path] = cache.get(path)
        try:
            steps[path] = entries[path]["step"] if entries[path] is not None else _global_step(path)
        except _Unreadable as bad:
            skipped.append(_skip(path, bad))
    order = sorted(steps, key=lambda p: (steps[p], str(p)))
    measured: set[Path] = set()
    with _progress(progress, len(order)) as advance:
        for path in order:
            if entries[path] is None:
                try:
                    module = load(path)
                except _Unreadable as bad:
                    skipped.append(_skip(path, bad))
                    advance(f"step {steps[path]} skipped")
                    continue
                entries[path] = checker.measure(module, steps[path], path)
                cache.put(path, entries[path])
                measured.add(path)
            advance(f"step {steps[path]}")
    checks = [_from_entry(p, e, cached=p not in measured) for p in order if (e := entries[p]) is not None]
    return checks, skipped, len(measured)


def _load(
    path: Path, *, roots: dict[Path, Path], module_class: type[pl.LightningModule] | None, scheduler: Any, device: Any
) -> pl.LightningModule:
    """The module of a checkpoint file or diffusers folder (``roots``: where each was found)."""
    if path.is_dir():
        return _load_diffusers(path, scheduler, device, roots[path])
    return _load_module(path, module_class, device)


class _Unreadable(Exception):
    """A checkpoint that cannot be read; the scan skips it (its message: the reason, one line)."""


def _skip(path: Path, bad: _Unreadable) -> SkippedCheckpoint:
    skipped = SkippedCheckpoint(path, str(bad))
    warnings.warn(f"memwatch scan: skipped {str(path)!r}: {skipped.reason}", UserWarning, stacklevel=3)
    return skipped


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (a MemwatchError: its message alone); of a long line,
    its first sentence."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 160 and ". " in text:
        text = text.split(". ")[0] + "."
    if isinstance(err, MemwatchError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------- the check
class _OfflineCheck:
    """A monitor's check without a Trainer: one measurement of a loaded module, its values.

    It runs the monitor's own code path: :meth:`MemorizationMonitor.prepare` finds the score,
    the evaluation timesteps and indexes the reference data (as fit start does), and
    :meth:`~MemorizationMonitor.offline_check` draws and measures all probes and turns every
    signal's results into the logged scalars.
    """

    def __init__(
        self,
        monitor: MemorizationMonitor,
        *,
        ids: Sequence[Any] | Dataset | None,
        num_items: int | None,
        data_shape: Sequence[int] | None = None,
    ) -> None:
        self.monitor, self.ids, self.num_items = monitor, ids, num_items
        self.data_shape = None if data_shape is None else tuple(data_shape)  # the probe shape, when `data` set it

    def measure(self, module: pl.LightningModule, step: int, path: Path) -> dict[str, Any]:
        """The cache entry of one checkpoint: its step, values and copied items (JSON-able).

        Raises:
            MemwatchError: the monitor refuses the module with these settings (the message names
                the checkpoint, and the data's shape when the network does not take it).
        """
        monitor = self.monitor
        started = time.perf_counter()
        with isolated(module):
            try:
                monitor.prepare(module)
            except MemwatchError as err:
                raise MemwatchError(self._refusal(err, path)) from err
            if monitor.calibrating and monitor.calibrated_sigmas is None:  # once, as a live run at its first check
                if monitor.reference is None:
                    raise MemwatchError(
                        'sigmas="auto" (the default) sets the noise levels from the training data, and a scan sees '
                        "no batches: pass the training data as `data`, or noise levels as `sigmas`"
                    )
                monitor.calibrate(monitor.reference)
            elif monitor.reference is not None and monitor.signals["lid"].pending:
                monitor.reference_lid(monitor.reference)  # the LID signal's data LID, from the data
            draft = monitor.offline_check(module)  # the copies from the monitor's copy index of `data`
        values, measurement = draft.values, draft.measurement
        values["check_seconds"] = time.perf_counter() - started
        copied = []
        if measurement.nearest is not None and measurement.nn_ratio is not None:
            flagged = measurement.primary.memorization_score > monitor.sharpness.score_threshold
            copied = copied_items(
                measurement.nearest, measurement.nn_ratio, flagged, num_items=self.num_items, ids=self.ids
            )
        return {"step": step, "values": values, "copied": [_item_dict(c) for c in copied]}

    def _refusal(self, err: MemwatchError, path: Path) -> str:
        """The monitor's refusal of a checkpoint; a network that fails on probes shaped like the
        ``data`` items (the probe shape came from them) is said in those terms."""
        cause = err.__cause__
        if self.data_shape is not None and cause is not None and "sample_shape" in str(err):
            return (
                f"the network of {str(path)!r} fails on samples shaped like the `data` items, {self.data_shape} "
                f"({_one_line(cause)}): pass the data this model was trained on as `data` (a latent model's "
                "latents), or the shape the network takes as `sample_shape`"
            )
        return f"{str(path)!r}: {err}"


def _replay(
    monitor: MemorizationMonitor, checks: list[CheckpointScan]
) -> tuple[list[CheckpointScan], int | None, Path | None]:
    """Feed the monitor's detector every check in step order: ``onset`` / ``clean_step`` values,
    the onset step and the last clean checkpoint, as the live monitor would have logged them."""
    detector, clean, out = monitor.detector, None, []
    for check in checks:
        values = {k: v for k, v in check.values.items() if k not in ("onset", "clean_step")}
        decision = detector.update(check.step, values[detector.monitor])  # the share `onset_on` names
        if decision.clean:
            clean = check.path
        values["onset"] = float(decision.memorizing)
        if detector.last_clean_step is not None:
            values["clean_step"] = float(detector.last_clean_step)
        out.append(CheckpointScan(check.path, check.step, values, check.copied, check.cached))
    return out, detector.onset_step, clean


# ---------------------------------------------------------------------- inputs
def _check_options(
    out: str | Path | None, wandb_mode: str, device: str | torch.device, scheduler: str | Path | None
) -> Path | None:
    """The scan's own options, checked before the first checkpoint; the output folder, created."""
    if wandb_mode not in _WANDB_SCAN_MODES:
        raise MemwatchError(f"`wandb_mode` must be one of {_WANDB_SCAN_MODES}, got {wandb_mode!r}")
    if wandb_mode == "offline" and out is None:
        raise MemwatchError("`wandb_mode`='offline' needs an `out` folder for the run")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # a misspelt device, or CUDA not built / not present
        raise MemwatchError(f"`device` {str(device)!r} is not available here ({_one_line(err)})") from err
    if scheduler is not None:
        _scheduler_class(Path(scheduler))
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MemwatchError(f"`out` must name a folder for the results, got the file {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission
        raise MemwatchError(f"`out` folder {str(out)!r} cannot be created: {err.strerror or err}") from err
    return out


def _checkpoint_files(checkpoints: Sequence[str | Path]) -> dict[Path, Path]:
    """Every checkpoint named, or found in a named folder, → the folder it was found in (a named
    checkpoint: the folder holding it); a scheduler is looked for up to that folder."""
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    found: dict[Path, Path] = {}
    for item in checkpoints:
        path = Path(item).resolve()
        if not path.exists():
            raise MemwatchError(f"`checkpoints`: {str(item)!r} is neither a checkpoint file nor a folder")
        inside = _inside(path) if path.is_dir() else []
        for file in inside:
            found.setdefault(file, path)
        if not inside and (path.is_file() or _is_diffusers_folder(path)):
            found.setdefault(path, path.parent)
    if not found:
        raise MemwatchError(f"`checkpoints` must name at least one checkpoint, got {list(map(str, checkpoints))}")
    return found


def _inside(folder: Path) -> list[Path]:
    """The checkpoints in a folder: its ``*.ckpt`` files and diffusers checkpoint folders. In a
    diffusers output folder (``unet/``, ``scheduler/``, ``checkpoint-N/``) or checkpoint folder, the
    model folders (``unet/``, ``unet_ema/``, ``vae/``) are its parts: only folders holding a
    ``unet/`` count."""
    parts = _is_diffusers_folder(folder)
    folders = [
        p
        for p in sorted(folder.iterdir())
        if (p / "unet" / "config.json").is_file() or (not parts and (p / "config.json").is_file())
    ]
    return sorted(folder.glob("*.ckpt")) + folders


def _global_step(path: Path) -> int:
    """A checkpoint's global step (a diffusers folder: the last number in its name).

    Raises:
        _Unreadable: the file is empty, not a torch file, truncated, or not a Lightning checkpoint;
            the folder names no step.
    """
    if path.is_dir():  # a diffusers folder: checkpoint-500, step_500, ...
        numbers = re.findall(r"\d+", path.name)
        if not numbers:
            raise _Unreadable("the folder's name holds no step: name it after its global step (e.g. checkpoint-500)")
        return int(numbers[-1])
    step = _read_checkpoint(path).get("global_step")
    if not isinstance(step, int):
        raise _Unreadable("it holds no `global_step`: not a Lightning checkpoint")
    return step


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise _Unreadable("the file is empty")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a damaged or foreign file can raise anything: the file is unreadable
        raise _Unreadable(f"not a readable checkpoint (truncated or another format? {_one_line(err)})") from err
    if not isinstance(checkpoint, dict):
        raise _Unreadable(f"it holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


def _load_module(path: Path, module_class: type[pl.LightningModule] | None, device: Any) -> pl.LightningModule:
    """The LightningModule of a checkpoint, as ``module_class`` (default: the class it names)."""
    cls = module_class
    if cls is None:
        cls = (_read_checkpoint(path).get("hyper_parameters") or {}).get("_class_path")
        if cls is None:
            raise MemwatchError(
                f"checkpoint {str(path)!r} does not name its LightningModule class (no "
                "hyper_parameters['_class_path'], which LightningCLI / `memwatch fit` store): pass `module_class`, "
                "its import path 'package.module.Class'"
            )
        cls = _resolve_class(cls)
    try:
        return cls.load_from_checkpoint(path, map_location=device).to(device)
    except Exception as err:  # arguments or weights of another class: the message says which class was tried
        raise MemwatchError(
            f"checkpoint {str(path)!r} does not load as {_qualified(cls)} ({_one_line(err)}): pass the "
            "LightningModule class it was saved from as `module_class`"
        ) from err


def _resolve_class(module_class: type | str | None) -> type[pl.LightningModule] | None:
    """``module_class`` as a LightningModule subclass (an import path imported)."""
    cls = _import_class(module_class) if isinstance(module_class, str) else module_class
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise MemwatchError(f"`module_class` must be a LightningModule subclass or its import path, got {cls!r}")
    return cls


def _is_diffusers_folder(path: Path) -> bool:
    """A ``save_pretrained`` model folder, or a folder holding one as ``unet/``."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file())


class _DiffusersModel(pl.LightningModule):
    """A loaded diffusers network and its scheduler as attributes: what the monitor's discovery finds."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.unet, self.scheduler = unet, scheduler


def _load_diffusers(path: Path, scheduler: str | Path | None, device: Any, root: Path) -> pl.LightningModule:
    """The network of a diffusers folder (``path`` or ``path/unet``) and its scheduler, as a module.

    Raises:
        _Unreadable: an unreadable ``config.json``, a network other than a ``UNet2DModel``, no
            scheduler (``scheduler``, or a ``scheduler/`` folder from ``path`` up to ``root``), or
            weights that do not load.
    """
    import diffusers

    model_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise _Unreadable(f"its config.json cannot be read ({_one_line(err)})") from err
    if name != "UNet2DModel":
        raise _Unreadable(
            f"{str(model_dir)!r} holds a {name!r}; scan loads UNet2DModel folders (a conditional network needs its "
            "null condition: scan a Lightning checkpoint of a module with `memwatch_score()`)"
        )
    found = Path(scheduler) if scheduler is not None else _find_scheduler(path, root)
    if found is None:
        raise _Unreadable(
            f"no scheduler/ folder in it or above it up to {str(root)!r}: pass `scheduler`, a folder with the "
            "scheduler_config.json the model was trained with"
        )
    try:
        unet = diffusers.UNet2DModel.from_pretrained(model_dir)
        noise_scheduler = _scheduler_class(found).from_pretrained(found)
    except Exception as err:  # missing or damaged weights, a damaged scheduler config
        raise _Unreadable(f"it does not load ({_one_line(err)})") from err
    return _DiffusersModel(unet, noise_scheduler).to(device)


def _find_scheduler(path: Path, root: Path) -> Path | None:
    """``scheduler/`` in the checkpoint folder ``path`` (beside its ``unet/``), else in each folder
    above it up to ``root`` (``output_dir/scheduler/`` above ``output_dir/checkpoint-500/``)."""
    folder = path
    while True:
        if (folder / "scheduler" / "scheduler_config.json").is_file():
            return folder / "scheduler"
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def _scheduler_class(folder: Path) -> type:
    """The diffusers scheduler class a scheduler folder's config names."""
    import diffusers

    config = folder / "scheduler_config.json"
    if not config.is_file():
        raise MemwatchError(f"`scheduler` must be a folder with a scheduler_config.json, got {str(folder)!r}")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except ValueError as err:
        raise MemwatchError(f"`scheduler`: {str(config)!r} is not JSON ({_one_line(err)})") from err
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise MemwatchError(f"`scheduler`: {str(folder)!r} names an unknown diffusers scheduler class {name!r}")
    return cls


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise MemwatchError(
            f"`module_class`: cannot import {class_path!r} (expected 'package.module.Class'): {err}"
        ) from err


def _class_name(module_class: type | str | None) -> str | None:
    return module_class if module_class is None or isinstance(module_class, str) else _qualified(module_class)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _reference(
    data: Tensor | Dataset | None, ids: Sequence[Any] | None
) -> tuple[Tensor | None, Sequence[Any] | Dataset | None]:
    """The training data as a checked tensor ``[N, *shape]``, and where the items' ids come from."""
    if data is None:
        return None, ids
    if isinstance(data, Tensor):
        if ids is not None and len(ids) != len(data):
            raise MemwatchError(f"`ids` must hold one id per item of `data` ({len(data)}), got {len(ids)}")
        return _checked_data(data.detach().cpu()), ids
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=256, shuffle=False)
        return _checked_data(torch.cat([first_tensor(b) for b in loader]).detach().cpu()), data
    raise MemwatchError(f"`data` must be a tensor [N, *shape], a Dataset or None, got {type(data).__name__}")


def _checked_data(data: Tensor) -> Tensor:
    """``data`` as the probes and the ground truth need it: ``[N ≥ 2, *shape]``, floating, finite."""
    if data.ndim < 2 or len(data) < 2:
        raise MemwatchError(
            f"`data` must hold at least 2 training items as [N, *shape] (the nearest-neighbour ratio needs two), "
            f"got shape {tuple(data.shape)}"
        )
    if not data.is_floating_point():
        raise MemwatchError(
            "`data` must be floating point, in the values the model trains on (e.g. images / 127.5 - 1), "
            f"got {data.dtype}"
        )
    bad = int((~torch.isfinite(data.flatten(1))).any(dim=1).sum())
    if bad:
        raise MemwatchError(f"`data` must be finite: {bad} of its {len(data)} items hold NaN or Inf")
    return data


def _build_monitor(
    monitor_kwargs: dict[str, Any] | None, reference: Tensor | None
) -> tuple[MemorizationMonitor, dict[str, Any]]:
    """The scan's monitor — the one place it is built — and the arguments it was built with (the
    cache's settings): ``monitor_kwargs``, no clean checkpoint, and the training data's reference,
    probe shape and range unless given."""
    kwargs = dict(monitor_kwargs or {})
    if isinstance(kwargs.get("reference_data"), str):
        raise MemwatchError(
            f"`monitor_kwargs`: reference_data={kwargs['reference_data']!r} compares the probes with training batches, "
            "and a scan sees none: pass the training data as `data`"
        )
    kwargs["save_clean_checkpoint"] = False
    if reference is not None:
        kwargs.setdefault("reference_data", reference)
        kwargs.setdefault("sample_shape", tuple(reference.shape[1:]))
        kwargs.setdefault("data_range", batch_range(reference))
    # the scan's settings are flat (its flags); the monitor takes them in its option groups
    groups = {
        n: p.default for n, p in inspect.signature(MemorizationMonitor).parameters.items() if is_dataclass(p.default)
    }
    flat = {k: v for k, v in kwargs.items() if k in LEGACY_NAMES}
    top = {k: v for k, v in kwargs.items() if k not in LEGACY_NAMES}
    return MemorizationMonitor(**top, **regroup(groups, flat, warn=False)), kwargs


# ---------------------------------------------------------------------- cache
class _Cache:
    """``{resolved path: {mtime_ns, size, settings, step, values, copied}}`` in one JSON file,
    rewritten (atomically) after every measured checkpoint, so an interrupted scan resumes."""

    def __init__(self, path: Path | None, settings: str, *, enabled: bool) -> None:
        self.path, self.settings = path, settings
        self.entries: dict[str, Any] = {}
        if path is not None and path.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                stored = json.loads(path.read_text())
                if stored.get("version") == _CACHE_VERSION:
                    self.entries = stored.get("checkpoints", {})
        self.enabled = enabled

    def _stamp(self, path: Path) -> dict[str, Any]:
        stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path.stat()]
        mtime, size = max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats)
        return {"mtime_ns": mtime, "size": size, "settings": self.settings}

    def get(self, path: Path) -> dict[str, Any] | None:
        entry = self.entries.get(str(path))
        if not self.enabled or entry is None:
            return None
        return entry if all(entry.get(k) == v for k, v in self._stamp(path).items()) else None

    def put(self, path: Path, entry: dict[str, Any]) -> None:
        self.entries[str(path)] = {**self._stamp(path), **entry}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "checkpoints": self.entries}, default=str))
            tmp.replace(self.path)


def _fingerprint(obj: Any) -> str:
    """A stable hash of the scan's settings (tensors by content, callables by name)."""
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True).encode()).hexdigest()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        data = obj.detach().cpu().contiguous()
        return {"tensor": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "shape": list(data.shape)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return _qualified(obj)
    return repr(obj)


def _item_dict(item: CopiedItem) -> dict[str, Any]:
    return {
        "index": item.index,
        "id": item.id,
        "copies": item.copies,
        "flagged_copies": item.flagged_copies,
        "probes": list(item.probes),
    }


def _from_entry(path: Path, entry: dict[str, Any], *, cached: bool) -> CheckpointScan:
    copied = [
        CopiedItem(c["index"], c["id"], c["copies"], c["flagged_copies"], tuple(c["probes"])) for c in entry["copied"]
    ]
    return CheckpointScan(path, int(entry["step"]), dict(entry["values"]), copied, cached)


# ---------------------------------------------------------------------- outputs
def _write(result: ScanResult, out: Path, cache_path: Path | None, wandb_mode: str) -> ScanResult:
    files: dict[str, Path] = {}
    if result.checks:
        files["table"] = _write_table(result, out / "scan.csv")
        files["curves"] = _write_curves(result, out / "curves.png")
    if any(c.copied for c in result.checks):
        files["attribution"] = _write_attribution(result, out / "attribution.csv")
    if result.skipped:
        files["skipped"] = _write_skipped(result, out / SKIPPED_NAME)
    else:  # no list of an earlier scan's skipped files
        (out / SKIPPED_NAME).unlink(missing_ok=True)
    if cache_path is not None and cache_path.exists():
        files["cache"] = cache_path
    wandb_dir = _log_wandb(result, out) if wandb_mode == "offline" and result.checks else None
    return dataclasses.replace(result, files=files, wandb_dir=wandb_dir)


def _write_skipped(result: ScanResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "reason"])
        writer.writerows([str(s.path), s.reason] for s in result.skipped)
    return path


def _metric_columns(result: ScanResult) -> list[str]:
    names = {k for c in result.checks for k in c.values}
    return [n for n in _FIRST_COLUMNS if n in names] + sorted(names - set(_FIRST_COLUMNS))


def _write_table(result: ScanResult, path: Path) -> Path:
    columns = _metric_columns(result)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", *columns])
        for c in result.checks:
            writer.writerow([str(c.path), c.step, *(c.values.get(n, math.nan) for n in columns)])
    return path


def _write_curves(result: ScanResult, path: Path) -> Path:
    from memwatch import plots

    steps = [c.step for c in result.checks]
    curves = {
        n: (steps, [c.values.get(n, math.nan) for c in result.checks])
        for n in _CURVES
        if any(n in c.values for c in result.checks)
    }
    figure = plots.plot_metric_curves(
        curves, onsets={result.onset_key: result.onset_step}, ylabel="value", title="memwatch scan"
    )
    return plots.save_figure(figure, path)


_ATTRIBUTION_COLUMNS = ["rank", "index", "id", "copies", "flagged_copies", "probes"]


def _attribution_rows(check: CheckpointScan) -> list[list[Any]]:
    return [
        [r, c.index, c.id, c.copies, c.flagged_copies, " ".join(map(str, c.probes))]
        for r, c in enumerate(check.copied, start=1)
    ]


def _write_attribution(result: ScanResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", *_ATTRIBUTION_COLUMNS])
        for c in result.checks:
            writer.writerows([str(c.path), c.step, *row] for row in _attribution_rows(c))
    return path


def _log_wandb(result: ScanResult, out: Path) -> Path | None:
    logger = wandb_logger("offline", out, project="memwatch", name="scan")
    assert logger is not None
    monitor_logger = MonitorLogger([logger])
    monitor_logger.define_metrics()
    for check in result.checks:
        monitor_logger.log_scalars(check.values, check.step)
        if check.copied:
            monitor_logger.log_table("copied_items", _ATTRIBUTION_COLUMNS, _attribution_rows(check), check.step)
    return finish_wandb(logger)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """``advance(text)`` for a rich progress bar over the checkpoints (a no-op when disabled)."""
    if not enabled:
        yield lambda text: None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("memwatch scan", total=total)
        yield lambda text: bar.update(task, advance=1, description=f"memwatch scan: {text}")


# ---------------------------------------------------------------------- command line
_MONITOR_FLAGS: dict[str, dict[str, Any]] = {
    "num_probes": {"type": int},
    "sampler_steps": {"type": int},
    "sigmas": {"type": float, "nargs": "+"},
    "timesteps": {"type": float, "nargs": "+"},
    "k": {"type": int},
    "threshold": {"type": float},
    "score_threshold": {"type": float},
    "method": {},
    "num_iters": {"type": int},
    "num_vectors": {"type": int},
    "max_batch": {"type": int},
    "onset_threshold": {"type": float},
    "patience": {"type": int},
    "min_steps": {"type": int},
    "seed": {"type": int},
    "sample_shape": {"type": int, "nargs": "+"},
    "ema_attr": {},
}


# the scan's and the monitor's argument names → the command's flags, for messages (see `_in_scan_terms`)
_SCAN_TERMS: dict[str, str] = {
    **{name: "`--" + name.replace("_", "-") + "`" for name in _MONITOR_FLAGS},
    "checkpoints": "CHECKPOINTS",
    "module_class": "`--module`",
    "data": "`--data`",
    "ids": "the ids of `--data`",
    "reference_data": "`--data`",
    "data_range": "the value range of `--data`",
    "scheduler": "`--scheduler`",
    "out": "`--out`",
    "wandb_mode": "`--wandb-mode`",
    "device": "`--device`",
}
_SCAN_TERMS.update(  # the monitor's own names for the same settings (`data.sample_shape` ...)
    {f"{group}.{field}": _SCAN_TERMS[flat] for flat, (group, field) in LEGACY_NAMES.items() if flat in _SCAN_TERMS}
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block), with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` on stderr and exit with 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``memwatch scan`` flags; monitor flags left out keep the monitor's defaults."""
    parser = parser or _Parser(prog="memwatch scan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoint files, diffusers folders, or folders holding them"
    )
    parser.add_argument(
        "--scheduler",
        type=Path,
        help="scheduler folder for diffusers checkpoints (default: a scheduler/ folder in the checkpoint "
        "folder or above it, up to the folder scanned)",
    )
    parser.add_argument("--module", help="LightningModule class path (default: the checkpoint's `_class_path`)")
    parser.add_argument(
        "--data",
        help="training data: N (the digits subset DigitsDataModule(n_train=N, seed=--data-seed) trains on) "
        "or a file saved with torch.save holding a tensor [N, ...] or {'data': tensor, 'ids': list}",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the digits subset (default 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("memwatch_scan"), help="output folder (default ./memwatch_scan)"
    )
    parser.add_argument(
        "--wandb-mode", choices=_WANDB_SCAN_MODES, default="disabled", help="offline: a W&B run in --out"
    )
    parser.add_argument("--device", default="cpu", help="where to measure (default cpu)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="measure every checkpoint again")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    for name, spec in _MONITOR_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=f"MemorizationMonitor({name}=…)", **spec)
    return parser


def load_data(spec: str | None, seed: int = 0) -> tuple[Tensor | None, list[Any] | None]:
    """``--data``: ``N`` (the digits subset of :class:`memwatch.apps.toymodels.DigitsDataModule`) or a
    ``torch.save`` file with a tensor or ``{"data": tensor, "ids": [...]}``; returns ``(data, ids)``.

    Raises:
        MemwatchError: neither an integer nor a readable file of that form.
    """
    if spec is None:
        return None, None
    if spec.isdigit():
        from memwatch.data import digits

        return digits(int(spec), seed=seed), None
    path = Path(spec)
    if not path.is_file():
        raise MemwatchError(f"`--data` must be a number of digits or a torch.save file, got {spec!r}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, or pickled objects other than tensors: not a data file
        raise MemwatchError(f"`--data` file {spec!r} cannot be read as tensors ({_one_line(err)})") from err
    if isinstance(stored, Tensor):
        return stored, None
    if isinstance(stored, dict) and isinstance(stored.get("data"), Tensor):
        return stored["data"], stored.get("ids")
    raise MemwatchError(f"`--data` file {spec!r} must hold a tensor or {{'data': tensor, 'ids': list}}")


def main(argv: Sequence[str] | None = None) -> int:
    """``memwatch scan CHECKPOINTS... [--module CLASS] [--data N|FILE] [--out DIR] [--debug] ...``.

    Every error is one line on stderr (``memwatch scan: error: …``, in the command's flags; the
    traceback too with ``--debug``), every warning too (``memwatch scan: warning: …``).

    Returns:
        The exit code: 0 when at least one checkpoint was measured, 1 when every checkpoint was
        skipped or the scan failed unexpectedly, 2 for a usage error (a bad flag, a missing path,
        ``--out`` naming a file, bad ``--data``, settings the model does not take).
    """
    args = build_parser().parse_args(argv)
    with _one_line_warnings():
        try:
            result = _run(args)
        except Exception as err:  # the command's boundary: every failure becomes one line and an exit code
            return _fail(err, debug=args.debug)
    print(_summary(result), flush=True)
    if not result.checks:
        _error(f"no checkpoint could be read: all {len(result.skipped)} were skipped (see the warnings above)")
        return 1
    return 0


def _run(args: argparse.Namespace) -> ScanResult:
    """The scan the parsed flags ask for."""
    monitor_kwargs = {name: getattr(args, name) for name in _MONITOR_FLAGS if hasattr(args, name)}
    for name in ("sigmas", "timesteps", "sample_shape"):
        if name in monitor_kwargs:
            monitor_kwargs[name] = tuple(monitor_kwargs[name])
    monitor_kwargs.setdefault("verbose", False)
    data, ids = load_data(args.data, args.data_seed)
    return scan(
        args.checkpoints,
        args.module,
        data=data,
        ids=ids,
        monitor_kwargs=monitor_kwargs,
        out=args.out,
        resume=args.resume,
        progress=args.progress,
        wandb_mode=args.wandb_mode,
        device=args.device,
        scheduler=args.scheduler,
    )


def _fail(err: Exception, *, debug: bool) -> int:
    """Report a failed scan in one line (the traceback first with ``--debug``); its exit code."""
    if debug:
        traceback.print_exc()
    if isinstance(err, MemwatchError):  # what the user passed does not fit
        _error(_in_scan_terms(str(err)))
        return 2
    _error(_one_line(err) + ("" if debug else " (run with --debug for the traceback)"))
    return 1


def _error(text: str) -> None:
    print(f"memwatch scan: error: {' '.join(text.split())}", file=sys.stderr, flush=True)


def _in_scan_terms(message: str) -> str:
    """A message of the scan or the monitor with the argument names it quotes in backticks as the
    command's flags (``sample_shape=`` → ``--sample-shape``, ``reference_data`` → ``--data``)."""
    return re.sub(r"`([\w.]+)=?`", lambda m: _SCAN_TERMS.get(m[1], m[0]), message)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (the scan's skipped files, the monitor's) as ``memwatch scan: warning: …`` lines."""

    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        text = re.sub(r"^memwatch( scan)?: ", "", str(message))
        print(f"memwatch scan: warning: {' '.join(_in_scan_terms(text).split())}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _summary(result: ScanResult) -> str:
    head = f"memwatch scan: {len(result.checks)} checkpoint(s), {result.measured} measured now"
    if result.skipped:
        head += f", {len(result.skipped)} skipped: " + ", ".join(s.path.name for s in result.skipped)
    lines = [head]
    for c in result.checks:
        v = c.values
        nn = f", copies {v['nn_memorized_fraction']:.0%}" if "nn_memorized_fraction" in v else ""
        lines.append(
            f"  step {c.step}: sharp fraction {v['sharp_fraction_mean']:.3f}, flagged {v[result.onset_key]:.0%}"
            f"{nn}{'  <- onset' if c.step == result.onset_step else ''}"
        )
    lines.extend(f"  skipped {s.path}: {s.reason}" for s in result.skipped)
    if result.checks and result.onset_step is None:
        lines.append("no memorization onset")
    elif result.checks:
        lines.append(f"onset at step {result.onset_step}; last clean checkpoint: {result.clean_checkpoint}")
    top = [f"{c.id} ({c.copies} copies)" for c in result.most_copied if c.copies][:5]
    if top:
        lines.append("most copied training items (last checkpoint): " + ", ".join(map(str, top)))
    lines.extend(f"{name}: {path}" for name, path in result.files.items())
    if result.wandb_dir is not None:
        lines.append(f"W&B offline run: {result.wandb_dir}; upload with: wandb sync {result.wandb_dir}")
    return "\n".join(lines)
