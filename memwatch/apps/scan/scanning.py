"""``memwatch scan``: run the monitor's check on saved checkpoints, after training.

Each checkpoint is measured exactly as a live check of :class:`memwatch.Monitor`
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
  them: a model folder (``config.json`` and weights) or a folder with a ``unet/`` or
  ``transformer/`` model folder (``checkpoint-500/unet/``; ``checkpoint-500/transformer/`` of the
  DiT / PixArt / SD3 / Flux scripts). A scanned folder that is itself a diffusers output folder
  (``output_dir/unet/``, ``output_dir/scheduler/``, ``output_dir/checkpoint-500/unet/``) gives its
  ``checkpoint-N`` folders; its own ``unet/`` or ``transformer/`` (the final pipeline, without a
  step) is a part, not a checkpoint. The network's class comes from its ``config.json``
  (``_class_name``: a ``UNet2DModel`` or a class-conditional ``DiTTransformer2DModel``, whose null
  condition is its dropped label; a text-conditional network — ``UNet2DConditionModel``, PixArt,
  SD3, Flux — is skipped, since its unconditional probes need the empty prompt's embedding, which
  only its text encoder makes); the scheduler (DDPM / DDIM, or ``FlowMatchEulerDiscreteScheduler``
  for flow matching) from ``scheduler`` (``--scheduler DIR``: e.g. the base model's), else from a
  ``scheduler/`` folder in the checkpoint folder, else in the folders above it up to the folder
  scanned (``output_dir/scheduler/``). The global step is the last number in the folder's name
  (``checkpoint-500`` → 500). The network and its scheduler are measured as a module holding
  both, which the monitor finds without glue.

Example:
    >>> result = scan(["ckpts/"], DDPMModule, data=train_images, out="scan_out")  # doctest: +SKIP
    >>> result.onset_step, result.clean_checkpoint  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from memwatch.apps.scan.cache import CACHE_NAME, _Cache, _fingerprint, _from_entry
from memwatch.apps.scan.check import _build_monitor, _OfflineCheck, _reference, _replay
from memwatch.apps.scan.checkpoints import _checkpoint_files, _class_name, _global_step, _load, _resolve_class
from memwatch.apps.scan.diffusers_folders import _scheduler_class
from memwatch.apps.scan.results import CheckpointScan, ScanResult, SkippedCheckpoint, _one_line, _Unreadable
from memwatch.apps.scan.writers import _write
from memwatch.errors import MemwatchError

_WANDB_SCAN_MODES = ("offline", "disabled")


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
        monitor_kwargs: arguments of :class:`memwatch.Monitor` (the live run's, for the same
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
            above ``output_dir/checkpoint-500/unet/`` or ``.../transformer/``).

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


def _skip(path: Path, bad: _Unreadable) -> SkippedCheckpoint:
    skipped = SkippedCheckpoint(path, str(bad))
    warnings.warn(f"memwatch scan: skipped {str(path)!r}: {skipped.reason}", UserWarning, stacklevel=3)
    return skipped


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
